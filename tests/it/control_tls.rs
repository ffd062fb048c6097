//! TLS on the control port, as a production member serves it: real clients that trust the
//! members' CA (and nothing else) join over https and relay through DERP over TLS with no
//! debug knob, the meshed relays dial each other over https, and a rotated certificate is
//! served without a restart.

use std::sync::Arc;
use std::time::Duration;

use crate::harness::{ClusterOpts, TestCluster, ipv4, rt, wait_for};

/// The certificate member `ip:8080` presents to a client trusting `ca_pem` only.
fn served_cert(ip: &str, ca_pem: &std::path::Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(ca_pem).unwrap();
    roots
        .add(crate::harness::pem_der(&pem).into())
        .expect("the web CA");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(ip.to_string()).unwrap();
    rt().block_on(async {
        let tcp = tokio::net::TcpStream::connect(format!("{ip}:8080"))
            .await
            .unwrap();
        let tls = connector.connect(name, tcp).await.expect("TLS handshake");
        let (_, session) = tls.get_ref();
        session.peer_certificates().expect("a certificate")[0].to_vec()
    })
}

#[test]
fn real_clients_join_and_relay_over_tls_and_survive_a_rotation() {
    hsd::raft::tls::install_crypto_provider();
    let c = TestCluster::start(
        2,
        ClusterOpts {
            control_tls: true,
            ..Default::default()
        },
    );
    let ca = c.members[0].web_ca.clone().expect("a web CA");
    let key = c.user_with_key("alice", &["--reusable"]);
    let _server = c.client("tls-srv", 1, &key, None, true);
    let srv = c.wait_online(1, "tls-srv", Duration::from_secs(60));
    let upstream = format!("{}:80", ipv4(&srv));
    // On the other member, relaying through DERP only: its relay and tls-srv's are
    // different members, meshed over https.
    let client = c.client("tls-cli", 2, &key, Some(upstream.clone()), true);
    client.wait_reach("hello from tls-srv", Duration::from_secs(90));
    for m in &c.members {
        assert!(
            m.metric("hsd_derp_clients") >= 1.0,
            "member {} relays a client over TLS",
            m.id
        );
    }

    let before = served_cert(&c.members[0].ip, &ca);
    let rotated = c.rotate_control_cert(1);
    assert_ne!(before, rotated);
    wait_for(
        "member 1 to serve the rotated certificate",
        Duration::from_secs(20),
        || (served_cert(&c.members[0].ip, &ca) == rotated).then_some(()),
    );
    assert_eq!(
        c.members[0].metric("hsd_tls_reloads_total{result=\"ok\"}"),
        1.0
    );
    // A client that first meets the new certificate joins and reaches the old one; the
    // connections made before the rotation still carry traffic.
    let late = c.client("tls-late", 1, &key, Some(upstream), true);
    late.wait_reach("hello from tls-srv", Duration::from_secs(90));
    client.wait_reach("hello from tls-srv", Duration::from_secs(30));
    assert!(
        c.members[0]
            .log()
            .contains("control TLS certificate reloaded")
    );
}

/// With `tls_cert_path` the admin gRPC port is TLS too: hsctl reaches it over `https://`
/// trusting the CA through `SSL_CERT_FILE`, and plaintext gets nothing.
#[test]
fn hsctl_speaks_tls_to_the_admin_port() {
    let c = TestCluster::start(
        1,
        ClusterOpts {
            control_tls: true,
            ..Default::default()
        },
    );
    let ca = c.members[0].web_ca.clone().expect("a web CA");
    let key = c.hsctl_json(1, &["apikeys", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let grpc = c.members[0].grpc_addr();
    let hsctl = |address: String| {
        std::process::Command::new(crate::harness::hsctl_bin())
            .args(["--address", &address, "--api-key", &key, "--timeout", "5s"])
            .args(["users", "create", "over-tls", "-o", "json"])
            .env("SSL_CERT_FILE", &ca)
            .output()
            .unwrap()
    };
    let out = hsctl(format!("https://{grpc}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = hsctl(format!("http://{grpc}"));
    assert!(!plain.status.success(), "plaintext must not work");
    let users = c.hsctl_json(1, &["users", "list"]);
    assert_eq!(
        users
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["name"] == "over-tls")
            .count(),
        1
    );
}

#[test]
fn a_bad_tls_pair_refuses_the_start_and_a_bad_rotation_keeps_serving() {
    hsd::raft::tls::install_crypto_provider();
    let mut c = TestCluster::start(
        1,
        ClusterOpts {
            control_tls: true,
            ..Default::default()
        },
    );
    let ca = c.members[0].web_ca.clone().expect("a web CA");
    let web = c.members[0].dir.join("web");
    let good = served_cert(&c.members[0].ip, &ca);
    // A half-finished rotation (new certificate, old key) is refused; the old pair serves.
    let (cert, _) = hsd::raft::tls::issue_member_cert(
        &c.web_ca_dir(),
        1,
        &c.root.path().join("other"),
        &[],
        Duration::from_secs(86_400),
    )
    .unwrap();
    std::fs::copy(&cert, web.join("member-1.pem")).unwrap();
    wait_for(
        "the refused reload to be counted",
        Duration::from_secs(20),
        || (c.members[0].metric("hsd_tls_reloads_total{result=\"failed\"}") >= 1.0).then_some(()),
    );
    assert_eq!(served_cert(&c.members[0].ip, &ca), good);
    assert!(
        c.members[0]
            .log()
            .contains("still serving the previous certificate")
    );
    // Polling leaves the same bad pair alone; SIGHUP tries it again.
    let failed = "hsd_tls_reloads_total{result=\"failed\"}";
    let before = c.members[0].metric(failed);
    c.member(1).signal("-HUP");
    wait_for("SIGHUP to retry the pair", Duration::from_secs(20), || {
        (c.members[0].metric(failed) > before).then_some(())
    });
    assert_eq!(served_cert(&c.members[0].ip, &ca), good);

    // The same mismatch at start is a configuration error naming the files.
    c.member(1).stop();
    let (code, log) = c.member(1).run_until_exit(Duration::from_secs(20));
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("tls_cert_path"), "{log}");
    assert!(log.contains("member-1.key"), "{log}");
}

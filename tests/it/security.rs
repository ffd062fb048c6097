//! No unauthenticated path into the cluster: the member-to-member port is mutual TLS even
//! on the embedded default, and only current members get in — a removed member's
//! certificate is refused at once.

use std::path::Path;
use std::time::Duration;

use hsd::proto::raft::raft_service_client::RaftServiceClient;
use hsd::proto::raft::{Json, MemberStatusRequest};
use hsd::raft::tls::{self, MemberTls};
use tonic::Code;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::harness::{ClusterOpts, TestCluster, rt, wait_for};

/// A caller of a member's port: plaintext, or presenting the certificate in `cert_dir`.
struct Caller {
    addr: String,
    tls: Option<ClientTlsConfig>,
}

impl Caller {
    fn plaintext(addr: &str) -> Caller {
        Caller {
            addr: addr.into(),
            tls: None,
        }
    }

    /// Trusting `ca_dir`'s CA, presenting member `id`'s certificate issued by `issuer`.
    fn member(addr: &str, ca_dir: &Path, issuer: &Path, id: u64, out: &Path) -> Caller {
        let (cert, key) = tls::issue_member_cert(issuer, id, out, &[], tls::DEFAULT_VALIDITY)
            .expect("issue a certificate");
        let t = MemberTls::load(&ca_dir.join(tls::CA_CERT_FILE), &cert, &key).unwrap();
        Caller {
            addr: addr.into(),
            tls: Some(t.client),
        }
    }

    async fn client(&self) -> Result<RaftServiceClient<tonic::transport::Channel>, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        if let Some(t) = &self.tls {
            ep = ep.tls_config(t.clone()).unwrap();
        }
        let channel = ep.connect().await.map_err(|e| format!("connect: {e}"))?;
        Ok(RaftServiceClient::new(channel))
    }

    /// `MemberStatus`: open to any holder of a member certificate.
    fn status(&self) -> Result<u64, String> {
        rt().block_on(async {
            let reply = self
                .client()
                .await?
                .member_status(MemberStatusRequest {})
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            Ok(reply.into_inner().id)
        })
    }

    /// A `Forward` whose body is no leader operation: a member gets `InvalidArgument` (it
    /// was let in and the body refused), anyone else is stopped before the body is read.
    fn forward_code(&self) -> Result<Code, String> {
        rt().block_on(async {
            let result = self
                .client()
                .await?
                .forward(Json {
                    data: b"{}".to_vec(),
                })
                .await;
            Ok(match result {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            })
        })
    }
}

#[test]
fn the_member_port_admits_only_current_members() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let leader = c.wait_leader();
    let addr = format!("{}:50444", c.member(leader).ip);
    let scratch = tempfile::tempdir().unwrap();
    let ca = c.ca_dir();

    // Plaintext, and a certificate from another CA: refused by TLS itself.
    assert!(Caller::plaintext(&addr).status().is_err());
    let other_ca = scratch.path().join("other-ca");
    tls::init_ca(&other_ca).unwrap();
    let forged = Caller::member(&addr, &ca, &other_ca, 2, &scratch.path().join("forged"));
    assert!(forged.status().is_err(), "another CA's certificate");

    // A real member gets in.
    let out = scratch.path().join("m");
    let three = Caller::member(&addr, &ca, &ca, 3, &out);
    assert_eq!(three.forward_code(), Ok(Code::InvalidArgument));

    // The cluster CA's certificate for an id that is no member: status only.
    let stranger = Caller::member(&addr, &ca, &ca, 9, &scratch.path().join("m9"));
    assert!(
        stranger.status().is_ok(),
        "status is open to member certificates"
    );
    assert_eq!(stranger.forward_code(), Ok(Code::PermissionDenied));

    // Member 3 is removed: its certificate stops working on every member.
    let survivor = (1..=3).find(|i| *i != 3 && *i != leader).unwrap_or(leader);
    c.hsctl_json(survivor, &["cluster", "remove", "3"]);
    for id in [1u64, 2] {
        let addr = format!("{}:50444", c.member(id).ip);
        let three = Caller::member(&addr, &ca, &ca, 3, &out);
        wait_for(
            &format!("member {id} refuses the removed member"),
            Duration::from_secs(10),
            || (three.forward_code() == Ok(Code::PermissionDenied)).then_some(()),
        );
    }
}

/// The embedded default (one member, no `cluster.tls`): the member makes its own CA and
/// certificate, and its member port refuses plaintext and other CAs.
#[test]
fn the_default_member_port_is_mutual_tls() {
    let c = TestCluster::start(
        1,
        ClusterOpts {
            self_made_tls: true,
            ..Default::default()
        },
    );
    let own_ca = c.members[0].dir.join(tls::DEFAULT_DIR);
    assert!(
        own_ca.join(tls::CA_CERT_FILE).is_file(),
        "a CA in the data dir"
    );
    let addr = format!("{}:50444", c.members[0].ip);
    assert!(Caller::plaintext(&addr).status().is_err());
    let scratch = tempfile::tempdir().unwrap();
    let test_ca = c.ca_dir();
    let foreign = Caller::member(&addr, &own_ca, &test_ca, 1, scratch.path());
    assert!(foreign.status().is_err(), "a certificate from another CA");
    let own = Caller::member(&addr, &own_ca, &own_ca, 1, &scratch.path().join("own"));
    assert_eq!(own.status(), Ok(1));
    c.hsctl_json(1, &["users", "create", "still-works"]);
}

/// Revocation bites: a node an admin expires gets its own node marked expired, then its
/// map stream ends, its relay connection is cut and its next map request is refused; a
/// deleted node loses its relay connection too.
#[test]
fn expired_and_deleted_nodes_are_cut_off() {
    use hsd::control::client::{ClientError, ControlClient, keypair};
    use hsd::derp::client::DerpClient;
    use hsd::registry::{DiscoKey, NodeKey};

    let c = TestCluster::start(1, ClusterOpts::default());
    let key = c.user_with_key("revoke", &["--reusable"]);
    let addr = format!("{}:8080", c.members[0].ip);
    let derp_url = format!("http://{addr}/derp");
    let t = Duration::from_secs(10);
    rt().block_on(async {
        let mut nodes = Vec::new();
        for name in ["expiring", "deleted"] {
            let (machine, _) = keypair();
            let (private, public) = keypair();
            let node = NodeKey(public);
            let mut control = ControlClient::connect(&addr, &machine).await.unwrap();
            let (status, resp) = control.register(&node, &key, name).await.unwrap();
            assert_eq!(status, 200, "{resp}");
            let mut stream = control
                .map_stream(&node, &DiscoKey(keypair().1), "127.0.0.1:41800")
                .await
                .unwrap();
            let first = stream.next(t).await.unwrap();
            let id = first["Node"]["ID"].as_u64().expect("own node id");
            let derp = DerpClient::connect(&derp_url, private, None).await.unwrap();
            nodes.push((id, node, control, stream, derp));
        }
        let (expiring, deleted) = (nodes[0].0, nodes[1].0);

        c.hsctl_json(1, &["nodes", "expire", &expiring.to_string()]);
        let (_, node, control, stream, derp) = &mut nodes[0];
        let mut saw_expired = false;
        loop {
            match stream.next(t).await {
                Ok(m) => saw_expired |= m["Node"]["Expired"] == true,
                Err(ClientError::StreamEnded) => break,
                Err(e) => panic!("the stream must end, not: {e}"),
            }
        }
        assert!(saw_expired, "the client was told its key expired");
        let cut = tokio::time::timeout(t, async { while derp.recv().await.is_ok() {} }).await;
        assert!(cut.is_ok(), "the expired node's relay connection is closed");
        let refused = control
            .map_stream(node, &DiscoKey(keypair().1), "127.0.0.1:41801")
            .await;
        match refused {
            Err(e) => assert!(e.to_string().contains("403"), "{e}"),
            Ok(mut s) => panic!("an expired node got a map: {:?}", s.next(t).await),
        }

        c.hsctl_json(1, &["nodes", "delete", &deleted.to_string()]);
        let derp = &mut nodes[1].4;
        let cut = tokio::time::timeout(t, async { while derp.recv().await.is_ok() {} }).await;
        assert!(cut.is_ok(), "the deleted node's relay connection is closed");
    });
}

/// Input from outside is bounded: a machine has one open interactive registration (asking
/// again returns it, without a write), all open ones are capped, a Hostinfo above the
/// limit and a small-order node key are refused — each refusal counted.
#[test]
fn interactive_logins_and_hostinfo_are_bounded() {
    use hsd::control::client::{CLIENT_VERSION, ControlClient, keypair};
    use hsd::registry::NodeKey;
    use serde_json::json;

    let c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: "limits:\n  max_pending_registrations: 2\n  max_hostinfo_bytes: 4096\n"
                .into(),
            ..Default::default()
        },
    );
    let addr = format!("{}:8080", c.members[0].ip);
    rt().block_on(async {
        // One machine asking three times with one node key: one registration (a new one
        // would carry a new AuthURL).
        let mut a = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let node = NodeKey(keypair().1);
        let mut urls = Vec::new();
        for _ in 0..3 {
            let (status, resp) = a.register(&node, "", "a").await.unwrap();
            assert_eq!(status, 200, "{resp}");
            urls.push(resp["AuthURL"].as_str().expect("an AuthURL").to_string());
        }
        assert!(urls.windows(2).all(|w| w[0] == w[1]), "{urls:?}");
        // A second machine fills the cap of 2; a third is refused.
        let mut b = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let (_, resp) = b.register(&NodeKey(keypair().1), "", "b").await.unwrap();
        assert!(resp["AuthURL"].is_string(), "{resp}");
        let mut third = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let (status, resp) = third
            .register(&NodeKey(keypair().1), "", "c")
            .await
            .unwrap();
        assert_eq!(status, 200, "{resp}");
        assert!(
            resp["AuthURL"].as_str().unwrap_or_default().is_empty(),
            "{resp}"
        );
        assert!(
            resp["Error"]
                .as_str()
                .unwrap_or_default()
                .contains("waiting"),
            "{resp}"
        );

        // A Hostinfo over the limit; a small-order node key.
        let big = json!({
            "Version": CLIENT_VERSION,
            "NodeKey": NodeKey(keypair().1).to_text(),
            "Hostinfo": { "Hostname": "big", "OS": "x".repeat(8000) },
        });
        let (status, resp) = third.register_raw(&big).await.unwrap();
        assert_eq!(status, 400, "{resp}");
        assert!(
            resp.to_string().contains("limits.max_hostinfo_bytes"),
            "{resp}"
        );
        let mut low = [0u8; 32];
        low[0] = 1;
        let (status, resp) = third.register(&NodeKey(low), "", "low").await.unwrap();
        assert_eq!(status, 400, "{resp}");
    });
    // Both refusals were counted.
    wait_for("the refusals counted", Duration::from_secs(5), || {
        let m = &c.members[0];
        (m.metric("hsd_limit_refusals_total{limit=\"max_pending_registrations\"}") >= 1.0
            && m.metric("hsd_limit_refusals_total{limit=\"max_hostinfo_bytes\"}") >= 1.0)
            .then_some(())
    });
}

/// Every admin write is in the audit log with who made it and how it ended — over the
/// unix socket (the caller's uid), gRPC and REST with an API key (its prefix) — and so is
/// every refused admin authentication.
#[test]
fn admin_actions_and_refused_logins_are_audited() {
    use crate::harness::{hsctl, http_request};

    let c = TestCluster::start(1, ClusterOpts::default());
    let uid = format!("uid:{}", my_uid());
    c.hsctl_json(1, &["users", "create", "alice"]);
    let duplicate = c.hsctl(1, &["users", "create", "alice"]);
    assert!(!duplicate.status.success());
    let api = c.hsctl_json(1, &["apikeys", "create"]);
    let (key, prefix) = (
        api["key"].as_str().unwrap(),
        api["prefix"].as_str().unwrap(),
    );
    let grpc = format!("{}:50443", c.members[0].ip);
    let out = hsctl(&[
        "--address",
        &grpc,
        "--api-key",
        key,
        "users",
        "create",
        "bob",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = format!("{}x", &key[..key.len() - 1]);
    let denied = hsctl(&["--address", &grpc, "--api-key", &wrong, "users", "list"]);
    assert!(!denied.status.success());
    let http = format!("{}:8080", c.members[0].ip);
    let (status, _) = http_request(
        &http,
        "POST",
        "/api/v1/user",
        Some(key),
        Some(r#"{"name":"carol"}"#),
    );
    assert_eq!(status, 200);
    let (status, _) = http_request(
        &http,
        "GET",
        "/api/v1/user",
        Some("hskey-api-nope-nope"),
        None,
    );
    assert_eq!(status, 401);

    let by_key = format!("apikey:{prefix}");
    let expected = [
        (uid.as_str(), "create_user", "alice", "ok"),
        (uid.as_str(), "create_user", "alice", "already exists"),
        (uid.as_str(), "create_apikey", prefix, "ok"),
        (by_key.as_str(), "create_user", "bob", "ok"),
        (by_key.as_str(), "authenticate (grpc)", "", "refused"),
        (by_key.as_str(), "create_user", "carol", "ok"),
        ("anonymous", "authenticate (rest)", "", "refused"),
    ];
    let records = wait_for("every action recorded", Duration::from_secs(10), || {
        let records = c.hsctl_json(1, &["audit", "list", "--since", "1h"]);
        (records.as_array()?.len() >= expected.len()).then_some(records)
    });
    let records = records.as_array().unwrap();
    for (actor, action, target, result) in expected {
        assert!(
            records
                .iter()
                .any(|r| r["actor"].as_str().unwrap().starts_with(actor)
                    && r["action"] == action
                    && r["target"].as_str().unwrap().contains(target)
                    && r["result"].as_str().unwrap().contains(result)
                    && r["time"].is_string()),
            "no record of {actor} {action} {target} → {result}: {records:#?}"
        );
    }
    // Filters, and the same log over REST.
    let mine = c.hsctl_json(1, &["audit", "list", "--actor", &by_key]);
    assert!(
        mine.as_array()
            .unwrap()
            .iter()
            .all(|r| r["actor"] == by_key.as_str())
    );
    let (status, body) = http_request(&http, "GET", "/api/v1/audit", Some(key), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"create_user\""), "{body}");
}

/// This process's uid, as the member sees the unix-socket peer.
fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // A file this process creates is owned by its effective uid.
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid()
}

/// A client that never finishes its request head is disconnected after
/// `limits.http_header_timeout`; others are served meanwhile.
#[test]
fn a_slow_request_head_is_cut_off() {
    use std::io::{Read, Write};
    let c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: "limits:\n  http_header_timeout: 500ms\n".into(),
            ..Default::default()
        },
    );
    let addr = format!("{}:8080", c.members[0].ip);
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let (status, _) = crate::harness::http_get(&addr, "/health", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200, "others are served");
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    // The server answers 408 or just closes; either way the read ends, well before 10 s.
    loop {
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the slow connection was not closed: {e}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let head = String::from_utf8_lossy(&got);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "{head}"
    );
}

/// Floods are refused per source, per node and per relay key, each refusal counted: too
/// many connections from one address, registrations from one address, map requests from
/// one node, DERP reconnects of one key, failed admin logins from one address (after
/// which even a good key from there waits).
#[test]
fn floods_are_rate_limited_per_source_node_and_key() {
    use std::io::Read;

    use crate::harness::{hsctl, http_request};
    use hsd::control::client::{ControlClient, keypair};
    use hsd::derp::client::DerpClient;
    use hsd::registry::{DiscoKey, NodeKey};

    let c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: "limits:\n  max_connections_per_source: 6\n  registrations_per_minute: 3\n  node_updates_per_minute: 3\n  derp_connects_per_minute: 2\n  failed_admin_auth_per_minute: 2\n  max_endpoints: 4\n"
                .into(),
            ..Default::default()
        },
    );
    let m = &c.members[0];
    let addr = format!("{}:8080", m.ip);
    let refusals =
        |limit: &str| m.metric(&format!("hsd_limit_refusals_total{{limit=\"{limit}\"}}"));

    // Six idle connections are held; the seventh is closed at once — on the control
    // port and on the admin gRPC port alike.
    for port in [8080, 50443] {
        let addr = format!("{}:{port}", m.ip);
        let held: Vec<std::net::TcpStream> = (0..6)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        wait_for(
            &format!("the seventh connection to {port} refused"),
            Duration::from_secs(10),
            || {
                let mut extra = std::net::TcpStream::connect(&addr).ok()?;
                extra.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                matches!(extra.read(&mut [0u8; 1]), Ok(0)).then_some(())
            },
        );
        drop(held);
        // The member frees the slots when it sees them close: wait until one is admitted
        // (it then waits for a request, or greets with HTTP/2 settings, instead of closing).
        wait_for(
            &format!("a slot on {port} freed"),
            Duration::from_secs(10),
            || {
                let mut probe = std::net::TcpStream::connect(&addr).ok()?;
                probe
                    .set_read_timeout(Some(Duration::from_millis(300)))
                    .ok()?;
                match probe.read(&mut [0u8; 1]) {
                    Ok(n) if n > 0 => Some(()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        Some(())
                    }
                    _ => None,
                }
            },
        );
    }
    assert!(refusals("max_connections_per_source") >= 2.0);

    let key = c.user_with_key("flood", &["--reusable"]);
    rt().block_on(async {
        // Three registrations from this address, then 429 with the limit named.
        let mut registered = Vec::new();
        for i in 0..4 {
            let mut control = ControlClient::connect(&addr, &keypair().0).await.unwrap();
            let (private, public) = keypair();
            let node = NodeKey(public);
            let (status, resp) = control
                .register(&node, &key, &format!("f{i}"))
                .await
                .unwrap();
            if i < 3 {
                assert_eq!(status, 200, "{resp}");
                registered.push((control, node, private));
            } else {
                assert_eq!(status, 429, "{resp}");
                assert!(
                    resp.to_string().contains("limits.registrations_per_minute"),
                    "{resp}"
                );
            }
        }
        // One node: three map requests, then 429; another node is unaffected.
        let (control, node, private) = &mut registered[0];
        let private = *private;
        for i in 0..3 {
            let status = control
                .lite_update(
                    node,
                    &DiscoKey(keypair().1),
                    &[format!("127.0.0.1:{}", 41000 + i)],
                )
                .await
                .unwrap();
            assert_eq!(status, 200);
        }
        let status = control
            .lite_update(node, &DiscoKey(keypair().1), &[])
            .await
            .unwrap();
        assert_eq!(status, 429);
        let (other, other_node, _) = &mut registered[1];
        assert_eq!(
            other
                .lite_update(other_node, &DiscoKey(keypair().1), &[])
                .await
                .unwrap(),
            200
        );

        // Five endpoints where four are allowed: 413, naming the limit.
        let (third_client, third_node, _) = &mut registered[2];
        let five: Vec<String> = (0..5).map(|i| format!("127.0.0.1:{}", 42000 + i)).collect();
        let status = third_client
            .lite_update(third_node, &DiscoKey(keypair().1), &five)
            .await
            .unwrap();
        assert_eq!(status, 413);

        // One relay key: two connections a minute; the third is closed after login.
        let derp_url = format!("http://{addr}/derp");
        let _first = DerpClient::connect(&derp_url, private, None).await.unwrap();
        let _second = DerpClient::connect(&derp_url, private, None).await.unwrap();
        let mut third = DerpClient::connect(&derp_url, private, None).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while third.recv().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "the third connection of one key is closed");
    });

    // Two wrong API keys from this address; then even a good one is refused for a while,
    // over REST and gRPC alike.
    let good = c.hsctl_json(1, &["apikeys", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..2 {
        let (status, _) = http_request(
            &addr,
            "GET",
            "/api/v1/user",
            Some("hskey-api-nope-nope"),
            None,
        );
        assert_eq!(status, 401);
    }
    let (status, body) = http_request(&addr, "GET", "/api/v1/user", Some(&good), None);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too many failed authentications"), "{body}");
    let grpc = c.members[0].grpc_addr();
    let out = hsctl(&["--address", &grpc, "--api-key", &good, "users", "list"]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.failed_admin_auth_per_minute"));
    // The unix socket is not a network source: the admin there is never locked out.
    c.hsctl_json(1, &["users", "list"]);

    for limit in [
        "registrations_per_minute",
        "node_updates_per_minute",
        "derp_connects_per_minute",
        "failed_admin_auth_per_minute",
        "max_endpoints",
    ] {
        assert!(refusals(limit) >= 1.0, "{limit} refusals counted");
    }
}

/// The DERP mesh takes only current members: a peer holding the mesh key but not a
/// member's pinned DERP key is refused, and a removed member's mesh links are cut.
#[test]
fn the_derp_mesh_admits_only_current_members() {
    use hsd::derp::client::DerpClient;

    let mut c = TestCluster::start(3, ClusterOpts::default());
    let pinned = "pinned this member's DERP key for the mesh";
    wait_for(
        "every member pinned its DERP key",
        Duration::from_secs(30),
        || {
            c.members
                .iter()
                .all(|m| m.log().contains(pinned))
                .then_some(())
        },
    );
    let mut mesh_key = [0u8; 32];
    let text = std::fs::read_to_string(c.root.path().join("keys/mesh.key")).unwrap();
    hex::decode_to_slice(text.trim(), &mut mesh_key).unwrap();
    let url = format!("http://{}:8080/derp", c.members[0].ip);
    rt().block_on(async {
        let mut stranger = DerpClient::connect(&url, rand::random(), Some(mesh_key))
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while stranger.recv().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "a stranger with the mesh key is refused");
    });
    assert!(c.members[0].log().contains("derp mesh peer refused"));

    // Every relay's links to the other two are up.
    wait_for("the mesh formed", Duration::from_secs(30), || {
        c.members
            .iter()
            .all(|m| m.metric("hsd_derp_mesh_links_up") == 2.0)
            .then_some(())
    });
    let leader = c.wait_leader();
    let removed = if leader == 3 { 2 } else { 3 };
    let logged: Vec<usize> = c.members.iter().map(|m| m.log().len()).collect();
    let out = c.hsctl(leader, &["cluster", "remove", &removed.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The others cut its link (or refuse its redial, had it just dropped): it meshes no more.
    for m in c.members.iter().filter(|m| m.id != removed) {
        let since = logged[(m.id - 1) as usize];
        wait_for(
            &format!("member {} to refuse the removed member's mesh link", m.id),
            Duration::from_secs(30),
            || {
                let log = m.log();
                let new = &log[since..];
                (new.contains("derp mesh peer cut off: no longer a member")
                    || new.contains("derp mesh peer refused"))
                .then_some(())
            },
        );
    }
    wait_for(
        "the removed member's links down",
        Duration::from_secs(30),
        || {
            (c.members[(removed - 1) as usize].metric("hsd_derp_mesh_links_up") == 0.0)
                .then_some(())
        },
    );
}

/// The audit log keeps at most `audit.max_records` (the oldest go first).
#[test]
fn the_audit_log_is_pruned_to_its_configured_size() {
    let c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: "audit:\n  max_records: 3\n".into(),
            ..Default::default()
        },
    );
    for i in 1..=6 {
        c.hsctl_json(1, &["users", "create", &format!("u{i}")]);
    }
    let records = wait_for("the log pruned to 3", Duration::from_secs(30), || {
        let records = c.hsctl_json(1, &["audit", "list", "--since", "1h"]);
        (records.as_array()?.len() == 3).then_some(records)
    });
    let targets: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["u4", "u5", "u6"]);
}

/// `limits.max_concurrent_streams` is what the control port announces to HTTP/2 clients.
#[test]
fn the_control_port_announces_its_stream_cap() {
    let c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: "limits:\n  max_concurrent_streams: 7\n".into(),
            ..Default::default()
        },
    );
    let addr = format!("{}:8080", c.members[0].ip);
    let announced = rt().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut client, mut conn) = h2::client::handshake(tcp).await.unwrap();
        let request = http::Request::get(format!("http://{addr}/health"))
            .body(())
            .unwrap();
        // Drive the connection until the health answer arrives; by then the server's
        // SETTINGS have been read.
        let (response, _) = client.send_request(request, true).unwrap();
        let answered = tokio::select! {
            r = response => r.unwrap().status(),
            r = &mut conn => panic!("the connection ended first: {r:?}"),
        };
        assert_eq!(answered, 200);
        conn.max_concurrent_send_streams()
    });
    assert_eq!(announced, 7);
}

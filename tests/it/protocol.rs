//! The control protocol from the wire, with the crate's own minimal ts2021 client: bad
//! input gets a clear error and changes nothing; map streams carry deltas, not rebuilds.

use std::time::Duration;

use hsd::control::client::{ControlClient, MapStream, keypair};
use hsd::registry::{DiscoKey, NodeKey};
use serde_json::Value;

use crate::harness::{ClusterOpts, TestCluster, rt};

const T: Duration = Duration::from_secs(10);

/// A node registered with `key` through the member at `addr`, its map stream open and its
/// first (full) netmap read.
async fn streaming_node(
    addr: &str,
    key: &str,
    hostname: &str,
    endpoint: &str,
) -> (ControlClient, MapStream, Value) {
    let mut client = ControlClient::connect(addr, &keypair().0).await.unwrap();
    let node = NodeKey(keypair().1);
    assert_eq!(client.register(&node, key, hostname).await.unwrap().0, 200);
    let mut stream = client
        .map_stream(&node, &DiscoKey(keypair().1), endpoint)
        .await
        .unwrap();
    let full = stream.next_update(T).await.unwrap();
    (client, stream, full)
}

#[test]
fn bad_register_input_is_refused_and_changes_nothing() {
    let c = TestCluster::start(1, ClusterOpts::default());
    let key = c.user_with_key("proto", &[]);
    let addr = format!("{}:8080", c.members[0].ip);
    rt().block_on(async {
        let (machine, _) = keypair();
        let mut client = ControlClient::connect(&addr, &machine).await.unwrap();
        // Not JSON at all.
        let (status, body) = client
            .post_all("/machine/register", b"{not json".to_vec())
            .await
            .unwrap();
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        // A well-formed request with an unknown key, then a wrong secret for a real prefix.
        let node = NodeKey(keypair().1);
        // A refused key is shown to the user: 200 with a non-empty `Error` that names the
        // problem, and no authorization.
        let refused = |status: u16, resp: &Value| {
            assert_eq!(status, 200, "{resp}");
            let error = resp["Error"].as_str().unwrap_or_default().to_lowercase();
            assert!(error.contains("key"), "clear error: {resp}");
            assert_ne!(resp["MachineAuthorized"], true, "{resp}");
        };
        let (status, resp) = client
            .register(&node, "hskey-auth-nope", "x")
            .await
            .unwrap();
        refused(status, &resp);
        let prefix_only = format!("{}{}", &key[..key.len() - 4], "AAAA");
        let (status, resp) = client.register(&node, &prefix_only, "x").await.unwrap();
        refused(status, &resp);
    });
    let nodes = c.hsctl_json(1, &["nodes", "list"]);
    assert_eq!(
        nodes.as_array().unwrap().len(),
        0,
        "refused registrations leave nothing"
    );
    let keys = c.hsctl_json(1, &["preauthkeys", "list", "--user", "proto"]);
    assert_eq!(
        keys[0]["used"], false,
        "a refused attempt does not use up the key"
    );
    // The member is still healthy, and the refusals were counted.
    assert!(
        crate::harness::http_get(&addr, "/health", T)
            .unwrap()
            .1
            .contains("ok")
    );
}

#[test]
fn garbage_after_the_handshake_drops_only_that_connection() {
    use tokio::io::AsyncWriteExt;
    let c = TestCluster::start(1, ClusterOpts::default());
    let addr = format!("{}:8080", c.members[0].ip);
    rt().block_on(async {
        // A raw upgrade, then bytes that are no Noise record.
        let (machine, _) = keypair();
        let server = hsd::control::client::fetch_server_key(&addr).await.unwrap();
        let (init, _hs) = hsd::control::noise::initiate(&server, &machine, 125).unwrap();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &init);
        let req = format!("POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {b64}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(&[4, 0, 40]).await.unwrap();
        s.write_all(&[0xAB; 40]).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let closed = tokio::time::timeout(T, async {
            use tokio::io::AsyncReadExt;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the server closes a connection carrying a bad record");
        // Others are unaffected.
        let mut ok = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let (status, body) = ok.post_all("/machine/register", b"{}".to_vec()).await.unwrap();
        // Served (not dropped), and refused: `{}` has no capability version or node key.
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    });
    assert!(c.members[0].metric("hsd_bad_requests_total{surface=\"noise\"}") >= 1.0);
}

/// The first map response is a full netmap with the quiet-client settings; a later
/// registration reaches an open stream as a `PeersChanged` delta.
#[test]
fn map_stream_sends_full_map_then_deltas() {
    let c = TestCluster::start(1, ClusterOpts::default());
    let key = c.user_with_key("maps", &["--reusable"]);
    let addr = format!("{}:8080", c.members[0].ip);
    rt().block_on(async {
        let (m1, _) = keypair();
        let n1 = NodeKey(keypair().1);
        let mut a = ControlClient::connect(&addr, &m1).await.unwrap();
        let (status, resp) = a.register(&n1, &key, "first").await.unwrap();
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["MachineAuthorized"], true, "{resp}");
        let disco = DiscoKey(keypair().1);
        let mut stream = a.map_stream(&n1, &disco, "127.0.0.1:41641").await.unwrap();
        let full = stream.next_update(T).await.unwrap();
        assert!(full["Node"]["Addresses"].is_array(), "{full}");
        // The stream does not wait for the disco key to be recorded; once it is, the node
        // hears of its own change. After that, a peer's change must not resend it.
        let mut own = full["Node"]["DiscoKey"].clone();
        while own != disco.to_text() {
            own = stream.next_update(T).await.unwrap()["Node"]["DiscoKey"].clone();
        }
        assert_eq!(full["Debug"]["DisableLogTail"], true);
        assert!(
            full["Node"]["CapMap"]
                .get("disable-captive-portal-detection")
                .is_some(),
            "{}",
            full["Node"]
        );
        assert!(
            full["DERPMap"]["Regions"]
                .as_object()
                .is_some_and(|r| !r.is_empty())
        );
        assert!(full["PacketFilter"].is_array() || full["PacketFilters"].is_object());
        // MagicDNS: the node's name is under the base domain, which the DNS config serves.
        let name = full["Node"]["Name"].as_str().unwrap().to_string();
        let domain = full["DNSConfig"]["Domains"][0]
            .as_str()
            .expect("a MagicDNS domain")
            .to_string();
        assert!(
            name.ends_with(&format!("{domain}.")),
            "{name} under {domain}"
        );

        let mut b = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let n2 = NodeKey(keypair().1);
        let (status, _) = b.register(&n2, &key, "second").await.unwrap();
        assert_eq!(status, 200);
        let _stream_b = b
            .map_stream(&n2, &DiscoKey(keypair().1), "127.0.0.1:41642")
            .await
            .unwrap();
        let delta: Value = loop {
            let v = stream.next_update(T).await.unwrap();
            if v.get("PeersChanged").is_some() || v.get("Peers").is_some() {
                break v;
            }
        };
        assert!(
            delta.get("Peers").is_none(),
            "a delta, not a full rebuild: {delta}"
        );
        assert!(
            delta["Node"].is_null(),
            "self is not resent for a peer change: {delta}"
        );
        assert_eq!(delta["PeersChanged"][0]["Key"], n2.to_text());
    });
}

/// Node key rotation keeps the node (same id and address); an admin-expired node is told
/// so; an ephemeral node is removed after its inactivity timeout.
#[test]
fn rotation_expiry_and_ephemeral_removal() {
    let c = TestCluster::start(
        1,
        ClusterOpts {
            ephemeral_timeout: Some("2s"),
            ..Default::default()
        },
    );
    let key = c.user_with_key("life", &["--reusable"]);
    let eph = c.hsctl_json(
        1,
        &["preauthkeys", "create", "--user", "life", "--ephemeral"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = format!("{}:8080", c.members[0].ip);
    rt().block_on(async {
        let (machine, _) = keypair();
        let mut client = ControlClient::connect(&addr, &machine).await.unwrap();
        let old = NodeKey(keypair().1);
        let (status, _) = client.register(&old, &key, "rotator").await.unwrap();
        assert_eq!(status, 200);
        let before = c.node(1, "rotator").unwrap();
        let new = NodeKey(keypair().1);
        let (status, resp) = client.rotate(&old, &new, "rotator").await.unwrap();
        assert_eq!(status, 200, "{resp}");
        let after = c.node(1, "rotator").unwrap();
        assert_eq!(
            (before["id"].clone(), before["ip_addresses"].clone()),
            (after["id"].clone(), after["ip_addresses"].clone())
        );
        assert_eq!(
            after["node_key"],
            new.to_text(),
            "the node now has the new key"
        );
        // Another machine cannot rotate this node's key.
        let mut thief = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let (status, resp) = thief
            .rotate(&new, &NodeKey(keypair().1), "rotator")
            .await
            .unwrap();
        // Without a key, a machine it does not know gets an interactive login, not the node.
        let refused = status != 200
            || resp["Error"].as_str().is_some_and(|e| !e.is_empty())
            || resp["MachineAuthorized"] == false;
        assert!(
            refused,
            "rotation by another machine refused: {status} {resp}"
        );
        assert_eq!(
            c.node(1, "rotator").unwrap()["node_key"],
            new.to_text(),
            "unchanged"
        );

        // Expired by an admin: the node is marked expired and its map says so.
        c.hsctl_json(
            1,
            &[
                "nodes",
                "expire",
                &after["id"].as_u64().unwrap().to_string(),
            ],
        );
        let expired = c.node(1, "rotator").unwrap();
        assert_eq!(expired["expired"], true, "{expired}");

        // Ephemeral: registered, streams, disconnects, and is gone after the timeout.
        let mut e = ControlClient::connect(&addr, &keypair().0).await.unwrap();
        let ek = NodeKey(keypair().1);
        let (status, resp) = e.register(&ek, &eph, "fleeting").await.unwrap();
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["MachineAuthorized"], true, "{resp}");
        let mut stream = e
            .map_stream(&ek, &DiscoKey(keypair().1), "127.0.0.1:41650")
            .await
            .unwrap();
        stream.next_update(T).await.unwrap();
        let listed = c.hsctl_json(1, &["nodes", "list"]);
        let fleeting = c
            .node(1, "fleeting")
            .unwrap_or_else(|| panic!("fleeting not listed: {listed}"));
        assert_eq!(fleeting["online"], true);
        drop(stream);
        drop(e);
    });
    crate::harness::wait_for(
        "the ephemeral node removed",
        Duration::from_secs(40),
        || c.node(1, "fleeting").is_none().then_some(()),
    );
    assert!(c.node(1, "rotator").is_some(), "non-ephemeral nodes stay");
}

/// Presence crosses members outside Raft: a node streaming from member 2 shows up online
/// in the stream of a node on member 1 (and its endpoints in a later patch). Prints the
/// measured delay from the second stream opening to the first stream hearing of it.
#[test]
fn presence_reaches_streams_on_other_members() {
    let c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("pres", &["--reusable"]);
    let (m1, m2) = (
        format!("{}:8080", c.members[0].ip),
        format!("{}:8080", c.members[1].ip),
    );
    rt().block_on(async {
        let (_a, mut sa, _) = streaming_node(&m1, &key, "on1", "127.0.0.1:41661").await;

        let mut b = ControlClient::connect(&m2, &keypair().0).await.unwrap();
        let nb = NodeKey(keypair().1);
        assert_eq!(b.register(&nb, &key, "on2").await.unwrap().0, 200);
        let t0 = std::time::Instant::now();
        let _sb = b
            .map_stream(&nb, &DiscoKey(keypair().1), "127.0.0.1:41662")
            .await
            .unwrap();
        let mut b_id = None;
        loop {
            let v = sa.next_update(T).await.unwrap();
            for p in v["PeersChanged"].as_array().into_iter().flatten() {
                if p["Key"] == nb.to_text() {
                    b_id = p["ID"].as_u64();
                    if p["Online"] == true {
                        break;
                    }
                }
            }
            let id = b_id.map(|i| i.to_string()).unwrap_or_default();
            let online = v["OnlineChange"][&id] == true
                || v["PeersChanged"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["Key"] == nb.to_text() && p["Online"] == true);
            if b_id.is_some() && online {
                break;
            }
        }
        println!(
            "presence: member 1's stream saw on2 (streaming from member 2) online after {:?}",
            t0.elapsed()
        );
        // Member 3 holds neither session and still knows where on2 streams (streams open).
        let t1 = std::time::Instant::now();
        let seen = crate::harness::wait_for(
            "member 3 sees on2 on member 2",
            Duration::from_secs(5),
            || c.node(3, "on2").filter(|n| n["online"] == true),
        );
        println!(
            "presence: member 3 listed on2 online {:?} later",
            t1.elapsed()
        );
        assert_eq!(
            (seen["online"].clone(), seen["member"].clone()),
            (serde_json::json!(true), serde_json::json!(2))
        );
    });
}

/// A member that is alive but answers presence polls too late (as under a join storm)
/// keeps its nodes online on the other members: taking them offline would send every client
/// a delta for each of them, and another when they come back. Its nodes go offline only
/// once it refuses calls.
#[test]
fn a_member_too_busy_to_answer_presence_keeps_its_nodes_online() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("busy", &["--reusable"]);
    let m2 = format!("{}:8080", c.members[1].ip);
    rt().block_on(async {
        let (_b, _sb, _) = streaming_node(&m2, &key, "on2", "127.0.0.1:41663").await;
        crate::harness::wait_for("member 1 sees on2 online", T, || {
            c.node(1, "on2").filter(|n| n["online"] == true)
        });

        std::fs::write(c.members[1].dir.join("slow-presence"), "").unwrap();
        let slow = r#"hsd_presence_polls_failed_total{reason="slow"}"#;
        crate::harness::wait_for(
            "a poll of member 2 by member 1 timing out",
            Duration::from_secs(40),
            || (c.members[0].metric(slow) >= 1.0).then_some(()),
        );
        let seen = c.node(1, "on2").expect("on2 listed");
        assert_eq!(
            seen["online"], true,
            "a busy member's node went offline: {seen}"
        );

        // A member that refuses calls is another matter.
        c.members[1].kill();
        crate::harness::wait_for("member 1 sees on2 offline", Duration::from_secs(30), || {
            c.node(1, "on2").filter(|n| n["online"] == false)
        });
    });
}

/// Clients learn membership changes: after `hsctl cluster add`, an open map stream gets a
/// new DERP map and dial plan that include the new member, without reconnecting.
#[test]
fn membership_changes_reach_open_map_streams() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("topo", &["--reusable"]);
    let addr = format!("{}:8080", c.members[0].ip);
    let rt = rt();
    let (_client, mut stream) = rt.block_on(async {
        let (a, s, full) = streaming_node(&addr, &key, "watcher", "127.0.0.1:41671").await;
        assert_eq!(derp_nodes(&full), 3, "{}", full["DERPMap"]);
        assert_eq!(
            full["ControlDialPlan"]["Candidates"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        (a, s)
    });
    let id = c.start_new_member();
    let ip = c.members[(id - 1) as usize].ip.clone();
    c.hsctl_json(
        1,
        &[
            "cluster",
            "add",
            &id.to_string(),
            &format!("{ip}:50444"),
            "--control-url",
            &format!("http://{ip}:8080"),
        ],
    );
    rt.block_on(async {
        loop {
            let v = stream.next_update(T).await.unwrap();
            if v.get("DERPMap").is_some() && derp_nodes(&v) == 4 {
                assert_eq!(
                    v["ControlDialPlan"]["Candidates"].as_array().unwrap().len(),
                    4
                );
                break;
            }
        }
    });
}

fn derp_nodes(map: &Value) -> usize {
    map["DERPMap"]["Regions"]
        .as_object()
        .map(|r| {
            r.values()
                .map(|r| r["Nodes"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0)
}

//! A member that cannot do its job says so and stops: a dying disk, settings that disagree
//! with the cluster, a missing shared key. And a write answered by a follower is visible
//! through that follower at once.

use std::time::Duration;

use hsd::control::client::{ControlClient, keypair};
use hsd::derp::client::DerpClient;
use hsd::derp::frame::Frame;
use hsd::registry::{DiscoKey, NodeKey};

use crate::harness::{ClusterOpts, TestCluster, rt, wait_for};

const T: Duration = Duration::from_secs(10);

/// A member whose storage fails exits non-zero (so systemd or Kubernetes restart it), its
/// client moves to a survivor, the others keep taking writes, and nothing acknowledged is
/// lost.
#[test]
fn storage_failure_stops_the_member_and_clients_move() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("disk", &["--reusable"]);
    let leader = c.wait_leader();
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    let survivor = (1..=3).find(|i| *i != leader && *i != victim).unwrap();
    let _client = c.client("ondisk", victim, &key, None, false);
    let before = c.wait_online(survivor, "ondisk", Duration::from_secs(60));
    assert_eq!(before["member"], victim, "{before}");
    c.hsctl_json(victim, &["users", "create", "acked-before"]);

    // The disk dies: the next entry the victim must append fails.
    std::fs::write(c.member(victim).dir.join("FAIL_STORAGE"), b"").unwrap();
    c.hsctl_json(leader, &["users", "create", "after-the-fault"]);
    let code = c.member(victim).wait_exit(Duration::from_secs(30));
    assert!(
        code.is_some_and(|code| code != 0),
        "a member with failed storage exits non-zero, not {code:?}"
    );

    // The client follows the dial plan to a live member; the cluster still writes.
    let moved = wait_for("the client on a survivor", Duration::from_secs(90), || {
        let n = c.node(leader, "ondisk")?;
        (n["online"] == true && n["member"] != victim).then_some(n)
    });
    assert_eq!(
        moved["id"], before["id"],
        "same node, not a re-registration"
    );
    c.hsctl_json(survivor, &["users", "create", "acked-after"]);
    for id in [leader, survivor] {
        let users = c.hsctl_json(id, &["users", "list"]);
        for name in ["acked-before", "after-the-fault", "acked-after"] {
            assert!(
                users.as_array().unwrap().iter().any(|u| u["name"] == name),
                "member {id} has {name}: {users}"
            );
        }
    }

    // With the disk back, the member restarts and catches up.
    std::fs::remove_file(c.member(victim).dir.join("FAIL_STORAGE")).unwrap();
    c.member(victim).start();
    wait_for("the restarted member caught up", T * 3, || {
        let users = c.hsctl_json(victim, &["users", "list", "--local"]);
        users
            .as_array()?
            .iter()
            .any(|u| u["name"] == "acked-after")
            .then_some(())
    });
}

/// Cluster-wide settings are recorded on first start; a member whose config disagrees
/// refuses to start (exit 64, as for any config error) and names the key. With its config restored it starts.
#[test]
fn a_member_with_different_settings_refuses_to_start() {
    let mut c = TestCluster::start(1, ClusterOpts::default());
    c.hsctl_json(1, &["users", "create", "settled"]);
    assert_eq!(c.member(1).stop(), Some(0));
    let original = std::fs::read_to_string(c.member(1).dir.join("config.yaml")).unwrap();
    c.member(1)
        .edit_config(|yaml| format!("{yaml}prefixes:\n  v4: 100.70.0.0/16\n"));
    let (code, log) = c.member(1).run_until_exit(T * 3);
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("prefixes.v4"), "names the key: {log}");

    c.member(1).edit_config(|_| original);
    c.member(1).start();
    c.wait_leader();
    let users = c.hsctl_json(1, &["users", "list"]);
    assert_eq!(users[0]["name"], "settled", "{users}");
}

/// A member of a multi-member cluster never makes up its own Noise key (its clients could
/// not fail over): without the shared key file it refuses to start and says what to do.
#[test]
fn a_member_without_the_shared_noise_key_refuses_to_start() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    c.member(3).stop();
    c.member(3)
        .edit_config(|yaml| yaml.replace("/noise.key", "/missing-noise.key"));
    let (code, log) = c.member(3).run_until_exit(T * 3);
    assert!(code.is_some_and(|code| code != 0), "{code:?}: {log}");
    assert!(
        log.contains("noise.private_key_path") && log.contains("init-keys"),
        "names the key and the fix: {log}"
    );
    let generated = c.member(3).dir.join("..").join("keys/missing-noise.key");
    assert!(!generated.exists(), "no key of its own was written");
}

/// Register through a follower, then stream and relay through the same follower at once:
/// the follower answered the write only after applying it, so it never says "not
/// registered" and its DERP relay admits the new node key immediately.
#[test]
fn a_follower_reads_its_own_writes() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("ryw", &["--reusable"]);
    let leader = c.wait_leader();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let ip = c.member(follower).ip.clone();
    let addr = format!("{ip}:8080");
    let derp_url = format!("http://{addr}/derp");
    rt().block_on(async {
        let mut nodes = Vec::new();
        for i in 0..2 {
            let (machine, _) = keypair();
            let (node_private, node_public) = keypair();
            let node = NodeKey(node_public);
            let mut control = ControlClient::connect(&addr, &machine).await.unwrap();
            let (status, resp) = control
                .register(&node, &key, &format!("ryw{i}"))
                .await
                .unwrap();
            assert_eq!(status, 200, "{resp}");
            assert_eq!(resp["MachineAuthorized"], true, "{resp}");
            // Straight to the map: the first message is this node's full netmap.
            let mut stream = control
                .map_stream(&node, &DiscoKey(keypair().1), "127.0.0.1:41700")
                .await
                .expect("the follower knows the node it just registered");
            let first = stream.next(T).await.unwrap();
            assert!(first["Node"].is_object(), "{first}");
            // And its relay lets the node in.
            let derp = DerpClient::connect(&derp_url, node_private, None)
                .await
                .expect("DERP admits the new key");
            nodes.push((node_public, derp, stream, control));
        }
        let (to, _, _, _) = &nodes[1];
        let to = *to;
        // A relay, like UDP, may drop a packet sent the instant its receiver logs in
        // (before the relay has registered it): resend until one arrives.
        let (_, mut receiver, _, _) = nodes.remove(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let reader = tokio::spawn(async move {
            while let Ok(frame) = receiver.recv().await {
                if let Frame::RecvPacket { data, .. } = frame {
                    let _ = tx.send(data).await;
                }
            }
        });
        let sender = &mut nodes[0].1;
        let received = tokio::time::timeout(T, async {
            loop {
                sender.send(to, b"hello").await.unwrap();
                if let Ok(Some(data)) =
                    tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
                {
                    return data;
                }
            }
        })
        .await
        .expect("a packet through the follower's relay");
        assert_eq!(&received[..], b"hello");
        reader.abort();
    });
}

/// The leader applies a forwarded write but its reply is lost: the follower retries with
/// the same request id and gets the first outcome. A new pre-auth key is made once (not
/// twice), and a new user is reported created (not "already exists").
#[test]
fn a_write_whose_reply_was_lost_applies_once() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    c.hsctl_json(1, &["users", "create", "once"]);
    let leader = c.wait_leader();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let lose_reply = c.member(leader).dir.join("lose-forward-reply");

    std::fs::write(&lose_reply, b"").unwrap();
    let key = c.hsctl_json(follower, &["preauthkeys", "create", "--user", "once"]);
    assert!(!lose_reply.exists(), "the leader dropped a reply");
    assert!(key["key"].is_string(), "{key}");
    let keys = c.hsctl_json(leader, &["preauthkeys", "list", "--user", "once"]);
    assert_eq!(
        keys.as_array().unwrap().len(),
        1,
        "one key, not two: {keys}"
    );

    std::fs::write(&lose_reply, b"").unwrap();
    let user = c.hsctl(follower, &["users", "create", "twice-asked"]);
    assert!(!lose_reply.exists(), "the leader dropped a reply");
    assert!(
        user.status.success(),
        "the retry reports the first outcome: {}",
        String::from_utf8_lossy(&user.stderr)
    );
    let users = c.hsctl_json(follower, &["users", "list"]);
    let named = users
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["name"] == "twice-asked")
        .count();
    assert_eq!(named, 1, "{users}");
}

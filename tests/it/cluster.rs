//! Three members: one leader, writes through any member, failover, catch-up after restart,
//! and clients on different members reaching each other.

use std::time::Duration;

use crate::harness::{ClusterOpts, TestCluster, ipv4, wait_for};

#[test]
fn three_members_elect_replicate_and_fail_over() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let status = c.hsctl_json(2, &["cluster", "status"]);
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(
        members.iter().filter(|m| m["role"] == "leader").count(),
        1,
        "{status}"
    );
    assert!(members.iter().all(|m| m["healthy"] == true), "{status}");

    // A write on every member (followers forward it); reads are linearizable, so every
    // member shows every acknowledged write at once, with no waiting.
    for id in 1..=3u64 {
        c.hsctl_json(id, &["users", "create", &format!("u{id}")]);
        for reader in 1..=3u64 {
            let users = c.hsctl_json(reader, &["users", "list"]);
            assert_eq!(
                users.as_array().unwrap().len(),
                id as usize,
                "member {reader} after write {id}: {users}"
            );
        }
    }
    // Member 2's linearizable read above waited until it had applied all three writes, so
    // its local view has them too.
    let local = c.hsctl_json(2, &["users", "list", "--local"]);
    assert_eq!(local.as_array().unwrap().len(), 3, "{local}");

    // Kill the leader: the others elect a new one and keep accepting writes.
    let leader = c.wait_leader();
    c.member(leader).kill();
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    let new_leader = wait_for("a new leader", Duration::from_secs(20), || {
        let s = c.hsctl_json(survivor, &["cluster", "status"]);
        s["leader"].as_u64().filter(|l| *l != leader)
    });
    assert_ne!(new_leader, leader);
    let s = c.hsctl_json(survivor, &["cluster", "status"]);
    let dead = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == leader)
        .unwrap()
        .clone();
    assert_eq!(dead["role"], "unreachable");
    assert_eq!(dead["healthy"], false);
    c.hsctl_json(survivor, &["users", "create", "after-failover"]);

    // The old leader restarts and catches up.
    c.member(leader).start();
    wait_for(
        "restarted member caught up",
        Duration::from_secs(20),
        || {
            let users = c.hsctl_json(leader, &["users", "list"]);
            users
                .as_array()?
                .iter()
                .any(|u| u["name"] == "after-failover")
                .then_some(())
        },
    );
}

/// A client on member 1 and a client on member 2 see each other and talk, relayed by DERP
/// across the mesh.
#[test]
fn clients_on_different_members_talk() {
    let c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("mesh", &["--reusable"]);
    let _b = c.client("onm2", 2, &key, None, true);
    let b = c.wait_online(1, "onm2", Duration::from_secs(60));
    assert_eq!(b["member"], 2, "session held by member 2: {b}");
    let ip = ipv4(&b);
    let a = c.client("onm1", 1, &key, Some(format!("{ip}:80")), true);
    c.wait_online(3, "onm1", Duration::from_secs(60));
    a.wait_reach("hello from onm2", Duration::from_secs(90));
    // Homed on different members, so packets crossed the mesh between their relays.
    let forwarded: f64 = c
        .members
        .iter()
        .map(|m| m.metric("hsd_derp_packets_mesh_forwarded_total"))
        .sum();
    assert!(
        forwarded > 0.0,
        "traffic between members' clients goes through the DERP mesh"
    );
    // Presence crossed members too: member 3 holds neither session but sees both online.
    let seen = c.node(3, "onm2").unwrap();
    assert_eq!(seen["online"], true);
}

/// A member without quorum refuses writes and linearizable reads with a clear, retryable
/// error (exit 69), still answers `--local` reads, and recovers when quorum returns.
#[test]
fn minority_refuses_writes_and_recovers() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    c.hsctl_json(1, &["users", "create", "before"]);
    c.member(2).kill();
    c.member(3).kill();
    let write = c.hsctl(1, &["users", "create", "lonely"]);
    assert_eq!(
        write.status.code(),
        Some(69),
        "stderr: {}",
        String::from_utf8_lossy(&write.stderr)
    );
    let message = String::from_utf8_lossy(&write.stderr).to_string();
    assert!(
        message.contains("majority") || message.contains("leader"),
        "a clear reason: {message}"
    );
    let read = c.hsctl(1, &["users", "list"]);
    assert_eq!(read.status.code(), Some(69));
    let local = c.hsctl_json(1, &["users", "list", "--local"]);
    assert_eq!(local.as_array().unwrap().len(), 1);
    let status = c.hsctl_json(1, &["cluster", "status"]);
    assert_eq!(
        status["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "unreachable")
            .count(),
        2
    );

    c.member(2).start();
    let users = wait_for("quorum back", Duration::from_secs(30), || {
        let out = c.hsctl(1, &["users", "create", "after", "-o", "json"]);
        out.status
            .success()
            .then(|| c.hsctl_json(2, &["users", "list"]))
    });
    // The refused write was never acknowledged, so either outcome is allowed for it (the
    // error said so); the acknowledged ones must all be there.
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"before") && names.contains(&"after"),
        "{names:?}"
    );
}

/// Five members: the cluster survives losing two at once (leader included), and a member
/// whose data dir was wiped catches up by snapshot install once the log was compacted.
#[test]
fn five_members_survive_two_losses_and_a_wiped_member_catches_up() {
    let mut c = TestCluster::start(
        5,
        ClusterOpts {
            snapshot_every: Some(100),
            ..Default::default()
        },
    );
    let leader = c.wait_leader();
    let other = (1..=5).find(|i| *i != leader).unwrap();
    c.member(leader).kill();
    c.member(other).kill();
    let survivor = (1..=5).find(|i| *i != leader && *i != other).unwrap();
    wait_for(
        "a new leader among three survivors",
        Duration::from_secs(20),
        || {
            let s = c.hsctl_json(survivor, &["cluster", "status", "--local"]);
            s["leader"].as_u64().filter(|l| *l != leader && *l != other)
        },
    );
    // Enough writes to force a snapshot and log compaction on the survivors.
    for i in 0..120 {
        c.hsctl_json(survivor, &["users", "create", &format!("bulk{i}")]);
    }
    // Wait until the leader has built a snapshot and purged the log before it.
    let purged = wait_for(
        "a compacted log on the leader",
        Duration::from_secs(30),
        || {
            let l = c.wait_leader();
            let purged = c.member(l).metric("hsd_raft_purged_index");
            (purged > 0.0).then_some(purged)
        },
    );
    // The old leader comes back with an empty data dir: only a snapshot can catch it up.
    c.wipe(leader);
    c.member(leader).start();
    c.member(other).start();
    for id in [leader, other] {
        wait_for(
            &format!("member {id} caught up"),
            Duration::from_secs(30),
            || {
                let users = c.hsctl_json(id, &["users", "list", "--local"]);
                (users.as_array()?.len() == 120).then_some(())
            },
        );
    }
    let s = c.hsctl_json(leader, &["cluster", "status"]);
    assert!(
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["healthy"] == true),
        "{s}"
    );
    // Its log starts after the leader's purge point: only a snapshot can have filled it.
    let snapshot = wait_for("the wiped member's gauges", Duration::from_secs(5), || {
        let m = c.member(leader).metric("hsd_raft_snapshot_index");
        (m > 0.0).then_some(m)
    });
    assert!(
        snapshot >= purged,
        "the wiped member holds a snapshot through index {snapshot}, purged before {purged}"
    );
}

/// When the member holding a client's control session (and its home relay) dies, the
/// client follows the ControlDialPlan to a survivor and streams from it without
/// re-registering, and — all traffic forced through DERP — its relay connection moves to a
/// live member of the region, so traffic to a peer homed elsewhere keeps flowing.
#[test]
fn client_fails_over_when_its_member_dies() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("roam", &["--reusable"]);
    let _b = c.client("steady", 2, &key, None, true);
    let b = c.wait_online(2, "steady", Duration::from_secs(60));
    let ip = ipv4(&b);
    let a = c.client("roamer", 1, &key, Some(format!("{ip}:80")), true);
    let before = c.wait_online(2, "roamer", Duration::from_secs(60));
    assert_eq!(before["member"], 1);
    a.wait_reach("hello from steady", Duration::from_secs(60));

    let t0 = std::time::Instant::now();
    c.member(1).kill();
    let after = wait_for(
        "roamer streaming from a survivor",
        Duration::from_secs(60),
        || {
            let out = c.hsctl(2, &["nodes", "list", "-o", "json"]);
            let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            nodes
                .as_array()?
                .iter()
                .find(|n| n["name"] == "roamer" && n["online"] == true && n["member"] != 1)
                .cloned()
        },
    );
    println!(
        "control failover: roamer streams from member {} after {:.1} s",
        after["member"],
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(before["id"], after["id"], "same node, not re-registered");
    assert_eq!(before["ip_addresses"], after["ip_addresses"]);
    a.wait_reach("hello from steady", Duration::from_secs(60));
    println!(
        "traffic after failover: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// SIGTERM on the leader (a rolling upgrade step): it hands leadership over, exits 0, and
/// the cluster keeps taking writes; the member rejoins when started again.
#[test]
fn sigterm_of_the_leader_hands_over() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let leader = c.wait_leader();
    let t0 = std::time::Instant::now();
    assert_eq!(c.member(leader).stop(), Some(0));
    let other = (1..=3).find(|i| *i != leader).unwrap();
    let new_leader = wait_for("a new leader", Duration::from_secs(20), || {
        c.hsctl_json(other, &["cluster", "status", "--local"])["leader"]
            .as_u64()
            .filter(|l| *l != leader)
    });
    println!(
        "leader {leader} stopped; member {new_leader} leads {:.1} s after SIGTERM",
        t0.elapsed().as_secs_f64()
    );
    c.hsctl_json(other, &["users", "create", "during-upgrade"]);
    c.member(leader).start();
    wait_for("old leader caught up", Duration::from_secs(20), || {
        let users = c.hsctl_json(leader, &["users", "list"]);
        users
            .as_array()?
            .iter()
            .any(|u| u["name"] == "during-upgrade")
            .then_some(())
    });
}

/// A new member joins a running cluster as a learner, catches up, and is promoted.
#[test]
fn new_member_joins_as_learner_and_is_promoted() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    for i in 0..20 {
        c.hsctl_json(1, &["users", "create", &format!("early{i}")]);
    }
    let id = c.start_new_member();
    let ip = c.members[(id - 1) as usize].ip.clone();
    let add = c.hsctl_json(
        2,
        &[
            "cluster",
            "add",
            &id.to_string(),
            &format!("{ip}:50444"),
            "--control-url",
            &format!("http://{ip}:8080"),
        ],
    );
    let learner = add["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
        .expect("listed after add");
    assert_eq!(learner["role"], "learner", "{add}");
    let users = c.hsctl_json(id, &["users", "list", "--local"]);
    assert_eq!(
        users.as_array().unwrap().len(),
        20,
        "the learner caught up before add returned"
    );

    c.hsctl_json(1, &["cluster", "promote", &id.to_string()]);
    let s = wait_for("four healthy voters", Duration::from_secs(20), || {
        let s = c.hsctl_json(id, &["cluster", "status"]);
        let members = s["members"].as_array()?;
        (members.len() == 4
            && members
                .iter()
                .all(|m| m["healthy"] == true && m["voter"] == true))
        .then_some(s)
    });
    assert!(s["leader"].is_u64());
    // Adding the same member twice is refused clearly.
    let again = c.hsctl(
        1,
        &["cluster", "add", &id.to_string(), &format!("{ip}:50444")],
    );
    assert_eq!(
        again.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Removing it returns the cluster to three voters.
    c.hsctl_json(1, &["cluster", "remove", &id.to_string()]);
    let s = c.hsctl_json(1, &["cluster", "status"]);
    assert_eq!(s["members"].as_array().unwrap().len(), 3, "{s}");
}

/// `hsctl cluster drain ID`: the member hands off leadership, drops its clients (they move
/// to the others by the dial plan) and refuses new ones until restarted; traffic goes on.
#[test]
fn drain_moves_clients_off_a_member() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("drain", &["--reusable"]);
    let _b = c.client("target", 2, &key, None, false);
    let b = c.wait_online(2, "target", Duration::from_secs(60));
    let ip = ipv4(&b);
    let a = c.client("mover", 1, &key, Some(format!("{ip}:80")), false);
    assert_eq!(
        c.wait_online(2, "mover", Duration::from_secs(60))["member"],
        1
    );
    a.wait_reach("hello from target", Duration::from_secs(60));

    let s = c.hsctl_json(2, &["cluster", "drain", "1"]);
    let m1 = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 1)
        .unwrap()
        .clone();
    assert_eq!(m1["draining"], true, "{s}");
    assert_eq!(m1["healthy"], false);
    assert_ne!(s["leader"], 1, "a draining member does not lead");
    let (status, _) = crate::harness::http_request(
        &format!("{}:8080", c.members[0].ip),
        "GET",
        "/ready",
        None,
        None,
    );
    assert_eq!(status, 503, "load balancers stop sending clients to it");
    let moved = wait_for(
        "mover streaming from another member",
        Duration::from_secs(60),
        || {
            c.node(2, "mover")
                .filter(|n| n["online"] == true && n["member"] != 1)
        },
    );
    println!("drain: mover now streams from member {}", moved["member"]);
    a.wait_reach("hello from target", Duration::from_secs(60));

    // A restart ends the drain.
    c.member(1).stop();
    c.member(1).start();
    c.wait_leader();
    let s = c.hsctl_json(1, &["cluster", "status"]);
    assert!(
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["healthy"] == true && m["draining"] == false),
        "{s}"
    );
}

/// A partition: the minority side refuses writes with a clear error, the majority elects
/// (if needed) and keeps serving, and after healing every member holds the same registry.
#[test]
fn partition_minority_refuses_and_catches_up_without_divergence() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let leader = c.wait_leader();
    // Cut the leader off: the old leader is the minority.
    c.partition(&[leader]);
    let majority: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let new_leader = wait_for(
        "a leader on the majority side",
        Duration::from_secs(20),
        || {
            let s = c.hsctl_json(majority[0], &["cluster", "status", "--local"]);
            s["leader"].as_u64().filter(|l| majority.contains(l))
        },
    );
    println!("partition: member {leader} cut off, member {new_leader} leads the majority");
    c.hsctl_json(majority[1], &["users", "create", "majority-write"]);
    let refused = c.hsctl(leader, &["users", "create", "minority-write"]);
    assert_eq!(
        refused.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let stale = c.hsctl(leader, &["users", "list"]);
    assert_eq!(
        stale.status.code(),
        Some(69),
        "no linearizable read on the minority side"
    );

    c.heal();
    let names = |c: &TestCluster, id: u64| -> Vec<String> {
        let users = c.hsctl_json(id, &["users", "list", "--local"]);
        users
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect()
    };
    wait_for("the old leader caught up", Duration::from_secs(30), || {
        names(&c, leader)
            .contains(&"majority-write".to_string())
            .then_some(())
    });
    c.wait_leader();
    let all: Vec<Vec<String>> = (1..=3).map(|id| names(&c, id)).collect();
    assert!(
        all.windows(2).all(|w| w[0] == w[1]),
        "no divergence after healing: {all:?}"
    );
    assert!(
        !all[0].contains(&"minority-write".to_string()),
        "the refused minority write was discarded"
    );
}

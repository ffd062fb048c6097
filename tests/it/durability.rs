//! Nothing acknowledged is lost: across SIGTERM and kill -9, the registry comes back from
//! rocksdb, and clients reconnect to the restarted member.

use std::time::Duration;

use crate::harness::{ClusterOpts, TestCluster};

#[test]
fn acknowledged_writes_survive_kill_and_term() {
    let mut c = TestCluster::start(1, ClusterOpts::default());
    let key = c.user_with_key("frank", &["--reusable"]);
    let client = c.client("durable", 1, &key, None, false);
    let before = c.wait_online(1, "durable", Duration::from_secs(60));

    // kill -9 right after an acknowledged write.
    c.hsctl_json(1, &["users", "create", "grace"]);
    c.member(1).kill();
    c.member(1).start();
    c.wait_leader();
    let users = c.hsctl_json(1, &["users", "list"]);
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["frank", "grace"]);

    // SIGTERM exits 0 within the grace period; the client comes back online by itself with
    // the same node and address.
    assert_eq!(c.member(1).stop(), Some(0), "clean exit on SIGTERM");
    c.member(1).start();
    c.wait_leader();
    let after = c.wait_online(1, "durable", Duration::from_secs(90));
    assert_eq!(before["id"], after["id"]);
    assert_eq!(before["ip_addresses"], after["ip_addresses"]);
    drop(client);
}

//! Real Tailscale clients register, get netmaps, and talk to each other through one member.

use std::time::Duration;

use crate::harness::client::ClientOpts;
use crate::harness::{ClusterOpts, TestCluster, TsClient, ipv4, wait_for};

const JOIN: Duration = Duration::from_secs(60);

/// Two clients join with a pre-auth key and reach each other over the tailnet, by IP.
fn two_clients_talk(force_derp: bool) {
    let c = TestCluster::start(1, ClusterOpts::default());
    let key = c.user_with_key("alice", &["--reusable"]);
    let _b = c.client("bravo", 1, &key, None, force_derp);
    let b = c.wait_online(1, "bravo", JOIN);
    let a = c.client(
        "alpha",
        1,
        &key,
        Some(format!("{}:80", ipv4(&b))),
        force_derp,
    );
    let node_a = c.wait_online(1, "alpha", JOIN);
    assert_ne!(ipv4(&node_a), ipv4(&b), "addresses are never shared");
    assert_eq!(node_a["user"], "alice");
    assert_eq!(node_a["approved"], true);
    assert_eq!(node_a["member"], 1);
    assert!(
        node_a["ip_addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().contains(':')),
        "IPv6 too"
    );
    a.wait_reach("hello from bravo", JOIN);
    let relayed = c.members[0].metric("hsd_derp_packets_relayed_total");
    if force_derp {
        assert!(relayed > 0.0, "forced-DERP traffic must cross the relay");
    }
}

#[test]
fn two_clients_reach_each_other() {
    two_clients_talk(false);
}

#[test]
fn two_clients_reach_each_other_through_derp() {
    two_clients_talk(true);
}

/// A single-use key admits one node; a second node with the same key is refused, and an
/// expired key is refused. Neither refusal changes the registry.
#[test]
fn used_and_expired_keys_are_refused() {
    let c = TestCluster::start(1, ClusterOpts::default());
    c.hsctl_json(1, &["users", "create", "bob"]);
    let once = c.hsctl_json(1, &["preauthkeys", "create", "--user", "bob"]);
    assert_eq!(once["reusable"], false);
    assert_eq!(once["used"], false);
    let once = once["key"].as_str().unwrap().to_string();
    let expired = c.hsctl_json(
        1,
        &[
            "preauthkeys",
            "create",
            "--user",
            "bob",
            "--expiration",
            "1s",
        ],
    );
    let prefix = expired["prefix"].as_str().unwrap().to_string();
    let expired = expired["key"].as_str().unwrap().to_string();
    wait_for("the short key to expire", Duration::from_secs(10), || {
        let keys = c.hsctl_json(1, &["preauthkeys", "list", "--user", "bob"]);
        keys.as_array()?
            .iter()
            .any(|k| k["expired"] == true && k["prefix"] == prefix.as_str())
            .then_some(())
    });

    let _first = c.client("first", 1, &once, None, false);
    c.wait_online(1, "first", JOIN);
    let used = c.hsctl_json(1, &["preauthkeys", "list", "--user", "bob"]);
    assert!(
        used.as_array().unwrap().iter().any(|k| k["used"] == true),
        "key marked used: {used}"
    );

    let second = c.client("second", 1, &once, None, false);
    let late = c.client("late", 1, &expired, None, false);
    // Both have tried and been told no.
    wait_for("both refusals", JOIN, || {
        let refused = c.members[0].metric("hsd_registrations_total{outcome=\"rejected\"}");
        (refused >= 2.0).then_some(())
    });
    let nodes = c.hsctl_json(1, &["nodes", "list"]);
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["first"],
        "refused clients must not be registered"
    );
    drop((second, late));
}

/// Interactive login: the client gets an AuthURL, an admin registers it with hsctl, and
/// the waiting client proceeds without restarting.
#[test]
fn interactive_registration() {
    let c = TestCluster::start(1, ClusterOpts::default());
    c.hsctl_json(1, &["users", "create", "carol"]);
    let client = TsClient::start(ClientOpts {
        name: "inter".into(),
        control_url: c.members[0].control_url(),
        ..Default::default()
    });
    let url = wait_for("an AuthURL in the client's log", JOIN, || client.auth_url());
    assert!(
        url.starts_with(&c.members[0].control_url()),
        "AuthURL {url} points at the member"
    );
    let auth_id = url.rsplit('/').next().unwrap().to_string();
    // The page tells an admin what to run.
    let page = crate::harness::http_get(
        &format!("{}:8080", c.members[0].ip),
        &format!("/register/{auth_id}"),
        Duration::from_secs(5),
    )
    .expect("register page");
    assert_eq!(page.0, 200);
    assert!(page.1.contains("hsctl nodes register"));

    let bad = c.hsctl(
        1,
        &["nodes", "register", "--user", "nobody", "--key", &auth_id],
    );
    assert!(!bad.status.success(), "unknown user is refused");
    let node = c.hsctl_json(
        1,
        &["nodes", "register", "--user", "carol", "--key", &auth_id],
    );
    assert_eq!(node["user"], "carol");
    let online = c.wait_online(1, "inter", JOIN);
    assert_eq!(online["user"], "carol");
}

/// With `node_approval: manual`, a new node waits until an admin approves it.
#[test]
fn manual_approval() {
    let c = TestCluster::start(
        1,
        ClusterOpts {
            manual_approval: true,
            ..Default::default()
        },
    );
    let key = c.user_with_key("dave", &["--reusable"]);
    let _b = c.client("mb", 1, &key, None, false);
    let b = wait_for("node mb registered", JOIN, || c.node(1, "mb"));
    assert_eq!(b["approved"], false);
    let id = b["id"].as_u64().unwrap().to_string();
    c.hsctl_json(1, &["nodes", "approve", &id]);
    let b = wait_for("node mb approved", JOIN, || {
        c.node(1, "mb").filter(|n| n["approved"] == true)
    });
    let a = c.client("ma", 1, &key, Some(format!("{}:80", ipv4(&b))), false);
    let ma = wait_for("node ma registered", JOIN, || c.node(1, "ma"));
    c.hsctl_json(
        1,
        &["nodes", "approve", &ma["id"].as_u64().unwrap().to_string()],
    );
    a.wait_reach("hello from mb", JOIN);
}

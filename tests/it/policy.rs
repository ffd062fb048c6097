//! Access control with real clients: a policy decides who reaches whom, changes reach
//! running clients without reconnecting, a refused policy changes nothing, and routes are
//! approved and listed.

use std::io::Write;
use std::time::Duration;

use hsd::control::client::{ControlClient, MapStream, keypair};
use hsd::registry::{DiscoKey, NodeKey};
use serde_json::Value;

use crate::harness::{ClusterOpts, TestCluster, TsClient, http_request, ipv4, rt, wait_for};

const JOIN: Duration = Duration::from_secs(60);

fn policy_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write policy file");
    path.to_str().unwrap().to_string()
}

/// Whether the client's proxy gets the server's page across the tailnet (a refused or
/// unreachable upstream is a 502 from the proxy, or a timeout).
fn reaches(client: &TsClient) -> bool {
    matches!(client.get_via_tailnet("/"), Ok((200, body)) if body.contains("hello from srv"))
}

/// Alice may reach Bob's server on port 80; Carol may not. Opening the policy to Carol
/// lets her in at once, closing it again shuts her out — on running clients.
#[test]
fn a_policy_decides_who_reaches_whom() {
    let c = TestCluster::start(1, ClusterOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let alice_only = policy_file(
        &dir,
        "alice.hujson",
        r#"{
            // HuJSON: comments and trailing commas.
            "acls": [
                {"action": "accept", "src": ["alice@"], "dst": ["bob@:80"]},
            ],
        }"#,
    );
    let both = policy_file(
        &dir,
        "both.hujson",
        r#"{"groups": {"group:web": ["alice@", "carol@"]},
            "acls": [{"action": "accept", "src": ["group:web"], "dst": ["bob@:80"]}]}"#,
    );
    c.hsctl_json(1, &["policy", "set", "--file", &alice_only]);

    let bob_key = c.user_with_key("bob", &[]);
    let alice_key = c.user_with_key("alice", &[]);
    let carol_key = c.user_with_key("carol", &[]);
    let _srv = c.client("srv", 1, &bob_key, None, false);
    let srv = c.wait_online(1, "srv", JOIN);
    let upstream = format!("{}:80", ipv4(&srv));
    let alpha = c.client("alpha", 1, &alice_key, Some(upstream.clone()), false);
    let carol = c.client("carol", 1, &carol_key, Some(upstream), false);
    c.wait_online(1, "alpha", JOIN);
    c.wait_online(1, "carol", JOIN);

    alpha.wait_reach("hello from srv", JOIN);
    assert!(
        !reaches(&carol),
        "carol is in no rule: her requests must fail"
    );

    c.hsctl_json(1, &["policy", "set", "--file", &both]);
    carol.wait_reach("hello from srv", JOIN);

    c.hsctl_json(1, &["policy", "set", "--file", &alice_only]);
    wait_for("carol shut out again", JOIN, || {
        (!reaches(&carol)).then_some(())
    });
    alpha.wait_reach("hello from srv", JOIN);
}

/// A policy Tailscale would refuse is refused with the reason, and the running policy
/// stays; `policy check` answers without storing anything.
#[test]
fn a_bad_policy_is_refused_and_changes_nothing() {
    let c = TestCluster::start(1, ClusterOpts::default());
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"tagOwners": {"tag:web": ["alice@"]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:web:443"]}]}"#;
    c.hsctl_json(
        1,
        &["policy", "set", "--file", &policy_file(&dir, "good", good)],
    );

    for (name, text, reason) in [
        (
            "unknown-tag",
            r#"{"acls": [{"action": "accept", "src": ["tag:nope"], "dst": ["*:*"]}]}"#,
            "tag not found: \"tag:nope\"",
        ),
        (
            "bad-port",
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:http"]}]}"#,
            "invalid first integer",
        ),
        ("not-json", "{\"acls\": [", "parsing policy"),
        (
            "self-from-tag",
            r#"{"tagOwners": {"tag:a": []},
                "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["autogroup:self:*"]}]}"#,
            "autogroup:self can only be used with users, groups, or supported autogroups",
        ),
        (
            "failing-test",
            r#"{"tagOwners": {"tag:web": ["alice@"]},
                "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:web:443"]}],
                "tests": [{"src": "alice@", "accept": ["tag:web:443"], "deny": ["tag:web:443"]}]}"#,
            r#"test(s) failed: "alice@" can reach "tag:web:443""#,
        ),
    ] {
        let file = policy_file(&dir, name, text);
        for verb in ["set", "check"] {
            let out = c.hsctl(1, &["policy", verb, "--file", &file]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name}: {verb} must fail");
            assert!(stderr.contains(reason), "{name}: {verb}: {stderr}");
        }
        let now = c.hsctl_json(1, &["policy", "get"]);
        assert_eq!(now["policy"], good, "{name} changed the running policy");
    }
    let checked = c.hsctl_json(
        1,
        &["policy", "check", "--file", &policy_file(&dir, "g2", good)],
    );
    assert_eq!(checked["valid"], true);

    // The same over REST.
    let addr = format!("{}:8080", c.members[0].ip);
    let api = c.hsctl_json(1, &["apikeys", "create"]);
    let key = api["key"].as_str().unwrap();
    let body = |policy: &str| serde_json::json!({ "policy": policy }).to_string();
    let deny = r#"{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}"#;
    let (status, text) = http_request(&addr, "PUT", "/api/v1/policy", Some(key), Some(&body(deny)));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("invalid ACL action"), "{text}");
    let (status, text) = http_request(&addr, "GET", "/api/v1/policy", Some(key), None);
    assert_eq!(status, 200, "{text}");
    let now: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(now["policy"], good);
    let open = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    let (status, text) = http_request(&addr, "PUT", "/api/v1/policy", Some(key), Some(&body(open)));
    assert_eq!(status, 200, "{text}");
    assert_eq!(c.hsctl_json(1, &["policy", "get"])["policy"], open);

    // Every accepted policy is a version; an old one can run again.
    let history = c.hsctl_json(1, &["policy", "history"]);
    let versions = history.as_array().unwrap();
    assert_eq!(versions.len(), 2, "{history}");
    assert_eq!(versions[0]["policy"], good);
    assert_eq!(versions[1]["current"], true);
    let first = versions[0]["version"].to_string();
    c.hsctl_json(1, &["policy", "rollback", &first]);
    assert_eq!(c.hsctl_json(1, &["policy", "get"])["policy"], good);
    assert_eq!(
        c.hsctl_json(1, &["policy", "history"])
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let missing = c.hsctl(1, &["policy", "rollback", "999"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("policy version 999"));
}

/// Routes approved by an admin are listed; approving one exit route approves both; a bad
/// CIDR is refused; an unknown node is refused.
#[test]
fn routes_are_approved_and_listed() {
    let c = TestCluster::start(1, ClusterOpts::default());
    let key = c.user_with_key("alice", &[]);
    let _router = c.client("router", 1, &key, None, false);
    let node = c.wait_online(1, "router", JOIN);
    let id = node["id"].to_string();

    let approved = c.hsctl_json(
        1,
        &[
            "nodes",
            "approve-routes",
            &id,
            "--routes",
            "10.9.0.0/24,0.0.0.0/0",
        ],
    );
    assert_eq!(
        approved["approved_routes"],
        serde_json::json!(["0.0.0.0/0", "10.9.0.0/24", "::/0"])
    );
    let listed = c.hsctl_json(1, &["nodes", "list-routes", &id]);
    assert_eq!(listed[0]["approved_routes"], approved["approved_routes"]);
    assert_eq!(
        listed[0]["primary_routes"],
        serde_json::json!([]),
        "approved but not advertised: the node routes nothing"
    );

    let bad = c.hsctl(
        1,
        &["nodes", "approve-routes", &id, "--routes", "10.9.0.300/24"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected a CIDR"));
    let unknown = c.hsctl(
        1,
        &["nodes", "approve-routes", "999", "--routes", "10.0.0.0/8"],
    );
    assert!(!unknown.status.success());
    assert!(
        c.audited(1, &[], |r| r["action"] == "approve_routes"),
        "approvals are audited"
    );
    // The node's client keeps its netmap (routes force per-viewer netmaps).
    let after = c.wait_online(1, "router", JOIN);
    assert_eq!(after["approved_routes"], approved["approved_routes"]);
}

/// `policy.mode: file`: the member loads the file, follows edits (on its own and on
/// SIGHUP), keeps the running policy when an edit would be refused, and refuses
/// `policy set` (the file is the policy).
#[test]
fn a_policy_file_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}"#;
    let path = policy_file(&dir, "policy.hujson", v1);
    let mut c = TestCluster::start(
        1,
        ClusterOpts {
            extra_yaml: format!("policy:\n  mode: file\n  path: {path}\n"),
            ..Default::default()
        },
    );
    let current = |c: &TestCluster| c.hsctl_json(1, &["policy", "get"])["policy"].clone();
    wait_for("the file's policy loaded", JOIN, || {
        (current(&c) == v1).then_some(())
    });

    let v2 = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:443"]}]}"#;
    policy_file(&dir, "policy.hujson", v2);
    c.member(1).signal("-HUP");
    wait_for("the edited policy loaded", JOIN, || {
        (current(&c) == v2).then_some(())
    });

    policy_file(
        &dir,
        "policy.hujson",
        r#"{"acls": [{"action": "accept", "src": ["tag:gone"], "dst": ["*:*"]}]}"#,
    );
    wait_for("the refused edit logged", JOIN, || {
        c.members[0]
            .log()
            .contains("policy file refused")
            .then_some(())
    });
    assert_eq!(current(&c), v2, "a refused file keeps the running policy");

    let set = c.hsctl(1, &["policy", "set", "--file", &path]);
    assert!(!set.status.success());
    assert!(String::from_utf8_lossy(&set.stderr).contains("policy.mode is file"));
}

/// A node speaking ts2021 through the project's own client, kept streaming.
struct Streaming {
    machine: [u8; 32],
    node: NodeKey,
    _control: ControlClient,
    stream: MapStream,
}

/// Registers `name` through member `member` (advertising `routes`) and opens its stream.
async fn stream_node(
    c: &TestCluster,
    member: u64,
    key: &str,
    name: &str,
    routes: &[&str],
) -> Streaming {
    let (machine, node) = (keypair().0, NodeKey(keypair().1));
    let mut control = connect(c, member, machine, routes).await;
    let (status, resp) = control.register(&node, key, name).await.unwrap();
    assert_eq!(status, 200, "{resp}");
    open_stream(control, machine, node).await
}

/// An already registered node (its machine and node key) streaming through `member`.
async fn reconnect(
    c: &TestCluster,
    member: u64,
    machine: [u8; 32],
    node: NodeKey,
    name: &str,
    routes: &[&str],
) -> Streaming {
    let mut control = connect(c, member, machine, routes).await;
    control.set_hostname(name);
    open_stream(control, machine, node).await
}

async fn connect(
    c: &TestCluster,
    member: u64,
    machine: [u8; 32],
    routes: &[&str],
) -> ControlClient {
    let addr = format!("{}:8080", c.members[(member - 1) as usize].ip);
    let mut control = ControlClient::connect(&addr, &machine).await.unwrap();
    control.advertise_routes(routes);
    control
}

async fn open_stream(mut control: ControlClient, machine: [u8; 32], node: NodeKey) -> Streaming {
    let mut stream = control
        .map_stream(&node, &DiscoKey(keypair().1), "127.0.0.1:41641")
        .await
        .unwrap();
    stream.next(JOIN).await.unwrap();
    Streaming {
        machine,
        node,
        _control: control,
        stream,
    }
}

/// The names of the peers in a full netmap that hold `route` as a primary route.
fn primaries(netmap: &Value, route: &str) -> Vec<String> {
    netmap["Peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["PrimaryRoutes"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == route))
        })
        .filter_map(|p| p["Name"].as_str()?.split('.').next().map(String::from))
        .collect()
}

/// The primary router of `route` as member `member` reports it (`nodes list-routes`).
fn listed_primary(c: &TestCluster, member: u64, route: &str) -> Vec<String> {
    let routes = c.hsctl_json(member, &["--local", "nodes", "list-routes"]);
    routes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n["primary_routes"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == route))
        })
        .map(|n| n["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Two subnet routers advertise the same route, approved by `autoApprovers`; the first to
/// come online is primary on every member. When the member holding its session is killed,
/// the other becomes primary — in a viewer's netmap on another member and in every
/// survivor's listing — and stays primary when the first comes back.
#[test]
fn ha_routers_fail_over_when_the_primary_member_dies() {
    const ROUTE: &str = "10.77.0.0/24";
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let key = c.user_with_key("ops", &["--reusable"]);
    let policy = format!(
        r#"{{"acls": [{{"action": "accept", "src": ["*"], "dst": ["*:*"]}}],
            "autoApprovers": {{"routes": {{"{ROUTE}": ["ops@"]}}}}}}"#
    );
    let dir = tempfile::tempdir().unwrap();
    let file = policy_file(&dir, "ha.hujson", &policy);
    c.hsctl_json(1, &["policy", "set", "--file", &file]);
    let leader = c.wait_leader();
    let mut others = (1..=3).filter(|i| *i != leader);
    let (first_home, second_home) = (others.next().unwrap(), others.next().unwrap());

    rt().block_on(async {
        let first = stream_node(&c, first_home, &key, "router-a", &[ROUTE]).await;
        wait_for("router-a primary", JOIN, || {
            (listed_primary(&c, second_home, ROUTE) == ["router-a"]).then_some(())
        });
        let _second = stream_node(&c, second_home, &key, "router-b", &[ROUTE]).await;
        let mut viewer = stream_node(&c, leader, &key, "viewer", &[]).await;
        for member in 1..=3 {
            let primary = wait_for("every member agrees", JOIN, || {
                let p = listed_primary(&c, member, ROUTE);
                (!p.is_empty()).then_some(p)
            });
            assert_eq!(primary, ["router-a"], "member {member}");
        }

        // The primary's member dies (kill -9): its session ends with it.
        let (machine, node) = (first.machine, first.node);
        drop(first);
        c.member(first_home).kill();
        let deadline = std::time::Instant::now() + JOIN;
        let mut seen = Vec::new();
        while seen != ["router-b"] {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "the viewer never saw router-b primary: {seen:?}"
            );
            let msg = viewer.stream.next(left).await.unwrap();
            if msg.get("Peers").is_some() {
                seen = primaries(&msg, ROUTE);
            }
        }
        for member in [leader, second_home] {
            let primary = wait_for("survivors agree", JOIN, || {
                let p = listed_primary(&c, member, ROUTE);
                (p == ["router-b"]).then_some(p)
            });
            assert_eq!(primary, ["router-b"]);
        }

        // router-a comes back through a survivor: router-b keeps the route.
        let _back = reconnect(&c, leader, machine, node, "router-a", &[ROUTE]).await;
        wait_for("router-a online again", JOIN, || {
            c.node(leader, "router-a").filter(|n| n["online"] == true)
        });
        assert_eq!(listed_primary(&c, leader, ROUTE), ["router-b"]);
        assert_eq!(listed_primary(&c, second_home, ROUTE), ["router-b"]);
    });
}

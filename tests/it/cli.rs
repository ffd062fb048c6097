//! hsctl against a live member: JSON shapes, API-key auth over TCP, and clear errors with
//! the documented exit codes for bad input.

use crate::harness::{ClusterOpts, TestCluster, hsctl};

#[test]
fn users_keys_and_errors() {
    let c = TestCluster::start(1, ClusterOpts::default());
    let user = c.hsctl_json(1, &["users", "create", "erin"]);
    assert_eq!(user["name"], "erin");
    let users = c.hsctl_json(1, &["users", "list"]);
    let u = &users.as_array().unwrap()[0];
    assert!(
        u["id"].is_u64() && u["created_at"].is_string(),
        "users list shape: {users}"
    );

    // Duplicate and unknown names: clear error, exit 1, nothing changed.
    let dup = c.hsctl(1, &["users", "create", "erin"]);
    assert_eq!(dup.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("erin"));
    let unknown = c.hsctl(1, &["preauthkeys", "create", "--user", "ghost"]);
    assert_eq!(unknown.status.code(), Some(1));
    let bad_dur = c.hsctl(
        1,
        &[
            "preauthkeys",
            "create",
            "--user",
            "erin",
            "--expiration",
            "soon",
        ],
    );
    assert_eq!(bad_dur.status.code(), Some(64), "usage error");
    assert_eq!(
        c.hsctl_json(1, &["users", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let key = c.hsctl_json(
        1,
        &[
            "preauthkeys",
            "create",
            "--user",
            "erin",
            "--ephemeral",
            "--tags",
            "tag:ci",
        ],
    );
    for field in [
        "key",
        "user",
        "reusable",
        "ephemeral",
        "expiration",
        "used",
        "tags",
    ] {
        assert!(
            key.get(field).is_some(),
            "preauthkey JSON lacks {field}: {key}"
        );
    }
    assert_eq!(key["tags"][0], "tag:ci");
    assert_eq!(key["ephemeral"], true);
    // A deleted key is gone from the listing; deleting it again is "not found".
    let prefix = key["prefix"].as_str().unwrap();
    c.hsctl_json(1, &["preauthkeys", "delete", "--user", "erin", prefix]);
    let left = c.hsctl_json(1, &["preauthkeys", "list", "--user", "erin"]);
    assert_eq!(left.as_array().unwrap().len(), 0, "{left}");
    let again = c.hsctl(1, &["preauthkeys", "delete", "--user", "erin", prefix]);
    assert_eq!(again.status.code(), Some(1), "not found");

    // API keys over TCP.
    let api = c.hsctl_json(1, &["apikeys", "create", "--expiration", "1h"]);
    let secret = api["key"].as_str().unwrap().to_string();
    assert!(api["prefix"].is_string());
    let addr = c.members[0].grpc_addr();
    let ok = hsctl(&[
        "--address",
        &addr,
        "--api-key",
        &secret,
        "users",
        "list",
        "-o",
        "json",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The same prefix with a different last character of the secret.
    let last = if secret.ends_with('x') { "y" } else { "x" };
    let wrong = format!("{}{last}", &secret[..secret.len() - 1]);
    let denied = hsctl(&["--address", &addr, "--api-key", &wrong, "users", "list"]);
    assert_eq!(
        denied.status.code(),
        Some(77),
        "wrong API key: {}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let none = hsctl(&["--address", &addr, "users", "list"]);
    assert_eq!(none.status.code(), Some(77));
    let garbage = hsctl(&[
        "--address",
        &addr,
        "--api-key",
        "not-a-key",
        "users",
        "list",
    ]);
    assert_eq!(garbage.status.code(), Some(77));
    // Expired API key.
    c.hsctl_json(1, &["apikeys", "expire", api["prefix"].as_str().unwrap()]);
    let expired = hsctl(&["--address", &addr, "--api-key", &secret, "users", "list"]);
    assert_eq!(expired.status.code(), Some(77));

    // Nothing listening: unavailable.
    let gone = hsctl(&[
        "--socket",
        "/nonexistent/hsd.sock",
        "--timeout",
        "1s",
        "users",
        "list",
    ]);
    assert_eq!(gone.status.code(), Some(69));
    // Unknown command: usage.
    assert_eq!(hsctl(&["frobnicate"]).status.code(), Some(64));

    let status = c.hsctl_json(1, &["cluster", "status"]);
    assert_eq!(status["leader"], 1);
    assert_eq!(status["members"][0]["role"], "leader");
    assert_eq!(status["members"][0]["healthy"], true);
}

/// `hsd config check` names the bad key and exits 64; a good file passes.
#[test]
fn config_check() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "listen_addr: 127.0.0.1:8080\nprefixes:\n  v4: 10.0.0.0/33\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::harness::hsd_bin())
        .args(["config", "check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("prefixes.v4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(&unknown, "listen_adr: 127.0.0.1:8080\n").unwrap();
    let out = std::process::Command::new(crate::harness::hsd_bin())
        .args(["config", "check", "--config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_adr"));
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "listen_addr: 127.0.0.1:8080\n").unwrap();
    let out = std::process::Command::new(crate::harness::hsd_bin())
        .args(["config", "check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kill -HUP` (an operator's "reload") never ends a member, even with nothing to reload.
#[test]
fn a_hangup_does_not_end_a_member() {
    let mut c = TestCluster::start(1, ClusterOpts::default());
    for _ in 0..3 {
        c.member(1).signal("-HUP");
    }
    c.hsctl_json(1, &["users", "create", "after-hup"]);
    assert!(c.member(1).is_running(), "SIGHUP ended the member");
    let users = c.hsctl_json(1, &["users", "list"]);
    assert!(users.to_string().contains("after-hup"));
}

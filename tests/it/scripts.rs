//! The `cluster/` scripts, as a user runs them: `cluster/up 3 DIR` (members on 127.0.0.i
//! with the default ports and mTLS between them), `cluster/member`, `cluster/down`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{guard, hsctl, hsctl_bin, hsd_bin, wait_for};

fn script(name: &str, args: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new(root.join("cluster").join(name))
        .args(args)
        .env("HSD", hsd_bin())
        .env("HSCTL", hsctl_bin())
        .output()
        .expect("run cluster script")
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "script failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cluster_scripts_up_member_down() {
    guard();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(script("up", &["3", d]));
    let members: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("members.json")).unwrap()).unwrap();
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(members[1]["control_url"], "http://127.0.0.2:8080");
    assert!(members.iter().all(|m| m["pid"].is_u64()));
    let socket = |i: usize| members[i - 1]["socket"].as_str().unwrap().to_string();

    let status = |i: usize| {
        let out = hsctl(&["--socket", &socket(i), "cluster", "status", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let s = status(3);
    assert!(s["leader"].is_u64());
    assert!(
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["healthy"] == true),
        "{s}"
    );
    // Member-to-member traffic is mutual TLS: a plaintext gRPC client gets nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plaintext = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_static("http://127.0.0.1:50444")
            .connect()
            .await?;
        let mut client = hsd::proto::raft::raft_service_client::RaftServiceClient::new(ch);
        client
            .member_status(hsd::proto::raft::MemberStatusRequest {})
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    assert!(
        plaintext.is_err(),
        "a client without a member certificate must be refused"
    );
    let config = std::fs::read_to_string(dir.path().join("m1/config.yaml")).unwrap();
    assert!(
        config.contains("ca_cert_path"),
        "cluster/up configures mTLS"
    );

    // kill -9 a member, write through another, start it again: it catches up.
    ok(script("member", &[d, "1", "kill"]));
    wait_for("a leader without member 1", Duration::from_secs(20), || {
        let s = status(2);
        s["leader"].as_u64().filter(|l| *l != 1)
    });
    let out = hsctl(&[
        "--socket",
        &socket(2),
        "users",
        "create",
        "scripted",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(script("member", &[d, "1", "start"]));
    wait_for("member 1 caught up", Duration::from_secs(20), || {
        let out = hsctl(&["--socket", &socket(1), "users", "list", "-o", "json"]);
        let users: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        users
            .as_array()?
            .iter()
            .any(|u| u["name"] == "scripted")
            .then_some(())
    });
    ok(script("member", &[d, "2", "restart"]));
    ok(script("down", &[d]));
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("members.json")).unwrap()).unwrap();
    assert!(
        after.as_array().unwrap().iter().all(|m| m["pid"].is_null()),
        "{after}"
    );
}

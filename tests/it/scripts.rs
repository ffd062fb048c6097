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

/// The Kubernetes example gives each member pod its own certificate and key and nothing
/// of the others' (nor the CA key), and its member config is one `hsd` accepts.
#[test]
fn the_kubernetes_example_keeps_each_key_to_its_member() {
    use serde::Deserialize;
    use serde_yaml::Value;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/kubernetes/hsd.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let kind = |d: &Value| d["kind"].as_str().unwrap_or_default().to_string();
    let config = docs
        .iter()
        .find(|d| kind(d) == "ConfigMap")
        .and_then(|d| d["data"]["config.yaml"].as_str())
        .expect("the member config");
    let sets: Vec<&Value> = docs.iter().filter(|d| kind(d) == "StatefulSet").collect();
    assert_eq!(sets.len(), 3, "one StatefulSet per member");
    for set in sets {
        let pod = &set["spec"]["template"]["spec"];
        let args: Vec<&str> = pod["containers"][0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let id = args[args.iter().position(|a| *a == "--member-id").unwrap() + 1];
        assert_eq!(set["spec"]["replicas"].as_u64(), Some(1));
        let mut secrets: Vec<&str> = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v["secret"]["secretName"].as_str())
            .collect();
        secrets.sort();
        // The shared keys, and this member's certificate and key: no other member's.
        assert_eq!(secrets, ["hsd-keys", &format!("hsd-member-{id}")]);
    }
    // The member config validates, with a member's flags as the pods pass them (and the
    // mounted files where the pod has them).
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().display().to_string();
    for file in ["member/ca.pem", "member/member.pem", "member/member.key"] {
        let path = dir.path().join("etc/hsd").join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
    }
    let config = config
        .replace("/etc/hsd/", &format!("{base}/etc/hsd/"))
        .replace("/var/lib/hsd", &format!("{base}/data"));
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(hsd_bin())
        .args([
            "--config",
            path.to_str().unwrap(),
            "--member-id",
            "2",
            "config",
            "check",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! A history check under faults: concurrent writers through every member while members
//! are killed (-9), stopped and restarted, or partitioned from the others; real clients
//! register through different members, two of them racing with the same single-use key. Afterwards every acknowledged write is
//! present on every member, nothing appears that no one wrote, no IP is duplicated, and the
//! single-use key admitted exactly one node.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::client::ClientOpts;
use crate::harness::{ClusterOpts, TestCluster, TsClient, hsctl, wait_for};

const FAULT_PHASE: Duration = Duration::from_secs(25);

#[derive(Default)]
struct History {
    acknowledged: BTreeSet<String>,
    attempted: BTreeSet<String>,
}

#[test]
fn acknowledged_writes_survive_kills_and_restarts() {
    let mut c = TestCluster::start(3, ClusterOpts::default());
    let sockets: Vec<String> = c
        .members
        .iter()
        .map(|m| m.socket().to_str().unwrap().to_string())
        .collect();
    c.hsctl_json(1, &["users", "create", "nodes"]);
    let shared = c.hsctl_json(1, &["preauthkeys", "create", "--user", "nodes"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let reusable = c.hsctl_json(
        1,
        &["preauthkeys", "create", "--user", "nodes", "--reusable"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();

    // Real clients: two race with one single-use key on two members; three more register
    // through each member with a reusable key while faults run.
    let mut clients = Vec::new();
    for (i, (member, key)) in [
        (0, &shared),
        (1, &shared),
        (0, &reusable),
        (1, &reusable),
        (2, &reusable),
    ]
    .into_iter()
    .enumerate()
    {
        clients.push(TsClient::start(ClientOpts {
            name: format!("h{i}"),
            control_url: c.members[member].control_url(),
            auth_key: Some(key.clone()),
            ..Default::default()
        }));
    }

    let history = Arc::new(Mutex::new(History::default()));
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (history, done, sockets) = (history.clone(), done.clone(), sockets.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !done.load(Ordering::SeqCst) {
                    let name = format!("w{w}-{i}");
                    let socket = &sockets[(w + i) % sockets.len()];
                    history.lock().unwrap().attempted.insert(name.clone());
                    let out = hsctl(&[
                        "--socket",
                        socket,
                        "--timeout",
                        "3s",
                        "users",
                        "create",
                        &name,
                        "-o",
                        "json",
                    ]);
                    if out.status.success() {
                        history.lock().unwrap().acknowledged.insert(name);
                    }
                    i += 1;
                }
            })
        })
        .collect();

    // The nemesis, round-robin over members: kill -9, SIGTERM, or a partition.
    let t0 = Instant::now();
    let mut round = 0u64;
    while t0.elapsed() < FAULT_PHASE {
        let victim = round % 3 + 1;
        match round % 3 {
            // kill -9, down briefly, back.
            0 => {
                c.member(victim).kill();
                std::thread::sleep(Duration::from_millis(1500));
                c.member(victim).start();
            }
            // SIGTERM (drain and hand over), down briefly, back.
            1 => {
                c.member(victim).stop();
                std::thread::sleep(Duration::from_millis(1500));
                c.member(victim).start();
            }
            // Partition the victim from the others, then heal.
            _ => {
                c.partition(&[victim]);
                std::thread::sleep(Duration::from_millis(2500));
                c.heal();
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        round += 1;
    }
    done.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    c.wait_leader();

    let history = history.lock().unwrap();
    println!(
        "history: {} writes attempted, {} acknowledged, {} fault rounds",
        history.attempted.len(),
        history.acknowledged.len(),
        round
    );
    assert!(
        history.acknowledged.len() > 10,
        "the cluster kept taking writes during faults"
    );
    for id in 1..=3u64 {
        let users = c.hsctl_json(id, &["users", "list"]);
        let names: BTreeSet<String> = users
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect();
        let missing: Vec<_> = history.acknowledged.difference(&names).collect();
        assert!(
            missing.is_empty(),
            "member {id} lost acknowledged writes: {missing:?}"
        );
        let unexpected: Vec<_> = names
            .iter()
            .filter(|n| *n != "nodes" && !history.attempted.contains(*n))
            .collect();
        assert!(
            unexpected.is_empty(),
            "member {id} shows writes nobody made: {unexpected:?}"
        );
    }

    // Registrations: the single-use key admitted exactly one of the two racers; every
    // reusable-key client got in; no address is shared.
    let nodes = wait_for(
        "the reusable-key clients registered",
        Duration::from_secs(90),
        || {
            let nodes = c.hsctl_json(1, &["nodes", "list"]);
            let names: BTreeSet<String> = nodes
                .as_array()?
                .iter()
                .map(|n| n["name"].as_str().unwrap().to_string())
                .collect();
            ["h2", "h3", "h4"]
                .iter()
                .all(|n| names.contains(*n))
                .then_some(nodes)
        },
    );
    let nodes = nodes.as_array().unwrap();
    let racers = nodes
        .iter()
        .filter(|n| n["name"] == "h0" || n["name"] == "h1")
        .count();
    assert_eq!(
        racers, 1,
        "a single-use key is used once cluster-wide: {nodes:?}"
    );
    // Every member holds the same nodes with the same addresses, none shared.
    let addresses = |nodes: &[serde_json::Value]| -> BTreeSet<(String, String)> {
        let mut ips = BTreeSet::new();
        for n in nodes {
            for ip in n["ip_addresses"].as_array().unwrap() {
                let ip = ip.as_str().unwrap().to_string();
                assert!(
                    !ips.iter().any(|(_, seen)| *seen == ip),
                    "duplicate address {ip}"
                );
                ips.insert((n["name"].as_str().unwrap().to_string(), ip));
            }
        }
        ips
    };
    let on_first = addresses(nodes);
    for id in 2..=3u64 {
        let theirs = c.hsctl_json(id, &["nodes", "list"]);
        assert_eq!(
            addresses(theirs.as_array().unwrap()),
            on_first,
            "member {id} agrees with member 1 on nodes and addresses"
        );
    }
    drop(clients);
}

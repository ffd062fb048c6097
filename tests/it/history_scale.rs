//! The long history check behind `cluster/history --writes N --faults F [--json FILE]`
//! (ignored by `cargo test`: it runs for minutes).
//!
//! Writers create pre-auth keys through every member, each tagged with a tag no other
//! request uses — writes that are not unique by name, so a write applied twice shows up as
//! two keys with one tag. Racers register two machines with one single-use key on two
//! members at once. Meanwhile a nemesis cycles through kill -9 and SIGTERM of the leader
//! and of followers, partitions, SIGSTOP pauses and a wiped follower rejoining. Afterwards
//! every member must hold every acknowledged write once, nothing nobody wrote, no address
//! twice, and at most one node per single-use key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsd::cli::connect::{Target, connect};
use hsd::control::client::{ControlClient, fetch_server_key, keypair};
use hsd::proto::admin as pb;
use hsd::registry::NodeKey;
use serde_json::json;

use crate::harness::{ClusterOpts, TestCluster};

#[derive(Default)]
struct History {
    attempted: Mutex<BTreeSet<String>>,
    acked: Mutex<BTreeSet<String>>,
    acked_count: AtomicU64,
    races: AtomicU64,
    done: AtomicBool,
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn admin(socket: &Path) -> Option<hsd::cli::connect::Client> {
    connect(
        &Target::Socket(socket.to_path_buf()),
        Duration::from_secs(2),
    )
    .await
    .ok()
}

/// Creates tagged pre-auth keys through member after member until told to stop.
async fn writer(w: usize, sockets: Vec<PathBuf>, history: Arc<History>) {
    let mut i = 0usize;
    while !history.done.load(Ordering::SeqCst) {
        let tag = format!("tag:w{w}-{i}");
        let socket = &sockets[(w + i) % sockets.len()];
        history.attempted.lock().unwrap().insert(tag.clone());
        let write = async {
            let mut admin = admin(socket).await?;
            admin
                .create_pre_auth_key(pb::CreatePreAuthKeyRequest {
                    user: "h".into(),
                    tags: vec![tag.clone()],
                    ..Default::default()
                })
                .await
                .ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(4), write).await {
            history.acked.lock().unwrap().insert(tag);
            history.acked_count.fetch_add(1, Ordering::SeqCst);
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i += 1;
    }
}

async fn register(addr: &str, server_key: &[u8; 32], key: &str, hostname: &str) {
    let attempt = async {
        let mut client = ControlClient::connect_with_key(addr, server_key, &keypair().0)
            .await
            .ok()?;
        client
            .register(&NodeKey(keypair().1), key, hostname)
            .await
            .ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), attempt).await;
}

/// Creates single-use keys and races two machines for each, on two members.
async fn racer(
    sockets: Vec<PathBuf>,
    addrs: Vec<String>,
    server_key: [u8; 32],
    history: Arc<History>,
) {
    let mut k = 0usize;
    while !history.done.load(Ordering::SeqCst) {
        let n = addrs.len();
        let created = async {
            let mut admin = admin(&sockets[k % n]).await?;
            let r = admin
                .create_pre_auth_key(pb::CreatePreAuthKeyRequest {
                    user: "h".into(),
                    ..Default::default()
                })
                .await
                .ok()?;
            r.into_inner().pre_auth_key?.key
        };
        if let Ok(Some(key)) = tokio::time::timeout(Duration::from_secs(4), created).await {
            history.races.fetch_add(1, Ordering::SeqCst);
            let (host_a, host_b) = (format!("race{k}-a"), format!("race{k}-b"));
            tokio::join!(
                register(&addrs[k % n], &server_key, &key, &host_a),
                register(&addrs[(k + 1) % n], &server_key, &key, &host_b),
            );
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One fault, then recovery; `f` picks which (they cycle).
fn fault(c: &mut TestCluster, f: u64) {
    let leader = c.wait_leader();
    let follower = (1..=3u64).find(|m| *m != leader).unwrap();
    let victim = if f.is_multiple_of(2) {
        leader
    } else {
        follower
    };
    match f % 9 {
        0 | 1 => {
            c.member(victim).kill();
            std::thread::sleep(Duration::from_millis(1500));
            c.member(victim).start();
        }
        2 | 3 => {
            c.member(victim).stop();
            std::thread::sleep(Duration::from_millis(1000));
            c.member(victim).start();
        }
        4 | 5 => {
            c.partition(&[victim]);
            std::thread::sleep(Duration::from_millis(2500));
            c.heal();
        }
        6 | 7 => {
            c.member(victim).pause();
            std::thread::sleep(Duration::from_millis(2000));
            c.member(victim).resume();
        }
        _ => {
            // A follower loses its disk and rejoins empty: the leader catches it up.
            c.member(follower).stop();
            c.wipe(follower);
            c.member(follower).start();
        }
    }
    std::thread::sleep(Duration::from_millis(1000));
}

#[derive(Default, Debug)]
struct Check {
    lost: usize,
    phantom: usize,
    duplicated: usize,
    duplicate_ips: usize,
    single_use_violations: usize,
    tags: BTreeSet<String>,
}

/// What member `socket` holds, read linearizably through it (so it has applied everything).
async fn check_member(socket: &Path, history: &History) -> Check {
    let mut admin = admin(socket).await.expect("admin socket");
    let keys = admin
        .list_pre_auth_keys(pb::ListPreAuthKeysRequest {
            local: false,
            user: "h".into(),
        })
        .await
        .expect("list keys")
        .into_inner()
        .pre_auth_keys;
    let nodes = admin
        .list_nodes(pb::ListNodesRequest {
            local: false,
            user: String::new(),
        })
        .await
        .expect("list nodes")
        .into_inner()
        .nodes;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for tag in keys.iter().flat_map(|k| k.tags.iter()) {
        *counts.entry(tag.clone()).or_default() += 1;
    }
    let attempted = history.attempted.lock().unwrap();
    let acked = history.acked.lock().unwrap();
    let mut ips: BTreeMap<&str, usize> = BTreeMap::new();
    for ip in nodes.iter().flat_map(|n| n.ip_addresses.iter()) {
        *ips.entry(ip).or_default() += 1;
    }
    let mut racers: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &nodes {
        if let Some(race) = n
            .name
            .strip_prefix("race")
            .and_then(|r| r.split('-').next())
        {
            *racers.entry(race).or_default() += 1;
        }
    }
    Check {
        lost: acked.iter().filter(|t| !counts.contains_key(*t)).count(),
        phantom: counts.keys().filter(|t| !attempted.contains(*t)).count(),
        duplicated: counts.values().map(|c| c - 1).sum(),
        duplicate_ips: ips.values().map(|c| c - 1).sum(),
        single_use_violations: racers.values().filter(|c| **c > 1).count(),
        tags: counts.into_keys().collect(),
    }
}

#[test]
#[ignore = "long (minutes): run through cluster/history"]
fn history_at_scale() {
    let target_writes = env("HISTORY_WRITES", 10_000);
    let faults = env("HISTORY_FAULTS", 50);
    let mut c = TestCluster::start(
        3,
        ClusterOpts {
            snapshot_every: Some(1000),
            ..Default::default()
        },
    );
    c.hsctl_json(1, &["users", "create", "h"]);
    let sockets: Vec<PathBuf> = c.members.iter().map(|m| m.socket()).collect();
    let addrs: Vec<String> = c.members.iter().map(|m| format!("{}:8080", m.ip)).collect();
    let history = Arc::new(History::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_key = rt
        .block_on(fetch_server_key(&addrs[0]))
        .expect("server key");
    let mut load = Vec::new();
    for w in 0..4 {
        load.push(rt.spawn(writer(w, sockets.clone(), history.clone())));
    }
    load.push(rt.spawn(racer(
        sockets.clone(),
        addrs.clone(),
        server_key,
        history.clone(),
    )));

    let started = Instant::now();
    for f in 0..faults {
        fault(&mut c, f);
        println!(
            "history: fault {}/{faults} done, {} writes acknowledged",
            f + 1,
            history.acked_count.load(Ordering::SeqCst)
        );
    }
    // Enough acknowledged writes, within a bound.
    let deadline = Instant::now() + Duration::from_secs(1800);
    while history.acked_count.load(Ordering::SeqCst) < target_writes && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    history.done.store(true, Ordering::SeqCst);
    for task in load {
        let _ = rt.block_on(task);
    }
    c.heal();
    for m in c.members.iter_mut() {
        assert!(m.is_running(), "member {} died:\n{}", m.id, m.log());
    }
    c.wait_leader();

    let checks: Vec<Check> = sockets
        .iter()
        .map(|s| rt.block_on(check_member(s, &history)))
        .collect();
    let attempted = history.attempted.lock().unwrap().len();
    let acked = history.acked.lock().unwrap().len();
    let diverged = checks.iter().filter(|k| k.tags != checks[0].tags).count();
    let worst = |f: fn(&Check) -> usize| checks.iter().map(f).max().unwrap_or(0);
    let report = json!({
        "acked": acked,
        "attempted": attempted,
        "faults": faults,
        "lost": worst(|k| k.lost),
        "phantom": worst(|k| k.phantom),
        "duplicated": worst(|k| k.duplicated),
        "duplicate_ips": worst(|k| k.duplicate_ips),
        "single_use_violations": worst(|k| k.single_use_violations),
        "single_use_races": history.races.load(Ordering::SeqCst),
        "diverged_members": diverged,
        "seconds": started.elapsed().as_secs(),
    });
    println!("history: {report}");
    if let Some(path) = std::env::var("HISTORY_JSON").ok().filter(|p| !p.is_empty()) {
        std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    }
    assert!(
        acked as u64 >= target_writes,
        "only {acked} writes acknowledged"
    );
    for (field, value) in [
        ("lost", "lost"),
        ("phantom", "phantom"),
        ("duplicated", "duplicated"),
        ("duplicate_ips", "duplicate_ips"),
        ("single_use_violations", "single_use_violations"),
        ("diverged_members", "diverged_members"),
    ] {
        assert_eq!(report[field], 0, "{value}: {report}");
    }
}

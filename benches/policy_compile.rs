//! The access-control engine at 1,000 and 10,000 nodes with a realistic policy (groups,
//! tags, hosts, a few dozen ACL and grant rules, `autogroup:self`, SSH, routes):
//! - `compile`: a policy compiled against the tailnet (what a member does after a change);
//! - `netmap`: one node's packet filter, peers and their routes, SSH rules;
//! - `change`: one node's tags change, recompiled, that node's netmap rebuilt.
//!
//! Run: `cargo bench --bench policy_compile`

use std::net::{Ipv4Addr, Ipv6Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hsd::policy::{Compiled, Node, Policy, Tailnet, User};

const USERS: u64 = 200;

/// A policy an enterprise tailnet might run: teams as groups, servers as tags.
fn policy() -> Policy {
    let mut acls = vec![
        r#"{"action": "accept", "src": ["group:ops"], "dst": ["*:*"]}"#.to_string(),
        r#"{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}"#.into(),
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["tag:server:22,443", "tag:web:80,443"]}"#.into(),
        r#"{"action": "accept", "src": ["group:data", "tag:server"], "dst": ["tag:db:5432"]}"#.into(),
        r#"{"action": "accept", "src": ["*"], "dst": ["tag:web:443"]}"#.into(),
        r#"{"action": "accept", "src": ["group:eng"], "dst": ["10.20.0.0/16:*"]}"#.into(),
        r#"{"action": "accept", "src": ["group:ops"], "dst": ["autogroup:internet:*"]}"#.into(),
        r#"{"action": "accept", "proto": "udp", "src": ["tag:server"], "dst": ["dns:53"]}"#.into(),
    ];
    for team in 0..20 {
        acls.push(format!(
            r#"{{"action": "accept", "src": ["group:team{team}"], "dst": ["tag:team{team}:*"]}}"#
        ));
    }
    let groups: Vec<String> = (0..20)
        .map(|t| format!(r#""group:team{t}": [{}]"#, team_members(t)))
        .chain([
            format!(r#""group:ops": [{}]"#, range_members(0..10)),
            format!(r#""group:eng": [{}]"#, range_members(10..120)),
            format!(r#""group:data": [{}]"#, range_members(120..150)),
        ])
        .collect();
    let tags: Vec<String> = ["server", "web", "db", "router", "exit"]
        .iter()
        .map(|t| t.to_string())
        .chain((0..20).map(|t| format!("team{t}")))
        .map(|t| format!(r#""tag:{t}": ["group:ops"]"#))
        .collect();
    let text = format!(
        r#"{{
        "groups": {{{groups}}},
        "tagOwners": {{{tags}}},
        "hosts": {{"dns": "10.20.0.53"}},
        "acls": [{acls}],
        "grants": [{{"src": ["group:eng"], "dst": ["tag:web"], "app": {{"example.com/cap/web": [{{"role": "dev"}}]}}}}],
        "autoApprovers": {{"routes": {{"10.20.0.0/16": ["tag:router"]}}, "exitNode": ["tag:exit"]}},
        "ssh": [
            {{"action": "accept", "src": ["group:ops"], "dst": ["tag:server"], "users": ["root", "ubuntu"]}},
            {{"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]}}
        ]
    }}"#,
        groups = groups.join(","),
        tags = tags.join(","),
        acls = acls.join(","),
    );
    Policy::parse(&text).expect("the bench policy parses")
}

fn range_members(users: std::ops::Range<u64>) -> String {
    users
        .map(|u| format!(r#""user{u}@""#))
        .collect::<Vec<_>>()
        .join(",")
}

fn team_members(team: u64) -> String {
    range_members(team * 10..team * 10 + 10)
}

/// `n` nodes: every tenth a tagged server (some web, db, team servers), a few routers and
/// exit nodes, the rest users' devices.
fn tailnet(n: u32) -> Tailnet {
    let users = (0..USERS)
        .map(|u| User {
            id: u,
            name: format!("user{u}"),
            email: String::new(),
        })
        .collect();
    let nodes = (0..n)
        .map(|i| {
            let tags: Vec<String> = match i % 10 {
                0 => vec!["tag:server".into()],
                1 if i % 20 == 1 => vec!["tag:web".into()],
                2 if i % 50 == 2 => vec!["tag:db".into()],
                3 if i % 100 == 3 => vec![format!("tag:team{}", (i / 100) % 20)],
                4 if i % 500 == 4 => vec!["tag:router".into()],
                5 if i % 500 == 5 => vec!["tag:exit".into()],
                _ => vec![],
            };
            let advertised = match tags.first().map(String::as_str) {
                Some("tag:router") => vec!["10.20.0.0/16".parse().unwrap()],
                Some("tag:exit") => vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
                _ => vec![],
            };
            Node {
                id: u64::from(i) + 1,
                name: format!("node{i}"),
                user: tags.is_empty().then_some(u64::from(i) % USERS),
                tags,
                ipv4: Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i)),
                ipv6: Some(Ipv6Addr::from(
                    u128::from("fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap()) + u128::from(i),
                )),
                advertised,
                approved: vec![],
                online: true,
                online_since: 0,
            }
        })
        .collect();
    Tailnet { users, nodes }
}

/// One node's netmap: filter, peers with their routes, SSH rules.
fn netmap(c: &Compiled, i: usize) -> usize {
    let mut size = c.node(i).filter.len();
    for j in c.peers(i) {
        size += c.peer_routes(i, j).allowed_ips.len();
    }
    size + c.ssh_rules(i).len()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    group.sample_size(10);
    let policy = policy();
    for size in [1_000u32, 10_000] {
        let net = tailnet(size);
        group.bench_with_input(BenchmarkId::new("compile", size), &size, |b, _| {
            b.iter(|| Compiled::new(policy.clone(), net.clone(), "https://hsd").unwrap())
        });
        // A user's laptop (not a server): its netmap holds the servers it may reach.
        let viewer = 7;
        group.bench_with_input(BenchmarkId::new("netmap", size), &size, |b, _| {
            b.iter(|| {
                let compiled = Compiled::new(policy.clone(), net.clone(), "https://hsd").unwrap();
                netmap(&compiled, viewer)
            })
        });
        group.bench_with_input(BenchmarkId::new("change", size), &size, |b, _| {
            let mut changed = net.clone();
            changed.nodes[17].tags = vec!["tag:web".into()];
            changed.nodes[17].user = None;
            b.iter(|| {
                let compiled =
                    Compiled::new(policy.clone(), changed.clone(), "https://hsd").unwrap();
                netmap(&compiled, 17)
            })
        });
        // What a member does for one change across its sessions: every node's filter and
        // SSH fingerprint (sessions compare them to decide what to send).
        group.bench_with_input(BenchmarkId::new("every_node", size), &size, |b, _| {
            b.iter(|| {
                let compiled = Compiled::new(policy.clone(), net.clone(), "https://hsd").unwrap();
                (0..size as usize)
                    .map(|i| compiled.fingerprint(i).0)
                    .fold(0u64, u64::wrapping_add)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

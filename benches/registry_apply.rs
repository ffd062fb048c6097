//! Measures `Registry::apply` for node registrations: the per-entry CPU cost every member
//! pays when it applies the Raft log, and so a ceiling on cluster-wide registration rate.
//! Measured at several registry sizes (lookups are indexed: the cost should not grow), and
//! for a batch of 256 proposals in one entry (the leader's group commit), and with what
//! the state machine then stores (every touched record encoded) under policies of two
//! sizes: what a registration costs must not grow with the policy.
//!
//! Run: `cargo bench --bench registry_apply`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hsd::registry::secrets::{self, SecretKind};
use hsd::registry::*;

fn registry_with(nodes: u32) -> (Registry, String) {
    let mut reg = Registry::new(ClusterSettings::default());
    let at = Timestamp(1_700_000_000_000);
    reg.apply(&Request::single(at, Command::create_user("bench")));
    let secret = secrets::generate(SecretKind::PreAuth);
    reg.apply(&Request::single(
        at,
        Command::CreatePreAuthKey {
            user: "bench".into(),
            prefix: secret.prefix.clone(),
            hash: secret.hash,
            reusable: true,
            ephemeral: false,
            expiration: None,
            tags: vec![],
        },
    ));
    for i in 0..nodes {
        reg.apply(&register(&secret.full, i));
    }
    (reg, secret.full)
}

fn register(key: &str, i: u32) -> Request {
    register_asking(key, i, vec![])
}

/// A registration whose client asks for `tags` (Hostinfo `RequestTags`).
fn register_asking(key: &str, i: u32, request_tags: Vec<String>) -> Request {
    let (prefix, hash) = secrets::parse(SecretKind::PreAuth, key).expect("generated key parses");
    let mut machine = [0u8; 32];
    machine[..4].copy_from_slice(&i.to_be_bytes());
    let mut node = machine;
    node[31] = 1;
    Request::single(
        Timestamp(1_700_000_000_000 + i as i64),
        Command::RegisterNode {
            request: NodeRequest {
                machine_key: MachineKey(machine),
                node_key: NodeKey(node),
                hostname: format!("host{i}"),
                hostinfo: "{}".into(),
                request_tags,
                ephemeral: false,
            },
            auth: NodeAuth::PreAuthKey { prefix, hash },
            auto_approve: true,
            expiry: None,
        },
    )
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("register_node");
    for size in [0u32, 1_000, 5_000] {
        let (base, key) = registry_with(size);
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, size| {
            b.iter_batched(
                || base.clone(),
                |mut reg| reg.apply(&register(&key, size + 1)),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();

    // One log entry as the leader's group commit makes it under load: 256 registrations.
    let mut group = c.benchmark_group("apply_batch");
    group.throughput(criterion::Throughput::Elements(256));
    let (base, key) = registry_with(1_000);
    let batch = Request {
        at: Timestamp(1_700_000_000_000),
        proposals: (0..256u32)
            .flat_map(|i| register(&key, 10_000 + i).proposals.to_vec())
            .collect::<Vec<_>>()
            .into(),
    };
    group.bench_function("256_registrations", |b| {
        b.iter_batched(
            || base.clone(),
            |mut reg| reg.apply(&batch),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();

    // Apply one registration and encode the records it touched, as the state machine does
    // before writing them, with a small and an enterprise-sized policy loaded.
    let mut group = c.benchmark_group("register_and_store");
    for rules in [10usize, 1_000] {
        let (mut base, key) = registry_with(1_000);
        let policy = policy_with(rules);
        base.apply(&Request::single(
            Timestamp(1_700_000_000_000),
            Command::SetPolicy {
                policy: policy.clone(),
            },
        ));
        for tags in [vec![], vec!["tag:server".to_string()]] {
            let name = format!(
                "policy_{}_kib{}",
                policy.len() / 1024,
                if tags.is_empty() { "" } else { "_tag_asked" }
            );
            let request = register_asking(&key, 50_000, tags);
            group.bench_function(name, |b| {
                b.iter_batched(
                    || base.clone(),
                    |mut reg| {
                        let applied = reg.apply(&request);
                        let bytes: usize = applied
                            .records
                            .iter()
                            .filter_map(|r| reg.encode_record(r).1)
                            .map(|v| v.len())
                            .sum();
                        (reg, bytes)
                    },
                    criterion::BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

/// A policy with `rules` ACL rules over groups and hosts, in the shape large tailnets use.
fn policy_with(rules: usize) -> String {
    let groups: Vec<String> = (0..rules / 10 + 1)
        .map(|g| {
            let members: Vec<String> = (0..20)
                .map(|u| format!("\"user{g}-{u}@example.com\""))
                .collect();
            format!("\"group:team{g}\": [{}]", members.join(", "))
        })
        .collect();
    let hosts: Vec<String> = (0..rules)
        .map(|h| format!("\"host{h}\": \"10.{}.{}.0/24\"", h / 250, h % 250))
        .collect();
    let acls: Vec<String> = (0..rules)
        .map(|r| {
            format!(
                "{{\"action\": \"accept\", \"src\": [\"group:team{}\"], \"dst\": [\"host{r}:22,443,8000-8100\"]}}",
                r / 10
            )
        })
        .collect();
    format!(
        "{{\"groups\": {{{}}}, \"hosts\": {{{}}}, \"acls\": [{}]}}",
        groups.join(", "),
        hosts.join(", "),
        acls.join(", ")
    )
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Measures netmap building: a full map for one node in a tailnet of N nodes (what a
//! reconnecting client costs its member), the zstd framing of it, and one peer's JSON (the
//! unit of a delta, paid once per watching session per change).
//!
//! Run: `cargo bench --bench map_build`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hsd::control::ControlSettings;
use hsd::control::map::build::{MapContext, encode_frame};
use hsd::presence::Presence;
use hsd::registry::secrets::{self, SecretKind};
use hsd::registry::*;

fn tailnet(nodes: u32) -> Registry {
    let mut reg = Registry::new(ClusterSettings::default());
    let at = Timestamp(1_700_000_000_000);
    reg.apply(&Request::single(
        at,
        Command::CreateUser {
            name: "bench".into(),
        },
    ));
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
        let (prefix, hash) =
            secrets::parse(SecretKind::PreAuth, &secret.full).expect("generated key parses");
        let mut machine = [0u8; 32];
        machine[..4].copy_from_slice(&i.to_be_bytes());
        let mut node = machine;
        node[31] = 1;
        reg.apply(&Request::single(
            at,
            Command::RegisterNode {
                request: NodeRequest {
                    machine_key: MachineKey(machine),
                    node_key: NodeKey(node),
                    hostname: format!("host{i}"),
                    hostinfo: r#"{"Hostname":"h","OS":"linux","IPNVersion":"1.90.9"}"#.into(),
                    request_tags: vec![],
                    ephemeral: false,
                },
                auth: NodeAuth::PreAuthKey { prefix, hash },
                auto_approve: true,
                expiry: None,
            },
        ));
    }
    reg
}

fn settings() -> ControlSettings {
    ControlSettings {
        member_id: 1,
        server_url: "http://127.0.0.1:8080".into(),
        base_domain: "hsd.internal".into(),
        magic_dns: true,
        nameservers: vec![],
        search_domains: vec![],
        topology: tokio::sync::watch::channel(std::sync::Arc::new(
            hsd::control::Topology::default(),
        ))
        .1,
        auto_approve: true,
        node_key_expiry: None,
        registration_timeout: Duration::from_secs(60),
        ephemeral_inactivity_timeout: Duration::from_secs(60),
    }
}

fn bench(c: &mut Criterion) {
    let presence = Presence::new(1);
    let settings = settings();
    let mut group = c.benchmark_group("map");
    for size in [10u32, 100, 1000] {
        let view = tailnet(size);
        let me = view.nodes().next().expect("tailnet has nodes").clone();
        let ctx = MapContext {
            view: &view,
            presence: &presence,
            settings: &settings,
        };
        group.bench_with_input(BenchmarkId::new("full_map", size), &size, |b, _| {
            b.iter(|| ctx.full_map(&me))
        });
        group.bench_with_input(BenchmarkId::new("full_map_framed", size), &size, |b, _| {
            b.iter(|| encode_frame(&ctx.full_map(&me).0, true))
        });
        group.bench_with_input(BenchmarkId::new("peer_json", size), &size, |b, _| {
            b.iter(|| ctx.node_json(&me, false))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

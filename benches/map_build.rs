//! Measures netmap building for tailnets of 100, 1,000 and 10,000 nodes: the full netmap
//! of one node assembled from the hub's shared peer JSON and framed with zstd (what a
//! joining or reconnecting client costs its member; target ≤ 3 µs per peer at 1,000), and
//! one change as a delta (re-encoding the changed peer once and framing the shared delta:
//! paid once per change, whatever the number of receivers), plus what each receiver adds
//! (for a delta of one changed peer, and under a policy for one where a third of the
//! tailnet changes presence).
//!
//! Run: `cargo bench --bench map_build`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hsd::control::ControlSettings;
use std::collections::BTreeSet;
use std::sync::Arc;

use hsd::control::map::build::MapContext;
use hsd::control::map::full;
use hsd::control::map::hub::{ChangeSet, HubState};
use hsd::control::policy::Seen;
use hsd::presence::Presence;
use hsd::registry::secrets::{self, SecretKind};
use hsd::registry::*;

fn tailnet(nodes: u32) -> Registry {
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
        max_pending_registrations: 1000,
        max_hostinfo_bytes: 16 * 1024,
        http_header_timeout: Duration::from_secs(10),
        access: Default::default(),
    }
}

fn bench(c: &mut Criterion) {
    let presence = Presence::new(1);
    let settings = settings();
    let mut group = c.benchmark_group("map");
    group.sample_size(20);
    for size in [100u32, 1_000, 10_000] {
        let view = Arc::new(tailnet(size));
        let me = view.nodes().next().expect("tailnet has nodes").clone();
        let ctx = MapContext {
            view: &view,
            presence: &presence,
            settings: &settings,
        };
        let state = HubState::encode_all(&ctx, view.clone());
        group.bench_with_input(BenchmarkId::new("full_map_zstd", size), &size, |b, _| {
            b.iter(|| full::full_message(&ctx, &state, &me, true))
        });
        group.bench_with_input(BenchmarkId::new("full_map_json", size), &size, |b, _| {
            b.iter(|| full::full_message(&ctx, &state, &me, false))
        });
        let changed = view.nodes().nth(1).expect("two nodes").id;
        let changes = ChangeSet {
            nodes: BTreeSet::from([changed]),
            ..Default::default()
        };
        group.bench_with_input(BenchmarkId::new("delta_zstd", size), &size, |b, _| {
            b.iter(|| {
                let mut next = state.clone();
                let delta = next.advance(&ctx, view.clone(), &changes);
                delta.shared_frame(true, me.id, |_| true)
            })
        });
        let mut next = state.clone();
        let delta = next.advance(&ctx, view.clone(), &changes);
        delta.shared_frame(true, me.id, |_| true);
        group.bench_with_input(
            BenchmarkId::new("delta_per_receiver", size),
            &size,
            |b, _| {
                b.iter(|| {
                    let access = ctx.access();
                    delta.shared_frame(true, me.id, |peer| access.can_see(&me, peer))
                })
            },
        );
        // The same full netmap under a policy (every member may reach every other): each
        // peer is asked whether the viewer sees it, and how.
        let mut policed = (*view).clone();
        policed.apply(&Request::single(
            Timestamp(1_700_000_000_000),
            Command::SetPolicy {
                policy: MEMBERS_REACH_MEMBERS.into(),
            },
        ));
        let policed = Arc::new(policed);
        let ctx = MapContext {
            view: &policed,
            presence: &presence,
            settings: &settings,
        };
        ctx.keep_access();
        let state = HubState::encode_all(&ctx, policed.clone());
        group.bench_with_input(
            BenchmarkId::new("full_map_zstd_policy", size),
            &size,
            |b, _| b.iter(|| full::full_message(&ctx, &state, &me, true)),
        );
        // What each receiver adds to a delta under a policy when a third of the tailnet
        // changes presence (a member died): which of the news it may see, then the frame
        // the first receiver of its sight encoded.
        let changes = ChangeSet {
            presence: policed.nodes().step_by(3).map(|n| n.id).collect(),
            ..Default::default()
        };
        let delta = state.clone().advance(&ctx, policed.clone(), &changes);
        let access = ctx.access();
        group.bench_with_input(
            BenchmarkId::new("presence_third_per_receiver_policy", size),
            &size,
            |b, _| {
                b.iter(|| {
                    let viewer = access.viewer(&me);
                    delta.shared_frame(true, me.id, |peer| viewer.sees(peer) != Seen::Hidden)
                })
            },
        );
    }
    group.finish();
}

const MEMBERS_REACH_MEMBERS: &str = r#"{"acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}
]}"#;

criterion_group!(benches, bench);
criterion_main!(benches);

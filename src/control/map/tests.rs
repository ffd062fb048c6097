//! The hub and map sessions on paused tokio time: coalescing, keep-alives, the full-map
//! fallback of a stalled reader, and one shared frame per delta.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::build::Message;
use super::hub::DELTA_CHANNEL_CAPACITY;
use super::hub::MapHub;
use super::session::{KEEPALIVE_INTERVAL, Session, SessionDeps};
use crate::control::{ControlSettings, Topology};
use crate::presence::Presence;
use crate::raft::{AppliedBatch, RegistryFeed};
use crate::registry::secrets::{self, SecretKind};
use crate::registry::*;
use crate::telemetry::Metrics;

/// A registry fed by hand, as a member's state machine would feed it.
struct Feed {
    registry: Registry,
    key: String,
    view: watch::Sender<Arc<Registry>>,
    batches: broadcast::Sender<Arc<AppliedBatch>>,
    clock: i64,
}

impl Feed {
    fn new() -> Feed {
        let mut registry = Registry::new(ClusterSettings::default());
        let at = Timestamp(1_700_000_000_000);
        registry.apply(&Request::single(at, Command::create_user("u")));
        let (create_key, key) = new_preauth_key("u", true);
        registry.apply(&Request::single(at, create_key));
        let (view, _) = watch::channel(Arc::new(registry.clone()));
        let (batches, _) = broadcast::channel(64);
        Feed {
            registry,
            key,
            view,
            batches,
            clock: at.0,
        }
    }

    fn registry_feed(&self) -> RegistryFeed {
        RegistryFeed {
            view: self.view.subscribe(),
            batches: self.batches.clone(),
        }
    }

    /// Applies a command and publishes the view and its changes.
    fn apply(&mut self, command: Command) -> Outcome {
        self.clock += 1;
        let mut applied = self
            .registry
            .apply(&Request::single(Timestamp(self.clock), command));
        self.view.send_replace(Arc::new(self.registry.clone()));
        let _ = self.batches.send(Arc::new(AppliedBatch {
            last_applied: self.clock as u64,
            changes: applied.changes,
            full_resync: false,
        }));
        applied.outcomes.remove(0)
    }

    /// Registers machine `n` and tags it.
    fn register_tagged(&mut self, n: u32, host: &str, tag: &str) -> NodeId {
        let id = self.register(n, host);
        self.apply(Command::TagNode {
            id,
            tags: vec![tag.into()],
        });
        id
    }

    /// Sets a policy that lets `tag:ok` reach port 80 of `tag:srv`, and nothing else.
    fn with_ok_to_srv_policy(mut self) -> Feed {
        self.apply(Command::SetPolicy {
            policy: r#"{
                "tagOwners": {"tag:srv": ["u@"], "tag:ok": ["u@"]},
                "acls": [{"action": "accept", "src": ["tag:ok"], "dst": ["tag:srv:80"]}],
            }"#
            .into(),
        });
        self
    }

    /// Sets a policy under which every user's node reaches every other, and a node tagged
    /// `tag:iso` reaches and is reached by none.
    fn with_members_policy(mut self) -> Feed {
        self.apply(Command::SetPolicy {
            policy: r#"{
                "tagOwners": {"tag:iso": ["u@"]},
                "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]}],
            }"#
            .into(),
        });
        self
    }

    /// Registers machine `n` (its keys derive from `n`).
    fn register(&mut self, n: u32, host: &str) -> NodeId {
        self.register_with(n, host, format!("{{\"Hostname\":\"{host}\"}}"))
    }

    /// Registers machine `n` as a node of `user`, creating the user if needed.
    fn register_as(&mut self, user: &str, n: u32, host: &str) -> NodeId {
        if self.registry.user_by_name(user).is_none() {
            self.apply(Command::create_user(user));
        }
        let (create_key, key) = new_preauth_key(user, false);
        self.apply(create_key);
        let key = std::mem::replace(&mut self.key, key);
        let id = self.register(n, host);
        self.key = key;
        id
    }

    fn register_with(&mut self, n: u32, host: &str, hostinfo: String) -> NodeId {
        let (prefix, hash) = secrets::parse(SecretKind::PreAuth, &self.key).unwrap();
        let out = self.apply(Command::RegisterNode {
            request: node_request(n, host, hostinfo),
            auth: NodeAuth::PreAuthKey { prefix, hash },
            auto_approve: true,
            expiry: None,
        });
        match out {
            Outcome::Node(node) => node.id,
            other => panic!("{other:?}"),
        }
    }

    /// Registers machine `n` interactively, logged in at an OpenID provider as one person
    /// (whose user is made on the first login) with `display_name` and `email`.
    fn register_oidc(&mut self, n: u32, host: &str, display_name: &str, email: &str) -> NodeId {
        let auth_id = format!("oidc-{n}");
        self.apply(Command::BeginInteractive {
            auth_id: auth_id.clone(),
            request: node_request(n, host, format!("{{\"Hostname\":\"{host}\"}}")),
            ttl_ms: 60_000,
            max_pending: 1000,
        });
        let out = self.apply(Command::OidcLogin {
            auth_id,
            identity: OidcIdentity {
                issuer: "https://idp/".into(),
                subject: "s-1".into(),
                name: "olga".into(),
                display_name: display_name.into(),
                email: email.into(),
            },
            auto_approve: true,
            expiry: None,
        });
        match out {
            Outcome::Node(node) => node.id,
            other => panic!("{other:?}"),
        }
    }
}

/// What machine `n` asks to register as (its keys derive from `n`).
fn node_request(n: u32, host: &str, hostinfo: String) -> NodeRequest {
    let key = |kind: u8| {
        let mut key = [kind; 32];
        key[..4].copy_from_slice(&n.to_le_bytes());
        key
    };
    NodeRequest {
        machine_key: MachineKey(key(1)),
        node_key: NodeKey(key(2)),
        hostname: host.into(),
        hostinfo,
        request_tags: vec![],
        ephemeral: false,
    }
}

/// The command that creates a pre-auth key for `user`, and the key.
fn new_preauth_key(user: &str, reusable: bool) -> (Command, String) {
    let secret = secrets::generate(SecretKind::PreAuth);
    let command = Command::CreatePreAuthKey {
        user: user.into(),
        prefix: secret.prefix,
        hash: secret.hash,
        reusable,
        ephemeral: false,
        expiration: None,
        tags: vec![],
    };
    (command, secret.full)
}

fn settings() -> Arc<ControlSettings> {
    Arc::new(ControlSettings {
        member_id: 1,
        server_url: "http://127.0.0.1:8080".into(),
        base_domain: "hsd.internal".into(),
        magic_dns: true,
        nameservers: vec![],
        search_domains: vec![],
        topology: watch::channel(Arc::new(Topology::default())).1,
        auto_approve: true,
        node_key_expiry: None,
        registration_timeout: Duration::from_secs(60),
        ephemeral_inactivity_timeout: Duration::from_secs(60),
        max_pending_registrations: 1000,
        max_hostinfo_bytes: 16 * 1024,
        http_header_timeout: Duration::from_secs(10),
        access: Default::default(),
    })
}

/// A hub running on `feed`, and what sessions need.
struct Harness {
    deps: SessionDeps,
    stop: CancellationToken,
}

impl Harness {
    fn start(feed: &Feed) -> Harness {
        let presence = Presence::new(1);
        let settings = settings();
        let stop = CancellationToken::new();
        let (hub, handle) = MapHub::new(feed.registry_feed(), presence.clone(), settings.clone());
        tokio::spawn(hub.run(stop.clone()));
        Harness {
            deps: SessionDeps {
                view: feed.view.subscribe(),
                hub: handle,
                presence,
                settings,
                metrics: Arc::new(Metrics::new()),
                stop: stop.clone(),
                last_seen: None,
            },
            stop,
        }
    }

    /// A session's messages; reading one is what lets the session make it.
    fn session(&self, node: NodeId) -> BoxStream<'static, Message> {
        self.deps.presence.session_started(node);
        Session::new(self.deps.clone(), node, false)
            .into_stream()
            .boxed()
    }

    fn full_maps_sent(&self) -> u64 {
        self.deps
            .metrics
            .map_responses
            .with_label_values(&["full"])
            .get()
    }
}

fn decode(frame: &Bytes) -> Value {
    let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(frame.len(), 4 + len, "one message per frame");
    serde_json::from_slice(&frame[4..]).unwrap()
}

async fn next(rx: &mut BoxStream<'static, Message>) -> Value {
    decode(
        &rx.next()
            .await
            .expect("the session is streaming")
            .to_bytes(),
    )
}

fn peer_keys(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["Key"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_goes_out_as_one_delta() {
    let mut feed = Feed::new();
    let me = feed.register(1, "watcher");
    let h = Harness::start(&feed);
    let mut rx = h.session(me);
    let full = next(&mut rx).await;
    assert!(full["Peers"].as_array().unwrap().is_empty(), "{full}");

    let t0 = tokio::time::Instant::now();
    for (n, host) in [(2, "a"), (3, "b"), (4, "c")] {
        feed.register(n, host);
    }
    let delta = next(&mut rx).await;
    assert!(t0.elapsed() >= super::hub::GATHER_WINDOW);
    assert_eq!(peer_keys(&delta, "PeersChanged").len(), 3, "{delta}");
    assert!(delta.get("Peers").is_none(), "a delta, not a full map");
    // The next frame is the keep-alive: nothing else was sent for the burst.
    let keepalive = next(&mut rx).await;
    assert_eq!(keepalive["KeepAlive"], true, "{keepalive}");
    assert!(t0.elapsed() >= KEEPALIVE_INTERVAL);
    h.stop.cancel();
}

/// A user who owns no node is in nobody's netmap: creating or renaming one sends no one
/// anything, while renaming the owner of a node a client sees sends its new profile.
#[tokio::test(start_paused = true)]
async fn users_without_nodes_cost_clients_nothing() {
    let mut feed = Feed::new();
    let me = feed.register(1, "watcher");
    let h = Harness::start(&feed);
    let mut rx = h.session(me);
    next(&mut rx).await;

    let t0 = tokio::time::Instant::now();
    for n in 0..20 {
        feed.apply(Command::create_user(format!("nobody{n}")));
    }
    feed.apply(Command::RenameUser {
        old: "nobody0".into(),
        new: "still-nobody".into(),
    });
    let first = next(&mut rx).await;
    assert_eq!(first["KeepAlive"], true, "a delta went out: {first}");
    assert!(t0.elapsed() >= KEEPALIVE_INTERVAL);

    feed.apply(Command::RenameUser {
        old: "u".into(),
        new: "renamed".into(),
    });
    let delta = next(&mut rx).await;
    let names: Vec<&str> = (delta["UserProfiles"].as_array())
        .map(|p| p.iter().filter_map(|u| u["LoginName"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["renamed"], "{delta}");
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_change_after_a_quiet_spell_goes_out_soon_and_a_stream_of_changes_once_per_window() {
    use super::hub::{COALESCE_WINDOW, GATHER_WINDOW};
    use tokio::time::Instant;
    let mut feed = Feed::new();
    feed.register(1, "first");
    let h = Harness::start(&feed);
    let (mut deltas, _) = h.deps.hub.subscribe();
    tokio::time::sleep(COALESCE_WINDOW * 3).await;

    let t0 = Instant::now();
    let id = feed.register(2, "after-quiet");
    let delta = deltas.recv().await.unwrap();
    assert!(delta.touches(id));
    assert!(t0.elapsed() <= GATHER_WINDOW * 2, "{:?}", t0.elapsed());

    // One change every 10 ms for a second: at most one delta per window, none lost.
    let (start, changes) = (Instant::now(), 100u32);
    let (mut sent, mut seen) = (0, std::collections::BTreeSet::new());
    for n in 0..changes {
        feed.register(10 + n, &format!("s{n}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        while let Ok(d) = deltas.try_recv() {
            sent += 1;
            seen.extend(d.upserted.iter().map(|p| p.node.id));
        }
    }
    while seen.len() < changes as usize {
        let d = deltas.recv().await.unwrap();
        sent += 1;
        seen.extend(d.upserted.iter().map(|p| p.node.id));
    }
    let ticks = start.elapsed().as_millis() / COALESCE_WINDOW.as_millis() + 1;
    assert!(sent as u128 <= ticks, "{sent} deltas in {ticks} windows");
    assert!(
        sent >= 5,
        "the stream went out in ticks, not at its end ({sent} deltas)"
    );
    h.stop.cancel();
}

/// Sessions still working through the last delta hold the next tick back, so the changes
/// meanwhile go out together. (Sessions that stopped taking deltas do not: see the test
/// above, whose receiver never takes one.)
#[tokio::test(start_paused = true)]
async fn a_tick_waits_while_sessions_are_still_taking_the_last_delta() {
    let mut feed = Feed::new();
    feed.register(1, "first");
    let h = Harness::start(&feed);
    // Fifty sessions on a member short of CPU: they take each delta one after another,
    // 6 ms apart.
    let mut receivers: Vec<_> = (0..50).map(|_| h.deps.hub.subscribe().0).collect();
    let (tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(delta) = receivers[0].recv().await {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(6)).await;
                delta.taken();
            }
            if tx.send(delta).is_err() {
                return;
            }
        }
    });
    // One change every 10 ms for a second.
    let changes = 100u32;
    for n in 0..changes {
        feed.register(10 + n, &format!("s{n}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut deltas, mut seen) = (0, std::collections::BTreeSet::new());
    while seen.len() < changes as usize {
        let delta = taken.recv().await.unwrap();
        deltas += 1;
        seen.extend(delta.upserted.iter().map(|p| p.node.id));
    }
    // Ticks every 100 ms would take ten deltas; each waits about 300 ms here.
    assert!(deltas <= 6, "{deltas} deltas for a second of changes");
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_gets_a_keepalive_about_every_fifty_seconds() {
    let mut feed = Feed::new();
    let me = feed.register(1, "quiet");
    let h = Harness::start(&feed);
    let mut rx = h.session(me);
    let t0 = tokio::time::Instant::now();
    next(&mut rx).await;
    for _ in 0..3 {
        let v = next(&mut rx).await;
        assert_eq!(v, serde_json::json!({ "KeepAlive": true }));
    }
    let elapsed = t0.elapsed();
    // 50 s each, plus up to 9 s of jitter after the first; the client gives up after 120 s.
    assert!(elapsed >= KEEPALIVE_INTERVAL * 3, "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3 * 60), "{elapsed:?}");
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_node_that_just_registered_gets_its_first_netmap_from_the_hubs_next_tick() {
    use super::hub::GATHER_WINDOW;
    let mut feed = Feed::new();
    let first = feed.register(1, "first");
    let h = Harness::start(&feed);
    let mut watcher = h.session(first);
    next(&mut watcher).await;

    // Registered, and streaming at once: before the hub's tick that adds the node.
    let t0 = tokio::time::Instant::now();
    let newcomer = feed.register(2, "newcomer");
    assert!(h.deps.hub.current().view.node(newcomer).is_none());
    let mut rx = h.session(newcomer);
    let full = next(&mut rx).await;
    assert!(
        t0.elapsed() >= GATHER_WINDOW,
        "answered from the member's latest view, not the hub's tick"
    );
    assert!(h.deps.hub.current().view.node(newcomer).is_some());
    assert_eq!(peer_keys(&full, "Peers").len(), 1, "{full}");
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_hub_that_falls_behind_delays_a_new_nodes_first_netmap_by_a_second_at_most() {
    use super::hub::HUB_HOLD_WAIT;
    let mut feed = Feed::new();
    feed.register(1, "first");
    let mut h = Harness::start(&feed);
    // A hub that never ticks again: its state will not hold the newcomer.
    let (_stalled, handle) = MapHub::new(feed.registry_feed(), h.deps.presence.clone(), settings());
    h.deps.hub = handle;
    let t0 = tokio::time::Instant::now();
    let newcomer = feed.register(2, "newcomer");
    let mut rx = h.session(newcomer);
    let full = next(&mut rx).await;
    let waited = t0.elapsed();
    assert!(
        waited >= HUB_HOLD_WAIT && waited < HUB_HOLD_WAIT + Duration::from_millis(100),
        "waited {waited:?}"
    );
    // From the member's latest view: the peer is there.
    assert_eq!(peer_keys(&full, "Peers").len(), 1, "{full}");
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_is_owed_one_full_map_not_one_per_tick() {
    let mut feed = Feed::new();
    let me = feed.register(1, "slow");
    let h = Harness::start(&feed);
    let mut rx = h.session(me);
    assert!(next(&mut rx).await.get("Peers").is_some());
    // The client reads nothing while more deltas pass than the hub's ring holds.
    let changes = DELTA_CHANNEL_CAPACITY + 10;
    for i in 0..changes {
        feed.register(10 + i as u32, &format!("p{i}"));
        tokio::time::sleep(super::hub::COALESCE_WINDOW * 2).await;
    }
    assert_eq!(
        h.full_maps_sent(),
        1,
        "nothing was built for the stalled client"
    );
    // When it reads again it gets one full netmap with every peer...
    let resync = next(&mut rx).await;
    assert_eq!(
        resync["Peers"].as_array().map(Vec::len),
        Some(changes),
        "{resync}"
    );
    assert_eq!(h.full_maps_sent(), 2);
    // ...and then it is current: the next message is a keep-alive, not old deltas.
    assert_eq!(next(&mut rx).await["KeepAlive"], true);
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn full_netmaps_go_out_in_turn_and_a_stalled_turn_holds_no_one_for_long() {
    use super::hub::{FULL_MAP_WAIT, full_map_turns};
    let mut feed = Feed::new();
    let turns = full_map_turns();
    let nodes: Vec<NodeId> = (0..=turns as u32)
        .map(|i| feed.register(1 + i, &format!("n{i}")))
        .collect();
    let h = Harness::start(&feed);
    // Every turn is taken by a session whose netmap HTTP/2 has not finished taking.
    let mut holders = Vec::new();
    for node in &nodes[..turns] {
        let mut rx = h.session(*node);
        assert!(next(&mut rx).await.get("Peers").is_some());
        holders.push(rx);
    }
    let mut late = h.session(nodes[turns]);
    let early = tokio::time::timeout(FULL_MAP_WAIT / 2, next(&mut late)).await;
    assert!(early.is_err(), "a netmap went out with every turn taken");
    assert_eq!(h.deps.metrics.full_map_waiting.get(), 1);
    // One holder is asked for its next message: its netmap is all taken, its turn ends.
    let _ = tokio::time::timeout(Duration::from_millis(1), holders[0].next()).await;
    let netmap = tokio::time::timeout(Duration::from_millis(1), next(&mut late))
        .await
        .expect("the freed turn goes to the waiting session at once");
    assert!(netmap.get("Peers").is_some());

    // A client that leaves while it waits is no longer counted as waiting.
    let mut gone = h.session(nodes[1]);
    let _ = tokio::time::timeout(Duration::from_millis(1), gone.next()).await;
    assert_eq!(h.deps.metrics.full_map_waiting.get(), 1);
    drop(gone);
    assert_eq!(h.deps.metrics.full_map_waiting.get(), 0);

    // Every turn is held again (the late session has the freed one) and none ends: a
    // newcomer waits for the bound, no longer.
    let mut newcomer = h.session(nodes[0]);
    let started = tokio::time::Instant::now();
    assert!(next(&mut newcomer).await.get("Peers").is_some());
    let waited = started.elapsed();
    assert!(
        waited >= FULL_MAP_WAIT - Duration::from_millis(10)
            && waited < FULL_MAP_WAIT + Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!(h.deps.metrics.full_map_turns_skipped.get(), 1);
    assert_eq!(h.deps.metrics.full_map_waiting.get(), 0);
    h.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn receivers_share_one_frame_and_a_changed_node_gets_its_own() {
    let mut feed = Feed::new();
    let a = feed.register(1, "a");
    let b = feed.register(2, "b");
    let c = feed.register(3, "c");
    let h = Harness::start(&feed);
    let mut rx_a = h.session(a);
    let mut rx_b = h.session(b);
    let mut rx_c = h.session(c);
    for rx in [&mut rx_a, &mut rx_b, &mut rx_c] {
        next(rx).await;
    }
    // Online changes of the three sessions arrive as one delta for each.
    for rx in [&mut rx_a, &mut rx_b, &mut rx_c] {
        rx.next().await.unwrap();
    }
    feed.apply(Command::RenameNode {
        id: c,
        name: "renamed".into(),
    });
    let frame_a = rx_a.next().await.unwrap().to_bytes();
    let frame_b = rx_b.next().await.unwrap().to_bytes();
    assert_eq!(
        frame_a.as_ptr(),
        frame_b.as_ptr(),
        "a and b see the same delta: one encoding, shared"
    );
    let for_a = decode(&frame_a);
    assert!(
        for_a["PeersChanged"][0]["Name"]
            .as_str()
            .unwrap()
            .starts_with("renamed.")
    );
    assert!(for_a.get("Node").is_none());
    let for_c = next(&mut rx_c).await;
    assert!(
        for_c["Node"]["Name"]
            .as_str()
            .unwrap()
            .starts_with("renamed."),
        "the renamed node gets its own new self: {for_c}"
    );
    assert!(for_c.get("PeersChanged").is_none(), "{for_c}");
    // A change to c's record that leaves its own JSON as it was (the same name again) does
    // not resend c its self; the next news c gets is about a peer only.
    feed.apply(Command::RenameNode {
        id: c,
        name: "renamed".into(),
    });
    feed.apply(Command::RenameNode {
        id: a,
        name: "a2".into(),
    });
    let for_c = next(&mut rx_c).await;
    assert!(
        for_c.get("Node").is_none(),
        "self resent unchanged: {for_c}"
    );
    assert!(
        for_c["PeersChanged"][0]["Name"]
            .as_str()
            .unwrap()
            .starts_with("a2."),
        "{for_c}"
    );
    h.stop.cancel();
}

/// Under a policy, receivers that see the same part of a delta share one encoding of it,
/// and a receiver that sees another part gets its own, with the peers it may not see
/// removed.
#[tokio::test(start_paused = true)]
async fn receivers_that_see_the_same_part_of_a_delta_share_one_frame() {
    let mut feed = Feed::new();
    feed.apply(Command::SetPolicy {
        policy: r#"{
            "tagOwners": {"tag:a": ["u@"], "tag:b": ["u@"], "tag:srv": ["u@"]},
            "acls": [
                {"action": "accept", "src": ["tag:a"], "dst": ["tag:srv:80"]},
                {"action": "accept", "src": ["tag:b"], "dst": ["tag:b:80"]},
            ],
        }"#
        .into(),
    });
    let srv = feed.register_tagged(1, "srv", "tag:srv");
    let a1 = feed.register_tagged(2, "a1", "tag:a");
    let a2 = feed.register_tagged(3, "a2", "tag:a");
    let b1 = feed.register_tagged(4, "b1", "tag:b");
    let b2 = feed.register_tagged(5, "b2", "tag:b");
    let h = Harness::start(&feed);
    let mut rx_a1 = h.session(a1);
    let mut rx_a2 = h.session(a2);
    let mut rx_b1 = h.session(b1);
    for rx in [&mut rx_a1, &mut rx_a2, &mut rx_b1] {
        next(rx).await;
    }
    for rx in [&mut rx_a1, &mut rx_a2, &mut rx_b1] {
        rx.next().await.unwrap();
    }
    // One tick changes a peer the a-nodes see and one only b1 sees.
    for (id, name) in [(srv, "srv-new"), (b2, "b2-new")] {
        feed.apply(Command::RenameNode {
            id,
            name: name.into(),
        });
    }
    let frame_a1 = rx_a1.next().await.unwrap().to_bytes();
    let frame_a2 = rx_a2.next().await.unwrap().to_bytes();
    assert_eq!(
        frame_a1.as_ptr(),
        frame_a2.as_ptr(),
        "a1 and a2 see the same part: one encoding, shared"
    );
    let for_a = decode(&frame_a1);
    assert_eq!(for_a["PeersChanged"][0]["ID"], srv.0, "{for_a}");
    assert_eq!(for_a["PeersChanged"].as_array().unwrap().len(), 1);
    assert_eq!(for_a["PeersRemoved"], serde_json::json!([b2.0]), "{for_a}");
    let frame_b1 = rx_b1.next().await.unwrap().to_bytes();
    assert_ne!(frame_b1.as_ptr(), frame_a1.as_ptr());
    let for_b = decode(&frame_b1);
    assert_eq!(for_b["PeersChanged"][0]["ID"], b2.0, "{for_b}");
    assert_eq!(for_b["PeersChanged"].as_array().unwrap().len(), 1);
    assert_eq!(for_b["PeersRemoved"], serde_json::json!([srv.0]), "{for_b}");
    h.stop.cancel();
}

/// Once a newer delta goes out, an older one keeps no shared frames: the ring of recent
/// deltas is there for a few laggards, which encode their own.
#[tokio::test(start_paused = true)]
async fn a_superseded_delta_keeps_no_shared_frames() {
    let mut feed = Feed::new();
    let a = feed.register(1, "a");
    let h = Harness::start(&feed);
    let (mut deltas, _) = h.deps.hub.subscribe();
    // Both frames held while compared: a freed one's address may be reused.
    let shared = |delta: &super::hub::Delta| {
        let frame = |_| {
            delta
                .shared_frame(false, NodeId(0), |_| true)
                .expect("a rename is news")
        };
        let (x, y): (Bytes, Bytes) = (frame(()), frame(()));
        x.as_ptr() == y.as_ptr()
    };
    feed.apply(Command::RenameNode {
        id: a,
        name: "a1".into(),
    });
    let first = deltas.recv().await.unwrap();
    first.taken();
    assert!(shared(&first), "not shared while current");
    feed.apply(Command::RenameNode {
        id: a,
        name: "a2".into(),
    });
    deltas.recv().await.unwrap();
    assert!(!shared(&first), "kept after a newer delta");
    h.stop.cancel();
}

#[test]
fn a_netmap_assembled_from_shared_blocks_equals_one_encoded_for_the_node() {
    let mut feed = Feed::new();
    let mut ids = Vec::new();
    // Enough nodes for three blocks, the watcher in the middle one.
    for i in 0..600u32 {
        let (prefix, hash) = secrets::parse(SecretKind::PreAuth, &feed.key).unwrap();
        let mut machine = [0u8; 32];
        machine[..4].copy_from_slice(&i.to_be_bytes());
        let mut node_key = machine;
        node_key[31] = 1;
        let out = feed.apply(Command::RegisterNode {
            request: NodeRequest {
                machine_key: MachineKey(machine),
                node_key: NodeKey(node_key),
                hostname: format!("h{i}"),
                hostinfo: "{}".into(),
                request_tags: vec![],
                ephemeral: false,
            },
            auth: NodeAuth::PreAuthKey { prefix, hash },
            auto_approve: i % 7 != 0, // some unapproved nodes: seen by no one
            expiry: None,
        });
        let Outcome::Node(node) = out else { panic!() };
        ids.push(node.id);
    }
    let view = feed.view.borrow().clone();
    let presence = Presence::new(1);
    let settings = settings();
    let ctx = super::build::MapContext {
        view: &view,
        presence: &presence,
        settings: &settings,
    };
    let state = super::hub::HubState::encode_all(&ctx, view.clone());
    let me = view.node(ids[300]).unwrap().clone();
    let assembled = super::full::full_message(&ctx, &state, &me, true).to_bytes();
    let len = u32::from_le_bytes(assembled[..4].try_into().unwrap()) as usize;
    assert_eq!(assembled.len(), 4 + len);
    let json = zstd::stream::decode_all(&assembled[4..]).expect("concatenated zstd frames");
    let assembled: Value = serde_json::from_slice(&json).expect("one JSON document");
    let direct: Value =
        serde_json::from_slice(&serde_json::to_vec(&ctx.full_map_now(&me)).unwrap()).unwrap();
    let ids_of = |v: &Value| {
        let mut ids: Vec<u64> = v["Peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["ID"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(ids_of(&assembled), ids_of(&direct));
    assert!(
        !ids_of(&assembled).contains(&me.id.0),
        "a node is not its own peer"
    );
    let approved = view.nodes().filter(|n| n.approved).count();
    assert_eq!(ids_of(&assembled).len(), approved - 1);
    for field in [
        "Node",
        "DERPMap",
        "DNSConfig",
        "PacketFilters",
        "UserProfiles",
        "Debug",
    ] {
        assert_eq!(assembled[field], direct[field], "{field}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_changed_and_online_in_one_tick_is_sent_once() {
    let mut feed = Feed::new();
    let me = feed.register(1, "watcher");
    let h = Harness::start(&feed);
    let mut rx = h.session(me);
    next(&mut rx).await;
    // Its record and its presence change within one coalescing window.
    let other = feed.register(2, "both");
    h.deps.presence.session_started(other);
    let delta = next(&mut rx).await;
    assert_eq!(peer_keys(&delta, "PeersChanged").len(), 1, "{delta}");
    h.stop.cancel();
}

/// Under a policy, a node learns nothing of a node it may not reach: not its online state,
/// not its endpoints, not its owner's name.
#[tokio::test(start_paused = true)]
async fn presence_and_profiles_reach_only_receivers_that_see_the_node() {
    let mut feed = Feed::new().with_members_policy();
    let a = feed.register(1, "a");
    let b = feed.register_as("v", 2, "b");
    let b_user = feed.registry.node(b).unwrap().user.0;
    let iso = feed.register_tagged(3, "iso", "tag:iso");
    let e = feed.register_as("w", 4, "e");
    let h = Harness::start(&feed);
    let mut rx_a = h.session(a);
    let mut rx_iso = h.session(iso);
    let mut rx_e = h.session(e);
    assert_eq!(peer_keys(&next(&mut rx_a).await, "Peers").len(), 2);
    assert_eq!(next(&mut rx_iso).await["Peers"], serde_json::json!([]));
    next(&mut rx_e).await;
    // What the isolated node gets up to its own rename: no news of b. (`dropped`: a message
    // that only tells it to drop b, as when a user of the policy's changes.)
    let iso_hears_nothing_of_b =
        async |rx: &mut BoxStream<'static, Message>, feed: &mut Feed, name: &str, dropped: bool| {
            feed.apply(Command::RenameNode {
                id: iso,
                name: name.into(),
            });
            let mut delta = next(rx).await;
            if dropped {
                assert_eq!(delta, serde_json::json!({"PeersRemoved": [b.0]}));
                delta = next(rx).await;
            }
            assert_eq!(
                delta["Node"]["Name"].as_str().unwrap().split('.').next(),
                Some(name),
                "news of b first: {delta}"
            );
            let profiles = delta["UserProfiles"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                profiles.iter().all(|p| p["ID"] != b_user),
                "v's profile: {delta}"
            );
            assert!(delta.get("PeersRemoved").is_none(), "{delta}");
        };

    // b comes online: a sees it, the isolated node must not hear of it.
    h.deps.presence.session_started(b);
    let delta = until(&mut rx_a, |d| d.get("OnlineChange").is_some()).await;
    assert_eq!(delta["OnlineChange"][b.0.to_string()], true, "{delta}");
    assert_eq!(delta["PeersChangedPatch"][0]["NodeID"], b.0, "{delta}");
    iso_hears_nothing_of_b(&mut rx_iso, &mut feed, "iso1", false).await;

    // b's user is renamed: a gets the new profile, the isolated node does not.
    feed.apply(Command::RenameUser {
        old: "v".into(),
        new: "v2".into(),
    });
    let delta = until(&mut rx_a, |d| d.get("UserProfiles").is_some()).await;
    assert_eq!(delta["UserProfiles"][0]["LoginName"], "v2", "{delta}");
    iso_hears_nothing_of_b(&mut rx_iso, &mut feed, "iso2", true).await;

    // A node joins that the isolated node may not see: it hears nothing, not even its id.
    let b2 = feed.register_as("v2", 5, "b2");
    let b2_key = feed.registry.node(b2).unwrap().node_key.to_text();
    until(&mut rx_a, |d| {
        peer_keys(d, "PeersChanged") == [b2_key.clone()]
    })
    .await;
    iso_hears_nothing_of_b(&mut rx_iso, &mut feed, "iso3", false).await;

    // e's own user is renamed: e, which sees no other node of its user, gets the profile.
    feed.apply(Command::RenameUser {
        old: "w".into(),
        new: "w2".into(),
    });
    let renamed = |d: &Value| {
        (d["UserProfiles"].as_array().into_iter().flatten()).any(|p| p["LoginName"] == "w2")
    };
    until(&mut rx_e, renamed).await;
    h.stop.cancel();
}

/// A user whose display name changes keeps the policy's answers (a policy names users by
/// name or email), so nobody is sent their nodes again; a new email may change them.
#[tokio::test(start_paused = true)]
async fn only_a_users_name_or_email_sends_their_nodes_again() {
    let mut feed = Feed::new().with_members_policy();
    let iso = feed.register_tagged(1, "iso", "tag:iso");
    let b = feed.register_oidc(2, "b", "Olga", "olga@example.com");
    let h = Harness::start(&feed);
    let mut rx = h.session(iso);
    next(&mut rx).await;
    // A second login refreshes the display name (and adds a node the isolated one cannot
    // see, which it is not told of).
    feed.register_oidc(3, "c", "Olga L.", "olga@example.com");
    feed.apply(Command::RenameNode {
        id: iso,
        name: "iso1".into(),
    });
    let delta = next(&mut rx).await;
    assert!(
        delta.get("PeersRemoved").is_none(),
        "b went out again: {delta}"
    );
    assert!(delta.get("Node").is_some(), "{delta}");
    // A new email does send b again: the isolated node is told to drop it.
    feed.register_oidc(4, "d", "Olga L.", "olga@example.org");
    let delta = next(&mut rx).await;
    assert!(
        delta["PeersRemoved"]
            .as_array()
            .unwrap()
            .contains(&b.0.into()),
        "{delta}"
    );
    h.stop.cancel();
}

/// A renamed user's profile reaches the user's own node, even where no other node of the
/// user is in its netmap.
#[tokio::test(start_paused = true)]
async fn a_renamed_users_profile_reaches_its_only_node() {
    let mut feed = Feed::new();
    let a = feed.register(1, "a");
    feed.register_as("v", 2, "b");
    let h = Harness::start(&feed);
    let mut rx = h.session(a);
    next(&mut rx).await;
    feed.apply(Command::RenameUser {
        old: "u".into(),
        new: "u2".into(),
    });
    let delta = next(&mut rx).await;
    assert_eq!(delta["UserProfiles"][0]["LoginName"], "u2", "{delta}");
    assert_eq!(delta["UserProfiles"].as_array().unwrap().len(), 1);
    h.stop.cancel();
}

/// Whether a client that got `message` must no longer hold `peer`: a full netmap
/// without it, or a delta that drops it.
fn drops(message: &Value, peer: NodeId) -> bool {
    match message.get("Peers") {
        Some(peers) => peers.as_array().unwrap().iter().all(|p| p["ID"] != peer.0),
        None => message["PeersRemoved"]
            .as_array()
            .is_some_and(|r| r.contains(&peer.0.into())),
    }
}

/// A change that takes a node out of another's sight reaches both: the one that may no
/// longer see drops the other, whichever of the two changed — a node tagged out of the
/// rules that let it see, or a user renamed out of the rules that name it.
#[tokio::test(start_paused = true)]
async fn a_node_or_user_changed_out_of_sight_is_dropped_on_both_sides() {
    let mut feed = Feed::new();
    feed.apply(Command::SetPolicy {
        policy: r#"{
            "tagOwners": {"tag:iso": ["u@"]},
            "acls": [{"action": "accept", "src": ["u@"], "dst": ["v@:*"]}],
        }"#
        .into(),
    });
    let a = feed.register(1, "a");
    let a2 = feed.register(2, "a2");
    let b = feed.register_as("v", 3, "b");
    let h = Harness::start(&feed);
    let mut rx_a = h.session(a);
    let mut rx_b = h.session(b);
    assert_eq!(peer_keys(&next(&mut rx_a).await, "Peers").len(), 1);
    assert_eq!(peer_keys(&next(&mut rx_b).await, "Peers").len(), 2);

    // a is tagged: it is no longer u's, so neither a nor b may see the other.
    feed.apply(Command::TagNode {
        id: a,
        tags: vec!["tag:iso".into()],
    });
    let for_a = until(&mut rx_a, |d| d.get("Node").is_some()).await;
    assert!(drops(&for_a, b), "a still holds b: {for_a}");
    let for_b = until(&mut rx_b, |d| {
        d.get("PeersRemoved").is_some() || d.get("Peers").is_some()
    })
    .await;
    assert!(drops(&for_b, a), "b still holds a: {for_b}");

    // b's user is renamed: the policy's `v@` names no one, so a2 and b part too.
    let mut rx_a2 = h.session(a2);
    assert_eq!(peer_keys(&next(&mut rx_a2).await, "Peers").len(), 1);
    feed.apply(Command::RenameUser {
        old: "v".into(),
        new: "v2".into(),
    });
    let for_a2 = until(&mut rx_a2, |d| {
        d.get("PeersRemoved").is_some() || d.get("Peers").is_some()
    })
    .await;
    assert!(drops(&for_a2, b), "a2 still holds b: {for_a2}");
    let for_b = until(&mut rx_b, |d| {
        d.get("PeersRemoved").is_some() || d.get("Peers").is_some()
    })
    .await;
    assert!(drops(&for_b, a2), "b still holds a2: {for_b}");
    h.stop.cancel();
}

/// The first of the next few messages that `wanted` picks.
async fn until(rx: &mut BoxStream<'static, Message>, wanted: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Vec::new();
    for _ in 0..8 {
        let message = next(rx).await;
        if wanted(&message) {
            return message;
        }
        seen.push(message);
    }
    panic!("not among the next 8 messages: {seen:?}");
}

/// A packet filter as a client holds it: named chunks, merged from each response's
/// `PacketFilters` (`null` drops a name, `"*": null` drops them all).
#[derive(Default)]
struct HeldFilter(std::collections::BTreeMap<String, Value>);

impl HeldFilter {
    fn apply(&mut self, response: &Value) {
        let Some(named) = response["PacketFilters"].as_object() else {
            return;
        };
        if named.get("*").is_some_and(Value::is_null) {
            self.0.clear();
        }
        for (name, rules) in named.iter().filter(|(name, _)| *name != "*") {
            if rules.is_null() {
                self.0.remove(name);
            } else {
                self.0.insert(name.clone(), rules.clone());
            }
        }
    }

    fn of(response: &Value) -> HeldFilter {
        let mut held = HeldFilter::default();
        held.apply(response);
        held
    }

    fn rules(&self) -> Vec<Value> {
        self.0
            .values()
            .flat_map(|rules| rules.as_array().expect("a list of rules").clone())
            .collect()
    }

    /// Every rule's sources, sorted.
    fn sources(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .rules()
            .iter()
            .flat_map(|r| r["SrcIPs"].as_array().unwrap().clone())
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        all.sort();
        all
    }
}

/// The session's next frame that changes its packet filter.
async fn next_filter_change(rx: &mut BoxStream<'static, Message>) -> Value {
    loop {
        let frame = next(rx).await;
        if frame.get("PacketFilters").is_some() {
            return frame;
        }
    }
}

fn addresses(feed: &Feed, id: NodeId) -> Vec<String> {
    let node = feed.registry.node(id).unwrap();
    vec![
        node.ipv4.unwrap().to_string(),
        node.ipv6.unwrap().to_string(),
    ]
}

/// Under a policy a node's netmap holds only the peers it may talk to, with a packet
/// filter that admits exactly the policy's sources; a node joining a source group reaches
/// running sessions as a delta carrying the new filter, and nodes outside the policy see
/// no one.
#[tokio::test(start_paused = true)]
async fn a_policy_shapes_netmaps_and_filters_and_follows_changes() {
    let mut feed = Feed::new().with_ok_to_srv_policy();
    let srv = feed.register_tagged(1, "srv", "tag:srv");
    let ok = feed.register_tagged(2, "ok", "tag:ok");
    let other = feed.register(3, "other");
    let h = Harness::start(&feed);

    let mut srv_rx = h.session(srv);
    let full = next(&mut srv_rx).await;
    let peers = full["Peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{full}");
    assert_eq!(peers[0]["ID"], ok.0);
    let mut held = HeldFilter::of(&full);
    assert_eq!(held.sources(), addresses(&feed, ok));
    assert_eq!(
        held.rules()[0]["DstPorts"][0]["Ports"],
        serde_json::json!({"First": 80, "Last": 80})
    );

    let mut other_rx = h.session(other);
    let lonely = next(&mut other_rx).await;
    assert_eq!(lonely["Peers"], serde_json::json!([]), "{lonely}");
    assert_eq!(lonely["PacketFilters"], serde_json::json!({"*": null}));

    let ok2 = feed.register_tagged(4, "ok2", "tag:ok");
    let mut delta = next(&mut srv_rx).await;
    while delta.get("PacketFilters").is_none() {
        assert!(
            delta.get("Peers").is_none(),
            "a delta, not a full map: {delta}"
        );
        delta = next(&mut srv_rx).await;
    }
    held.apply(&delta);
    let mut want = addresses(&feed, ok);
    want.extend(addresses(&feed, ok2));
    want.sort();
    assert_eq!(held.sources(), want, "{delta}");
    h.stop.cancel();
}

/// A node joining a large group changes a chunk per address in each filter that names the
/// group: the delta carries those, and the filter the client then holds is the whole one.
#[tokio::test(start_paused = true)]
async fn a_filter_changes_by_the_chunk_a_new_source_falls_in() {
    let mut feed = Feed::new().with_ok_to_srv_policy();
    let srv = feed.register_tagged(1, "srv", "tag:srv");
    // Every other node is a source, so addresses do not merge into ranges.
    let mut sources = Vec::new();
    for i in 0..600u32 {
        let id = feed.register_tagged(2 * i + 2, &format!("ok{i}"), "tag:ok");
        sources.extend(addresses(&feed, id));
        feed.register(2 * i + 3, &format!("other{i}"));
    }
    let h = Harness::start(&feed);
    let mut rx = h.session(srv);
    let full = next(&mut rx).await;
    let mut held = HeldFilter::of(&full);
    sources.sort();
    assert_eq!(held.sources(), sources);
    assert!(held.0.len() > 1, "1,200 sources go out in several chunks");

    let joined = feed.register_tagged(5000, "ok-new", "tag:ok");
    let delta = next_filter_change(&mut rx).await;
    assert!(delta.get("Peers").is_none(), "a delta, not a full map");
    let chunks = delta["PacketFilters"].as_object().unwrap();
    let new_addresses = addresses(&feed, joined);
    assert!(
        chunks.len() <= new_addresses.len(),
        "at most a chunk per new address changed: {chunks:?}"
    );
    let sent = HeldFilter::of(&delta).sources().len();
    assert!(
        sent < sources.len() / 2,
        "{sent} of {} sources resent",
        sources.len()
    );
    held.apply(&delta);
    let before_join = sources.clone();
    sources.extend(new_addresses);
    sources.sort();
    assert_eq!(held.sources(), sources);

    // Its leaving drops those addresses again (in the chunks they were in).
    feed.apply(Command::DeleteNode { id: joined });
    let delta = next_filter_change(&mut rx).await;
    held.apply(&delta);
    assert_eq!(held.sources(), before_join);
    h.stop.cancel();
}

/// Without a policy every approved node may reach every port of every other.
#[tokio::test(start_paused = true)]
async fn without_a_policy_everyone_reaches_everyone() {
    let mut feed = Feed::new();
    let me = feed.register(1, "one");
    feed.register(2, "two");
    let h = Harness::start(&feed);
    let mut rx = h.session(me);
    let full = next(&mut rx).await;
    assert_eq!(full["Peers"].as_array().unwrap().len(), 1, "{full}");
    assert_eq!(
        full["PacketFilters"],
        serde_json::json!({"*": null, "base": [{
            "SrcIPs": ["*"],
            "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}],
        }]})
    );
    h.stop.cancel();
}

/// The routes a netmap gives a peer (its `AllowedIPs` beyond its own addresses) and its
/// `PrimaryRoutes`, by node id.
fn peer_routes(map: &Value, id: NodeId) -> (Vec<String>, Vec<String>) {
    let peer = map["Peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ID"] == id.0)
        .unwrap_or_else(|| panic!("peer {id} in {map}"));
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let routes = strings(&peer["AllowedIPs"])
        .into_iter()
        .filter(|r| !r.ends_with("/32") && !r.ends_with("/128"))
        .collect();
    (routes, strings(&peer["PrimaryRoutes"]))
}

/// Two online routers of one approved route: the first registered is primary on the
/// viewer's netmap (its `AllowedIPs` and `PrimaryRoutes` carry the route, the standby's do
/// not); when it goes offline the viewer gets a netmap with the other as primary; when it
/// comes back, the other keeps the role.
#[tokio::test(start_paused = true)]
async fn ha_routers_fail_over_when_the_primary_goes_offline() {
    let mut feed = Feed::new();
    let router = |host: &str| format!(r#"{{"Hostname":"{host}","RoutableIPs":["10.8.0.0/24"]}}"#);
    let a = feed.register_with(1, "ra", router("ra"));
    let b = feed.register_with(2, "rb", router("rb"));
    let viewer = feed.register(3, "viewer");
    for id in [a, b] {
        feed.apply(Command::ApproveRoutes {
            id,
            routes: vec!["10.8.0.0/24".parse().unwrap()],
        });
    }
    let h = Harness::start(&feed);
    h.deps.presence.session_started(a);
    h.deps.presence.session_started(b);
    let mut rx = h.session(viewer);
    let full = next(&mut rx).await;
    let route = vec!["10.8.0.0/24".to_string()];
    assert_eq!(
        peer_routes(&full, a),
        (route.clone(), route.clone()),
        "{full}"
    );
    assert_eq!(peer_routes(&full, b), (vec![], vec![]), "{full}");

    h.deps.presence.session_ended(a);
    let mut map = next(&mut rx).await;
    while map.get("Peers").is_none() {
        map = next(&mut rx).await;
    }
    assert_eq!(
        peer_routes(&map, b),
        (route.clone(), route.clone()),
        "{map}"
    );
    assert_eq!(peer_routes(&map, a), (vec![], vec![]), "{map}");
    h.stop.cancel();
}

#[test]
fn a_filter_change_assembled_from_shared_sources_is_the_same_json_compressed_or_not() {
    use crate::control::client::zstd_decode;
    use crate::control::tailcfg::MapResponse;
    use crate::policy::{Piece, SharedText};
    let sources = SharedText::new(r#"["100.64.0.1","100.64.0.2"]"#.into());
    let filters = vec![
        (
            "00000000000000aa".to_string(),
            Some(vec![
                Piece::Own(r#"[{"SrcIPs":"#.into()),
                Piece::Shared(&sources),
                Piece::Own(
                    r#","DstPorts":[{"IP":"100.64.0.9","Ports":{"First":22,"Last":22}}]}]"#.into(),
                ),
            ]),
        ),
        ("00000000000000bb".to_string(), None),
    ];
    let want = serde_json::json!({
        "00000000000000aa": [{"SrcIPs": ["100.64.0.1", "100.64.0.2"],
            "DstPorts": [{"IP": "100.64.0.9", "Ports": {"First": 22, "Last": 22}}]}],
        "00000000000000bb": null,
    });
    let peer = serde_json::value::RawValue::from_string(r#"{"ID":7}"#.into()).unwrap();
    let responses = [
        MapResponse::default(),
        MapResponse {
            peers_changed: vec![peer.into()],
            ..Default::default()
        },
    ];
    for response in &responses {
        let head = super::build::head_before_filters(response);
        let shared_head = SharedText::new(head.clone());
        let plain = super::build::encode_with_filters(Piece::Own(head.clone()), &filters, false);
        let plain = decode(&plain);
        assert_eq!(plain["PacketFilters"], want);
        let from_shared =
            super::build::encode_with_filters(Piece::Shared(&shared_head), &filters, false);
        assert_eq!(decode(&from_shared), plain);
        let packed = super::build::encode_with_filters(Piece::Own(head), &filters, true);
        let json = zstd_decode(&packed[4..]).expect("concatenated zstd frames");
        let packed: Value = serde_json::from_slice(&json).expect("one JSON document");
        assert_eq!(packed, plain);
        assert_eq!(
            packed["PeersChanged"].as_array().map(Vec::len),
            (!response.peers_changed.is_empty()).then_some(1)
        );
    }
}

#[test]
fn a_zstd_frame_keeps_no_room_for_the_worst_case() {
    // Peer JSON compresses well; the frame is kept for as long as its block or delta is,
    // so it must not hold on to the input-sized buffer it was compressed into.
    let json = r#"{"ID":1,"Name":"node.hsd.internal.","Addresses":["100.64.0.1/32"]},"#.repeat(256);
    let frame = super::build::zstd_frame(json.as_bytes());
    assert!(
        frame.len() < json.len() / 4,
        "{} of {}",
        frame.len(),
        json.len()
    );
    assert!(
        frame.capacity() < json.len() / 2,
        "holds {} bytes for a {}-byte frame",
        frame.capacity(),
        frame.len()
    );
    assert_eq!(
        zstd::bulk::decompress(&frame, json.len()).unwrap(),
        json.as_bytes()
    );
}

#[test]
fn zstd_frames_use_a_64_kib_window() {
    // A hub's block of peers is larger than the window: the frame must still say 64 KiB,
    // as each thread's compression context is sized by it.
    let json: String = (0..4_000)
        .map(|i| {
            format!(
                r#"{{"ID":{i},"Name":"node{i}.hsd.internal.","Addresses":["100.64.{}.{}/32"]}},"#,
                i / 256,
                i % 256
            )
        })
        .collect();
    assert!(json.len() > 256 * 1024);
    for frame in [
        super::build::zstd_frame(json.as_bytes()),
        super::build::zstd_frame_for_one(json.as_bytes()),
    ] {
        let mut decoder = zstd::stream::read::Decoder::new(&frame[..]).unwrap();
        decoder.window_log_max(16).unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut decoder, &mut out)
            .expect("a frame that a decoder limited to a 64 KiB window reads");
        assert_eq!(out, json.as_bytes());
    }
}

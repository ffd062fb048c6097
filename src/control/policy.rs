//! The policy seam between the registry and map building: who may see whom, each node's
//! packet filter, the routes a viewer may use through a peer, SSH rules and node
//! attributes.
//!
//! Without a policy (the default) and without routes, every approved node reaches every
//! other, and full netmaps are assembled from the hub's shared blocks. Otherwise the
//! engine in `crate::policy` answers (with no policy file, Tailscale's allow-all default): compiled once per registry version (and per online state of
//! the routers, which decides HA primaries), then shared by every session of the member.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use ipnet::IpNet;
use rustc_hash::FxHashMap;
use serde_json::{Map, Value, json};

use crate::control::tailcfg::RawJson;
use crate::policy::{self, Compiled, PeerRoutes};
use crate::presence::Presence;
use crate::registry::{Node, NodeId, Registry, User, UserId};

/// The access decisions for one registry view.
#[derive(Clone, Default)]
pub struct Access(Option<Arc<PolicyMap>>);

/// The chunks of a packet filter a client holds (key, hash), to send it only the chunks
/// that change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FilterSent(Vec<(u64, u64)>);

/// Changed chunks of a packet filter by name (`None`: the client drops the chunk), as
/// wire pieces whose sources are shared between receivers.
pub type FilterChanges<'a> = Vec<(String, Option<Vec<policy::Piece<'a>>>)>;

/// A compiled policy and where each node sits in it.
pub struct PolicyMap {
    compiled: Compiled,
    /// Asked twice per peer of every full netmap; node ids are ours, not a client's, so a
    /// fast hash is safe.
    index: FxHashMap<NodeId, usize>,
    /// Nodes that route something, with when they came online (that elects primaries).
    routers: Vec<(NodeId, Option<i64>)>,
}

impl Access {
    /// Whether `viewer` gets `peer` in its netmap. Nodes waiting for approval see no one
    /// and are seen by no one.
    pub fn can_see(&self, viewer: &Node, peer: &Node) -> bool {
        self.viewer(viewer).sees(peer) != Seen::Hidden
    }

    /// `viewer` looked up once, to ask how it sees many peers (a full netmap asks for each
    /// peer of the tailnet).
    pub fn viewer<'a>(&'a self, viewer: &'a Node) -> Viewer<'a> {
        let index = self
            .0
            .as_ref()
            .and_then(|map| map.index.get(&viewer.id).copied());
        Viewer {
            access: self,
            node: viewer,
            index,
        }
    }

    /// The packet filter for `node`, whole, as `PacketFilters` (named filters, capver ≥
    /// 81): `"*": null` drops whatever the client held, then come the filter's chunks
    /// (see `policy::filter_chunks`); with them, what the client then holds. Nothing but
    /// `"*"` denies everything, which is what an unapproved node gets.
    pub fn packet_filters(&self, node: &Node) -> (Value, FilterSent) {
        let mut out = Map::new();
        out.insert("*".into(), Value::Null);
        let Some(map) = &self.0 else {
            if node.approved {
                // No policy: every tailnet address may reach every port.
                out.insert(
                    "base".into(),
                    json!([{
                        "SrcIPs": ["*"],
                        "DstPorts": [{ "IP": "*", "Ports": { "First": 0, "Last": 65535 } }],
                    }]),
                );
            }
            return (Value::Object(out), FilterSent::default());
        };
        let mut sent = FilterSent::default();
        if let Some(&i) = map.index.get(&node.id).filter(|_| node.approved) {
            let rules = &map.compiled.node(i).filter;
            for chunk in policy::filter_chunks(rules) {
                out.insert(chunk.name(), chunk.to_json(rules));
                sent.0.push((chunk.key, chunk.hash));
            }
        }
        (Value::Object(out), sent)
    }

    /// What `node`'s client, holding `sent`, must get to hold its current filter: the new
    /// and changed chunks, `None` for the ones gone; with what it then holds. `None` when
    /// nothing changed (or without a policy).
    pub fn packet_filter_changes(
        &self,
        node: &Node,
        sent: &FilterSent,
    ) -> Option<(FilterChanges<'_>, FilterSent)> {
        let (map, i) = self.position(node)?;
        let rules = &map.compiled.node(i).filter;
        let chunks = policy::filter_chunks(rules);
        let held: HashMap<u64, u64> = sent.0.iter().copied().collect();
        let mut out = FilterChanges::new();
        for chunk in &chunks {
            if held.get(&chunk.key) != Some(&chunk.hash) {
                out.push((chunk.name(), Some(chunk.pieces(rules))));
            }
        }
        let now: HashSet<u64> = chunks.iter().map(|c| c.key).collect();
        for &(key, _) in sent.0.iter().filter(|(key, _)| !now.contains(key)) {
            out.push((policy::chunk_name(key), None));
        }
        let sent = FilterSent(chunks.iter().map(|c| (c.key, c.hash)).collect());
        (!out.is_empty()).then_some((out, sent))
    }

    /// What `node`'s client holds once it got `packet_filters(node)`.
    pub fn filter_sent(&self, node: &Node) -> FilterSent {
        let Some((map, i)) = self.position(node).filter(|_| node.approved) else {
            return FilterSent::default();
        };
        let chunks = policy::filter_chunks(&map.compiled.node(i).filter);
        FilterSent(chunks.iter().map(|c| (c.key, c.hash)).collect())
    }

    /// Whether `viewer` sees every approved peer exactly as the shared blocks hold it (no
    /// policy, no routes), so its full netmap is assembled from them whole.
    pub fn sees_all_shared(&self, viewer: &Node) -> bool {
        self.0.is_none() && viewer.approved
    }

    /// Whether a policy is in force.
    pub fn has_policy(&self) -> bool {
        self.0.is_some()
    }

    /// The routes `viewer` may use through `peer` (`AllowedIPs` beyond its addresses,
    /// `PrimaryRoutes`), when the peer routes anything; `None` when the shared JSON of the
    /// peer is right for every viewer.
    pub fn peer_routes(&self, viewer: &Node, peer: &Node) -> Option<PeerRoutes> {
        let map = self.0.as_ref()?;
        let (&i, &j) = (map.index.get(&viewer.id)?, map.index.get(&peer.id)?);
        let r = map.compiled.routes(j);
        if r.primary.is_empty() && r.exits.is_empty() {
            return None;
        }
        Some(map.compiled.peer_routes(i, j))
    }

    /// `node`'s own routes, when it routes anything.
    pub fn self_routes(&self, node: &Node) -> Option<PeerRoutes> {
        let (map, i) = self.position(node)?;
        let r = map.compiled.routes(i);
        if r.subnets.is_empty() && r.exits.is_empty() {
            return None;
        }
        Some(map.compiled.self_routes(i))
    }

    /// A node's approved routes (by an admin, or by the policy's `autoApprovers` for
    /// what it advertises) and the subnet routes it is primary for.
    pub fn route_state(&self, node: &Node) -> (Vec<IpNet>, Vec<IpNet>) {
        let mut approved = node.approved_routes.clone();
        let Some((map, i)) = self.position(node) else {
            return (approved, Vec::new());
        };
        let r = map.compiled.routes(i);
        for net in r.subnets.iter().chain(&r.exits) {
            if !approved.contains(net) {
                approved.push(*net);
            }
        }
        approved.sort();
        (approved, r.primary.clone())
    }

    /// `SSHPolicy` for `node`, when the policy has an `ssh` section.
    pub fn ssh_policy(&self, node: &Node) -> Option<RawJson> {
        #[derive(serde::Serialize)]
        struct SshPolicy<'a> {
            rules: Vec<&'a serde_json::value::RawValue>,
        }
        let (map, i) = self.position(node)?;
        map.compiled.has_ssh().then(|| {
            let rules = map.compiled.ssh_rules(i);
            serde_json::value::to_raw_value(&SshPolicy { rules })
                .expect("JSON text serializes")
                .into()
        })
    }

    /// Node attributes (`nodeAttrs`) for `node`'s capability map.
    pub fn node_attrs(&self, node: &Node) -> Vec<String> {
        self.position(node)
            .map(|(map, i)| map.compiled.node_attrs(i))
            .unwrap_or_default()
    }

    /// Hashes of `node`'s packet filter and SSH rules (`None` without a policy).
    pub fn fingerprint(&self, node: &Node) -> Option<(u64, u64)> {
        let (map, i) = self.position(node)?;
        Some(map.compiled.fingerprint(i))
    }

    /// The nodes that route anything (whose online state elects primaries).
    pub fn routers(&self) -> Vec<NodeId> {
        self.0
            .as_ref()
            .map(|m| m.routers.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default()
    }

    fn position(&self, node: &Node) -> Option<(&PolicyMap, usize)> {
        let map = self.0.as_ref()?;
        Some((map, *map.index.get(&node.id)?))
    }
}

/// How a viewer sees one peer in its netmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Hidden,
    /// As the JSON every viewer shares shows it.
    Shared,
    /// With routes of its own for this viewer (`Access::peer_routes`).
    Routed,
}

/// One viewer, looked up once (see `Access::viewer`).
pub struct Viewer<'a> {
    access: &'a Access,
    node: &'a Node,
    index: Option<usize>,
}

impl Viewer<'_> {
    /// Whether the viewer sees `peer` (`Access::can_see`), and whether the peer's shared
    /// JSON is right for it.
    pub fn sees(&self, peer: &Node) -> Seen {
        let viewer = self.node;
        if viewer.id == peer.id || !viewer.approved || !peer.approved {
            return Seen::Hidden;
        }
        let Some(map) = &self.access.0 else {
            return Seen::Shared;
        };
        let (Some(i), Some(&j)) = (self.index, map.index.get(&peer.id)) else {
            return Seen::Hidden;
        };
        if !map.compiled.can_see(i, j) {
            return Seen::Hidden;
        }
        let r = map.compiled.routes(j);
        if r.primary.is_empty() && r.exits.is_empty() {
            Seen::Shared
        } else {
            Seen::Routed
        }
    }
}

/// The compiled policy a member keeps: the hub's, for the view every session answers from
/// until the next tick, reused while the registry's users, nodes and policy and the
/// routers' online state are unchanged for what it reads.
#[derive(Default)]
pub struct AccessCache {
    slot: Mutex<Option<Cached>>,
    /// Policies compiled and kept (the hub's ticks), and compiled for one call alone.
    compiled_kept: AtomicU64,
    compiled_alone: AtomicU64,
}

impl std::fmt::Debug for AccessCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessCache")
    }
}

struct Cached {
    policy: Arc<str>,
    users: OrdMap<UserId, Arc<User>>,
    nodes: OrdMap<NodeId, Arc<Node>>,
    access: Access,
}

impl Cached {
    fn new(view: &Registry, access: Access) -> Cached {
        Cached {
            policy: Arc::clone(view.policy_text()),
            users: view.user_map().clone(),
            nodes: view.node_map().clone(),
            access,
        }
    }

    /// Whether this compile holds for `view`: nothing it reads differs.
    fn holds_for(&self, view: &Registry, presence: &Presence) -> bool {
        (Arc::ptr_eq(&self.policy, view.policy_text()) || *self.policy == *view.policy())
            && same_users_for_policy(&self.users, view)
            && same_for_policy(&self.nodes, view.node_map(), presence)
            && self.access.0.as_ref().is_none_or(|m| {
                m.routers
                    .iter()
                    .all(|(id, since)| presence.online_since(*id) == *since)
            })
    }
}

impl AccessCache {
    /// The access decisions for `view`: the kept compile if it holds, else one made for
    /// this call alone (a node's first netmap before the hub holds it, an admin call) and
    /// made outside the lock, so sessions are not held up. Keeping it would evict the
    /// hub's, and then every session recompiled the whole policy for each delta (a
    /// 10,000-client join storm stalled on that at about 7,000).
    /// `check_url` is where SSH `check` actions call.
    pub fn access(&self, view: &Registry, presence: &Presence, check_url: &str) -> Access {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(c) if c.holds_for(view, presence) => c.access.clone(),
            Some(_) => {
                drop(slot);
                let access = compile_view(view, presence, check_url);
                count_compile(&self.compiled_alone, &access);
                access
            }
            None => self.keep_locked(slot, view, presence, check_url),
        }
    }

    /// The access decisions for the hub's view at a tick, kept for the sessions. One that
    /// asks meanwhile waits for this compile rather than making its own.
    pub fn keep(&self, view: &Registry, presence: &Presence, check_url: &str) -> Access {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        self.keep_locked(slot, view, presence, check_url)
    }

    fn keep_locked(
        &self,
        mut slot: std::sync::MutexGuard<'_, Option<Cached>>,
        view: &Registry,
        presence: &Presence,
        check_url: &str,
    ) -> Access {
        if let Some(c) = slot.as_mut()
            && c.holds_for(view, presence)
        {
            // Keep the newest maps so the next comparison only walks what changed since.
            c.users = view.user_map().clone();
            c.nodes = view.node_map().clone();
            return c.access.clone();
        }
        let access = compile_view(view, presence, check_url);
        count_compile(&self.compiled_kept, &access);
        *slot = Some(Cached::new(view, access.clone()));
        access
    }

    /// How many times the policy was compiled: (kept, for one call alone). A steady climb
    /// of the second means sessions ask for views the hub's compile does not hold for.
    pub fn compiles(&self) -> (u64, u64) {
        (
            self.compiled_kept.load(Ordering::Relaxed),
            self.compiled_alone.load(Ordering::Relaxed),
        )
    }
}

/// Counts a compile that was one (not a view without a policy or routes).
fn count_compile(counter: &AtomicU64, access: &Access) {
    if access.0.is_some() {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Without a policy or routes everyone sees everyone the same way: nothing to compile.
/// Routes (even without a policy) need per-viewer netmaps.
fn compile_view(view: &Registry, presence: &Presence, check_url: &str) -> Access {
    let plain =
        view.policy().trim().is_empty() && view.nodes().all(|n| n.approved_routes.is_empty());
    if plain {
        Access(None)
    } else {
        compile(view, presence, check_url)
    }
}

/// Whether `new` differs from `old` only in what the engine does not read (key expiry,
/// last seen, hostinfo beyond its routes, nodes waiting for approval…), so the compiled
/// policy still holds. Walks only the changed entries: the maps share everything else.
fn same_for_policy(
    old: &OrdMap<NodeId, Arc<Node>>,
    new: &OrdMap<NodeId, Arc<Node>>,
    presence: &Presence,
) -> bool {
    old.ptr_eq(new)
        || old.diff(new).all(|change| match change {
            DiffItem::Update {
                old: (_, a),
                new: (_, b),
            } => engine_node(a, presence) == engine_node(b, presence),
            DiffItem::Add(_, n) | DiffItem::Remove(_, n) => !n.approved,
        })
}

/// Whether `view`'s users differ from `old` only in what the compiled policy cannot see:
/// users added since who own no node yet. (Each new user, from `hsctl` or an OIDC login,
/// used to recompile the whole policy on every member; under `benches/load`'s failover
/// probe, which creates one every 50 ms, that was a compile per tick during the clients'
/// reconnection.) A rename or an email change is seen (aliases name users), and so is a
/// removal (the first user's domain is the tailnet's, which SSH and `user:*@domain`
/// check).
fn same_users_for_policy(old: &OrdMap<UserId, Arc<User>>, view: &Registry) -> bool {
    let new = view.user_map();
    let first = old.keys().next().copied();
    old.ptr_eq(new)
        || old.diff(new).all(|change| match change {
            DiffItem::Update {
                old: (_, a),
                new: (_, b),
            } => engine_user(a) == engine_user(b),
            DiffItem::Add(id, _) => {
                first.is_some_and(|first| *id > first) && !view.nodes().any(|n| n.user == *id)
            }
            DiffItem::Remove(..) => false,
        })
}

/// Compiles the registry's policy. A stored policy that no longer compiles (it was
/// checked when set) falls back to denying everything rather than allowing it.
fn compile(view: &Registry, presence: &Presence, check_url: &str) -> Access {
    let tailnet = tailnet(view, presence);
    let index: FxHashMap<NodeId, usize> = tailnet
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (NodeId(n.id), i))
        .collect();
    // The registry keeps the running policy parsed; only an empty or damaged one is not.
    let parsed = match view.parsed_policy() {
        Some(p) => Ok(Arc::clone(p)),
        None => policy::Policy::parse(view.policy()).map(Arc::new),
    };
    let compiled = parsed
        .and_then(|p| Compiled::new(p, tailnet.clone(), check_url))
        .or_else(|e| {
            tracing::error!(error = %e, "the stored policy does not compile; denying all");
            let deny = policy::Policy::parse(r#"{"acls": []}"#).expect("static policy");
            Compiled::new(deny, tailnet, check_url)
        })
        .expect("a deny-all policy always compiles");
    let routers = (0..compiled.tailnet().nodes.len())
        .filter(|&i| {
            let r = compiled.routes(i);
            !r.subnets.is_empty() || !r.exits.is_empty()
        })
        .map(|i| {
            let n = &compiled.tailnet().nodes[i];
            (NodeId(n.id), n.online.then_some(n.online_since))
        })
        .collect();
    Access(Some(Arc::new(PolicyMap {
        compiled,
        index,
        routers,
    })))
}

/// Checks `text` as a policy for the current tailnet, as `hsctl policy set` needs: it
/// parses, compiles, and passes its own `tests`.
pub fn check(view: &Registry, presence: &Presence, text: &str) -> Result<(), policy::PolicyError> {
    let parsed = policy::Policy::parse(text)?;
    let tailnet = tailnet(view, presence);
    policy::run_tests(&parsed, &tailnet)?;
    Compiled::new(parsed, tailnet, "").map(|_| ())
}

/// The registry's approved nodes as the engine sees them, in registration (id) order.
fn tailnet(view: &Registry, presence: &Presence) -> policy::Tailnet {
    let users = view.users().map(engine_user).collect();
    let nodes = view
        .nodes()
        .filter_map(|n| engine_node(n, presence))
        .collect();
    policy::Tailnet { users, nodes }
}

/// A registry user as the engine reads it: a name like an email address stands for one.
fn engine_user(u: &User) -> policy::User {
    policy::User {
        id: u.id.0,
        name: u.name.clone(),
        email: if !u.email.is_empty() {
            u.email.clone()
        } else if u.name.contains('@') {
            u.name.clone()
        } else {
            String::new()
        },
    }
}

/// A registry node as the engine reads it; `None` while it waits for approval (it is not
/// part of the tailnet yet).
fn engine_node(n: &Node, presence: &Presence) -> Option<policy::Node> {
    n.approved.then(|| policy::Node {
        id: n.id.0,
        name: n.given_name.clone(),
        user: n.tags.is_empty().then_some(n.user.0),
        tags: n.tags.clone(),
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        advertised: advertised_routes(&n.hostinfo),
        approved: n.approved_routes.clone(),
        online: presence.is_online(n.id),
        online_since: presence.online_since(n.id).unwrap_or(0),
    })
}

/// Hostinfo `RoutableIPs`: the routes a client offers to serve.
pub fn advertised_routes(hostinfo: &str) -> Vec<IpNet> {
    #[derive(serde::Deserialize)]
    struct Routable {
        #[serde(rename = "RoutableIPs", default)]
        routable_ips: Option<Vec<IpNet>>,
    }
    serde_json::from_str::<Routable>(hostinfo)
        .ok()
        .and_then(|h| h.routable_ips)
        .unwrap_or_default()
        .into_iter()
        .map(|n| n.trunc())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::secrets::{self, SecretKind};
    use crate::registry::*;

    fn apply(registry: &mut Registry, command: Command) -> Outcome {
        let mut applied = registry.apply(&Request::single(Timestamp(1_700_000_000_000), command));
        applied.outcomes.remove(0)
    }

    /// A registry with a policy and two nodes of user `u`.
    fn tailnet_of_two() -> (Registry, NodeId) {
        let mut registry = Registry::new(ClusterSettings::default());
        apply(&mut registry, Command::create_user("u"));
        apply(
            &mut registry,
            Command::SetPolicy {
                policy: r#"{"acls": [{"action": "accept", "src": ["u@"], "dst": ["*:22"]}]}"#
                    .into(),
            },
        );
        let secret = secrets::generate(SecretKind::PreAuth);
        apply(
            &mut registry,
            Command::CreatePreAuthKey {
                user: "u".into(),
                prefix: secret.prefix.clone(),
                hash: secret.hash,
                reusable: true,
                ephemeral: false,
                expiration: None,
                tags: vec![],
            },
        );
        let mut first = None;
        for n in 1..=2u8 {
            let out = apply(
                &mut registry,
                Command::RegisterNode {
                    request: NodeRequest {
                        machine_key: MachineKey([n; 32]),
                        node_key: NodeKey([n + 100; 32]),
                        hostname: format!("n{n}"),
                        hostinfo: "{}".into(),
                        request_tags: vec![],
                        ephemeral: false,
                    },
                    auth: NodeAuth::PreAuthKey {
                        prefix: secret.prefix.clone(),
                        hash: secret.hash,
                    },
                    auto_approve: true,
                    expiry: None,
                },
            );
            let Outcome::Node(node) = out else {
                panic!("{out:?}")
            };
            first.get_or_insert(node.id);
        }
        (registry, first.unwrap())
    }

    fn same(a: &Access, b: &Access) -> bool {
        match (&a.0, &b.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    #[test]
    fn the_compiled_policy_is_kept_until_something_it_reads_changes() {
        let (mut registry, id) = tailnet_of_two();
        let presence = Presence::new(1);
        let cache = AccessCache::default();
        let first = cache.keep(&registry, &presence, "");
        assert!(first.has_policy());

        // Last seen and hostinfo without routes: the engine reads neither.
        apply(&mut registry, Command::SetLastSeen { id });
        let info = |routes: &str| Command::UpdateNodeInfo {
            id,
            hostname: "n1".into(),
            hostinfo: format!(r#"{{"OS":"linux","RoutableIPs":[{routes}]}}"#),
            disco_key: DiscoKey([9; 32]),
        };
        apply(&mut registry, info(""));
        let again = cache.keep(&registry, &presence, "");
        assert!(
            same(&first, &again),
            "recompiled for a change it does not read"
        );

        // A route advertised, a rename: both feed the engine.
        apply(&mut registry, info(r#""10.9.0.0/16""#));
        let routed = cache.keep(&registry, &presence, "");
        assert!(
            !same(&again, &routed),
            "a new advertised route was not compiled"
        );
        apply(
            &mut registry,
            Command::RenameNode {
                id,
                name: "renamed".into(),
            },
        );
        let renamed = cache.keep(&registry, &presence, "");
        assert!(!same(&routed, &renamed), "a rename was not compiled");
    }

    #[test]
    fn a_new_user_without_nodes_keeps_the_compiled_policy_and_a_renamed_one_does_not() {
        let (mut registry, _) = tailnet_of_two();
        let presence = Presence::new(1);
        let cache = AccessCache::default();
        let first = cache.keep(&registry, &presence, "");

        apply(&mut registry, Command::create_user("newcomer"));
        let added = cache.keep(&registry, &presence, "");
        assert!(same(&first, &added), "recompiled for a user with no nodes");

        // The policy names `u@`: renaming the nodes' owner changes what it resolves to.
        apply(
            &mut registry,
            Command::RenameUser {
                old: "u".into(),
                new: "v".into(),
            },
        );
        let renamed = cache.keep(&registry, &presence, "");
        assert!(!same(&added, &renamed), "a user's rename was not compiled");
    }

    #[test]
    fn the_hubs_compile_is_kept_while_newer_views_are_compiled_alone() {
        let (hub, _) = tailnet_of_two();
        let mut newest = hub.clone();
        let rename = Command::RenameUser {
            old: "u".into(),
            new: "v".into(),
        };
        newest.apply(&Request::single(Timestamp(1_700_000_001_000), rename));
        let presence = Presence::new(1);
        let cache = AccessCache::default();
        let for_hub = cache.keep(&hub, &presence, "");
        // A joining node's first netmap, from the member's newest view.
        let for_newest = cache.access(&newest, &presence, "");
        assert!(!same(&for_hub, &for_newest));
        assert!(
            same(&for_hub, &cache.access(&hub, &presence, "")),
            "a newer view evicted the hub's compile"
        );
        // The hub's next tick: its compile of the newest view is the one kept now.
        let next = cache.keep(&newest, &presence, "");
        assert!(same(&next, &cache.access(&newest, &presence, "")));
        assert!(!same(&next, &for_hub));
        assert_eq!(cache.compiles(), (2, 1), "(kept, alone)");
    }
}

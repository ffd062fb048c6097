//! The access-control engine: Tailscale's policy file (HuJSON: groups, hosts, tagOwners,
//! acls, grants, autoApprovers, ssh, nodeAttrs) compiled against a tailnet into what each
//! node receives — its packet filter, the peers it may talk to with their routes, and its
//! SSH rules.
//!
//! Pure and synchronous: `control` feeds it the registry, `hsd policy eval` a captured
//! case. Compilation resolves every alias once; per-node answers are computed on demand
//! and cached, so a node's netmap costs its own rules and peers, not the tailnet's.

mod checks;
mod chunks;
pub mod eval;
mod filter;
pub mod ipset;
mod model;
mod resolve;
mod ssh;
mod tailnet;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use serde_json::value::RawValue;

pub use checks::run as run_tests;
pub use chunks::{FilterChunk, Piece, SharedText, chunk_name, filter_chunks};
pub use filter::FilterRule;
pub use model::{Policy, PolicyError};
pub use tailnet::{Node, NodeRoutes, Tailnet, User};

use filter::{CompiledGrant, Matcher};
use resolve::Resolver;

/// A policy compiled against one tailnet.
pub struct Compiled {
    policy: Arc<Policy>,
    tailnet: Tailnet,
    routes: Vec<NodeRoutes>,
    grants: Vec<CompiledGrant>,
    /// Rules every node shares before reduction, and their destinations parsed.
    global: Vec<FilterRule>,
    global_index: filter::DstIndex,
    global_matchers: Vec<Matcher>,
    /// Per grant with `autogroup:self` destinations: each user's side of it.
    self_sources: Vec<HashMap<u64, filter::SelfSources>>,
    /// Per node: which rules and grants it takes part in, for O(rules) visibility checks.
    membership: Vec<Membership>,
    per_node: bool,
    check_url: String,
    nodes: Vec<OnceLock<NodeView>>,
    ssh: Vec<OnceLock<Vec<std::sync::Arc<ssh::SshRuleJson>>>>,
    /// The `ssh` section resolved once, on the first node's SSH rules.
    ssh_prepared: OnceLock<ssh::PreparedSsh>,
    attrs: Vec<Vec<String>>,
    fingerprints: Vec<OnceLock<(u64, u64)>>,
    /// See `first_via_routers`.
    via_first: Vec<HashMap<IpNet, usize>>,
}

/// Which global rules a node is a source or destination of, which `autogroup:self`
/// grants name it as a source, and which `via` grants it is a source of or a router for.
/// Two nodes are peers when one is a source of a rule the other is a destination of (in
/// either direction), when they are the same user's and either is a source of a self
/// grant, or when one is a source of a `via` grant the other routes.
struct Membership {
    src: Bits,
    dst: Bits,
    self_src: Bits,
    via_src: Bits,
    via_router: Bits,
}

/// What one node receives.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Its packet filter (reduced to rules that name it as destination).
    pub filter: Vec<FilterRule>,
    /// Its unreduced rules' matchers; `None`: the global ones.
    matchers: Option<Vec<Matcher>>,
}

/// A peer as a viewer sees it: addresses plus the routes the viewer may use through it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerRoutes {
    pub allowed_ips: Vec<IpNet>,
    pub primary_routes: Vec<IpNet>,
}

impl Compiled {
    /// Compiles `policy` for `tailnet`. `check_url` is where SSH `check` actions send
    /// clients (the control server's URL). Fails only on checks that need the tailnet.
    pub fn new(
        policy: impl Into<Arc<Policy>>,
        tailnet: Tailnet,
        check_url: &str,
    ) -> Result<Self, PolicyError> {
        let policy = policy.into();
        ssh::check_domains(&policy, &tailnet)?;
        let (routes, grants, global) = {
            let resolver = Resolver::new(&policy, &tailnet);
            let routes = tailnet::node_routes(&policy, &tailnet, &resolver);
            let grants = filter::compile_grants(&policy.grants, &resolver, &routes);
            let global = filter::global_rules(&grants);
            (routes, grants, global)
        };
        let per_node = filter::needs_per_node(&grants);
        let nodes: Vec<OnceLock<NodeView>> =
            (0..tailnet.nodes.len()).map(|_| OnceLock::new()).collect();
        let mut by_user: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, n) in tailnet.nodes.iter().enumerate() {
            if let Some(u) = n.user.filter(|_| !n.is_tagged()) {
                by_user.entry(u).or_default().push(i);
            }
        }
        let self_sources = grants
            .iter()
            .map(|g| match &g.self_part {
                Some(s) => by_user
                    .iter()
                    .map(|(u, same)| (*u, filter::SelfSources::new(s, same, &routes)))
                    .collect(),
                None => HashMap::new(),
            })
            .collect();
        let mut compiled = Compiled {
            policy,
            tailnet,
            routes,
            grants,
            self_sources,
            global_index: filter::DstIndex::new(&global),
            global_matchers: global.iter().map(FilterRule::matcher).collect(),
            global,
            membership: Vec::new(),
            per_node,
            check_url: check_url.to_string(),
            ssh: nodes.iter().map(|_| OnceLock::new()).collect(),
            ssh_prepared: OnceLock::new(),
            fingerprints: nodes.iter().map(|_| OnceLock::new()).collect(),
            nodes,
            attrs: Vec::new(),
            via_first: Vec::new(),
        };
        compiled.membership = compiled.memberships();
        compiled.attrs = compiled.all_node_attrs();
        compiled.via_first = compiled.first_via_routers();
        Ok(compiled)
    }

    /// Every node's `Membership`: O(nodes × rules).
    fn memberships(&self) -> Vec<Membership> {
        let n = self.tailnet.nodes.len();
        let mut out: Vec<Membership> = (0..n)
            .map(|_| Membership {
                src: Bits::new(self.global.len()),
                dst: Bits::new(self.global.len()),
                self_src: Bits::new(self.grants.len()),
                via_src: Bits::new(self.grants.len()),
                via_router: Bits::new(self.grants.len()),
            })
            .collect();
        for (k, m) in self.global_matchers.iter().enumerate() {
            let (s, d) = node_sets(m, &self.routes);
            for i in s.iter() {
                out[i].src.set(k);
            }
            for i in d.iter() {
                out[i].dst.set(k);
            }
        }
        for (k, g) in self.grants.iter().enumerate() {
            if g.self_part.is_none() && g.via.is_none() {
                continue;
            }
            for (i, m) in out.iter_mut().enumerate() {
                let src = self.routes[i].in_set(&g.srcs);
                if g.self_part.is_some() && src {
                    m.self_src.set(k);
                }
                if let Some(via) = &g.via {
                    if src {
                        m.via_src.set(k);
                    }
                    if !self.via_routes(g, via, i).is_empty() {
                        m.via_router.set(k);
                    }
                }
            }
        }
        out
    }

    /// The untagged owner of node `i`, if any.
    fn owner(&self, i: usize) -> Option<u64> {
        let n = &self.tailnet.nodes[i];
        n.user.filter(|_| !n.is_tagged())
    }

    /// The rules every node shares, before reduction to a node.
    pub(crate) fn global_rules(&self) -> &[FilterRule] {
        &self.global
    }

    pub fn tailnet(&self) -> &Tailnet {
        &self.tailnet
    }

    pub fn routes(&self, i: usize) -> &NodeRoutes {
        &self.routes[i]
    }

    /// Node `i`'s filter and matchers.
    pub fn node(&self, i: usize) -> &NodeView {
        self.nodes[i].get_or_init(|| {
            if !self.per_node {
                return NodeView {
                    filter: filter::reduce_indexed(
                        &self.global,
                        &self.global_index,
                        &self.routes[i],
                    ),
                    matchers: None,
                };
            }
            // The global rules reduced as for everyone, plus this node's own
            // `autogroup:self` and `via` rules. Self rules name only tailnet addresses, so
            // only `via` rules matter to route access (`matchers`).
            let me = &self.routes[i];
            let mut rules = filter::reduce_indexed(&self.global, &self.global_index, me);
            let mut via_matchers = Vec::new();
            for (k, g) in self.grants.iter().enumerate() {
                if let (Some(s), Some(u)) = (&g.self_part, self.owner(i))
                    && let Some(src) = self.self_sources[k].get(&u)
                {
                    rules.extend(filter::own_self_rules(s, src, me));
                }
                if let Some(v) = &g.via {
                    let own = filter::via_rules(v, &g.dst_nets, &self.tailnet, &self.routes, i);
                    via_matchers.extend(own.iter().map(FilterRule::matcher));
                    rules.extend(filter::reduce(&own, me));
                }
            }
            NodeView {
                filter: filter::merge(rules),
                matchers: (!via_matchers.is_empty()).then(|| {
                    self.global_matchers
                        .iter()
                        .cloned()
                        .chain(via_matchers)
                        .collect()
                }),
            }
        })
    }

    /// The nodes `i` may talk to in either direction, as indexes in tailnet order.
    pub fn peers(&self, i: usize) -> Vec<usize> {
        (0..self.tailnet.nodes.len())
            .filter(|&j| self.can_see(i, j))
            .collect()
    }

    /// Whether `i` and `j` may talk in either direction (see `Membership`).
    pub fn can_see(&self, i: usize, j: usize) -> bool {
        if i == j {
            return false;
        }
        let (a, b) = (&self.membership[i], &self.membership[j]);
        a.src.meets(&b.dst)
            || b.src.meets(&a.dst)
            || a.via_src.meets(&b.via_router)
            || b.via_src.meets(&a.via_router)
            || ((a.self_src.any() || b.self_src.any())
                && self.owner(i).is_some()
                && self.owner(i) == self.owner(j))
    }

    /// How viewer `i` sees peer `j`: `j`'s addresses, plus its primary subnet routes and
    /// exit routes that `i`'s rules let it use.
    pub fn peer_routes(&self, i: usize, j: usize) -> PeerRoutes {
        let peer = &self.routes[j];
        if peer.subnets.is_empty() && peer.exits.is_empty() {
            return PeerRoutes {
                allowed_ips: peer.ips.iter().map(|ip| IpNet::from(*ip)).collect(),
                primary_routes: Vec::new(),
            };
        }
        let (include, exclude) = self.via_steering(i, j);
        let mut allowed: Vec<IpNet> = peer.ips.iter().map(|ip| IpNet::from(*ip)).collect();
        let mut primary = Vec::new();
        for r in peer.primary.iter().chain(&peer.exits) {
            // A standby router of the same route keeps the primary's route.
            let usable = self.can_access_route(i, r) || self.routes[i].subnets.contains(r);
            if (usable || include.contains(r)) && !exclude.contains(r) {
                allowed.push(*r);
                if peer.primary.contains(r) {
                    primary.push(*r);
                }
            }
        }
        for r in &include {
            if allowed.contains(r) {
                continue;
            }
            allowed.push(*r);
            if !tailnet::is_exit_route(r) {
                primary.push(*r);
            }
        }
        PeerRoutes {
            allowed_ips: allowed,
            primary_routes: primary,
        }
    }

    /// Node `j`'s routes that `via` grant `g` names: its approved subnets overlapping the
    /// grant's destinations, its exit routes for `autogroup:internet`.
    fn routes_named(&self, g: &CompiledGrant, via: &filter::ViaPart, j: usize) -> Vec<IpNet> {
        let r = &self.routes[j];
        let mut out: Vec<IpNet> = r
            .subnets
            .iter()
            .filter(|s| g.dst_nets.iter().any(|d| filter::overlaps(d, s)))
            .copied()
            .collect();
        if via.internet && r.is_exit() {
            out.extend(r.exits.iter().copied());
        }
        out
    }

    /// The routes `via` grant `g` steers through node `j`: those it names, if `j` carries
    /// one of the grant's tags.
    fn via_routes(&self, g: &CompiledGrant, via: &filter::ViaPart, j: usize) -> Vec<IpNet> {
        let tagged = via
            .tags
            .iter()
            .any(|t| self.tailnet.nodes[j].tags.contains(t));
        if tagged {
            self.routes_named(g, via, j)
        } else {
            Vec::new()
        }
    }

    /// Per `via` grant: each steered subnet route's first online router in registration
    /// order (the one viewers are sent to), shared by every viewer.
    fn first_via_routers(&self) -> Vec<HashMap<IpNet, usize>> {
        self.grants
            .iter()
            .map(|g| {
                let mut first = HashMap::new();
                if let Some(via) = &g.via {
                    for k in (0..self.routes.len()).filter(|&k| self.tailnet.nodes[k].online) {
                        for r in self.via_routes(g, via, k) {
                            first.entry(r).or_insert(k);
                        }
                    }
                }
                first
            })
            .collect()
    }

    /// Routes through peer `j` that `via` grants steer viewer `i` to (include) or away
    /// from (exclude: another router is named, or this one is not the first of them).
    fn via_steering(&self, i: usize, j: usize) -> (Vec<IpNet>, Vec<IpNet>) {
        let (mut include, mut exclude) = (Vec::new(), Vec::new());
        let viewer = &self.routes[i];
        let applies = |g: &CompiledGrant| viewer.in_set(&g.srcs);
        for (k, g) in self.grants.iter().enumerate().filter(|(_, g)| applies(g)) {
            let Some(via) = &g.via else { continue };
            let steered = self.via_routes(g, via, j);
            for r in self.routes_named(g, via, j) {
                let first = self.via_first[k].get(&r) == Some(&j);
                if steered.contains(&r) && (tailnet::is_exit_route(&r) || first) {
                    include.push(r);
                } else {
                    exclude.push(r);
                }
            }
        }
        // A plain grant to the same destination reaches it the usual way: through the
        // route's primary, whatever the `via` grants say.
        for g in self.grants.iter().filter(|g| g.via.is_none() && applies(g)) {
            let plain = |r: &IpNet| g.dst_nets.iter().any(|d| filter::overlaps(d, r));
            exclude.retain(|r| !plain(r));
            include.retain(|r| !plain(r));
        }
        (include, exclude)
    }

    /// A node's own view of itself.
    pub fn self_routes(&self, i: usize) -> PeerRoutes {
        let me = &self.routes[i];
        let mut allowed: Vec<IpNet> = me.ips.iter().map(|ip| IpNet::from(*ip)).collect();
        allowed.extend(me.subnets.iter().chain(&me.exits).copied());
        PeerRoutes {
            allowed_ips: allowed,
            primary_routes: me.primary.clone(),
        }
    }

    fn can_access_route(&self, i: usize, route: &IpNet) -> bool {
        let me = &self.routes[i];
        let has_ip = |set: &ipset::IpSet| me.ips.iter().any(|ip| set.contains(*ip));
        let matchers = self
            .node(i)
            .matchers
            .as_deref()
            .unwrap_or(&self.global_matchers);
        matchers.iter().any(|m| {
            (has_ip(&m.srcs) && m.dsts.overlaps_net(route))
                || (m.srcs.overlaps_net(route) && has_ip(&m.dsts))
                || me.subnets.iter().any(|s| {
                    (m.srcs.overlaps_net(s) && m.dsts.overlaps_net(route))
                        || (m.srcs.overlaps_net(route) && m.dsts.overlaps_net(s))
                })
        })
    }

    /// Node `i`'s `SSHPolicy.rules` (empty without an `ssh` section).
    pub fn ssh_rules(&self, i: usize) -> Vec<&RawValue> {
        self.ssh_shared(i).iter().map(|r| &*r.json).collect()
    }

    fn ssh_shared(&self, i: usize) -> &[std::sync::Arc<ssh::SshRuleJson>] {
        self.ssh[i].get_or_init(|| {
            let prepared = self.ssh_prepared.get_or_init(|| {
                let resolver = Resolver::new(&self.policy, &self.tailnet);
                ssh::PreparedSsh::new(&self.policy, &resolver, &self.routes, &self.check_url)
            });
            prepared.rules_for(&self.tailnet, &self.routes, i)
        })
    }

    /// Hashes of node `i`'s packet filter and SSH rules: a session compares them with what
    /// it sent to tell whether a change concerns its client.
    pub fn fingerprint(&self, i: usize) -> (u64, u64) {
        *self.fingerprints[i].get_or_init(|| {
            use std::hash::{Hash, Hasher};
            let mut filter = std::collections::hash_map::DefaultHasher::new();
            let rules = &self.node(i).filter;
            rules.len().hash(&mut filter);
            for rule in rules {
                rule.hash_into(&mut filter);
            }
            let mut ssh = std::collections::hash_map::DefaultHasher::new();
            for rule in self.ssh_shared(i) {
                rule.hash.hash(&mut ssh);
            }
            (filter.finish(), ssh.finish())
        })
    }

    /// Whether the policy has an `ssh` section at all (else no `SSHPolicy` is sent).
    pub fn has_ssh(&self) -> bool {
        !self.policy.ssh.is_empty()
    }

    /// Node attributes (`nodeAttrs`) that apply to node `i`.
    pub fn node_attrs(&self, i: usize) -> Vec<String> {
        self.attrs[i].clone()
    }

    /// Every node's `nodeAttrs`, each target resolved once.
    fn all_node_attrs(&self) -> Vec<Vec<String>> {
        let resolver = Resolver::new(&self.policy, &self.tailnet);
        let targets: Vec<ipset::IpSet> = self
            .policy
            .node_attrs
            .iter()
            .map(|na| resolver.resolve_all(&na.targets))
            .collect();
        self.routes
            .iter()
            .map(|r| {
                let mut out: Vec<String> = Vec::new();
                for (na, set) in self.policy.node_attrs.iter().zip(&targets) {
                    if r.in_set(set) {
                        for a in &na.attrs {
                            if !out.contains(a) {
                                out.push(a.clone());
                            }
                        }
                    }
                }
                out
            })
            .collect()
    }
}

/// The nodes a matcher's sources and destinations take in: by address, by approved
/// subnet route, and (destinations only) exit nodes when it names the whole internet.
fn node_sets(m: &Matcher, routes: &[NodeRoutes]) -> (Bits, Bits) {
    let internet = resolve::the_internet();
    let dst_is_internet = m.dsts.contains_net(&"0.0.0.0/0".parse().expect("static"))
        || m.dsts.contains_net(&"::/0".parse().expect("static"))
        || internet.is_subset_of(&m.dsts);
    let mut s = Bits::new(routes.len());
    let mut d = Bits::new(routes.len());
    for (j, r) in routes.iter().enumerate() {
        let by_route = |set: &ipset::IpSet| r.subnets.iter().any(|n| set.overlaps_net(n));
        if r.in_set(&m.srcs) || by_route(&m.srcs) {
            s.set(j);
        }
        if r.in_set(&m.dsts) || by_route(&m.dsts) || (r.is_exit() && dst_is_internet) {
            d.set(j);
        }
    }
    (s, d)
}

/// A fixed-size bit set over node indexes.
#[derive(Clone, Debug)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    /// Whether the two sets share a member.
    fn meets(&self, other: &Bits) -> bool {
        self.0.iter().zip(&other.0).any(|(a, b)| a & b != 0)
    }
    fn any(&self) -> bool {
        self.0.iter().any(|w| *w != 0)
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

/// A route as admins write it: a CIDR, its host bits cleared.
pub fn parse_route(s: &str) -> Result<IpNet, String> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| "expected a CIDR such as 10.0.0.0/24 or fd00::/64".to_string())
}

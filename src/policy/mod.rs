//! The access-control engine: Tailscale's policy file (HuJSON: groups, hosts, tagOwners,
//! acls, grants, autoApprovers, ssh, nodeAttrs) compiled against a tailnet into what each
//! node receives — its packet filter, the peers it may talk to with their routes, and its
//! SSH rules.
//!
//! Pure and synchronous: `control` feeds it the registry, `hsd policy eval` a captured
//! case. Compilation resolves every alias once; per-node answers are computed on demand
//! and cached, so a node's netmap costs its own rules and peers, not the tailnet's.

pub mod eval;
mod filter;
pub mod ipset;
mod model;
mod resolve;
mod ssh;
mod tailnet;

use std::sync::OnceLock;

use ipnet::IpNet;
use serde_json::Value;

pub use filter::FilterRule;
pub use model::{Policy, PolicyError};
pub use tailnet::{Node, NodeRoutes, Tailnet, User};

use filter::{CompiledGrant, Matcher};
use resolve::Resolver;

/// A policy compiled against one tailnet.
pub struct Compiled {
    policy: Policy,
    tailnet: Tailnet,
    routes: Vec<NodeRoutes>,
    grants: Vec<CompiledGrant>,
    /// Rules every node shares before reduction.
    global: Vec<FilterRule>,
    global_matchers: Vec<(Matcher, Bits, Bits)>,
    per_node: bool,
    check_url: String,
    nodes: Vec<OnceLock<NodeView>>,
    peers: OnceLock<Vec<Bits>>,
}

/// What one node receives.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Its packet filter (reduced to rules that name it as destination).
    pub filter: Vec<FilterRule>,
    matchers: Vec<Matcher>,
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
    pub fn new(policy: Policy, tailnet: Tailnet, check_url: &str) -> Result<Self, PolicyError> {
        ssh::check_domains(&policy, &tailnet)?;
        let (routes, grants, global) = {
            let resolver = Resolver::new(&policy, &tailnet);
            let routes = tailnet::node_routes(&policy, &tailnet, &resolver);
            let grants = filter::compile_grants(&policy.grants, &resolver, &routes);
            let global = filter::global_rules(&grants);
            (routes, grants, global)
        };
        let per_node = filter::needs_per_node(&grants);
        let global_matchers = global
            .iter()
            .map(|r| {
                let m = r.matcher();
                let (s, d) = node_sets(&m, &routes);
                (m, s, d)
            })
            .collect();
        let nodes = (0..tailnet.nodes.len()).map(|_| OnceLock::new()).collect();
        Ok(Compiled {
            policy,
            tailnet,
            routes,
            grants,
            global,
            global_matchers,
            per_node,
            check_url: check_url.to_string(),
            nodes,
            peers: OnceLock::new(),
        })
    }

    pub fn tailnet(&self) -> &Tailnet {
        &self.tailnet
    }

    pub fn routes(&self, i: usize) -> &NodeRoutes {
        &self.routes[i]
    }

    /// Whether the policy allows everything (no `acls`, no `grants`).
    pub fn allows_all(&self) -> bool {
        self.policy.default_allow
    }

    /// Node `i`'s filter and matchers.
    pub fn node(&self, i: usize) -> &NodeView {
        self.nodes[i].get_or_init(|| {
            let unreduced = if self.per_node {
                filter::node_rules(&self.grants, &self.tailnet, &self.routes, i)
            } else {
                self.global.clone()
            };
            NodeView {
                filter: filter::reduce(&unreduced, &self.routes[i]),
                matchers: unreduced.iter().map(FilterRule::matcher).collect(),
            }
        })
    }

    /// The nodes `i` may talk to in either direction, as indexes in tailnet order.
    pub fn peers(&self, i: usize) -> Vec<usize> {
        self.peer_bits()[i].iter().collect()
    }

    pub fn can_see(&self, i: usize, j: usize) -> bool {
        self.peer_bits()[i].get(j)
    }

    fn peer_bits(&self) -> &Vec<Bits> {
        self.peers.get_or_init(|| {
            let n = self.tailnet.nodes.len();
            let mut bits = vec![Bits::new(n); n];
            for i in 0..n {
                if self.per_node {
                    for m in &self.node(i).matchers {
                        let (s, d) = node_sets(m, &self.routes);
                        link(&mut bits, i, &s, &d);
                    }
                } else {
                    for (_, s, d) in &self.global_matchers {
                        link(&mut bits, i, s, d);
                    }
                }
            }
            for g in &self.grants {
                if let Some(via) = &g.via {
                    let srcs = Bits::from_fn(n, |j| self.routes[j].in_set(&g.srcs));
                    let routers = Bits::from_fn(n, |j| !self.via_routes(g, via, j).is_empty());
                    for j in routers.iter() {
                        for k in srcs.iter() {
                            bits[j].set(k);
                            bits[k].set(j);
                        }
                    }
                }
            }
            for (i, b) in bits.iter_mut().enumerate() {
                b.clear(i);
            }
            bits
        })
    }

    /// How viewer `i` sees peer `j`: `j`'s addresses, plus its primary subnet routes and
    /// exit routes that `i`'s rules let it use.
    pub fn peer_routes(&self, i: usize, j: usize) -> PeerRoutes {
        let peer = &self.routes[j];
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
            if !filter::is_exit(r) {
                primary.push(*r);
            }
        }
        PeerRoutes {
            allowed_ips: allowed,
            primary_routes: primary,
        }
    }

    /// The routes of node `j` that `via` grant `g` steers through it (its approved
    /// subnets overlapping the grant's destinations; its exit routes for
    /// `autogroup:internet`), if `j` carries one of the grant's tags.
    fn via_routes(&self, g: &CompiledGrant, via: &filter::ViaPart, j: usize) -> Vec<IpNet> {
        if !via
            .tags
            .iter()
            .any(|t| self.tailnet.nodes[j].tags.contains(t))
        {
            return Vec::new();
        }
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

    /// Routes through peer `j` that `via` grants steer viewer `i` to (include) or away
    /// from (exclude: another router is named, or this one is not the first of them).
    fn via_steering(&self, i: usize, j: usize) -> (Vec<IpNet>, Vec<IpNet>) {
        let (mut include, mut exclude) = (Vec::new(), Vec::new());
        let viewer = &self.routes[i];
        let applies = |g: &CompiledGrant| viewer.in_set(&g.srcs);
        for g in self.grants.iter().filter(|g| applies(g)) {
            let Some(via) = &g.via else { continue };
            let peer = &self.routes[j];
            let mut matched: Vec<IpNet> = peer
                .subnets
                .iter()
                .filter(|s| g.dst_nets.iter().any(|d| filter::overlaps(d, s)))
                .copied()
                .collect();
            if via.internet && peer.is_exit() {
                matched.extend(peer.exits.iter().copied());
            }
            let steered = self.via_routes(g, via, j);
            for r in matched {
                let first = (0..self.routes.len()).find(|&k| {
                    self.tailnet.nodes[k].online && self.via_routes(g, via, k).contains(&r)
                });
                if steered.contains(&r) && (filter::is_exit(&r) || first == Some(j)) {
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
        self.node(i).matchers.iter().any(|m| {
            (has_ip(&m.srcs) && m.dsts.overlaps_net(route))
                || (m.srcs.overlaps_net(route) && has_ip(&m.dsts))
                || me.subnets.iter().any(|s| {
                    (m.srcs.overlaps_net(s) && m.dsts.overlaps_net(route))
                        || (m.srcs.overlaps_net(route) && m.dsts.overlaps_net(s))
                })
        })
    }

    /// Node `i`'s `SSHPolicy.rules` (empty without an `ssh` section).
    pub fn ssh_rules(&self, i: usize) -> Vec<Value> {
        let resolver = Resolver::new(&self.policy, &self.tailnet);
        ssh::ssh_rules(&self.policy, &resolver, &self.routes, i, &self.check_url)
    }

    /// Whether the policy has an `ssh` section at all (else no `SSHPolicy` is sent).
    pub fn has_ssh(&self) -> bool {
        !self.policy.ssh.is_empty()
    }

    /// Node attributes (`nodeAttrs`) that apply to node `i`.
    pub fn node_attrs(&self, i: usize) -> Vec<String> {
        let resolver = Resolver::new(&self.policy, &self.tailnet);
        let ips = &self.routes[i].ips;
        let mut out: Vec<String> = Vec::new();
        for na in &self.policy.node_attrs {
            if tailnet::node_matches(&resolver, &na.targets, ips) {
                for a in &na.attrs {
                    if !out.contains(a) {
                        out.push(a.clone());
                    }
                }
            }
        }
        out
    }
}

/// Marks `i` and every node on the other side of a matcher it takes part in as peers.
fn link(bits: &mut [Bits], i: usize, srcs: &Bits, dsts: &Bits) {
    if srcs.get(i) {
        for j in dsts.iter() {
            bits[i].set(j);
            bits[j].set(i);
        }
    }
    if dsts.get(i) {
        for j in srcs.iter() {
            bits[i].set(j);
            bits[j].set(i);
        }
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
    fn from_fn(n: usize, f: impl Fn(usize) -> bool) -> Self {
        let mut b = Bits::new(n);
        for i in (0..n).filter(|&i| f(i)) {
            b.set(i);
        }
        b
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
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

//! Grants (and ACLs, which are grants) to packet filter rules: compiled once per policy
//! and tailnet, then reduced per node to the rules whose destination is that node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use super::chunks::SharedText;
use super::ipset::IpSet;
use super::model::{Alias, AutoGroup, Grant, PortRange, ProtoPorts};
use super::resolve::{Resolver, the_internet};
use super::tailnet::{NodeRoutes, Tailnet, approved_subnets};

/// A rule's `SrcIPs`, shared by every node whose filter holds the rule, with the hash of
/// its contents computed once (filters are merged and fingerprinted per node) and, when
/// first asked for, its split into buckets (see `buckets`).
#[derive(Clone, Debug)]
pub struct Sources {
    ips: Arc<[String]>,
    hash: u64,
    buckets: Arc<OnceLock<Box<[SourceBucket]>>>,
}

/// Sources per bucket the bucket count aims at (see `Sources::buckets`).
const BUCKET_TARGET: usize = 256;

/// Some of a rule's sources (indices into them), with the hash of those.
#[derive(Debug)]
pub struct SourceBucket {
    pub hash: u64,
    pub members: Box<[u32]>,
    /// Its `SrcIPs` on the wire, made when first sent and then shared by every filter
    /// that holds this bucket.
    text: OnceLock<SharedText>,
}

impl Sources {
    /// The sources split by a hash of each address into a power-of-two count of buckets
    /// that grows with them (about `BUCKET_TARGET` each). A node's packet filter goes out
    /// in chunks of one bucket each, so a source joining or leaving changes one chunk, and
    /// an address stays in its bucket while the count stays. Empty buckets are kept (the
    /// index is the bucket's number).
    pub fn buckets(&self) -> &[SourceBucket] {
        self.buckets.get_or_init(|| {
            let count = (self.ips.len() / BUCKET_TARGET).next_power_of_two();
            let mut members: Vec<Vec<u32>> = vec![Vec::new(); count];
            for (i, ip) in self.ips.iter().enumerate() {
                members[(hash_of(ip) as usize) & (count - 1)].push(i as u32);
            }
            members
                .into_iter()
                .map(|m| SourceBucket {
                    hash: hash_of(&m.iter().map(|&i| &self.ips[i as usize]).collect::<Vec<_>>()),
                    members: m.into(),
                    text: OnceLock::new(),
                })
                .collect()
        })
    }

    /// Bucket `b`'s sources as a JSON array, encoded once for every filter holding them.
    pub fn bucket_text(&self, b: usize) -> &SharedText {
        let bucket = &self.buckets()[b];
        bucket.text.get_or_init(|| {
            let ips: Vec<&str> = bucket
                .members
                .iter()
                .map(|&i| self.ips[i as usize].as_str())
                .collect();
            SharedText::new(serde_json::to_string(&ips).expect("strings serialize"))
        })
    }
}

fn hash_of(value: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

impl From<Vec<String>> for Sources {
    fn from(ips: Vec<String>) -> Self {
        Sources {
            hash: hash_of(&ips),
            ips: ips.into(),
            buckets: Arc::default(),
        }
    }
}

impl From<&[String]> for Sources {
    fn from(ips: &[String]) -> Self {
        ips.to_vec().into()
    }
}

impl std::ops::Deref for Sources {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.ips
    }
}

impl PartialEq for Sources {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.ips, &other.ips) || self.ips == other.ips)
    }
}

impl Eq for Sources {}

impl std::hash::Hash for Sources {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// One `tailcfg.FilterRule`.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterRule {
    pub src_ips: Sources,
    pub dst_ports: Vec<(String, PortRange)>,
    pub ip_proto: Vec<u8>,
    pub cap_grant: Vec<CapGrant>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CapGrant {
    pub dsts: Vec<IpNet>,
    pub cap_map: Map<String, Value>,
}

impl FilterRule {
    /// The wire form (`SrcIPs`, `DstPorts`, `IPProto`, `CapGrant`).
    pub fn to_json(&self) -> Value {
        self.to_json_from(&self.src_ips)
    }

    /// The wire form with `sources` (some of the rule's) as its `SrcIPs`.
    pub fn to_json_from<S: serde::Serialize>(&self, sources: &[S]) -> Value {
        let mut m = Map::new();
        m.insert("SrcIPs".into(), json!(sources));
        m.extend(self.members_after_sources());
        Value::Object(m)
    }

    /// The wire form's members other than `SrcIPs`, as `,"DstPorts":…` (empty when there
    /// are none): what follows the sources in `{"SrcIPs":[…]…}`.
    pub fn json_after_sources(&self) -> String {
        self.members_after_sources()
            .into_iter()
            .map(|(key, value)| format!(",\"{key}\":{value}"))
            .collect()
    }

    /// `DstPorts`, `IPProto` and `CapGrant`, those the rule has.
    fn members_after_sources(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if !self.dst_ports.is_empty() {
            let ports: Vec<Value> = self
                .dst_ports
                .iter()
                .map(|(ip, p)| json!({"IP": ip, "Ports": {"First": p.first, "Last": p.last}}))
                .collect();
            m.insert("DstPorts".into(), Value::Array(ports));
        }
        if !self.ip_proto.is_empty() {
            m.insert("IPProto".into(), json!(self.ip_proto));
        }
        if !self.cap_grant.is_empty() {
            let grants: Vec<Value> = self
                .cap_grant
                .iter()
                .map(|g| {
                    let dsts: Vec<String> = g.dsts.iter().map(ToString::to_string).collect();
                    json!({"Dsts": dsts, "CapMap": g.cap_map})
                })
                .collect();
            m.insert("CapGrant".into(), Value::Array(grants));
        }
        m
    }

    /// The rule with `dst_ports` in place of its own (the rest shared).
    fn with_destinations(&self, dst_ports: Vec<(String, PortRange)>) -> FilterRule {
        FilterRule {
            src_ips: self.src_ips.clone(),
            dst_ports,
            ip_proto: self.ip_proto.clone(),
            cap_grant: Vec::new(),
        }
    }

    /// Feeds everything the wire form holds to `h`: a fingerprint without building JSON.
    pub fn hash_into(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        self.src_ips.hash(h);
        self.hash_all_but_sources(h);
    }

    /// Like `hash_into`, without the sources: what a rule grants, to whom aside.
    pub fn hash_all_but_sources(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        self.dst_ports.hash(h);
        self.ip_proto.hash(h);
        self.cap_grant.len().hash(h);
        for g in &self.cap_grant {
            g.dsts.hash(h);
            Value::Object(g.cap_map.clone()).to_string().hash(h);
        }
    }

    /// Every source and destination address of the rule, for visibility checks.
    pub fn matcher(&self) -> Matcher {
        let srcs: Vec<IpSet> = self.src_ips.iter().map(|s| parse_ip_text(s)).collect();
        let mut dsts: Vec<IpSet> = self
            .dst_ports
            .iter()
            .map(|(ip, _)| parse_ip_text(ip))
            .collect();
        for g in &self.cap_grant {
            dsts.push(IpSet::from_nets(g.dsts.iter().copied()));
        }
        Matcher {
            srcs: IpSet::union_of(&srcs),
            dsts: IpSet::union_of(&dsts),
        }
    }
}

/// The sources and destinations of one unreduced rule.
#[derive(Clone, Debug)]
pub struct Matcher {
    pub srcs: IpSet,
    pub dsts: IpSet,
}

/// `*`, an address, a prefix or a `first-last` range.
pub fn parse_ip_text(s: &str) -> IpSet {
    if s == "*" {
        return IpSet::all();
    }
    if let Some(net) = super::model::parse_prefix(s) {
        return IpSet::from_nets([net]);
    }
    if let Some((a, b)) = s.split_once('-')
        && let (Ok(a), Ok(b)) = (a.parse::<IpAddr>(), b.parse::<IpAddr>())
    {
        let mut set = IpSet::new();
        let nets: Vec<IpNet> = match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect()
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect()
            }
            _ => Vec::new(),
        };
        for n in nets {
            set.add_net(&n);
        }
        return set;
    }
    IpSet::new()
}

fn ip_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// A grant with its sources resolved; per-node parts (`autogroup:self`, `via`) wait for
/// the node.
pub struct CompiledGrant {
    pub rules: Vec<FilterRule>,
    /// Every source address, merged.
    pub srcs: IpSet,
    /// Destination prefixes (without `autogroup:self` and `autogroup:internet`).
    pub dst_nets: Vec<IpNet>,
    pub self_part: Option<SelfPart>,
    pub via: Option<ViaPart>,
}

pub struct SelfPart {
    srcs: Vec<IpSet>,
    ip: Vec<ProtoPorts>,
    app: Option<Map<String, Value>>,
}

pub struct ViaPart {
    pub tags: Vec<String>,
    pub internet: bool,
    ip: Vec<ProtoPorts>,
    src_ips: Sources,
}

/// Capabilities whose grant implies a reverse one (the sharer side of Taildrive, the
/// target side of a peer relay).
const COMPANION_CAPS: &[(&str, &str)] = &[
    ("tailscale.com/cap/drive", "tailscale.com/cap/drive-sharer"),
    ("tailscale.com/cap/relay", "tailscale.com/cap/relay-target"),
];

pub fn compile_grants(
    grants: &[Grant],
    resolver: &Resolver,
    routes: &[NodeRoutes],
) -> Vec<CompiledGrant> {
    grants
        .iter()
        .filter_map(|g| compile_grant(g, resolver, routes))
        .collect()
}

fn compile_grant(g: &Grant, resolver: &Resolver, routes: &[NodeRoutes]) -> Option<CompiledGrant> {
    if g.sources.is_empty() || g.dests.is_empty() {
        return None;
    }
    let resolved: Vec<IpSet> = g.sources.iter().map(|s| resolver.resolve(s)).collect();
    let src_ips: Sources = source_strings(g, &resolved, routes).into();
    let mut srcs = IpSet::new();
    for s in &resolved {
        srcs.union(s);
    }
    let dst_nets: Vec<IpNet> = g
        .dests
        .iter()
        .filter(|d| {
            !matches!(
                d,
                Alias::AutoGroup(AutoGroup::SelfDevices | AutoGroup::Internet)
            )
        })
        .flat_map(|d| resolver.resolve(d).prefixes())
        .collect();
    if !g.via.is_empty() {
        return compile_via(g, srcs, dst_nets, src_ips);
    }
    let (selfs, others): (Vec<&Alias>, Vec<&Alias>) = g
        .dests
        .iter()
        .partition(|d| d.is_autogroup(AutoGroup::SelfDevices));
    let mut rules = Vec::new();
    if !others.is_empty() {
        rules = other_dest_rules(g, &others, resolver, routes, &resolved, &src_ips);
    }
    let self_part = (!selfs.is_empty()).then(|| SelfPart {
        srcs: resolved.clone(),
        ip: g.ip.clone(),
        app: g.app.clone(),
    });
    Some(CompiledGrant {
        rules,
        srcs,
        dst_nets,
        self_part,
        via: None,
    })
}

/// `SrcIPs` as Tailscale writes them: the merged sources; with `*` also every approved
/// subnet route and the separate addresses of the other sources; `*` alone for
/// `autogroup:danger-all`.
fn source_strings(g: &Grant, resolved: &[IpSet], routes: &[NodeRoutes]) -> Vec<String> {
    let mut merged = IpSet::new();
    for s in resolved {
        merged.union(s);
    }
    if merged.is_empty() {
        return Vec::new();
    }
    if g.sources
        .iter()
        .any(|s| s.is_autogroup(AutoGroup::DangerAll))
    {
        return vec!["*".into()];
    }
    let mut out = merged.strings();
    if g.sources.contains(&Alias::Wildcard) {
        out.extend(approved_subnets(routes).iter().map(ToString::to_string));
        for (alias, set) in g.sources.iter().zip(resolved) {
            if *alias == Alias::Wildcard {
                continue;
            }
            for s in set.strings() {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    out
}

fn other_dest_rules(
    g: &Grant,
    dests: &[&Alias],
    resolver: &Resolver,
    routes: &[NodeRoutes],
    resolved_srcs: &[IpSet],
    src_ips: &Sources,
) -> Vec<FilterRule> {
    let mut rules = Vec::new();
    for pp in &g.ip {
        let mut dst_ports = Vec::new();
        for d in dests {
            if **d == Alias::Wildcard {
                dst_ports.extend(pp.ports.iter().map(|p| ("*".to_string(), *p)));
                continue;
            }
            for net in resolver.resolve(d).prefixes() {
                dst_ports.extend(pp.ports.iter().map(|p| (ip_text(&net), *p)));
            }
        }
        if !dst_ports.is_empty() && !src_ips.is_empty() {
            rules.push(FilterRule {
                src_ips: src_ips.clone(),
                dst_ports,
                ip_proto: pp.protos.clone(),
                cap_grant: Vec::new(),
            });
        }
    }
    if let Some(app) = &g.app {
        let mut cap_grant = Vec::new();
        let mut dst_strings = Vec::new();
        for d in dests {
            let set = resolver.resolve(d);
            cap_grant.push(CapGrant {
                dsts: set.prefixes(),
                cap_map: app.clone(),
            });
            dst_strings.extend(set.strings());
        }
        if dests.contains(&&Alias::Wildcard) {
            dst_strings.extend(approved_subnets(routes).iter().map(ToString::to_string));
        }
        let src_nets: Vec<IpNet> = resolved_srcs.iter().flat_map(IpSet::prefixes).collect();
        rules.push(FilterRule {
            src_ips: src_ips.clone(),
            dst_ports: Vec::new(),
            ip_proto: Vec::new(),
            cap_grant,
        });
        rules.extend(companion_rules(&dst_strings, &src_nets, app));
    }
    rules
}

fn companion_rules(
    dst_strings: &[String],
    src_nets: &[IpNet],
    app: &Map<String, Value>,
) -> Vec<FilterRule> {
    COMPANION_CAPS
        .iter()
        .filter(|(cap, _)| app.contains_key(*cap))
        .map(|(_, companion)| {
            let mut cap_map = Map::new();
            cap_map.insert((*companion).to_string(), Value::Null);
            FilterRule {
                src_ips: dst_strings.into(),
                dst_ports: Vec::new(),
                ip_proto: Vec::new(),
                cap_grant: vec![CapGrant {
                    dsts: src_nets.to_vec(),
                    cap_map,
                }],
            }
        })
        .collect()
}

/// A `via` grant: no rules of its own until a node carrying one of its tags routes one of
/// its destinations. Kept without `ip` too, for the routes and peers it steers.
fn compile_via(
    g: &Grant,
    srcs: IpSet,
    dst_nets: Vec<IpNet>,
    src_ips: Sources,
) -> Option<CompiledGrant> {
    if srcs.is_empty() {
        return None;
    }
    Some(CompiledGrant {
        rules: Vec::new(),
        srcs,
        dst_nets,
        self_part: None,
        via: Some(ViaPart {
            tags: g.via.clone(),
            internet: g.dests.iter().any(|d| d.is_autogroup(AutoGroup::Internet)),
            ip: g.ip.clone(),
            src_ips,
        }),
    })
}

/// Whether any grant needs per-node compilation.
pub fn needs_per_node(grants: &[CompiledGrant]) -> bool {
    grants
        .iter()
        .any(|g| g.self_part.is_some() || g.via.is_some())
}

/// Rules that hold for every node (before reduction), merged.
pub fn global_rules(grants: &[CompiledGrant]) -> Vec<FilterRule> {
    merge(
        grants
            .iter()
            .flat_map(|g| g.rules.iter().cloned())
            .collect(),
    )
}

/// One user's side of an `autogroup:self` grant, computed once per compile: which of the
/// user's devices are sources, and all of the user's addresses.
pub struct SelfSources {
    src_set: IpSet,
    src_ips: Sources,
    all_ips: Sources,
}

impl SelfSources {
    /// `same`: the user's untagged nodes.
    pub fn new(s: &SelfPart, same: &[usize], routes: &[NodeRoutes]) -> SelfSources {
        let src_set = IpSet::from_addrs(
            same.iter()
                .filter(|&&j| s.srcs.iter().any(|set| routes[j].in_set(set)))
                .flat_map(|&j| routes[j].ips.iter().copied()),
        );
        SelfSources {
            src_ips: src_set.strings().into(),
            src_set,
            all_ips: same
                .iter()
                .flat_map(|&j| routes[j].ips.iter().map(ToString::to_string))
                .collect::<Vec<_>>()
                .into(),
        }
    }
}

/// The `autogroup:self` rules of one node, already reduced to it: its own addresses as
/// destinations, its user's source devices as sources. Equal to reducing the user-wide
/// rules, without building them per node.
pub fn own_self_rules(s: &SelfPart, src: &SelfSources, me: &NodeRoutes) -> Vec<FilterRule> {
    if src.src_ips.is_empty() {
        return Vec::new();
    }
    let mine: Vec<IpNet> = me.ips.iter().map(|ip| IpNet::from(*ip)).collect();
    let mut rules = Vec::new();
    for pp in &s.ip {
        let dst_ports: Vec<(String, PortRange)> = pp
            .ports
            .iter()
            .flat_map(|p| me.ips.iter().map(move |ip| (ip.to_string(), *p)))
            .collect();
        if !dst_ports.is_empty() {
            rules.push(FilterRule {
                src_ips: src.src_ips.clone(),
                dst_ports,
                ip_proto: pp.protos.clone(),
                cap_grant: Vec::new(),
            });
        }
    }
    if let Some(app) = &s.app {
        rules.push(FilterRule {
            src_ips: src.src_ips.clone(),
            dst_ports: Vec::new(),
            ip_proto: Vec::new(),
            cap_grant: vec![CapGrant {
                dsts: mine.clone(),
                cap_map: app.clone(),
            }],
        });
        let mine_as_source: Vec<IpNet> = me
            .ips
            .iter()
            .filter(|ip| src.src_set.contains(**ip))
            .map(|ip| IpNet::from(*ip))
            .collect();
        if !mine_as_source.is_empty() {
            for (_, companion) in COMPANION_CAPS
                .iter()
                .filter(|(cap, _)| app.contains_key(*cap))
            {
                let mut cap_map = Map::new();
                cap_map.insert((*companion).to_string(), Value::Null);
                rules.push(FilterRule {
                    src_ips: src.all_ips.clone(),
                    dst_ports: Vec::new(),
                    ip_proto: Vec::new(),
                    cap_grant: vec![CapGrant {
                        dsts: mine_as_source.clone(),
                        cap_map,
                    }],
                });
            }
        }
    }
    rules
}

pub fn via_rules(
    v: &ViaPart,
    dst_nets: &[IpNet],
    tailnet: &Tailnet,
    routes: &[NodeRoutes],
    i: usize,
) -> Vec<FilterRule> {
    if !v.tags.iter().any(|t| tailnet.nodes[i].tags.contains(t)) {
        return Vec::new();
    }
    let mine = &routes[i];
    let mut nets: Vec<IpNet> = dst_nets
        .iter()
        .filter(|d| mine.subnets.iter().any(|s| overlaps(s, d)))
        .copied()
        .collect();
    if v.internet && mine.is_exit() {
        nets.extend(the_internet().prefixes());
    }
    if nets.is_empty() {
        return Vec::new();
    }
    v.ip.iter()
        .map(|pp| FilterRule {
            src_ips: v.src_ips.clone(),
            dst_ports: nets
                .iter()
                .flat_map(|n| pp.ports.iter().map(move |p| (n.to_string(), *p)))
                .collect(),
            ip_proto: pp.protos.clone(),
            cap_grant: Vec::new(),
        })
        .collect()
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Rules with the same sources and protocols become one, their destinations appended.
pub fn merge(rules: Vec<FilterRule>) -> Vec<FilterRule> {
    let mut out: Vec<FilterRule> = Vec::with_capacity(rules.len());
    let mut index: HashMap<(Sources, Vec<u8>), usize> = HashMap::new();
    for rule in rules {
        if !rule.cap_grant.is_empty() {
            out.push(rule);
            continue;
        }
        let key = (rule.src_ips.clone(), rule.ip_proto.clone());
        match index.get(&key) {
            Some(&i) => out[i].dst_ports.extend(rule.dst_ports),
            None => {
                index.insert(key, out.len());
                out.push(rule);
            }
        }
    }
    out
}

/// The rules of `rules` whose destinations include node `me` (its addresses, its
/// approved subnet routes, or the internet when it is an exit node), trimmed to those
/// destinations.
pub fn reduce(rules: &[FilterRule], me: &NodeRoutes) -> Vec<FilterRule> {
    reduce_prepared(rules, &destinations(rules), me)
}

/// Each rule's destinations parsed once (`reduce_prepared` reads them for every node).
pub fn destinations(rules: &[FilterRule]) -> Vec<Vec<IpSet>> {
    rules
        .iter()
        .map(|r| {
            r.dst_ports
                .iter()
                .map(|(ip, _)| parse_ip_text(ip))
                .collect()
        })
        .collect()
}

/// `reduce` with the rules' destinations already parsed (`destinations`).
pub fn reduce_prepared(
    rules: &[FilterRule],
    dsts: &[Vec<IpSet>],
    me: &NodeRoutes,
) -> Vec<FilterRule> {
    let internet = the_internet();
    let mut out = Vec::new();
    for (rule, sets) in rules.iter().zip(dsts) {
        if !rule.cap_grant.is_empty() {
            out.extend(reduce_cap_rule(rule, me));
            continue;
        }
        let dst_ports: Vec<(String, PortRange)> = rule
            .dst_ports
            .iter()
            .zip(sets)
            .filter(|(_, set)| {
                me.in_set(set)
                    || me.subnets.iter().any(|s| set.overlaps_net(s))
                    || (me.is_exit() && set.is_subset_of(internet))
            })
            .map(|(d, _)| d.clone())
            .collect();
        if !dst_ports.is_empty() {
            out.push(rule.with_destinations(dst_ports));
        }
    }
    out
}

/// The rules' destinations parsed, and where each address appears among them (rule,
/// entry), so that reducing the rules for a node visits the entries that name it rather
/// than all of them.
pub struct DstIndex {
    dsts: Vec<Vec<IpSet>>,
    by_addr: HashMap<IpAddr, Vec<(u32, u32)>>,
    /// Entries naming more than one address (`*`, prefixes, ranges).
    wide: Vec<(u32, u32)>,
    /// Capability rules, with every address their grants name: reduced by their own
    /// destinations, for the nodes among those.
    caps: Vec<(u32, IpSet)>,
}

impl DstIndex {
    pub fn new(rules: &[FilterRule]) -> DstIndex {
        let mut index = DstIndex {
            dsts: destinations(rules),
            by_addr: HashMap::new(),
            wide: Vec::new(),
            caps: Vec::new(),
        };
        for (r, (rule, sets)) in rules.iter().zip(&index.dsts).enumerate() {
            if !rule.cap_grant.is_empty() {
                let named = IpSet::from_nets(rule.cap_grant.iter().flat_map(|g| g.dsts.clone()));
                index.caps.push((r as u32, named));
                continue;
            }
            for (e, set) in sets.iter().enumerate() {
                let at = (r as u32, e as u32);
                match set.single() {
                    Some(ip) => index.by_addr.entry(ip).or_default().push(at),
                    None => index.wide.push(at),
                }
            }
        }
        index
    }
}

/// `reduce_prepared` through the index: the same rules for a node that routes nothing,
/// in O(entries naming it). Routers take the full pass (their subnets match by overlap).
pub fn reduce_indexed(rules: &[FilterRule], index: &DstIndex, me: &NodeRoutes) -> Vec<FilterRule> {
    let dsts = &index.dsts;
    if !me.subnets.is_empty() || me.is_exit() {
        return reduce_prepared(rules, dsts, me);
    }
    let mut picked: Vec<(u32, u32)> = index
        .wide
        .iter()
        .filter(|&&(r, e)| me.in_set(&dsts[r as usize][e as usize]))
        .copied()
        .collect();
    for ip in &me.ips {
        picked.extend(index.by_addr.get(ip).into_iter().flatten());
    }
    picked.extend(
        index
            .caps
            .iter()
            .filter(|(_, named)| me.in_set(named))
            .map(|&(r, _)| (r, 0)),
    );
    picked.sort_unstable();
    picked.dedup();
    let mut out = Vec::new();
    for group in picked.chunk_by(|a, b| a.0 == b.0) {
        let rule = &rules[group[0].0 as usize];
        if !rule.cap_grant.is_empty() {
            out.extend(reduce_cap_rule(rule, me));
            continue;
        }
        let dst_ports = group
            .iter()
            .map(|&(_, e)| rule.dst_ports[e as usize].clone())
            .collect();
        out.push(rule.with_destinations(dst_ports));
    }
    out
}

fn reduce_cap_rule(rule: &FilterRule, me: &NodeRoutes) -> Option<FilterRule> {
    let mut cap_grant = Vec::new();
    for g in &rule.cap_grant {
        let mut dsts: Vec<IpNet> = Vec::new();
        for d in &g.dsts {
            for ip in &me.ips {
                if d.contains(ip) {
                    dsts.push(IpNet::from(*ip));
                }
            }
        }
        for d in &g.dsts {
            for s in &me.subnets {
                if overlaps(d, s) {
                    dsts.push(*d);
                }
            }
        }
        if !dsts.is_empty() {
            dsts.sort();
            dsts.dedup();
            cap_grant.push(CapGrant {
                dsts,
                cap_map: g.cap_map.clone(),
            });
        }
    }
    (!cap_grant.is_empty()).then(|| FilterRule {
        src_ips: rule.src_ips.clone(),
        dst_ports: Vec::new(),
        ip_proto: Vec::new(),
        cap_grant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(srcs: &[&str], dsts: &[&str]) -> FilterRule {
        FilterRule {
            src_ips: srcs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .into(),
            dst_ports: dsts
                .iter()
                .map(|d| {
                    (
                        d.to_string(),
                        PortRange {
                            first: 22,
                            last: 22,
                        },
                    )
                })
                .collect(),
            ip_proto: vec![],
            cap_grant: vec![],
        }
    }

    #[test]
    fn the_indexed_reduction_equals_the_full_pass() {
        let mut cap = rule(&["100.64.0.9"], &[]);
        cap.cap_grant = vec![CapGrant {
            dsts: vec!["100.64.0.2/32".parse().unwrap()],
            cap_map: Map::new(),
        }];
        let rules = vec![
            rule(&["*"], &["100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::2"]),
            rule(&["100.64.0.3"], &["*"]),
            rule(&["100.64.0.4"], &["100.64.0.0/30", "100.64.0.5-100.64.0.7"]),
            cap,
            rule(&["100.64.0.5"], &["100.64.0.2", "100.64.0.6"]),
        ];
        let dsts = destinations(&rules);
        let index = DstIndex::new(&rules);
        for last in 1..=9u8 {
            let me = NodeRoutes {
                ips: vec![
                    IpAddr::from([100, 64, 0, last]),
                    format!("fd7a:115c:a1e0::{last}").parse().unwrap(),
                ],
                subnets: vec![],
                exits: vec![],
                primary: vec![],
            };
            let full = reduce_prepared(&rules, &dsts, &me);
            assert!(!full.is_empty());
            assert_eq!(reduce_indexed(&rules, &index, &me), full, "node .{last}");
        }
    }
}

//! The policy file: HuJSON text parsed into checked rules. Every refusal names the
//! offending entry, worded as Tailscale's API words it where the two agree.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value};

/// A refused policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

/// Who or what a rule names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Alias {
    Wildcard,
    /// `name@` or an email; matched against users' names and emails.
    User(String),
    Group(String),
    Tag(String),
    /// A name from `hosts`.
    Host(String),
    Prefix(IpNet),
    AutoGroup(AutoGroup),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoGroup {
    Internet,
    Member,
    Tagged,
    SelfDevices,
    NonRoot,
    DangerAll,
}

impl AutoGroup {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "autogroup:internet" => Self::Internet,
            "autogroup:member" => Self::Member,
            "autogroup:tagged" => Self::Tagged,
            "autogroup:self" => Self::SelfDevices,
            "autogroup:nonroot" => Self::NonRoot,
            "autogroup:danger-all" => Self::DangerAll,
            _ => return None,
        })
    }
}

impl Alias {
    pub fn parse(s: &str) -> Result<Alias, PolicyError> {
        if let Some(net) = parse_prefix(s) {
            return Ok(Alias::Prefix(net));
        }
        Ok(if s == "*" {
            Alias::Wildcard
        } else if s.contains('@') {
            Alias::User(s.to_string())
        } else if s.starts_with("group:") {
            Alias::Group(s.to_string())
        } else if s.starts_with("tag:") {
            Alias::Tag(s.to_string())
        } else if s.starts_with("autogroup:") {
            match AutoGroup::parse(s) {
                Some(ag) => Alias::AutoGroup(ag),
                None => return err(format!("unknown autogroup {s:?}")),
            }
        } else if !s.is_empty() && !s.contains(':') {
            Alias::Host(s.to_string())
        } else {
            return err(format!("invalid alias {s:?}"));
        })
    }

    pub fn is_autogroup(&self, ag: AutoGroup) -> bool {
        matches!(self, Alias::AutoGroup(a) if *a == ag)
    }
}

/// An address (as a host prefix) or a CIDR; the address part is masked as Tailscale does.
pub fn parse_prefix(s: &str) -> Option<IpNet> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    let net: IpNet = s.parse().ok()?;
    Some(net.trunc())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

pub const ANY_PORT: PortRange = PortRange {
    first: 0,
    last: 65535,
};

/// One `ip` entry of a grant (or an ACL's protocol with a destination's ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtoPorts {
    /// IANA protocol numbers; empty means Tailscale's default set.
    pub protos: Vec<u8>,
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Debug)]
pub struct Grant {
    pub sources: Vec<Alias>,
    pub dests: Vec<Alias>,
    pub ip: Vec<ProtoPorts>,
    /// The `app` capability map, kept as written.
    pub app: Option<Map<String, Value>>,
    pub via: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SshAction {
    Accept,
    Check,
}

#[derive(Clone, Debug)]
pub struct SshRule {
    pub action: SshAction,
    pub sources: Vec<Alias>,
    pub dests: Vec<Alias>,
    pub users: Vec<String>,
    pub accept_env: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct NodeAttr {
    pub targets: Vec<Alias>,
    pub attrs: Vec<String>,
}

/// A parsed, checked policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub groups: BTreeMap<String, Vec<String>>,
    pub hosts: BTreeMap<String, IpNet>,
    pub tag_owners: BTreeMap<String, Vec<String>>,
    /// ACLs (as grants, one per destination) followed by the grants; without either, one
    /// grant that allows everything.
    pub grants: Vec<Grant>,
    /// True when the file has neither `acls` nor `grants`.
    pub default_allow: bool,
    pub route_approvers: Vec<(IpNet, Vec<Alias>)>,
    pub exit_approvers: Vec<Alias>,
    pub ssh: Vec<SshRule>,
    pub node_attrs: Vec<NodeAttr>,
    /// `tests`: checked before the policy is accepted (`checks::run`).
    pub tests: Vec<super::checks::AclTest>,
    /// `sshTests`: likewise.
    pub ssh_tests: Vec<super::checks::SshTest>,
}

const TOP_LEVEL: &[&str] = &[
    "groups",
    "hosts",
    "tagOwners",
    "acls",
    "grants",
    "autoApprovers",
    "ssh",
    "nodeAttrs",
    "tests",
    "sshTests",
    "randomizeClientPort",
];

impl Policy {
    /// Parses HuJSON text (JSON with comments and trailing commas).
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        // Plain JSON first: the HuJSON parser mishandles escaped surrogate pairs.
        let value = match serde_json::from_str::<Value>(text) {
            Ok(v) => v,
            Err(_) => jsonc_parser::parse_to_serde_value(text, &Default::default())
                .map_err(|e| PolicyError(format!("parsing policy: {e}")))?
                .unwrap_or(Value::Object(Map::new())),
        };
        let Value::Object(top) = value else {
            return err("parsing policy: the top level must be an object");
        };
        for key in top.keys() {
            if !TOP_LEVEL.contains(&key.as_str()) && !key.starts_with('#') {
                return err(format!("unknown field {key:?}"));
            }
        }
        let mut policy = Policy {
            groups: parse_groups(top.get("groups"))?,
            hosts: parse_hosts(top.get("hosts"))?,
            tag_owners: parse_tag_owners(top.get("tagOwners"))?,
            ..Policy::default()
        };
        let acls = top.get("acls").map(|v| list(v, "acls")).transpose()?;
        let grants = top.get("grants").map(|v| list(v, "grants")).transpose()?;
        if acls.is_some() || grants.is_some() {
            let mut all = Vec::new();
            for acl in acls.unwrap_or(&[]) {
                all.extend(policy.parse_acl(acl)?);
            }
            for grant in grants.unwrap_or(&[]) {
                all.push(policy.parse_grant(grant)?);
            }
            policy.grants = all;
        } else {
            // Tailscale's default: every node may reach every node on every port.
            policy.default_allow = true;
            policy.grants = vec![Grant {
                sources: vec![Alias::Wildcard],
                dests: vec![Alias::Wildcard],
                ip: vec![ProtoPorts {
                    protos: Vec::new(),
                    ports: vec![ANY_PORT],
                }],
                app: None,
                via: Vec::new(),
            }];
        }
        policy.parse_auto_approvers(top.get("autoApprovers"))?;
        for rule in section(&top, "ssh")? {
            let rule = policy.parse_ssh(rule)?;
            policy.ssh.push(rule);
        }
        for attr in section(&top, "nodeAttrs")? {
            let attr = policy.parse_node_attr(attr)?;
            policy.node_attrs.push(attr);
        }
        for test in section(&top, "tests")? {
            let test = policy.parse_test(test)?;
            policy.tests.push(test);
        }
        for test in section(&top, "sshTests")? {
            let test = policy.parse_ssh_test(test)?;
            policy.ssh_tests.push(test);
        }
        Ok(policy)
    }

    /// Whether a user (by name, or email when the name is one) may apply `tag` to its
    /// nodes: `tagOwners` names the user, or a group the user is in.
    pub fn user_owns_tag(&self, user: &str, tag: &str) -> bool {
        let is_user = |token: &str| {
            let bare = token.strip_suffix('@').unwrap_or(token);
            bare == user || bare == user.strip_suffix('@').unwrap_or(user)
        };
        self.tag_owners.get(tag).is_some_and(|owners| {
            owners.iter().any(|o| {
                if o.starts_with("group:") {
                    self.groups
                        .get(o)
                        .is_some_and(|m| m.iter().any(|u| is_user(u)))
                } else {
                    is_user(o)
                }
            })
        })
    }

    pub(super) fn check_tag(&self, tag: &str) -> Result<(), PolicyError> {
        if self.tag_owners.contains_key(tag) {
            Ok(())
        } else {
            err(format!("tag not found: {tag:?}"))
        }
    }

    pub(super) fn check_group(&self, group: &str) -> Result<(), PolicyError> {
        if self.groups.contains_key(group) {
            Ok(())
        } else {
            err(format!("group not defined in policy: {group:?}"))
        }
    }

    pub(super) fn check_host(&self, host: &str) -> Result<(), PolicyError> {
        if self.hosts.contains_key(host) {
            Ok(())
        } else {
            err(format!("host not defined in policy: {host:?}"))
        }
    }

    /// ACL → grants: one per destination, `autogroup:self` destinations last (as Tailscale
    /// orders them when other destinations are present).
    fn parse_acl(&self, v: &Value) -> Result<Vec<Grant>, PolicyError> {
        let obj = object(v, "acls entry")?;
        match obj.get("action").and_then(Value::as_str) {
            Some("accept") => {}
            other => {
                return err(format!(
                    "action={:?} is not supported: invalid ACL action",
                    other.unwrap_or("")
                ));
            }
        }
        let protos = match obj.get("proto").or_else(|| obj.get("ipProto")) {
            None => Vec::new(),
            Some(p) => parse_protocol(&scalar_string(p, "proto")?)?,
        };
        let sources = self.parse_sources(obj.get("src"), "src")?;
        let mut dests = Vec::new();
        for d in strings(obj.get("dst"), "dst")? {
            let (alias, ports) = split_dest(&d)?;
            let alias = Alias::parse(&alias)?;
            match &alias {
                Alias::Tag(t) => self
                    .check_tag(t)
                    .map_err(|e| PolicyError(format!("dst={t:?}: {e}")))?,
                Alias::Group(g) => self.check_group(g)?,
                Alias::Host(h) => self.check_host(h)?,
                Alias::AutoGroup(AutoGroup::DangerAll) => {
                    return err("cannot use autogroup:danger-all as a dst");
                }
                Alias::AutoGroup(AutoGroup::NonRoot) => {
                    return err("autogroup:nonroot is not valid as an ACL destination");
                }
                _ => {}
            }
            if !protos.is_empty()
                && ports != [ANY_PORT]
                && !protos.iter().all(|p| matches!(p, 6 | 17 | 132))
            {
                return err(format!(
                    "dst={d:?}: protocol does not support specific ports"
                ));
            }
            dests.push((alias, ports));
        }
        if dests
            .iter()
            .any(|(a, _)| a.is_autogroup(AutoGroup::SelfDevices))
        {
            check_self_sources(&sources, true)?;
        }
        let only_autogroups = dests.iter().all(|(a, _)| matches!(a, Alias::AutoGroup(_)));
        let (selfs, others): (Vec<_>, Vec<_>) = dests
            .into_iter()
            .partition(|(a, _)| !only_autogroups && a.is_autogroup(AutoGroup::SelfDevices));
        Ok(others
            .into_iter()
            .chain(selfs)
            .map(|(alias, ports)| Grant {
                sources: sources.clone(),
                dests: vec![alias],
                ip: vec![ProtoPorts {
                    protos: protos.clone(),
                    ports,
                }],
                app: None,
                via: Vec::new(),
            })
            .collect())
    }

    fn parse_sources(&self, v: Option<&Value>, what: &str) -> Result<Vec<Alias>, PolicyError> {
        let mut out = Vec::new();
        for s in strings(v, what)? {
            let alias = Alias::parse(&s)?;
            match &alias {
                Alias::Tag(t) => self
                    .check_tag(t)
                    .map_err(|e| PolicyError(format!("src={e}")))?,
                Alias::Group(g) => self.check_group(g)?,
                Alias::Host(h) => self.check_host(h)?,
                Alias::AutoGroup(AutoGroup::SelfDevices) => {
                    return err("\"autogroup:self\" not valid on the src side of a rule");
                }
                Alias::AutoGroup(AutoGroup::Internet) => {
                    return err("autogroup:internet can only be used in ACL destinations");
                }
                Alias::AutoGroup(AutoGroup::NonRoot) => {
                    return err("autogroup:nonroot is not valid as a source");
                }
                _ => {}
            }
            out.push(alias);
        }
        Ok(out)
    }

    fn parse_grant(&self, v: &Value) -> Result<Grant, PolicyError> {
        let obj = object(v, "grants entry")?;
        let sources = self.parse_sources(obj.get("src"), "src")?;
        let mut dests = Vec::new();
        for d in strings(obj.get("dst"), "dst")? {
            let alias = Alias::parse(&d)?;
            match &alias {
                Alias::Tag(t) if !self.tag_owners.contains_key(t) => {
                    return err(format!("tag {t:?} not found"));
                }
                Alias::Group(g) => self.check_group(g)?,
                Alias::Host(h) => self.check_host(h)?,
                Alias::Prefix(net) if net.prefix_len() == 0 => {
                    return err(format!(
                        "dst {d:?}: to allow all IP addresses, use \"*\" or \"autogroup:internet\""
                    ));
                }
                Alias::AutoGroup(AutoGroup::DangerAll) => {
                    return err("cannot use autogroup:danger-all as a dst");
                }
                Alias::AutoGroup(AutoGroup::NonRoot) => {
                    return err("autogroup:nonroot is not valid as a grant destination");
                }
                _ => {}
            }
            dests.push(alias);
        }
        let mut ip = Vec::new();
        for entry in strings(obj.get("ip"), "ip")? {
            ip.push(parse_proto_ports(&entry)?);
        }
        let app = match obj.get("app") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) if !m.is_empty() => {
                for name in m.keys() {
                    check_capability_name(name)?;
                }
                Some(m.clone())
            }
            Some(Value::Object(_)) => None,
            Some(_) => return err("grant app must be an object"),
        };
        if ip.is_empty() && app.is_none() {
            return err("ip and app can not both be empty");
        }
        if app.is_some() && dests.iter().any(|d| d.is_autogroup(AutoGroup::Internet)) {
            return err("cannot use app grants with autogroup:internet");
        }
        let mut via = Vec::new();
        for t in strings(obj.get("via"), "via")? {
            if !t.starts_with("tag:") {
                return err(format!("via can only be a tag: {t:?}"));
            }
            if !self.tag_owners.contains_key(&t) {
                return err(format!("tag {t:?} not found"));
            }
            via.push(t);
        }
        if dests.iter().any(|d| d.is_autogroup(AutoGroup::SelfDevices)) {
            check_self_sources(&sources, false)?;
        }
        Ok(Grant {
            sources,
            dests,
            ip,
            app,
            via,
        })
    }

    fn parse_auto_approvers(&mut self, v: Option<&Value>) -> Result<(), PolicyError> {
        let Some(v) = v else { return Ok(()) };
        let obj = object(v, "autoApprovers")?;
        if let Some(routes) = obj.get("routes") {
            for (prefix, approvers) in object(routes, "autoApprovers.routes")? {
                let Some(net) = parse_prefix(prefix) else {
                    return err(format!("autoApprovers.routes: invalid prefix {prefix:?}"));
                };
                let aliases = self.parse_approvers(Some(approvers))?;
                self.route_approvers.push((net, aliases));
            }
        }
        self.exit_approvers = self.parse_approvers(obj.get("exitNode"))?;
        Ok(())
    }

    fn parse_approvers(&self, v: Option<&Value>) -> Result<Vec<Alias>, PolicyError> {
        let mut out = Vec::new();
        for s in strings(v, "autoApprovers")? {
            let alias = Alias::parse(&s)?;
            match &alias {
                Alias::Tag(t) => self.check_tag(t)?,
                Alias::Group(g) => self.check_group(g)?,
                Alias::User(_) => {}
                _ => return err(format!("invalid auto approver {s:?}")),
            }
            out.push(alias);
        }
        Ok(out)
    }

    fn parse_node_attr(&self, v: &Value) -> Result<NodeAttr, PolicyError> {
        let obj = object(v, "nodeAttrs entry")?;
        let mut targets = Vec::new();
        for s in strings(obj.get("target"), "target")? {
            let alias = Alias::parse(&s)?;
            match &alias {
                Alias::Tag(t) => self.check_tag(t)?,
                Alias::Group(g) => self.check_group(g)?,
                _ => {}
            }
            targets.push(alias);
        }
        Ok(NodeAttr {
            targets,
            attrs: strings(obj.get("attr"), "attr")?,
        })
    }
}

/// `autogroup:self` as a destination admits only users, groups and `autogroup:member`
/// (and, for ACLs, `*`).
fn check_self_sources(sources: &[Alias], wildcard_ok: bool) -> Result<(), PolicyError> {
    for s in sources {
        let ok = match s {
            Alias::User(_) | Alias::Group(_) => true,
            Alias::AutoGroup(AutoGroup::Member) => true,
            Alias::Wildcard => wildcard_ok,
            _ => false,
        };
        if !ok {
            return err(
                "autogroup:self can only be used with users, groups, or supported autogroups",
            );
        }
    }
    Ok(())
}

const TAILSCALE_CAPS: &[&str] = &[
    "tailscale.com/cap/drive",
    "tailscale.com/cap/relay",
    "tailscale.com/cap/webui",
    "tailscale.com/cap/kubernetes",
    "tailscale.com/cap/tsidp",
    "tailscale.com/cap/secrets",
];

fn check_capability_name(name: &str) -> Result<(), PolicyError> {
    let Some((domain, path)) = name.split_once('/') else {
        return err("capability name must have the form {domain}/{path}");
    };
    if name.contains("://") || domain.is_empty() || path.is_empty() {
        return err("capability name must have the form {domain}/{path}");
    }
    if domain == "tailscale.com" && !TAILSCALE_CAPS.contains(&name) {
        return err("capability name must not be in the tailscale.com domain");
    }
    Ok(())
}

/// `alias:ports`, splitting at the last colon (IPv6 in brackets allowed).
pub(super) fn split_dest(d: &str) -> Result<(String, Vec<PortRange>), PolicyError> {
    let mut input = d.to_string();
    if let Some(rest) = d.strip_prefix('[') {
        let Some((host, tail)) = rest.split_once(']') else {
            return err(format!(
                "dst={d:?}: square brackets are only valid around IPv6 addresses"
            ));
        };
        if !matches!(host.parse::<IpAddr>(), Ok(IpAddr::V6(_))) {
            return err(format!(
                "dst={d:?}: square brackets are only valid around IPv6 addresses"
            ));
        }
        input = format!("{host}{tail}");
    }
    let Some(i) = input.rfind(':') else {
        return err(format!("dst={d:?}: hostport must contain a colon"));
    };
    if i == 0 || i == input.len() - 1 {
        return err(format!("dst={d:?}: hostport must contain a colon"));
    }
    let (alias, ports) = (&input[..i], &input[i + 1..]);
    let ports = parse_ports(ports).map_err(|e| PolicyError(format!("dst={d:?}: {e}")))?;
    Ok((alias.to_string(), ports))
}

/// `*`, or a comma-separated list of ports and `first-last` ranges.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, PolicyError> {
    if s == "*" {
        return Ok(vec![ANY_PORT]);
    }
    let bad = |why: &str| PolicyError(format!("port range {s:?}: {why}"));
    let mut out = Vec::new();
    for part in s.split(',') {
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad("invalid first integer"));
        if let Some((a, b)) = part.split_once('-') {
            let (first, last) = (port(a)?, port(b)?);
            if first > last {
                return Err(bad(
                    "invalid port range: first port is greater than last port",
                ));
            }
            out.push(PortRange { first, last });
        } else {
            let p = port(part)?;
            if p == 0 {
                return Err(bad("first port must be >0, or use '*' for wildcard"));
            }
            out.push(PortRange { first: p, last: p });
        }
    }
    Ok(out)
}

/// A grant's `ip` entry: `*`, `PORTS`, or `PROTO:PORTS`.
fn parse_proto_ports(s: &str) -> Result<ProtoPorts, PolicyError> {
    if s == "*" {
        return Ok(ProtoPorts {
            protos: Vec::new(),
            ports: vec![ANY_PORT],
        });
    }
    match s.split_once(':') {
        None => Ok(ProtoPorts {
            protos: Vec::new(),
            ports: parse_ports(s)?,
        }),
        Some((proto, ports)) => {
            if ports.contains(':') {
                return err(format!(
                    "{s:?}: expected only one colon in Internet protocol and port type"
                ));
            }
            Ok(ProtoPorts {
                protos: parse_protocol(proto)?,
                ports: parse_ports(ports)?,
            })
        }
    }
}

const PROTOCOLS: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("ipv4", 4),
    ("ip-in-ip", 4),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("sctp", 132),
    ("fc", 133),
];

/// A protocol name or number as IANA numbers; empty for "any".
pub(super) fn parse_protocol(p: &str) -> Result<Vec<u8>, PolicyError> {
    let lower = p.to_ascii_lowercase();
    if lower.is_empty() {
        return Ok(Vec::new());
    }
    if lower == "*" {
        return err(
            "proto name \"*\" not known; use protocol number 0-255 or protocol name (icmp, tcp, udp, etc.)",
        );
    }
    if let Some((_, n)) = PROTOCOLS.iter().find(|(name, _)| *name == lower) {
        return Ok(vec![*n]);
    }
    if lower.starts_with('0') {
        return err(format!("leading 0 not permitted in protocol number: {p:?}"));
    }
    match lower.parse::<u32>() {
        Ok(n) if n <= 255 => Ok(vec![n as u8]),
        Ok(n) => err(format!("protocol number out of range (0-255): {n}")),
        Err(_) => err(format!(
            "invalid protocol number: {p:?} must be a known protocol name or valid protocol number 0-255"
        )),
    }
}

fn parse_groups(v: Option<&Value>) -> Result<BTreeMap<String, Vec<String>>, PolicyError> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return Ok(out) };
    let obj = object(v, "groups")?;
    for (name, members) in obj {
        if !name.starts_with("group:") {
            return err(format!("group must start with 'group:', got: {name:?}"));
        }
        let Value::Array(items) = members else {
            return err(format!(
                "group value must be an array of users: group {name:?}"
            ));
        };
        let mut list = Vec::new();
        for item in items {
            let Some(s) = item.as_str() else {
                return err(format!(
                    "invalid group member type: group {name:?} expected string"
                ));
            };
            list.push(s.to_string());
        }
        out.insert(name.clone(), list);
    }
    // Checked in reverse name order, as Tailscale reports the first it meets.
    for (name, members) in out.iter().rev() {
        if let Some(inner) = members.iter().find(|m| m.starts_with("group:")) {
            return err(format!(
                "groups[{name:?}]: {inner:?}: group members cannot be recursive"
            ));
        }
    }
    for members in out.values() {
        for m in members {
            if !m.contains('@') {
                return err(format!("username must contain @, got: {m:?}"));
            }
        }
    }
    Ok(out)
}

fn parse_hosts(v: Option<&Value>) -> Result<BTreeMap<String, IpNet>, PolicyError> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return Ok(out) };
    for (name, addr) in object(v, "hosts")? {
        let text = addr.as_str().unwrap_or_default();
        let Some(net) = parse_prefix(text) else {
            return err(format!(
                "hostname contains invalid IP address: hostname {name:?} address {addr}"
            ));
        };
        if name.is_empty() || name.contains(':') || name.contains('@') {
            return err(format!("invalid hostname: {name:?}"));
        }
        out.insert(name.clone(), net);
    }
    Ok(out)
}

fn parse_tag_owners(v: Option<&Value>) -> Result<BTreeMap<String, Vec<String>>, PolicyError> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return Ok(out) };
    for (tag, owners) in object(v, "tagOwners")? {
        check_tag_name(tag).map_err(|e| PolicyError(format!("tagOwners[{tag:?}]: {e}")))?;
        let owners = strings(Some(owners), "tagOwners")?;
        for o in &owners {
            if !(o.contains('@') || o.starts_with("group:") || o.starts_with("tag:")) {
                return err(format!("invalid owner format: {o:?}"));
            }
        }
        out.insert(tag.clone(), owners);
    }
    Ok(out)
}

fn check_tag_name(tag: &str) -> Result<(), PolicyError> {
    let Some(name) = tag.strip_prefix("tag:") else {
        return err(format!("tag must start with 'tag:', got: {tag:?}"));
    };
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return err("tag names must start with a letter, after 'tag:'");
    }
    Ok(())
}

pub(super) fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, PolicyError> {
    v.as_object()
        .ok_or_else(|| PolicyError(format!("{what} must be an object")))
}

/// The entries of top-level list `key` (none when absent).
fn section<'a>(top: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], PolicyError> {
    Ok(top
        .get(key)
        .map(|v| list(v, key))
        .transpose()?
        .unwrap_or(&[]))
}

fn list<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], PolicyError> {
    v.as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| PolicyError(format!("{what} must be a list")))
}

pub(super) fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>, PolicyError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                // Tailscale ignores spaces around names.
                i.as_str()
                    .map(|s| s.trim().to_string())
                    .ok_or_else(|| PolicyError(format!("{what}: expected strings, got {i}")))
            })
            .collect(),
        Some(other) => err(format!("{what}: expected a list of strings, got {other}")),
    }
}

pub(super) fn scalar_string(v: &Value, what: &str) -> Result<String, PolicyError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => err(format!("{what}: expected a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hujson_comments_and_trailing_commas_parse() {
        let p = Policy::parse(
            "// team policy\n{\n  \"groups\": {\"group:a\": [\"alice@\",],}, /* block */\n  \"acls\": [{\"action\": \"accept\", \"src\": [\"group:a\"], \"dst\": [\"*:22,80-81\"]},],\n}",
        )
        .unwrap();
        assert!(!p.default_allow);
        assert_eq!(p.grants.len(), 1);
        assert_eq!(
            p.grants[0].ip[0].ports,
            [
                PortRange {
                    first: 22,
                    last: 22
                },
                PortRange {
                    first: 80,
                    last: 81
                }
            ]
        );
        assert!(
            Policy::parse("").unwrap().default_allow,
            "no policy allows all"
        );
        assert!(
            !Policy::parse(r#"{"acls": []}"#).unwrap().default_allow,
            "[] denies all"
        );
    }

    #[test]
    fn aliases_are_told_apart() {
        for (text, want) in [
            ("*", Alias::Wildcard),
            ("alice@", Alias::User("alice@".into())),
            ("alice@example.com", Alias::User("alice@example.com".into())),
            ("group:eng", Alias::Group("group:eng".into())),
            ("tag:web", Alias::Tag("tag:web".into())),
            ("autogroup:self", Alias::AutoGroup(AutoGroup::SelfDevices)),
            ("db", Alias::Host("db".into())),
            ("10.1.2.3", Alias::Prefix("10.1.2.3/32".parse().unwrap())),
            ("10.1.2.3/16", Alias::Prefix("10.1.0.0/16".parse().unwrap())),
            ("fd7a::1", Alias::Prefix("fd7a::1/128".parse().unwrap())),
        ] {
            assert_eq!(Alias::parse(text).unwrap(), want, "{text}");
        }
        assert!(Alias::parse("autogroup:everyone").is_err());
    }

    #[test]
    fn refusals_name_the_problem() {
        let refused = |text: &str| Policy::parse(text).unwrap_err().0;
        assert_eq!(
            refused(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:0"]}]}"#),
            "dst=\"*:0\": port range \"0\": first port must be >0, or use '*' for wildcard"
        );
        assert_eq!(
            refused(r#"{"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]}"#),
            "group not defined in policy: \"group:x\""
        );
        assert!(refused(r#"{"nope": 1}"#).contains("unknown field \"nope\""));
        assert!(
            refused(
                r#"{"acls": [{"action": "accept", "proto": "*", "src": ["*"], "dst": ["*:*"]}]}"#
            )
            .contains("proto name \"*\" not known")
        );
        assert!(
            refused(r#"{"groups": {"group:a": ["group:b"], "group:b": []}}"#)
                .contains("group members cannot be recursive")
        );
    }

    #[test]
    fn tag_owners_name_users_directly_or_through_groups() {
        let p = Policy::parse(
            r#"{"groups": {"group:ops": ["carol@"]},
                "tagOwners": {"tag:a": ["alice@"], "tag:b": ["group:ops"], "tag:c": ["tag:a"]}}"#,
        )
        .unwrap();
        assert!(p.user_owns_tag("alice", "tag:a"));
        assert!(p.user_owns_tag("carol", "tag:b"));
        assert!(!p.user_owns_tag("alice", "tag:b"));
        assert!(
            !p.user_owns_tag("alice", "tag:c"),
            "a tag owner is not a user"
        );
        assert!(!p.user_owns_tag("alice", "tag:unknown"));
    }
}

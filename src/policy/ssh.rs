//! The `ssh` section: parsed and checked with the rest of the policy, compiled per
//! destination node into `SSHPolicy.rules`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};

use super::ipset::IpSet;
use super::model::{Alias, AutoGroup, Policy, PolicyError, SshAction, SshRule, object, strings};
use super::resolve::{Resolver, email_domain};
use super::tailnet::{NodeRoutes, Tailnet};

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

/// Longest check period Tailscale accepts.
const MAX_CHECK_PERIOD_SECS: f64 = 168.0 * 3600.0;

impl Policy {
    pub(super) fn parse_ssh(&self, v: &Value) -> Result<SshRule, PolicyError> {
        let obj = object(v, "ssh entry")?;
        let action = match obj
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
        {
            "" => return err("action must be specified"),
            "accept" => SshAction::Accept,
            "check" => SshAction::Check,
            other => return err(format!("{other:?} is not a valid action")),
        };
        if let Some(period) = obj.get("checkPeriod").filter(|p| !p.is_null()) {
            let text = period.as_str().unwrap_or_default();
            if action != SshAction::Check {
                return err("checkPeriod is only valid with action \"check\"");
            }
            if text != "always" {
                let secs = parse_go_duration(text)
                    .ok_or_else(|| PolicyError(format!("time: invalid duration {text:?}")))?;
                if secs <= 0.0 {
                    return err(format!(
                        "checkPeriod {} must be a positive duration",
                        format_go_duration(secs)
                    ));
                }
                if secs > MAX_CHECK_PERIOD_SECS {
                    return err(format!(
                        "checkPeriod {} is above the max (168h)",
                        format_go_duration(secs)
                    ));
                }
            }
        }
        let users = strings(obj.get("users"), "users")?;
        if users.is_empty() {
            return err("users must be specified");
        }
        for u in &users {
            if u.is_empty() || u == "*" {
                return err(format!("user {u:?} is not valid"));
            }
        }
        let accept_env = strings(obj.get("acceptEnv"), "acceptEnv")?;
        if accept_env.iter().any(String::is_empty) {
            return err("acceptEnv values cannot be empty");
        }
        let mut sources = Vec::new();
        for s in strings(obj.get("src"), "src")? {
            let alias = Alias::parse(&s)?;
            match &alias {
                Alias::Tag(t) => {
                    if !self.tag_owners.contains_key(t) {
                        return err(format!("tag not found: {t:?}"));
                    }
                }
                Alias::Group(g) => {
                    if !self.groups.contains_key(g) {
                        return err(format!("group not defined in policy: {g:?}"));
                    }
                }
                Alias::User(_) => {}
                Alias::AutoGroup(AutoGroup::Member | AutoGroup::Tagged) => {}
                _ => return err(format!("alias not supported for SSH source: {s:?}")),
            }
            sources.push(alias);
        }
        let mut dests = Vec::new();
        for d in strings(obj.get("dst"), "dst")? {
            let alias = Alias::parse(&d)?;
            match &alias {
                Alias::Wildcard => {
                    return err("wildcard (*) is not supported as SSH destination");
                }
                Alias::Host(_) | Alias::Prefix(_) => return err(format!("invalid dst {d:?}")),
                Alias::Tag(t) => {
                    if !self.tag_owners.contains_key(t) {
                        return err(format!("tag not found: {t:?}"));
                    }
                }
                Alias::Group(_) => return err(format!("invalid dst {d:?}")),
                Alias::AutoGroup(
                    AutoGroup::Member | AutoGroup::Tagged | AutoGroup::SelfDevices,
                )
                | Alias::User(_) => {}
                _ => return err(format!("alias not supported for SSH destination: {d:?}")),
            }
            dests.push(alias);
        }
        check_ssh_pairing(&sources, &dests)?;
        Ok(SshRule {
            action,
            sources,
            dests,
            users,
            accept_env,
        })
    }
}

/// Tagged sources may not reach user-owned devices; a user destination only from that
/// same user.
fn check_ssh_pairing(sources: &[Alias], dests: &[Alias]) -> Result<(), PolicyError> {
    let tagged = sources
        .iter()
        .any(|s| matches!(s, Alias::Tag(_)) || s.is_autogroup(AutoGroup::Tagged));
    let groups = sources
        .iter()
        .any(|s| matches!(s, Alias::Group(_)) || s.is_autogroup(AutoGroup::Member));
    let users: Vec<&String> = sources
        .iter()
        .filter_map(|s| match s {
            Alias::User(u) => Some(u),
            _ => None,
        })
        .collect();
    for d in dests {
        match d {
            Alias::User(u) if tagged => {
                return err(format!(
                    "tags in SSH source cannot access user-owned devices ({u}); use autogroup:tagged or specific tags as destinations instead"
                ));
            }
            Alias::User(u) if groups || users.len() != 1 || users[0] != u => {
                return err(format!(
                    "user destination requires source to contain only that same user {u:?}; use autogroup:self instead for same-user SSH access"
                ));
            }
            Alias::AutoGroup(AutoGroup::SelfDevices) if tagged => {
                return err(
                    "autogroup:self destination requires source to contain only users or groups, not tags or autogroup:tagged",
                );
            }
            Alias::AutoGroup(AutoGroup::Member) if tagged => {
                return err(
                    "tags in SSH source cannot access autogroup:member (user-owned devices)",
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks that need the tailnet: `user:*@domain` and `localpart:*@domain` must name the
/// tailnet's own domain (that of its first user).
pub fn check_domains(policy: &Policy, tailnet: &Tailnet) -> Result<(), PolicyError> {
    let home = tailnet
        .users
        .iter()
        .min_by_key(|u| u.id)
        .and_then(|u| email_domain(&u.email));
    let check = |domain: &str, ssh: bool| {
        if Some(domain) == home {
            Ok(())
        } else {
            let prefix = if ssh { "[ssh] " } else { "" };
            err(format!(
                "{prefix}{domain} is not associated with this Tailnet and cannot be used in user:*@<domain> expressions"
            ))
        }
    };
    for rule in &policy.ssh {
        for s in &rule.sources {
            if let Alias::User(u) = s
                && let Some(domain) = u.strip_prefix("user:*@")
            {
                check(domain, true)?;
            }
        }
        for u in &rule.users {
            if let Some(domain) = localpart_domain(u) {
                check(domain, false)?;
            }
        }
    }
    Ok(())
}

/// The domain of a `localpart:*@domain` entry; other `localpart:` spellings are plain
/// user names to Tailscale.
fn localpart_domain(user: &str) -> Option<&str> {
    user.strip_prefix("localpart:*@").filter(|d| !d.is_empty())
}

/// The `ssh` section resolved against one tailnet: every rule's sources, destinations and
/// the rule JSON each kind of node receives, built once per compile and shared, so that a
/// node's rules cost a lookup per rule.
pub struct PreparedSsh {
    rules: Vec<PreparedRule>,
}

/// One rule as a node receives it, with a hash of its JSON (for fingerprints). Kept as
/// text: a rule lists every source device, and as JSON values those principals cost each
/// member over a kilobyte per device.
#[derive(Debug)]
pub struct SshRuleJson {
    pub json: Box<serde_json::value::RawValue>,
    pub hash: u64,
    check: bool,
}

type Shared = Arc<SshRuleJson>;

struct PreparedRule {
    srcs: IpSet,
    /// Destinations other than `autogroup:self`, if any.
    others: Option<IpSet>,
    has_self: bool,
    action: Value,
    users: UserMap,
    accept_env: Vec<String>,
    /// Source devices' addresses by owner, and tagged ones.
    by_user: BTreeMap<u64, Vec<String>>,
    tagged_ips: Vec<String>,
    /// The rules a node gets for one source user's devices (one, or two with a local
    /// part of `localpart:*@domain`), built on first use.
    per_user: BTreeMap<u64, OnceLock<Vec<Shared>>>,
    /// For a destination without local parts: every source device at once.
    everyone: OnceLock<Vec<Shared>>,
    /// Tagged source devices.
    tagged: OnceLock<Vec<Shared>>,
}

impl PreparedRule {
    fn for_user(&self, u: u64) -> Option<&[Shared]> {
        let cell = self.per_user.get(&u)?;
        Some(cell.get_or_init(|| self.emit(&self.by_user[&u], Some(u))))
    }

    fn for_everyone(&self) -> &[Shared] {
        self.everyone.get_or_init(|| {
            let all: Vec<String> = self
                .by_user
                .values()
                .flatten()
                .chain(&self.tagged_ips)
                .cloned()
                .collect();
            self.emit(&all, None)
        })
    }

    fn for_tagged(&self) -> &[Shared] {
        self.tagged
            .get_or_init(|| self.emit(&self.tagged_ips, None))
    }

    /// The rule for `principals` (and `user`'s own local part, when it has one); none
    /// without principals.
    fn emit(&self, principals: &[String], user: Option<u64>) -> Vec<Shared> {
        if principals.is_empty() {
            return Vec::new();
        }
        let mut out = vec![self.shared(principals, self.users.base.clone())];
        if let Some(lp) = user.and_then(|u| self.users.localpart.get(&u)) {
            let map = BTreeMap::from([(lp.clone(), lp.clone())]);
            out.push(self.shared(principals, map));
        }
        out
    }

    fn shared(&self, principals: &[String], users: BTreeMap<String, String>) -> Shared {
        use std::hash::{Hash, Hasher};
        let value = rule_json(principals, users, &self.action, &self.accept_env);
        let json = serde_json::value::to_raw_value(&value).expect("JSON values serialize");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        json.get().hash(&mut h);
        Arc::new(SshRuleJson {
            check: value["action"].get("holdAndDelegate").is_some(),
            json,
            hash: h.finish(),
        })
    }
}

impl PreparedSsh {
    /// `check_url` is the control server's base URL (where `check` actions call).
    pub fn new(
        policy: &Policy,
        resolver: &Resolver,
        routes: &[NodeRoutes],
        check_url: &str,
    ) -> Self {
        let tailnet = resolver.tailnet;
        let rules = policy
            .ssh
            .iter()
            .filter_map(|rule| {
                let srcs = resolver.resolve_all(&rule.sources);
                if srcs.is_empty() {
                    return None;
                }
                let others: Vec<Alias> = rule
                    .dests
                    .iter()
                    .filter(|d| !d.is_autogroup(AutoGroup::SelfDevices))
                    .cloned()
                    .collect();
                let (by_user, tagged_ips) = principals_by_user(tailnet, routes, &srcs);
                Some(PreparedRule {
                    others: (!others.is_empty()).then(|| resolver.resolve_all(&others)),
                    has_self: others.len() < rule.dests.len(),
                    srcs,
                    action: action_json(rule.action, check_url),
                    users: UserMap::new(rule, tailnet),
                    accept_env: rule.accept_env.clone(),
                    per_user: by_user.keys().map(|u| (*u, OnceLock::new())).collect(),
                    by_user,
                    tagged_ips,
                    everyone: OnceLock::new(),
                    tagged: OnceLock::new(),
                })
            })
            .collect();
        PreparedSsh { rules }
    }

    /// `SSHPolicy.rules` for node `i`, check rules first (the most restrictive match wins).
    pub fn rules_for(&self, tailnet: &Tailnet, routes: &[NodeRoutes], i: usize) -> Vec<Shared> {
        let me = &tailnet.nodes[i];
        let owner = me.user.filter(|_| !me.is_tagged());
        let mut rules: Vec<Shared> = Vec::new();
        for rule in &self.rules {
            let own_user = owner.and_then(|u| rule.for_user(u));
            if rule.has_self {
                rules.extend(own_user.into_iter().flatten().cloned());
            }
            let Some(dsts) = &rule.others else { continue };
            if routes[i].in_set(dsts) {
                if rule.users.localpart.is_empty() {
                    rules.extend(rule.for_everyone().iter().cloned());
                } else {
                    for u in rule.by_user.keys() {
                        rules.extend(rule.for_user(*u).into_iter().flatten().cloned());
                    }
                    rules.extend(rule.for_tagged().iter().cloned());
                }
            } else if !rule.users.localpart.is_empty() && routes[i].in_set(&rule.srcs) {
                if me.is_tagged() {
                    let own: Vec<String> = routes[i].ips.iter().map(ToString::to_string).collect();
                    rules.extend(rule.emit(&own, None));
                } else {
                    rules.extend(own_user.into_iter().flatten().cloned());
                }
            }
        }
        rules.sort_by_key(|r| !r.check);
        rules
    }
}

fn action_json(action: SshAction, check_url: &str) -> Value {
    match action {
        SshAction::Accept => json!({
            "accept": true,
            "allowAgentForwarding": true,
            "allowLocalPortForwarding": true,
            "allowRemotePortForwarding": true,
        }),
        SshAction::Check => json!({
            "holdAndDelegate": format!(
                "{check_url}/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"
            ),
        }),
    }
}

fn rule_json(
    principals: &[String],
    users: BTreeMap<String, String>,
    action: &Value,
    accept_env: &[String],
) -> Value {
    let principals: Vec<Value> = principals.iter().map(|ip| json!({"nodeIP": ip})).collect();
    let mut rule = json!({"principals": principals, "sshUsers": users, "action": action});
    if !accept_env.is_empty() {
        rule["acceptEnv"] = json!(accept_env);
    }
    rule
}

/// The `sshUsers` map of a rule, and the per-user local parts of `localpart:*@domain`.
struct UserMap {
    base: BTreeMap<String, String>,
    localpart: BTreeMap<u64, String>,
}

impl UserMap {
    fn new(rule: &SshRule, tailnet: &Tailnet) -> Self {
        let mut base = BTreeMap::new();
        if rule.users.iter().any(|u| u == "autogroup:nonroot") {
            base.insert("*".into(), "=".into());
        }
        let root = if rule.users.iter().any(|u| u == "root") {
            "root"
        } else {
            ""
        };
        base.insert("root".into(), root.into());
        let mut localpart = BTreeMap::new();
        for u in &rule.users {
            if let Some(domain) = localpart_domain(u) {
                for user in &tailnet.users {
                    if let Some((local, d)) = user.email.rsplit_once('@')
                        && d.eq_ignore_ascii_case(domain)
                    {
                        localpart.insert(user.id, local.to_string());
                    }
                }
            } else if u != "root" && u != "autogroup:nonroot" {
                base.insert(u.clone(), u.clone());
            }
        }
        UserMap { base, localpart }
    }
}

/// Source nodes' addresses grouped by owner (sorted by user id), and tagged sources'
/// addresses repeated once per tag, as Tailscale lists them.
fn principals_by_user(
    tailnet: &Tailnet,
    routes: &[NodeRoutes],
    srcs: &IpSet,
) -> (BTreeMap<u64, Vec<String>>, Vec<String>) {
    let mut sets: BTreeMap<u64, std::collections::BTreeSet<std::net::IpAddr>> = BTreeMap::new();
    let mut tagged = Vec::new();
    for (j, n) in tailnet.nodes.iter().enumerate() {
        if !routes[j].in_set(srcs) {
            continue;
        }
        if n.is_tagged() {
            for _ in &n.tags {
                tagged.extend(routes[j].ips.iter().map(ToString::to_string));
            }
            continue;
        }
        let Some(u) = n.user else { continue };
        sets.entry(u)
            .or_default()
            .extend(routes[j].ips.iter().copied());
    }
    let by_user = sets
        .into_iter()
        .map(|(u, set)| (u, set.iter().map(ToString::to_string).collect()))
        .collect();
    (by_user, tagged)
}

/// Go's `time.ParseDuration` for the units policies use; seconds.
fn parse_go_duration(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(0.0);
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Some(if neg { -total } else { total })
}

/// Go's `Duration.String` for whole seconds (`-1m0s`, `1h0m0s`, `30s`).
fn format_go_duration(secs: f64) -> String {
    let sign = if secs < 0.0 { "-" } else { "" };
    let total = secs.abs().round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{sign}{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{sign}{m}m{s}s")
    } else {
        format!("{sign}{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_and_print_like_go() {
        assert_eq!(parse_go_duration("-1m"), Some(-60.0));
        assert_eq!(parse_go_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(format_go_duration(-60.0), "-1m0s");
        assert_eq!(format_go_duration(3600.0), "1h0m0s");
    }
}

//! The policy's `tests` and `sshTests`: assertions that a source may (`accept`), may
//! after a check (`check`, SSH only) or may not (`deny`) reach destinations, or log in as
//! local users. A policy whose tests fail is refused, as Tailscale refuses it.
//!
//! Tests speak of identities, not devices: each user or tag a test names gets a stand-in
//! device in a copy of the tailnet, the policy is compiled for that copy, and the stand-in
//! destination's packet filter decides.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::Value;

use super::filter::parse_ip_text;
use super::model::{Alias, Policy, PolicyError, PortRange, object, scalar_string, strings};
use super::resolve::Resolver;
use super::tailnet::{Node, Tailnet, User};
use super::{Compiled, FilterRule};

/// One entry of `tests`.
#[derive(Clone, Debug)]
pub struct AclTest {
    /// As written, for messages.
    src_text: String,
    src: Alias,
    proto: u8,
    accept: Vec<Destination>,
    deny: Vec<Destination>,
}

/// One entry of `sshTests`: local users `src` may log in as on each `dst`.
#[derive(Clone, Debug)]
pub struct SshTest {
    src_text: String,
    src: Alias,
    dst: Vec<(String, Alias)>,
    accept: Vec<String>,
    check: Vec<String>,
    deny: Vec<String>,
}

/// What an SSH rule set does with a login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SshVerdict {
    Accept,
    Check,
    Deny,
}

#[derive(Clone, Debug)]
struct Destination {
    text: String,
    alias: Alias,
    ports: Vec<PortRange>,
}

impl Policy {
    pub(super) fn parse_test(&self, v: &Value) -> Result<AclTest, PolicyError> {
        let obj = object(v, "tests entry")?;
        let src_text = scalar_string(obj.get("src").unwrap_or(&Value::Null), "src")?;
        if src_text.is_empty() {
            return Err(PolicyError("test: src must be specified".into()));
        }
        let src = self.test_alias(&src_text)?;
        let proto = match obj.get("proto") {
            None => 6,
            Some(p) => *super::model::parse_protocol(&scalar_string(p, "proto")?)?
                .first()
                .unwrap_or(&6),
        };
        let dests = |key: &str| -> Result<Vec<Destination>, PolicyError> {
            strings(obj.get(key), key)?
                .into_iter()
                .map(|text| {
                    let (host, ports) = super::model::split_dest(&text)?;
                    Ok(Destination {
                        alias: self.test_alias(&host)?,
                        text,
                        ports,
                    })
                })
                .collect()
        };
        Ok(AclTest {
            src_text,
            src,
            proto,
            accept: dests("accept")?,
            deny: dests("deny")?,
        })
    }

    pub(super) fn parse_ssh_test(&self, v: &Value) -> Result<SshTest, PolicyError> {
        let obj = object(v, "sshTests entry")?;
        let src_text = scalar_string(obj.get("src").unwrap_or(&Value::Null), "src")?;
        if src_text.is_empty() {
            return Err(PolicyError("sshTest: src must be specified".into()));
        }
        let dst = strings(obj.get("dst"), "dst")?
            .into_iter()
            .map(|d| Ok((d.clone(), self.test_alias(&d)?)))
            .collect::<Result<Vec<_>, PolicyError>>()?;
        if dst.is_empty() {
            return Err(PolicyError("sshTest: dst must be specified".into()));
        }
        Ok(SshTest {
            src: self.test_alias(&src_text)?,
            src_text,
            dst,
            accept: strings(obj.get("accept"), "accept")?,
            check: strings(obj.get("check"), "check")?,
            deny: strings(obj.get("deny"), "deny")?,
        })
    }

    /// An alias a test may name: a user, group, tag, host or address (autogroups and
    /// `*` name no one identity).
    fn test_alias(&self, text: &str) -> Result<Alias, PolicyError> {
        let alias = Alias::parse(text)?;
        match &alias {
            Alias::Tag(t) => self.check_tag(t)?,
            Alias::Group(g) => self.check_group(g)?,
            Alias::Host(h) => self.check_host(h)?,
            Alias::User(_) | Alias::Prefix(_) => {}
            Alias::Wildcard | Alias::AutoGroup(_) => {
                return Err(PolicyError(format!(
                    "test: {text:?} is not a user, group, tag, host or address"
                )));
            }
        }
        Ok(alias)
    }
}

/// Runs the policy's tests against `tailnet`; the error lists every failed assertion.
pub fn run(policy: &Policy, tailnet: &Tailnet) -> Result<(), PolicyError> {
    if policy.tests.is_empty() && policy.ssh_tests.is_empty() {
        return Ok(());
    }
    let mut stand_ins = StandIns::new(tailnet);
    for t in &policy.tests {
        stand_ins.add(policy, &t.src);
        for d in t.accept.iter().chain(&t.deny) {
            stand_ins.add(policy, &d.alias);
        }
    }
    for t in &policy.ssh_tests {
        stand_ins.add(policy, &t.src);
        for (_, d) in &t.dst {
            stand_ins.add(policy, d);
        }
    }
    let judge = Judge {
        policy,
        compiled: Compiled::new(policy.clone(), stand_ins.tailnet, "")?,
        stand_ins: stand_ins.nodes,
    };
    let mut failed = Vec::new();
    for t in &policy.tests {
        failed.extend(judge.acl_failures(t));
    }
    for t in &policy.ssh_tests {
        failed.extend(judge.ssh_failures(t));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PolicyError(format!(
            "test(s) failed: {}",
            failed.join("; ")
        )))
    }
}

/// What an SSH rule set does with `user` logging in from `src`: the first rule naming
/// `src` and mapping the user decides (rules come ordered, check rules first). An empty
/// mapping refuses the user; `*` covers any other.
fn ssh_verdict(rules: &[&Value], src: IpAddr, user: &str) -> SshVerdict {
    let src = src.to_string();
    for rule in rules {
        let names_src = rule["principals"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["nodeIP"].as_str() == Some(src.as_str()) || p["any"] == true);
        let users = &rule["sshUsers"];
        let mapped = users
            .get(user)
            .or_else(|| users.get("*"))
            .and_then(Value::as_str)
            .is_some_and(|to| !to.is_empty());
        if names_src && mapped {
            return if rule["action"].get("holdAndDelegate").is_some() {
                SshVerdict::Check
            } else if rule["action"]["accept"] == true {
                SshVerdict::Accept
            } else {
                SshVerdict::Deny
            };
        }
    }
    SshVerdict::Deny
}

/// The tailnet plus a device for every user and tag the tests name.
struct StandIns {
    tailnet: Tailnet,
    /// (alias, node index) of each stand-in.
    nodes: Vec<(Alias, usize)>,
    next_v4: u32,
}

impl StandIns {
    fn new(tailnet: &Tailnet) -> Self {
        StandIns {
            tailnet: tailnet.clone(),
            nodes: Vec::new(),
            // Counting down from the top of 100.64.0.0/10, skipping taken addresses.
            next_v4: u32::from(Ipv4Addr::new(100, 127, 255, 254)),
        }
    }

    fn add(&mut self, policy: &Policy, alias: &Alias) {
        if self.nodes.iter().any(|(a, _)| a == alias) {
            return;
        }
        match alias {
            Alias::User(token) => {
                let user = self.user(policy, token);
                self.push(alias, Some(user), Vec::new());
            }
            Alias::Tag(tag) => self.push(alias, None, vec![tag.clone()]),
            Alias::Group(g) => {
                for member in policy.groups.get(g).into_iter().flatten() {
                    self.add(policy, &Alias::User(member.clone()));
                }
            }
            _ => {}
        }
    }

    /// The tailnet user a test's user token means (matched as the policy matches users),
    /// added when the tailnet has none.
    fn user(&mut self, policy: &Policy, token: &str) -> u64 {
        let found = {
            let resolver = Resolver::new(policy, &self.tailnet);
            let users = &self.tailnet.users;
            users
                .iter()
                .find(|u| resolver.user_matches(u.id, token))
                .map(|u| u.id)
        };
        if let Some(id) = found {
            return id;
        }
        let bare = token.strip_suffix('@').unwrap_or(token);
        let id = self.tailnet.users.iter().map(|u| u.id).max().unwrap_or(0) + 1;
        self.tailnet.users.push(User {
            id,
            name: bare.to_string(),
            email: if bare.contains('@') {
                bare.to_string()
            } else {
                String::new()
            },
        });
        id
    }

    fn push(&mut self, alias: &Alias, user: Option<u64>, tags: Vec<String>) {
        let taken = |ip: u32| {
            let ip = Ipv4Addr::from(ip);
            self.tailnet.nodes.iter().any(|n| n.ipv4 == Some(ip))
        };
        while taken(self.next_v4) {
            self.next_v4 -= 1;
        }
        let v4 = self.next_v4;
        self.next_v4 -= 1;
        let v6_base = u128::from(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0xffff, 0, 0, 0, 0));
        let index = self.tailnet.nodes.len();
        self.tailnet.nodes.push(Node {
            id: u64::MAX - index as u64,
            name: format!("policy-test-{index}"),
            user,
            tags,
            ipv4: Some(Ipv4Addr::from(v4)),
            ipv6: Some(Ipv6Addr::from(v6_base + u128::from(v4))),
            advertised: Vec::new(),
            approved: Vec::new(),
            online: true,
            online_since: 0,
        });
        self.nodes.push((alias.clone(), index));
    }
}

/// The policy compiled for the tailnet with its stand-ins, answering the tests.
struct Judge<'a> {
    policy: &'a Policy,
    compiled: Compiled,
    stand_ins: Vec<(Alias, usize)>,
}

impl Judge<'_> {
    /// What a `tests` entry expects and did not get. Each destination's port ranges are
    /// probed at both ends.
    fn acl_failures(&self, t: &AclTest) -> Vec<String> {
        let sources = self.addresses(&t.src);
        let mut failed = Vec::new();
        for (dests, want) in [(&t.accept, true), (&t.deny, false)] {
            for d in dests {
                let mut probes = sources.iter().flat_map(|&src| {
                    d.ports
                        .iter()
                        .flat_map(|p| [p.first, p.last])
                        .map(move |port| (src, port))
                });
                let reaches = |(src, port)| self.reaches(src, &d.alias, port, t.proto);
                if want && !probes.all(reaches) {
                    failed.push(format!("{:?} cannot reach {:?}", t.src_text, d.text));
                } else if !want && probes.any(reaches) {
                    failed.push(format!("{:?} can reach {:?}", t.src_text, d.text));
                }
            }
        }
        failed
    }

    /// What an `sshTests` entry expects and did not get.
    fn ssh_failures(&self, t: &SshTest) -> Vec<String> {
        let sources = self.addresses(&t.src);
        let mut failed = Vec::new();
        for (text, dst) in &t.dst {
            let Some(j) = self.node_of(dst) else {
                failed.push(format!("sshTest dst {text:?} is not a device"));
                continue;
            };
            let rules: Vec<Value> = self
                .compiled
                .ssh_rules(j)
                .iter()
                .map(|r| serde_json::from_str(r.get()).expect("rules are JSON we wrote"))
                .collect();
            let rules: Vec<&Value> = rules.iter().collect();
            let expectations = [
                (&t.accept, SshVerdict::Accept),
                (&t.check, SshVerdict::Check),
                (&t.deny, SshVerdict::Deny),
            ];
            for (users, want) in expectations {
                for (user, src) in users
                    .iter()
                    .flat_map(|u| sources.iter().map(move |s| (u, s)))
                {
                    let got = ssh_verdict(&rules, *src, user);
                    if got != want {
                        failed.push(format!(
                            "ssh {:?} -> {text:?} as {user:?}: expected {want:?}, got {got:?}",
                            t.src_text
                        ));
                    }
                }
            }
        }
        failed
    }

    fn node_of(&self, alias: &Alias) -> Option<usize> {
        self.stand_ins
            .iter()
            .find(|(a, _)| a == alias)
            .map(|(_, i)| *i)
    }

    /// The IPv4 addresses a test source or destination stands for.
    fn addresses(&self, alias: &Alias) -> Vec<IpAddr> {
        match alias {
            Alias::Group(g) => self
                .policy
                .groups
                .get(g)
                .into_iter()
                .flatten()
                .flat_map(|m| self.addresses(&Alias::User(m.clone())))
                .collect(),
            Alias::Host(h) => self
                .policy
                .hosts
                .get(h)
                .map(|n| n.addr())
                .into_iter()
                .collect(),
            Alias::Prefix(n) => vec![n.addr()],
            _ => self
                .node_of(alias)
                .and_then(|i| self.compiled.tailnet().nodes[i].ipv4)
                .map(IpAddr::V4)
                .into_iter()
                .collect(),
        }
    }

    /// Whether `src` may open `proto` to `port` on every address `dst` stands for: by
    /// that device's own packet filter, or for other addresses by the tailnet-wide rules.
    fn reaches(&self, src: IpAddr, dst: &Alias, port: u16, proto: u8) -> bool {
        let targets = self.addresses(dst);
        let nodes = &self.compiled.tailnet().nodes;
        !targets.is_empty()
            && targets.iter().all(|&ip| {
                let rules: &[FilterRule] = match nodes
                    .iter()
                    .position(|n| n.ipv4.map(IpAddr::V4) == Some(ip))
                {
                    Some(i) => &self.compiled.node(i).filter,
                    None => self.compiled.global_rules(),
                };
                rules.iter().any(|r| r.allows(src, ip, port, proto))
            })
    }
}

impl FilterRule {
    /// Whether the rule lets `src` open `proto` to `dst:port`. A rule without `IPProto`
    /// covers TCP, UDP and ICMP.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, port: u16, proto: u8) -> bool {
        let proto_ok = if self.ip_proto.is_empty() {
            matches!(proto, 6 | 17 | 1 | 58)
        } else {
            self.ip_proto.contains(&proto)
        };
        proto_ok
            && self.src_ips.iter().any(|s| parse_ip_text(s).contains(src))
            && self
                .dst_ports
                .iter()
                .any(|(d, p)| p.first <= port && port <= p.last && parse_ip_text(d).contains(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_text(text: &str) -> Result<(), PolicyError> {
        run(&Policy::parse(text)?, &Tailnet::default())
    }

    const BASE: &str = r#"
        "groups": {"group:eng": ["alice@", "bob@"]},
        "tagOwners": {"tag:server": ["alice@"], "tag:web": ["alice@"]},
        "hosts": {"db": "10.0.0.5"},
        "acls": [
            {"action": "accept", "src": ["alice@"], "dst": ["tag:server:22"]},
            {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443", "db:5432"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
            {"action": "accept", "proto": "udp", "src": ["tag:web"], "dst": ["tag:server:53"]},
        ],"#;

    #[test]
    fn tests_that_hold_let_the_policy_in() {
        let tests = r#""tests": [
            {"src": "alice@", "accept": ["tag:server:22", "alice@:8080"], "deny": ["tag:server:80", "bob@:22"]},
            {"src": "group:eng", "accept": ["tag:web:443", "db:5432"], "deny": ["10.0.0.6:5432"]},
            {"src": "carol@", "deny": ["tag:web:443", "tag:server:22"]},
            {"src": "tag:web", "proto": "udp", "accept": ["tag:server:53"]},
            {"src": "tag:web", "deny": ["tag:server:53"]},
        ]"#;
        run_text(&format!("{{{BASE}{tests}}}")).unwrap();
    }

    #[test]
    fn a_failing_test_refuses_the_policy_and_names_each_failure() {
        let tests = r#""tests": [
            {"src": "bob@", "accept": ["tag:server:22"]},
            {"src": "alice@", "deny": ["tag:server:22"]},
        ]"#;
        let e = run_text(&format!("{{{BASE}{tests}}}")).unwrap_err().0;
        assert!(e.starts_with("test(s) failed"), "{e}");
        assert!(e.contains(r#""bob@" cannot reach "tag:server:22""#), "{e}");
        assert!(e.contains(r#""alice@" can reach "tag:server:22""#), "{e}");
    }

    #[test]
    fn a_test_naming_what_the_policy_does_not_define_is_refused() {
        let tests = r#""tests": [{"src": "alice@", "accept": ["tag:nope:22"]}]"#;
        let e = Policy::parse(&format!("{{{BASE}{tests}}}")).unwrap_err().0;
        assert!(e.contains("tag not found"), "{e}");
        let tests = r#""tests": [{"src": "*", "accept": ["tag:server:22"]}]"#;
        assert!(Policy::parse(&format!("{{{BASE}{tests}}}")).is_err());
    }

    const SSH: &str = r#"
        "groups": {"group:eng": ["alice@", "bob@"]},
        "tagOwners": {"tag:server": ["alice@"]},
        "ssh": [
            {"action": "accept", "src": ["alice@"], "dst": ["tag:server"], "users": ["ubuntu"]},
            {"action": "check", "src": ["group:eng"], "dst": ["tag:server"], "users": ["root"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]},
        ],"#;

    #[test]
    fn ssh_tests_check_each_local_user_against_the_rules() {
        let tests = r#""sshTests": [
            {"src": "alice@", "dst": ["tag:server"], "accept": ["ubuntu"], "check": ["root"], "deny": ["admin"]},
            {"src": "bob@", "dst": ["tag:server"], "check": ["root"], "deny": ["ubuntu"]},
            {"src": "alice@", "dst": ["alice@"], "accept": ["alice", "anyone"], "deny": ["root"]},
            {"src": "bob@", "dst": ["alice@"], "deny": ["alice", "root"]},
        ]"#;
        run_text(&format!("{{{SSH}{tests}}}")).unwrap();

        let failing = r#""sshTests": [
            {"src": "bob@", "dst": ["tag:server"], "accept": ["ubuntu", "root"]},
        ]"#;
        let e = run_text(&format!("{{{SSH}{failing}}}")).unwrap_err().0;
        assert!(
            e.contains(r#"ssh "bob@" -> "tag:server" as "ubuntu": expected Accept, got Deny"#),
            "{e}"
        );
        assert!(
            e.contains(r#"as "root": expected Accept, got Check"#),
            "{e}"
        );
    }
}

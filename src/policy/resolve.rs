//! Aliases to addresses. Identity aliases (users, groups, tags, autogroups) expand to the
//! addresses of the nodes they name; address aliases (hosts, prefixes) to exactly what
//! they say.

use std::collections::HashMap;

use ipnet::IpNet;

use super::ipset::IpSet;
use super::model::{Alias, AutoGroup, Policy};
use super::tailnet::Tailnet;

/// The Tailscale address ranges: 100.64.0.0/10 without ChromeOS's VM range, and
/// fd7a:115c:a1e0::/48. What `*` means as a source.
pub fn tailnet_ranges() -> IpSet {
    let mut s = IpSet::new();
    s.add_net(&net("100.64.0.0/10"));
    s.add_net(&net("fd7a:115c:a1e0::/48"));
    s.remove_net(&net("100.115.92.0/23"));
    s
}

/// Public address space: what `autogroup:internet` names and exit nodes carry.
pub fn the_internet() -> IpSet {
    let mut s = IpSet::new();
    s.add_net(&net("0.0.0.0/0"));
    s.add_net(&net("2000::/3"));
    for private in [
        "fc00::/7",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fd7a:115c:a1e0::/48",
        "100.64.0.0/10",
        "fe80::/10",
        "169.254.0.0/16",
    ] {
        s.remove_net(&net(private));
    }
    s
}

fn net(s: &str) -> IpNet {
    s.parse().expect("static prefix")
}

pub struct Resolver<'a> {
    pub policy: &'a Policy,
    pub tailnet: &'a Tailnet,
    user_index: HashMap<u64, usize>,
}

impl<'a> Resolver<'a> {
    pub fn new(policy: &'a Policy, tailnet: &'a Tailnet) -> Self {
        let user_index = tailnet
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.id, i))
            .collect();
        Resolver {
            policy,
            tailnet,
            user_index,
        }
    }

    pub fn resolve_all(&self, aliases: &[Alias]) -> IpSet {
        let mut out = IpSet::new();
        for a in aliases {
            out.union(&self.resolve(a));
        }
        out
    }

    /// The addresses `alias` names. `autogroup:self` depends on the viewer and resolves
    /// to nothing here.
    pub fn resolve(&self, alias: &Alias) -> IpSet {
        match alias {
            Alias::Wildcard => tailnet_ranges(),
            Alias::User(token) => self.node_ips(|n| {
                n.user.is_some_and(|u| self.user_matches(u, token)) && !n.is_tagged()
            }),
            Alias::Group(g) => {
                let members = self.policy.groups.get(g).cloned().unwrap_or_default();
                self.node_ips(|n| {
                    !n.is_tagged()
                        && n.user
                            .is_some_and(|u| members.iter().any(|m| self.user_matches(u, m)))
                })
            }
            Alias::Tag(t) => self.node_ips(|n| n.tags.contains(t)),
            Alias::Host(h) => self
                .policy
                .hosts
                .get(h)
                .map(|n| IpSet::from_nets([*n]))
                .unwrap_or_default(),
            Alias::Prefix(n) => IpSet::from_nets([*n]),
            Alias::AutoGroup(ag) => match ag {
                AutoGroup::Internet => the_internet(),
                AutoGroup::Member => self.node_ips(|n| !n.is_tagged()),
                AutoGroup::Tagged => self.node_ips(|n| n.is_tagged()),
                AutoGroup::DangerAll => IpSet::all(),
                AutoGroup::SelfDevices | AutoGroup::NonRoot => IpSet::new(),
            },
        }
    }

    fn node_ips(&self, keep: impl Fn(&super::tailnet::Node) -> bool) -> IpSet {
        let mut s = IpSet::new();
        for n in self.tailnet.nodes.iter().filter(|n| keep(n)) {
            for ip in n.ips() {
                s.add_addr(ip);
            }
        }
        s
    }

    /// Whether user `id` is the one `token` names: `name@`, an email, or
    /// `user:*@domain` (every user of a domain).
    pub fn user_matches(&self, id: u64, token: &str) -> bool {
        let Some(user) = self.user_index.get(&id).map(|&i| &self.tailnet.users[i]) else {
            return false;
        };
        if let Some(domain) = token.strip_prefix("user:*@") {
            return email_domain(&user.email).is_some_and(|d| d.eq_ignore_ascii_case(domain));
        }
        let token = token.strip_prefix("user:").unwrap_or(token);
        let bare = token.strip_suffix('@').unwrap_or(token);
        (!user.email.is_empty() && user.email == bare) || user.name == bare
    }
}

pub fn email_domain(email: &str) -> Option<&str> {
    email.rsplit_once('@').map(|(_, d)| d)
}

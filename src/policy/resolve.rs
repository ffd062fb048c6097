//! Aliases to addresses. Identity aliases (users, groups, tags, autogroups) expand to the
//! addresses of the nodes they name; address aliases (hosts, prefixes) to exactly what
//! they say.

use std::collections::HashMap;
use std::sync::LazyLock;

use ipnet::IpNet;

use super::ipset::IpSet;
use super::model::{Alias, AutoGroup, Policy};
use super::tailnet::Tailnet;

/// The Tailscale address ranges: 100.64.0.0/10 without ChromeOS's VM range, and
/// fd7a:115c:a1e0::/48. What `*` means as a source.
pub fn tailnet_ranges() -> &'static IpSet {
    static RANGES: LazyLock<IpSet> = LazyLock::new(|| {
        let mut s = IpSet::new();
        s.add_net(&net("100.64.0.0/10"));
        s.add_net(&net("fd7a:115c:a1e0::/48"));
        s.remove_net(&net("100.115.92.0/23"));
        s
    });
    &RANGES
}

/// Public address space: what `autogroup:internet` names and exit nodes carry.
pub fn the_internet() -> &'static IpSet {
    static INTERNET: LazyLock<IpSet> = LazyLock::new(|| {
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
    });
    &INTERNET
}

fn net(s: &str) -> IpNet {
    s.parse().expect("static prefix")
}

pub struct Resolver<'a> {
    pub policy: &'a Policy,
    pub tailnet: &'a Tailnet,
    user_index: HashMap<u64, usize>,
    /// Each group's members as user ids, resolved once.
    groups: HashMap<&'a str, std::collections::HashSet<u64>>,
}

impl<'a> Resolver<'a> {
    pub fn new(policy: &'a Policy, tailnet: &'a Tailnet) -> Self {
        let user_index = tailnet
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.id, i))
            .collect();
        let mut resolver = Resolver {
            policy,
            tailnet,
            user_index,
            groups: HashMap::new(),
        };
        resolver.groups = policy
            .groups
            .iter()
            .map(|(name, members)| {
                let ids = tailnet
                    .users
                    .iter()
                    .filter(|u| members.iter().any(|m| resolver.user_matches(u.id, m)))
                    .map(|u| u.id)
                    .collect();
                (name.as_str(), ids)
            })
            .collect();
        resolver
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
            Alias::Wildcard => tailnet_ranges().clone(),
            Alias::User(token) => {
                let ids: std::collections::HashSet<u64> = self
                    .tailnet
                    .users
                    .iter()
                    .filter(|u| self.user_matches(u.id, token))
                    .map(|u| u.id)
                    .collect();
                self.node_ips(|n| !n.is_tagged() && n.user.is_some_and(|u| ids.contains(&u)))
            }
            Alias::Group(g) => match self.groups.get(g.as_str()) {
                Some(members) => self
                    .node_ips(|n| !n.is_tagged() && n.user.is_some_and(|u| members.contains(&u))),
                None => IpSet::new(),
            },
            Alias::Tag(t) => self.node_ips(|n| n.tags.contains(t)),
            Alias::Host(h) => self
                .policy
                .hosts
                .get(h)
                .map(|n| IpSet::from_nets([*n]))
                .unwrap_or_default(),
            Alias::Prefix(n) => IpSet::from_nets([*n]),
            Alias::AutoGroup(ag) => match ag {
                AutoGroup::Internet => the_internet().clone(),
                AutoGroup::Member => self.node_ips(|n| !n.is_tagged()),
                AutoGroup::Tagged => self.node_ips(|n| n.is_tagged()),
                AutoGroup::DangerAll => IpSet::all(),
                AutoGroup::SelfDevices | AutoGroup::NonRoot => IpSet::new(),
            },
        }
    }

    fn node_ips(&self, keep: impl Fn(&super::tailnet::Node) -> bool) -> IpSet {
        IpSet::from_addrs(
            self.tailnet
                .nodes
                .iter()
                .filter(|n| keep(n))
                .flat_map(|n| n.ips()),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tailnet::{Node, User};

    fn node(id: u64, user: Option<u64>, tags: &[&str]) -> Node {
        Node {
            id,
            name: format!("n{id}"),
            user,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ipv4: Some(std::net::Ipv4Addr::new(100, 64, 0, id as u8)),
            ipv6: None,
            advertised: vec![],
            approved: vec![],
            online: true,
            online_since: 0,
        }
    }

    #[test]
    fn identity_aliases_resolve_to_their_nodes() {
        let policy = Policy::parse(
            r#"{"groups": {"group:eng": ["alice@", "bob@example.com"]},
                "tagOwners": {"tag:web": ["alice@"]},
                "hosts": {"db": "10.0.0.0/24"}}"#,
        )
        .unwrap();
        let tailnet = Tailnet {
            users: vec![
                User {
                    id: 1,
                    name: "alice".into(),
                    email: String::new(),
                },
                User {
                    id: 2,
                    name: "bob".into(),
                    email: "bob@example.com".into(),
                },
                User {
                    id: 3,
                    name: "carol".into(),
                    email: String::new(),
                },
            ],
            nodes: vec![
                node(1, Some(1), &[]),
                node(2, Some(2), &[]),
                node(3, Some(3), &[]),
                node(4, None, &["tag:web"]),
            ],
        };
        let r = Resolver::new(&policy, &tailnet);
        let ips = |text: &str| r.resolve(&Alias::parse(text).unwrap()).strings();
        assert_eq!(ips("alice@"), ["100.64.0.1"]);
        assert_eq!(ips("bob@example.com"), ["100.64.0.2"]);
        assert_eq!(ips("group:eng"), ["100.64.0.1-100.64.0.2"]);
        assert_eq!(ips("tag:web"), ["100.64.0.4"]);
        assert_eq!(ips("autogroup:member"), ["100.64.0.1-100.64.0.3"]);
        assert_eq!(ips("autogroup:tagged"), ["100.64.0.4"]);
        assert_eq!(ips("db"), ["10.0.0.0/24"]);
        assert_eq!(ips("nobody@"), Vec::<String>::new());
        assert_eq!(
            ips("*"),
            [
                "100.64.0.0-100.115.91.255",
                "100.115.94.0-100.127.255.255",
                "fd7a:115c:a1e0::/48"
            ]
        );
    }
}

//! The tailnet as the policy engine sees it: users, and nodes in registration order with
//! their addresses, tags and routes. Built from the registry (or a conformance case).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::ipset::IpSet;
use super::model::Policy;
use super::resolve::Resolver;

#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub email: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub id: u64,
    pub name: String,
    /// The owning user; `None` for tagged nodes, which belong to no user.
    pub user: Option<u64>,
    pub tags: Vec<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// What the node advertises (Hostinfo `RoutableIPs`).
    pub advertised: Vec<IpNet>,
    /// What an admin approved.
    pub approved: Vec<IpNet>,
    pub online: bool,
    /// When it came online (any clock shared by the cluster; 0 when unknown): of several
    /// online routers of a route, the longest-online is primary.
    pub online_since: i64,
}

impl Node {
    pub fn ips(&self) -> Vec<IpAddr> {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
            .collect()
    }

    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Tailnet {
    pub users: Vec<User>,
    /// In registration order: the first online advertiser of a route is its primary.
    pub nodes: Vec<Node>,
}

pub fn is_exit_route(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// What each node may route, after approvals (by an admin or the policy's
/// `autoApprovers`), and which subnet routes it is primary for.
#[derive(Clone, Debug, Default)]
pub struct NodeRoutes {
    pub ips: Vec<IpAddr>,
    /// Approved, advertised, non-exit routes.
    pub subnets: Vec<IpNet>,
    /// Approved, advertised exit routes (0.0.0.0/0, ::/0).
    pub exits: Vec<IpNet>,
    pub primary: Vec<IpNet>,
}

impl NodeRoutes {
    pub fn in_set(&self, set: &IpSet) -> bool {
        self.ips.iter().any(|ip| set.contains(*ip))
    }

    pub fn is_exit(&self) -> bool {
        !self.exits.is_empty()
    }
}

/// Routes of every node, in the tailnet's node order.
pub fn node_routes(policy: &Policy, tailnet: &Tailnet, resolver: &Resolver) -> Vec<NodeRoutes> {
    let approvers: Vec<(IpNet, IpSet)> = policy
        .route_approvers
        .iter()
        .map(|(net, aliases)| (*net, resolver.resolve_all(aliases)))
        .collect();
    let exit_approvers = resolver.resolve_all(&policy.exit_approvers);
    let mut out: Vec<NodeRoutes> = tailnet
        .nodes
        .iter()
        .map(|node| {
            let ips = node.ips();
            let holds = |set: &IpSet| ips.iter().any(|ip| set.contains(*ip));
            let approved = |route: &IpNet| {
                // Exit routes are approved by `exitNode` only, as in Tailscale: a `routes`
                // entry for 0.0.0.0/0 does not make an exit node.
                node.approved.contains(route)
                    || if is_exit_route(route) {
                        holds(&exit_approvers)
                    } else {
                        approvers
                            .iter()
                            .any(|(net, set)| net.contains(route) && holds(set))
                    }
            };
            let mut r = NodeRoutes {
                ips: ips.clone(),
                ..Default::default()
            };
            for route in node.advertised.iter().filter(|r| approved(r)) {
                if is_exit_route(route) {
                    r.exits.push(*route);
                } else if !r.subnets.contains(route) {
                    r.subnets.push(*route);
                }
            }
            r
        })
        .collect();
    elect_primaries(tailnet, &mut out);
    out
}

/// Each subnet route's primary is its longest-online router (registration order breaks
/// ties), so every member derives the same answer, a router keeps the role while it is
/// online, and one coming back does not take it back from the one that took over.
fn elect_primaries(tailnet: &Tailnet, routes: &mut [NodeRoutes]) {
    let mut taken: Vec<IpNet> = Vec::new();
    let mut order: Vec<usize> = (0..tailnet.nodes.len())
        .filter(|&i| tailnet.nodes[i].online)
        .collect();
    order.sort_by_key(|&i| (tailnet.nodes[i].online_since, i));
    for i in order {
        let mine: Vec<IpNet> = routes[i]
            .subnets
            .iter()
            .filter(|r| !taken.contains(r))
            .copied()
            .collect();
        taken.extend(mine.iter().copied());
        routes[i].primary = mine;
    }
}

/// Every approved subnet route in the tailnet, once each, in node order: what a `*`
/// source includes besides the tailnet's own ranges.
pub fn approved_subnets(routes: &[NodeRoutes]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for r in routes {
        for net in &r.subnets {
            if !out.contains(net) {
                out.push(*net);
            }
        }
    }
    out
}

//! `hsd policy eval CASE.json`: a tailnet described in a file (a policy, users, and nodes
//! in registration order) compiled in memory, printed as what each node would receive.
//! The file format is that of the conformance cases in `tests/fixtures/policy/`.

use std::net::{Ipv4Addr, Ipv6Addr};

use indexmap::IndexMap;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Compiled, PeerRoutes, Policy, PolicyError, Tailnet};

#[derive(Deserialize)]
pub struct Case {
    pub policy: String,
    #[serde(default)]
    pub users: Vec<CaseUser>,
    #[serde(default)]
    pub nodes: IndexMap<String, CaseNode>,
}

#[derive(Deserialize)]
pub struct CaseUser {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub email: String,
}

#[derive(Deserialize)]
pub struct CaseNode {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub routable_ips: Vec<IpNet>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub approved_routes: Vec<IpNet>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// Why a case could not be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("reading the case: {0}")]
    Case(String),
    #[error("{0}")]
    Policy(#[from] PolicyError),
}

/// Builds the case's tailnet (every node online).
pub fn tailnet(case: &Case) -> Result<Tailnet, EvalError> {
    let users: Vec<super::User> = case
        .users
        .iter()
        .map(|u| super::User {
            id: u.id,
            name: u.name.clone(),
            email: u.email.clone(),
        })
        .collect();
    let mut nodes = Vec::new();
    for (i, (name, n)) in case.nodes.iter().enumerate() {
        let user = match &n.user {
            Some(u) if n.tags.is_empty() => Some(
                users
                    .iter()
                    .find(|x| &x.name == u)
                    .map(|x| x.id)
                    .ok_or_else(|| EvalError::Case(format!("node {name}: no user {u:?}")))?,
            ),
            _ => None,
        };
        nodes.push(super::Node {
            id: i as u64 + 1,
            name: name.clone(),
            user,
            tags: n.tags.clone(),
            ipv4: n.ipv4,
            ipv6: n.ipv6,
            advertised: n.routable_ips.clone(),
            approved: n.approved_routes.clone(),
            online: true,
            online_since: 0,
        });
    }
    Ok(Tailnet { users, nodes })
}

/// Evaluates a case: `{"nodes": {NAME: {packet_filter_rules, self, peers, ssh_rules}}}`.
pub fn eval(case: &Case, check_url: &str) -> Result<Value, EvalError> {
    let policy = Policy::parse(&case.policy)?;
    let compiled = Compiled::new(policy, tailnet(case)?, check_url)?;
    let nodes = &compiled.tailnet().nodes;
    let mut out = Map::new();
    for (i, node) in nodes.iter().enumerate() {
        let view = compiled.node(i);
        let rules: Vec<Value> = view.filter.iter().map(|r| r.to_json()).collect();
        let mut peers = Map::new();
        for j in compiled.peers(i) {
            peers.insert(
                nodes[j].name.clone(),
                routes_json(&compiled.peer_routes(i, j)),
            );
        }
        out.insert(
            node.name.clone(),
            json!({
                "packet_filter_rules": rules,
                "self": routes_json(&compiled.self_routes(i)),
                "peers": peers,
                "ssh_rules": compiled.ssh_rules(i),
            }),
        );
    }
    Ok(json!({ "nodes": out }))
}

fn routes_json(r: &PeerRoutes) -> Value {
    let strings = |nets: &[IpNet]| -> Value {
        if nets.is_empty() {
            Value::Null
        } else {
            json!(nets.iter().map(ToString::to_string).collect::<Vec<_>>())
        }
    };
    json!({
        "AllowedIPs": strings(&r.allowed_ips),
        "PrimaryRoutes": strings(&r.primary_routes),
    })
}

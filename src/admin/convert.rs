//! Registry and cluster types to their proto messages, and back for request fields.

use crate::control::policy::Access;
use std::collections::BTreeMap;

use crate::proto::admin as pb;
use crate::raft::{ClusterStatus, MemberRole, MemberStatus};
use crate::registry::{self as reg, NodeId, Registry, Timestamp};

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1000),
        nanos: (t.0.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn opt_timestamp(t: Option<Timestamp>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

/// A proto timestamp as registry milliseconds (saturating; sub-millisecond parts dropped).
pub fn from_timestamp(t: &prost_types::Timestamp) -> Timestamp {
    let millis = t
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000));
    Timestamp(millis)
}

fn user_name(view: &Registry, id: reg::UserId) -> String {
    view.user(id).map(|u| u.name.clone()).unwrap_or_default()
}

pub fn user(u: &reg::User) -> pb::User {
    pb::User {
        id: u.id.0,
        name: u.name.clone(),
        created_at: Some(timestamp(u.created_at)),
        display_name: u.display_name.clone(),
        email: u.email.clone(),
        provider: if u.provider_id.is_empty() { "" } else { "oidc" }.into(),
        provider_id: u.provider_id.clone(),
    }
}

pub fn preauth_key(
    view: &Registry,
    k: &reg::PreAuthKey,
    full: Option<String>,
    now: Timestamp,
) -> pb::PreAuthKey {
    pb::PreAuthKey {
        id: k.id.0,
        user: user_name(view, k.user),
        prefix: k.prefix.clone(),
        key: full,
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        used: k.used,
        expiration: opt_timestamp(k.expiration),
        created_at: Some(timestamp(k.created_at)),
        tags: k.tags.clone(),
        expired: k.is_expired(now),
    }
}

pub fn api_key(k: &reg::ApiKey, full: Option<String>, now: Timestamp) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.0,
        prefix: k.prefix.clone(),
        key: full,
        expiration: opt_timestamp(k.expiration),
        created_at: Some(timestamp(k.created_at)),
        last_used: opt_timestamp(k.last_used),
        expired: k.is_expired(now),
    }
}

/// `sessions`: node id -> member holding its map session (from `Cluster::sessions`).
pub fn node(
    view: &Registry,
    n: &reg::Node,
    sessions: &BTreeMap<NodeId, u64>,
    now: Timestamp,
    access: &Access,
) -> pb::Node {
    let strings = |nets: &[ipnet::IpNet]| nets.iter().map(ToString::to_string).collect();
    let advertised = crate::control::policy::advertised_routes(&n.hostinfo);
    let (approved, primary) = access.route_state(n);
    let mut ip_addresses = Vec::new();
    if let Some(v4) = n.ipv4 {
        ip_addresses.push(v4.to_string());
    }
    if let Some(v6) = n.ipv6 {
        ip_addresses.push(v6.to_string());
    }
    let member = sessions.get(&n.id).copied();
    pb::Node {
        id: n.id.0,
        name: n.hostname.clone(),
        given_name: n.given_name.clone(),
        user: user_name(view, n.user),
        ip_addresses,
        online: member.is_some(),
        last_seen: opt_timestamp(n.last_seen),
        expiry: opt_timestamp(n.expiry),
        tags: n.tags.clone(),
        approved: n.approved,
        member,
        machine_key: n.machine_key.to_text(),
        node_key: n.node_key.to_text(),
        created_at: Some(timestamp(n.created_at)),
        ephemeral: n.ephemeral,
        expired: n.is_expired(now),
        user_id: n.user.0,
        advertised_routes: strings(&advertised),
        approved_routes: strings(&approved),
        primary_routes: strings(&primary),
        disco_key: n.disco_key.to_text(),
        pre_auth_key_id: n.auth_key.map(|k| k.0),
    }
}

pub fn member_role(role: MemberRole) -> pb::MemberRole {
    match role {
        MemberRole::Leader => pb::MemberRole::Leader,
        MemberRole::Follower => pb::MemberRole::Follower,
        MemberRole::Learner => pb::MemberRole::Learner,
        MemberRole::Unreachable => pb::MemberRole::Unreachable,
    }
}

pub fn member(m: &MemberStatus) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name.clone(),
        address: m.address.clone(),
        role: member_role(m.role) as i32,
        healthy: m.healthy,
        last_applied: m.last_applied,
        match_index: m.match_index,
        version: m.version.clone(),
        clients: m.clients,
        control_url: m.control_url.clone(),
        voter: m.voter,
        draining: m.draining,
    }
}

pub fn cluster_status(s: &ClusterStatus) -> pb::ClusterStatusResponse {
    pb::ClusterStatusResponse {
        leader: s.leader,
        term: s.term,
        members: s.members.iter().map(member).collect(),
        member_id: s.member_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            let t = timestamp(Timestamp(ms));
            assert!((0..1_000_000_000).contains(&t.nanos));
            assert_eq!(from_timestamp(&t), Timestamp(ms));
        }
    }
}

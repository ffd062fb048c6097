//! JSON views of the admin messages, shared by hsctl (`-o json`) and the REST API
//! (`/api/v1`), so both print the same field names (snake_case, as in interfaces.md).

use serde_json::{Value, json};

use super::admin as pb;

pub fn user(u: &pb::User) -> Value {
    json!({
        "id": u.id,
        "name": u.name,
        "display_name": u.display_name,
        "email": u.email,
        "provider": u.provider,
        "provider_id": u.provider_id,
        "created_at": time(&u.created_at),
    })
}

pub fn preauth_key(k: &pb::PreAuthKey) -> Value {
    json!({
        "id": k.id,
        "key": k.key,
        "prefix": k.prefix,
        "user": k.user,
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "used": k.used,
        "expiration": time(&k.expiration),
        "expired": k.expired,
        "created_at": time(&k.created_at),
        "tags": k.tags,
    })
}

pub fn api_key(k: &pb::ApiKey) -> Value {
    json!({
        "id": k.id,
        "key": k.key,
        "prefix": k.prefix,
        "expiration": time(&k.expiration),
        "expired": k.expired,
        "created_at": time(&k.created_at),
        "last_used": time(&k.last_used),
    })
}

pub fn audit_record(r: &pb::AuditRecord) -> Value {
    json!({
        "seq": r.seq,
        "time": time(&r.time),
        "actor": r.actor,
        "action": r.action,
        "target": r.target,
        "result": r.result,
    })
}

pub fn node(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "name": n.name,
        "given_name": n.given_name,
        "user": n.user,
        "ip_addresses": n.ip_addresses,
        "online": n.online,
        "last_seen": time(&n.last_seen),
        "expiry": time(&n.expiry),
        "expired": n.expired,
        "tags": n.tags,
        "approved": n.approved,
        "member": n.member,
        "ephemeral": n.ephemeral,
        "created_at": time(&n.created_at),
        "machine_key": n.machine_key,
        "node_key": n.node_key,
        "advertised_routes": n.advertised_routes,
        "approved_routes": n.approved_routes,
        "primary_routes": n.primary_routes,
    })
}

pub fn role_name(role: i32) -> &'static str {
    match pb::MemberRole::try_from(role) {
        Ok(pb::MemberRole::Leader) => "leader",
        Ok(pb::MemberRole::Follower) => "follower",
        Ok(pb::MemberRole::Learner) => "learner",
        Ok(pb::MemberRole::Unreachable) => "unreachable",
        Ok(pb::MemberRole::Unspecified) | Err(_) => "unknown",
    }
}

pub fn cluster_status(s: &pb::ClusterStatusResponse) -> Value {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "name": m.name,
                "address": m.address,
                "control_url": m.control_url,
                "role": role_name(m.role),
                "voter": m.voter,
                "healthy": m.healthy,
                "last_applied": m.last_applied,
                "match_index": m.match_index,
                "version": m.version,
                "clients": m.clients,
                "draining": m.draining,
            })
        })
        .collect();
    json!({ "leader": s.leader, "term": s.term, "member_id": s.member_id, "members": members })
}

/// RFC 3339 (UTC, `Z`), or JSON null when unset.
pub fn time(t: &Option<prost_types::Timestamp>) -> Value {
    match time_text(t) {
        Some(text) => Value::String(text),
        None => Value::Null,
    }
}

pub fn time_text(t: &Option<prost_types::Timestamp>) -> Option<String> {
    let t = t.as_ref()?;
    let nanos = u32::try_from(t.nanos).unwrap_or(0);
    let at = chrono::DateTime::from_timestamp(t.seconds, nanos)?;
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

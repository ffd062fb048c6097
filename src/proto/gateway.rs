//! JSON views of the admin messages as headscale's REST API (its gRPC gateway) prints
//! them: lowerCamelCase names, 64-bit ids as strings, RFC 3339 times with unset ones as
//! `null`, empty lists and strings emitted, enums by name. Scripts written for headscale
//! read these unchanged; fields hsd has beyond headscale's are added under the same rules
//! (clients of the gateway ignore fields they do not know).
//!
//! hsctl's `-o json` prints the same messages through [`super::json`] (snake_case, as
//! interfaces.md fixes it); both start from the one proto conversion in `admin::convert`.

use serde_json::{Value, json};

use super::admin as pb;
use super::json::time;

/// A 64-bit id as the gateway prints it.
pub fn id(value: u64) -> Value {
    Value::String(value.to_string())
}

fn opt_id(value: Option<u64>) -> Value {
    value.map_or(Value::Null, id)
}

pub fn user(u: &pb::User) -> Value {
    json!({
        "id": id(u.id),
        "name": u.name,
        "createdAt": time(&u.created_at),
        "displayName": u.display_name,
        "email": u.email,
        "providerId": u.provider_id,
        "provider": u.provider,
        "profilePicUrl": "",
    })
}

/// `owner`: the key's user (null for a key that only carries tags).
pub fn preauth_key(k: &pb::PreAuthKey, owner: Option<&pb::User>) -> Value {
    // Like headscale, a listing shows only the prefix; the full key comes back once.
    let key = match &k.key {
        Some(full) => full.clone(),
        None => format!("hskey-auth-{}-***", k.prefix),
    };
    json!({
        "user": owner.map(user),
        "id": id(k.id),
        "key": key,
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "used": k.used,
        "expiration": time(&k.expiration),
        "createdAt": time(&k.created_at),
        "aclTags": k.tags,
        "expired": k.expired,
    })
}

/// `owner`: the node's user; `key`: the pre-auth key it joined with, if still there.
pub fn node(n: &pb::Node, owner: Option<&pb::User>, key: Option<&pb::PreAuthKey>) -> Value {
    let method = if n.pre_auth_key_id.is_some() {
        "REGISTER_METHOD_AUTH_KEY"
    } else {
        "REGISTER_METHOD_CLI"
    };
    json!({
        "id": id(n.id),
        "machineKey": n.machine_key,
        "nodeKey": n.node_key,
        "discoKey": n.disco_key,
        "ipAddresses": n.ip_addresses,
        "name": n.name,
        "user": owner.map(user),
        "lastSeen": time(&n.last_seen),
        "expiry": time(&n.expiry),
        "preAuthKey": key.map(|k| preauth_key(k, owner)),
        "createdAt": time(&n.created_at),
        "registerMethod": method,
        "givenName": n.given_name,
        "online": n.online,
        "approvedRoutes": n.approved_routes,
        "availableRoutes": n.advertised_routes,
        "subnetRoutes": n.primary_routes,
        "tags": n.tags,
        // hsd's own: the member holding the node's session, approval, expiry state.
        "member": opt_id(n.member),
        "approved": n.approved,
        "ephemeral": n.ephemeral,
        "expired": n.expired,
    })
}

pub fn api_key(k: &pb::ApiKey) -> Value {
    json!({
        "id": id(k.id),
        "prefix": format!("hskey-api-{}-***", k.prefix),
        "expiration": time(&k.expiration),
        "createdAt": time(&k.created_at),
        "lastSeen": time(&k.last_used),
        "expired": k.expired,
    })
}

pub fn policy_version(v: &pb::PolicyVersion) -> Value {
    json!({
        "version": id(v.version),
        "policy": v.policy,
        "createdAt": time(&v.at),
        "current": v.current,
    })
}

pub fn audit_record(r: &pb::AuditRecord) -> Value {
    json!({
        "seq": id(r.seq),
        "time": time(&r.time),
        "actor": r.actor,
        "action": r.action,
        "target": r.target,
        "result": r.result,
    })
}

pub fn cluster_status(s: &pb::ClusterStatusResponse) -> Value {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "id": id(m.id),
                "name": m.name,
                "address": m.address,
                "controlUrl": m.control_url,
                "role": super::json::role_name(m.role),
                "voter": m.voter,
                "healthy": m.healthy,
                "lastApplied": opt_id(m.last_applied),
                "matchIndex": opt_id(m.match_index),
                "version": m.version,
                "clients": opt_id(m.clients),
                "draining": m.draining,
            })
        })
        .collect();
    json!({
        "leader": opt_id(s.leader),
        "term": id(s.term),
        "memberId": id(s.member_id),
        "members": members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_strings_unset_times_null_and_listings_hide_keys() {
        let key = pb::PreAuthKey {
            id: 7,
            prefix: "abc123".into(),
            key: None,
            expiration: None,
            ..Default::default()
        };
        let v = preauth_key(&key, None);
        assert_eq!(v["id"], "7");
        assert_eq!(v["key"], "hskey-auth-abc123-***");
        assert_eq!(v["expiration"], Value::Null);
        assert_eq!(v["user"], Value::Null);
        assert_eq!(v["aclTags"], json!([]));
        let created = pb::PreAuthKey {
            key: Some("hskey-auth-abc123-secret".into()),
            ..key
        };
        assert_eq!(
            preauth_key(&created, None)["key"],
            "hskey-auth-abc123-secret"
        );
    }

    #[test]
    fn a_node_names_how_it_registered_and_embeds_its_user() {
        let owner = pb::User {
            id: 3,
            name: "ann".into(),
            ..Default::default()
        };
        let node_msg = pb::Node {
            id: 12,
            pre_auth_key_id: Some(4),
            ..Default::default()
        };
        let v = node(&node_msg, Some(&owner), None);
        assert_eq!(v["id"], "12");
        assert_eq!(v["registerMethod"], "REGISTER_METHOD_AUTH_KEY");
        assert_eq!(v["user"]["name"], "ann");
        assert_eq!(v["user"]["id"], "3");
        assert_eq!(v["member"], Value::Null);
        assert_eq!(v["lastSeen"], Value::Null);
        assert_eq!(v["tags"], json!([]));
    }
}

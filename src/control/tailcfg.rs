//! The subset of Tailscale's `tailcfg` JSON that clients send and expect.
//!
//! Go marshals field names verbatim, so most fields are PascalCase on the wire. Requests are
//! decoded leniently (unknown fields ignored, missing fields default), because newer clients
//! add fields all the time; responses omit what we do not set, because for the client an
//! absent field often means "unchanged" and an empty one means "cleared".

use std::collections::BTreeMap;

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// JSON encoded once and shared: a peer as every receiver sees it, a patch, a profile.
pub type RawJson = Arc<RawValue>;

use crate::registry::{DiscoKey, NodeKey};

/// Lowest capability version accepted: capver 90 (tailscale v1.64). The map code needs
/// named `PacketFilters` (capver 81); the home relay goes out both as `HomeDERP` (capver
/// 111+) and as the legacy `DERP` "127.3.3.40:N" string older clients read.
pub const MIN_CAPABILITY_VERSION: u32 = 90;

/// `time.Time` as Go marshals it; Go's zero time means "unset".
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Decodes an optional Go timestamp; zero time and null become `None`.
pub fn de_go_time<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text {
        None => Ok(None),
        Some(t) if t.is_empty() || t.starts_with("0001-01-01") => Ok(None),
        Some(t) => chrono::DateTime::parse_from_rfc3339(&t)
            .map(|dt| Some(dt.with_timezone(&chrono::Utc)))
            .map_err(serde::de::Error::custom),
    }
}

fn de_null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct RegisterRequest {
    pub version: u32,
    pub node_key: NodeKey,
    pub old_node_key: NodeKey,
    #[serde(deserialize_with = "de_null_default")]
    pub auth: Option<RegisterAuth>,
    #[serde(deserialize_with = "de_go_time")]
    pub expiry: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(deserialize_with = "de_null_default")]
    pub followup: String,
    #[serde(deserialize_with = "de_null_default")]
    pub hostinfo: Option<Value>,
    pub ephemeral: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct RegisterAuth {
    #[serde(deserialize_with = "de_null_default")]
    pub auth_key: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegisterResponse {
    pub user: UserJson,
    pub login: LoginJson,
    pub node_key_expired: bool,
    pub machine_authorized: bool,
    #[serde(rename = "AuthURL", skip_serializing_if = "String::is_empty")]
    pub auth_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserJson {
    #[serde(rename = "ID")]
    pub id: u64,
    pub login_name: String,
    pub display_name: String,
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LoginJson {
    #[serde(rename = "ID")]
    pub id: u64,
    pub provider: String,
    pub login_name: String,
    pub display_name: String,
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct UserProfile {
    #[serde(rename = "ID")]
    pub id: u64,
    pub login_name: String,
    pub display_name: String,
    #[serde(rename = "ProfilePicURL")]
    pub profile_pic_url: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct MapRequest {
    pub version: u32,
    #[serde(deserialize_with = "de_null_default")]
    pub compress: String,
    pub keep_alive: bool,
    pub node_key: NodeKey,
    pub disco_key: DiscoKey,
    pub stream: bool,
    pub omit_peers: bool,
    #[serde(deserialize_with = "de_null_default")]
    pub hostinfo: Option<Value>,
    #[serde(deserialize_with = "de_null_default")]
    pub endpoints: Vec<String>,
    #[serde(deserialize_with = "de_null_default")]
    pub endpoint_types: Vec<i32>,
    pub read_only: bool,
}

/// One node as the client sees it (self or peer).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeJson {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "StableID")]
    pub stable_id: String,
    /// FQDN with a trailing dot.
    pub name: String,
    pub user: u64,
    pub key: String,
    pub key_expiry: String,
    pub machine: String,
    pub disco_key: String,
    pub addresses: Vec<String>,
    #[serde(rename = "AllowedIPs")]
    pub allowed_ips: Vec<String>,
    /// Subnet routes this node is the primary router for (as this viewer may use them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub primary_routes: Vec<String>,
    pub endpoints: Vec<String>,
    #[serde(rename = "HomeDERP", skip_serializing_if = "is_zero")]
    pub home_derp: i32,
    /// Legacy form of the home region for older clients ("127.3.3.40:<region>").
    #[serde(rename = "DERP", skip_serializing_if = "String::is_empty")]
    pub legacy_derp: String,
    /// The stored Hostinfo, embedded as is (it was JSON-encoded when it was recorded).
    pub hostinfo: Box<RawValue>,
    pub created: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    pub machine_authorized: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cap_map: BTreeMap<String, Value>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// A cheap per-peer change (`PeersChangedPatch`).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct PeerChange {
    #[serde(rename = "NodeID")]
    pub node_id: u64,
    #[serde(rename = "DERPRegion", skip_serializing_if = "Option::is_none")]
    pub derp_region: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct MapResponse {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_alive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<RawJson>,
    #[serde(rename = "DERPMap", skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<RawJson>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_changed: Vec<RawJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_changed_patch: Vec<RawJson>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub online_change: BTreeMap<String, bool>,
    #[serde(rename = "DNSConfig", skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub collect_services: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_filters: Option<Value>,
    #[serde(rename = "SSHPolicy", skip_serializing_if = "Option::is_none")]
    pub ssh_policy: Option<RawJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_profiles: Vec<RawJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_dial_plan: Option<Value>,
}

impl MapResponse {
    /// True when the response carries nothing for the client.
    pub fn is_empty_delta(&self) -> bool {
        self.node.is_none()
            && self.derp_map.is_none()
            && self.peers.is_none()
            && self.peers_changed.is_empty()
            && self.peers_removed.is_empty()
            && self.peers_changed_patch.is_empty()
            && self.online_change.is_empty()
            && self.dns_config.is_none()
            && self.packet_filters.is_none()
            && self.ssh_policy.is_none()
            && self.user_profiles.is_empty()
            && self.control_dial_plan.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_request_from_a_real_client_decodes() {
        let body = r#"{"Version":130,"NodeKey":"nodekey:0000000000000000000000000000000000000000000000000000000000000001",
            "OldNodeKey":"nodekey:0000000000000000000000000000000000000000000000000000000000000000",
            "NLKey":"nlpub:00","Auth":{"Provider":"","LoginName":"","Oauth2Token":null,"AuthKey":"hskey-auth-x"},
            "Expiry":"0001-01-01T00:00:00Z","Followup":"","Hostinfo":{"Hostname":"a","OS":"linux"},
            "Ephemeral":false,"NodeKeySignature":null,"SignatureType":0,"Timestamp":null,"DeviceCert":null,
            "Signature":null,"Tailnet":""}"#;
        let req: RegisterRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.version, 130);
        assert!(req.old_node_key.is_zero());
        assert!(req.expiry.is_none());
        assert_eq!(req.auth.unwrap().auth_key, "hskey-auth-x");
    }

    #[test]
    fn logout_expiry_decodes_as_past_time() {
        let req: RegisterRequest =
            serde_json::from_str(r#"{"Expiry":"1970-01-01T00:02:03Z"}"#).unwrap();
        assert_eq!(req.expiry.unwrap().timestamp(), 123);
    }

    #[test]
    fn map_request_with_nulls_decodes() {
        let req: MapRequest = serde_json::from_str(
            r#"{"Version":130,"Stream":true,"Endpoints":null,"Hostinfo":null,"Compress":"zstd"}"#,
        )
        .unwrap();
        assert!(req.stream && req.endpoints.is_empty() && req.hostinfo.is_none());
    }

    #[test]
    fn garbage_json_is_an_error_not_a_panic() {
        for body in [
            "",
            "{",
            "[]",
            "{\"NodeKey\":\"nodekey:zz\"}",
            "{\"Version\":-1}",
            "null",
        ] {
            let _ = serde_json::from_str::<RegisterRequest>(body);
            let _ = serde_json::from_str::<MapRequest>(body);
        }
    }
}

//! The registry's entities and key newtypes.
//!
//! Keys are 32-byte x25519 public keys whose text form is `prefix:` + lowercase hex, exactly
//! as the Tailscale client writes them in JSON (`mkey:…`, `nodekey:…`, `discokey:…`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. Stamped into commands by the proposer so that
/// `Registry::apply` never reads a clock and every member derives the same state.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(chrono::Utc::now().timestamp_millis())
    }

    pub fn to_datetime(self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// RFC 3339 with second precision, the form Go's `time.Time` marshals.
    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    pub fn plus_millis(self, millis: i64) -> Self {
        Timestamp(self.0.saturating_add(millis))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// Error parsing a key's text form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind}: expected \"{prefix}\" followed by 64 hex characters")]
pub struct KeyParseError {
    pub kind: &'static str,
    pub prefix: &'static str,
}

/// The encodings of Curve25519's small-order points (as rejected by libsodium and
/// others), compared with the unused top bit cleared.
const LOW_ORDER_POINTS: [[u8; 32]; 7] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    p_plus(0xec),
    p_plus(0xed),
    p_plus(0xee),
];

/// p - 1, p and p + 1 (p = 2^255 - 19), little-endian: 0xec/0xed/0xee, then 0xff…, 0x7f.
const fn p_plus(low: u8) -> [u8; 32] {
    let mut k = [0xff; 32];
    k[0] = low;
    k[31] = 0x7f;
    k
}

/// Whether `key` encodes a small-order Curve25519 point.
pub fn is_low_order_point(key: &[u8; 32]) -> bool {
    let mut k = *key;
    k[31] &= 0x7f;
    LOW_ORDER_POINTS.contains(&k)
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn is_zero(&self) -> bool {
                self.0 == [0u8; 32]
            }

            /// A Curve25519 point of small order (all-zero included): Diffie-Hellman with
            /// it yields a value the other side can predict, so it is never a real key.
            pub fn is_low_order(&self) -> bool {
                is_low_order_point(&self.0)
            }

            pub fn to_text(&self) -> String {
                format!("{}{}", $prefix, hex::encode(self.0))
            }

            pub fn parse(text: &str) -> Result<Self, KeyParseError> {
                let err = KeyParseError { kind: stringify!($name), prefix: $prefix };
                let hex_part = text.strip_prefix($prefix).ok_or(err.clone())?;
                let mut out = [0u8; 32];
                hex::decode_to_slice(hex_part, &mut out).map_err(|_| err)?;
                Ok($name(out))
            }

            /// A short, non-secret prefix for logs.
            pub fn short(&self) -> String {
                format!("{}{}", $prefix, hex::encode(&self.0[..4]))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}…", self.short())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_text())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_text())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                if text.is_empty() {
                    return Ok($name::default());
                }
                $name::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

impl Clone for KeyParseError {
    fn clone(&self) -> Self {
        KeyParseError {
            kind: self.kind,
            prefix: self.prefix,
        }
    }
}

key_type!(
    /// A client's machine key: its Noise static key, authenticated by the handshake.
    MachineKey,
    "mkey:"
);
key_type!(
    /// A node's WireGuard key, its identity in netmaps and on DERP. Rotates.
    NodeKey,
    "nodekey:"
);
key_type!(
    /// A node's disco key; changes on every client restart.
    DiscoKey,
    "discokey:"
);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A user (namespace) id; never reused.
    UserId
);
id_type!(
    /// A Tailscale node (device) id; never reused, so clients can sort and diff by it.
    NodeId
);
id_type!(
    /// A pre-auth key id.
    PreAuthKeyId
);
id_type!(
    /// An API key id.
    ApiKeyId
);

/// SHA-256 of a secret. Secrets (pre-auth keys, API keys) are stored only as hashes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct SecretHash(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        use sha2::Digest;
        SecretHash(sha2::Sha256::digest(secret.as_bytes()).into())
    }

    /// Constant-time comparison, so a timing side channel cannot reveal a stored hash.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(…)")
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub created_at: Timestamp,
    /// Shown instead of the name where set (headscale's `displayName`).
    #[serde(default)]
    pub display_name: String,
    /// The user's email, which policies may name instead of `name@`.
    #[serde(default)]
    pub email: String,
    /// `<issuer>/<subject>` for a user from an OpenID provider: who they are, whatever
    /// their name or email become. Empty for users made by an admin.
    #[serde(default)]
    pub provider_id: String,
}

/// Who an OpenID provider says logged in, from a verified ID token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcIdentity {
    pub issuer: String,
    pub subject: String,
    /// The name to give a new user (`preferred_username`, else the email).
    pub name: String,
    pub display_name: String,
    pub email: String,
}

impl OidcIdentity {
    pub fn provider_id(&self) -> String {
        format!("{}/{}", self.issuer.trim_end_matches('/'), self.subject)
    }

    /// How the audit log and refusals name someone: their email, else `issuer/subject`.
    pub fn label(&self) -> String {
        if self.email.is_empty() {
            self.provider_id()
        } else {
            self.email.clone()
        }
    }
}

/// A Tailscale device. Replicated through Raft. High-rate soft state (online, endpoints,
/// home DERP) is *not* here: it lives per member in `presence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub machine_key: MachineKey,
    pub node_key: NodeKey,
    pub disco_key: DiscoKey,
    pub user: UserId,
    /// The hostname the client reported.
    pub hostname: String,
    /// The unique DNS label used in `Node.Name`; admins may rename it.
    pub given_name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// The client's last reported `Hostinfo`, as JSON text (opaque to the registry).
    pub hostinfo: String,
    pub created_at: Timestamp,
    /// Key expiry; `None` means the key never expires.
    pub expiry: Option<Timestamp>,
    /// Last time a map session of this node ended (written once per disconnect).
    pub last_seen: Option<Timestamp>,
    pub tags: Vec<String>,
    /// False while the node waits for `hsctl nodes approve` (node_approval: manual).
    pub approved: bool,
    pub ephemeral: bool,
    pub auth_key: Option<PreAuthKeyId>,
    /// Routes an admin approved (`hsctl nodes approve-routes`); the node serves those it
    /// also advertises (Hostinfo `RoutableIPs`).
    #[serde(default)]
    pub approved_routes: Vec<ipnet::IpNet>,
}

impl Node {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        matches!(self.expiry, Some(at) if at <= now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreAuthKey {
    pub id: PreAuthKeyId,
    /// The public part of the key, shown in listings and used for lookup.
    pub prefix: String,
    pub hash: SecretHash,
    pub user: UserId,
    pub reusable: bool,
    pub ephemeral: bool,
    pub used: bool,
    pub expiration: Option<Timestamp>,
    pub tags: Vec<String>,
    pub created_at: Timestamp,
}

impl PreAuthKey {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        matches!(self.expiration, Some(at) if at <= now)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub prefix: String,
    pub hash: SecretHash,
    pub expiration: Option<Timestamp>,
    pub created_at: Timestamp,
    pub last_used: Option<Timestamp>,
}

impl ApiKey {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        matches!(self.expiration, Some(at) if at <= now)
    }
}

/// What a client asked to register with; carried by commands that create a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRequest {
    pub machine_key: MachineKey,
    pub node_key: NodeKey,
    pub hostname: String,
    pub hostinfo: String,
    /// Tags the client asked for (`Hostinfo.RequestTags`).
    pub request_tags: Vec<String>,
    pub ephemeral: bool,
}

/// An interactive registration waiting for `hsctl nodes register`. Replicated, so an admin
/// may complete it on any member while the client waits on another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRegistration {
    pub auth_id: String,
    pub request: NodeRequest,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// Set once completed, so the waiting client learns the outcome.
    pub node: Option<NodeId>,
}

/// One accepted policy, kept so an admin can see what ran when and roll back to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub policy: String,
    pub at: Timestamp,
}

/// One entry of the audit log: who did what to what, when, and how it ended. Replicated
/// and append-only (the oldest are dropped past `AUDIT_MAX`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// `ok`, or the refusal's text.
    pub result: String,
}

/// DNS settings sent in every netmap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DnsSettings {
    pub magic_dns: bool,
    pub base_domain: String,
    pub nameservers: Vec<String>,
    pub search_domains: Vec<String>,
}

/// A key expiry as a command carries it: an admin's absolute time, or a span the state
/// machine adds to the entry's stamp (so the leader's clock decides, not the proposer's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    At(Timestamp),
    AfterMillis(i64),
}

impl Expiry {
    pub fn resolve(self, now: Timestamp) -> Timestamp {
        match self {
            Expiry::At(at) => at,
            Expiry::AfterMillis(ms) => now.plus_millis(ms),
        }
    }
}

/// Settings every member must share: written into the registry on the cluster's first
/// start and compared with each member's config when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    pub prefix_v4: Option<ipnet::Ipv4Net>,
    pub prefix_v6: Option<ipnet::Ipv6Net>,
    pub base_domain: String,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            prefix_v4: Some("100.64.0.0/10".parse().expect("valid literal")),
            prefix_v6: Some("fd7a:115c:a1e0::/48".parse().expect("valid literal")),
            base_domain: "hsd.internal".into(),
        }
    }
}

impl ClusterSettings {
    /// The first setting that differs, as (config key, this value, other value).
    pub fn first_difference(
        &self,
        other: &ClusterSettings,
    ) -> Option<(&'static str, String, String)> {
        let show = |v: &dyn fmt::Display| v.to_string();
        let opt = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
        if self.prefix_v4 != other.prefix_v4 {
            return Some((
                "prefixes.v4",
                opt(self.prefix_v4.map(|p| show(&p))),
                opt(other.prefix_v4.map(|p| show(&p))),
            ));
        }
        if self.prefix_v6 != other.prefix_v6 {
            return Some((
                "prefixes.v6",
                opt(self.prefix_v6.map(|p| show(&p))),
                opt(other.prefix_v6.map(|p| show(&p))),
            ));
        }
        if self.base_domain != other.base_domain {
            return Some((
                "dns.base_domain",
                format!("{:?}", self.base_domain),
                format!("{:?}", other.base_domain),
            ));
        }
        None
    }
}

#[cfg(test)]
mod low_order_tests {
    use super::*;

    #[test]
    fn small_order_points_are_recognised_and_real_keys_are_not() {
        // Every listed point, times a clamped scalar (a multiple of the cofactor), is the
        // identity: X25519 returns all zeros. That is what makes them useless as keys.
        let scalar = [0x42u8; 32];
        for point in LOW_ORDER_POINTS {
            assert!(is_low_order_point(&point));
            assert_eq!(
                x25519_dalek::x25519(scalar, point),
                [0u8; 32],
                "{point:02x?}"
            );
            let mut high = point;
            high[31] |= 0x80;
            assert!(is_low_order_point(&high), "the top bit is ignored");
        }
        let real = x25519_dalek::x25519(scalar, x25519_dalek::X25519_BASEPOINT_BYTES);
        assert!(!is_low_order_point(&real));
        assert!(NodeKey([0; 32]).is_low_order() && !NodeKey(real).is_low_order());
    }
}

//! `Command`, the Raft log payload, and `Outcome`, its reply.

use serde::{Deserialize, Serialize};

use super::types::*;

/// Names one logical write across retries. The state machine remembers recent ids and
/// answers a repeat with the first outcome, so a forward retried after a lost reply is
/// applied once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RequestId(pub u128);

impl RequestId {
    /// A fresh id: the wall clock's milliseconds in the top 48 bits, 80 random bits below.
    /// Unique as a random id is; ordered by time, so each member's map of recent ids grows
    /// at its end (a persistent map copies one path per applied entry, not one per write).
    pub fn random() -> Self {
        let millis = Timestamp::now().0 as u128 & ((1 << 48) - 1);
        let random: u128 = rand::random::<u128>() >> 48;
        RequestId((millis << 80) | random)
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        u128::from_str_radix(&text, 16)
            .map(RequestId)
            .map_err(serde::de::Error::custom)
    }
}

/// One write as a member proposes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: RequestId,
    pub command: Command,
    /// Who asked, for an admin action (`uid:1000`, `apikey:<prefix>`): applying it also
    /// appends an audit record with the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl Proposal {
    /// A new write with a fresh id.
    pub fn new(command: Command) -> Self {
        Proposal {
            id: RequestId::random(),
            command,
            actor: None,
        }
    }

    /// A new admin write by `actor`, recorded in the audit log when applied.
    pub fn by(actor: String, command: Command) -> Self {
        Proposal {
            actor: Some(actor),
            ..Proposal::new(command)
        }
    }
}

/// One log entry's payload: the proposals the leader batched into it, stamped with the
/// leader's clock. `Registry::apply` never reads a clock; it takes this stamp (or the last
/// applied one, if later), so every member derives the same state and expiry never
/// follows a proposer's wall clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub at: Timestamp,
    /// Shared: the log keeps recent entries in memory for replication, and copies of an
    /// entry must not copy its proposals.
    pub proposals: std::sync::Arc<[Proposal]>,
}

impl Request {
    /// An entry holding one proposal (tests, tools).
    pub fn single(at: Timestamp, command: Command) -> Self {
        Request {
            at,
            proposals: vec![Proposal::new(command)].into(),
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.proposals {
            [one] => write!(f, "{}", one.command.name()),
            many => write!(f, "batch of {}", many.len()),
        }
    }
}

/// How a node proves it may join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeAuth {
    /// A pre-auth key: looked up by prefix, checked against its hash.
    PreAuthKey { prefix: String, hash: SecretHash },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A no-op, used to check that this member can still commit.
    Noop,
    CreateUser {
        name: String,
        #[serde(default)]
        display_name: String,
        #[serde(default)]
        email: String,
    },
    RenameUser {
        old: String,
        new: String,
    },
    DeleteUser {
        name: String,
    },
    CreatePreAuthKey {
        user: String,
        prefix: String,
        hash: SecretHash,
        reusable: bool,
        ephemeral: bool,
        expiration: Option<Timestamp>,
        tags: Vec<String>,
    },
    ExpirePreAuthKey {
        user: String,
        prefix: String,
    },
    DeletePreAuthKey {
        user: String,
        prefix: String,
    },
    CreateApiKey {
        prefix: String,
        hash: SecretHash,
        expiration: Option<Timestamp>,
    },
    ExpireApiKey {
        prefix: String,
    },
    DeleteApiKey {
        prefix: String,
    },
    /// Register a node with a pre-auth key (or re-authenticate an existing machine).
    RegisterNode {
        request: NodeRequest,
        auth: NodeAuth,
        /// Whether new nodes start approved (config `node_approval`).
        auto_approve: bool,
        /// Key expiry for a new node; `None` = never.
        expiry: Option<Expiry>,
    },
    /// Start an interactive registration; the client waits on `auth_id`.
    BeginInteractive {
        auth_id: String,
        request: NodeRequest,
        /// How long the registration stays open, from the entry's stamp.
        ttl_ms: i64,
        /// Refuse when this many registrations are already open (`limits.
        /// max_pending_registrations` of the proposing member; carried in the entry so
        /// every member decides alike).
        #[serde(default = "default_max_pending")]
        max_pending: u32,
    },
    /// Complete an interactive registration for `user` (`hsctl nodes register`).
    CompleteInteractive {
        auth_id: String,
        user: String,
        auto_approve: bool,
        expiry: Option<Expiry>,
    },
    /// Void an open interactive registration: its AuthURL stops working and the waiting
    /// client starts over with a new one.
    RejectInteractive {
        auth_id: String,
    },
    /// Replace a node's key (`RegisterRequest.OldNodeKey`).
    RotateNodeKey {
        machine_key: MachineKey,
        old: NodeKey,
        new: NodeKey,
    },
    /// Client logout: expire the node, or delete it if ephemeral.
    LogoutNode {
        machine_key: MachineKey,
        node_key: NodeKey,
    },
    /// Hostinfo / disco key changed (rare; written only when different).
    UpdateNodeInfo {
        id: NodeId,
        hostname: String,
        hostinfo: String,
        disco_key: DiscoKey,
    },
    /// A map session ended; one write per disconnect, not per keep-alive.
    SetLastSeen {
        id: NodeId,
    },
    ApproveNode {
        id: NodeId,
    },
    /// Sets a node's key expiry: now unless `until` says otherwise.
    ExpireNode {
        id: NodeId,
        #[serde(default)]
        until: ExpireUntil,
    },
    DeleteNode {
        id: NodeId,
    },
    /// Remove ephemeral nodes that went away, if they are still offline-since `last_seen`.
    DeleteNodes {
        ids: Vec<NodeId>,
    },
    RenameNode {
        id: NodeId,
        name: String,
    },
    MoveNode {
        id: NodeId,
        user: String,
    },
    TagNode {
        id: NodeId,
        tags: Vec<String>,
    },
    SetDns {
        dns: DnsSettings,
    },
    SetPolicy {
        policy: String,
    },
    /// Makes a kept policy version the running policy again (as a new version).
    RollbackPolicy {
        version: u64,
    },
    /// Replaces the routes approved for a node.
    ApproveRoutes {
        id: NodeId,
        routes: Vec<ipnet::IpNet>,
    },
    /// Records the settings every member must share, on first start. Applied once; a later
    /// proposal with different settings is refused (the proposing member then refuses to
    /// run, naming the key that differs).
    InitSettings {
        settings: ClusterSettings,
    },
    /// An audit record that is no registry change (a refused admin authentication).
    RecordAudit {
        actor: String,
        action: String,
        target: String,
        result: String,
    },
    /// Drops audit records older than `before`, then the oldest beyond `keep_at_most`
    /// (`audit.retention`, `audit.max_records`; proposed by the leader).
    PruneAudit {
        before: Timestamp,
        keep_at_most: u64,
    },
    /// Pins the DERP key a member's relay uses, so the other relays accept its mesh
    /// connection only with that key and only while it is a member (proposed by the
    /// member itself on start).
    SetMemberDerpKey {
        member: u64,
        key: [u8; 32],
    },
    /// Complete an interactive registration for whoever logged in at the OpenID provider:
    /// their user is found by issuer and subject (made on the first login) and takes the
    /// token's current display name and email.
    OidcLogin {
        auth_id: String,
        identity: OidcIdentity,
        auto_approve: bool,
        expiry: Option<Expiry>,
    },
}

/// Where `ExpireNode` puts a node's key expiry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpireUntil {
    /// Expire it now (an already expired key keeps its time).
    #[default]
    Now,
    At(Timestamp),
    Never,
}

impl Command {
    /// A user with no display name or email (what `hsctl users create` proposes).
    pub fn create_user(name: impl Into<String>) -> Command {
        Command::CreateUser {
            name: name.into(),
            display_name: String::new(),
            email: String::new(),
        }
    }

    /// What the command acts on, for the audit log (names and ids, never secrets).
    pub fn target(&self) -> String {
        match self {
            Command::CreateUser { name, .. } | Command::DeleteUser { name } => name.clone(),
            Command::RenameUser { old, new } => format!("{old} -> {new}"),
            Command::ApproveNode { id }
            | Command::ExpireNode { id, .. }
            | Command::DeleteNode { id } => format!("node {id}"),
            Command::ExpireApiKey { prefix } | Command::DeleteApiKey { prefix } => {
                format!("api key {prefix}")
            }
            Command::RenameNode { id, name } => format!("node {id} -> {name}"),
            Command::MoveNode { id, user } => format!("node {id} -> user {user}"),
            Command::TagNode { id, tags } => format!("node {id} tags {}", tags.join(",")),
            Command::RollbackPolicy { version } => format!("policy version {version}"),
            Command::ApproveRoutes { id, routes } => {
                let routes: Vec<String> = routes.iter().map(ToString::to_string).collect();
                format!("node {id} routes {}", routes.join(","))
            }
            Command::CreatePreAuthKey { user, prefix, .. }
            | Command::ExpirePreAuthKey { user, prefix }
            | Command::DeletePreAuthKey { user, prefix } => {
                format!("pre-auth key {prefix} of {user}")
            }
            Command::CreateApiKey { prefix, .. } => format!("api key {prefix}"),
            Command::RejectInteractive { auth_id } => format!("registration {auth_id}"),
            Command::CompleteInteractive { auth_id, user, .. } => {
                format!("registration {auth_id} for {user}")
            }
            Command::OidcLogin {
                auth_id, identity, ..
            } => format!("registration {auth_id} for {}", identity.provider_id()),
            Command::RecordAudit { target, .. } => target.clone(),
            _ => String::new(),
        }
    }

    /// A stable, secret-free name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Noop => "noop",
            Command::RecordAudit { .. } => "record_audit",
            Command::PruneAudit { .. } => "prune_audit",
            Command::SetMemberDerpKey { .. } => "set_member_derp_key",
            Command::CreateUser { .. } => "create_user",
            Command::RenameUser { .. } => "rename_user",
            Command::DeleteUser { .. } => "delete_user",
            Command::CreatePreAuthKey { .. } => "create_preauthkey",
            Command::ExpirePreAuthKey { .. } => "expire_preauthkey",
            Command::DeletePreAuthKey { .. } => "delete_preauthkey",
            Command::RejectInteractive { .. } => "reject_registration",
            Command::CreateApiKey { .. } => "create_apikey",
            Command::ExpireApiKey { .. } => "expire_apikey",
            Command::DeleteApiKey { .. } => "delete_apikey",
            Command::RegisterNode { .. } => "register_node",
            Command::BeginInteractive { .. } => "begin_interactive",
            Command::CompleteInteractive { .. } => "complete_interactive",
            Command::RotateNodeKey { .. } => "rotate_node_key",
            Command::LogoutNode { .. } => "logout_node",
            Command::UpdateNodeInfo { .. } => "update_node_info",
            Command::SetLastSeen { .. } => "set_last_seen",
            Command::ApproveNode { .. } => "approve_node",
            Command::ExpireNode { .. } => "expire_node",
            Command::DeleteNode { .. } => "delete_node",
            Command::DeleteNodes { .. } => "delete_nodes",
            Command::RenameNode { .. } => "rename_node",
            Command::MoveNode { .. } => "move_node",
            Command::TagNode { .. } => "tag_node",
            Command::SetDns { .. } => "set_dns",
            Command::SetPolicy { .. } => "set_policy",
            Command::ApproveRoutes { .. } => "approve_routes",
            Command::RollbackPolicy { .. } => "rollback_policy",
            Command::InitSettings { .. } => "init_settings",
            Command::OidcLogin { .. } => "oidc_login",
        }
    }
}

fn default_max_pending() -> u32 {
    1000
}

/// A state-dependent refusal: data, not a storage error. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("user {0:?} not found")]
    UserNotFound(String),
    #[error("user {0:?} still owns {1} node(s); delete or move them first")]
    UserHasNodes(String, usize),
    #[error("invalid name {0:?}: {1}")]
    InvalidName(String, String),
    #[error("invalid tag {0:?}: tags look like \"tag:name\"")]
    InvalidTag(String),
    #[error("pre-auth key not found")]
    PreAuthKeyNotFound,
    #[error("pre-auth key {prefix} expired at {expired_at}")]
    PreAuthKeyExpired {
        prefix: String,
        expired_at: Timestamp,
    },
    #[error("pre-auth key {0} was already used")]
    PreAuthKeyUsed(String),
    #[error("API key {0} not found")]
    ApiKeyNotFound(String),
    #[error("API key prefix {0} already exists")]
    ApiKeyExists(String),
    #[error("node {0} not found")]
    NodeNotFound(NodeId),
    #[error("policy version {0} is not kept (see policy history)")]
    PolicyVersionNotFound(u64),
    #[error("node key {0} is not registered")]
    NodeKeyNotFound(String),
    #[error("node key {0} is already bound to another machine")]
    NodeKeyInUse(String),
    #[error("node key {0} belongs to a different machine key")]
    MachineKeyMismatch(String),
    #[error("{0} interactive registrations are already waiting for an admin; try again later")]
    TooManyPending(u32),
    #[error("registration {0:?} not found or expired")]
    RegistrationNotFound(String),
    #[error("registration {0:?} was already completed")]
    RegistrationCompleted(String),
    #[error("address pool {0} is exhausted")]
    AddressesExhausted(String),
    #[error("the cluster's settings are not recorded yet; retry shortly")]
    SettingsMissing,
    #[error("config {key} is {proposed} here but {cluster} in the cluster")]
    SettingsMismatch {
        key: String,
        cluster: String,
        proposed: String,
    },
}

/// The reply to an applied proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    User(User),
    PreAuthKey(PreAuthKey),
    ApiKey(ApiKey),
    Node(Box<Node>),
    Pending(Box<PendingRegistration>),
    Removed(Vec<NodeId>),
    Rejected(Rejection),
}

impl Outcome {
    /// Turns a refusal into an `Err`, for callers that only care about success.
    pub fn into_result(self) -> Result<Outcome, Rejection> {
        match self {
            Outcome::Rejected(r) => Err(r),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids taken later sort later (by the millisecond), and never repeat.
    #[test]
    fn request_ids_are_unique_and_ordered_by_time() {
        let first: Vec<RequestId> = (0..1_000).map(|_| RequestId::random()).collect();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = RequestId::random();
        assert!(first.iter().all(|id| *id < later));
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(distinct.len(), first.len());
        let millis = Timestamp::now().0 as u128 & ((1 << 48) - 1);
        assert!((later.0 >> 80).abs_diff(millis) < 60_000);
    }
}

//! `Change`: facts about what an applied command changed, which map sessions turn into
//! netmap deltas, and `Record`: which stored records the state machine must rewrite.

use serde::{Deserialize, Serialize};

use super::command::RequestId;
use super::types::{ApiKeyId, NodeId, PreAuthKeyId, UserId};

/// What a netmap may now need to include. Every member derives the same changes from the
/// same log, so members never notify each other about registry changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    /// A node was created or any of its replicated fields changed.
    NodeUpserted(NodeId),
    NodeRemoved(NodeId),
    /// A user was created, renamed or deleted (user profiles in netmaps).
    UserChanged(UserId),
    DnsChanged,
    PolicyChanged,
    /// An interactive registration changed (a waiting client may proceed).
    PendingChanged(String),
}

/// A stored record touched by a command; the state machine re-reads its current value from
/// the registry (present → put, absent → delete) and writes it with the last-applied id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Record {
    /// The id counters and last addresses handed out.
    Meta,
    /// The running policy's text.
    Policy,
    /// The DNS settings.
    Dns,
    /// The cluster clock (the latest applied stamp).
    Clock,
    /// The cluster-wide settings.
    Settings,
    User(UserId),
    Node(NodeId),
    PreAuthKey(PreAuthKeyId),
    ApiKey(ApiKeyId),
    Pending(String),
    /// A remembered outcome of a recent write (exactly-once retries).
    Recent(RequestId),
    /// An audit log entry, by sequence number.
    Audit(u64),
    /// A member's DERP public key, by member id.
    MemberDerpKey(u64),
    /// A kept policy version.
    PolicyVersion(u64),
}

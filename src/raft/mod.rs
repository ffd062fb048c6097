//! openraft glue: the rocksdb log store and state machine, the gRPC network between
//! members, and `Cluster`, the handle the rest of the server writes and reads through.
//!
//! Every registry write is a `Command` proposed through `Cluster::propose`; a follower
//! forwards it to the leader. Reads come from the applied `Registry` view of this member.

mod batcher;
mod cluster;
mod fault;
mod forward;
mod forwarder;
mod membership;
mod network;
mod presence_sync;
mod service;
mod status;
mod store;
pub mod tls;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::registry::{Change, ClusterSettings, Outcome, Proposal, Registry, Request};

pub use cluster::{Cluster, StartError};
pub use service::check_member_message;
pub use store::{MEMTABLE_BLOCK_BYTES, QuietCheck, StorageError, check_snapshot};

openraft::declare_raft_types!(
    /// The Raft types of the registry: a `Request` per log entry, an `Outcome` per reply.
    pub TypeConfig:
        D = Request,
        R = Vec<Outcome>,
        NodeId = u64,
        Node = MemberInfo,
);

pub type RaftMetrics = openraft::RaftMetrics<u64, MemberInfo>;
type Raft = openraft::Raft<TypeConfig>;

/// What the cluster knows about a member; stored in the Raft membership config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    /// Member-to-member gRPC address (`host:port`).
    pub raft_addr: String,
    /// The URL Tailscale clients use for this member.
    pub control_url: String,
    /// The member's DERP region; `None` = the observing member's own region.
    #[serde(default)]
    pub region_id: Option<i32>,
}

impl std::fmt::Display for MemberInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.raft_addr)
    }
}

/// Everything `Cluster::start` needs, fixed at start.
pub struct ClusterOptions {
    pub member_id: u64,
    pub member: MemberInfo,
    pub data_dir: PathBuf,
    /// The settings this member's config gives; recorded on the cluster's first start and
    /// compared with the recorded ones on every start.
    pub settings: ClusterSettings,
    /// The members of a new cluster. The lowest id initialises it on first start; the
    /// others wait to be contacted. Ignored once the data dir holds a cluster.
    pub initial_members: BTreeMap<u64, MemberInfo>,
    pub election_timeout_min_ms: u64,
    pub heartbeat_ms: u64,
    /// Build a snapshot (and purge older log) after this many applied entries.
    pub snapshot_every_logs: u64,
    /// This member's live sessions, reported to other members for `nodes list`.
    pub presence: crate::presence::Presence,
    pub version: &'static str,
    /// Mutual TLS for member-to-member gRPC (always on).
    pub tls: tls::MemberTls,
    /// Cancelled to drain this member (`hsctl cluster drain`): the server ends client
    /// sessions and refuses new ones while it stays in the cluster.
    pub drain: tokio_util::sync::CancellationToken,
}

/// A member's applied registry as consumers follow it: the latest view, and every applied
/// batch with what it changed (the map hub subscribes to both).
#[derive(Clone)]
pub struct RegistryFeed {
    pub view: tokio::sync::watch::Receiver<Arc<Registry>>,
    pub batches: tokio::sync::broadcast::Sender<Arc<AppliedBatch>>,
}

impl RegistryFeed {
    pub fn view(&self) -> Arc<Registry> {
        self.view.borrow().clone()
    }
}

/// What one apply call changed, published to map sessions after it is durable.
#[derive(Debug)]
pub struct AppliedBatch {
    pub last_applied: u64,
    pub changes: Vec<Change>,
    /// The state was replaced by a snapshot: everything must be rebuilt from the view.
    pub full_resync: bool,
}

/// A write could not be committed. Nothing was changed (or, for `Unavailable` after a
/// leader loss, the caller cannot know and should re-read).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader is known; the cluster may have lost quorum")]
    NoLeader,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
    /// Committed by the leader, but this member has not applied it within the deadline:
    /// it is cut off or far behind. Re-read through another member.
    #[error(
        "committed at log index {index}, but this member has not applied it yet; re-read through another member"
    )]
    NotAppliedHere { index: u64 },
}

/// The role of a member as seen by the answering member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Leader,
    Follower,
    Learner,
    Unreachable,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Leader => "leader",
            MemberRole::Follower => "follower",
            MemberRole::Learner => "learner",
            MemberRole::Unreachable => "unreachable",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MemberStatus {
    pub id: u64,
    pub name: String,
    pub address: String,
    pub control_url: String,
    pub role: MemberRole,
    pub voter: bool,
    pub healthy: bool,
    pub last_applied: Option<u64>,
    /// The leader's replication progress for this member (known on the leader only).
    pub match_index: Option<u64>,
    pub version: Option<String>,
    pub clients: Option<u64>,
    pub draining: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub leader: Option<u64>,
    pub term: u64,
    /// The member that answered.
    pub member_id: u64,
    pub members: Vec<MemberStatus>,
}

/// A request a follower sends to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum LeaderOp {
    /// A write; retrying it with the same id is always safe (exactly once).
    Propose(Proposal),
    /// Writes a member forwards together (see `forwarder.rs`).
    ProposeMany(Vec<Proposal>),
    AddLearner {
        id: u64,
        info: MemberInfo,
    },
    Promote {
        id: u64,
    },
    Remove {
        id: u64,
    },
    TransferLeader {
        to: Option<u64>,
    },
    /// Confirm leadership and return the index a linearizable read must wait for.
    ReadIndex,
}

/// The leader's answer to a `LeaderOp`.
#[derive(Debug, Serialize, Deserialize)]
enum LeaderReply {
    Done(Outcome),
    /// A proposal's outcome and the index of the entry that applied it.
    Applied {
        outcome: Outcome,
        index: u64,
    },
    /// For `ProposeMany`, in order: each write's outcome and index, or `None` where it
    /// was not applied (the sender retries those on their own).
    AppliedMany(Vec<Option<(Outcome, u64)>>),
    /// The receiver is not the leader; try this one.
    NotLeader(Option<u64>),
    /// The leader's read index (for `ReadIndex`).
    ReadIndex(u64),
    Failed(String),
    Invalid(String),
}

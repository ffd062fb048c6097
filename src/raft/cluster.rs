//! `Cluster`: the handle through which the server writes (`propose`, forwarded to the
//! leader) and reads (`view`, this member's applied registry), and admins manage members.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, SnapshotPolicy};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::network::{Peers, decode, encode};
use super::service::RaftRpc;
use super::store::{self, OpenError};
use super::{
    AppliedBatch, ClusterOptions, ClusterStatus, LeaderOp, LeaderReply, MemberInfo, MemberRole,
    MemberStatus, ProposeError, Raft, RaftMetrics,
};
use crate::presence::Presence;
use crate::proto::raft::raft_service_server::RaftServiceServer;
use crate::proto::raft::{CampaignRequest, DrainRequest, MemberStatusReply, MemberStatusRequest};
use crate::registry::{Command, Outcome, Registry, Request, Timestamp};

/// How long a write keeps looking for a leader before giving up.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(5);
/// How long one forwarded write may take on the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(4);
/// How long `status` waits for each other member.
const STATUS_TIMEOUT: Duration = Duration::from_millis(800);
/// Snapshots and catch-up of large registries need more than a heartbeat's time.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 20_000;
/// Applied batches buffered per map session before it must resync.
const BATCH_CHANNEL_CAPACITY: usize = 1024;
/// Largest member-to-member message (snapshots of big registries).
const MAX_RPC_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("invalid Raft settings: {0}")]
    Config(String),
    #[error("starting Raft: {0}")]
    Raft(String),
}

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    raft: Raft,
    peers: Peers,
    view: watch::Receiver<Arc<Registry>>,
    batches: broadcast::Sender<Arc<AppliedBatch>>,
    presence: Presence,
    version: &'static str,
    election_timeout_max: Duration,
    /// Cancelled when Raft stops; ends long polls other members hold open on this one.
    stop: CancellationToken,
    drain: CancellationToken,
}

impl Cluster {
    /// Opens storage, starts the Raft member and, on the first start of a new cluster,
    /// initialises it (the lowest member id does this; the others join when contacted).
    pub async fn start(
        opts: ClusterOptions,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Cluster, StartError> {
        let (view_tx, view_rx) = watch::channel(Arc::new(Registry::new(opts.settings.clone())));
        let (batches, _) = broadcast::channel(BATCH_CHANNEL_CAPACITY);
        let data_dir = opts.data_dir.clone();
        let settings = opts.settings.clone();
        let batches_for_store = batches.clone();
        let (log_store, state_machine) = tokio::task::spawn_blocking(move || {
            store::open(&data_dir, settings, view_tx, batches_for_store)
        })
        .await
        .map_err(|e| StartError::Raft(e.to_string()))??;

        let election_min = opts.election_timeout_min_ms.max(50);
        let config = Config {
            cluster_name: "hsd".into(),
            election_timeout_min: election_min,
            election_timeout_max: election_min * 2,
            heartbeat_interval: opts.heartbeat_ms.clamp(10, election_min / 2),
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every_logs.max(100)),
            // Entries kept behind a snapshot, so a briefly lagging follower catches up from
            // the log instead of a full snapshot.
            max_in_snapshot_log_to_keep: 50,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;

        let peers = Peers::new(opts.tls.as_ref().map(|t| t.client.clone()));
        let raft = Raft::new(
            opts.member_id,
            Arc::new(config),
            peers.clone(),
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let first = opts.initial_members.keys().next().copied();
        // A wiped first member must not found a second cluster beside the running one: if
        // any other member already has a term or a leader, wait to be contacted instead.
        let existing =
            if !initialized && first == Some(opts.member_id) && opts.initial_members.len() > 1 {
                cluster_already_running(&peers, opts.member_id, &opts.initial_members).await
            } else {
                false
            };
        if existing {
            tracing::info!(
                "the cluster already runs without this member's data; waiting for the leader to catch it up"
            );
        } else if !initialized && first == Some(opts.member_id) {
            tracing::info!(
                members = opts.initial_members.len(),
                "initialising a new cluster"
            );
            if let Err(error) = raft.initialize(opts.initial_members.clone()).await {
                // Another start already initialised it: harmless.
                tracing::warn!(%error, "cluster initialisation skipped");
            }
        } else if !initialized {
            tracing::info!("waiting to be contacted by the cluster leader");
        }

        let cluster = Cluster {
            inner: Arc::new(Inner {
                id: opts.member_id,
                raft,
                peers,
                view: view_rx,
                batches,
                presence: opts.presence,
                version: opts.version,
                election_timeout_max: Duration::from_millis(election_min * 2),
                stop: stop.clone(),
                drain: opts.drain.clone(),
            }),
        };
        tasks.spawn(log_leadership(
            cluster.metrics(),
            opts.member_id,
            stop.clone(),
        ));
        tasks.spawn(super::presence_sync::run(
            cluster.clone(),
            stop,
            tasks.clone(),
        ));
        Ok(cluster)
    }

    pub fn member_id(&self) -> u64 {
        self.inner.id
    }

    pub(super) fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub(super) fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    pub(super) fn stopping(&self) -> &CancellationToken {
        &self.inner.stop
    }

    pub(super) fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// The registry as applied on this member.
    pub fn view(&self) -> Arc<Registry> {
        self.inner.view.borrow().clone()
    }

    /// Notified each time the applied registry changes.
    pub fn watch_view(&self) -> watch::Receiver<Arc<Registry>> {
        self.inner.view.clone()
    }

    /// Every applied batch, in order, with what it changed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedBatch>> {
        self.inner.batches.subscribe()
    }

    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// The gRPC service other members call.
    pub fn grpc_service(&self) -> RaftServiceServer<RaftRpc> {
        RaftServiceServer::new(RaftRpc {
            cluster: self.clone(),
        })
        .max_decoding_message_size(MAX_RPC_BYTES)
        .max_encoding_message_size(MAX_RPC_BYTES)
    }

    /// Commits a command through Raft (on the leader, forwarded if needed) and returns its
    /// outcome once applied. `Outcome::Rejected` means the command was refused and nothing
    /// changed.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let request = Request {
            at: Timestamp::now(),
            command,
        };
        self.leader_op(LeaderOp::Propose(request)).await
    }

    pub async fn add_member(
        &self,
        id: u64,
        address: String,
        control_url: String,
    ) -> Result<(), ProposeError> {
        if id == 0 || address.is_empty() {
            return Err(ProposeError::Invalid(
                "a member needs an id above 0 and an address".into(),
            ));
        }
        let info = MemberInfo {
            name: format!("m{id}"),
            raft_addr: address,
            control_url,
            region_id: None,
        };
        self.leader_op(LeaderOp::AddLearner { id, info })
            .await
            .map(drop)
    }

    pub async fn promote_member(&self, id: u64) -> Result<(), ProposeError> {
        self.leader_op(LeaderOp::Promote { id }).await.map(drop)
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), ProposeError> {
        self.leader_op(LeaderOp::Remove { id }).await.map(drop)
    }

    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<(), ProposeError> {
        self.leader_op(LeaderOp::TransferLeader { to })
            .await
            .map(drop)
    }

    /// Prepares a member for maintenance: if it leads, leadership moves elsewhere; then
    /// the member drops its clients (they follow the dial plan and the DERP region to the
    /// others) and refuses new ones until it restarts. It stays a voting member.
    pub async fn drain_member(&self, id: u64) -> Result<(), ProposeError> {
        let m = self.metrics().borrow().clone();
        let Some(addr) = member_addr(&m, id) else {
            return Err(ProposeError::Invalid(format!(
                "member {id} is not in the cluster"
            )));
        };
        if m.current_leader == Some(id) {
            let to = m.membership_config.voter_ids().find(|v| *v != id);
            self.transfer_leader(to).await?;
        }
        if id == self.inner.id {
            self.drain_here();
            return Ok(());
        }
        let mut client = self
            .inner
            .peers
            .client(&addr)
            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(DrainRequest {});
        req.set_timeout(FORWARD_TIMEOUT);
        client
            .drain(req)
            .await
            .map(drop)
            .map_err(|s| ProposeError::Unavailable(format!("member {id}: {}", s.message())))
    }

    /// Drains this member (see `drain_member`).
    pub(super) fn drain_here(&self) {
        if !self.inner.drain.is_cancelled() {
            tracing::warn!("draining: ending client sessions and refusing new ones until restart");
            self.inner.drain.cancel();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_cancelled()
    }

    /// The registry for a read: with `local`, this member's applied state as is; without,
    /// a linearizable read — the leader confirms it still leads and names its commit
    /// index, and this member waits until it has applied that far.
    pub async fn read_view(&self, local: bool) -> Result<Arc<Registry>, ProposeError> {
        if local {
            return Ok(self.view());
        }
        let index = match self.leader_call(LeaderOp::ReadIndex).await? {
            LeaderReply::ReadIndex(index) => index,
            other => {
                return Err(ProposeError::Unavailable(format!(
                    "unexpected leader reply {other:?}"
                )));
            }
        };
        let waited = self
            .inner
            .raft
            .wait(Some(PROPOSE_DEADLINE))
            .applied_index_at_least(Some(index), "linearizable read")
            .await;
        match waited {
            Ok(_) => Ok(self.view()),
            Err(e) => Err(ProposeError::Unavailable(format!(
                "catching up to the leader for a read: {e}"
            ))),
        }
    }

    /// Sends `op` to the leader, retrying while leadership settles.
    async fn leader_op(&self, op: LeaderOp) -> Result<Outcome, ProposeError> {
        match self.leader_call(op).await? {
            LeaderReply::Done(outcome) => Ok(outcome),
            other => Err(ProposeError::Unavailable(format!(
                "unexpected leader reply {other:?}"
            ))),
        }
    }

    /// Sends `op` to the leader until it answers with a final reply.
    async fn leader_call(&self, op: LeaderOp) -> Result<LeaderReply, ProposeError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_DEADLINE;
        let mut metrics = self.metrics();
        let mut last_error = ProposeError::NoLeader;
        loop {
            let (leader, addr) = {
                let m = metrics.borrow_and_update();
                let leader = m.current_leader;
                (leader, leader.and_then(|l| member_addr(&m, l)))
            };
            let reply = match (leader, addr) {
                (Some(l), _) if l == self.inner.id => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(
                        left.max(Duration::from_millis(100)),
                        self.run_as_leader(op.clone()),
                    )
                    .await
                    {
                        Ok(reply) => Some(reply),
                        // Appended but not committed: a majority is unreachable. If it
                        // returns, the entry may still commit, so say so.
                        Err(_) => {
                            return Err(ProposeError::Unavailable(
                                "not committed in time: a majority of members is unreachable; \
                                 the change may still apply once they return, so re-read before retrying"
                                    .into(),
                            ));
                        }
                    }
                }
                (Some(_), Some(addr)) => match self.forward(&addr, &op).await {
                    Ok(reply) => Some(reply),
                    Err(e) => {
                        last_error = e;
                        None
                    }
                },
                _ => None,
            };
            match reply {
                Some(LeaderReply::Invalid(msg)) => return Err(ProposeError::Invalid(msg)),
                Some(LeaderReply::Failed(msg)) => return Err(ProposeError::Unavailable(msg)),
                Some(LeaderReply::NotLeader(_)) | None => {}
                Some(done) => return Ok(done),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(last_error);
            }
            // Wait for a leadership change, or retry shortly.
            let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
        }
    }

    async fn forward(&self, addr: &str, op: &LeaderOp) -> Result<LeaderReply, ProposeError> {
        let unavailable =
            |e: &dyn std::fmt::Display| ProposeError::Unavailable(format!("leader at {addr}: {e}"));
        let mut client = self.inner.peers.client(addr).map_err(|e| unavailable(&e))?;
        let mut req = tonic::Request::new(encode(op));
        req.set_timeout(FORWARD_TIMEOUT);
        let reply = client
            .forward(req)
            .await
            .map_err(|s| unavailable(&s.message().to_string()))?;
        decode(addr, reply.get_ref()).map_err(|e| unavailable(&e))
    }

    /// Executes a leader operation on this member; `NotLeader` if it is not the leader.
    pub(super) async fn run_as_leader(&self, op: LeaderOp) -> LeaderReply {
        let raft = &self.inner.raft;
        let result = match op {
            LeaderOp::Propose(request) => match raft.client_write(request).await {
                Ok(resp) => return LeaderReply::Done(resp.data),
                Err(e) => e,
            },
            LeaderOp::AddLearner { id, info } => {
                let known = self
                    .metrics()
                    .borrow()
                    .membership_config
                    .nodes()
                    .any(|(nid, _)| *nid == id);
                if known {
                    return LeaderReply::Invalid(format!("member {id} is already in the cluster"));
                }
                match raft.add_learner(id, info, true).await {
                    Ok(_) => return LeaderReply::Done(Outcome::Done),
                    Err(e) => e,
                }
            }
            LeaderOp::Promote { id } => {
                let known = self
                    .metrics()
                    .borrow()
                    .membership_config
                    .nodes()
                    .any(|(nid, _)| *nid == id);
                if !known {
                    return LeaderReply::Invalid(format!(
                        "member {id} is not in the cluster; add it first"
                    ));
                }
                match raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                {
                    Ok(_) => return LeaderReply::Done(Outcome::Done),
                    Err(e) => e,
                }
            }
            LeaderOp::Remove { id } => {
                let m = self.metrics().borrow().clone();
                if !m.membership_config.nodes().any(|(nid, _)| *nid == id) {
                    return LeaderReply::Invalid(format!("member {id} is not in the cluster"));
                }
                let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return LeaderReply::Invalid("cannot remove the last voting member".into());
                    }
                    if let Err(e) = raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                    {
                        return write_error(e);
                    }
                }
                match raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await
                {
                    Ok(_) => return LeaderReply::Done(Outcome::Done),
                    Err(e) => e,
                }
            }
            LeaderOp::TransferLeader { to } => return self.hand_over(to).await,
            LeaderOp::ReadIndex => {
                return match raft.ensure_linearizable().await {
                    Ok(read_log_id) => {
                        LeaderReply::ReadIndex(read_log_id.map(|l| l.index).unwrap_or(0))
                    }
                    Err(RaftError::APIError(
                        openraft::error::CheckIsLeaderError::ForwardToLeader(f),
                    )) => LeaderReply::NotLeader(f.leader_id),
                    Err(RaftError::APIError(e)) => LeaderReply::Failed(e.to_string()),
                    Err(RaftError::Fatal(e)) => LeaderReply::Failed(format!("raft stopped: {e}")),
                };
            }
        };
        write_error(result)
    }

    /// Moves leadership from this member (the leader) to `to`, or to the most caught-up
    /// voter. openraft 0.9 has no transfer call: the leader pauses heartbeats so followers'
    /// leases lapse, and asks the target to campaign at once.
    async fn hand_over(&self, to: Option<u64>) -> LeaderReply {
        let m = self.metrics().borrow().clone();
        if m.current_leader != Some(self.inner.id) {
            return LeaderReply::NotLeader(m.current_leader);
        }
        let voters: Vec<u64> = m
            .membership_config
            .voter_ids()
            .filter(|v| *v != self.inner.id)
            .collect();
        let target = match to {
            Some(t) if t == self.inner.id => return LeaderReply::Done(Outcome::Done),
            Some(t) if !voters.contains(&t) => {
                return LeaderReply::Invalid(format!("member {t} is not a voter"));
            }
            Some(t) => t,
            None => {
                let progress = m.replication.clone().unwrap_or_default();
                match voters
                    .iter()
                    .max_by_key(|v| progress.get(v).copied().flatten().map(|l| l.index))
                {
                    Some(t) => *t,
                    None => {
                        return LeaderReply::Invalid(
                            "no other voting member to hand leadership to".into(),
                        );
                    }
                }
            }
        };
        let Some(addr) = member_addr(&m, target) else {
            return LeaderReply::Invalid(format!("member {target} has no address"));
        };
        tracing::info!(to = target, "handing leadership over");
        let window = self.inner.election_timeout_max * 2;
        self.inner.raft.runtime_config().heartbeat(false);
        let result = match self.inner.peers.client(&addr) {
            Ok(mut client) => {
                let mut req = tonic::Request::new(CampaignRequest {
                    within_ms: window.as_millis() as u64,
                });
                req.set_timeout(window + Duration::from_secs(1));
                client
                    .campaign(req)
                    .await
                    .map(|r| r.into_inner().became_leader)
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        self.inner.raft.runtime_config().heartbeat(true);
        match result {
            Ok(true) => LeaderReply::Done(Outcome::Done),
            Ok(false) => LeaderReply::Failed(format!("member {target} did not win the election")),
            Err(status) => LeaderReply::Failed(format!("member {target}: {}", status.message())),
        }
    }

    /// Tries to become leader within `within` (the current leader paused its heartbeats).
    pub(super) async fn campaign(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.metrics().borrow().current_leader == Some(self.inner.id) {
                return true;
            }
            let _ = self.inner.raft.trigger().elect().await;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        self.metrics().borrow().current_leader == Some(self.inner.id)
    }

    /// This member's own status, as other members ask for it.
    pub(super) fn local_status(&self) -> MemberStatusReply {
        let m = self.metrics().borrow().clone();
        let name = m
            .membership_config
            .nodes()
            .find(|(id, _)| **id == self.inner.id)
            .map(|(_, n)| n.name.clone())
            .unwrap_or_default();
        let clients = self.inner.presence.online_count() as u64;
        MemberStatusReply {
            id: self.inner.id,
            name,
            version: self.inner.version.to_string(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            leader: m.current_leader,
            term: m.current_term,
            clients,
            draining: self.is_draining(),
        }
    }

    /// Asks every other member for its status, concurrently and with a short timeout.
    async fn peer_reports(&self) -> BTreeMap<u64, Option<MemberStatusReply>> {
        let m = self.metrics().borrow().clone();
        let members: BTreeMap<u64, MemberInfo> = m
            .membership_config
            .nodes()
            .filter(|(id, _)| **id != self.inner.id)
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        ask_members(&self.inner.peers, &members).await
    }

    /// The cluster as this member sees it; works without a leader.
    pub async fn status(&self) -> ClusterStatus {
        let m = self.metrics().borrow().clone();
        let reports = self.peer_reports().await;
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let progress = m.replication.clone();
        let local = self.local_status();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, node)| {
                let report = if *id == self.inner.id {
                    Some(local.clone())
                } else {
                    reports.get(id).cloned().flatten()
                };
                let voter = voters.contains(id);
                let role = match &report {
                    None => MemberRole::Unreachable,
                    Some(_) if m.current_leader == Some(*id) => MemberRole::Leader,
                    Some(_) if !voter => MemberRole::Learner,
                    Some(_) => MemberRole::Follower,
                };
                MemberStatus {
                    id: *id,
                    name: report
                        .as_ref()
                        .map(|r| r.name.clone())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| node.name.clone()),
                    address: node.raft_addr.clone(),
                    control_url: node.control_url.clone(),
                    role,
                    voter,
                    healthy: report
                        .as_ref()
                        .is_some_and(|r| r.leader.is_some() && !r.draining),
                    last_applied: report.as_ref().map(|r| r.last_applied),
                    match_index: progress
                        .as_ref()
                        .and_then(|p| p.get(id).copied().flatten())
                        .map(|l| l.index),
                    version: report.as_ref().map(|r| r.version.clone()),
                    clients: report.as_ref().map(|r| r.clients),
                    draining: report.as_ref().is_some_and(|r| r.draining),
                }
            })
            .collect();
        ClusterStatus {
            leader: m.current_leader,
            term: m.current_term,
            member_id: self.inner.id,
            members,
        }
    }

    /// Hands leadership away if this member leads (bounded), then stops Raft.
    pub async fn shutdown(&self) {
        let m = self.metrics().borrow().clone();
        let others = m.membership_config.voter_ids().any(|v| v != self.inner.id);
        if m.current_leader == Some(self.inner.id) && others {
            let handover = self.hand_over(None);
            match tokio::time::timeout(self.inner.election_timeout_max * 3, handover).await {
                Ok(LeaderReply::Done(_)) => tracing::info!("leadership handed over"),
                Ok(other) => tracing::warn!(?other, "leadership hand-over failed"),
                Err(_) => tracing::warn!("leadership hand-over timed out"),
            }
        }
        if let Err(error) = self.inner.raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
    }
}

/// Whether any other initial member reports a term or a leader (the cluster exists).
async fn cluster_already_running(
    peers: &Peers,
    me: u64,
    members: &BTreeMap<u64, MemberInfo>,
) -> bool {
    let others: BTreeMap<u64, MemberInfo> = members
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(id, m)| (*id, m.clone()))
        .collect();
    ask_members(peers, &others)
        .await
        .values()
        .flatten()
        .any(|r| r.term > 0 || r.leader.is_some())
}

/// Every given member's own status, asked concurrently; `None` where it did not answer
/// within `STATUS_TIMEOUT`.
async fn ask_members(
    peers: &Peers,
    members: &BTreeMap<u64, MemberInfo>,
) -> BTreeMap<u64, Option<MemberStatusReply>> {
    let calls = members.iter().map(|(id, m)| {
        let (id, addr, peers) = (*id, m.raft_addr.clone(), peers.clone());
        async move {
            let reply = async {
                let mut client = peers.client(&addr).ok()?;
                let mut req = tonic::Request::new(MemberStatusRequest {});
                req.set_timeout(STATUS_TIMEOUT);
                tokio::time::timeout(STATUS_TIMEOUT, client.member_status(req))
                    .await
                    .ok()?
                    .ok()
            }
            .await;
            (id, reply.map(|r| r.into_inner()))
        }
    });
    futures::future::join_all(calls).await.into_iter().collect()
}

/// A member's Raft address from the membership config.
fn member_addr(m: &RaftMetrics, id: u64) -> Option<String> {
    m.membership_config
        .nodes()
        .find(|(nid, _)| **nid == id)
        .map(|(_, n)| n.raft_addr.clone())
}

fn write_error(e: RaftError<u64, ClientWriteError<u64, MemberInfo>>) -> LeaderReply {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            LeaderReply::NotLeader(f.leader_id)
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            LeaderReply::Invalid(e.to_string())
        }
        RaftError::Fatal(e) => LeaderReply::Failed(format!("raft stopped: {e}")),
    }
}

async fn log_leadership(
    mut metrics: watch::Receiver<RaftMetrics>,
    me: u64,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if leader != last {
            match leader {
                Some(l) if l == me => {
                    tracing::info!(member.id = me, "this member is now the leader")
                }
                Some(l) => tracing::info!(leader = l, "following leader"),
                None => tracing::warn!("no leader known"),
            }
            last = leader;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

//! Writes and linearizable reads: any member takes them and sends them to the leader
//! (itself, or over member-to-member gRPC), retrying while leadership settles.
//!
//! Every write carries a request id, so a retry after a timeout or a lost reply is applied
//! once (the state machine answers a repeated id with the first outcome). A write returns
//! only once *this* member has applied it, so whoever made it can read it here next.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::RaftError;

use super::batcher::WriteFailure;
use super::cluster::Cluster;
use super::network::{decode, encode};
use super::status::member_addr;
use super::{LeaderOp, LeaderReply, ProposeError};
use crate::registry::{Command, Outcome, Proposal, Registry};

/// How long a write keeps looking for a leader before giving up.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(5);
/// How long one forwarded call may take on the leader.
pub(super) const FORWARD_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a member waits to apply a write the leader committed.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Pause between attempts when no leader answered.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl Cluster {
    /// Commits a command through Raft (on the leader, forwarded if needed) and returns its
    /// outcome once this member has applied it. `Outcome::Rejected` means the command was
    /// refused and nothing changed.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        self.propose_once(Proposal::new(command)).await
    }

    /// Commits `proposal` exactly once: batched with concurrent writes (on the leader, or
    /// forwarded to it together), and if that batch fails, retried on its own (same id)
    /// until the leader answers.
    pub async fn propose_once(&self, proposal: Proposal) -> Result<Outcome, ProposeError> {
        let is_leader = self.metrics().borrow().current_leader == Some(self.inner.id);
        let batched = if is_leader {
            let submit = self.inner.batcher.submit(proposal.clone());
            match tokio::time::timeout(PROPOSE_DEADLINE, submit).await {
                Ok(done) => done.ok(),
                // Appended but not committed: a majority is unreachable.
                Err(_) => return Err(not_committed()),
            }
        } else {
            self.inner.forwarder.submit(proposal.clone()).await
        };
        let (outcome, index) = match batched {
            Some(done) => done,
            None => match self.leader_call(LeaderOp::Propose(proposal)).await? {
                LeaderReply::Applied { outcome, index } => (outcome, index),
                other => return Err(unexpected(&other)),
            },
        };
        self.wait_applied(index).await?;
        Ok(outcome)
    }

    /// Waits until this member has applied the entry at `index`.
    pub(super) async fn wait_applied(&self, index: u64) -> Result<(), ProposeError> {
        let mut applied = self.inner.applied.clone();
        match tokio::time::timeout(APPLY_WAIT, applied.wait_for(|i| *i >= index)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ProposeError::NotAppliedHere { index }),
        }
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
            other => return Err(unexpected(&other)),
        };
        self.wait_applied(index).await?;
        Ok(self.view())
    }

    /// Whether this member has applied everything the leader has committed (a member that
    /// serves clients with an old view is not ready).
    pub async fn caught_up(&self) -> bool {
        let read = tokio::time::timeout(Duration::from_secs(1), self.read_view(false)).await;
        matches!(read, Ok(Ok(_)))
    }

    /// Sends `op` to the leader; when it wrote an entry, returns once this member has
    /// applied it too (so a membership change is visible in this member's status).
    pub(super) async fn leader_op(&self, op: LeaderOp) -> Result<Outcome, ProposeError> {
        match self.leader_call(op).await? {
            LeaderReply::Done(outcome) => Ok(outcome),
            LeaderReply::Applied { outcome, index } => {
                self.wait_applied(index).await?;
                Ok(outcome)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `op` to the leader until it answers with a final reply.
    pub(super) async fn leader_call(&self, op: LeaderOp) -> Result<LeaderReply, ProposeError> {
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
                        left.max(RETRY_PAUSE),
                        self.run_as_leader(op.clone()),
                    )
                    .await
                    {
                        Ok(reply) => Some(reply),
                        // Appended but not committed: a majority is unreachable. If it
                        // returns, the entry may still commit, so say so.
                        Err(_) => return Err(not_committed()),
                    }
                }
                (Some(_), Some(addr)) => match self.forward(&addr, &op).await {
                    Ok(reply) => Some(reply),
                    // Lost on the way or timed out: safe to retry, the id makes it once.
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
            let _ = tokio::time::timeout(RETRY_PAUSE * 2, metrics.changed()).await;
        }
    }

    async fn forward(&self, addr: &str, op: &LeaderOp) -> Result<LeaderReply, ProposeError> {
        let unavailable =
            |e: &dyn std::fmt::Display| ProposeError::Unavailable(format!("leader at {addr}: {e}"));
        let mut client = self.inner.peers.client(addr).map_err(|e| unavailable(&e))?;
        let mut req = tonic::Request::new(encode(op));
        req.set_timeout(match op {
            LeaderOp::TransferLeader { .. } => self.hand_over_bound(),
            _ => FORWARD_TIMEOUT,
        });
        let reply = client
            .forward(req)
            .await
            .map_err(|s| unavailable(&s.message().to_string()))?;
        decode(addr, reply.get_ref()).map_err(|e| unavailable(&e))
    }

    /// Executes a leader operation on this member; `NotLeader` if it is not the leader.
    pub(super) async fn run_as_leader(&self, op: LeaderOp) -> LeaderReply {
        match op {
            LeaderOp::Propose(proposal) => match self.inner.batcher.submit(proposal).await {
                Ok((outcome, index)) => LeaderReply::Applied { outcome, index },
                Err(WriteFailure::NotLeader(leader)) => LeaderReply::NotLeader(leader),
                Err(WriteFailure::Failed(msg)) => LeaderReply::Failed(msg),
            },
            LeaderOp::ProposeMany(proposals) => {
                let submits = proposals.into_iter().map(|p| self.inner.batcher.submit(p));
                let results = futures::future::join_all(submits).await;
                LeaderReply::AppliedMany(results.into_iter().map(Result::ok).collect())
            }
            LeaderOp::ReadIndex => self.read_index().await,
            op => self.change_membership(op).await,
        }
    }

    async fn read_index(&self) -> LeaderReply {
        match self.inner.raft.ensure_linearizable().await {
            Ok(read_log_id) => LeaderReply::ReadIndex(read_log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                LeaderReply::NotLeader(f.leader_id)
            }
            Err(RaftError::APIError(e)) => LeaderReply::Failed(e.to_string()),
            Err(RaftError::Fatal(e)) => LeaderReply::Failed(format!("raft stopped: {e}")),
        }
    }
}

fn unexpected(reply: &LeaderReply) -> ProposeError {
    ProposeError::Unavailable(format!("unexpected leader reply {reply:?}"))
}

fn not_committed() -> ProposeError {
    ProposeError::Unavailable(
        "not committed in time: a majority of members is unreachable; the change may still \
         apply once they return, so re-read before retrying"
            .into(),
    )
}

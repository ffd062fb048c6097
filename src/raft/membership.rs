//! Membership: adding a learner, promoting it, removing a member, handing leadership over
//! and draining a member for maintenance.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};

use super::cluster::Cluster;
use super::forward::FORWARD_TIMEOUT;
use super::status::member_addr;
use super::{LeaderOp, LeaderReply, MemberInfo, ProposeError};
use crate::proto::raft::{CampaignRequest, DrainRequest};
use crate::registry::Outcome;

/// Pause between a campaigning member's election attempts.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(60);
/// Slack after a dead leader's lease before a follower campaigns; also the step between
/// followers and the bound of the "is it really gone" check.
const LEASE_MARGIN: Duration = Duration::from_millis(30);
/// How long `cluster add` waits for the new learner to apply what it was sent.
const LEARNER_APPLY_WAIT: Duration = Duration::from_secs(30);

/// When the leader last reached this member through Raft itself. A follower that hears
/// the leader's AppendEntries does not call it gone because another call to it failed (a
/// loaded leader can be slow to answer a status or presence call and still lead).
#[derive(Default)]
pub(super) struct LastContact(std::sync::Mutex<Option<tokio::time::Instant>>);

impl LastContact {
    pub(super) fn note(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    fn within(&self, window: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < window)
    }
}

/// Turns the leader's heartbeats back on when dropped, whatever path a hand-over takes
/// (success, error, timeout or cancellation): a leader left silent would let its followers
/// elect someone else at random.
struct HeartbeatPause<'a> {
    raft: &'a super::Raft,
}

impl<'a> HeartbeatPause<'a> {
    fn start(raft: &'a super::Raft) -> Self {
        raft.runtime_config().heartbeat(false);
        HeartbeatPause { raft }
    }
}

impl Drop for HeartbeatPause<'_> {
    fn drop(&mut self) {
        self.raft.runtime_config().heartbeat(true);
    }
}

impl Cluster {
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
        let addr = info.raft_addr.clone();
        let index = match self.leader_call(LeaderOp::AddLearner { id, info }).await? {
            LeaderReply::Applied { index, .. } => {
                self.wait_applied(index).await?;
                index
            }
            LeaderReply::Done(_) => return Ok(()),
            other => {
                return Err(ProposeError::Unavailable(format!(
                    "unexpected leader reply {other:?}"
                )));
            }
        };
        // openraft returns once the learner's log has caught up; wait until it has also
        // applied that far, so it can serve reads the moment `cluster add` returns.
        let deadline = tokio::time::Instant::now() + LEARNER_APPLY_WAIT;
        loop {
            let applied = self.member_applied(&addr).await;
            if applied.is_some_and(|a| a >= index) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProposeError::Unavailable(format!(
                    "member {id} was added but has not applied the log within {}s",
                    LEARNER_APPLY_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last index the member at `addr` has applied, if it answers.
    async fn member_applied(&self, addr: &str) -> Option<u64> {
        let mut client = self.inner.peers.client(addr).ok()?;
        let mut req = tonic::Request::new(crate::proto::raft::MemberStatusRequest {});
        req.set_timeout(Duration::from_secs(1));
        let reply = client.member_status(req).await.ok()?;
        Some(reply.into_inner().last_applied)
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

    fn is_member(&self, id: u64) -> bool {
        self.metrics()
            .borrow()
            .membership_config
            .nodes()
            .any(|(nid, _)| *nid == id)
    }

    /// Runs a membership operation on this member, the leader.
    pub(super) async fn change_membership(&self, op: LeaderOp) -> LeaderReply {
        let raft = &self.inner.raft;
        let result = match op {
            LeaderOp::AddLearner { id, info } => {
                if self.is_member(id) {
                    return LeaderReply::Invalid(format!("member {id} is already in the cluster"));
                }
                raft.add_learner(id, info, true)
                    .await
                    .map(|r| r.log_id.index)
            }
            LeaderOp::Promote { id } => {
                if !self.is_member(id) {
                    return LeaderReply::Invalid(format!(
                        "member {id} is not in the cluster; add it first"
                    ));
                }
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map(|r| r.log_id.index)
            }
            LeaderOp::Remove { id } => return self.remove(id).await,
            LeaderOp::TransferLeader { to } => return self.hand_over(to).await,
            LeaderOp::Propose(_) | LeaderOp::ProposeMany(_) | LeaderOp::ReadIndex => {
                return LeaderReply::Invalid("not a membership operation".into());
            }
        };
        match result {
            Ok(index) => LeaderReply::Applied {
                outcome: Outcome::Done,
                index,
            },
            Err(e) => write_error(e),
        }
    }

    async fn remove(&self, id: u64) -> LeaderReply {
        let raft = &self.inner.raft;
        if !self.is_member(id) {
            return LeaderReply::Invalid(format!("member {id} is not in the cluster"));
        }
        let voters: BTreeSet<u64> = self
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .collect();
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
            Ok(r) => LeaderReply::Applied {
                outcome: Outcome::Done,
                index: r.log_id.index,
            },
            Err(e) => write_error(e),
        }
    }

    /// The window a hand-over may take: followers' leader leases must lapse (up to the
    /// maximum election timeout), then the target campaigns.
    pub(super) fn hand_over_bound(&self) -> Duration {
        self.campaign_window() + Duration::from_secs(2)
    }

    fn campaign_window(&self) -> Duration {
        self.inner.election_timeout_max * 2
    }

    /// The voter to hand leadership to: `to`, or the most caught-up other voter.
    fn hand_over_target(&self, to: Option<u64>) -> Result<u64, Box<LeaderReply>> {
        let m = self.metrics().borrow().clone();
        let voters: Vec<u64> = m
            .membership_config
            .voter_ids()
            .filter(|v| *v != self.inner.id)
            .collect();
        match to {
            Some(t) if !voters.contains(&t) => Err(Box::new(LeaderReply::Invalid(format!(
                "member {t} is not a voter"
            )))),
            Some(t) => Ok(t),
            None => {
                let progress = m.replication.clone().unwrap_or_default();
                voters
                    .iter()
                    .max_by_key(|v| progress.get(v).copied().flatten().map(|l| l.index))
                    .copied()
                    .ok_or_else(|| {
                        Box::new(LeaderReply::Invalid(
                            "no other voting member to hand leadership to".into(),
                        ))
                    })
            }
        }
    }

    /// Moves leadership from this member (the leader) to `to`, or to the most caught-up
    /// voter. openraft 0.9 has no transfer call: the leader pauses heartbeats so followers'
    /// leases lapse, and asks the target to campaign at once.
    pub(super) async fn hand_over(&self, to: Option<u64>) -> LeaderReply {
        let m = self.metrics().borrow().clone();
        if m.current_leader != Some(self.inner.id) {
            return LeaderReply::NotLeader(m.current_leader);
        }
        if to == Some(self.inner.id) {
            return LeaderReply::Done(Outcome::Done);
        }
        let target = match self.hand_over_target(to) {
            Ok(t) => t,
            Err(reply) => return *reply,
        };
        let Some(addr) = member_addr(&m, target) else {
            return LeaderReply::Invalid(format!("member {target} has no address"));
        };
        tracing::info!(to = target, "handing leadership over");
        let window = self.campaign_window();
        let _paused = HeartbeatPause::start(&self.inner.raft);
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
        match result {
            Ok(true) => LeaderReply::Done(Outcome::Done),
            Ok(false) => LeaderReply::Failed(format!("member {target} did not win the election")),
            Err(status) => LeaderReply::Failed(format!("member {target}: {}", status.message())),
        }
    }

    /// An AppendEntries from the current leader reached this member.
    pub(super) fn noted_leader_contact(&self) {
        self.inner.leader_contact.note();
    }

    /// A call to the leader failed as calls to a dead process fail. Once every follower's
    /// lease on that leader must have lapsed (its election timeout at most), this member
    /// checks that the leader's AppendEntries stopped reaching it and that the leader does
    /// not answer, and campaigns at once, instead of waiting out its own election timer on
    /// top of the lease. Followers go in member-id order, a beat apart, so they do not split
    /// the vote. A live leader keeps reaching its followers and answers the check, so a
    /// false alarm elects no one.
    pub(super) fn leader_seems_gone(&self, leader: u64) {
        let m = self.metrics().borrow().clone();
        if m.current_leader != Some(leader) || leader == self.inner.id {
            return;
        }
        let rank = m
            .membership_config
            .voter_ids()
            .filter(|v| *v != leader)
            .position(|v| v == self.inner.id);
        let Some(rank) = rank else { return };
        if self
            .inner
            .campaigning
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let cluster = self.clone();
        let wait = self.inner.election_timeout_max + LEASE_MARGIN + LEASE_MARGIN * 5 * rank as u32;
        self.inner.tasks.spawn(async move {
            tokio::time::sleep(wait).await;
            let heard = cluster
                .inner
                .leader_contact
                .within(cluster.inner.election_timeout_max);
            if cluster.metrics().borrow().current_leader == Some(leader)
                && !heard
                && !cluster.answers(leader).await
            {
                tracing::info!(
                    leader,
                    "the leader is gone; campaigning without waiting out the election timer"
                );
                let _ = cluster.inner.raft.trigger().elect().await;
            }
            cluster
                .inner
                .campaigning
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// Whether member `id` answers a status call within a short time.
    async fn answers(&self, id: u64) -> bool {
        let Some(addr) = member_addr(&self.metrics().borrow(), id) else {
            return false;
        };
        let Ok(mut client) = self.inner.peers.client(&addr) else {
            return false;
        };
        let mut req = tonic::Request::new(crate::proto::raft::MemberStatusRequest {});
        req.set_timeout(LEASE_MARGIN * 5);
        tokio::time::timeout(LEASE_MARGIN * 5, client.member_status(req))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Tries to become leader within `within` (the current leader paused its heartbeats).
    pub(super) async fn campaign(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.metrics().borrow().current_leader == Some(self.inner.id) {
                return true;
            }
            if self.inner.raft.trigger().elect().await.is_err() {
                // Raft has stopped (this member is shutting down too): it cannot lead.
                return false;
            }
            tokio::time::sleep(CAMPAIGN_RETRY).await;
        }
        self.metrics().borrow().current_leader == Some(self.inner.id)
    }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::raft::{ClusterOptions, tls};

    /// Member 1 of a two-member cluster whose member 2 never starts (so member 1 cannot
    /// win an election), on a scratch directory, started in this process.
    async fn member_without_quorum(dir: &std::path::Path) -> Cluster {
        let (ca, cert, key) = tls::provision_default(dir, 1).unwrap();
        let member = |name: &str| MemberInfo {
            name: name.into(),
            raft_addr: "127.0.0.1:1".into(),
            control_url: String::new(),
            region_id: None,
        };
        let opts = ClusterOptions {
            member_id: 1,
            member: member("m1"),
            data_dir: dir.to_path_buf(),
            settings: Default::default(),
            initial_members: BTreeMap::from([(1, member("m1")), (2, member("m2"))]),
            election_timeout_min_ms: 300,
            heartbeat_ms: 100,
            snapshot_every_logs: 1_000,
            presence: crate::presence::Presence::new(1),
            version: "test",
            tls: tls::MemberTls::load(&ca, &cert, &key).unwrap(),
            drain: CancellationToken::new(),
        };
        Cluster::start(opts, CancellationToken::new(), TaskTracker::new())
            .await
            .unwrap()
    }

    /// When every member of a cluster is stopped at once, one may be asked to take over
    /// leadership while its own Raft is already stopped: it must give up at once, not
    /// keep asking its stopped Raft (an error line each time) until the deadline.
    #[tokio::test]
    async fn a_member_whose_raft_has_stopped_gives_up_campaigning_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = member_without_quorum(dir.path()).await;
        cluster.shutdown().await;
        let asked = std::time::Instant::now();
        assert!(!cluster.campaign(Duration::from_secs(20)).await);
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "kept campaigning for {:?}",
            asked.elapsed()
        );
    }
}

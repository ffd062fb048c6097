//! Status: this member's own report, and the cluster as this member sees it (asking every
//! other member concurrently, with a short timeout, so it works without a leader).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::cluster::Cluster;
use super::network::Peers;
use super::{ClusterStatus, MemberInfo, MemberRole, MemberStatus, RaftMetrics};
use crate::proto::raft::{MemberStatusReply, MemberStatusRequest};

/// How long `status` waits for each other member.
const STATUS_TIMEOUT: Duration = Duration::from_millis(800);

impl Cluster {
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
}

/// Whether any other initial member reports a term or a leader (the cluster exists).
pub(super) async fn cluster_already_running(
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
pub(super) fn member_addr(m: &RaftMetrics, id: u64) -> Option<String> {
    m.membership_config
        .nodes()
        .find(|(nid, _)| **nid == id)
        .map(|(_, n)| n.raft_addr.clone())
}

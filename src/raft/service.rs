//! The server side of member-to-member gRPC.

use std::time::Duration;

use tonic::{Request, Response, Status};

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};

use super::TypeConfig;
use super::cluster::Cluster;
use super::network::encode;
use super::{LeaderOp, LeaderReply};
use crate::proto::raft::raft_service_server::RaftService;
use crate::proto::raft::{
    CampaignReply, CampaignRequest, DrainReply, DrainRequest, Json, MemberStatusReply,
    MemberStatusRequest, PresenceEntry, PresenceSnapshot, WatchPresenceRequest,
};

/// Decodes a member-to-member message body as the service would for `method` (0: append
/// entries, 1: vote, 2: install snapshot, 3: a forwarded leader operation). For the fuzz
/// harness: nothing is done with it.
pub fn check_member_message(method: u8, data: &[u8]) -> Result<(), String> {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    fn de<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<(), String> {
        serde_json::from_slice::<T>(data)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    match method % 4 {
        0 => de::<AppendEntriesRequest<super::TypeConfig>>(data),
        1 => de::<VoteRequest<u64>>(data),
        2 => de::<InstallSnapshotRequest<super::TypeConfig>>(data),
        _ => de::<LeaderOp>(data),
    }
}

pub struct RaftRpc {
    pub cluster: Cluster,
}

impl RaftRpc {
    /// Admits a caller for Raft, forwarding, presence and leadership calls: its certificate
    /// (already verified against the cluster CA by TLS) must name a member of the current
    /// Raft membership — a removed member is refused at once. A member that has not joined
    /// a cluster yet (no membership) admits any member certificate: it waits to be
    /// contacted. Returns the caller's id when known.
    #[allow(clippy::result_large_err)]
    fn admit<T>(&self, req: &Request<T>) -> Result<Option<u64>, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a member certificate is required"))?;
        let cert = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a member certificate is required"))?;
        let members = self.cluster.member_ids();
        if members.is_empty() {
            return Ok(None);
        }
        match super::tls::member_of(cert, members) {
            Some(id) => Ok(Some(id)),
            None => Err(Status::permission_denied(
                "the certificate names no member of this cluster",
            )),
        }
    }

    /// Admits a Raft message only from the member it claims to come from.
    #[allow(clippy::result_large_err)]
    fn admit_raft<T>(
        &self,
        req: &Request<Json>,
        vote: impl Fn(&T) -> Option<u64>,
    ) -> Result<T, Status>
    where
        T: serde::de::DeserializeOwned,
    {
        let caller = self.admit(req)?;
        let rpc: T = decode(req.get_ref())?;
        if let (Some(caller), Some(claimed)) = (caller, vote(&rpc))
            && caller != claimed
        {
            return Err(Status::permission_denied(format!(
                "member {caller}'s certificate cannot speak for member {claimed}"
            )));
        }
        Ok(rpc)
    }
}

// tonic's handlers return `Status` by value; boxing it here would only add a conversion.
#[allow(clippy::result_large_err)]
fn decode<T: serde::de::DeserializeOwned>(req: &Json) -> Result<T, Status> {
    serde_json::from_slice(&req.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftRpc {
    async fn append_entries(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let rpc = self.admit_raft(&req, |r: &AppendEntriesRequest<TypeConfig>| {
            r.vote.leader_id().voted_for()
        })?;
        let result = self.cluster.raft().append_entries(rpc).await;
        if result
            .as_ref()
            .is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_)))
        {
            self.cluster.noted_leader_contact();
        }
        Ok(Response::new(encode(&result)))
    }

    async fn vote(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let rpc = self.admit_raft(&req, |r: &VoteRequest<u64>| r.vote.leader_id().voted_for())?;
        let result = self.cluster.raft().vote(rpc).await;
        Ok(Response::new(encode(&result)))
    }

    async fn install_snapshot(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let rpc = self.admit_raft(&req, |r: &InstallSnapshotRequest<TypeConfig>| {
            r.vote.leader_id().voted_for()
        })?;
        let result = self.cluster.raft().install_snapshot(rpc).await;
        Ok(Response::new(encode(&result)))
    }

    async fn forward(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        self.admit(&req)?;
        let op: LeaderOp = decode(req.get_ref())?;
        let reply: LeaderReply = self.cluster.run_as_leader(op).await;
        if super::fault::lose_forward_reply() {
            return Err(Status::unavailable("fault injection: reply lost"));
        }
        Ok(Response::new(encode(&reply)))
    }

    /// Any holder of a member certificate may ask (a wiped member asks before it knows the
    /// membership); the answer holds no secrets.
    async fn member_status(
        &self,
        _req: Request<MemberStatusRequest>,
    ) -> Result<Response<MemberStatusReply>, Status> {
        Ok(Response::new(self.cluster.local_status()))
    }

    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignReply>, Status> {
        self.admit(&req)?;
        let within = Duration::from_millis(req.get_ref().within_ms.clamp(100, 30_000));
        let became_leader = self.cluster.campaign(within).await;
        Ok(Response::new(CampaignReply { became_leader }))
    }

    async fn watch_presence(
        &self,
        req: Request<WatchPresenceRequest>,
    ) -> Result<Response<PresenceSnapshot>, Status> {
        self.admit(&req)?;
        super::fault::hold_presence_answer().await;
        let wait = Duration::from_millis(req.get_ref().wait_ms.min(30_000));
        let presence = self.cluster.presence();
        tokio::select! {
            () = presence.wait_local_change(req.get_ref().after_version, wait) => {}
            () = self.cluster.stopping().cancelled() => {}
        }
        let changes = presence.local_changes_since(req.get_ref().after_version);
        let delta = changes.delta && req.get_ref().deltas;
        let changes = if changes.delta && !delta {
            presence.local_changes_since(u64::MAX)
        } else {
            changes
        };
        let entries = changes
            .entries
            .into_iter()
            .map(|(node, p)| {
                let p = p.unwrap_or_default();
                PresenceEntry {
                    node: node.0,
                    endpoints: p.endpoints,
                    home_derp: p.home_derp,
                    sessions: p.sessions,
                    online_since: p.online_since,
                }
            })
            .collect();
        Ok(Response::new(PresenceSnapshot {
            member: self.cluster.member_id(),
            version: changes.version,
            entries,
            delta,
        }))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        self.admit(&req)?;
        self.cluster.drain_here();
        Ok(Response::new(DrainReply {}))
    }
}

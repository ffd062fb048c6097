//! The server side of member-to-member gRPC.

use std::time::Duration;

use tonic::{Request, Response, Status};

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

// tonic's handlers return `Status` by value; boxing it here would only add a conversion.
#[allow(clippy::result_large_err)]
fn decode<T: serde::de::DeserializeOwned>(req: &Json) -> Result<T, Status> {
    serde_json::from_slice(&req.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftRpc {
    async fn append_entries(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let rpc = decode(req.get_ref())?;
        let result = self.cluster.raft().append_entries(rpc).await;
        Ok(Response::new(encode(&result)))
    }

    async fn vote(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let rpc = decode(req.get_ref())?;
        let result = self.cluster.raft().vote(rpc).await;
        Ok(Response::new(encode(&result)))
    }

    async fn install_snapshot(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let rpc = decode(req.get_ref())?;
        let result = self.cluster.raft().install_snapshot(rpc).await;
        Ok(Response::new(encode(&result)))
    }

    async fn forward(&self, req: Request<Json>) -> Result<Response<Json>, Status> {
        let op: LeaderOp = decode(req.get_ref())?;
        let reply: LeaderReply = self.cluster.run_as_leader(op).await;
        if super::fault::lose_forward_reply() {
            return Err(Status::unavailable("fault injection: reply lost"));
        }
        Ok(Response::new(encode(&reply)))
    }

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
        let within = Duration::from_millis(req.get_ref().within_ms.clamp(100, 30_000));
        let became_leader = self.cluster.campaign(within).await;
        Ok(Response::new(CampaignReply { became_leader }))
    }

    async fn watch_presence(
        &self,
        req: Request<WatchPresenceRequest>,
    ) -> Result<Response<PresenceSnapshot>, Status> {
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

    async fn drain(&self, _req: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        self.cluster.drain_here();
        Ok(Response::new(DrainReply {}))
    }
}

//! The client side of member-to-member gRPC: openraft's `RaftNetwork` over tonic, plus the
//! calls `Cluster` makes (forwarding writes, member status, campaign requests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Infallible, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::fault;
use super::{MemberInfo, TypeConfig};
use crate::proto::raft::Json;
use crate::proto::raft::raft_service_client::RaftServiceClient;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Lazily connected channels to other members, keyed by address, shared by Raft
/// replication and `Cluster`'s own calls.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: ClientTlsConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("member {0} is cut off by the fault-injection block list")]
    Blocked(String),
    #[error("invalid member address {0:?}")]
    BadAddress(String),
    #[error("member {addr} did not answer: {status}")]
    Status {
        addr: String,
        status: Box<tonic::Status>,
    },
    #[error("member {addr} sent an undecodable reply")]
    Decode {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Peers {
    /// Calls other members over mutual TLS (there is no plaintext mode).
    pub fn new(tls: ClientTlsConfig) -> Self {
        Peers {
            channels: Arc::default(),
            tls,
        }
    }

    pub fn client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, CallError> {
        if fault::blocked(addr) {
            return Err(CallError::Blocked(addr.to_string()));
        }
        let mut channels = self.channels.lock().expect("peer channel lock");
        if let Some(ch) = channels.get(addr) {
            return Ok(RaftServiceClient::new(ch.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|_| CallError::BadAddress(addr.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .tls_config(self.tls.clone())
            .map_err(|_| CallError::BadAddress(addr.to_string()))?;
        let ch = endpoint.connect_lazy();
        channels.insert(addr.to_string(), ch.clone());
        Ok(RaftServiceClient::new(ch))
    }
}

/// Whether a member call failed by running out of time (the member may only be busy)
/// rather than being refused or reset. tonic reports its own deadline as `Cancelled`, the
/// remote's as `DeadlineExceeded`.
pub fn timed_out(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

pub fn encode<T: Serialize>(v: &T) -> Json {
    Json {
        data: serde_json::to_vec(v).expect("raft messages always serialize"),
    }
}

pub fn decode<T: DeserializeOwned>(addr: &str, j: &Json) -> Result<T, CallError> {
    serde_json::from_slice(&j.data).map_err(|source| CallError::Decode {
        addr: addr.to_string(),
        source,
    })
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &MemberInfo) -> PeerLink {
        PeerLink {
            target,
            addr: node.raft_addr.clone(),
            peers: self.clone(),
        }
    }
}

/// Raft's connection to one member.
pub struct PeerLink {
    target: u64,
    addr: String,
    peers: Peers,
}

type RpcResult<T, E> = Result<T, RPCError<u64, MemberInfo, RaftError<u64, E>>>;

impl PeerLink {
    async fn call<Req, Resp, E>(&self, kind: Kind, req: &Req, ttl: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self
            .peers
            .client(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(encode(req));
        request.set_timeout(ttl);
        let reply = match kind {
            Kind::Append => client.append_entries(request).await,
            Kind::Vote => client.vote(request).await,
            Kind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let slow = timed_out(&status);
                let e = CallError::Status {
                    addr: self.addr.clone(),
                    status: Box::new(status),
                };
                // A slow answer is not an unreachable member: openraft backs off from
                // unreachable ones (no heartbeats meanwhile, so the followers would elect
                // someone else), and under load an append can outlast the heartbeat
                // interval openraft allows it.
                return Err(if slow {
                    RPCError::Network(NetworkError::new(&e))
                } else {
                    RPCError::Unreachable(Unreachable::new(&e))
                });
            }
        };
        let result: Result<Resp, RaftError<u64, E>> =
            decode(&self.addr, &reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerLink {
    /// From an unreachable member: retry soon, then less often (openraft's default waits
    /// half a second every time).
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(
            (0..)
                .map(|i: u32| Duration::from_millis(50u64 << i.min(3)))
                .take(1_000_000),
        )
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, Infallible> {
        self.call(Kind::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(Kind::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, Infallible> {
        self.call(Kind::Vote, &rpc, option.hard_ttl()).await
    }
}

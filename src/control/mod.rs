//! What Tailscale clients talk to: `GET /key`, the `/ts2021` upgrade to Noise + HTTP/2, and
//! inside it `/machine/register` and `/machine/map`.
//!
//! Reads the registry through `raft::Cluster::view`, writes through `Cluster::propose`,
//! keeps live-session state in `presence`. Never uses `admin` or `cli`.

pub mod client;
pub mod keys;
pub mod map;
pub mod noise;
pub mod noise_stream;
pub mod policy;
pub mod register;
pub mod tailcfg;
pub mod upgrade;
mod x25519;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limit::RateLimiter;
use crate::presence::Presence;
use crate::raft::Cluster;
use crate::telemetry::Metrics;

pub use crate::derp::region::{DerpNodeInfo, DerpRegionInfo, Topology};
pub use keys::ServerKeys;

/// Control-protocol settings fixed at start.
#[derive(Clone, Debug)]
pub struct ControlSettings {
    pub member_id: u64,
    pub server_url: String,
    pub base_domain: String,
    pub magic_dns: bool,
    pub nameservers: Vec<String>,
    pub search_domains: Vec<String>,
    /// The DERP map and dial plan, derived from the current membership.
    pub topology: tokio::sync::watch::Receiver<Arc<Topology>>,
    /// New nodes are usable at once (`node_approval: auto`).
    pub auto_approve: bool,
    /// Key expiry for new nodes; `None` = never.
    pub node_key_expiry: Option<Duration>,
    /// How long an interactive registration stays open.
    pub registration_timeout: Duration,
    pub ephemeral_inactivity_timeout: Duration,
    /// `limits.max_pending_registrations`.
    pub max_pending_registrations: u32,
    /// `limits.max_hostinfo_bytes`.
    pub max_hostinfo_bytes: usize,
    /// `limits.http_header_timeout`: a request head must arrive within this.
    pub http_header_timeout: Duration,
    /// The compiled policy, shared by the member's sessions.
    pub access: Arc<policy::AccessCache>,
}

/// What the control handlers need, and nothing more.
#[derive(Clone)]
pub struct ControlDeps {
    pub cluster: Cluster,
    pub presence: Presence,
    pub keys: Arc<ServerKeys>,
    pub settings: Arc<ControlSettings>,
    /// This member's netmap fan-out.
    pub hub: map::hub::HubHandle,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<ControlLimits>,
    /// Hostinfo writes in flight, one per node.
    pub node_info_writes: Arc<map::NodeInfoWrites>,
    pub stop: CancellationToken,
    pub tasks: TaskTracker,
}

/// Rate limits on what clients ask of this member (`limits.*`).
pub struct ControlLimits {
    /// Register requests per source address.
    pub registrations: RateLimiter<IpAddr>,
    /// Map requests per node.
    pub node_updates: RateLimiter<crate::registry::NodeId>,
    /// HTTP/2 streams per Noise connection.
    pub max_concurrent_streams: u32,
    /// Endpoints per map request.
    pub max_endpoints: usize,
}

impl ControlLimits {
    pub fn new(limits: &crate::config::LimitsConfig, metrics: &Metrics) -> Self {
        let refusals = metrics.limit_refusals.clone();
        ControlLimits {
            registrations: RateLimiter::new(
                "registrations_per_minute",
                limits.registrations_per_minute,
                refusals.clone(),
            ),
            node_updates: RateLimiter::new(
                "node_updates_per_minute",
                limits.node_updates_per_minute,
                refusals,
            ),
            max_concurrent_streams: limits.max_concurrent_streams,
            max_endpoints: limits.max_endpoints,
        }
    }
}

/// Longest endpoint text accepted (`[v6 address%zone]:port` fits easily).
const MAX_ENDPOINT_BYTES: usize = 64;

/// Refuses more endpoints than `limits.max_endpoints`, or an overlong one: they are kept
/// in presence, copied to every member and sent to every peer.
pub(crate) fn check_endpoints(deps: &ControlDeps, endpoints: &[String]) -> Result<(), String> {
    let limit = deps.limits.max_endpoints;
    let refuse = |message: String| {
        deps.metrics
            .limit_refusals
            .with_label_values(&["max_endpoints"])
            .inc();
        Err(message)
    };
    if endpoints.len() > limit {
        return refuse(format!(
            "{} endpoints; this server takes at most {limit} (limits.max_endpoints)",
            endpoints.len()
        ));
    }
    if let Some(long) = endpoints.iter().find(|e| e.len() > MAX_ENDPOINT_BYTES) {
        return refuse(format!(
            "an endpoint of {} bytes; at most {MAX_ENDPOINT_BYTES} each",
            long.len()
        ));
    }
    Ok(())
}

/// A 429 naming the limit and when to come back.
pub(crate) fn rate_limited(refusal: crate::limit::Refusal) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(
            axum::http::header::RETRY_AFTER,
            refusal.retry_after_secs.to_string(),
        )],
        format!("{}\n", refusal.message),
    )
        .into_response()
}

/// The peer of one Noise connection, attached to every request inside it.
#[derive(Clone, Copy, Debug)]
pub struct NoisePeer {
    pub machine_key: crate::registry::MachineKey,
    /// The TCP peer's address, when known (rate limits per source).
    pub source: Option<IpAddr>,
}

/// Refuses a Hostinfo larger than `limits.max_hostinfo_bytes` (it is replicated and sent
/// to every peer).
pub(crate) fn check_hostinfo_size(
    deps: &ControlDeps,
    hostinfo: Option<&serde_json::Value>,
) -> Result<(), String> {
    let Some(hostinfo) = hostinfo else {
        return Ok(());
    };
    let size = serde_json::to_vec(hostinfo)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    let limit = deps.settings.max_hostinfo_bytes;
    if size > limit {
        deps.metrics
            .limit_refusals
            .with_label_values(&["max_hostinfo_bytes"])
            .inc();
        return Err(format!(
            "Hostinfo is {size} bytes; this server takes at most {limit} (limits.max_hostinfo_bytes)"
        ));
    }
    Ok(())
}

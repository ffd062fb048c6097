//! `POST /machine/map`: lite updates, one-shot netmaps, and streaming sessions.

pub mod build;
pub mod full;
pub mod hub;
pub mod session;

use std::sync::Arc;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::tailcfg::{self, MapRequest};
use super::{ControlDeps, NoisePeer};
use crate::registry::{Command, Node, NodeId};
use build::MapContext;

/// Largest map request accepted; real ones carry a Hostinfo of a few KiB.
const MAX_MAP_REQUEST_BYTES: usize = 1 << 20;

fn refuse(deps: &ControlDeps, status: StatusCode, message: String) -> Response {
    deps.metrics.bad_requests.with_label_values(&["map"]).inc();
    tracing::debug!(%status, message, "map request refused");
    (status, format!("{message}\n")).into_response()
}

/// Decodes and checks a `MapRequest` body (bounded, JSON, a known capability version)
/// before anything else looks at it.
pub fn parse(body: &[u8]) -> Result<MapRequest, (StatusCode, String)> {
    if body.len() > MAX_MAP_REQUEST_BYTES {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "map request too large".into(),
        ));
    }
    let req: MapRequest = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("invalid MapRequest JSON: {e}"),
        )
    })?;
    if req.version < tailcfg::MIN_CAPABILITY_VERSION {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("client capability version {} is too old", req.version),
        ));
    }
    // A zero disco key means "not sent"; any other small-order point is no key at all.
    if req.node_key.is_low_order() || (!req.disco_key.is_zero() && req.disco_key.is_low_order()) {
        return Err((
            StatusCode::BAD_REQUEST,
            "MapRequest carries a small-order point as a key".into(),
        ));
    }
    Ok(req)
}

pub async fn handle(
    State(deps): State<ControlDeps>,
    Extension(peer): Extension<NoisePeer>,
    body: Bytes,
) -> Response {
    let req = match parse(&body) {
        Ok(req) => req,
        Err((status, message)) => return refuse(&deps, status, message),
    };
    let view = deps.cluster.view();
    let Some(node) = view.node_by_key(&req.node_key).cloned() else {
        return refuse(
            &deps,
            StatusCode::NOT_FOUND,
            format!("node key {} is not registered", req.node_key.short()),
        );
    };
    // The handshake authenticates only the machine key; the node key must belong to it.
    if node.machine_key != peer.machine_key {
        return refuse(
            &deps,
            StatusCode::UNAUTHORIZED,
            format!(
                "node key {} belongs to another machine",
                req.node_key.short()
            ),
        );
    }
    if !deps.limits.node_updates.allow(&node.id) {
        tracing::info!(node.id = %node.id, "map request refused: rate limit");
        let refusal = deps
            .limits
            .node_updates
            .refusal(&node.id, "map requests from this node");
        return super::rate_limited(refusal);
    }
    if let Err(message) = super::check_hostinfo_size(&deps, req.hostinfo.as_ref())
        .and_then(|()| super::check_endpoints(&deps, &req.endpoints))
    {
        return refuse(&deps, StatusCode::PAYLOAD_TOO_LARGE, message);
    }
    // A revoked key (expired by time, an admin or a logout) gets nothing until the node
    // logs in again.
    if node.is_expired(crate::registry::Timestamp::now()) {
        return refuse(
            &deps,
            StatusCode::FORBIDDEN,
            format!(
                "node key {} has expired; log in again",
                req.node_key.short()
            ),
        );
    }
    record_node_info(&deps, &node, &req);
    if req.stream {
        // Counted online before its endpoints are recorded, so peers get both at once.
        deps.presence.session_started(node.id);
    }
    let home_derp = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.pointer("/NetInfo/PreferredDERP"))
        .and_then(|v| v.as_i64())
        .and_then(|v| i32::try_from(v).ok());
    if !req.endpoints.is_empty() || home_derp.is_some() {
        deps.presence.update(
            node.id,
            (!req.endpoints.is_empty()).then(|| req.endpoints.clone()),
            home_derp,
        );
    }

    let compress = req.compress == "zstd";
    if !req.stream && req.omit_peers {
        // A "lite" update: the client checks only the status.
        return StatusCode::OK.into_response();
    }
    if !req.stream {
        let view = deps.cluster.view();
        let Some(node) = view.node(node.id).cloned() else {
            return refuse(&deps, StatusCode::NOT_FOUND, "node was removed".into());
        };
        let ctx = MapContext {
            view: &view,
            presence: &deps.presence,
            settings: &deps.settings,
        };
        let response = ctx.full_map_now(&node);
        let frame = build::encode_frame(&response, compress);
        deps.metrics
            .map_responses
            .with_label_values(&["full"])
            .inc();
        deps.metrics.map_bytes.inc_by(frame.len() as u64);
        return ([(header::CONTENT_TYPE, "application/octet-stream")], frame).into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(session::body(&deps, node.id, compress)),
    )
        .into_response()
}

/// Hostinfo without `NetInfo`: NetInfo carries DERP latencies that change on every
/// netcheck (about every 20 s), so replicating it would flood the log; the home region
/// from it is kept in `presence` instead.
pub fn stable_hostinfo(hostinfo: &serde_json::Value) -> String {
    let mut h = hostinfo.clone();
    if let Some(obj) = h.as_object_mut() {
        obj.remove("NetInfo");
    }
    h.to_string()
}

/// Writes Hostinfo and disco key through Raft, but only when they changed: a client sends
/// them on every poll, and an unchanged value must not grow the log. The write runs in the
/// background, at most one per node at a time: a map stream never waits for Raft (after a
/// member dies, thousands of clients reconnect while the cluster may be electing).
fn record_node_info(deps: &ControlDeps, node: &Arc<Node>, req: &MapRequest) {
    let Some(command) = node_info_change(node, req) else {
        return;
    };
    let Some(claim) = deps.node_info_writes.claim(node.id) else {
        return;
    };
    let cluster = deps.cluster.clone();
    deps.tasks.spawn(async move {
        let id = claim.node;
        if let Err(error) = cluster.propose(command).await {
            // The map works with the old values; the next poll retries.
            tracing::warn!(node.id = %id, %error, "could not record node info");
        }
        drop(claim);
    });
}

/// Nodes whose Hostinfo write is in flight on this member.
#[derive(Default)]
pub struct NodeInfoWrites(std::sync::Mutex<std::collections::HashSet<NodeId>>);

/// One node's in-flight write; dropping it lets the next poll write again.
struct NodeInfoClaim {
    node: NodeId,
    writes: Arc<NodeInfoWrites>,
}

impl NodeInfoWrites {
    fn claim(self: &Arc<Self>, node: NodeId) -> Option<NodeInfoClaim> {
        let fresh = self.0.lock().expect("node info writes").insert(node);
        fresh.then(|| NodeInfoClaim {
            node,
            writes: self.clone(),
        })
    }
}

impl Drop for NodeInfoClaim {
    fn drop(&mut self) {
        self.writes
            .0
            .lock()
            .expect("node info writes")
            .remove(&self.node);
    }
}

/// The `UpdateNodeInfo` a map request calls for, if its Hostinfo or disco key changed.
fn node_info_change(node: &Arc<Node>, req: &MapRequest) -> Option<Command> {
    let hostinfo = req.hostinfo.as_ref().map(stable_hostinfo);
    let hostinfo_changed = hostinfo.as_ref().is_some_and(|h| *h != node.hostinfo);
    let disco_changed = !req.disco_key.is_zero() && req.disco_key != node.disco_key;
    if !hostinfo_changed && !disco_changed {
        return None;
    }
    let hostinfo = hostinfo.unwrap_or_else(|| node.hostinfo.clone());
    let hostname = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.get("Hostname"))
        .and_then(|v| v.as_str())
        .map(String::from)
        .unwrap_or_else(|| node.hostname.clone());
    let disco_key = if req.disco_key.is_zero() {
        node.disco_key
    } else {
        req.disco_key
    };
    Some(Command::UpdateNodeInfo {
        id: node.id,
        hostname,
        hostinfo,
        disco_key,
    })
}

#[cfg(test)]
mod tests;

//! The control port's HTTP routes besides the ts2021 ones: DERP, probes, health, readiness,
//! the interactive registration page; and the Prometheus endpoint.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};

use crate::control::{self, ControlDeps};
use crate::derp::server::DerpServer;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub(super) struct HttpState {
    control: ControlDeps,
    derp: Arc<DerpServer>,
}

pub(super) fn control_router(control: ControlDeps, derp: Arc<DerpServer>) -> Router {
    let state = HttpState {
        control: control.clone(),
        derp,
    };
    let inner = Router::new()
        .route("/key", get(control::upgrade::key_handler))
        .route("/ts2021", any(control::upgrade::ts2021_handler))
        .with_state(control);
    Router::new()
        .route(
            "/derp",
            get(|State(s): State<HttpState>, req| async move { s.derp.handle_upgrade(req).await }),
        )
        .route("/derp/probe", any(crate::derp::server::probe_handler))
        .route(
            "/derp/latency-check",
            any(crate::derp::server::probe_handler),
        )
        .route(
            "/generate_204",
            get(crate::derp::server::generate_204_handler),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/register/{auth_id}", get(register_page))
        .with_state(state)
        .merge(inner)
}

/// Alive while Raft runs: a member whose Raft stopped (storage failure) is about to exit.
async fn health(State(s): State<HttpState>) -> Response {
    match s.control.cluster.fatal() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {reason}\n"),
        )
            .into_response(),
    }
}

/// Ready when this member serves clients with current data: not draining, a leader is
/// known, and it has applied everything the leader had committed a moment ago.
async fn ready(State(s): State<HttpState>) -> Response {
    let cluster = &s.control.cluster;
    if cluster.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let Some(leader) = cluster.metrics().borrow().current_leader else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no leader\n").into_response();
    };
    if !cluster.caught_up().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "catching up with the leader\n",
        )
            .into_response();
    }
    (StatusCode::OK, format!("ready (leader {leader})\n")).into_response()
}

/// The page an interactive AuthURL opens: tells the admin how to complete it.
async fn register_page(UrlPath(auth_id): UrlPath<String>, State(s): State<HttpState>) -> Response {
    let safe = auth_id.chars().all(|c| c.is_ascii_alphanumeric());
    if !safe || s.control.cluster.view().pending(&auth_id).is_none() {
        return (StatusCode::NOT_FOUND, "unknown or expired registration\n").into_response();
    }
    Html(format!(
        "<!doctype html><title>hsd: register node</title><h1>Register this node</h1>\
         <p>Ask an administrator to run:</p><pre>hsctl nodes register --user USERNAME --key {auth_id}</pre>"
    ))
    .into_response()
}

/// `/metrics`: the registry of counters, with DERP gauges refreshed per scrape.
pub(super) fn metrics_router(metrics: Arc<Metrics>, derp: Arc<DerpServer>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let derp = derp.clone();
            async move {
                metrics.derp_clients.set(derp.connected_clients() as i64);
                let (relayed, forwarded) = derp.packet_counts();
                Metrics::mirror_counter(&metrics.derp_packets_relayed, relayed);
                Metrics::mirror_counter(&metrics.derp_packets_mesh_forwarded, forwarded);
                metrics.render()
            }
        }),
    )
}

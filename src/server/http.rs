//! The control port's HTTP routes besides the ts2021 ones: DERP, probes, health, readiness,
//! the interactive registration page; and the Prometheus endpoint.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use super::login::{self, OidcLogin};
use crate::control::{self, ControlDeps};
use crate::derp::server::DerpServer;
use crate::limit::conn::ConnGuard;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub(super) struct HttpState {
    pub control: ControlDeps,
    derp: Arc<DerpServer>,
    /// Interactive logins through an identity provider, when `oidc.issuer` is set.
    pub oidc: Option<Arc<OidcLogin>>,
}

pub(super) fn control_router(
    control: ControlDeps,
    derp: Arc<DerpServer>,
    oidc: Option<Arc<OidcLogin>>,
) -> Router {
    let state = HttpState {
        control: control.clone(),
        derp,
        oidc,
    };
    let inner = Router::new()
        .route("/key", get(control::upgrade::key_handler))
        .with_state(control.clone())
        .merge(
            Router::new()
                .route("/ts2021", any(control::upgrade::ts2021_handler))
                .with_state(control::upgrade::Ts2021::new(control)),
        );
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
        .route("/register/{auth_id}", get(login::register_page))
        .route("/oidc/callback", get(login::oidc_callback))
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

/// `/metrics`: the registry of counters, with DERP gauges refreshed per scrape.
pub(super) fn metrics_router(metrics: Arc<Metrics>, derp: Arc<DerpServer>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let derp = derp.clone();
            async move {
                metrics.derp_clients.set(derp.connected_clients() as i64);
                metrics
                    .derp_mesh_links_up
                    .set(derp.mesh_peers_connected() as i64);
                let (relayed, forwarded) = derp.packet_counts();
                Metrics::mirror_counter(&metrics.derp_packets_relayed, relayed);
                Metrics::mirror_counter(&metrics.derp_packets_mesh_forwarded, forwarded);
                metrics.render()
            }
        }),
    )
}

/// What bounds a control connection, from `limits.*`.
pub(super) struct Bounds {
    /// Time allowed for the request head (the guard bounds the TLS handshake).
    pub header_timeout: std::time::Duration,
    /// Connections per source address, the idle timeout and the TLS handshake's limit.
    pub guard: ConnGuard,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// TLS on the control port, when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves `app` on `listener` until `stop`, like `axum::serve` but with a bound on how
/// long a connection may take to finish its TLS handshake and send its request head
/// (HTTP/1.1 and the HTTP/2 preface), so slow clients cannot hold connections open.
/// Upgrades (ts2021, DERP) work as before; each connection is a task in `tasks`.
pub(super) async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: Router,
    bounds: Bounds,
    stop: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) {
    let header_timeout = bounds.header_timeout;
    let http2_streams = bounds.max_concurrent_streams;
    loop {
        let (stream, remote) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = bounds.guard.accept(&listener, "control") => accepted,
        };
        let app = app.clone();
        let stop = stop.clone();
        let tls = bounds.tls.clone();
        let guard = bounds.guard.clone();
        let limits = ConnLimits {
            header_timeout,
            http2_streams,
        };
        tasks.spawn(async move {
            let Some(acceptor) = tls else {
                return serve_connection(stream, remote, app, limits, stop).await;
            };
            if let Some(stream) = guard.tls_handshake(&acceptor, stream, remote).await {
                serve_connection(stream, remote, app, limits, stop).await;
            }
        });
    }
}

/// The HTTP-level bounds of one connection.
#[derive(Clone, Copy)]
struct ConnLimits {
    header_timeout: std::time::Duration,
    http2_streams: u32,
}

/// One control connection, plain or TLS, until it ends or the member stops.
async fn serve_connection<IO>(
    stream: IO,
    remote: std::net::SocketAddr,
    app: Router,
    limits: ConnLimits,
    stop: tokio_util::sync::CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        tower_service::Service::call(&mut app.clone(), req)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_streams)
        .keep_alive_interval(None);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => if let Err(error) = result {
            tracing::debug!(%error, ?remote, "control connection ended");
        },
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

//! `GET /key` and the `POST /ts2021` upgrade: HTTP/1.1 Upgrade → Noise IK → HTTP/2 over the
//! decrypted stream, with `/machine/*` routes bound to the Noise peer's machine key.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tower_service::Service;
use tracing::Instrument;

use super::noise::{self, Initiation};
use super::noise_stream::NoiseStream;
use super::{ControlDeps, NoisePeer, map, register};
use crate::util::TrackedExecutor;

const UPGRADE_PROTOCOL: &str = "tailscale-control-protocol";
/// Response bytes HTTP/2 buffers per stream for a client that has not opened its flow
/// control window for them (hyper's default is 400 KiB). Beyond it the map session's own
/// bounded queue fills and the client is owed one full netmap: memory per slow client
/// stays small.
const SEND_BUFFER_BYTES: usize = 64 * 1024;
const HANDSHAKE_HEADER: &str = "x-tailscale-handshake";

/// `GET /key?v=N`: the server's Noise public key.
pub async fn key_handler(State(deps): State<ControlDeps>) -> Response {
    axum::Json(serde_json::json!({
        "legacyPublicKey": deps.keys.legacy_public.to_text(),
        "publicKey": deps.keys.noise_public.to_text(),
    }))
    .into_response()
}

fn refuse(deps: &ControlDeps, status: StatusCode, message: &str) -> Response {
    deps.metrics
        .bad_requests
        .with_label_values(&["ts2021"])
        .inc();
    tracing::debug!(%status, message, "refused ts2021 upgrade");
    (status, format!("{message}\n")).into_response()
}

/// `POST /ts2021` (GET accepted too): validate the upgrade and the Noise initiation before
/// answering 101, so a malformed request gets a plain 400 and costs no task.
pub async fn ts2021_handler(State(ts2021): State<Ts2021>, mut req: Request) -> Response {
    let deps = ts2021.deps;
    // Draining or stopping: refuse, so the client's dial plan moves it to another member.
    if deps.stop.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this member is draining; use another member\n",
        )
            .into_response();
    }
    let headers = req.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !upgrade.eq_ignore_ascii_case(UPGRADE_PROTOCOL) {
        return refuse(
            &deps,
            StatusCode::BAD_REQUEST,
            "missing or unsupported Upgrade header (want tailscale-control-protocol; a proxy in front must pass Upgrade and Connection)",
        );
    }
    let Some(init_b64) = headers.get(HANDSHAKE_HEADER).and_then(|v| v.to_str().ok()) else {
        return refuse(
            &deps,
            StatusCode::BAD_REQUEST,
            "missing X-Tailscale-Handshake header",
        );
    };
    let Ok(init_bytes) = base64::engine::general_purpose::STANDARD.decode(init_b64.trim()) else {
        return refuse(
            &deps,
            StatusCode::BAD_REQUEST,
            "X-Tailscale-Handshake is not base64",
        );
    };
    let init = match Initiation::parse(&init_bytes) {
        Ok(init) => init,
        Err(e) => return refuse(&deps, StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let accepted = match noise::accept(deps.keys.noise_private(), &init) {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                &deps,
                StatusCode::BAD_REQUEST,
                &format!("noise handshake failed: {e} (is the client pinning another server key?)"),
            );
        }
    };
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let span = tracing::debug_span!("noise", machine.key = %accepted.peer.short(), client.version = init.version);
    deps.metrics.noise_connections.inc();
    let conn_deps = deps.clone();
    deps.tasks.spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let peer = NoisePeer {
                        machine_key: accepted.peer,
                        source,
                    };
                    let io = TokioIo::new(upgraded);
                    serve_noise_connection(conn_deps, ts2021.routes, io, accepted, peer).await
                }
                Err(error) => tracing::debug!(%error, "upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    let mut headers = HeaderMap::new();
    headers.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    (StatusCode::SWITCHING_PROTOCOLS, headers).into_response()
}

/// The state of `POST /ts2021`: the member's control dependencies and the routes served
/// inside every Noise connection, built once per member. (A router built per connection
/// cost ~6 KiB of every connected client's memory.)
#[derive(Clone)]
pub struct Ts2021 {
    deps: ControlDeps,
    routes: Router,
}

impl Ts2021 {
    pub fn new(deps: ControlDeps) -> Self {
        let routes = Router::new()
            .route("/machine/register", post(register::handle))
            .route("/machine/map", post(map::handle))
            // Optional endpoints (set-dns, update-health, id-token, …): clients cope with 501.
            .fallback(|| async { (StatusCode::NOT_IMPLEMENTED, "not implemented\n") })
            .with_state(deps.clone());
        Ts2021 { deps, routes }
    }
}

async fn serve_noise_connection<S>(
    deps: ControlDeps,
    routes: Router,
    mut stream: S,
    accepted: noise::Accepted,
    peer: NoisePeer,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if let Err(error) = stream.write_all(&accepted.response).await {
        tracing::debug!(%error, "client left during the handshake");
        return;
    }
    let noise = NoiseStream::new(stream, &accepted.keys);
    let violated = noise.violation_flag();
    // Every request inside this connection carries its peer, for the handlers' `Extension`.
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer);
        // An axum Router is always ready: `call` needs no `poll_ready` first.
        routes.clone().call(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http2::Builder::new(TrackedExecutor(deps.tasks.clone()))
        .max_send_buf_size(SEND_BUFFER_BYTES)
        .max_concurrent_streams(deps.limits.max_concurrent_streams)
        .serve_connection(TokioIo::new(noise), service);
    tokio::select! {
        result = conn => if let Err(error) = result {
            tracing::debug!(%error, "http/2 over noise ended");
        },
        // Dropping the connection makes the client redial, possibly another member.
        () = deps.stop.cancelled() => {}
    }
    if violated.load(std::sync::atomic::Ordering::Relaxed) {
        deps.metrics
            .bad_requests
            .with_label_values(&["noise"])
            .inc();
    }
}

//! The admin API: the gRPC service `hsd.admin.v1.AdminService` that `hsctl` speaks.
//!
//! Served on a unix socket (file-permission auth) and, optionally, on TCP where every call
//! must carry `authorization: Bearer hskey-api-…`. Reads answer from this member's applied
//! registry view; writes are proposed through `raft::Cluster`, which forwards them to the
//! leader. Uses `registry`, `raft::Cluster`, `presence` and `proto`; never control or DERP
//! internals.

pub mod audit;
pub mod auth;
mod console;
pub mod convert;
pub mod grpc;
mod openapi;
pub mod rest;
pub mod status;
mod tcp;

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proto::admin::admin_service_server::AdminServiceServer;

pub use auth::ApiKeyCheck;
pub use grpc::AdminApi;

/// After a failed accept (usually fd exhaustion), wait this long instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the admin API needs, and nothing more.
#[derive(Clone)]
pub struct AdminDeps {
    pub cluster: crate::raft::Cluster,
    pub presence: crate::presence::Presence,
    /// Whether nodes registered through `nodes register` start approved.
    pub auto_approve: bool,
    /// Key expiry for nodes registered through `nodes register`; `None` = never.
    pub node_key_expiry: Option<Duration>,
    pub version: &'static str,
    /// Where refused admin authentications are recorded.
    pub failed_auth: audit::FailedAuth,
    /// HTTP/2 streams per admin connection (`limits.max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// The member's compiled policy (shared with map building), for route states.
    pub access: std::sync::Arc<crate::control::policy::AccessCache>,
    /// The control URL (SSH `check` actions call back to it).
    pub server_url: String,
    /// `policy.mode: file`: the file is the policy; admins edit it, not the API.
    pub policy_file: Option<std::path::PathBuf>,
    /// The identity provider admins may log in to the console through, when configured.
    pub oidc: Option<std::sync::Arc<crate::oidc::Oidc>>,
}

/// Serves the admin API on a unix socket at `path` with file mode `mode`, until `stop`.
///
/// Anyone who can open the socket is an admin, so the mode is the access control. A stale
/// socket file from a previous run is removed first; a socket that still answers belongs to
/// a live process and is left alone. Errors are logged, never fatal for the member.
/// Connections are driven by tonic's own tasks; `tasks` is kept for symmetry with the
/// other listeners (tonic's graceful shutdown waits for them before this returns).
/// Serves the admin API on `listener` (bound at `path` by `bind_unix`), removing the socket
/// file when it stops.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    deps: AdminDeps,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let _ = tasks;
    tracing::info!(socket = %path.display(), "admin API listening on unix socket");
    let incoming = accept_stream(UnixAcceptor(listener));
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(deps.max_concurrent_streams)
        .layer(tower_layer::layer_fn(audit::actor_layer))
        .add_service(AdminServiceServer::new(AdminApi::new(deps)))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "admin unix socket server failed");
    }
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, socket = %path.display(), "removing admin socket");
    }
}

/// Serves the admin API on TCP; every call must carry a valid, unexpired API key.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    deps: AdminDeps,
    guard: crate::limit::conn::ConnGuard,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(listen.addr = %addr, "admin API listening on TCP"),
        Err(error) => tracing::warn!(%error, "admin TCP listener has no local address"),
    }
    let check = ApiKeyCheck::new(deps.cluster.clone(), deps.failed_auth.clone());
    let incoming = tcp::incoming(listener, guard, tls, stop.clone(), tasks);
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(deps.max_concurrent_streams)
        .layer(tower_layer::layer_fn(audit::actor_layer))
        .add_service(AdminServiceServer::with_interceptor(
            AdminApi::new(deps),
            check,
        ))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "admin TCP server failed");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another process is serving {0}")]
    InUse(String),
    #[error("removing stale socket {path}")]
    RemoveStale {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting mode {mode:o} on {path}")]
    Mode {
        path: String,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin unix socket with `mode`, replacing a stale socket file but never one a
/// running process serves.
pub async fn bind_unix(
    path: &std::path::Path,
    mode: u32,
) -> Result<tokio::net::UnixListener, BindError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let shown = path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(BindError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(|source| BindError::RemoveStale {
            path: shown.clone(),
            source,
        })?;
    }
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        // The data dir normally exists already; create it for a socket configured elsewhere.
        let _ = std::fs::create_dir_all(parent);
    }
    // Bound under a private name, given its mode, then renamed into place: no moment
    // exists in which the socket at `path` has the process umask's looser mode.
    let staging = path.with_extension(format!("binding-{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging).map_err(|source| BindError::Bind {
        path: shown.clone(),
        source,
    })?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .map_err(|source| BindError::Mode {
            path: shown.clone(),
            mode,
            source,
        })
        .and_then(|()| {
            std::fs::rename(&staging, path).map_err(|source| BindError::Bind {
                path: shown,
                source,
            })
        });
    if let Err(error) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(error);
    }
    Ok(listener)
}

/// A listener whose accept errors are retried (after a back-off) rather than ending the
/// server: tonic would otherwise stop serving on the first failed accept.
trait Acceptor: Send + 'static {
    type Io: Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

struct UnixAcceptor(tokio::net::UnixListener);
impl Acceptor for UnixAcceptor {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        self.0.accept().await.map(|(stream, _)| stream)
    }
}

fn accept_stream<A: Acceptor + Sync>(
    acceptor: A,
) -> impl futures::Stream<Item = Result<A::Io, std::io::Error>> + Send + 'static {
    futures::stream::unfold(acceptor, |acceptor| async move {
        loop {
            match acceptor.accept().await {
                Ok(io) => return Some((Ok(io), acceptor)),
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

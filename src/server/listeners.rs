//! Every socket the member serves: bound before anything starts (a taken port fails the
//! start at once), then served as essential tasks (one that ends fails the member).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::net::{TcpListener, UdpSocket};

use super::control_tls::ControlTls;
use super::login::OidcLogin;
use super::{Lifecycle, StartError, http};
use crate::admin::AdminDeps;
use crate::config::{Config, LimitsConfig, Validated};
use crate::control::ControlDeps;
use crate::derp::server::DerpServer;
use crate::limit::conn::ConnGuard;
use crate::raft::Cluster;
use crate::telemetry::Metrics;

/// The addresses this member actually bound (port 0 in config becomes a real port here).
#[derive(Clone, Debug, Serialize)]
pub struct BoundAddrs {
    pub member_id: u64,
    pub server_url: String,
    pub control_addr: SocketAddr,
    pub grpc_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub stun_addr: Option<SocketAddr>,
    pub cluster_addr: SocketAddr,
    pub socket: PathBuf,
    pub pid: u32,
}

pub(super) struct Listeners {
    control: TcpListener,
    /// TLS for `control`, when configured.
    control_tls: Option<ControlTls>,
    /// `limits.*`: what bounds each control connection.
    limits: LimitsConfig,
    grpc: Option<TcpListener>,
    metrics: Option<TcpListener>,
    stun: Option<UdpSocket>,
    cluster: TcpListener,
    /// Bound before the member reports ready, so `hsctl` never finds a stale socket file.
    unix: tokio::net::UnixListener,
    unix_socket: PathBuf,
    /// Interactive logins through an identity provider, when configured.
    oidc: Option<Arc<OidcLogin>>,
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

async fn bind_optional(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, StartError> {
    match addr {
        Some(addr) => Ok(Some(bind_tcp(what, addr).await?)),
        None => Ok(None),
    }
}

impl Listeners {
    pub(super) async fn bind(
        config: &Config,
        v: &Validated,
        control_tls: Option<ControlTls>,
        oidc: Option<Arc<OidcLogin>>,
    ) -> Result<Listeners, StartError> {
        let stun = match v.stun_listen_addr {
            Some(addr) => Some(
                UdpSocket::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind {
                        what: "derp.server.stun_listen_addr",
                        addr,
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Listeners {
            control: bind_tcp("listen_addr", v.listen_addr).await?,
            control_tls,
            limits: config.limits.clone(),
            grpc: bind_optional("grpc_listen_addr", v.grpc_listen_addr).await?,
            metrics: bind_optional("metrics_listen_addr", v.metrics_listen_addr).await?,
            stun,
            cluster: bind_tcp("cluster.listen_addr", v.cluster_listen_addr).await?,
            unix: crate::admin::bind_unix(&v.unix_socket, v.unix_socket_mode)
                .await
                .map_err(StartError::AdminSocket)?,
            unix_socket: v.unix_socket.clone(),
            oidc,
        })
    }

    pub(super) fn addrs(&self, config: &Config, v: &Validated) -> BoundAddrs {
        let local = |l: &TcpListener| l.local_addr().ok();
        let control_addr = local(&self.control).unwrap_or(v.listen_addr);
        let server_url = config
            .server_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| {
                let scheme = if config.tls_cert_path.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{control_addr}")
            });
        BoundAddrs {
            member_id: config.cluster.member_id,
            server_url,
            control_addr,
            grpc_addr: self.grpc.as_ref().and_then(local),
            metrics_addr: self.metrics.as_ref().and_then(local),
            stun_addr: self.stun.as_ref().and_then(|s| s.local_addr().ok()),
            cluster_addr: local(&self.cluster).unwrap_or(v.cluster_listen_addr),
            socket: v.unix_socket.clone(),
            pid: std::process::id(),
        }
    }

    /// Serves every listener until the member stops.
    pub(super) fn serve(
        self,
        life: &Lifecycle,
        cluster: &Cluster,
        control: ControlDeps,
        admin: AdminDeps,
        derp: Arc<DerpServer>,
        metrics: Arc<Metrics>,
    ) {
        let (sup, tasks, stop) = (&life.supervisor, &life.tasks, &life.stop);
        // Each TCP port counts its own connections per source.
        let refusals = metrics.limit_refusals.clone();
        let limits = self.limits.clone();
        let guard = move || ConnGuard::new(&limits, refusals.clone());
        let bounded = http::Bounds {
            header_timeout: control.settings.http_header_timeout,
            guard: guard(),
            max_concurrent_streams: self.limits.max_concurrent_streams,
            tls: self.control_tls.as_ref().map(ControlTls::acceptor),
        };
        let app = http::control_router(control, derp.clone(), self.oidc)
            .merge(crate::admin::rest::router(admin.clone()));
        let admin_tls = self.control_tls.as_ref().map(ControlTls::acceptor);
        if let Some(tls) = self.control_tls {
            let reloads = metrics.tls_reloads.clone();
            tasks.spawn(tls.watch(reloads, stop.clone()));
        }
        sup.spawn_essential(
            tasks,
            "control listener",
            http::serve_bounded(self.control, app, bounded, stop.clone(), tasks.clone()),
        );
        if let Some(listener) = self.metrics {
            let app = http::metrics_router(metrics, derp);
            let metrics_stop = stop.clone();
            sup.spawn_essential(tasks, "metrics listener", async move {
                let serve = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { metrics_stop.cancelled().await });
                if let Err(error) = serve.await {
                    tracing::error!(%error, "metrics listener failed");
                }
            });
        }
        if let Some(socket) = self.stun {
            sup.spawn_essential(
                tasks,
                "STUN listener",
                crate::derp::stun::serve(socket, stop.clone()),
            );
        }
        let admin_listeners = AdminListeners {
            unix: self.unix,
            unix_socket: self.unix_socket,
            grpc: self.grpc,
        };
        admin_listeners.serve(life, admin, guard(), admin_tls);
        serve_members(self.cluster, life, cluster);
    }
}

/// The admin API's listeners, served on the admin runtime (see `Lifecycle`).
struct AdminListeners {
    unix: tokio::net::UnixListener,
    unix_socket: PathBuf,
    grpc: Option<TcpListener>,
}

impl AdminListeners {
    fn serve(
        self,
        life: &Lifecycle,
        admin: AdminDeps,
        guard: ConnGuard,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let (stop, tasks) = (life.stop.clone(), life.tasks.clone());
        // Each listener is re-registered with the admin runtime's reactor before serving.
        let unix = self.unix.into_std();
        let (path, deps, unix_stop, unix_tasks) =
            (self.unix_socket, admin.clone(), stop.clone(), tasks.clone());
        let serve = life.admin_runtime.run(async move {
            match unix.and_then(tokio::net::UnixListener::from_std) {
                Ok(l) => crate::admin::serve_unix(l, path, deps, unix_stop, unix_tasks).await,
                Err(error) => tracing::error!(%error, "admin socket could not move to its runtime"),
            }
        });
        life.supervisor
            .spawn_essential(&life.tasks, "admin unix socket", serve);
        let Some(listener) = self.grpc else { return };
        let listener = listener.into_std();
        let serve = life.admin_runtime.run(async move {
            match listener.and_then(TcpListener::from_std) {
                Ok(l) => crate::admin::serve_tcp(l, admin, guard, tls, stop, tasks).await,
                Err(error) => {
                    tracing::error!(%error, "admin gRPC listener could not move to its runtime")
                }
            }
        });
        life.supervisor
            .spawn_essential(&life.tasks, "admin gRPC listener", serve);
    }
}

/// Member-to-member gRPC (Raft, forwarding, presence). Runs until Raft itself stops, after
/// client traffic.
fn serve_members(listener: TcpListener, life: &Lifecycle, cluster: &Cluster) {
    let service = cluster.grpc_service();
    let server_tls = cluster.server_tls();
    let stop = life.raft_stop.clone();
    // Re-registered with the Raft runtime's reactor, so accepting does not wait on the
    // client-facing runtime.
    let listener = listener.into_std();
    let serve = life.raft_runtime.run(async move {
        let listener = match listener.and_then(TcpListener::from_std) {
            Ok(l) => l,
            Err(error) => {
                tracing::error!(%error, "member-to-member listener could not move to the Raft runtime");
                return;
            }
        };
        let incoming = accept_stream(listener);
        let mut builder = match tonic::transport::Server::builder().tls_config(server_tls) {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "member-to-member TLS settings rejected");
                return;
            }
        };
        let result = builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "member-to-member listener failed");
        }
    });
    life.supervisor
        .spawn_essential(&life.raft_tasks, "member-to-member listener", serve);
}

/// Adapts a listener to the stream of connections tonic's `serve_with_incoming` takes.
fn accept_stream(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((conn, listener))
    })
}

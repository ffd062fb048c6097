//! The only module that knows every other: loads keys, binds every listener, starts Raft,
//! the control plane, DERP, STUN, the admin API and metrics, and shuts them down in order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use serde::Serialize;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, NodeApproval};
use crate::control::{
    self, ControlDeps, ControlSettings, DerpNodeInfo, DerpRegionInfo, ServerKeys, Topology,
};
use crate::derp::server::DerpServer;
use crate::presence::Presence;
use crate::raft::{Cluster, ClusterOptions, MemberInfo};
use crate::registry::{Command, RegistrySettings, Timestamp};
use crate::telemetry::Metrics;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How often the leader looks for ephemeral nodes to remove.
const EPHEMERAL_GC_INTERVAL: Duration = Duration::from_secs(10);
/// How often gauges that mirror Raft state are refreshed.
const GAUGE_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("creating data dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    KeyFile(#[from] control::keys::KeyFileError),
    #[error("binding {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the Raft member")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("loading the member TLS files (cluster.tls)")]
    Tls(#[from] crate::raft::tls::TlsError),
}

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

pub struct RunningServer {
    addrs: BoundAddrs,
    stop: CancellationToken,
    tasks: TaskTracker,
    raft_stop: CancellationToken,
    raft_tasks: TaskTracker,
    cluster: Cluster,
    grace: Duration,
}

impl RunningServer {
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Resolves when an essential task asked the member to stop (e.g. storage failure).
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Stops accepting, ends map streams and DERP links (clients move to another member),
    /// waits for every task within the grace period, then stops Raft and closes storage.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "tasks still running after the grace period");
        }
        self.cluster.shutdown().await;
        self.raft_stop.cancel();
        self.raft_tasks.close();
        if tokio::time::timeout(self.grace, self.raft_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("raft tasks still running after the grace period");
        }
        tracing::info!("stopped");
    }
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

pub struct Server;

impl Server {
    /// Validates config, loads keys, binds every listener, starts every subsystem.
    pub async fn start(config: Config) -> Result<RunningServer, StartError> {
        let v = config.validate()?;
        create_data_dir(&config.data_dir)?;
        let noise_private = control::keys::load_or_generate(&v.noise_key_path, "privkey:")?;
        let derp_private = control::keys::load_or_generate(&v.derp_key_path, "privkey:")?;
        let mesh_key = control::keys::load_or_generate(&v.mesh_key_path, "")?;

        // Bind everything before starting anything, so a taken port fails fast.
        let control_listener = bind_tcp("listen_addr", v.listen_addr).await?;
        let control_addr = control_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "listen_addr",
                addr: v.listen_addr,
                source,
            })?;
        let grpc_listener = match v.grpc_listen_addr {
            Some(addr) => Some(bind_tcp("grpc_listen_addr", addr).await?),
            None => None,
        };
        let metrics_listener = match v.metrics_listen_addr {
            Some(addr) => Some(bind_tcp("metrics_listen_addr", addr).await?),
            None => None,
        };
        let stun_socket = match v.stun_listen_addr {
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
        let cluster_listener = bind_tcp("cluster.listen_addr", v.cluster_listen_addr).await?;
        let local = |l: &TcpListener| l.local_addr().ok();
        let cluster_addr = local(&cluster_listener).unwrap_or(v.cluster_listen_addr);
        let server_url = config
            .server_url
            .clone()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("http://{control_addr}"));
        let addrs = BoundAddrs {
            member_id: config.cluster.member_id,
            server_url: server_url.clone(),
            control_addr,
            grpc_addr: grpc_listener.as_ref().and_then(local),
            metrics_addr: metrics_listener.as_ref().and_then(local),
            stun_addr: stun_socket.as_ref().and_then(|s| s.local_addr().ok()),
            cluster_addr,
            socket: v.unix_socket.clone(),
            pid: std::process::id(),
        };

        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let raft_stop = CancellationToken::new();
        let raft_tasks = TaskTracker::new();
        let member_id = config.cluster.member_id;
        let member = MemberInfo {
            name: config
                .cluster
                .name
                .clone()
                .unwrap_or_else(|| format!("m{member_id}")),
            raft_addr: config
                .cluster
                .advertise_addr
                .clone()
                .unwrap_or_else(|| cluster_addr.to_string()),
            control_url: server_url.clone(),
            region_id: Some(config.derp.server.region_id),
        };
        let initial_members: BTreeMap<u64, MemberInfo> = if config.cluster.members.is_empty() {
            BTreeMap::from([(member_id, member.clone())])
        } else {
            config
                .cluster
                .members
                .iter()
                .map(|m| {
                    let info = MemberInfo {
                        name: format!("m{}", m.id),
                        raft_addr: m.address.clone(),
                        control_url: m.control_url.clone().unwrap_or_default(),
                        region_id: Some(m.region_id.unwrap_or(config.derp.server.region_id)),
                    };
                    (
                        m.id,
                        if m.id == member_id {
                            member.clone()
                        } else {
                            info
                        },
                    )
                })
                .collect()
        };
        let tls = match (
            &config.cluster.tls.ca_cert_path,
            &config.cluster.tls.cert_path,
            &config.cluster.tls.key_path,
        ) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(crate::raft::tls::MemberTls::load(ca, cert, key)?)
            }
            _ => None,
        };
        let server_tls = tls.as_ref().map(|t| t.server.clone());
        let presence = Presence::new(member_id);
        // Client-facing work (control sessions, DERP) stops on `drain` as well as on `stop`;
        // the HTTP listener, admin API and Raft keep running while draining.
        let drain = stop.child_token();
        let cluster = Cluster::start(
            ClusterOptions {
                member_id,
                member,
                data_dir: config.data_dir.clone(),
                settings: RegistrySettings {
                    prefix_v4: v.prefix_v4,
                    prefix_v6: v.prefix_v6,
                },
                initial_members,
                election_timeout_min_ms: config.cluster.election_timeout.0.as_millis() as u64,
                heartbeat_ms: config.cluster.heartbeat_interval.0.as_millis() as u64,
                snapshot_every_logs: config.cluster.snapshot_every,
                presence: presence.clone(),
                version: VERSION,
                tls,
                drain: drain.clone(),
            },
            raft_stop.clone(),
            raft_tasks.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(Box::new(e)))?;

        let metrics = Arc::new(Metrics::new());
        let stun_port = addrs.stun_addr.map(|a| a.port() as i32).unwrap_or(-1);
        let (topology_tx, topology_rx) = tokio::sync::watch::channel(Arc::new(topology(
            &config,
            member_id,
            &server_url,
            stun_port,
        )));
        let settings = Arc::new(ControlSettings {
            member_id,
            server_url: server_url.clone(),
            base_domain: config.dns.base_domain.clone(),
            magic_dns: config.dns.magic_dns,
            nameservers: config.dns.nameservers.global.clone(),
            search_domains: config.dns.search_domains.clone(),
            topology: topology_rx,
            auto_approve: config.node_approval == NodeApproval::Auto,
            node_key_expiry: (!config.node.expiry.0.is_zero()).then_some(config.node.expiry.0),
            registration_timeout: Duration::from_secs(15 * 60),
            ephemeral_inactivity_timeout: config.ephemeral_node_inactivity_timeout.0,
        });
        let control_deps = ControlDeps {
            cluster: cluster.clone(),
            presence: presence.clone(),
            keys: Arc::new(ServerKeys::new(noise_private)),
            settings: settings.clone(),
            metrics: metrics.clone(),
            stop: drain.clone(),
            tasks: tasks.clone(),
        };
        let derp = DerpServer::new(derp_private, Some(mesh_key), drain.clone(), tasks.clone());
        if config.derp.server.verify_clients {
            // Only registered nodes may relay through us (headscale's `verify_clients`).
            let registry = cluster.clone();
            derp.set_client_verifier(Box::new(move |key| {
                registry
                    .view()
                    .node_by_key(&crate::registry::NodeKey(*key))
                    .is_some()
            }));
        }
        // The DERP map, dial plan and mesh follow the Raft membership (members added with
        // `hsctl cluster add` included); until this member learns it, the config's list.
        tasks.spawn(follow_membership(
            TopologyInputs {
                config: config.clone(),
                member_id,
                server_url: server_url.clone(),
                stun_port,
            },
            cluster.clone(),
            topology_tx,
            derp.clone(),
            stop.clone(),
        ));

        let admin_deps = crate::admin::AdminDeps {
            cluster: cluster.clone(),
            presence: presence.clone(),
            auto_approve: settings.auto_approve,
            node_key_expiry: settings.node_key_expiry,
            version: VERSION,
        };

        // Control HTTP: /key, /ts2021, DERP, health.
        let app = control_router(control_deps.clone(), derp.clone())
            .merge(crate::admin::rest::router(admin_deps.clone()));
        let control_stop = stop.clone();
        tasks.spawn(async move {
            let serve = axum::serve(
                control_listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { control_stop.cancelled().await });
            if let Err(error) = serve.await {
                tracing::error!(%error, "control listener failed");
            }
        });

        if let Some(listener) = metrics_listener {
            let metrics = metrics.clone();
            let derp = derp.clone();
            let app = Router::new().route(
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
            );
            let metrics_stop = stop.clone();
            tasks.spawn(async move {
                let serve = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { metrics_stop.cancelled().await });
                if let Err(error) = serve.await {
                    tracing::error!(%error, "metrics listener failed");
                }
            });
        }

        if let Some(socket) = stun_socket {
            tasks.spawn(crate::derp::stun::serve(socket, stop.clone()));
        }

        tasks.spawn(crate::admin::serve_unix(
            v.unix_socket.clone(),
            v.unix_socket_mode,
            admin_deps.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        if let Some(listener) = grpc_listener {
            tasks.spawn(crate::admin::serve_tcp(listener, admin_deps, stop.clone()));
        }

        // Member-to-member gRPC (Raft). Runs until Raft itself stops, after client traffic.
        let raft_service = cluster.grpc_service();
        let raft_stop_serve = raft_stop.clone();
        raft_tasks.spawn(async move {
            let incoming = tokio_stream_from(cluster_listener);
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = server_tls {
                builder = match builder.tls_config(tls) {
                    Ok(b) => b,
                    Err(error) => {
                        tracing::error!(%error, "member-to-member TLS settings rejected");
                        return;
                    }
                };
            }
            let result = builder
                .add_service(raft_service)
                .serve_with_incoming_shutdown(incoming, raft_stop_serve.cancelled())
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "member-to-member listener failed");
            }
        });

        tasks.spawn(ephemeral_gc(control_deps.clone()));
        tasks.spawn(refresh_gauges(
            cluster.clone(),
            metrics.clone(),
            stop.clone(),
        ));

        tracing::info!(
            member.id = member_id,
            control = %control_addr,
            server_url = %server_url,
            version = VERSION,
            "hsd member started"
        );
        Ok(RunningServer {
            addrs,
            stop,
            tasks,
            raft_stop,
            raft_tasks,
            cluster,
            grace: config.shutdown_grace.0,
        })
    }
}

fn create_data_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// What the DERP map, dial plan and mesh are computed from.
struct TopologyInputs {
    config: Config,
    member_id: u64,
    server_url: String,
    stun_port: i32,
}

/// The config with `cluster.members` replaced by the Raft membership, when known (empty =
/// not yet: the configured list stands in).
fn with_members(config: &Config, members: &BTreeMap<u64, MemberInfo>) -> Config {
    let mut config = config.clone();
    if !members.is_empty() {
        let configured = |id: u64| config.cluster.members.iter().find(|m| m.id == id).cloned();
        config.cluster.members = members
            .iter()
            .map(|(id, m)| {
                // Region names are not replicated; keep the configured ones where known.
                let known = configured(*id);
                crate::config::ClusterMemberConfig {
                    id: *id,
                    address: m.raft_addr.clone(),
                    control_url: (!m.control_url.is_empty()).then(|| m.control_url.clone()),
                    region_id: m.region_id,
                    region_code: known.as_ref().and_then(|k| k.region_code.clone()),
                    region_name: known.and_then(|k| k.region_name),
                }
            })
            .collect();
        if config.cluster.members.len() == 1 {
            config.cluster.members.clear();
        }
    }
    config
}

/// The DERP map and dial plan for `config`'s members (see `with_members`).
fn topology(config: &Config, member_id: u64, server_url: &str, stun_port: i32) -> Topology {
    Topology {
        derp: if config.derp.server.enabled {
            derp_regions(config, member_id, server_url, stun_port)
        } else {
            Vec::new()
        },
        dial_plan: dial_plan(config, member_id, server_url),
    }
}

/// Recomputes the topology whenever the Raft membership changes; meshes with new members.
async fn follow_membership(
    inputs: TopologyInputs,
    cluster: Cluster,
    tx: tokio::sync::watch::Sender<Arc<Topology>>,
    derp: Arc<DerpServer>,
    stop: CancellationToken,
) {
    let mut metrics = cluster.metrics();
    let mut last: Option<BTreeMap<u64, MemberInfo>> = None;
    loop {
        let members: BTreeMap<u64, MemberInfo> = metrics
            .borrow_and_update()
            .membership_config
            .nodes()
            .map(|(id, m)| (*id, m.clone()))
            .collect();
        // The first round runs even with no membership yet: the config's list stands in.
        if last.as_ref() != Some(&members) {
            let config = with_members(&inputs.config, &members);
            let t = topology(
                &config,
                inputs.member_id,
                &inputs.server_url,
                inputs.stun_port,
            );
            if config.derp.server.enabled {
                derp.start_mesh(mesh_peers(&config, inputs.member_id));
            }
            if last.as_ref().is_some_and(|l| !l.is_empty()) {
                tracing::info!(
                    members = members.len(),
                    "membership changed; clients get a new DERP map and dial plan"
                );
            }
            // Sessions resend a full map only when what clients see really changed.
            tx.send_if_modified(|cur| {
                let changed = **cur != t;
                if changed {
                    *cur = Arc::new(t);
                }
                changed
            });
            last = Some(members);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

/// The cluster's DERP regions, one node per member, this member's region and node first.
/// Members of one region are nodes of one DERP region (not a region each): a client homes
/// on the member it talks to, and when that relay dies its reconnect walks on to the next
/// node of the same region at once, with no control round trip, while the mesh keeps every
/// member's clients reachable. Members configured in other regions form their own regions.
fn derp_regions(
    config: &Config,
    member_id: u64,
    server_url: &str,
    stun_port: i32,
) -> Vec<DerpRegionInfo> {
    let own = &config.derp.server;
    let node = |id: u64, region_id: i32, url: &str, ipv4: Option<&String>| {
        let host = url_host(url);
        let ipv4 = ipv4.cloned().unwrap_or_else(|| {
            if host.parse::<std::net::Ipv4Addr>().is_ok() {
                host.clone()
            } else {
                String::new()
            }
        });
        DerpNodeInfo {
            name: format!("{region_id}{id}"),
            host,
            ipv4,
            derp_port: url_port(url).unwrap_or(if url.starts_with("https://") { 443 } else { 80 }),
            stun_port,
        }
    };
    let mut regions = vec![DerpRegionInfo {
        region_id: own.region_id,
        region_code: own.region_code.clone(),
        region_name: own.region_name.clone(),
        nodes: vec![node(
            member_id,
            own.region_id,
            server_url,
            own.ipv4.as_ref(),
        )],
    }];
    for m in &config.cluster.members {
        let Some(url) = m.control_url.as_ref().filter(|_| m.id != member_id) else {
            continue;
        };
        let region_id = m.region_id.unwrap_or(own.region_id);
        let pos = match regions.iter().position(|r| r.region_id == region_id) {
            Some(pos) => pos,
            None => {
                regions.push(DerpRegionInfo {
                    region_id,
                    region_code: m
                        .region_code
                        .clone()
                        .unwrap_or_else(|| format!("r{region_id}")),
                    region_name: m
                        .region_name
                        .clone()
                        .unwrap_or_else(|| format!("region {region_id}")),
                    nodes: Vec::new(),
                });
                regions.len() - 1
            }
        };
        regions[pos].nodes.push(node(m.id, region_id, url, None));
    }
    regions
}

/// The DERP URLs of the other members of this member's region, whose relays this one meshes
/// with. Other regions are reached by clients directly, not through the mesh.
fn mesh_peers(config: &Config, member_id: u64) -> Vec<String> {
    let own_region = config.derp.server.region_id;
    config
        .cluster
        .members
        .iter()
        .filter(|m| m.id != member_id && m.region_id.unwrap_or(own_region) == own_region)
        .filter_map(|m| {
            m.control_url
                .as_ref()
                .map(|u| format!("{}/derp", u.trim_end_matches('/')))
        })
        .collect()
}

/// A dial plan listing every member's address, this member first and the others after
/// short start delays (v1.90 takes the first success; v1.86 also honours Priority).
/// `DialTimeoutSec` must be above zero, or the candidate always fails.
fn dial_plan(config: &Config, member_id: u64, server_url: &str) -> Option<serde_json::Value> {
    if config.cluster.members.len() < 2 {
        return None;
    }
    let mut others: Vec<String> = config
        .cluster
        .members
        .iter()
        .filter(|m| m.id != member_id)
        .filter_map(|m| m.control_url.as_deref().map(url_host))
        .collect();
    let mut ips = vec![url_host(server_url)];
    ips.append(&mut others);
    let count = ips.len();
    let candidates: Vec<serde_json::Value> = ips
        .into_iter()
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .enumerate()
        .map(|(i, ip)| {
            serde_json::json!({
                "IP": ip,
                "DialStartDelaySec": 0.25 * i as f64,
                "DialTimeoutSec": 2.0,
                "Priority": (count - i) as i64,
            })
        })
        .collect();
    (!candidates.is_empty()).then(|| serde_json::json!({ "Candidates": candidates }))
}

fn url_host(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6).to_string();
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
        .to_string()
}

fn url_port(url: &str) -> Option<u16> {
    let rest = url.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    let port = authority.rsplit_once(':')?.1;
    port.parse().ok()
}

/// Adapts a listener to the stream of connections tonic's `serve_with_incoming` takes.
fn tokio_stream_from(
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

#[derive(Clone)]
struct HttpState {
    control: ControlDeps,
    derp: Arc<DerpServer>,
}

fn control_router(control: ControlDeps, derp: Arc<DerpServer>) -> Router {
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
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/register/{auth_id}", get(register_page))
        .with_state(state)
        .merge(inner)
}

/// Ready when this member knows a leader and so can serve writes (directly or forwarded).
async fn ready(State(s): State<HttpState>) -> Response {
    if s.control.cluster.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let leader = s.control.cluster.metrics().borrow().current_leader;
    match leader {
        Some(id) => (StatusCode::OK, format!("ready (leader {id})\n")).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no leader\n").into_response(),
    }
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

/// Removes ephemeral nodes that have been offline longer than the inactivity timeout.
/// Only the leader proposes, so members do not race to delete the same nodes.
async fn ephemeral_gc(deps: ControlDeps) {
    let mut tick = tokio::time::interval(EPHEMERAL_GC_INTERVAL);
    loop {
        tokio::select! {
            () = deps.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let is_leader =
            deps.cluster.metrics().borrow().current_leader == Some(deps.cluster.member_id());
        if !is_leader {
            continue;
        }
        let timeout_ms = deps.settings.ephemeral_inactivity_timeout.as_millis() as i64;
        let now = Timestamp::now();
        let view = deps.cluster.view();
        if !view.nodes().any(|n| n.ephemeral) {
            continue;
        }
        // Sessions on every reachable member, not just this one.
        let online = deps.presence.sessions();
        let stale: Vec<_> = view
            .nodes()
            .filter(|n| n.ephemeral && !online.contains_key(&n.id))
            .filter(|n| n.last_seen.unwrap_or(n.created_at).plus_millis(timeout_ms) <= now)
            .map(|n| n.id)
            .collect();
        if stale.is_empty() {
            continue;
        }
        match deps
            .cluster
            .propose(Command::DeleteNodes { ids: stale.clone() })
            .await
        {
            Ok(_) => tracing::info!(count = stale.len(), "removed inactive ephemeral nodes"),
            Err(error) => tracing::warn!(%error, "could not remove inactive ephemeral nodes"),
        }
    }
}

async fn refresh_gauges(cluster: Cluster, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_REFRESH_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = cluster.metrics().borrow().clone();
        metrics
            .raft_applied_index
            .set(m.last_applied.map(|l| l.index as i64).unwrap_or(0));
        metrics
            .raft_is_leader
            .set(i64::from(m.current_leader == Some(cluster.member_id())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_two_regions_make_two_derp_regions_meshed_inside() {
        let yaml = r#"
derp:
  server:
    region_id: 900
    region_code: eu
cluster:
  member_id: 1
  members:
    - { id: 1, address: "10.0.0.1:50444", control_url: "http://10.0.0.1:8080" }
    - { id: 2, address: "10.0.0.2:50444", control_url: "http://10.0.0.2:8080" }
    - { id: 3, address: "10.1.0.3:50444", control_url: "http://10.1.0.3:8080", region_id: 901, region_code: us }
"#;
        let config = Config::from_yaml(yaml).unwrap();
        let regions = derp_regions(&config, 1, "http://10.0.0.1:8080", 3478);
        assert_eq!(regions.len(), 2);
        assert_eq!((regions[0].region_id, regions[0].nodes.len()), (900, 2));
        assert_eq!(
            regions[0].nodes[0].ipv4, "10.0.0.1",
            "this member's node first"
        );
        assert_eq!(
            (
                regions[1].region_id,
                regions[1].region_code.as_str(),
                regions[1].nodes.len()
            ),
            (901, "us", 1)
        );
        assert_eq!(
            mesh_peers(&config, 1),
            vec!["http://10.0.0.2:8080/derp".to_string()]
        );
        let plan = dial_plan(&config, 1, "http://10.0.0.1:8080").unwrap();
        assert_eq!(
            plan["Candidates"].as_array().unwrap().len(),
            3,
            "the dial plan names every member"
        );
    }

    #[test]
    fn url_parts() {
        assert_eq!(url_host("http://127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(url_port("http://127.0.0.1:8080"), Some(8080));
        assert_eq!(url_host("https://hs.example.com"), "hs.example.com");
        assert_eq!(url_port("https://hs.example.com"), None);
        assert_eq!(url_host("http://[::1]:80"), "::1");
    }
}

//! The only module that knows every other: loads keys, binds every listener, starts Raft,
//! the control plane, DERP, STUN, the admin API and metrics, supervises them, and shuts
//! them down in order.

mod background;
mod control_tls;
mod http;
mod listeners;
mod login;
pub mod supervisor;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminDeps;
use crate::config::{Config, ConfigError, NodeApproval, Validated};
use crate::control::map::hub::MapHub;
use crate::control::{self, ControlDeps, ControlSettings, ServerKeys, Topology};
use crate::derp::region::TopologyInputs;
use crate::derp::server::DerpServer;
use crate::presence::Presence;
use crate::raft::{Cluster, ClusterOptions, MemberInfo};
use crate::registry::ClusterSettings;
use crate::telemetry::Metrics;

pub use listeners::BoundAddrs;
use listeners::Listeners;
pub use supervisor::Failure;
use supervisor::Supervisor;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The version as `hsd --version` prints it; test builds say they carry fault hooks.
pub const VERSION_LONG: &str = if cfg!(feature = "fault-injection") {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (test build with fault-injection hooks)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

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
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the Raft member")]
    Raft(#[source] crate::raft::StartError),
    #[error("the admin unix socket (unix_socket)")]
    AdminSocket(#[source] crate::admin::BindError),
    #[error("starting the Raft runtime")]
    Runtime(#[source] std::io::Error),
    #[error("loading the member TLS files (cluster.tls)")]
    Tls(#[from] crate::raft::tls::TlsError),
    #[error("loading the control port's TLS files (tls_cert_path, tls_key_path)")]
    ControlTls(#[from] control_tls::ControlTlsError),
    #[error("setting up OIDC (oidc.*)")]
    Oidc(#[from] crate::oidc::SetupError),
}

impl StartError {
    /// A config problem (restarting will not help): exit with the config code.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            StartError::Config(_)
                | StartError::KeyFile(control::keys::KeyFileError::Missing { .. })
                | StartError::ControlTls(_)
                | StartError::Oidc(_)
                | StartError::Raft(crate::raft::StartError::SettingsMismatch { .. })
        )
    }
}

/// Cancellation tokens and task trackers: client-facing work and the admin API stop first,
/// Raft and the member-to-member service last.
struct Lifecycle {
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Client-facing work (control sessions, DERP) stops on `drain` as well as on `stop`;
    /// the HTTP listener, admin API and Raft keep running while draining.
    drain: CancellationToken,
    raft_stop: CancellationToken,
    raft_tasks: TaskTracker,
    /// Raft, its storage and the member-to-member service run on a runtime of their own,
    /// so heartbeats and elections keep time while thousands of clients reconnect.
    raft_runtime: SideRuntime,
    /// The admin API (gRPC on the unix socket and TCP) likewise: `hsctl` keeps answering
    /// while a reconnect storm keeps the client-facing workers busy.
    admin_runtime: SideRuntime,
    supervisor: Supervisor,
}

/// A runtime with one worker thread of its own, beside the client-facing one (the OS
/// shares the cores between their threads, so its tasks never queue behind thousands of
/// client sessions); shut down without blocking when dropped (a runtime dropped inside
/// another's async context would panic).
struct SideRuntime {
    name: &'static str,
    runtime: Option<tokio::runtime::Runtime>,
}

impl SideRuntime {
    fn start(name: &'static str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(SideRuntime {
            name,
            runtime: Some(runtime),
        })
    }

    /// `task` run on this runtime, as a future the caller awaits anywhere; a panic in it
    /// resumes in the caller (so the supervisor sees it).
    fn run<T: Send + 'static>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> impl std::future::Future<Output = T> + Send + 'static {
        let runtime = self.runtime.as_ref().expect("running until dropped");
        let name = self.name;
        let handle = runtime.spawn(task);
        async move {
            match handle.await {
                Ok(value) => value,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(error) => panic!("task on the {name} runtime cancelled: {error}"),
            }
        }
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Lifecycle {
    fn new() -> Result<Self, StartError> {
        let stop = CancellationToken::new();
        Ok(Lifecycle {
            drain: stop.child_token(),
            supervisor: Supervisor::new(stop.clone()),
            stop,
            tasks: TaskTracker::new(),
            raft_stop: CancellationToken::new(),
            raft_tasks: TaskTracker::new(),
            // Started from the calling thread, whose priority their threads inherit: `hsd`
            // calls this from its main thread, which keeps the normal priority while the
            // client-facing workers run below it (see `below_raft_and_admin` in hsd.rs).
            raft_runtime: SideRuntime::start("hsd-raft").map_err(StartError::Runtime)?,
            admin_runtime: SideRuntime::start("hsd-admin").map_err(StartError::Runtime)?,
        })
    }
}

pub struct RunningServer {
    addrs: BoundAddrs,
    life: Lifecycle,
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

    /// Resolves when the member stops on its own (see `failure`).
    pub async fn stopped(&self) {
        self.life.stop.cancelled().await
    }

    /// Why the member stopped on its own, if it did.
    pub fn failure(&self) -> Option<Failure> {
        self.life.supervisor.failure()
    }

    /// Stops accepting, ends map streams and DERP links (clients move to another member),
    /// waits for every task within the grace period, then stops Raft and closes storage.
    /// Returns the failure that stopped the member, if any.
    pub async fn shutdown(self) -> Option<Failure> {
        tracing::info!("shutting down");
        let life = self.life;
        life.stop.cancel();
        life.tasks.close();
        if tokio::time::timeout(self.grace, life.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "tasks still running after the grace period");
        }
        self.cluster.shutdown().await;
        life.raft_stop.cancel();
        life.raft_tasks.close();
        if tokio::time::timeout(self.grace, life.raft_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("raft tasks still running after the grace period");
        }
        tracing::info!("stopped");
        life.supervisor.failure()
    }
}

pub struct Server;

impl Server {
    /// Validates config, loads keys, binds every listener, starts every subsystem.
    pub async fn start(config: Config) -> Result<RunningServer, StartError> {
        let v = config.validate()?;
        create_data_dir(&config.data_dir)?;
        let control_tls = match (&config.tls_cert_path, &config.tls_key_path) {
            (Some(cert), Some(key)) => Some(control_tls::ControlTls::load(cert, key)?),
            _ => None,
        };
        let keys = MemberKeys::load(&config, &v)?;
        let oidc = login::oidc_login(&config.oidc, &keys.noise)?;
        let console_oidc = oidc.as_ref().map(|o| o.rp.clone());
        let listeners = Listeners::bind(&config, &v, control_tls, oidc).await?;
        let addrs = listeners.addrs(&config, &v);
        let life = Lifecycle::new()?;
        let presence = Presence::new(config.cluster.member_id);
        let cluster = start_cluster(&config, &v, &addrs, &presence, &life).await?;
        let metrics = Arc::new(Metrics::new());
        let (topology, derp) = start_derp(&config, &addrs, keys.derp, keys.mesh, &cluster, &life);
        derp.set_connect_limit(crate::limit::RateLimiter::new(
            "derp_connects_per_minute",
            config.limits.derp_connects_per_minute,
            metrics.limit_refusals.clone(),
        ));
        let settings = Arc::new(control_settings(&config, &addrs, topology));
        let (hub, hub_handle) = MapHub::new(cluster.feed(), presence.clone(), settings.clone());
        life.tasks.spawn(hub.run(life.stop.clone()));
        let control = ControlDeps {
            cluster: cluster.clone(),
            presence: presence.clone(),
            keys: Arc::new(ServerKeys::new(keys.noise)),
            settings,
            hub: hub_handle,
            metrics: metrics.clone(),
            limits: Arc::new(control::ControlLimits::new(&config.limits, &metrics)),
            node_info_writes: Arc::default(),
            stop: life.drain.clone(),
            tasks: life.tasks.clone(),
        };
        let failed_auth = crate::admin::audit::FailedAuth::start(
            cluster.clone(),
            metrics.audit_dropped.clone(),
            crate::limit::RateLimiter::new(
                "failed_admin_auth_per_minute",
                config.limits.failed_admin_auth_per_minute,
                metrics.limit_refusals.clone(),
            ),
            life.stop.clone(),
            &life.tasks,
        );
        let admin = AdminDeps {
            cluster: cluster.clone(),
            presence,
            auto_approve: control.settings.auto_approve,
            node_key_expiry: control.settings.node_key_expiry,
            version: VERSION,
            failed_auth,
            max_concurrent_streams: config.limits.max_concurrent_streams,
            access: control.settings.access.clone(),
            server_url: control.settings.server_url.clone(),
            policy_file: config.policy_file().map(Into::into),
            oidc: console_oidc,
        };
        listeners.serve(
            &life,
            &cluster,
            control.clone(),
            admin,
            derp.clone(),
            metrics.clone(),
        );
        if let Some(path) = config.policy_file() {
            life.tasks.spawn(background::follow_policy_file(
                cluster.clone(),
                control.presence.clone(),
                path.to_path_buf(),
                life.stop.clone(),
            ));
        }
        spawn_background(&life, &cluster, control, metrics);
        life.tasks.spawn(background::prune_audit(
            cluster.clone(),
            config.audit.clone(),
            life.stop.clone(),
        ));
        tracing::info!(
            member.id = addrs.member_id,
            control = %addrs.control_addr,
            server_url = %addrs.server_url,
            version = VERSION,
            "hsd member started"
        );
        Ok(RunningServer {
            addrs,
            life,
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

/// The member's long-lived keys.
struct MemberKeys {
    noise: [u8; 32],
    derp: [u8; 32],
    mesh: [u8; 32],
}

impl MemberKeys {
    /// A one-member cluster generates missing keys on first start. A member of a larger
    /// cluster must be given the shared Noise and mesh keys: one it generated itself would
    /// split the cluster (clients pin the Noise key; relays check the mesh key).
    fn load(config: &Config, v: &Validated) -> Result<MemberKeys, StartError> {
        use control::keys::{load_existing, load_or_generate};
        let shared = config.cluster.members.len() > 1;
        let load_shared = |path: &std::path::Path, prefix, key: &'static str| {
            if shared {
                load_existing(path, prefix, key)
            } else {
                load_or_generate(path, prefix)
            }
        };
        Ok(MemberKeys {
            noise: load_shared(&v.noise_key_path, "privkey:", "noise.private_key_path")?,
            derp: load_or_generate(&v.derp_key_path, "privkey:")?,
            mesh: load_shared(&v.mesh_key_path, "", "derp.server.mesh_key_path")?,
        })
    }
}

/// This member's Raft identity and the initial members of a new cluster.
fn members(config: &Config, addrs: &BoundAddrs) -> (MemberInfo, BTreeMap<u64, MemberInfo>) {
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
            .unwrap_or_else(|| addrs.cluster_addr.to_string()),
        control_url: addrs.server_url.clone(),
        region_id: Some(config.derp.server.region_id),
    };
    if config.cluster.members.is_empty() {
        return (member.clone(), BTreeMap::from([(member_id, member)]));
    }
    let initial = config
        .cluster
        .members
        .iter()
        .map(|m| {
            let info = if m.id == member_id {
                member.clone()
            } else {
                MemberInfo {
                    name: format!("m{}", m.id),
                    raft_addr: m.address.clone(),
                    control_url: m.control_url.clone().unwrap_or_default(),
                    region_id: Some(m.region_id.unwrap_or(config.derp.server.region_id)),
                }
            };
            (m.id, info)
        })
        .collect();
    (member, initial)
}

/// The member-to-member TLS settings: from `cluster.tls`, or — for a one-member cluster
/// without it (validation refuses a larger one) — a CA and certificate this member makes in
/// its data dir on first start.
fn member_tls(config: &Config) -> Result<crate::raft::tls::MemberTls, StartError> {
    use crate::raft::tls;
    let t = &config.cluster.tls;
    let (ca, cert, key) = match (&t.ca_cert_path, &t.cert_path, &t.key_path) {
        (Some(ca), Some(cert), Some(key)) => (ca.clone(), cert.clone(), key.clone()),
        _ => tls::provision_default(&config.data_dir, config.cluster.member_id)?,
    };
    Ok(tls::MemberTls::load(&ca, &cert, &key)?)
}

async fn start_cluster(
    config: &Config,
    v: &Validated,
    addrs: &BoundAddrs,
    presence: &Presence,
    life: &Lifecycle,
) -> Result<Cluster, StartError> {
    let tls = member_tls(config)?;
    let (member, initial_members) = members(config, addrs);
    // Started on the Raft runtime: openraft, the batcher, the forwarder and presence
    // exchange spawn their tasks there.
    let cluster = life
        .raft_runtime
        .run(Cluster::start(
            ClusterOptions {
                member_id: config.cluster.member_id,
                member,
                data_dir: config.data_dir.clone(),
                settings: ClusterSettings {
                    prefix_v4: v.prefix_v4,
                    prefix_v6: v.prefix_v6,
                    base_domain: config.dns.base_domain.clone(),
                },
                initial_members,
                election_timeout_min_ms: config.cluster.election_timeout.0.as_millis() as u64,
                heartbeat_ms: config.cluster.heartbeat_interval.0.as_millis() as u64,
                snapshot_every_logs: config.cluster.snapshot_every,
                presence: presence.clone(),
                version: VERSION,
                tls,
                drain: life.drain.clone(),
            },
            life.raft_stop.clone(),
            life.raft_tasks.clone(),
        ))
        .await
        .map_err(StartError::Raft)?;
    let supervisor = &life.supervisor;
    life.tasks
        .spawn(supervisor.clone().watch_raft(cluster.clone()));
    life.tasks
        .spawn(supervisor.clone().record_settings(cluster.clone()));
    Ok(cluster)
}

/// The DERP relay (verifying clients against the registry) and the topology it and the
/// control plane follow.
fn start_derp(
    config: &Config,
    addrs: &BoundAddrs,
    derp_private: [u8; 32],
    mesh_key: [u8; 32],
    cluster: &Cluster,
    life: &Lifecycle,
) -> (tokio::sync::watch::Receiver<Arc<Topology>>, Arc<DerpServer>) {
    let inputs = TopologyInputs {
        config: config.clone(),
        member_id: config.cluster.member_id,
        server_url: addrs.server_url.clone(),
        stun_port: addrs.stun_addr.map(|a| a.port() as i32).unwrap_or(-1),
    };
    let (initial, _) = inputs.topology(&[]);
    let (topology_tx, topology_rx) = tokio::sync::watch::channel(Arc::new(initial));
    let derp = DerpServer::new(
        derp_private,
        Some(mesh_key),
        life.drain.clone(),
        life.tasks.clone(),
    );
    derp.set_mesh_verifier(mesh_verifier(cluster.clone()));
    life.tasks.spawn(background::pin_derp_key(
        cluster.clone(),
        derp.public_key(),
        life.stop.clone(),
    ));
    if config.derp.server.verify_clients {
        // Only valid node keys may relay through us (headscale's `verify_clients`, plus
        // expiry and approval), and a key that stops being valid is cut off at once.
        let registry = cluster.clone();
        derp.set_client_verifier(Box::new(move |key| {
            let now = crate::registry::Timestamp::now();
            registry
                .view()
                .node_by_key(&crate::registry::NodeKey(*key))
                .is_some_and(|node| node.approved && !node.is_expired(now))
        }));
        life.tasks.spawn(background::guard_relay(
            cluster.clone(),
            derp.clone(),
            life.stop.clone(),
        ));
    }
    // The DERP map, dial plan and mesh follow the Raft membership (members added with
    // `hsctl cluster add` included); until this member learns it, the config's list.
    life.tasks.spawn(background::follow_membership(
        inputs,
        cluster.clone(),
        topology_tx,
        derp.clone(),
        life.stop.clone(),
    ));
    (topology_rx, derp)
}

/// A mesh peer must present the DERP key a current member pinned. A member that has not
/// pinned one (still starting, or running an older release during an upgrade) is taken on
/// the mesh key alone until it does, and so is everyone while this member has not learned
/// the membership yet (it has no clients to protect then).
fn mesh_verifier(cluster: Cluster) -> crate::derp::server::ClientVerifier {
    Box::new(move |key| {
        let view = cluster.view();
        let members = cluster.member_ids();
        let mut unpinned = members.is_empty();
        for id in members {
            match view.member_derp_key(id) {
                Some(k) if k == key => return true,
                Some(_) => {}
                None => unpinned = true,
            }
        }
        unpinned
    })
}

fn control_settings(
    config: &Config,
    addrs: &BoundAddrs,
    topology: tokio::sync::watch::Receiver<Arc<Topology>>,
) -> ControlSettings {
    ControlSettings {
        member_id: config.cluster.member_id,
        server_url: addrs.server_url.clone(),
        base_domain: config.dns.base_domain.clone(),
        magic_dns: config.dns.magic_dns,
        nameservers: config.dns.nameservers.global.clone(),
        search_domains: config.dns.search_domains.clone(),
        topology,
        auto_approve: config.node_approval == NodeApproval::Auto,
        node_key_expiry: (!config.node.expiry.0.is_zero()).then_some(config.node.expiry.0),
        registration_timeout: Duration::from_secs(15 * 60),
        ephemeral_inactivity_timeout: config.ephemeral_node_inactivity_timeout.0,
        max_pending_registrations: config.limits.max_pending_registrations,
        max_hostinfo_bytes: config.limits.max_hostinfo_bytes,
        http_header_timeout: config.limits.http_header_timeout.0,
        access: Default::default(),
    }
}

fn spawn_background(
    life: &Lifecycle,
    cluster: &Cluster,
    control: ControlDeps,
    metrics: Arc<Metrics>,
) {
    let access = control.settings.access.clone();
    life.tasks.spawn(background::ephemeral_gc(control));
    life.tasks.spawn(background::refresh_gauges(
        cluster.clone(),
        access,
        metrics,
        life.stop.clone(),
    ));
    life.tasks.spawn(background::reclaim_memtables(
        cluster.clone(),
        life.stop.clone(),
    ));
}

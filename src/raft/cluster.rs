//! `Cluster`: the handle through which the server writes (`propose`, in `forward.rs`),
//! reads (`view`, this member's applied registry), manages members (`membership.rs`) and
//! reports status (`status.rs`). This file starts it and stops it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batcher::Batcher;
use super::network::Peers;
use super::service::RaftRpc;
use super::store::{self, OpenError};
use super::{AppliedBatch, ClusterOptions, MemberInfo, Raft, RaftMetrics};
use crate::presence::Presence;
use crate::proto::raft::raft_service_server::RaftServiceServer;
use crate::registry::{ClusterSettings, Command, Outcome, Registry, Rejection, Timestamp};

/// Snapshots and catch-up of large registries need more than a heartbeat's time.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 20_000;
/// Log entries per AppendEntries (openraft's default is 300).
const MAX_PAYLOAD_ENTRIES: u64 = 16;
/// Applied batches buffered for the map hub before it must resync.
const BATCH_CHANNEL_CAPACITY: usize = 256;
/// Pause between attempts to record the cluster settings while no leader answers.
const SETTINGS_RETRY: Duration = Duration::from_millis(500);
/// Largest member-to-member message (snapshots of big registries).
const MAX_RPC_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("invalid Raft settings: {0}")]
    Config(String),
    #[error("starting Raft: {0}")]
    Raft(String),
    /// This member's config disagrees with what the cluster recorded on its first start.
    #[error(
        "config {key} is {here} here but {cluster} in the cluster's registry; every member must use the same value"
    )]
    SettingsMismatch {
        key: String,
        here: String,
        cluster: String,
    },
}

#[derive(Clone)]
pub struct Cluster {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) id: u64,
    pub(super) raft: Raft,
    pub(super) peers: Peers,
    pub(super) view: watch::Receiver<Arc<Registry>>,
    /// The last index this member applied.
    pub(super) applied: watch::Receiver<u64>,
    pub(super) batches: broadcast::Sender<Arc<AppliedBatch>>,
    pub(super) batcher: Batcher,
    pub(super) forwarder: super::forwarder::Forwarder,
    pub(super) presence: Presence,
    pub(super) presence_poll_failures: super::presence_sync::PollFailures,
    pub(super) store_memory: store::StoreMemory,
    pub(super) version: &'static str,
    pub(super) settings: ClusterSettings,
    pub(super) server_tls: tonic::transport::ServerTlsConfig,
    pub(super) election_timeout_max: Duration,
    /// Raft's own tasks (shut down after client traffic).
    pub(super) tasks: TaskTracker,
    /// A fast leader-loss campaign is pending (see `leader_seems_gone`).
    pub(super) campaigning: std::sync::atomic::AtomicBool,
    /// When a leader's AppendEntries (entries or heartbeat) last reached this member.
    pub(super) leader_contact: super::membership::LastContact,
    /// Cancelled when Raft stops; ends long polls other members hold open on this one.
    pub(super) stop: CancellationToken,
    pub(super) drain: CancellationToken,
}

impl Cluster {
    /// Opens storage, starts the Raft member and, on the first start of a new cluster,
    /// initialises it (the lowest member id does this; the others join when contacted).
    pub async fn start(
        opts: ClusterOptions,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Cluster, StartError> {
        let (view_tx, view_rx) = watch::channel(Arc::new(Registry::default()));
        let (applied_tx, applied_rx) = watch::channel(0);
        let (batches, _) = broadcast::channel(BATCH_CHANNEL_CAPACITY);
        let data_dir = opts.data_dir.clone();
        let batches_for_store = batches.clone();
        let (log_store, state_machine, store_memory) = tokio::task::spawn_blocking(move || {
            store::open(&data_dir, view_tx, applied_tx, batches_for_store)
        })
        .await
        .map_err(|e| StartError::Raft(e.to_string()))??;
        check_recorded_settings(&view_rx.borrow(), &opts.settings)?;

        let config = raft_config(&opts)?;
        let peers = Peers::new(opts.tls.client.clone());
        let raft = Raft::new(
            opts.member_id,
            Arc::new(config),
            peers.clone(),
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        initialize_if_first(&raft, &peers, &opts).await?;

        let batcher = Batcher::start(raft.clone(), view_rx.clone(), stop.clone(), &tasks);
        let forwarder = super::forwarder::Forwarder::start(
            opts.member_id,
            raft.metrics(),
            peers.clone(),
            stop.clone(),
            &tasks,
        );
        let election_min = opts.election_timeout_min_ms.max(50);
        let cluster = Cluster {
            inner: Arc::new(Inner {
                id: opts.member_id,
                raft,
                peers,
                view: view_rx,
                applied: applied_rx,
                batches,
                batcher,
                forwarder,
                presence: opts.presence,
                presence_poll_failures: Default::default(),
                store_memory,
                version: opts.version,
                settings: opts.settings,
                server_tls: opts.tls.server.clone(),
                election_timeout_max: Duration::from_millis(election_min * 2),
                campaigning: Default::default(),
                leader_contact: Default::default(),
                tasks: tasks.clone(),
                stop: stop.clone(),
                drain: opts.drain.clone(),
            }),
        };
        tasks.spawn(log_leadership(
            cluster.metrics(),
            opts.member_id,
            stop.clone(),
        ));
        tasks.spawn(super::presence_sync::run(
            cluster.clone(),
            stop,
            tasks.clone(),
        ));
        Ok(cluster)
    }

    pub fn member_id(&self) -> u64 {
        self.inner.id
    }

    /// Polls of other members' presence that got no answer: (timed out, refused).
    pub fn presence_poll_failures(&self) -> (u64, u64) {
        self.inner.presence_poll_failures.totals()
    }

    /// Bytes in each column family's memtables (blocking: a few rocksdb property reads).
    pub fn memtable_bytes(&self) -> Vec<(&'static str, u64)> {
        self.inner.store_memory.memtable_bytes()
    }

    /// Flushes memtables that took no write since the previous call (see
    /// `StoreMemory::flush_quiet`). Runs on the blocking pool.
    pub async fn flush_quiet_memtables(
        &self,
        check: store::QuietCheck,
    ) -> (store::QuietCheck, Result<Vec<&'static str>, rocksdb::Error>) {
        let memory = self.inner.store_memory.clone();
        tokio::task::spawn_blocking(move || {
            let mut check = check;
            let flushed = memory.flush_quiet(&mut check);
            (check, flushed)
        })
        .await
        .expect("a memtable flush does not panic")
    }

    /// The ids in the current Raft membership (voters and learners); empty before this
    /// member has joined a cluster.
    pub fn member_ids(&self) -> Vec<u64> {
        let m = self.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub(super) fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    pub(super) fn stopping(&self) -> &CancellationToken {
        &self.inner.stop
    }

    pub(super) fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// The registry as applied on this member.
    pub fn view(&self) -> Arc<Registry> {
        self.inner.view.borrow().clone()
    }

    /// Notified each time the applied registry changes.
    pub fn watch_view(&self) -> watch::Receiver<Arc<Registry>> {
        self.inner.view.clone()
    }

    /// The cluster's time as this member knows it: its own clock, or the latest leader
    /// stamp it applied if that is later. Expiry checks made outside `apply` use this.
    pub fn now(&self) -> Timestamp {
        Timestamp::now().max(self.inner.view.borrow().clock())
    }

    /// The applied registry as consumers follow it.
    pub fn feed(&self) -> super::RegistryFeed {
        super::RegistryFeed {
            view: self.inner.view.clone(),
            batches: self.inner.batches.clone(),
        }
    }

    /// Every applied batch, in order, with what it changed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedBatch>> {
        self.inner.batches.subscribe()
    }

    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// Why Raft stopped on its own (storage failure, fatal state), if it did. A member in
    /// this state must exit: it can neither apply nor vote.
    pub fn fatal(&self) -> Option<String> {
        self.metrics()
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|e| e.to_string())
    }

    /// The TLS settings the member-to-member service must use.
    pub fn server_tls(&self) -> tonic::transport::ServerTlsConfig {
        self.inner.server_tls.clone()
    }

    /// The gRPC service other members call.
    pub fn grpc_service(&self) -> RaftServiceServer<RaftRpc> {
        RaftServiceServer::new(RaftRpc {
            cluster: self.clone(),
        })
        .max_decoding_message_size(MAX_RPC_BYTES)
        .max_encoding_message_size(MAX_RPC_BYTES)
    }

    /// Writes this member's cluster-wide settings into the registry if none are recorded
    /// yet (the cluster's first start), or confirms they match the recorded ones. Retries
    /// until a leader answers; an error names the setting that differs.
    pub async fn record_settings(&self) -> Result<(), StartError> {
        let command = || Command::InitSettings {
            settings: self.inner.settings.clone(),
        };
        loop {
            match self.propose(command()).await {
                Ok(Outcome::Done) => return Ok(()),
                Ok(Outcome::Rejected(Rejection::SettingsMismatch {
                    key,
                    cluster,
                    proposed,
                })) => {
                    return Err(StartError::SettingsMismatch {
                        key,
                        here: proposed,
                        cluster,
                    });
                }
                Ok(other) => {
                    tracing::debug!(?other, "recording cluster settings: unexpected reply")
                }
                Err(error) => tracing::debug!(%error, "recording cluster settings; will retry"),
            }
            tokio::time::sleep(SETTINGS_RETRY).await;
        }
    }

    /// Hands leadership away if this member leads (bounded), then stops Raft.
    pub async fn shutdown(&self) {
        let m = self.metrics().borrow().clone();
        let others = m.membership_config.voter_ids().any(|v| v != self.inner.id);
        if m.current_leader == Some(self.inner.id) && others && m.running_state.is_ok() {
            match tokio::time::timeout(self.hand_over_bound(), self.hand_over(None)).await {
                Ok(super::LeaderReply::Done(_)) => tracing::info!("leadership handed over"),
                Ok(other) => tracing::warn!(?other, "leadership hand-over failed"),
                Err(_) => tracing::warn!("leadership hand-over timed out"),
            }
        }
        if let Err(error) = self.inner.raft.shutdown().await {
            tracing::warn!(%error, "raft shutdown");
        }
    }
}

fn raft_config(opts: &ClusterOptions) -> Result<Config, StartError> {
    let election_min = opts.election_timeout_min_ms.max(50);
    Config {
        cluster_name: "hsd".into(),
        election_timeout_min: election_min,
        election_timeout_max: election_min * 2,
        heartbeat_interval: opts.heartbeat_ms.clamp(10, election_min / 2),
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every_logs.max(100)),
        // openraft 0.9 gives each AppendEntries one heartbeat interval to answer: a lagging
        // follower on a loaded machine must be able to write a payload in that time, or it
        // never catches up (entries are group-committed batches of up to 512 writes).
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        // Entries kept behind a snapshot, so a briefly lagging follower catches up from
        // the log instead of a full snapshot.
        max_in_snapshot_log_to_keep: 50,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Config(e.to_string()))
}

/// Refuses to start when the data dir records settings other than this member's config.
fn check_recorded_settings(view: &Registry, mine: &ClusterSettings) -> Result<(), StartError> {
    match view
        .settings()
        .and_then(|recorded| mine.first_difference(recorded))
    {
        Some((key, here, cluster)) => Err(StartError::SettingsMismatch {
            key: key.into(),
            here,
            cluster,
        }),
        None => Ok(()),
    }
}

/// On the first start of a new cluster, the lowest member id initialises it.
async fn initialize_if_first(
    raft: &Raft,
    peers: &Peers,
    opts: &ClusterOptions,
) -> Result<(), StartError> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    let first = opts.initial_members.keys().next().copied();
    if initialized {
        return Ok(());
    }
    if first != Some(opts.member_id) {
        tracing::info!("waiting to be contacted by the cluster leader");
        return Ok(());
    }
    // A wiped first member must not found a second cluster beside the running one: if
    // any other member already has a term or a leader, wait to be contacted instead.
    if opts.initial_members.len() > 1
        && super::status::cluster_already_running(peers, opts.member_id, &opts.initial_members)
            .await
    {
        tracing::info!(
            "the cluster already runs without this member's data; waiting for the leader to catch it up"
        );
        return Ok(());
    }
    tracing::info!(
        members = opts.initial_members.len(),
        "initialising a new cluster"
    );
    let members: BTreeMap<u64, MemberInfo> = opts.initial_members.clone();
    if let Err(error) = raft.initialize(members).await {
        // Another start already initialised it: harmless.
        tracing::warn!(%error, "cluster initialisation skipped");
    }
    Ok(())
}

async fn log_leadership(
    mut metrics: watch::Receiver<RaftMetrics>,
    me: u64,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if leader != last {
            match leader {
                Some(l) if l == me => {
                    tracing::info!(member.id = me, "this member is now the leader")
                }
                Some(l) => tracing::info!(leader = l, "following leader"),
                None => tracing::warn!("no leader known"),
            }
            last = leader;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

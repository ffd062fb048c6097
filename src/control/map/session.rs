//! One streaming map session (long poll): a full netmap first, then deltas built from this
//! member's applied changes and presence, coalesced per short tick, plus keep-alives.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use super::build::{self, MapContext};
use crate::control::ControlDeps;
use crate::control::policy;
use crate::control::tailcfg::MapResponse;
use crate::presence::PresenceChange;
use crate::raft::AppliedBatch;
use crate::registry::{Change, Command, NodeId, UserId};

/// The client abandons a map poll that stays silent for 120 s (watchdogTimeout in
/// tailscale's controlclient) and expects a keep-alive about once a minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(50);
/// Bursts of changes (a node registering touches several records) go out as one delta.
const COALESCE_WINDOW: Duration = Duration::from_millis(100);
/// Frames queued for a slow client. When full, the session stops queuing deltas and owes
/// the client a full netmap, sent once the queue drains.
const SESSION_QUEUE_FRAMES: usize = 16;

/// Starts a session for `node`; the returned receiver is the response body.
pub fn start(deps: ControlDeps, node: NodeId, compress: bool) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(SESSION_QUEUE_FRAMES);
    // Subscribe before the first netmap is built, so no change falls between the two.
    let changes = deps.cluster.subscribe();
    let presence = deps.presence.subscribe();
    let span = tracing::debug_span!("map", node.id = %node);
    let tasks = deps.tasks.clone();
    tasks.spawn(
        Session {
            deps,
            node,
            compress,
            tx,
            sent_peers: BTreeSet::new(),
            approved: false,
            pending: Pending::default(),
        }
        .run(changes, presence)
        .instrument(span),
    );
    rx
}

/// What the next delta must cover.
#[derive(Default)]
struct Pending {
    nodes: BTreeSet<NodeId>,
    online: BTreeMap<NodeId, bool>,
    patched: BTreeSet<NodeId>,
    users: bool,
    /// Something could not be expressed as a delta (lag, policy change): rebuild.
    full: bool,
    deadline: Option<Instant>,
}

impl Pending {
    fn arm(&mut self) {
        self.deadline
            .get_or_insert_with(|| Instant::now() + COALESCE_WINDOW);
    }
}

struct Session {
    deps: ControlDeps,
    node: NodeId,
    compress: bool,
    tx: mpsc::Sender<Bytes>,
    /// Peers the client currently has, so removals and visibility changes become deltas.
    sent_peers: BTreeSet<NodeId>,
    /// Self approval as last sent; a change flips every peer's visibility.
    approved: bool,
    pending: Pending,
}

enum End {
    ClientGone,
    NodeRemoved,
}

impl Session {
    async fn run(
        mut self,
        mut changes: broadcast::Receiver<std::sync::Arc<AppliedBatch>>,
        mut presence: broadcast::Receiver<PresenceChange>,
    ) {
        self.deps.presence.session_started(self.node);
        self.deps
            .metrics
            .connected_clients
            .set(self.deps.presence.online_count() as i64);
        tracing::debug!("map stream started");
        let keepalive_frame = build::encode_frame(
            &MapResponse {
                keep_alive: true,
                ..Default::default()
            },
            self.compress,
        );
        let mut keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;

        let mut end = self.send_full(true).await.err();
        // A membership change (DERP map, dial plan) is rare: it costs each session one full map.
        let mut topology = self.deps.settings.topology.clone();
        topology.mark_unchanged();
        let mut topology_live = true;
        while end.is_none() {
            let flush_at = self.pending.deadline;
            tokio::select! {
                () = self.deps.stop.cancelled() => break,
                changed = topology.changed(), if topology_live => match changed {
                    Ok(()) => { self.pending.full = true; self.pending.arm(); }
                    Err(_) => topology_live = false,
                },
                () = self.tx.closed() => end = Some(End::ClientGone),
                batch = changes.recv() => match batch {
                    Ok(batch) => self.note_batch(&batch),
                    Err(broadcast::error::RecvError::Lagged(_)) => { self.pending.full = true; self.pending.arm(); }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                change = presence.recv() => match change {
                    Ok(change) => self.note_presence(change),
                    Err(broadcast::error::RecvError::Lagged(_)) => { self.pending.full = true; self.pending.arm(); }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    end = self.flush().await.err();
                    keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
                }
                () = sleep_until(keepalive_at) => {
                    // A full queue already tells the client we are alive soon enough.
                    if self.tx.try_send(keepalive_frame.clone()).is_ok() {
                        self.count("keepalive", keepalive_frame.len());
                    }
                    keepalive_at = Instant::now() + KEEPALIVE_INTERVAL + jitter();
                }
            }
        }
        self.finish(end).await;
    }

    fn count(&self, kind: &str, bytes: usize) {
        self.deps
            .metrics
            .map_responses
            .with_label_values(&[kind])
            .inc();
        self.deps.metrics.map_bytes.inc_by(bytes as u64);
    }

    fn note_batch(&mut self, batch: &AppliedBatch) {
        if batch.full_resync {
            self.pending.full = true;
        }
        for change in &batch.changes {
            match change {
                Change::NodeUpserted(id) | Change::NodeRemoved(id) => {
                    self.pending.nodes.insert(*id);
                }
                Change::UserChanged(_) => self.pending.users = true,
                Change::PolicyChanged | Change::DnsChanged => self.pending.full = true,
                Change::PendingChanged(_) => continue,
            }
            self.pending.arm();
        }
        if batch.full_resync {
            self.pending.arm();
        }
    }

    fn note_presence(&mut self, change: PresenceChange) {
        let id = change.node();
        if id == self.node || !self.sent_peers.contains(&id) {
            return;
        }
        match change {
            PresenceChange::Online(id) => {
                self.pending.online.insert(id, true);
            }
            PresenceChange::Offline(id) => {
                self.pending.online.insert(id, false);
            }
            PresenceChange::Patched(id) => {
                self.pending.patched.insert(id);
            }
        }
        self.pending.arm();
    }

    /// Queues a frame. The first netmap waits for room; a delta that finds the queue full
    /// is dropped and the client is owed a full netmap instead.
    async fn send(&mut self, frame: Bytes, kind: &str, wait: bool) -> Result<bool, End> {
        let len = frame.len();
        if wait {
            self.tx.send(frame).await.map_err(|_| End::ClientGone)?;
        } else {
            match self.tx.try_send(frame) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => return Ok(false),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::ClientGone),
            }
        }
        self.count(kind, len);
        Ok(true)
    }

    async fn send_full(&mut self, wait: bool) -> Result<(), End> {
        let view = self.deps.cluster.view();
        let node = view.node(self.node).cloned().ok_or(End::NodeRemoved)?;
        let ctx = MapContext {
            view: &view,
            presence: &self.deps.presence,
            settings: &self.deps.settings,
        };
        let (response, peers) = ctx.full_map(&node);
        if self
            .send(build::encode_frame(&response, self.compress), "full", wait)
            .await?
        {
            self.sent_peers = peers;
            self.approved = node.approved;
            self.pending = Pending::default();
        } else {
            self.retry_later();
        }
        Ok(())
    }

    fn retry_later(&mut self) {
        self.pending.full = true;
        self.pending.deadline = Some(Instant::now() + COALESCE_WINDOW);
    }

    /// Sends what accumulated since the last flush as one delta.
    async fn flush(&mut self) -> Result<(), End> {
        let view = self.deps.cluster.view();
        let me = view.node(self.node).cloned().ok_or(End::NodeRemoved)?;
        if self.pending.full || me.approved != self.approved {
            return self.send_full(false).await;
        }
        let ctx = MapContext {
            view: &view,
            presence: &self.deps.presence,
            settings: &self.deps.settings,
        };
        let pending = std::mem::take(&mut self.pending);
        let mut response = MapResponse::default();
        let mut sent_after = self.sent_peers.clone();
        if pending.nodes.contains(&self.node) {
            response.node = Some(ctx.node_json(&me, true));
        }
        for id in pending.nodes.iter().filter(|id| **id != self.node) {
            match view.node(*id) {
                Some(peer) if policy::can_see(&view, &me, peer) => {
                    response.peers_changed.push(ctx.node_json(peer, false));
                    sent_after.insert(*id);
                }
                _ => {
                    if sent_after.remove(id) {
                        response.peers_removed.push(id.0);
                    }
                }
            }
        }
        let rebuilt: BTreeSet<u64> = response.peers_changed.iter().map(|p| p.id).collect();
        for (id, online) in &pending.online {
            if sent_after.contains(id) && !rebuilt.contains(&id.0) {
                response.online_change.insert(id.0.to_string(), *online);
            }
        }
        for id in &pending.patched {
            if sent_after.contains(id) && !rebuilt.contains(&id.0) {
                response.peers_changed_patch.push(ctx.peer_patch(*id));
            }
        }
        if pending.users || !response.peers_changed.is_empty() {
            let users = std::iter::once(me.user).chain(
                sent_after
                    .iter()
                    .filter_map(|id| view.node(*id).map(|n| n.user)),
            );
            response.user_profiles = ctx.user_profiles(users.collect::<BTreeSet<UserId>>());
        }
        if response.is_empty_delta() {
            return Ok(());
        }
        if self
            .send(
                build::encode_frame(&response, self.compress),
                "delta",
                false,
            )
            .await?
        {
            self.sent_peers = sent_after;
        } else {
            self.retry_later();
        }
        Ok(())
    }

    async fn finish(self, end: Option<End>) {
        let went_offline = self.deps.presence.session_ended(self.node);
        self.deps
            .metrics
            .connected_clients
            .set(self.deps.presence.online_count() as i64);
        match end {
            Some(End::NodeRemoved) => tracing::info!("node removed; map stream closed"),
            Some(End::ClientGone) => tracing::debug!("client closed the map stream"),
            None => tracing::debug!("map stream closed by shutdown"),
        }
        if went_offline && !matches!(end, Some(End::NodeRemoved)) && !self.deps.stop.is_cancelled()
        {
            // One write per disconnect; peers learn LastSeen from the applied change.
            let cluster = self.deps.cluster.clone();
            let node = self.node;
            self.deps.tasks.spawn(async move {
                if let Err(error) = cluster.propose(Command::SetLastSeen { id: node }).await {
                    tracing::debug!(node.id = %node, %error, "could not record last seen");
                }
            });
        }
    }
}

fn jitter() -> Duration {
    Duration::from_millis(rand::random::<u64>() % 9000)
}

//! One streaming map session (long poll): a full netmap first, then the hub's deltas
//! filtered for this node, plus keep-alives.
//!
//! The session does O(changed peers) work per delta and usually none at all: when its node
//! sees every changed peer and is not itself among them, it sends the frame the hub's
//! first such session encoded. A client that stops reading is back-pressured: once its
//! queue is full the session stops queuing deltas and sends one full netmap when the
//! client has drained it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use super::build::{self, MapContext, Message};
use super::full;
use super::hub::{Delta, HubHandle, HubState};
use crate::control::tailcfg::MapResponse;
use crate::control::{ControlDeps, ControlSettings, policy};
use crate::presence::Presence;
use crate::registry::{Command, NodeId, Registry};
use crate::telemetry::Metrics;

/// The client abandons a map poll that stays silent for 120 s (watchdogTimeout in
/// tailscale's controlclient) and expects a keep-alive about once a minute.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(50);
/// Frames queued for a slow client. When full, the session stops queuing deltas and owes
/// the client a full netmap, sent once the queue has room again.
pub const SESSION_QUEUE_FRAMES: usize = 16;

/// What a map session uses, and nothing more.
#[derive(Clone)]
pub struct SessionDeps {
    /// This member's applied registry.
    pub view: tokio::sync::watch::Receiver<Arc<Registry>>,
    pub hub: HubHandle,
    pub presence: Presence,
    pub settings: Arc<ControlSettings>,
    pub metrics: Arc<Metrics>,
    /// Cancelled to end the session (shutdown or drain).
    pub stop: tokio_util::sync::CancellationToken,
}

impl SessionDeps {
    pub fn of(deps: &ControlDeps) -> Self {
        SessionDeps {
            view: deps.cluster.watch_view(),
            hub: deps.hub.clone(),
            presence: deps.presence.clone(),
            settings: deps.settings.clone(),
            metrics: deps.metrics.clone(),
            stop: deps.stop.clone(),
        }
    }
}

/// Starts a session for `node`, which the caller has counted online
/// (`Presence::session_started`); the returned receiver is the response body. When the
/// node's last session ends, its last-seen time is written through Raft.
pub fn start(deps: &ControlDeps, node: NodeId, compress: bool) -> mpsc::Receiver<Message> {
    let (tx, rx) = mpsc::channel(SESSION_QUEUE_FRAMES);
    let session = Session::new(SessionDeps::of(deps), node, compress, tx);
    let span = tracing::debug_span!("map", node.id = %node);
    let cluster = deps.cluster.clone();
    deps.tasks.spawn(
        async move {
            if session.run().await {
                // One write per disconnect; peers learn LastSeen from the applied change.
                if let Err(error) = cluster.propose(Command::SetLastSeen { id: node }).await {
                    tracing::debug!(node.id = %node, %error, "could not record last seen");
                }
            }
        }
        .instrument(span),
    );
    rx
}

pub(super) struct Session {
    deps: SessionDeps,
    node: NodeId,
    compress: bool,
    tx: mpsc::Sender<Message>,
    /// Self approval as last sent; a change flips every peer's visibility.
    approved: bool,
    /// The hub state the client's netmap reflects; older deltas are skipped.
    seq: u64,
    /// A delta was dropped (queue full, or this session lagged the hub): the next frame
    /// must be a full netmap.
    owe_full: bool,
}

enum End {
    ClientGone,
    NodeRemoved,
}

impl Session {
    pub(super) fn new(
        deps: SessionDeps,
        node: NodeId,
        compress: bool,
        tx: mpsc::Sender<Message>,
    ) -> Self {
        Session {
            deps,
            node,
            compress,
            tx,
            approved: false,
            seq: 0,
            owe_full: false,
        }
    }

    /// Streams until the client leaves, the node is removed or the member stops. Returns
    /// whether the node's last-seen time should be recorded.
    pub(super) async fn run(mut self) -> bool {
        self.deps
            .metrics
            .connected_clients
            .set(self.deps.presence.online_count() as i64);
        tracing::debug!("map stream started");
        let end = self.stream().await.err();
        self.finish(end)
    }

    async fn stream(&mut self) -> Result<(), End> {
        let keepalive_frame = Message::framed(build::encode_frame(
            &MapResponse {
                keep_alive: true,
                ..Default::default()
            },
            self.compress,
        ));
        let (mut deltas, state) = self.deps.hub.subscribe();
        let first = self.full_frame(&state)?;
        self.tx.send(first).await.map_err(|_| End::ClientGone)?;
        let mut keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
        // Owned handles, so the arms below may borrow the session mutably.
        let (tx, stop) = (self.tx.clone(), self.deps.stop.clone());
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tx.closed() => return Err(End::ClientGone),
                delta = deltas.recv() => match delta {
                    Ok(delta) => self.on_delta(&delta)?,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.owe_full = true,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                permit = tx.reserve(), if self.owe_full => {
                    let permit = permit.map_err(|_| End::ClientGone)?;
                    let state = self.deps.hub.current();
                    let frame = self.full_frame(&state)?;
                    permit.send(frame);
                    self.owe_full = false;
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
    }

    fn count(&self, kind: &str, bytes: usize) {
        self.deps
            .metrics
            .map_responses
            .with_label_values(&[kind])
            .inc();
        self.deps.metrics.map_bytes.inc_by(bytes as u64);
    }

    /// The full netmap as of this member's latest view, assembled from the hub's shared
    /// peer JSON (`state`, which may be a tick behind the view: peers it holds in an older
    /// state are encoded afresh).
    fn full_frame(&mut self, state: &HubState) -> Result<Message, End> {
        let view = self.deps.view.borrow().clone();
        let me = view.node(self.node).ok_or(End::NodeRemoved)?;
        let ctx = MapContext {
            view: &view,
            presence: &self.deps.presence,
            settings: &self.deps.settings,
        };
        let frame = full::full_message(&ctx, state, me, self.compress);
        self.approved = me.approved;
        self.seq = state.seq;
        self.count("full", frame.len());
        Ok(frame)
    }

    /// Queues a frame unless the queue is full, in which case the client is owed a full
    /// netmap instead.
    fn offer(&mut self, frame: Message, kind: &str) -> Result<(), End> {
        let len = frame.len();
        match self.tx.try_send(frame) {
            Ok(()) => {
                self.count(kind, len);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.owe_full = true;
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::ClientGone),
        }
    }

    /// Turns one hub delta into what this client must receive.
    fn on_delta(&mut self, delta: &Arc<Delta>) -> Result<(), End> {
        if delta.seq <= self.seq || self.owe_full {
            // Already in the netmap the client has, or a full netmap is owed anyway.
            return Ok(());
        }
        // The latest view: at least as new as the delta (views only move forward).
        let view = self.deps.view.borrow().clone();
        let view = &view;
        let me = view.node(self.node).ok_or(End::NodeRemoved)?;
        if delta.full || me.approved != self.approved {
            let state = self.deps.hub.current();
            let frame = self.full_frame(&state)?;
            return self.offer(frame, "full");
        }
        self.seq = delta.seq;
        let sees = |peer: &crate::registry::Node| policy::can_see(view, me, peer);
        let frame = if !delta.touches(self.node) && delta.upserted.iter().all(|p| sees(&p.node)) {
            if delta.is_empty() || delta.only_presence_of(self.node) {
                return Ok(());
            }
            Message::framed(delta.shared_frame(self.compress))
        } else {
            let ctx = MapContext {
                view,
                presence: &self.deps.presence,
                settings: &self.deps.settings,
            };
            let own = delta
                .touches(self.node)
                .then(|| (self.node, ctx.self_json(me)));
            let response = delta.response(own, sees);
            if response.is_empty_delta() {
                return Ok(());
            }
            Message::framed(build::encode_frame(&response, self.compress))
        };
        self.offer(frame, "delta")
    }

    /// Ends the session; true if the node went offline (its last-seen time is news).
    fn finish(self, end: Option<End>) -> bool {
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
        went_offline && !matches!(end, Some(End::NodeRemoved)) && !self.deps.stop.is_cancelled()
    }
}

fn jitter() -> Duration {
    Duration::from_millis(rand::random::<u64>() % 9000)
}

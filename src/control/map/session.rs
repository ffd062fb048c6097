//! One streaming map session (long poll): a full netmap first, then the hub's deltas
//! filtered for this node, plus keep-alives.
//!
//! The session *is* the response body: HTTP/2 pulls the next message when it has room to
//! send it, so a client that stops reading stops the session too — no queue, no task of
//! its own. While it stands still, the hub's deltas wait in the shared ring; once it
//! falls further behind than the ring holds, it is owed one full netmap, sent when it
//! reads again. The session does O(changed peers) work per delta and usually none: when
//! its node sees every changed peer and is not itself among them, it sends the frame the
//! hub's first such session encoded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, broadcast};
use tokio::time::{Instant, sleep_until};
use tokio_util::task::TaskTracker;

use super::build::{self, MapContext, Message};
use super::full;
use super::hub::{Delta, HubHandle, HubState};
use crate::control::policy::{FilterSent, Seen};
use crate::control::tailcfg::{MapResponse, RawJson};
use crate::control::{ControlDeps, ControlSettings};
use crate::policy::Piece;
use crate::presence::Presence;
use crate::raft::Cluster;
use crate::registry::{Command, Node, NodeId, Registry, Timestamp};
use crate::telemetry::{GaugeRaised, Metrics};

/// The client abandons a map poll that stays silent for 120 s (watchdogTimeout in
/// tailscale's controlclient) and expects a keep-alive about once a minute.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(50);

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
    /// Where the node's last-seen time is written when its last session ends (`None` in
    /// tests without a cluster).
    pub last_seen: Option<(Cluster, TaskTracker)>,
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
            last_seen: Some((deps.cluster.clone(), deps.tasks.clone())),
        }
    }
}

/// The response body of a streaming map request for `node`, which the caller has counted
/// online (`Presence::session_started`): a stream of byte chunks.
pub fn body(
    deps: &ControlDeps,
    node: NodeId,
    compress: bool,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let session = Session::new(SessionDeps::of(deps), node, compress);
    chunks(session.into_stream())
}

/// Each message as its chunks: shared blocks are written, never copied.
fn chunks(
    messages: impl Stream<Item = Message> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    use futures::StreamExt;
    messages.flat_map(|m| futures::stream::iter(m.into_chunks().into_iter().map(Ok)))
}

pub(super) struct Session {
    deps: SessionDeps,
    node: NodeId,
    compress: bool,
    deltas: Option<broadcast::Receiver<Arc<Delta>>>,
    keepalive_at: Instant,
    /// Self approval as last sent; a change flips every peer's visibility.
    approved: bool,
    /// The hub state the client's netmap reflects; older deltas are skipped.
    seq: u64,
    /// A digest of the node's own JSON as last sent: a delta that touches the node without
    /// changing what its client sees of itself does not resend it. (The JSON itself would
    /// cost every session about a kilobyte.)
    self_sent: Option<u64>,
    /// Under a policy: what the client holds of it (see `PolicyView`), and the chunks of
    /// its packet filter.
    policy_sent: Option<PolicyView>,
    filter_sent: FilterSent,
    /// When the node's key expires (the stream ends then).
    expires_at: Option<Instant>,
    /// How the session ended, once it did.
    end: Option<End>,
    /// This session's turn to send a full netmap (see `HubHandle::full_map_turn`), held
    /// until HTTP/2 has taken the whole netmap.
    full_turn: Option<OwnedSemaphorePermit>,
}

/// What woke the session.
enum Event {
    Stop,
    Delta(Result<Arc<Delta>, broadcast::error::RecvError>),
    KeepAlive,
    Expired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Stopped,
    NodeRemoved,
    /// The node's key expired (by time, an admin or a logout): the client got its own
    /// node marked expired, and nothing more.
    Revoked,
}

impl Session {
    pub(super) fn new(deps: SessionDeps, node: NodeId, compress: bool) -> Self {
        deps.metrics
            .connected_clients
            .set(deps.presence.online_count() as i64);
        tracing::debug!(node.id = %node, "map stream started");
        Session {
            deps,
            node,
            compress,
            deltas: None,
            keepalive_at: Instant::now() + KEEPALIVE_INTERVAL,
            approved: false,
            seq: 0,
            self_sent: None,
            policy_sent: None,
            filter_sent: FilterSent::default(),
            expires_at: None,
            end: None,
            full_turn: None,
        }
    }

    /// The session as the stream of messages the body sends; it ends on shutdown, drain
    /// or the node's removal, and the client leaving drops it.
    pub(super) fn into_stream(self) -> impl Stream<Item = Message> + Send + 'static {
        futures::stream::unfold(self, |mut session| async move {
            let message = session.next_message().await?;
            Some((message, session))
        })
    }

    /// The next message for the client: the first netmap, a delta, a resync or a
    /// keep-alive. `None` once the session is over.
    async fn next_message(&mut self) -> Option<Message> {
        if self.end.is_some() {
            return None;
        }
        // HTTP/2 asks for the next message once it has taken all of the last one: a turn
        // to send a full netmap ends here.
        self.full_turn = None;
        loop {
            if self.deltas.is_none() {
                // A node that just registered: its first netmap from the hub's next tick.
                // (`view` falls back to the member's latest if the tick is late.)
                tokio::select! {
                    () = self.deps.stop.cancelled() => {}
                    () = self.deps.hub.wait_to_hold(self.node) => {}
                }
                // The turn first, then the state: the netmap is as fresh as it can be.
                match self.wait_for_turn().await {
                    Ok(turn) => self.full_turn = turn,
                    Err(end) => {
                        self.end = Some(end);
                        return None;
                    }
                }
                let (deltas, state) = self.deps.hub.subscribe();
                self.deltas = Some(deltas);
                return self.full(&state, "full");
            }
            let event = {
                let deltas = self.deltas.as_mut().expect("subscribed above");
                tokio::select! {
                    () = self.deps.stop.cancelled() => Event::Stop,
                    delta = deltas.recv() => Event::Delta(delta),
                    () = sleep_until(self.keepalive_at) => Event::KeepAlive,
                    () = sleep_until(self.expires_at.unwrap_or(self.keepalive_at)),
                        if self.expires_at.is_some() => Event::Expired,
                }
            };
            match event {
                Event::Stop => {
                    self.end = Some(End::Stopped);
                    return None;
                }
                Event::Delta(Ok(delta)) => match self.on_delta(&delta).inspect(|_| delta.taken()) {
                    Ok(Some(message)) => return self.sent(message, "delta"),
                    Ok(None) => {}
                    Err(end) => {
                        self.end = Some(end);
                        return None;
                    }
                },
                // Too far behind: a full netmap, in turn, from a fresh subscription.
                Event::Delta(Err(broadcast::error::RecvError::Lagged(_))) => self.deltas = None,
                Event::Delta(Err(broadcast::error::RecvError::Closed)) => {
                    self.end = Some(End::Stopped);
                    return None;
                }
                Event::Expired => {
                    let view = self.deps.view.borrow().clone();
                    let Some(me) = view.node(self.node) else {
                        self.end = Some(End::NodeRemoved);
                        return None;
                    };
                    match self.revoked(&view, me) {
                        Some(message) => return self.sent(message, "delta"),
                        // Renewed meanwhile: follow the new expiry.
                        None => self.expires_at = expiry_instant(me),
                    }
                }
                Event::KeepAlive => {
                    let message = Message::framed(build::encode_frame(
                        &MapResponse {
                            keep_alive: true,
                            ..Default::default()
                        },
                        self.compress,
                    ));
                    self.keepalive_at = Instant::now() + KEEPALIVE_INTERVAL + jitter();
                    self.count("keepalive", message.len());
                    return Some(message);
                }
            }
        }
    }

    /// Waits for a turn to send a full netmap (`None`: waited the longest a session waits,
    /// sending anyway); `Err` if the member is stopping meanwhile.
    async fn wait_for_turn(&self) -> Result<Option<OwnedSemaphorePermit>, End> {
        let metrics = &self.deps.metrics;
        let _waiting = GaugeRaised::new(&metrics.full_map_waiting);
        let turn = tokio::select! {
            () = self.deps.stop.cancelled() => return Err(End::Stopped),
            turn = self.deps.hub.full_map_turn() => turn,
        };
        if turn.is_none() {
            metrics.full_map_turns_skipped.inc();
        }
        Ok(turn)
    }

    /// Counts a message and restarts the keep-alive clock.
    fn sent(&mut self, message: Message, kind: &str) -> Option<Message> {
        self.count(kind, message.len());
        self.keepalive_at = Instant::now() + KEEPALIVE_INTERVAL;
        Some(message)
    }

    /// A full netmap, or the end of the session if the node is gone.
    fn full(&mut self, state: &HubState, kind: &str) -> Option<Message> {
        match self.full_frame(state) {
            Ok(message) => self.sent(message, kind),
            Err(end) => {
                self.end = Some(end);
                None
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

    /// The registry view a session answers from: the hub's, which moves once per tick,
    /// so a member compiles its policy at most once per tick however fast writes apply —
    /// unless it still does not hold this node after `HubHandle::wait_to_hold`, then the
    /// member's latest.
    fn view(&self, state: &HubState) -> Arc<Registry> {
        if state.view.node(self.node).is_some() {
            state.view.clone()
        } else {
            self.deps.view.borrow().clone()
        }
    }

    /// The full netmap as of the hub's state (or, for a node the hub does not hold yet,
    /// the member's latest view: peers the state holds in an older version are encoded
    /// afresh).
    fn full_frame(&mut self, state: &HubState) -> Result<Message, End> {
        let view = self.view(state);
        let me = view.node(self.node).ok_or(End::NodeRemoved)?;
        if let Some(last) = self.revoked(&view, me) {
            return Ok(last);
        }
        let ctx = MapContext {
            view: &view,
            presence: &self.deps.presence,
            settings: &self.deps.settings,
        };
        let frame = full::full_message(&ctx, state, me, self.compress);
        self.expires_at = expiry_instant(me);
        self.approved = me.approved;
        self.seq = state.seq;
        self.self_sent = Some(self_digest(&ctx.self_json(me)));
        self.policy_sent = PolicyView::of(&ctx, me);
        self.filter_sent = ctx.access().filter_sent(me);
        Ok(frame)
    }

    /// Turns one hub delta into what this client must receive, if anything.
    fn on_delta(&mut self, delta: &Arc<Delta>) -> Result<Option<Message>, End> {
        if delta.seq <= self.seq {
            // Already in the netmap the client has.
            return Ok(None);
        }
        // The hub's state is at least as new as the delta (it only moves forward).
        let state = self.deps.hub.current();
        let view = self.view(&state);
        let me = view.node(self.node).ok_or(End::NodeRemoved)?;
        if let Some(last) = self.revoked(&view, me) {
            return Ok(Some(last));
        }
        self.expires_at = expiry_instant(me);
        if delta.full || me.approved != self.approved {
            return self.full_frame(&state).map(Some);
        }
        let ctx = MapContext {
            view: &view,
            presence: &self.deps.presence,
            settings: &self.deps.settings,
        };
        let access = ctx.access();
        // Under a policy: a change in what the node may reach goes out in the delta as the
        // chunks of its packet filter that changed, one in its SSH rules as a new
        // SSHPolicy; a change in its routes or a router it sees, as a full netmap.
        let mut new_filter = None;
        let mut new_ssh = None;
        if access.has_policy() {
            let now = PolicyView::of(&ctx, me);
            let router_changed = delta
                .upserted
                .iter()
                .any(|p| access.can_see(me, &p.node) && access.peer_routes(me, &p.node).is_some());
            match (&self.policy_sent, &now) {
                (Some(sent), Some(now)) if sent.rest == now.rest && !router_changed => {
                    if sent.filter != now.filter
                        && let Some((changes, held)) =
                            access.packet_filter_changes(me, &self.filter_sent)
                    {
                        new_filter = Some(changes);
                        self.filter_sent = held;
                    }
                    if sent.ssh != now.ssh {
                        new_ssh = access.ssh_policy(me);
                    }
                }
                _ => return self.full_frame(&state).map(Some),
            }
            self.policy_sent = now;
        }
        self.seq = delta.seq;
        let viewer = access.viewer(me);
        let sees = |peer: &crate::registry::Node| viewer.sees(peer) != Seen::Hidden;
        let touched = delta.touches(self.node);
        // The node's own JSON, only when it differs from what its client last got.
        let me_json = if touched {
            let json = ctx.self_json(me);
            let digest = Some(self_digest(&json));
            (self.self_sent != digest).then(|| {
                self.self_sent = digest;
                json
            })
        } else {
            None
        };
        let policy_news = new_filter.is_some() || new_ssh.is_some();
        if !touched && !policy_news {
            if delta.is_empty() || delta.only_presence_of(self.node) {
                return Ok(None);
            }
            return Ok(delta
                .shared_frame(self.compress, self.node, sees)
                .map(Message::framed));
        }
        if let Some(filters) = &new_filter
            && !touched
            && new_ssh.is_none()
        {
            // The rest of the message is what every receiver that sees the same gets.
            let head = delta.shared_head(self.node, sees);
            return Ok(Some(Message::framed(build::encode_with_filters(
                Piece::Shared(&head),
                filters,
                self.compress,
            ))));
        }
        let mut response = delta.response(self.node, me_json, sees);
        response.ssh_policy = new_ssh;
        if let Some(filters) = &new_filter {
            let head = Piece::Own(build::head_before_filters(&response));
            return Ok(Some(Message::framed(build::encode_with_filters(
                head,
                filters,
                self.compress,
            ))));
        }
        if response.is_empty_delta() {
            return Ok(None);
        }
        Ok(Some(Message::framed(build::encode_frame(
            &response,
            self.compress,
        ))))
    }
}

/// What a client holds of the policy, to tell which deltas change it: its packet filter,
/// its SSH rules, and (`rest`) whom it sees, its own routes and capabilities and the routes
/// of every router it sees.
#[derive(PartialEq)]
struct PolicyView {
    filter: u64,
    ssh: u64,
    rest: u64,
}

impl PolicyView {
    /// `None` without a policy.
    fn of(ctx: &MapContext<'_>, me: &crate::registry::Node) -> Option<PolicyView> {
        use std::hash::{Hash, Hasher};
        let access = ctx.access();
        if !access.has_policy() {
            return None;
        }
        let hash = |parts: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            parts(&mut h);
            h.finish()
        };
        let (filter, ssh) = access.fingerprint(me).unwrap_or_default();
        let rest = hash(&|h| {
            // What the policy's aliases name the node by, besides its addresses (and routes,
            // below): a change in it may change whom the node sees, so its peers.
            me.tags.hash(h);
            if let Some(user) = ctx.view.user(me.user) {
                (&user.name, &user.email).hash(h);
            }
            access.self_routes(me).hash(h);
            access.node_attrs(me).hash(h);
            for router in access.routers() {
                if let Some(peer) = ctx.view.node(router)
                    && access.can_see(me, peer)
                {
                    (router, access.peer_routes(me, peer)).hash(h);
                }
            }
        });
        Some(PolicyView { filter, ssh, rest })
    }
}

impl Session {
    /// If the node's key has expired: the last message of the session (the node itself,
    /// marked expired, so the client asks its user to log in again), and the session ends.
    fn revoked(&mut self, view: &Registry, me: &Node) -> Option<Message> {
        if !me.is_expired(Timestamp::now()) {
            return None;
        }
        let ctx = MapContext {
            view,
            presence: &self.deps.presence,
            settings: &self.deps.settings,
        };
        let response = MapResponse {
            node: Some(ctx.self_json(me)),
            ..Default::default()
        };
        self.end = Some(End::Revoked);
        Some(Message::framed(build::encode_frame(
            &response,
            self.compress,
        )))
    }
}

/// When `node`'s key expires, as an instant on this member's clock.
fn expiry_instant(node: &Node) -> Option<Instant> {
    let at = node.expiry?;
    let left = at.0.saturating_sub(Timestamp::now().0).max(0) as u64;
    Some(Instant::now() + Duration::from_millis(left))
}

impl Drop for Session {
    /// The client left, the node was removed, or the member stops: the node goes offline
    /// here, and when it was its last session its last-seen time is written (once per
    /// disconnect, not per keep-alive).
    fn drop(&mut self) {
        let went_offline = self.deps.presence.session_ended(self.node);
        self.deps
            .metrics
            .connected_clients
            .set(self.deps.presence.online_count() as i64);
        let (reason, record) = match self.end {
            Some(End::NodeRemoved) => ("node removed", false),
            Some(End::Revoked) => ("node key expired", true),
            Some(End::Stopped) => ("member stopping or draining", false),
            None => ("client closed the stream", true),
        };
        tracing::debug!(node.id = %self.node, reason, "map stream ended");
        if !(went_offline && record) || self.deps.stop.is_cancelled() {
            return;
        }
        if let Some((cluster, tasks)) = self.deps.last_seen.clone() {
            let node = self.node;
            tasks.spawn(async move {
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

/// A digest of a node's own JSON, keyed per process so that a client cannot craft two
/// versions of its Hostinfo that look the same.
fn self_digest(json: &RawJson) -> u64 {
    static KEYS: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(std::hash::RandomState::new);
    std::hash::BuildHasher::hash_one(&*KEYS, json.get())
}

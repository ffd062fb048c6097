//! The fan-out of one member: turns applied registry changes and presence changes into
//! shared deltas, so the cost of a change is paid once per change and once per receiver
//! that must see it — never once per receiver per peer.
//!
//! A change that finds the hub quiet goes out after a short gathering window; under a
//! stream of changes, at most one delta per 100 ms tick. Per tick, the hub re-encodes each
//! changed peer's JSON once,
//! keeps it in the peer cache (from which full netmaps are assembled without encoding), and
//! broadcasts one `Delta`. Sessions filter it by what their node may see; sessions that see
//! the same of it share one encoded frame (`Delta::shared_frame`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use imbl::OrdMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::build::{self, MapContext};
use crate::control::ControlSettings;
use crate::control::tailcfg::{MapResponse, RawJson};
use crate::policy::SharedText;
use crate::presence::{Presence, PresenceChange};
use crate::raft::{AppliedBatch, RegistryFeed};
use crate::registry::{Change, Node, NodeId, Registry, UserId};

/// Under a stream of changes, deltas go out at most this often: each tick's cost (encoding,
/// the policy compile, one frame per session) is paid once for everything that changed.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(100);
/// A change that finds the hub quiet waits only this long, for the rest of its burst (a node
/// registering touches several records, applied in one or two batches).
pub const GATHER_WINDOW: Duration = Duration::from_millis(10);
/// Under load, a tick also waits while the sessions are still working through the last
/// delta: until this share of them (in tenths) took it, or none took it for a `PACE_POLL`
/// (the rest are stalled, not busy), or for `PACE_WAIT_MAX` at most. When members are
/// short of CPU, sessions that fall behind would each work through every queued delta (its
/// policy check, its frame, its write) where one covering the same changes would do; slower
/// ticks carry more changes each instead, and the policy is compiled less often.
const PACE_SHARE_TENTHS: usize = 9;
const PACE_POLL: Duration = Duration::from_millis(10);
pub const PACE_WAIT_MAX: Duration = Duration::from_secs(1);
/// Deltas a session may fall behind (6 s of ticks) before it must resync with a full
/// netmap. Each retained delta keeps its state's changed blocks alive.
pub const DELTA_CHANNEL_CAPACITY: usize = 64;

/// Full netmaps a member sends at once, per core. After a member dies, its clients all
/// reconnect to the others within a second: sent side by side, every netmap would finish
/// only when the last one does; taken in turn, the first clients stream at once.
const FULL_MAPS_PER_CORE: usize = 32;
/// How many full netmaps this member sends at once.
pub fn full_map_turns() -> usize {
    FULL_MAPS_PER_CORE * std::thread::available_parallelism().map_or(1, |n| n.get())
}
/// The longest a new node's first netmap waits for the hub to hold the node (one tick, as a
/// rule) before it is built from the member's latest view instead.
pub const HUB_HOLD_WAIT: Duration = Duration::from_secs(1);
/// The longest a session waits for its turn to send a full netmap before it sends anyway,
/// so clients that stop reading while holding turns cannot hold back the others for long.
pub const FULL_MAP_WAIT: Duration = Duration::from_secs(10);

/// A peer as every receiver sees it, encoded once per change.
#[derive(Debug)]
pub struct PeerEntry {
    /// The registry state it was encoded from (to spot a cache older than a view).
    pub node: Arc<Node>,
    pub json: RawJson,
}

/// Node ids per block of shared peers.
pub const BLOCK_IDS: u64 = 256;

/// The approved peers of one range of node ids, joined
/// into one JSON fragment and compressed once, lazily, for all full netmaps that include
/// them. Node ids are never reused and grow, so a block changes only when one of its own
/// nodes does.
#[derive(Debug, Default)]
pub struct PeerBlock {
    pub entries: Vec<Arc<PeerEntry>>,
    /// [the peers' JSON joined by commas, one zstd frame of it]
    encoded: [OnceLock<Bytes>; 2],
}

impl PeerBlock {
    fn build(peers: &OrdMap<NodeId, Arc<PeerEntry>>, block: u64) -> PeerBlock {
        let range = NodeId(block * BLOCK_IDS)..NodeId((block + 1) * BLOCK_IDS);
        PeerBlock {
            entries: peers
                .range(range)
                .filter(|(_, e)| e.node.approved)
                .map(|(_, e)| e.clone())
                .collect(),
            encoded: Default::default(),
        }
    }

    /// The block's peers as JSON array elements (`compress` false), or a zstd frame of
    /// them. Each form is built once, when first asked for (real clients ask for zstd).
    pub fn bytes(&self, compress: bool) -> Bytes {
        self.encoded[usize::from(compress)]
            .get_or_init(|| {
                let plain = join_json(&self.entries);
                if compress {
                    Bytes::from(build::zstd_frame(&plain))
                } else {
                    plain
                }
            })
            .clone()
    }
}

/// Peers' JSON joined by commas.
fn join_json(entries: &[Arc<PeerEntry>]) -> Bytes {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.json.get().len() + 1).sum());
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.json.get().as_bytes());
    }
    Bytes::from(out)
}

/// What the hub knows at one point: the registry view, every peer's encoded JSON, and the
/// shared blocks full netmaps are assembled from.
#[derive(Clone, Default)]
pub struct HubState {
    /// Increases by one per delta.
    pub seq: u64,
    pub view: Arc<Registry>,
    pub peers: OrdMap<NodeId, Arc<PeerEntry>>,
    pub blocks: OrdMap<u64, Arc<PeerBlock>>,
}

/// What changed in one tick, shared by every session. It holds no registry version or hub
/// state (sessions read the latest): the ring of recent deltas must not keep old versions
/// of a large tailnet alive.
#[derive(Default)]
pub struct Delta {
    /// The hub state this delta leads to (`HubState::seq`).
    pub seq: u64,
    /// Peers created or changed (including this session's own node).
    pub upserted: Vec<Arc<PeerEntry>>,
    /// Of those, the ones the hub did not hold before (they just joined): no client can
    /// hold them yet, so one that may not see them is not told to drop them either.
    pub created: BTreeSet<NodeId>,
    pub removed: Vec<NodeId>,
    /// Peers whose presence (online state, endpoints, home DERP) changed.
    pub presence: Vec<PresenceNews>,
    /// Profiles of new owners and renamed users.
    pub profiles: Vec<ProfileNews>,
    /// Something no delta expresses (DNS, policy, topology, lost track): send full maps.
    pub full: bool,
    /// The frames sessions share, one per way of seeing the delta (see
    /// `shared_frame`).
    shared: Mutex<SharedFrames>,
    /// Sessions that took it (see `PACE_SHARE_TENTHS`).
    taken: AtomicUsize,
}

/// A peer's new presence, sent only to receivers that see the peer: under a policy, a node
/// must not learn the endpoints of one it may not reach.
pub struct PresenceNews {
    pub node: Arc<Node>,
    pub online: bool,
    /// Its endpoints and home DERP (`PeersChangedPatch`).
    pub patch: RawJson,
}

/// A user's profile, sent only to receivers that see one of `nodes` (or are one of them):
/// a netmap names a user only beside a node of theirs.
pub struct ProfileNews {
    pub json: RawJson,
    /// The user's nodes that make a receiver need the profile: the ones upserted in this
    /// delta, or all of them when the user changed.
    pub nodes: Vec<Arc<Node>>,
}

impl ProfileNews {
    fn wanted_by(&self, me: NodeId, visible: &impl Fn(&Node) -> bool) -> bool {
        self.nodes.iter().any(|n| n.id == me || visible(n))
    }
}

/// Which of a delta's entries a receiver gets (one bit each: the upserted peers, then the
/// presence news, then the profiles), and whether it takes zstd: receivers alike in both
/// get the same bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Sight {
    compress: bool,
    seen: Box<[u64]>,
}

/// A delta's shared frames and heads, bounded: under a policy that gives every user its own
/// view, a delta must not keep one frame per user. They are dropped once a newer delta is
/// out, so only the current delta holds any.
#[derive(Default)]
struct SharedFrames {
    frames: HashMap<Sight, Arc<OnceLock<Option<Bytes>>>>,
    heads: HashMap<Box<[u64]>, Arc<SharedText>>,
    bytes: usize,
    /// A newer delta went out: the few sessions still on this one encode their own.
    released: bool,
}

impl SharedFrames {
    fn has_room(&self) -> bool {
        !self.released
            && self.frames.len() + self.heads.len() < SHARED_FRAMES_PER_DELTA
            && self.bytes < SHARED_BYTES_PER_DELTA
    }
}

/// Frames and heads one delta shares; beyond either bound, receivers encode their own.
/// Presence news counts in a receiver's sight, so after a member's death (a third of the
/// tailnet going offline, then online again, in a few ticks) every class of receivers —
/// about one per user under a per-user policy — needs its own large frame.
const SHARED_FRAMES_PER_DELTA: usize = 256;
const SHARED_BYTES_PER_DELTA: usize = 4 << 20;

impl Delta {
    /// A session is done with this delta.
    pub fn taken(&self) {
        self.taken.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops the shared frames: most sessions took the delta (see `PACE_SHARE_TENTHS`), and
    /// the ring of recent deltas kept for the others must not hold them all.
    fn release_shared(&self) {
        let mut shared = self.shared.lock().expect("shared frames");
        *shared = SharedFrames {
            released: true,
            ..SharedFrames::default()
        };
    }

    /// The delta as one frame for receiver `me`, which is not among the upserted peers and
    /// sees the peers `visible` says; `None` if it needs nothing of it. The first receiver
    /// with a given sight encodes it, the others that see the same share it: under a policy,
    /// receivers fall into a few such classes (a user's own devices, a group's).
    pub fn shared_frame(
        &self,
        compress: bool,
        me: NodeId,
        visible: impl Fn(&Node) -> bool,
    ) -> Option<Bytes> {
        let encode = || {
            let response = self.response(me, None, &visible);
            (!response.is_empty_delta()).then(|| build::encode_frame(&response, compress))
        };
        let sight = Sight {
            compress,
            seen: self.seen(me, &visible),
        };
        let slot = {
            let mut shared = self.shared.lock().expect("shared frames");
            match shared.frames.get(&sight) {
                Some(slot) => Some(slot.clone()),
                None if shared.has_room() => Some(shared.frames.entry(sight).or_default().clone()),
                None => None,
            }
        };
        // Encoded without the lock held: other sights go on meanwhile.
        let Some(slot) = slot else {
            return encode();
        };
        slot.get_or_init(|| {
            let frame = encode();
            self.shared.lock().expect("shared frames").bytes +=
                frame.as_ref().map_or(0, Bytes::len);
            frame
        })
        .clone()
    }

    /// What `shared_frame` holds, as the head of a message that goes on with a packet
    /// filter (`build::head_before_filters`), shared the same way.
    pub fn shared_head(&self, me: NodeId, visible: impl Fn(&Node) -> bool) -> Arc<SharedText> {
        let seen = self.seen(me, &visible);
        let mut shared = self.shared.lock().expect("shared frames");
        if let Some(head) = shared.heads.get(&seen) {
            return head.clone();
        }
        let text = build::head_before_filters(&self.response(me, None, &visible));
        let head = Arc::new(SharedText::new(text));
        if shared.has_room() {
            shared.bytes += head.plain().len();
            shared.heads.insert(seen, head.clone());
        }
        head
    }

    /// Which of the delta's entries receiver `me` gets (see `Sight`), one bit each.
    fn seen(&self, me: NodeId, visible: &impl Fn(&Node) -> bool) -> Box<[u64]> {
        let gets = (self.upserted.iter().map(|p| visible(&p.node)))
            .chain(self.presence.iter().map(|p| visible(&p.node)))
            .chain(self.profiles.iter().map(|p| p.wanted_by(me, visible)));
        let len = self.upserted.len() + self.presence.len() + self.profiles.len();
        let mut seen = vec![0u64; len.div_ceil(64)].into_boxed_slice();
        for (i, _) in gets.enumerate().filter(|(_, got)| *got) {
            seen[i / 64] |= 1 << (i % 64);
        }
        seen
    }

    /// The delta for receiver `me`: `me_json` is its new JSON if the client must get it
    /// (it is never sent as a peer); `visible` says which peers it may see — an upserted
    /// peer it may not is removed from its map, in case it had it (unless the peer just
    /// joined), and it gets the presence of the peers it sees and their owners' profiles.
    pub fn response(
        &self,
        me: NodeId,
        me_json: Option<RawJson>,
        visible: impl Fn(&Node) -> bool,
    ) -> MapResponse {
        let mut response = MapResponse {
            node: me_json,
            ..Default::default()
        };
        let mut rebuilt = BTreeSet::new();
        for peer in &self.upserted {
            if peer.node.id == me {
                continue;
            }
            if visible(&peer.node) {
                response.peers_changed.push(peer.json.clone());
                rebuilt.insert(peer.node.id);
            } else if !self.created.contains(&peer.node.id) {
                response.peers_removed.push(peer.node.id.0);
            }
        }
        response
            .peers_removed
            .extend(self.removed.iter().map(|id| id.0));
        // A peer sent whole needs no patch; patches for peers a client does not have are
        // ignored by it (tailscale's mapSession skips unknown node ids).
        for news in &self.presence {
            let id = news.node.id;
            if !rebuilt.contains(&id) && visible(&news.node) {
                response.online_change.insert(id.0.to_string(), news.online);
                response.peers_changed_patch.push(news.patch.clone());
            }
        }
        response.user_profiles = (self.profiles.iter())
            .filter(|p| p.wanted_by(me, &visible))
            .map(|p| p.json.clone())
            .collect();
        response
    }

    /// Whether the delta carries nothing for anyone.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty()
            && self.removed.is_empty()
            && self.presence.is_empty()
            && self.profiles.is_empty()
    }

    /// Whether the delta only reports `id`'s own presence (nothing its client needs: it
    /// knows whether it is online, and its own endpoints).
    pub fn only_presence_of(&self, id: NodeId) -> bool {
        self.upserted.is_empty()
            && self.removed.is_empty()
            && self.profiles.is_empty()
            && self.presence.iter().all(|p| p.node.id == id)
    }

    /// Whether the delta changes this node itself.
    pub fn touches(&self, id: NodeId) -> bool {
        self.upserted.iter().any(|p| p.node.id == id)
    }
}

/// What sessions subscribe through.
#[derive(Clone)]
pub struct HubHandle {
    state: watch::Receiver<HubState>,
    deltas: broadcast::Sender<Arc<Delta>>,
    full_maps: Arc<Semaphore>,
}

impl HubHandle {
    /// Subscribes to deltas, then reads the current state: no delta falls in between
    /// (deltas with `seq` at or below the state's are already in it).
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<Delta>>, HubState) {
        let rx = self.deltas.subscribe();
        (rx, self.current())
    }

    /// The latest state (O(1): persistent maps).
    pub fn current(&self) -> HubState {
        self.state.borrow().clone()
    }

    /// Waits (at most `HUB_HOLD_WAIT`) until the hub's state holds `node`. A client
    /// streams right after it registered, before the tick that adds its node: answering it
    /// from the hub's next state rather than the member's latest view keeps the policy
    /// compiled once per tick instead of once per registration.
    pub async fn wait_to_hold(&self, node: NodeId) {
        let mut state = self.state.clone();
        let held = state.wait_for(|s| s.view.node(node).is_some());
        // Late (or the hub stopped): the session falls back to the member's latest view.
        let _ = tokio::time::timeout(HUB_HOLD_WAIT, held).await;
    }

    /// Waits (first come, first served; at most `FULL_MAP_WAIT`) for a turn to send a full
    /// netmap; the turn lasts as long as the returned permit. `None`: waited too long.
    pub async fn full_map_turn(&self) -> Option<OwnedSemaphorePermit> {
        let turn = self.full_maps.clone().acquire_owned();
        match tokio::time::timeout(FULL_MAP_WAIT, turn).await {
            Ok(permit) => Some(permit.expect("the semaphore is never closed")),
            Err(_) => None,
        }
    }
}

/// What one delta covers.
#[derive(Default, Debug)]
pub struct ChangeSet {
    /// Nodes created, changed or removed in the registry.
    pub nodes: BTreeSet<NodeId>,
    /// Nodes whose presence (online, endpoints, home DERP) changed.
    pub presence: BTreeSet<NodeId>,
    /// Users created, renamed or deleted.
    pub users: BTreeSet<UserId>,
    /// Something no delta expresses: every session resyncs.
    pub full: bool,
}

/// What the next delta must cover, and when it goes out.
#[derive(Default)]
struct Pending {
    changes: ChangeSet,
    deadline: Option<Instant>,
}

impl Pending {
    /// Due after the gathering window, but not before `not_before`.
    fn arm(&mut self, not_before: Instant) {
        self.deadline
            .get_or_insert_with(|| (Instant::now() + GATHER_WINDOW).max(not_before));
    }
}

impl HubState {
    /// Encodes every node of `ctx.view` (a member's start).
    pub fn encode_all(ctx: &MapContext<'_>, view: Arc<Registry>) -> HubState {
        let peers: OrdMap<NodeId, Arc<PeerEntry>> = view
            .nodes()
            .map(|node| (node.id, Arc::new(encode(ctx, node))))
            .collect();
        let mut state = HubState {
            seq: 0,
            view,
            peers,
            blocks: OrdMap::new(),
        };
        let all: BTreeSet<u64> = state.peers.keys().map(|id| id.0 / BLOCK_IDS).collect();
        state.rebuild_blocks(all);
        state
    }

    fn rebuild_blocks(&mut self, blocks: BTreeSet<u64>) {
        for b in blocks {
            let block = PeerBlock::build(&self.peers, b);
            if block.entries.is_empty() {
                self.blocks.remove(&b);
            } else {
                self.blocks.insert(b, Arc::new(block));
            }
        }
    }

    /// Moves to `ctx.view`, re-encoding each changed peer once, and returns the delta.
    pub fn advance(
        &mut self,
        ctx: &MapContext<'_>,
        view: Arc<Registry>,
        changes: &ChangeSet,
    ) -> Delta {
        let mut delta = Delta {
            full: changes.full,
            ..Default::default()
        };
        // The profiles to send, with the nodes that make a receiver need each.
        let mut owners = owned_nodes(&view, &changes.users);
        // Each node once, even when both its record and its presence changed this tick.
        for id in changes.nodes.union(&changes.presence) {
            match view.node(*id) {
                Some(node) => {
                    let entry = Arc::new(encode(ctx, node));
                    if self.peers.insert(*id, entry.clone()).is_none() {
                        delta.created.insert(*id);
                    }
                    if changes.nodes.contains(id) {
                        // A changed user's nodes are all there already.
                        if !changes.users.contains(&node.user) {
                            owners.entry(node.user).or_default().push(node.clone());
                        }
                        delta.upserted.push(entry);
                    }
                }
                None => {
                    if self.peers.remove(id).is_some() || changes.nodes.contains(id) {
                        delta.removed.push(*id);
                    }
                }
            }
        }
        delta.removed.sort_unstable();
        delta.removed.dedup();
        if view.parsed_policy().is_some() {
            let renamed = self.nodes_of_renamed_users(&view, &owners, changes);
            delta.upserted.extend(renamed);
        }
        for id in changes.presence.difference(&changes.nodes) {
            if let Some(node) = view.node(*id) {
                delta.presence.push(PresenceNews {
                    node: node.clone(),
                    online: ctx.presence.is_online(*id),
                    patch: ctx.peer_patch(*id),
                });
            }
        }
        delta.profiles = (owners.into_iter())
            .filter_map(|(user, nodes)| {
                Some(ProfileNews {
                    json: ctx.user_profile(user)?,
                    nodes,
                })
            })
            .collect();
        self.seq += 1;
        self.view = view;
        let touched = if changes.full {
            // Visibility may have changed for anyone (a new policy).
            self.peers.keys().map(|id| id.0 / BLOCK_IDS).collect()
        } else {
            changes
                .nodes
                .iter()
                .chain(&changes.presence)
                .map(|id| id.0 / BLOCK_IDS)
                .collect()
        };
        self.rebuild_blocks(touched);
        delta.seq = self.seq;
        delta
    }

    /// The nodes of users whose name or email changed this tick, as this state holds them
    /// (`view` is the next one). A policy names users by name or email, so who sees those
    /// nodes may have changed: every receiver looks at them again.
    fn nodes_of_renamed_users(
        &self,
        view: &Registry,
        owners: &BTreeMap<UserId, Vec<Arc<Node>>>,
        changes: &ChangeSet,
    ) -> Vec<Arc<PeerEntry>> {
        let names =
            |v: &Registry, user: UserId| v.user(user).map(|u| (u.name.clone(), u.email.clone()));
        (owners.iter())
            .filter(|(user, _)| changes.users.contains(user))
            .filter(|(user, _)| names(&self.view, **user) != names(view, **user))
            .flat_map(|(_, nodes)| nodes)
            .filter(|n| !changes.nodes.contains(&n.id))
            .filter_map(|n| self.peers.get(&n.id).cloned())
            .collect()
    }
}

/// Of `changed` (users created, renamed or removed this tick), those that own a node, with
/// their nodes: a profile appears in a netmap only beside a node of its user, so a user
/// with none needs no delta — an admin creating users would otherwise send every client a
/// message each.
fn owned_nodes(view: &Registry, changed: &BTreeSet<UserId>) -> BTreeMap<UserId, Vec<Arc<Node>>> {
    let mut owned = BTreeMap::<UserId, Vec<Arc<Node>>>::new();
    if changed.is_empty() {
        return owned;
    }
    for node in view.nodes().filter(|n| changed.contains(&n.user)) {
        owned.entry(node.user).or_default().push(node.clone());
    }
    owned
}

/// The hub task and its handle.
pub struct MapHub {
    feed: RegistryFeed,
    presence: Presence,
    settings: Arc<ControlSettings>,
    batches: broadcast::Receiver<Arc<AppliedBatch>>,
    presence_changes: broadcast::Receiver<PresenceChange>,
    state: watch::Sender<HubState>,
    deltas: broadcast::Sender<Arc<Delta>>,
    pending: Pending,
    last_flush: Option<Instant>,
    last_sent: Option<LastDelta>,
}

/// The last delta the hub sent, for pacing (see `PACE_SHARE_TENTHS`).
struct LastDelta {
    delta: Arc<Delta>,
    /// Sessions it went to.
    receivers: usize,
    /// How many had taken it when the hub last looked.
    taken_seen: usize,
}

impl MapHub {
    /// Builds the peer cache from the current view; `run` keeps it current.
    pub fn new(
        feed: RegistryFeed,
        presence: Presence,
        settings: Arc<ControlSettings>,
    ) -> (MapHub, HubHandle) {
        // Subscribed before the view is read, so no change falls in between.
        let batches = feed.batches.subscribe();
        let presence_changes = presence.subscribe();
        let view = feed.view();
        let initial = {
            let ctx = MapContext {
                view: &view,
                presence: &presence,
                settings: &settings,
            };
            HubState::encode_all(&ctx, view.clone())
        };
        let (state, state_rx) = watch::channel(initial);
        let (deltas, _) = broadcast::channel(DELTA_CHANNEL_CAPACITY);
        let handle = HubHandle {
            state: state_rx,
            deltas: deltas.clone(),
            full_maps: Arc::new(Semaphore::new(full_map_turns())),
        };
        let hub = MapHub {
            feed,
            presence,
            settings,
            batches,
            presence_changes,
            state,
            deltas,
            pending: Pending::default(),
            last_flush: None,
            last_sent: None,
        };
        (hub, handle)
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut topology = self.settings.topology.clone();
        topology.mark_unchanged();
        // The topology's sender lives as long as the member; without it nothing changes.
        let mut topology_live = true;
        loop {
            let flush_at = self.pending.deadline;
            tokio::select! {
                () = stop.cancelled() => return,
                batch = self.batches.recv() => match batch {
                    Ok(batch) => self.note_batch(&batch),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.lost_track(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                change = self.presence_changes.recv() => match change {
                    Ok(change) => { self.pending.changes.presence.insert(change.node()); self.arm(); }
                    Err(broadcast::error::RecvError::Lagged(_)) => self.lost_track(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                changed = topology.changed(), if topology_live => match changed {
                    Ok(()) => { self.pending.changes.full = true; self.arm(); }
                    Err(_) => topology_live = false,
                },
                () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    if self.sessions_busy() {
                        self.pending.deadline = Some(Instant::now() + PACE_POLL);
                    } else {
                        self.flush();
                    }
                }
            }
        }
    }

    /// Schedules the next delta: soon after a quiet spell, else one window after the last.
    fn arm(&mut self) {
        let not_before = self
            .last_flush
            .map_or_else(Instant::now, |at| at + COALESCE_WINDOW);
        self.pending.arm(not_before);
    }

    /// Whether sessions are still taking the last delta (see `PACE_SHARE_TENTHS`).
    fn sessions_busy(&mut self) -> bool {
        let (Some(last), Some(at)) = (&mut self.last_sent, self.last_flush) else {
            return false;
        };
        let taken = last.delta.taken.load(Ordering::Relaxed);
        let progress = taken > std::mem::replace(&mut last.taken_seen, taken);
        progress && taken * 10 < last.receivers * PACE_SHARE_TENTHS && at.elapsed() < PACE_WAIT_MAX
    }

    /// Missed changes: re-encode everything and have every session resync.
    fn lost_track(&mut self) {
        let changes = &mut self.pending.changes;
        changes.full = true;
        changes.nodes.extend(self.feed.view().nodes().map(|n| n.id));
        changes
            .nodes
            .extend(self.state.borrow().peers.keys().copied());
        self.arm();
    }

    fn note_batch(&mut self, batch: &AppliedBatch) {
        if batch.full_resync {
            self.lost_track();
        }
        for change in &batch.changes {
            match change {
                Change::NodeUpserted(id) | Change::NodeRemoved(id) => {
                    self.pending.changes.nodes.insert(*id);
                }
                Change::UserChanged(id) => {
                    self.pending.changes.users.insert(*id);
                }
                Change::PolicyChanged | Change::DnsChanged => self.pending.changes.full = true,
                Change::PendingChanged(_) => continue,
            }
            self.arm();
        }
    }

    /// Encodes what changed once and publishes it.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.last_flush = Some(Instant::now());
        let view = self.feed.view();
        let ctx = MapContext {
            view: &view,
            presence: &self.presence,
            settings: &self.settings,
        };
        let mut state = self.state.borrow().clone();
        let delta = state.advance(&ctx, view.clone(), &pending.changes);
        // Sessions answer from the new state from here on; compile the policy for its view
        // now, once, before they are told about the delta (one that asks meanwhile waits for
        // this compile rather than making its own).
        self.state.send_replace(state);
        ctx.keep_access();
        let delta = Arc::new(delta);
        // No receivers is fine: nobody is streaming.
        let receivers = self.deltas.send(delta.clone()).unwrap_or(0);
        let last = LastDelta {
            delta,
            receivers,
            taken_seen: 0,
        };
        if let Some(previous) = self.last_sent.replace(last) {
            previous.delta.release_shared();
        }
    }
}

fn encode(ctx: &MapContext<'_>, node: &Arc<Node>) -> PeerEntry {
    PeerEntry {
        node: node.clone(),
        json: ctx.peer_json(node),
    }
}

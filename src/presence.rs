//! Presence: which nodes hold a live map session on this member right now, with their
//! endpoints and home DERP region, plus what the other members reported about theirs.
//!
//! Per-member soft state, deliberately *not* replicated through Raft: it changes at the rate
//! clients roam and reconnect, and it dies with the member that holds the session. Each
//! member owns the entries of its own sessions; `last_seen` is written through Raft once
//! per disconnect. Changes are published on a bounded broadcast (the map hub turns them
//! into `OnlineChange` / `PeersChangedPatch` deltas) and kept in a bounded change log, so
//! other members long-poll for what changed since their last poll instead of the whole
//! table (`raft::presence_sync`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use crate::registry::NodeId;

/// How many presence changes may queue for the map hub before it lags (it then re-reads
/// every node's presence).
const PRESENCE_CHANNEL_CAPACITY: usize = 16_384;
/// How many local changes are remembered for members polling for deltas; one that fell
/// further behind gets the whole table.
const CHANGE_LOG_LEN: usize = 65_536;

/// A node's live state as seen by the member holding its session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePresence {
    /// The member id holding the node's map session.
    pub member: u64,
    /// Number of live streaming sessions (a reconnect may briefly overlap the old one).
    pub sessions: u32,
    pub endpoints: Vec<String>,
    /// `Hostinfo.NetInfo.PreferredDERP`; 0 = unknown.
    pub home_derp: i32,
    /// When the node came online on its member (ms since the Unix epoch, that member's
    /// clock, shared with the others): HA routes stay with the longest-online router.
    pub online_since: i64,
}

/// A presence fact published to the map hub: this node's presence changed. Readers take
/// the current state from `Presence`, so facts published out of order cannot mislead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceChange {
    Online(NodeId),
    Offline(NodeId),
    /// Endpoints or home DERP changed.
    Patched(NodeId),
}

impl PresenceChange {
    pub fn node(&self) -> NodeId {
        match self {
            PresenceChange::Online(id)
            | PresenceChange::Offline(id)
            | PresenceChange::Patched(id) => *id,
        }
    }
}

/// What changed locally since a version: each changed node's entry, or `None` if it no
/// longer has a session here.
pub struct LocalChanges {
    pub version: u64,
    /// `false`: `entries` is the whole table (the caller fell too far behind).
    pub delta: bool,
    pub entries: Vec<(NodeId, Option<NodePresence>)>,
}

#[derive(Default)]
struct Local {
    nodes: HashMap<NodeId, NodePresence>,
    version: u64,
    /// (version, node) per local change, oldest first.
    log: VecDeque<(u64, NodeId)>,
}

#[derive(Clone)]
pub struct Presence {
    member: u64,
    local: Arc<Mutex<Local>>,
    /// What other members reported about their own sessions (see `raft::presence_sync`).
    remote: Arc<Mutex<HashMap<u64, HashMap<NodeId, NodePresence>>>>,
    tx: broadcast::Sender<PresenceChange>,
    /// The local version, so other members can long-poll for news.
    version: watch::Sender<u64>,
}

impl Presence {
    pub fn new(member: u64) -> Self {
        let (tx, _) = broadcast::channel(PRESENCE_CHANNEL_CAPACITY);
        let (version, _) = watch::channel(0);
        Presence {
            member,
            local: Arc::default(),
            remote: Arc::default(),
            tx,
            version,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PresenceChange> {
        self.tx.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        // Every update below is a few inserts that cannot leave the maps inconsistent, so
        // recover from poisoning.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_remote(&self) -> MutexGuard<'_, HashMap<u64, HashMap<NodeId, NodePresence>>> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a local change under the lock (so changes of one node publish in order).
    fn changed_locally(&self, local: &mut Local, change: PresenceChange) {
        local.version += 1;
        local.log.push_back((local.version, change.node()));
        if local.log.len() > CHANGE_LOG_LEN {
            local.log.pop_front();
        }
        self.version.send_replace(local.version);
        // No receivers is fine: nobody is streaming.
        let _ = self.tx.send(change);
    }

    /// A streaming session started. Returns true if the node just came online here.
    pub fn session_started(&self, node: NodeId) -> bool {
        let mut local = self.lock();
        let entry = local.nodes.entry(node).or_insert_with(|| NodePresence {
            member: self.member,
            ..Default::default()
        });
        entry.sessions += 1;
        let came_online = entry.sessions == 1;
        if came_online {
            entry.online_since = crate::registry::Timestamp::now().0;
            self.changed_locally(&mut local, PresenceChange::Online(node));
        }
        came_online
    }

    /// A streaming session ended. Returns true if that was the node's last session here.
    pub fn session_ended(&self, node: NodeId) -> bool {
        let mut local = self.lock();
        let went_offline = match local.nodes.get_mut(&node) {
            Some(entry) if entry.sessions > 1 => {
                entry.sessions -= 1;
                false
            }
            Some(_) => {
                local.nodes.remove(&node);
                true
            }
            None => false,
        };
        if went_offline {
            // The client may already stream from another member (it moved).
            let change = if self.remote_online(node) {
                PresenceChange::Patched(node)
            } else {
                PresenceChange::Offline(node)
            };
            self.changed_locally(&mut local, change);
        }
        went_offline
    }

    /// Records endpoints and home DERP of a node streaming from this member; publishes only
    /// real changes. Updates for a node without a session here are ignored.
    pub fn update(&self, node: NodeId, endpoints: Option<Vec<String>>, home_derp: Option<i32>) {
        let mut local = self.lock();
        let Some(entry) = local.nodes.get_mut(&node) else {
            return;
        };
        let mut changed = false;
        if let Some(eps) = endpoints
            && eps != entry.endpoints
        {
            entry.endpoints = eps;
            changed = true;
        }
        if let Some(derp) = home_derp
            && derp != entry.home_derp
        {
            entry.home_derp = derp;
            changed = true;
        }
        if changed {
            self.changed_locally(&mut local, PresenceChange::Patched(node));
        }
    }

    fn remote_online(&self, node: NodeId) -> bool {
        self.lock_remote()
            .values()
            .any(|m| m.get(&node).is_some_and(|p| p.sessions > 0))
    }

    /// The node's live state: this member's session if it has one, else what the member
    /// holding its session reported.
    pub fn get(&self, node: NodeId) -> Option<NodePresence> {
        if let Some(p) = self.lock().nodes.get(&node).filter(|p| p.sessions > 0) {
            return Some(p.clone());
        }
        self.lock_remote()
            .values()
            .find_map(|m| m.get(&node))
            .cloned()
    }

    /// When `node` came online (see `NodePresence::online_since`); `None` when offline.
    pub fn online_since(&self, node: NodeId) -> Option<i64> {
        self.get(node)
            .filter(|p| p.sessions > 0)
            .map(|p| p.online_since)
    }

    /// Online anywhere in the cluster (as far as this member knows).
    pub fn is_online(&self, node: NodeId) -> bool {
        self.get(node).is_some_and(|p| p.sessions > 0)
    }

    /// The member holding the node's session, if it is online.
    pub fn member_of(&self, node: NodeId) -> Option<u64> {
        self.get(node).filter(|p| p.sessions > 0).map(|p| p.member)
    }

    /// Number of nodes with a live session on this member.
    pub fn online_count(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Every online node and the member holding its session: this member's own sessions,
    /// and what the other members last reported (a member silent for a few seconds counts
    /// as holding none).
    pub fn sessions(&self) -> BTreeMap<NodeId, u64> {
        let mut out = BTreeMap::new();
        for (member, nodes) in self.lock_remote().iter() {
            for (id, _) in nodes.iter().filter(|(_, p)| p.sessions > 0) {
                out.insert(*id, *member);
            }
        }
        for id in self.lock().nodes.keys() {
            out.insert(*id, self.member);
        }
        out
    }

    /// What changed locally after version `after`: the changed nodes' current entries, or
    /// the whole table if `after` is older than the change log.
    pub fn local_changes_since(&self, after: u64) -> LocalChanges {
        let local = self.lock();
        let oldest = local.log.front().map(|(v, _)| *v);
        let in_log = after <= local.version && oldest.is_none_or(|o| after + 1 >= o);
        if !in_log {
            return LocalChanges {
                version: local.version,
                delta: false,
                entries: local
                    .nodes
                    .iter()
                    .map(|(id, p)| (*id, Some(p.clone())))
                    .collect(),
            };
        }
        let mut changed: Vec<NodeId> = local
            .log
            .iter()
            .filter(|(v, _)| *v > after)
            .map(|(_, id)| *id)
            .collect();
        changed.sort_unstable();
        changed.dedup();
        LocalChanges {
            version: local.version,
            delta: true,
            entries: changed
                .into_iter()
                .map(|id| (id, local.nodes.get(&id).cloned()))
                .collect(),
        }
    }

    /// Waits until the local version differs from `after` (or `timeout` elapses).
    pub async fn wait_local_change(&self, after: u64, timeout: std::time::Duration) {
        let mut rx = self.version.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != after)).await;
    }

    /// Applies what `member` reported: its whole table (`delta` false) or the entries that
    /// changed (`None` = that node has no session there any more). Publishes what changed.
    pub fn apply_remote(
        &self,
        member: u64,
        delta: bool,
        entries: Vec<(NodeId, Option<NodePresence>)>,
    ) {
        let mut changed = Vec::new();
        {
            let mut remote = self.lock_remote();
            let table = remote.entry(member).or_default();
            if !delta {
                let reported: std::collections::HashSet<NodeId> =
                    entries.iter().map(|(id, _)| *id).collect();
                let gone: Vec<NodeId> = table
                    .keys()
                    .filter(|id| !reported.contains(id))
                    .copied()
                    .collect();
                for id in gone {
                    table.remove(&id);
                    changed.push(id);
                }
            }
            for (id, entry) in entries {
                let entry = entry
                    .filter(|p| p.sessions > 0)
                    .map(|p| NodePresence { member, ..p });
                let before = match &entry {
                    Some(p) => table.insert(id, p.clone()),
                    None => table.remove(&id),
                };
                if before != entry {
                    changed.push(id);
                }
            }
            if table.is_empty() {
                remote.remove(&member);
            }
        }
        let local = self.lock();
        for id in changed {
            // A session on this member wins over any report about the same node.
            if local.nodes.contains_key(&id) {
                continue;
            }
            let change = if self.remote_online(id) {
                PresenceChange::Patched(id)
            } else {
                PresenceChange::Offline(id)
            };
            let _ = self.tx.send(change);
        }
    }

    /// Forgets everything `member` reported (it stopped answering or left the cluster).
    pub fn forget_member(&self, member: u64) {
        self.apply_remote(member, false, Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(endpoint: &str) -> NodePresence {
        NodePresence {
            member: 0,
            sessions: 1,
            endpoints: vec![endpoint.into()],
            home_derp: 900,
            online_since: 0,
        }
    }

    #[test]
    fn overlapping_sessions_count_once_online() {
        let p = Presence::new(1);
        let mut rx = p.subscribe();
        assert!(p.session_started(NodeId(7)));
        assert!(!p.session_started(NodeId(7)));
        assert!(!p.session_ended(NodeId(7)));
        assert!(p.is_online(NodeId(7)));
        assert!(p.session_ended(NodeId(7)));
        assert!(!p.is_online(NodeId(7)));
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Online(NodeId(7)));
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Offline(NodeId(7)));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn unchanged_endpoints_publish_nothing_and_no_session_no_entry() {
        let p = Presence::new(1);
        p.update(NodeId(2), Some(vec!["127.0.0.1:1".into()]), Some(900));
        assert!(
            p.get(NodeId(2)).is_none(),
            "no session here: nothing recorded"
        );
        p.session_started(NodeId(1));
        let mut rx = p.subscribe();
        p.update(NodeId(1), Some(vec!["127.0.0.1:41641".into()]), Some(900));
        p.update(NodeId(1), Some(vec!["127.0.0.1:41641".into()]), Some(900));
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Patched(NodeId(1)));
        assert!(rx.try_recv().is_err());
        assert_eq!(p.get(NodeId(1)).unwrap().home_derp, 900);
        p.session_ended(NodeId(1));
        assert_eq!(
            p.online_count(),
            0,
            "an ended session leaves no entry behind"
        );
    }

    #[test]
    fn members_exchange_only_what_changed() {
        let p = Presence::new(1);
        p.session_started(NodeId(1));
        p.session_started(NodeId(2));
        let all = p.local_changes_since(u64::MAX);
        assert!(!all.delta, "an unknown version gets the whole table");
        assert_eq!(all.entries.len(), 2);
        let v = all.version;
        p.update(NodeId(2), Some(vec!["127.0.0.1:2".into()]), None);
        p.session_ended(NodeId(1));
        let changes = p.local_changes_since(v);
        assert!(changes.delta);
        let mut entries = changes.entries;
        entries.sort_by_key(|(id, _)| *id);
        assert_eq!(entries.len(), 2, "two nodes changed, nothing else is sent");
        assert_eq!(entries[0], (NodeId(1), None));
        assert_eq!(
            entries[1].1.as_ref().unwrap().endpoints,
            vec!["127.0.0.1:2"]
        );
        let nothing = p.local_changes_since(changes.version);
        assert!(nothing.delta && nothing.entries.is_empty());
    }

    #[test]
    fn remote_sessions_are_merged_from_tables_and_deltas() {
        let p = Presence::new(1);
        let mut rx = p.subscribe();
        p.apply_remote(2, false, vec![(NodeId(5), Some(remote("127.0.0.2:1")))]);
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Patched(NodeId(5)));
        assert_eq!(p.member_of(NodeId(5)), Some(2));
        assert_eq!(p.online_count(), 0, "remote sessions are not local");
        assert_eq!(p.sessions().get(&NodeId(5)), Some(&2));
        p.apply_remote(2, true, vec![(NodeId(5), Some(remote("127.0.0.2:1")))]);
        assert!(
            rx.try_recv().is_err(),
            "an unchanged report publishes nothing"
        );
        p.apply_remote(2, true, vec![(NodeId(6), Some(remote("127.0.0.2:2")))]);
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Patched(NodeId(6)));
        assert!(
            p.is_online(NodeId(5)),
            "a delta keeps what it does not mention"
        );
        p.apply_remote(2, true, vec![(NodeId(5), None)]);
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Offline(NodeId(5)));
        // The node moves here: the local session wins, losing the remote one is no news.
        p.session_started(NodeId(6));
        assert_eq!(p.member_of(NodeId(6)), Some(1));
        let _ = rx.try_recv();
        p.forget_member(2);
        assert!(rx.try_recv().is_err());
        assert!(p.is_online(NodeId(6)));
    }
}

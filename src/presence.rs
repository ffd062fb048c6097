//! Presence: which nodes hold a live map session on this member right now, with their
//! endpoints and home DERP region.
//!
//! Per-member soft state, deliberately *not* replicated through Raft: it changes at the rate
//! clients roam and reconnect, and it dies with the member that holds the session. Each
//! member owns the entries of its own sessions; `last_seen` is written through Raft once
//! per disconnect. Changes are published on a bounded broadcast so map sessions can send
//! `PeersChangedPatch` / online deltas without rebuilding netmaps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::registry::NodeId;

/// How many presence updates may queue for a slow map session before it lags; a lagged
/// session resynchronises by sending the client a full netmap.
const PRESENCE_CHANNEL_CAPACITY: usize = 4096;

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
}

/// A presence fact published to map sessions.
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

#[derive(Clone)]
pub struct Presence {
    member: u64,
    inner: Arc<Mutex<HashMap<NodeId, NodePresence>>>,
    /// What other members reported about their own sessions (see `raft::presence_sync`).
    remote: Arc<Mutex<HashMap<u64, HashMap<NodeId, NodePresence>>>>,
    tx: broadcast::Sender<PresenceChange>,
    /// Bumped on every local change, so other members can long-poll for news.
    version: watch::Sender<u64>,
}

impl Presence {
    pub fn new(member: u64) -> Self {
        let (tx, _) = broadcast::channel(PRESENCE_CHANNEL_CAPACITY);
        let (version, _) = watch::channel(0);
        Presence {
            member,
            inner: Arc::default(),
            remote: Arc::default(),
            tx,
            version,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PresenceChange> {
        self.tx.subscribe()
    }

    fn publish(&self, change: PresenceChange) {
        // No receivers is fine: nobody is streaming.
        let _ = self.tx.send(change);
    }

    /// A local session state changed: tell map sessions and long-polling members.
    fn publish_local(&self, change: PresenceChange) {
        self.version.send_modify(|v| *v += 1);
        self.publish(change);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, NodePresence>> {
        // A panic while holding this lock cannot leave the map inconsistent (every update is
        // one insert or remove), so recover from poisoning.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A streaming session started. Returns true if the node just came online.
    pub fn session_started(&self, node: NodeId) -> bool {
        let came_online = {
            let mut map = self.lock();
            let entry = map.entry(node).or_insert_with(|| NodePresence {
                member: self.member,
                ..Default::default()
            });
            entry.sessions += 1;
            entry.sessions == 1
        };
        if came_online {
            self.publish_local(PresenceChange::Online(node));
        }
        came_online
    }

    /// A streaming session ended. Returns true if that was the node's last session.
    pub fn session_ended(&self, node: NodeId) -> bool {
        let went_offline = {
            let mut map = self.lock();
            match map.get_mut(&node) {
                Some(entry) if entry.sessions > 1 => {
                    entry.sessions -= 1;
                    false
                }
                Some(_) => {
                    map.remove(&node);
                    true
                }
                None => false,
            }
        };
        if went_offline {
            // The client may already stream from another member (it moved).
            let change = if self.is_online(node) {
                PresenceChange::Patched(node)
            } else {
                PresenceChange::Offline(node)
            };
            self.publish_local(change);
        }
        went_offline
    }

    /// Records endpoints and home DERP from a lite update; publishes only real changes.
    pub fn update(&self, node: NodeId, endpoints: Option<Vec<String>>, home_derp: Option<i32>) {
        let changed = {
            let mut map = self.lock();
            let entry = map.entry(node).or_insert_with(|| NodePresence {
                member: self.member,
                ..Default::default()
            });
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
            changed
        };
        if changed {
            self.publish_local(PresenceChange::Patched(node));
        }
    }

    /// The node's live state: this member's session if it has one, else what the member
    /// holding its session reported.
    pub fn get(&self, node: NodeId) -> Option<NodePresence> {
        if let Some(p) = self.lock().get(&node).filter(|p| p.sessions > 0) {
            return Some(p.clone());
        }
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        remote.values().find_map(|m| m.get(&node)).cloned()
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
        self.lock().values().filter(|p| p.sessions > 0).count()
    }

    /// Every online node and the member holding its session: this member's own sessions,
    /// and what the other members last reported (a member silent for a few seconds counts
    /// as holding none).
    pub fn sessions(&self) -> std::collections::BTreeMap<NodeId, u64> {
        let mut out = std::collections::BTreeMap::new();
        {
            let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            for (member, nodes) in remote.iter() {
                for (id, _) in nodes.iter().filter(|(_, p)| p.sessions > 0) {
                    out.insert(*id, *member);
                }
            }
        }
        for (id, p) in self.lock().iter().filter(|(_, p)| p.sessions > 0) {
            out.insert(*id, p.member);
        }
        out
    }

    /// This member's own sessions with the version they were read at.
    pub fn local_snapshot(&self) -> (u64, Vec<(NodeId, NodePresence)>) {
        let version = *self.version.borrow();
        let entries = self
            .lock()
            .iter()
            .filter(|(_, p)| p.sessions > 0)
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        (version, entries)
    }

    /// Waits until the local version differs from `after` (or `timeout` elapses).
    pub async fn wait_local_change(&self, after: u64, timeout: std::time::Duration) {
        let mut rx = self.version.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != after)).await;
    }

    /// Replaces what `member` reported about its sessions, publishing what changed.
    pub fn apply_remote(&self, member: u64, entries: Vec<(NodeId, NodePresence)>) {
        let new: HashMap<NodeId, NodePresence> = entries
            .into_iter()
            .map(|(id, p)| (id, NodePresence { member, ..p }))
            .collect();
        let old = {
            let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            if new.is_empty() {
                remote.remove(&member)
            } else {
                remote.insert(member, new.clone())
            }
        }
        .unwrap_or_default();
        let mut changes = Vec::new();
        for (id, p) in &new {
            match old.get(id) {
                None => changes.push(PresenceChange::Online(*id)),
                Some(o) if o != p => changes.push(PresenceChange::Patched(*id)),
                Some(_) => {}
            }
        }
        changes.extend(
            old.keys()
                .filter(|id| !new.contains_key(id))
                .map(|id| PresenceChange::Offline(*id)),
        );
        if changes.is_empty() {
            return;
        }
        // A session on this member wins over any report about the same node.
        let shadowed: std::collections::HashSet<NodeId> = {
            let local = self.lock();
            changes
                .iter()
                .map(PresenceChange::node)
                .filter(|id| local.get(id).is_some_and(|p| p.sessions > 0))
                .collect()
        };
        for change in changes {
            let id = change.node();
            let still_online = matches!(change, PresenceChange::Offline(_)) && self.is_online(id);
            if !shadowed.contains(&id) && !still_online {
                self.publish(change);
            }
        }
    }

    /// Forgets a node (it was deleted).
    pub fn forget(&self, node: NodeId) {
        self.lock().remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unchanged_endpoints_publish_nothing() {
        let p = Presence::new(1);
        p.session_started(NodeId(1));
        let mut rx = p.subscribe();
        p.update(NodeId(1), Some(vec!["127.0.0.1:41641".into()]), Some(900));
        p.update(NodeId(1), Some(vec!["127.0.0.1:41641".into()]), Some(900));
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Patched(NodeId(1)));
        assert!(rx.try_recv().is_err());
        assert_eq!(p.get(NodeId(1)).unwrap().home_derp, 900);
    }

    #[test]
    fn remote_sessions_are_merged_and_diffed() {
        let p = Presence::new(1);
        let mut rx = p.subscribe();
        let remote = NodePresence {
            member: 0,
            sessions: 1,
            endpoints: vec!["127.0.0.2:41641".into()],
            home_derp: 900,
        };
        p.apply_remote(2, vec![(NodeId(5), remote.clone())]);
        assert_eq!(rx.try_recv().unwrap(), PresenceChange::Online(NodeId(5)));
        assert_eq!(p.member_of(NodeId(5)), Some(2));
        assert_eq!(p.online_count(), 0, "remote sessions are not local");
        assert_eq!(p.sessions().get(&NodeId(5)), Some(&2));
        p.apply_remote(2, vec![(NodeId(5), remote.clone())]);
        assert!(
            rx.try_recv().is_err(),
            "an unchanged report publishes nothing"
        );
        // The node moves here: the local session wins, and losing the remote one is no news.
        p.session_started(NodeId(5));
        assert_eq!(p.member_of(NodeId(5)), Some(1));
        let _ = rx.try_recv();
        p.apply_remote(2, vec![]);
        assert!(rx.try_recv().is_err());
        assert!(p.is_online(NodeId(5)));
    }
}

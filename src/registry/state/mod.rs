//! `Registry`: the applied state, `apply`, queries, and the record encoding the state
//! machine persists.
//!
//! Every collection is a persistent ordered map (`imbl`; B-trees stay denser than its
//! hash tries at tens of thousands of entries), so cloning the registry to publish an
//! immutable view after each applied batch costs O(1), and every lookup the control plane
//! makes per request (node key, machine key, user name, key prefix) has an index.

mod commands;
mod records;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};

use super::change::{Change, Record};
use super::command::{Outcome, Rejection, Request, RequestId};
use super::types::*;

/// How long the outcome of a write is remembered, by the entries' stamps: far longer than
/// any retry of a forward (seconds), so a retried write is always recognised.
const RECENT_WINDOW_MS: i64 = 10 * 60 * 1000;
/// At most this many outcomes are remembered; the oldest go first.
const RECENT_MAX: usize = 100_000;
/// The audit log keeps this many records; older ones are dropped (about 30 MiB).
pub const AUDIT_MAX: usize = 100_000;
/// Policy versions kept for `policy history` and `policy rollback`; older ones go.
pub const POLICY_VERSIONS_MAX: usize = 100;

/// Counters, stored as one record that most creating writes rewrite. The policy and DNS
/// settings, which can be large and change rarely, are records of their own (see
/// `records::Layout` for snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    next_user: u64,
    next_node: u64,
    next_preauth: u64,
    next_api: u64,
    /// The last address handed out; allocation continues after it, so a freed address is
    /// not given to the next node at once (peers may still hold the old node).
    #[serde(default)]
    last_v4: Option<Ipv4Addr>,
    #[serde(default)]
    last_v6: Option<Ipv6Addr>,
}

/// A stored record failed to decode: the data dir is damaged or from an incompatible
/// version. Fatal for the member.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("record {key:?} could not be decoded")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown record key {0:?}")]
    UnknownKey(String),
}

/// The result of applying one log entry.
#[derive(Debug)]
pub struct Applied {
    /// One per proposal, in order.
    pub outcomes: Vec<Outcome>,
    pub changes: Vec<Change>,
    pub records: Vec<Record>,
}

/// The remembered outcome of a recent write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Recent {
    at: Timestamp,
    outcome: Remembered,
}

/// An outcome as remembered for a retry: a node by its id (the retry is answered with the
/// node as it is then — the write happened once, the node may have changed since), any
/// other outcome whole. Keeps the memory of a burst of registrations small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Remembered {
    Node(NodeId),
    /// Boxed: most outcomes remembered are nodes, and an `Outcome` inline would make every
    /// remembered write as large as the largest one (a burst of 10,000 registrations is
    /// remembered on every member for ten minutes).
    Outcome(Box<Outcome>),
}

/// The whole applied registry. Cloning is O(1) (persistent maps), so the state machine
/// publishes an immutable view after each batch of applied entries.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    meta: Arc<Meta>,
    /// The running policy's text (empty: none).
    policy: Arc<str>,
    /// The same, parsed (`None` when empty or unparsable). A registration that asks for tags
    /// looks up their owners in it: parsing a large policy each time cost milliseconds on
    /// every member.
    parsed_policy: Option<Arc<crate::policy::Policy>>,
    dns: Option<Arc<DnsSettings>>,
    /// The cluster-wide settings; `None` until the first `InitSettings` is applied.
    settings: Option<Arc<ClusterSettings>>,
    /// The latest entry stamp applied: the cluster's clock, which never goes backwards.
    clock: Timestamp,
    // Values are `Arc`s and string keys `Arc<str>`: a persistent map copies the nodes on
    // a changed path, and a copy must cost reference counts, not deep clones.
    users: OrdMap<UserId, Arc<User>>,
    nodes: OrdMap<NodeId, Arc<Node>>,
    preauth_keys: OrdMap<PreAuthKeyId, Arc<PreAuthKey>>,
    api_keys: OrdMap<ApiKeyId, Arc<ApiKey>>,
    pending: OrdMap<Arc<str>, Arc<PendingRegistration>>,
    recent: OrdMap<RequestId, Arc<Recent>>,
    audit: OrdMap<u64, Arc<AuditRecord>>,
    /// Accepted policies, newest last (at most `POLICY_VERSIONS_MAX`).
    policy_versions: OrdMap<u64, Arc<PolicyVersion>>,
    next_audit: u64,
    /// Each member's DERP public key, as the member pinned it.
    member_derp_keys: OrdMap<u64, [u8; 32]>,
    // Indexes, rebuilt from the records above on load.
    user_by_name: OrdMap<Arc<str>, UserId>,
    preauth_by_prefix: OrdMap<Arc<str>, PreAuthKeyId>,
    api_by_prefix: OrdMap<Arc<str>, ApiKeyId>,
    node_by_name: OrdMap<Arc<str>, NodeId>,
    by_node_key: OrdMap<NodeKey, NodeId>,
    by_machine_key: OrdMap<MachineKey, NodeId>,
    pending_by_expiry: OrdSet<(Timestamp, Arc<str>)>,
    /// The open (not completed) interactive registration of each machine: at most one.
    pending_by_machine: OrdMap<MachineKey, Arc<str>>,
    recent_by_age: OrdSet<(Timestamp, RequestId)>,
    used_v4: OrdSet<Ipv4Addr>,
    used_v6: OrdSet<Ipv6Addr>,
}

/// Accumulates what one entry touched.
#[derive(Default)]
struct Effects {
    changes: Vec<Change>,
    records: Vec<Record>,
}

impl Effects {
    fn node(&mut self, id: NodeId) {
        self.changes.push(Change::NodeUpserted(id));
        self.records.push(Record::Node(id));
    }
    fn node_removed(&mut self, id: NodeId) {
        self.changes.push(Change::NodeRemoved(id));
        self.records.push(Record::Node(id));
    }
}

impl Registry {
    /// A registry whose cluster settings are already recorded (tests, benches, tools);
    /// members start from `Registry::default()` and learn the settings from the log.
    pub fn new(settings: ClusterSettings) -> Self {
        Registry {
            settings: Some(Arc::new(settings)),
            ..Default::default()
        }
    }

    // ----- queries -----

    /// The cluster-wide settings, once recorded.
    pub fn settings(&self) -> Option<&ClusterSettings> {
        self.settings.as_deref()
    }
    /// The stamp of the latest applied entry (the cluster's clock as of this view).
    pub fn clock(&self) -> Timestamp {
        self.clock
    }
    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values().map(|u| &**u)
    }
    pub fn user(&self, id: UserId) -> Option<&User> {
        self.users.get(&id).map(|u| &**u)
    }
    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.user_by_name.get(name).and_then(|id| self.user(*id))
    }
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }
    /// The users as a persistent map (cheap to clone; `ptr_eq` tells an unchanged set).
    pub fn user_map(&self) -> &OrdMap<UserId, Arc<User>> {
        &self.users
    }
    /// The nodes as a persistent map (cheap to clone; `ptr_eq` tells an unchanged set).
    pub fn node_map(&self) -> &OrdMap<NodeId, Arc<Node>> {
        &self.nodes
    }
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn node(&self, id: NodeId) -> Option<&Arc<Node>> {
        self.nodes.get(&id)
    }
    pub fn node_by_key(&self, key: &NodeKey) -> Option<&Arc<Node>> {
        self.by_node_key.get(key).and_then(|id| self.nodes.get(id))
    }
    pub fn node_by_machine(&self, key: &MachineKey) -> Option<&Arc<Node>> {
        self.by_machine_key
            .get(key)
            .and_then(|id| self.nodes.get(id))
    }
    pub fn preauth_keys(&self) -> impl Iterator<Item = &PreAuthKey> {
        self.preauth_keys.values().map(|k| &**k)
    }
    pub fn preauth_key(&self, id: PreAuthKeyId) -> Option<&PreAuthKey> {
        self.preauth_keys.get(&id).map(|k| &**k)
    }
    pub fn preauth_key_by_prefix(&self, prefix: &str) -> Option<&PreAuthKey> {
        self.preauth_by_prefix
            .get(prefix)
            .and_then(|id| self.preauth_key(*id))
    }
    pub fn api_keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.api_keys.values().map(|k| &**k)
    }
    pub fn api_key_by_prefix(&self, prefix: &str) -> Option<&ApiKey> {
        self.api_by_prefix
            .get(prefix)
            .and_then(|id| self.api_keys.get(id))
            .map(|k| &**k)
    }
    pub fn pending(&self, auth_id: &str) -> Option<&PendingRegistration> {
        self.pending.get(auth_id).map(|p| &**p)
    }
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }
    /// Audit records from `since` on (oldest first).
    pub fn audit_since(&self, since: Timestamp) -> impl Iterator<Item = &AuditRecord> {
        self.audit
            .values()
            .map(|r| &**r)
            .filter(move |r| r.at >= since)
    }
    /// The number of audit records and the time of the oldest.
    pub fn audit_extent(&self) -> (usize, Option<Timestamp>) {
        (self.audit.len(), self.audit.get_min().map(|(_, r)| r.at))
    }
    /// The DERP key member `id` pinned, if it has.
    pub fn member_derp_key(&self, id: u64) -> Option<&[u8; 32]> {
        self.member_derp_keys.get(&id)
    }
    /// The machine's open interactive registration, if it has one.
    pub fn pending_for_machine(&self, machine: &MachineKey) -> Option<&PendingRegistration> {
        let id = self.pending_by_machine.get(machine)?;
        self.pending(id)
    }
    pub fn dns(&self) -> Option<&DnsSettings> {
        self.dns.as_deref()
    }
    /// Kept policy versions, oldest first.
    pub fn policy_versions(&self) -> impl Iterator<Item = &PolicyVersion> {
        self.policy_versions.values().map(|p| p.as_ref())
    }
    pub fn policy_version(&self, version: u64) -> Option<&PolicyVersion> {
        self.policy_versions.get(&version).map(|p| p.as_ref())
    }
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The running policy's text, shared: views of the same policy share one allocation,
    /// so comparing them is a pointer comparison.
    pub fn policy_text(&self) -> &Arc<str> {
        &self.policy
    }

    /// The running policy, parsed (`None` when there is none or it does not parse).
    pub fn parsed_policy(&self) -> Option<&Arc<crate::policy::Policy>> {
        self.parsed_policy.as_ref()
    }

    /// Makes `text` the running policy (the caller records the change).
    fn set_policy_text(&mut self, text: Arc<str>) {
        self.parsed_policy = if text.trim().is_empty() {
            None
        } else {
            crate::policy::Policy::parse(&text).ok().map(Arc::new)
        };
        self.policy = text;
    }
    /// Outcomes remembered for retried writes (bounded by time and count).
    pub fn recent_count(&self) -> usize {
        self.recent.len()
    }

    /// Checks a pre-auth key before proposing a registration, so a bad key is refused
    /// without touching the log. `apply` checks again: the log decides.
    pub fn check_preauth_key(
        &self,
        prefix: &str,
        hash: &SecretHash,
        machine: &MachineKey,
        now: Timestamp,
    ) -> Result<&PreAuthKey, Rejection> {
        let key = self
            .preauth_key_by_prefix(prefix)
            .filter(|k| k.hash.matches(hash))
            .ok_or(Rejection::PreAuthKeyNotFound)?;
        if key.is_expired(now) {
            return Err(Rejection::PreAuthKeyExpired {
                prefix: key.prefix.clone(),
                expired_at: key.expiration.unwrap_or_default(),
            });
        }
        // The machine that used a single-use key may present it again (a client that lost
        // its state re-registers), but not to revive a node that was expired or logged out.
        let reauth_same_machine = self
            .node_by_machine(machine)
            .is_some_and(|n| n.auth_key == Some(key.id) && !n.is_expired(now));
        if key.used && !key.reusable && !reauth_same_machine {
            return Err(Rejection::PreAuthKeyUsed(key.prefix.clone()));
        }
        Ok(key)
    }

    // ----- apply -----

    /// Applies one log entry. Deterministic: uses only `req` and the current state. Each
    /// proposal gets an outcome; a refusal is `Outcome::Rejected` and changes nothing; a
    /// proposal whose id was applied before gets its first outcome again and changes
    /// nothing.
    pub fn apply(&mut self, req: &Request) -> Applied {
        let mut fx = Effects::default();
        let now = self.advance_clock(req.at, &mut fx);
        self.expire_pending(now, &mut fx);
        self.forget_old_outcomes(now, &mut fx);
        let mut outcomes = Vec::with_capacity(req.proposals.len());
        for proposal in req.proposals.iter() {
            if let Some(first) = self.recent.get(&proposal.id) {
                outcomes.push(self.recall(&first.outcome));
                continue;
            }
            let outcome = self
                .apply_command(&proposal.command, now, &mut fx)
                .unwrap_or_else(Outcome::Rejected);
            if let Some(actor) = &proposal.actor {
                self.audit_action(actor, &proposal.command, &outcome, now, &mut fx);
            }
            self.remember(proposal.id, now, outcome.clone(), &mut fx);
            outcomes.push(outcome);
        }
        Applied {
            outcomes,
            changes: fx.changes,
            records: fx.records,
        }
    }

    /// The entry's stamp, or the last applied one if that is later: time never goes
    /// backwards, even across a leader change to a member with a slower clock.
    fn advance_clock(&mut self, at: Timestamp, fx: &mut Effects) -> Timestamp {
        if at > self.clock {
            self.clock = at;
            fx.records.push(Record::Clock);
        }
        self.clock
    }

    fn expire_pending(&mut self, now: Timestamp, fx: &mut Effects) {
        while let Some((at, id)) = self.pending_by_expiry.get_min().cloned() {
            if at > now {
                break;
            }
            self.remove_pending(&id);
            fx.records.push(Record::Pending(id.to_string()));
            fx.changes.push(Change::PendingChanged(id.to_string()));
        }
    }

    /// Appends an admin action to the audit log, dropping the oldest past `AUDIT_MAX`.
    fn audit_action(
        &mut self,
        actor: &str,
        command: &crate::registry::command::Command,
        outcome: &Outcome,
        now: Timestamp,
        fx: &mut Effects,
    ) {
        let result = match outcome {
            Outcome::Rejected(r) => r.to_string(),
            _ => "ok".into(),
        };
        self.append_audit(
            AuditRecord {
                seq: 0,
                at: now,
                actor: actor.into(),
                action: command.name().into(),
                target: command.target(),
                result,
            },
            fx,
        );
    }

    fn append_audit(&mut self, mut record: AuditRecord, fx: &mut Effects) {
        record.seq = self.next_audit;
        self.next_audit += 1;
        fx.records.push(Record::Audit(record.seq));
        self.audit.insert(record.seq, Arc::new(record));
        while self.audit.len() > AUDIT_MAX {
            let Some((oldest, _)) = self.audit.get_min().map(|(k, v)| (*k, v.clone())) else {
                break;
            };
            self.audit.remove(&oldest);
            fx.records.push(Record::Audit(oldest));
        }
    }

    /// Drops audit records older than `before`, then the oldest beyond `keep_at_most`.
    fn prune_audit(&mut self, before: Timestamp, keep_at_most: u64, fx: &mut Effects) {
        while let Some((seq, at)) = self.audit.get_min().map(|(k, r)| (*k, r.at)) {
            let over = self.audit.len() as u64 > keep_at_most;
            if at >= before && !over {
                break;
            }
            self.audit.remove(&seq);
            fx.records.push(Record::Audit(seq));
        }
    }

    fn set_member_derp_key(&mut self, member: u64, key: [u8; 32], fx: &mut Effects) {
        if self.member_derp_keys.get(&member) != Some(&key) {
            self.member_derp_keys.insert(member, key);
            fx.records.push(Record::MemberDerpKey(member));
        }
    }

    fn recall(&self, remembered: &Remembered) -> Outcome {
        match remembered {
            Remembered::Node(id) => match self.nodes.get(id) {
                Some(node) => Outcome::Node(Box::new((**node).clone())),
                None => Outcome::Rejected(Rejection::NodeNotFound(*id)),
            },
            Remembered::Outcome(outcome) => (**outcome).clone(),
        }
    }

    fn remember(&mut self, id: RequestId, now: Timestamp, outcome: Outcome, fx: &mut Effects) {
        let outcome = match outcome {
            Outcome::Node(node) => Remembered::Node(node.id),
            other => Remembered::Outcome(Box::new(other)),
        };
        self.recent
            .insert(id, Arc::new(Recent { at: now, outcome }));
        self.recent_by_age.insert((now, id));
        fx.records.push(Record::Recent(id));
        while self.recent.len() > RECENT_MAX {
            let Some((at, oldest)) = self.recent_by_age.get_min().cloned() else {
                break;
            };
            self.recent_by_age.remove(&(at, oldest));
            self.recent.remove(&oldest);
            fx.records.push(Record::Recent(oldest));
        }
    }

    fn forget_old_outcomes(&mut self, now: Timestamp, fx: &mut Effects) {
        let horizon = now.plus_millis(-RECENT_WINDOW_MS);
        while let Some((at, id)) = self.recent_by_age.get_min().cloned() {
            if at >= horizon {
                break;
            }
            self.recent_by_age.remove(&(at, id));
            self.recent.remove(&id);
            fx.records.push(Record::Recent(id));
        }
    }

    fn insert_pending(&mut self, pending: PendingRegistration) {
        self.remove_pending(&pending.auth_id);
        let id: Arc<str> = pending.auth_id.as_str().into();
        self.pending_by_expiry
            .insert((pending.expires_at, id.clone()));
        if pending.node.is_none() {
            self.pending_by_machine
                .insert(pending.request.machine_key, id.clone());
        }
        self.pending.insert(id, Arc::new(pending));
    }

    fn remove_pending(&mut self, auth_id: &str) -> Option<Arc<PendingRegistration>> {
        let old = self.pending.remove(auth_id)?;
        self.pending_by_expiry
            .remove(&(old.expires_at, old.auth_id.as_str().into()));
        let machine = &old.request.machine_key;
        if self
            .pending_by_machine
            .get(machine)
            .is_some_and(|id| **id == *auth_id)
        {
            self.pending_by_machine.remove(machine);
        }
        Some(old)
    }

    fn unindex(&mut self, node: &Node) {
        self.by_node_key.remove(&node.node_key);
        self.by_machine_key.remove(&node.machine_key);
        if self.node_by_name.get(node.given_name.as_str()) == Some(&node.id) {
            self.node_by_name.remove(node.given_name.as_str());
        }
        if let Some(ip) = node.ipv4 {
            self.used_v4.remove(&ip);
        }
        if let Some(ip) = node.ipv6 {
            self.used_v6.remove(&ip);
        }
    }

    fn index(&mut self, node: &Node) {
        self.by_node_key.insert(node.node_key, node.id);
        self.by_machine_key.insert(node.machine_key, node.id);
        self.node_by_name
            .insert(node.given_name.as_str().into(), node.id);
        if let Some(ip) = node.ipv4 {
            self.used_v4.insert(ip);
        }
        if let Some(ip) = node.ipv6 {
            self.used_v6.insert(ip);
        }
    }

    /// Whether two registries hold the same data (indexes excluded), for tests and checks.
    pub fn same_data(&self, other: &Registry) -> bool {
        self.all_records() == other.all_records()
    }

    /// Whether two registries hold the same users, nodes, keys and settings, ignoring the
    /// clock and remembered outcomes (which every applied proposal updates, refused or not).
    pub fn same_entities(&self, other: &Registry) -> bool {
        let entities = |r: &Registry| {
            r.all_records()
                .into_iter()
                .filter(|(k, _)| !k.starts_with(b"recent/") && k.as_slice() != b"clock")
                .collect::<Vec<_>>()
        };
        entities(self) == entities(other)
    }
}

#[cfg(test)]
mod tests;

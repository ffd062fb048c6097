//! `Registry`: the applied state, `apply`, queries, and the record encoding the state
//! machine persists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::change::{Change, Record};
use super::command::{Command, NodeAuth, Outcome, Rejection, Request};
use super::types::*;
use super::{ipalloc, names};

/// Settings every member must share, fixed at start from config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrySettings {
    pub prefix_v4: Option<Ipv4Net>,
    pub prefix_v6: Option<Ipv6Net>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            prefix_v4: Some("100.64.0.0/10".parse().expect("valid literal")),
            prefix_v6: Some("fd7a:115c:a1e0::/48".parse().expect("valid literal")),
        }
    }
}

/// Counters and singletons, stored as one record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    next_user: u64,
    next_node: u64,
    next_preauth: u64,
    next_api: u64,
    dns: Option<DnsSettings>,
    policy: String,
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

/// The result of applying one command.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    pub changes: Vec<Change>,
    pub records: Vec<Record>,
}

/// The whole applied registry. Cheap to clone (nodes are shared), so the state machine can
/// publish an immutable view after each batch of applied entries.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    settings: RegistrySettings,
    meta: Meta,
    users: BTreeMap<UserId, User>,
    nodes: BTreeMap<NodeId, Arc<Node>>,
    preauth_keys: BTreeMap<PreAuthKeyId, PreAuthKey>,
    api_keys: BTreeMap<ApiKeyId, ApiKey>,
    pending: BTreeMap<String, PendingRegistration>,
    // Indexes, rebuilt from the records above on load.
    by_node_key: HashMap<NodeKey, NodeId>,
    by_machine_key: HashMap<MachineKey, NodeId>,
    used_v4: BTreeSet<Ipv4Addr>,
    used_v6: BTreeSet<Ipv6Addr>,
}

/// Accumulates what one command touched.
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

fn validate_tags(tags: &[String]) -> Result<(), Rejection> {
    for tag in tags {
        let name = tag.strip_prefix("tag:").unwrap_or("");
        if names::validate_label(name).is_err() {
            return Err(Rejection::InvalidTag(tag.clone()));
        }
    }
    Ok(())
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Self {
        Registry {
            settings,
            ..Default::default()
        }
    }

    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    // ----- queries -----

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }
    pub fn user(&self, id: UserId) -> Option<&User> {
        self.users.get(&id)
    }
    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.values().find(|u| u.name == name)
    }
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
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
        self.preauth_keys.values()
    }
    pub fn preauth_key(&self, id: PreAuthKeyId) -> Option<&PreAuthKey> {
        self.preauth_keys.get(&id)
    }
    pub fn preauth_key_by_prefix(&self, prefix: &str) -> Option<&PreAuthKey> {
        self.preauth_keys.values().find(|k| k.prefix == prefix)
    }
    pub fn api_keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.api_keys.values()
    }
    pub fn api_key_by_prefix(&self, prefix: &str) -> Option<&ApiKey> {
        self.api_keys.values().find(|k| k.prefix == prefix)
    }
    pub fn pending(&self, auth_id: &str) -> Option<&PendingRegistration> {
        self.pending.get(auth_id)
    }
    pub fn dns(&self) -> Option<&DnsSettings> {
        self.meta.dns.as_ref()
    }
    pub fn policy(&self) -> &str {
        &self.meta.policy
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
        let reauth_same_machine = self
            .node_by_machine(machine)
            .is_some_and(|n| n.auth_key == Some(key.id));
        if key.used && !key.reusable && !reauth_same_machine {
            return Err(Rejection::PreAuthKeyUsed(key.prefix.clone()));
        }
        Ok(key)
    }

    // ----- apply -----

    /// Applies one stamped command. Deterministic: uses only `req` and the current state.
    /// A refusal is returned as `Outcome::Rejected` and changes nothing.
    pub fn apply(&mut self, req: &Request) -> Applied {
        let mut fx = Effects::default();
        let now = req.at;
        self.expire_pending(now, &mut fx);
        let outcome = match self.apply_command(&req.command, now, &mut fx) {
            Ok(outcome) => outcome,
            Err(rejection) => Outcome::Rejected(rejection),
        };
        Applied {
            outcome,
            changes: fx.changes,
            records: fx.records,
        }
    }

    fn expire_pending(&mut self, now: Timestamp, fx: &mut Effects) {
        let expired: Vec<String> = self
            .pending
            .values()
            .filter(|p| p.expires_at <= now)
            .map(|p| p.auth_id.clone())
            .collect();
        for id in expired {
            self.pending.remove(&id);
            fx.records.push(Record::Pending(id.clone()));
            fx.changes.push(Change::PendingChanged(id));
        }
    }

    fn apply_command(
        &mut self,
        cmd: &Command,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        match cmd {
            Command::Noop => Ok(Outcome::Done),
            Command::CreateUser { name } => {
                names::validate_user_name(name)
                    .map_err(|e| Rejection::InvalidName(name.clone(), e))?;
                if self.user_by_name(name).is_some() {
                    return Err(Rejection::UserExists(name.clone()));
                }
                self.meta.next_user += 1;
                let user = User {
                    id: UserId(self.meta.next_user),
                    name: name.clone(),
                    created_at: now,
                };
                self.users.insert(user.id, user.clone());
                fx.records.extend([Record::Meta, Record::User(user.id)]);
                fx.changes.push(Change::UserChanged(user.id));
                Ok(Outcome::User(user))
            }
            Command::RenameUser { old, new } => {
                names::validate_user_name(new)
                    .map_err(|e| Rejection::InvalidName(new.clone(), e))?;
                let id = self.user_id(old)?;
                if self.user_by_name(new).is_some() {
                    return Err(Rejection::UserExists(new.clone()));
                }
                let user = self.users.get_mut(&id).expect("looked up above");
                user.name = new.clone();
                let user = user.clone();
                fx.records.push(Record::User(id));
                fx.changes.push(Change::UserChanged(id));
                Ok(Outcome::User(user))
            }
            Command::DeleteUser { name } => {
                let id = self.user_id(name)?;
                let owned = self.nodes.values().filter(|n| n.user == id).count();
                if owned > 0 {
                    return Err(Rejection::UserHasNodes(name.clone(), owned));
                }
                let user = self.users.remove(&id).expect("looked up above");
                fx.records.push(Record::User(id));
                let keys: Vec<PreAuthKeyId> = self
                    .preauth_keys
                    .values()
                    .filter(|k| k.user == id)
                    .map(|k| k.id)
                    .collect();
                for key in keys {
                    self.preauth_keys.remove(&key);
                    fx.records.push(Record::PreAuthKey(key));
                }
                fx.changes.push(Change::UserChanged(id));
                Ok(Outcome::User(user))
            }
            Command::CreatePreAuthKey {
                user,
                prefix,
                hash,
                reusable,
                ephemeral,
                expiration,
                tags,
            } => {
                let user = self.user_id(user)?;
                validate_tags(tags)?;
                self.meta.next_preauth += 1;
                let key = PreAuthKey {
                    id: PreAuthKeyId(self.meta.next_preauth),
                    prefix: prefix.clone(),
                    hash: *hash,
                    user,
                    reusable: *reusable,
                    ephemeral: *ephemeral,
                    used: false,
                    expiration: *expiration,
                    tags: tags.clone(),
                    created_at: now,
                };
                self.preauth_keys.insert(key.id, key.clone());
                fx.records
                    .extend([Record::Meta, Record::PreAuthKey(key.id)]);
                Ok(Outcome::PreAuthKey(key))
            }
            Command::ExpirePreAuthKey { user, prefix } => {
                let user = self.user_id(user)?;
                let key = self
                    .preauth_keys
                    .values_mut()
                    .find(|k| k.user == user && &k.prefix == prefix)
                    .ok_or(Rejection::PreAuthKeyNotFound)?;
                if !key.is_expired(now) {
                    key.expiration = Some(now);
                }
                fx.records.push(Record::PreAuthKey(key.id));
                Ok(Outcome::PreAuthKey(key.clone()))
            }
            Command::CreateApiKey {
                prefix,
                hash,
                expiration,
            } => {
                if self.api_key_by_prefix(prefix).is_some() {
                    return Err(Rejection::ApiKeyExists(prefix.clone()));
                }
                self.meta.next_api += 1;
                let key = ApiKey {
                    id: ApiKeyId(self.meta.next_api),
                    prefix: prefix.clone(),
                    hash: *hash,
                    expiration: *expiration,
                    created_at: now,
                    last_used: None,
                };
                self.api_keys.insert(key.id, key.clone());
                fx.records.extend([Record::Meta, Record::ApiKey(key.id)]);
                Ok(Outcome::ApiKey(key))
            }
            Command::ExpireApiKey { prefix } => {
                let key = self
                    .api_keys
                    .values_mut()
                    .find(|k| &k.prefix == prefix)
                    .ok_or_else(|| Rejection::ApiKeyNotFound(prefix.clone()))?;
                if !key.is_expired(now) {
                    key.expiration = Some(now);
                }
                fx.records.push(Record::ApiKey(key.id));
                Ok(Outcome::ApiKey(key.clone()))
            }
            Command::DeleteApiKey { prefix } => {
                let id = self
                    .api_key_by_prefix(prefix)
                    .map(|k| k.id)
                    .ok_or_else(|| Rejection::ApiKeyNotFound(prefix.clone()))?;
                let key = self.api_keys.remove(&id).expect("looked up above");
                fx.records.push(Record::ApiKey(id));
                Ok(Outcome::ApiKey(key))
            }
            Command::RegisterNode {
                request,
                auth,
                auto_approve,
                expiry,
            } => {
                let NodeAuth::PreAuthKey { prefix, hash } = auth;
                let key = self
                    .check_preauth_key(prefix, hash, &request.machine_key, now)?
                    .clone();
                let mut tags = key.tags.clone();
                for t in &request.request_tags {
                    if key.tags.contains(t) && !tags.contains(t) {
                        tags.push(t.clone());
                    }
                }
                let node = self.upsert_node(
                    request,
                    key.user,
                    tags,
                    key.ephemeral || request.ephemeral,
                    Some(key.id),
                    *auto_approve,
                    *expiry,
                    now,
                    fx,
                )?;
                if !key.used {
                    self.preauth_keys
                        .get_mut(&key.id)
                        .expect("checked above")
                        .used = true;
                    fx.records.push(Record::PreAuthKey(key.id));
                }
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::BeginInteractive {
                auth_id,
                request,
                expires_at,
            } => {
                if self.by_node_key.get(&request.node_key).is_some_and(|id| {
                    self.nodes
                        .get(id)
                        .is_some_and(|n| n.machine_key != request.machine_key)
                }) {
                    return Err(Rejection::NodeKeyInUse(request.node_key.short()));
                }
                let pending = PendingRegistration {
                    auth_id: auth_id.clone(),
                    request: request.clone(),
                    created_at: now,
                    expires_at: *expires_at,
                    node: None,
                };
                self.pending.insert(auth_id.clone(), pending.clone());
                fx.records.push(Record::Pending(auth_id.clone()));
                fx.changes.push(Change::PendingChanged(auth_id.clone()));
                Ok(Outcome::Pending(Box::new(pending)))
            }
            Command::CompleteInteractive {
                auth_id,
                user,
                auto_approve,
                expiry,
            } => {
                let user = self.user_id(user)?;
                let pending = self
                    .pending
                    .get(auth_id)
                    .ok_or_else(|| Rejection::RegistrationNotFound(auth_id.clone()))?
                    .clone();
                if pending.node.is_some() {
                    return Err(Rejection::RegistrationCompleted(auth_id.clone()));
                }
                let request = pending.request.clone();
                let node = self.upsert_node(
                    &request,
                    user,
                    Vec::new(),
                    request.ephemeral,
                    None,
                    *auto_approve,
                    *expiry,
                    now,
                    fx,
                )?;
                self.pending.get_mut(auth_id).expect("looked up above").node = Some(node.id);
                fx.records.push(Record::Pending(auth_id.clone()));
                fx.changes.push(Change::PendingChanged(auth_id.clone()));
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::RotateNodeKey {
                machine_key,
                old,
                new,
            } => {
                let id = *self
                    .by_node_key
                    .get(old)
                    .ok_or_else(|| Rejection::NodeKeyNotFound(old.short()))?;
                let node = &self.nodes[&id];
                if &node.machine_key != machine_key {
                    return Err(Rejection::MachineKeyMismatch(old.short()));
                }
                if self.by_node_key.get(new).is_some_and(|other| *other != id) {
                    return Err(Rejection::NodeKeyInUse(new.short()));
                }
                let node = self.update_node(id, fx, |n| n.node_key = *new);
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::LogoutNode {
                machine_key,
                node_key,
            } => {
                let id = *self
                    .by_node_key
                    .get(node_key)
                    .ok_or_else(|| Rejection::NodeKeyNotFound(node_key.short()))?;
                if &self.nodes[&id].machine_key != machine_key {
                    return Err(Rejection::MachineKeyMismatch(node_key.short()));
                }
                if self.nodes[&id].ephemeral {
                    self.remove_node(id, fx);
                    return Ok(Outcome::Removed(vec![id]));
                }
                let node = self.update_node(id, fx, |n| n.expiry = Some(now));
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::UpdateNodeInfo {
                id,
                hostname,
                hostinfo,
                disco_key,
            } => {
                self.node_exists(*id)?;
                let node = self.update_node(*id, fx, |n| {
                    n.hostname = hostname.clone();
                    n.hostinfo = hostinfo.clone();
                    n.disco_key = *disco_key;
                });
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::SetLastSeen { id } => {
                self.node_exists(*id)?;
                let node = self.update_node(*id, fx, |n| n.last_seen = Some(now));
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::ApproveNode { id } => {
                self.node_exists(*id)?;
                let node = self.update_node(*id, fx, |n| n.approved = true);
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::ExpireNode { id } => {
                self.node_exists(*id)?;
                let node = self.update_node(*id, fx, |n| {
                    if !n.is_expired(now) {
                        n.expiry = Some(now)
                    }
                });
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::DeleteNode { id } => {
                self.node_exists(*id)?;
                self.remove_node(*id, fx);
                Ok(Outcome::Removed(vec![*id]))
            }
            Command::DeleteNodes { ids } => {
                let present: Vec<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|id| self.nodes.contains_key(id))
                    .collect();
                for id in &present {
                    self.remove_node(*id, fx);
                }
                Ok(Outcome::Removed(present))
            }
            Command::RenameNode { id, name } => {
                self.node_exists(*id)?;
                names::validate_label(name).map_err(|e| Rejection::InvalidName(name.clone(), e))?;
                if self
                    .nodes
                    .values()
                    .any(|n| n.id != *id && &n.given_name == name)
                {
                    return Err(Rejection::InvalidName(
                        name.clone(),
                        "another node has this name".into(),
                    ));
                }
                let node = self.update_node(*id, fx, |n| n.given_name = name.clone());
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::MoveNode { id, user } => {
                self.node_exists(*id)?;
                let user = self.user_id(user)?;
                let node = self.update_node(*id, fx, |n| n.user = user);
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::TagNode { id, tags } => {
                self.node_exists(*id)?;
                validate_tags(tags)?;
                let node = self.update_node(*id, fx, |n| n.tags = tags.clone());
                Ok(Outcome::Node(Box::new(node)))
            }
            Command::SetDns { dns } => {
                self.meta.dns = Some(dns.clone());
                fx.records.push(Record::Meta);
                fx.changes.push(Change::DnsChanged);
                Ok(Outcome::Done)
            }
            Command::SetPolicy { policy } => {
                self.meta.policy = policy.clone();
                fx.records.push(Record::Meta);
                fx.changes.push(Change::PolicyChanged);
                Ok(Outcome::Done)
            }
        }
    }

    fn user_id(&self, name: &str) -> Result<UserId, Rejection> {
        self.user_by_name(name)
            .map(|u| u.id)
            .ok_or_else(|| Rejection::UserNotFound(name.to_string()))
    }

    fn node_exists(&self, id: NodeId) -> Result<(), Rejection> {
        if self.nodes.contains_key(&id) {
            Ok(())
        } else {
            Err(Rejection::NodeNotFound(id))
        }
    }

    fn update_node(&mut self, id: NodeId, fx: &mut Effects, edit: impl FnOnce(&mut Node)) -> Node {
        let mut node = (*self.nodes[&id]).clone();
        let old_key = node.node_key;
        edit(&mut node);
        if node.node_key != old_key {
            self.by_node_key.remove(&old_key);
            self.by_node_key.insert(node.node_key, id);
        }
        self.nodes.insert(id, Arc::new(node.clone()));
        fx.node(id);
        node
    }

    fn remove_node(&mut self, id: NodeId, fx: &mut Effects) {
        if let Some(node) = self.nodes.remove(&id) {
            self.unindex(&node);
            fx.node_removed(id);
        }
    }

    fn unindex(&mut self, node: &Node) {
        self.by_node_key.remove(&node.node_key);
        self.by_machine_key.remove(&node.machine_key);
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
        if let Some(ip) = node.ipv4 {
            self.used_v4.insert(ip);
        }
        if let Some(ip) = node.ipv6 {
            self.used_v6.insert(ip);
        }
    }

    /// Creates a node for a machine, or re-authenticates the machine's existing node
    /// (keeping its id and addresses, taking the new node key, user and tags).
    #[allow(clippy::too_many_arguments)]
    fn upsert_node(
        &mut self,
        request: &NodeRequest,
        user: UserId,
        tags: Vec<String>,
        ephemeral: bool,
        auth_key: Option<PreAuthKeyId>,
        auto_approve: bool,
        expiry: Option<Timestamp>,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Node, Rejection> {
        let existing = self.by_machine_key.get(&request.machine_key).copied();
        if let Some(other) = self.by_node_key.get(&request.node_key)
            && Some(*other) != existing
        {
            return Err(Rejection::NodeKeyInUse(request.node_key.short()));
        }
        if let Some(id) = existing {
            let node = self.update_node(id, fx, |n| {
                n.node_key = request.node_key;
                n.user = user;
                n.tags = tags;
                n.hostname = request.hostname.clone();
                n.hostinfo = request.hostinfo.clone();
                n.ephemeral = ephemeral;
                n.auth_key = auth_key.or(n.auth_key);
                n.expiry = expiry;
            });
            return Ok(node);
        }
        let ipv4 = match self.settings.prefix_v4 {
            Some(net) => Some(
                ipalloc::next_v4(net, &self.used_v4)
                    .ok_or_else(|| Rejection::AddressesExhausted(net.to_string()))?,
            ),
            None => None,
        };
        let ipv6 = match self.settings.prefix_v6 {
            Some(net) => Some(
                ipalloc::next_v6(net, &self.used_v6)
                    .ok_or_else(|| Rejection::AddressesExhausted(net.to_string()))?,
            ),
            None => None,
        };
        let base = names::sanitize_label(&request.hostname);
        let given_name = names::unique_label(&base, |candidate| {
            self.nodes.values().any(|n| n.given_name == candidate)
        });
        self.meta.next_node += 1;
        let node = Node {
            id: NodeId(self.meta.next_node),
            machine_key: request.machine_key,
            node_key: request.node_key,
            disco_key: DiscoKey::default(),
            user,
            hostname: request.hostname.clone(),
            given_name,
            ipv4,
            ipv6,
            hostinfo: request.hostinfo.clone(),
            created_at: now,
            expiry,
            last_seen: None,
            tags,
            approved: auto_approve,
            ephemeral,
            auth_key,
        };
        self.index(&node);
        self.nodes.insert(node.id, Arc::new(node.clone()));
        fx.records.push(Record::Meta);
        fx.node(node.id);
        Ok(node)
    }

    // ----- persistence -----

    /// The storage key and current value of a record (`None` = deleted).
    pub fn encode_record(&self, record: &Record) -> (Vec<u8>, Option<Vec<u8>>) {
        fn enc<T: Serialize>(v: &T) -> Vec<u8> {
            serde_json::to_vec(v).expect("registry types always serialize")
        }
        match record {
            Record::Meta => (b"meta".to_vec(), Some(enc(&self.meta))),
            Record::User(id) => (
                format!("user/{:020}", id.0).into_bytes(),
                self.users.get(id).map(enc),
            ),
            Record::Node(id) => (
                format!("node/{:020}", id.0).into_bytes(),
                self.nodes.get(id).map(|n| enc(n.as_ref())),
            ),
            Record::PreAuthKey(id) => (
                format!("preauthkey/{:020}", id.0).into_bytes(),
                self.preauth_keys.get(id).map(enc),
            ),
            Record::ApiKey(id) => (
                format!("apikey/{:020}", id.0).into_bytes(),
                self.api_keys.get(id).map(enc),
            ),
            Record::Pending(id) => (
                format!("pending/{id}").into_bytes(),
                self.pending.get(id).map(enc),
            ),
        }
    }

    /// Every record, for a snapshot.
    pub fn all_records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut records = vec![Record::Meta];
        records.extend(self.users.keys().map(|id| Record::User(*id)));
        records.extend(self.nodes.keys().map(|id| Record::Node(*id)));
        records.extend(self.preauth_keys.keys().map(|id| Record::PreAuthKey(*id)));
        records.extend(self.api_keys.keys().map(|id| Record::ApiKey(*id)));
        records.extend(self.pending.keys().map(|id| Record::Pending(id.clone())));
        records
            .iter()
            .filter_map(|r| {
                let (k, v) = self.encode_record(r);
                v.map(|v| (k, v))
            })
            .collect()
    }

    /// Rebuilds a registry from stored records (as written by `encode_record`).
    pub fn from_records(
        settings: RegistrySettings,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Self, StoreError> {
        let mut reg = Registry::new(settings);
        for (key, value) in records {
            let key = String::from_utf8_lossy(&key).into_owned();
            let decode_err = |source| StoreError::Decode {
                key: key.clone(),
                source,
            };
            let kind = key.split('/').next().unwrap_or("");
            match kind {
                "meta" => reg.meta = serde_json::from_slice(&value).map_err(decode_err)?,
                "user" => {
                    let u: User = serde_json::from_slice(&value).map_err(decode_err)?;
                    reg.users.insert(u.id, u);
                }
                "node" => {
                    let n: Node = serde_json::from_slice(&value).map_err(decode_err)?;
                    reg.index(&n);
                    reg.nodes.insert(n.id, Arc::new(n));
                }
                "preauthkey" => {
                    let k: PreAuthKey = serde_json::from_slice(&value).map_err(decode_err)?;
                    reg.preauth_keys.insert(k.id, k);
                }
                "apikey" => {
                    let k: ApiKey = serde_json::from_slice(&value).map_err(decode_err)?;
                    reg.api_keys.insert(k.id, k);
                }
                "pending" => {
                    let p: PendingRegistration =
                        serde_json::from_slice(&value).map_err(decode_err)?;
                    reg.pending.insert(p.auth_id.clone(), p);
                }
                _ => return Err(StoreError::UnknownKey(key)),
            }
        }
        Ok(reg)
    }

    /// Whether two registries hold the same data (indexes excluded), for tests and checks.
    pub fn same_data(&self, other: &Registry) -> bool {
        self.all_records() == other.all_records()
    }
}

#[cfg(test)]
mod tests;

//! What each command does to the registry. Every function here is deterministic: time
//! comes in as the entry's stamp, ids from the registry's own counters.

use sha2::Digest;
use std::sync::Arc;

use super::super::command::{Command, ExpireUntil, NodeAuth, Outcome, Rejection};
use super::super::{ipalloc, names};
use super::{Effects, Registry};
use crate::registry::change::{Change, Record};
use crate::registry::types::*;

/// Approving one exit route approves both (0.0.0.0/0 and ::/0), as Tailscale does; the
/// list is kept sorted and without repeats so every member stores the same bytes.
fn with_both_exit_routes(routes: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    let mut out: Vec<ipnet::IpNet> = routes.iter().map(|r| r.trunc()).collect();
    if out.iter().any(|r| r.prefix_len() == 0) {
        out.push("0.0.0.0/0".parse().expect("static"));
        out.push("::/0".parse().expect("static"));
    }
    out.sort();
    out.dedup();
    out
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

/// How a node being created or re-authenticated is owned and configured.
struct NodeGrant {
    user: UserId,
    tags: Vec<String>,
    ephemeral: bool,
    auth_key: Option<PreAuthKeyId>,
    auto_approve: bool,
    expiry: Option<Timestamp>,
}

impl Registry {
    pub(super) fn apply_command(
        &mut self,
        cmd: &Command,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        match cmd {
            Command::Noop => Ok(Outcome::Done),
            Command::CreateUser {
                name,
                display_name,
                email,
            } => {
                let user = User {
                    id: UserId(0),
                    name: name.clone(),
                    created_at: now,
                    display_name: display_name.clone(),
                    email: email.clone(),
                    provider_id: String::new(),
                };
                self.create_user(user, fx)
            }
            Command::RenameUser { old, new } => self.rename_user(old, new, fx),
            Command::DeleteUser { name } => self.delete_user(name, fx),
            Command::CreatePreAuthKey {
                user,
                prefix,
                hash,
                reusable,
                ephemeral,
                expiration,
                tags,
            } => {
                let key = PreAuthKey {
                    id: PreAuthKeyId(0),
                    prefix: prefix.clone(),
                    hash: *hash,
                    user: self.user_id(user)?,
                    reusable: *reusable,
                    ephemeral: *ephemeral,
                    used: false,
                    expiration: *expiration,
                    tags: tags.clone(),
                    created_at: now,
                };
                self.create_preauth_key(key, fx)
            }
            Command::ExpirePreAuthKey { user, prefix } => {
                self.expire_preauth_key(user, prefix, now, fx)
            }
            Command::DeletePreAuthKey { user, prefix } => self.delete_preauth_key(user, prefix, fx),
            Command::CreateApiKey {
                prefix,
                hash,
                expiration,
            } => self.create_api_key(prefix, *hash, *expiration, now, fx),
            Command::ExpireApiKey { prefix } => self.expire_api_key(prefix, now, fx),
            Command::DeleteApiKey { prefix } => self.delete_api_key(prefix, fx),
            Command::RegisterNode {
                request,
                auth,
                auto_approve,
                expiry,
            } => self.register_node(request, auth, *auto_approve, *expiry, now, fx),
            Command::BeginInteractive {
                auth_id,
                request,
                ttl_ms,
                max_pending,
            } => self.begin_interactive(
                auth_id,
                request,
                (now.plus_millis(*ttl_ms), *max_pending),
                now,
                fx,
            ),
            Command::CompleteInteractive {
                auth_id,
                user,
                auto_approve,
                expiry,
            } => self.complete_interactive(auth_id, user, *auto_approve, *expiry, now, fx),
            Command::RejectInteractive { auth_id } => self.reject_interactive(auth_id, fx),
            Command::RotateNodeKey {
                machine_key,
                old,
                new,
            } => self.rotate_node_key(machine_key, old, new, fx),
            Command::LogoutNode {
                machine_key,
                node_key,
            } => self.logout_node(machine_key, node_key, now, fx),
            Command::UpdateNodeInfo {
                id,
                hostname,
                hostinfo,
                disco_key,
            } => self.edit_node(*id, fx, |n| {
                n.hostname = hostname.clone();
                n.hostinfo = hostinfo.clone();
                n.disco_key = *disco_key;
            }),
            Command::RecordAudit {
                actor,
                action,
                target,
                result,
            } => {
                self.append_audit(
                    AuditRecord {
                        seq: 0,
                        at: now,
                        actor: actor.clone(),
                        action: action.clone(),
                        target: target.clone(),
                        result: result.clone(),
                    },
                    fx,
                );
                Ok(Outcome::Done)
            }
            Command::PruneAudit {
                before,
                keep_at_most,
            } => {
                self.prune_audit(*before, *keep_at_most, fx);
                Ok(Outcome::Done)
            }
            Command::SetMemberDerpKey { member, key } => {
                self.set_member_derp_key(*member, *key, fx);
                Ok(Outcome::Done)
            }
            Command::SetLastSeen { id } => self.edit_node(*id, fx, |n| n.last_seen = Some(now)),
            Command::ApproveNode { id } => self.edit_node(*id, fx, |n| n.approved = true),
            Command::ExpireNode { id, until } => self.edit_node(*id, fx, |n| match until {
                ExpireUntil::Now if !n.is_expired(now) => n.expiry = Some(now),
                ExpireUntil::Now => {}
                ExpireUntil::At(at) => n.expiry = Some(*at),
                ExpireUntil::Never => n.expiry = None,
            }),
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
            Command::RenameNode { id, name } => self.rename_node(*id, name, fx),
            Command::MoveNode { id, user } => {
                self.node_exists(*id)?;
                let user = self.user_id(user)?;
                self.edit_node(*id, fx, |n| n.user = user)
            }
            Command::TagNode { id, tags } => {
                self.node_exists(*id)?;
                validate_tags(tags)?;
                self.edit_node(*id, fx, |n| n.tags = tags.clone())
            }
            Command::ApproveRoutes { id, routes } => {
                self.node_exists(*id)?;
                let routes = with_both_exit_routes(routes);
                self.edit_node(*id, fx, |n| n.approved_routes = routes.clone())
            }
            Command::SetDns { dns } => {
                self.dns = Some(Arc::new(dns.clone()));
                fx.records.push(Record::Dns);
                fx.changes.push(Change::DnsChanged);
                Ok(Outcome::Done)
            }
            Command::SetPolicy { policy } => self.set_policy(policy, now, fx),
            Command::RollbackPolicy { version } => {
                let policy = self
                    .policy_versions
                    .get(version)
                    .map(|p| p.policy.clone())
                    .ok_or(Rejection::PolicyVersionNotFound(*version))?;
                self.set_policy(&policy, now, fx)
            }
            Command::InitSettings { settings } => self.init_settings(settings, fx),
            Command::OidcLogin {
                auth_id,
                identity,
                auto_approve,
                expiry,
            } => {
                let user = self.oidc_user(auth_id, identity, now, fx)?;
                self.complete_interactive(auth_id, &user, *auto_approve, *expiry, now, fx)
            }
        }
    }

    fn init_settings(
        &mut self,
        settings: &ClusterSettings,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        match self.settings.as_deref() {
            None => {
                self.settings = Some(Arc::new(settings.clone()));
                fx.records.push(Record::Settings);
                Ok(Outcome::Done)
            }
            Some(current) => match settings.first_difference(current) {
                None => Ok(Outcome::Done),
                Some((key, proposed, cluster)) => Err(Rejection::SettingsMismatch {
                    key: key.into(),
                    cluster,
                    proposed,
                }),
            },
        }
    }

    // ----- users and keys -----

    fn user_id(&self, name: &str) -> Result<UserId, Rejection> {
        self.user_by_name(name)
            .map(|u| u.id)
            .ok_or_else(|| Rejection::UserNotFound(name.to_string()))
    }

    /// Adds `user` under the next user id (its `id` is ignored).
    fn create_user(&mut self, mut user: User, fx: &mut Effects) -> Result<Outcome, Rejection> {
        let name = user.name.as_str();
        names::validate_user_name(name).map_err(|e| Rejection::InvalidName(name.into(), e))?;
        if self.user_by_name(name).is_some() {
            return Err(Rejection::UserExists(name.into()));
        }
        let meta = Arc::make_mut(&mut self.meta);
        meta.next_user += 1;
        user.id = UserId(meta.next_user);
        self.users.insert(user.id, Arc::new(user.clone()));
        self.user_by_name.insert(user.name.as_str().into(), user.id);
        fx.records.extend([Record::Meta, Record::User(user.id)]);
        fx.changes.push(Change::UserChanged(user.id));
        Ok(Outcome::User(user))
    }

    fn rename_user(
        &mut self,
        old: &str,
        new: &str,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        names::validate_user_name(new).map_err(|e| Rejection::InvalidName(new.into(), e))?;
        let id = self.user_id(old)?;
        if self.user_by_name(new).is_some() {
            return Err(Rejection::UserExists(new.into()));
        }
        let user = Arc::make_mut(self.users.get_mut(&id).expect("looked up above"));
        user.name = new.into();
        let user = user.clone();
        self.user_by_name.remove(old);
        self.user_by_name.insert(new.into(), id);
        fx.records.push(Record::User(id));
        fx.changes.push(Change::UserChanged(id));
        Ok(Outcome::User(user))
    }

    fn delete_user(&mut self, name: &str, fx: &mut Effects) -> Result<Outcome, Rejection> {
        let id = self.user_id(name)?;
        let owned = self.nodes.values().filter(|n| n.user == id).count();
        if owned > 0 {
            return Err(Rejection::UserHasNodes(name.into(), owned));
        }
        let user = (*self.users.remove(&id).expect("looked up above")).clone();
        self.user_by_name.remove(name);
        fx.records.push(Record::User(id));
        let keys: Vec<PreAuthKeyId> = self
            .preauth_keys
            .values()
            .filter(|k| k.user == id)
            .map(|k| k.id)
            .collect();
        for key in keys {
            if let Some(k) = self.preauth_keys.remove(&key) {
                self.preauth_by_prefix.remove(k.prefix.as_str());
            }
            fx.records.push(Record::PreAuthKey(key));
        }
        fx.changes.push(Change::UserChanged(id));
        Ok(Outcome::User(user))
    }

    fn create_preauth_key(
        &mut self,
        mut key: PreAuthKey,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        validate_tags(&key.tags)?;
        let meta = Arc::make_mut(&mut self.meta);
        meta.next_preauth += 1;
        key.id = PreAuthKeyId(meta.next_preauth);
        self.preauth_by_prefix
            .insert(key.prefix.as_str().into(), key.id);
        self.preauth_keys.insert(key.id, Arc::new(key.clone()));
        fx.records
            .extend([Record::Meta, Record::PreAuthKey(key.id)]);
        Ok(Outcome::PreAuthKey(key))
    }

    /// The id of `user`'s pre-auth key with `prefix`.
    fn users_preauth_key(&self, user: &str, prefix: &str) -> Result<PreAuthKeyId, Rejection> {
        let user = self.user_id(user)?;
        self.preauth_key_by_prefix(prefix)
            .filter(|k| k.user == user)
            .map(|k| k.id)
            .ok_or(Rejection::PreAuthKeyNotFound)
    }

    fn delete_preauth_key(
        &mut self,
        user: &str,
        prefix: &str,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let id = self.users_preauth_key(user, prefix)?;
        let key = (*self.preauth_keys.remove(&id).expect("looked up above")).clone();
        self.preauth_by_prefix.remove(prefix);
        fx.records.push(Record::PreAuthKey(id));
        Ok(Outcome::PreAuthKey(key))
    }

    fn expire_preauth_key(
        &mut self,
        user: &str,
        prefix: &str,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let id = self.users_preauth_key(user, prefix)?;
        let key = Arc::make_mut(self.preauth_keys.get_mut(&id).expect("looked up above"));
        if !key.is_expired(now) {
            key.expiration = Some(now);
        }
        fx.records.push(Record::PreAuthKey(id));
        Ok(Outcome::PreAuthKey(key.clone()))
    }

    fn create_api_key(
        &mut self,
        prefix: &str,
        hash: SecretHash,
        expiration: Option<Timestamp>,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        if self.api_key_by_prefix(prefix).is_some() {
            return Err(Rejection::ApiKeyExists(prefix.into()));
        }
        let meta = Arc::make_mut(&mut self.meta);
        meta.next_api += 1;
        let key = ApiKey {
            id: ApiKeyId(meta.next_api),
            prefix: prefix.into(),
            hash,
            expiration,
            created_at: now,
            last_used: None,
        };
        self.api_by_prefix
            .insert(key.prefix.as_str().into(), key.id);
        self.api_keys.insert(key.id, Arc::new(key.clone()));
        fx.records.extend([Record::Meta, Record::ApiKey(key.id)]);
        Ok(Outcome::ApiKey(key))
    }

    fn api_key_id(&self, prefix: &str) -> Result<ApiKeyId, Rejection> {
        self.api_key_by_prefix(prefix)
            .map(|k| k.id)
            .ok_or_else(|| Rejection::ApiKeyNotFound(prefix.into()))
    }

    fn expire_api_key(
        &mut self,
        prefix: &str,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let id = self.api_key_id(prefix)?;
        let key = Arc::make_mut(self.api_keys.get_mut(&id).expect("looked up above"));
        if !key.is_expired(now) {
            key.expiration = Some(now);
        }
        fx.records.push(Record::ApiKey(id));
        Ok(Outcome::ApiKey(key.clone()))
    }

    fn delete_api_key(&mut self, prefix: &str, fx: &mut Effects) -> Result<Outcome, Rejection> {
        let id = self.api_key_id(prefix)?;
        let key = (*self.api_keys.remove(&id).expect("looked up above")).clone();
        self.api_by_prefix.remove(prefix);
        fx.records.push(Record::ApiKey(id));
        Ok(Outcome::ApiKey(key))
    }

    // ----- policy -----

    /// Makes `policy` the running policy and keeps it as a new version. The same text
    /// again changes nothing (no version, no netmap resync).
    fn set_policy(
        &mut self,
        policy: &str,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        if *self.policy == *policy {
            return Ok(Outcome::Done);
        }
        self.set_policy_text(policy.into());
        fx.records.push(Record::Policy);
        fx.changes.push(Change::PolicyChanged);
        let version = self.policy_versions.get_max().map_or(1, |(v, _)| v + 1);
        self.policy_versions.insert(
            version,
            Arc::new(PolicyVersion {
                version,
                policy: policy.to_string(),
                at: now,
            }),
        );
        fx.records.push(Record::PolicyVersion(version));
        while self.policy_versions.len() > super::POLICY_VERSIONS_MAX {
            let oldest = self.policy_versions.get_min().expect("not empty").0;
            self.policy_versions.remove(&oldest);
            fx.records.push(Record::PolicyVersion(oldest));
        }
        Ok(Outcome::Done)
    }

    // ----- registration -----

    /// The tags a client asked for (Hostinfo `RequestTags`) that the policy's `tagOwners`
    /// let `user` apply; the others are ignored, as Tailscale ignores them.
    fn owned_tags(&self, user: UserId, requested: &[String]) -> Vec<String> {
        let Some(policy) = &self.parsed_policy else {
            return Vec::new();
        };
        if requested.is_empty() {
            return Vec::new();
        }
        let Some(name) = self.users.get(&user).map(|u| u.name.clone()) else {
            return Vec::new();
        };
        requested
            .iter()
            .filter(|t| policy.user_owns_tag(&name, t))
            .cloned()
            .collect()
    }

    fn register_node(
        &mut self,
        request: &NodeRequest,
        auth: &NodeAuth,
        auto_approve: bool,
        expiry: Option<Expiry>,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let NodeAuth::PreAuthKey { prefix, hash } = auth;
        let key = self
            .check_preauth_key(prefix, hash, &request.machine_key, now)?
            .clone();
        let mut tags = key.tags.clone();
        for t in self.owned_tags(key.user, &request.request_tags) {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let grant = NodeGrant {
            user: key.user,
            tags,
            ephemeral: key.ephemeral || request.ephemeral,
            auth_key: Some(key.id),
            auto_approve,
            expiry: expiry.map(|e| e.resolve(now)),
        };
        let node = self.upsert_node(request, grant, now, fx)?;
        if !key.used {
            Arc::make_mut(self.preauth_keys.get_mut(&key.id).expect("checked above")).used = true;
            fx.records.push(Record::PreAuthKey(key.id));
        }
        Ok(Outcome::Node(Box::new(node)))
    }

    fn begin_interactive(
        &mut self,
        auth_id: &str,
        request: &NodeRequest,
        (expires_at, max_pending): (Timestamp, u32),
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        if self
            .node_by_key(&request.node_key)
            .is_some_and(|n| n.machine_key != request.machine_key)
        {
            return Err(Rejection::NodeKeyInUse(request.node_key.short()));
        }
        // One open registration per machine: a new one replaces the old (so it does not
        // count against the cap).
        let replaced = self.pending_by_machine.get(&request.machine_key).cloned();
        if self.pending.len() - usize::from(replaced.is_some()) >= max_pending as usize {
            return Err(Rejection::TooManyPending(max_pending));
        }
        if let Some(old) = replaced {
            self.remove_pending(&old);
            fx.records.push(Record::Pending(old.to_string()));
            fx.changes.push(Change::PendingChanged(old.to_string()));
        }
        let pending = PendingRegistration {
            auth_id: auth_id.into(),
            request: request.clone(),
            created_at: now,
            expires_at,
            node: None,
        };
        self.insert_pending(pending.clone());
        fx.records.push(Record::Pending(auth_id.into()));
        fx.changes.push(Change::PendingChanged(auth_id.into()));
        Ok(Outcome::Pending(Box::new(pending)))
    }

    fn reject_interactive(
        &mut self,
        auth_id: &str,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        match self.pending.get(auth_id) {
            None => return Err(Rejection::RegistrationNotFound(auth_id.into())),
            Some(p) if p.node.is_some() => {
                return Err(Rejection::RegistrationCompleted(auth_id.into()));
            }
            Some(_) => {}
        }
        self.remove_pending(auth_id);
        fx.records.push(Record::Pending(auth_id.into()));
        fx.changes.push(Change::PendingChanged(auth_id.into()));
        Ok(Outcome::Done)
    }

    fn complete_interactive(
        &mut self,
        auth_id: &str,
        user: &str,
        auto_approve: bool,
        expiry: Option<Expiry>,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let user = self.user_id(user)?;
        let pending = self
            .pending
            .get(auth_id)
            .ok_or_else(|| Rejection::RegistrationNotFound(auth_id.into()))?
            .clone();
        if pending.node.is_some() {
            return Err(Rejection::RegistrationCompleted(auth_id.into()));
        }
        let grant = NodeGrant {
            user,
            tags: self.owned_tags(user, &pending.request.request_tags),
            ephemeral: pending.request.ephemeral,
            auth_key: None,
            auto_approve,
            expiry: expiry.map(|e| e.resolve(now)),
        };
        let node = self.upsert_node(&pending.request, grant, now, fx)?;
        Arc::make_mut(self.pending.get_mut(auth_id).expect("looked up above")).node = Some(node.id);
        // Completed: no longer the machine's open registration.
        self.pending_by_machine.remove(&pending.request.machine_key);
        fx.records.push(Record::Pending(auth_id.into()));
        fx.changes.push(Change::PendingChanged(auth_id.into()));
        Ok(Outcome::Node(Box::new(node)))
    }

    /// The name of the user `identity` is, made on their first login; later logins refresh
    /// the display name and email (the name stays: policies may use it). A registration
    /// that cannot complete is refused first, so a stale callback makes no user.
    fn oidc_user(
        &mut self,
        auth_id: &str,
        identity: &OidcIdentity,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<String, Rejection> {
        match self.pending.get(auth_id) {
            None => return Err(Rejection::RegistrationNotFound(auth_id.into())),
            Some(p) if p.node.is_some() => {
                return Err(Rejection::RegistrationCompleted(auth_id.into()));
            }
            Some(_) => {}
        }
        let provider_id = identity.provider_id();
        // Logins are rare next to map traffic; a pass over the users is cheap enough.
        let known = self.users.values().find(|u| u.provider_id == provider_id);
        if let Some(user) = known.cloned() {
            if user.display_name != identity.display_name || user.email != identity.email {
                let u = Arc::make_mut(self.users.get_mut(&user.id).expect("found above"));
                u.display_name = identity.display_name.clone();
                u.email = identity.email.clone();
                fx.records.push(Record::User(user.id));
                fx.changes.push(Change::UserChanged(user.id));
            }
            return Ok(user.name.clone());
        }
        let user = User {
            id: UserId(0),
            name: self.free_user_name(identity, &provider_id),
            created_at: now,
            display_name: identity.display_name.clone(),
            email: identity.email.clone(),
            provider_id,
        };
        let name = user.name.clone();
        self.create_user(user, fx)?;
        Ok(name)
    }

    /// The token's name made valid; when an admin-made (or another provider's) user has
    /// it, a suffix from the provider id keeps the two apart instead of merging them.
    fn free_user_name(&self, identity: &OidcIdentity, provider_id: &str) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    let ok = c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+');
                    if ok { c } else { '-' }
                })
                .take(200)
                .collect()
        };
        let digest = hex::encode(&sha2::Sha256::digest(provider_id.as_bytes())[..4]);
        let base = [&identity.name, &identity.email]
            .into_iter()
            .map(|s| clean(s))
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| format!("user-{digest}"));
        if self.user_by_name(&base).is_none() {
            return base;
        }
        format!("{base}-{digest}")
    }

    fn node_for_key(&self, machine_key: &MachineKey, key: &NodeKey) -> Result<NodeId, Rejection> {
        let id = *self
            .by_node_key
            .get(key)
            .ok_or_else(|| Rejection::NodeKeyNotFound(key.short()))?;
        if &self.nodes[&id].machine_key != machine_key {
            return Err(Rejection::MachineKeyMismatch(key.short()));
        }
        Ok(id)
    }

    fn rotate_node_key(
        &mut self,
        machine_key: &MachineKey,
        old: &NodeKey,
        new: &NodeKey,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let id = self.node_for_key(machine_key, old)?;
        if self.by_node_key.get(new).is_some_and(|other| *other != id) {
            return Err(Rejection::NodeKeyInUse(new.short()));
        }
        self.edit_node(id, fx, |n| n.node_key = *new)
    }

    fn logout_node(
        &mut self,
        machine_key: &MachineKey,
        node_key: &NodeKey,
        now: Timestamp,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        let id = self.node_for_key(machine_key, node_key)?;
        if self.nodes[&id].ephemeral {
            self.remove_node(id, fx);
            return Ok(Outcome::Removed(vec![id]));
        }
        self.edit_node(id, fx, |n| n.expiry = Some(now))
    }

    // ----- nodes -----

    fn node_exists(&self, id: NodeId) -> Result<(), Rejection> {
        if self.nodes.contains_key(&id) {
            Ok(())
        } else {
            Err(Rejection::NodeNotFound(id))
        }
    }

    /// Edits an existing node and answers with its new state.
    fn edit_node(
        &mut self,
        id: NodeId,
        fx: &mut Effects,
        edit: impl FnOnce(&mut Node),
    ) -> Result<Outcome, Rejection> {
        self.node_exists(id)?;
        Ok(Outcome::Node(Box::new(self.update_node(id, fx, edit))))
    }

    fn rename_node(
        &mut self,
        id: NodeId,
        name: &str,
        fx: &mut Effects,
    ) -> Result<Outcome, Rejection> {
        self.node_exists(id)?;
        names::validate_label(name).map_err(|e| Rejection::InvalidName(name.into(), e))?;
        if self
            .node_by_name
            .get(name)
            .is_some_and(|other| *other != id)
        {
            return Err(Rejection::InvalidName(
                name.into(),
                "another node has this name".into(),
            ));
        }
        self.edit_node(id, fx, |n| n.given_name = name.into())
    }

    fn update_node(&mut self, id: NodeId, fx: &mut Effects, edit: impl FnOnce(&mut Node)) -> Node {
        let old = self.nodes[&id].clone();
        let mut node = (*old).clone();
        edit(&mut node);
        self.unindex(&old);
        self.index(&node);
        self.nodes.insert(id, Arc::new(node.clone()));
        fx.node(id);
        node
    }

    pub(super) fn remove_node(&mut self, id: NodeId, fx: &mut Effects) {
        if let Some(node) = self.nodes.remove(&id) {
            self.unindex(&node);
            fx.node_removed(id);
        }
    }

    /// Creates a node for a machine, or re-authenticates the machine's existing node
    /// (keeping its id and addresses, taking the new node key, user and tags).
    fn upsert_node(
        &mut self,
        request: &NodeRequest,
        grant: NodeGrant,
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
            return Ok(self.update_node(id, fx, |n| {
                n.node_key = request.node_key;
                n.user = grant.user;
                n.tags = grant.tags;
                n.hostname = request.hostname.clone();
                n.hostinfo = request.hostinfo.clone();
                n.ephemeral = grant.ephemeral;
                n.auth_key = grant.auth_key.or(n.auth_key);
                n.expiry = grant.expiry;
            }));
        }
        let (ipv4, ipv6) = self.allocate_addresses()?;
        let base = names::sanitize_label(&request.hostname);
        let given_name =
            names::unique_label(&base, |candidate| self.node_by_name.contains_key(candidate));
        let meta = Arc::make_mut(&mut self.meta);
        meta.next_node += 1;
        let node = Node {
            id: NodeId(meta.next_node),
            machine_key: request.machine_key,
            node_key: request.node_key,
            disco_key: DiscoKey::default(),
            user: grant.user,
            hostname: request.hostname.clone(),
            given_name,
            ipv4,
            ipv6,
            hostinfo: request.hostinfo.clone(),
            created_at: now,
            expiry: grant.expiry,
            last_seen: None,
            tags: grant.tags,
            approved: grant.auto_approve,
            ephemeral: grant.ephemeral,
            auth_key: grant.auth_key,
            approved_routes: Vec::new(),
        };
        self.index(&node);
        self.nodes.insert(node.id, Arc::new(node.clone()));
        fx.records.push(Record::Meta);
        fx.node(node.id);
        Ok(node)
    }

    /// The next free addresses after the last ones handed out, from the cluster's prefixes.
    fn allocate_addresses(
        &mut self,
    ) -> Result<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>), Rejection> {
        let settings = self.settings.clone().ok_or(Rejection::SettingsMissing)?;
        let exhausted =
            |net: &dyn std::fmt::Display| Rejection::AddressesExhausted(net.to_string());
        let ipv4 = match settings.prefix_v4 {
            Some(net) => Some(
                ipalloc::next_v4(net, self.meta.last_v4, |ip| self.used_v4.contains(&ip))
                    .ok_or_else(|| exhausted(&net))?,
            ),
            None => None,
        };
        let ipv6 = match settings.prefix_v6 {
            Some(net) => Some(
                ipalloc::next_v6(net, self.meta.last_v6, |ip| self.used_v6.contains(&ip))
                    .ok_or_else(|| exhausted(&net))?,
            ),
            None => None,
        };
        let meta = Arc::make_mut(&mut self.meta);
        meta.last_v4 = ipv4.or(meta.last_v4);
        meta.last_v6 = ipv6.or(meta.last_v6);
        Ok((ipv4, ipv6))
    }
}

//! `AdminService`: reads from this member's applied view, writes through `Cluster::propose`.
//!
//! Writes are checked only for what needs no state (names, tags, ids) before proposing:
//! this member's view may lag the leader (a user created a moment ago elsewhere), so
//! state-dependent checks are left to `Registry::apply`, whose refusal comes back as data.

// `tonic::Status` is the error type of every handler; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::AdminDeps;
use super::{convert, status};
use crate::proto::admin as pb;
use crate::proto::admin::admin_service_server::AdminService;
use crate::registry::secrets::{self, SecretKind};
use crate::registry::{
    Command, ExpireUntil, Expiry, NodeId, Outcome, Proposal, Registry, Rejection, Timestamp, names,
};

type Reply<T> = Result<Response<T>, Status>;

/// The admin gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct AdminApi {
    deps: AdminDeps,
}

impl AdminApi {
    pub fn new(deps: AdminDeps) -> Self {
        AdminApi { deps }
    }

    pub fn deps(&self) -> &AdminDeps {
        &self.deps
    }

    fn view(&self) -> Arc<Registry> {
        self.deps.cluster.view()
    }

    /// Refuses a policy Tailscale would refuse (or that names what this tailnet lacks),
    /// with the reason; the running policy stays.
    fn check(&self, policy: &str) -> Result<(), Status> {
        crate::control::policy::check(&self.view(), &self.deps.presence, policy)
            .map_err(|e| Status::invalid_argument(format!("policy refused: {e}")))
    }

    /// With `policy.mode: file` the file is the policy: writes through the API are refused.
    fn refuse_in_file_mode(&self) -> Result<(), Status> {
        match &self.deps.policy_file {
            Some(path) => Err(Status::failed_precondition(format!(
                "policy.mode is file: edit {} (members reload it on change and on SIGHUP)",
                path.display()
            ))),
            None => Ok(()),
        }
    }

    /// The compiled policy for `view` (route approvals and primaries).
    fn access(&self, view: &Registry) -> crate::control::policy::Access {
        self.deps
            .access
            .access(view, &self.deps.presence, &self.deps.server_url)
    }

    /// The registry for a read request: linearizable unless the caller asked for `local`.
    async fn read(&self, local: bool) -> Result<Arc<Registry>, Status> {
        self.deps
            .cluster
            .read_view(local)
            .await
            .map_err(|e| status::from_propose(&e))
    }

    /// Proposes a write; a refusal or a cluster error becomes the matching status.
    /// Proposes a write in the caller's name: applying it records it in the audit log.
    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        let name = command.name();
        let proposal = Proposal::by(super::audit::current_actor(), command);
        match self.deps.cluster.propose_once(proposal).await {
            Ok(Outcome::Rejected(rejection)) => {
                tracing::debug!(command = name, %rejection, "admin write refused");
                Err(status::from_rejection(&rejection))
            }
            Ok(outcome) => {
                tracing::debug!(command = name, "admin write applied");
                Ok(outcome)
            }
            Err(error) => {
                tracing::warn!(command = name, %error, "admin write failed");
                Err(status::from_propose(&error))
            }
        }
    }

    /// `user`: the owner's name when the caller knows it (this member's view may not have
    /// applied the write yet, so it may not resolve the owner's id to a name).
    async fn propose_node(&self, command: Command, user: Option<&str>) -> Reply<pb::NodeResponse> {
        let what = command.name();
        match self.propose(command).await? {
            Outcome::Node(node) => {
                let sessions = self.deps.presence.sessions();
                let view = self.view();
                let access = self.access(&view);
                let mut node = convert::node(&view, &node, &sessions, Timestamp::now(), &access);
                if let Some(user) = user {
                    node.user = user.to_string();
                }
                Ok(Response::new(pb::NodeResponse { node: Some(node) }))
            }
            _ => Err(status::unexpected(what)),
        }
    }

    async fn propose_user(&self, command: Command) -> Reply<pb::UserResponse> {
        let what = command.name();
        match self.propose(command).await? {
            Outcome::User(user) => Ok(Response::new(pb::UserResponse {
                user: Some(convert::user(&user)),
            })),
            _ => Err(status::unexpected(what)),
        }
    }

    /// Proposes a change to `user`'s pre-auth key and answers with the key as it became.
    async fn propose_preauth_key(
        &self,
        command: Command,
        user: String,
    ) -> Reply<pb::PreAuthKeyResponse> {
        let what = command.name();
        match self.propose(command).await? {
            Outcome::PreAuthKey(key) => {
                let mut key = convert::preauth_key(&self.view(), &key, None, Timestamp::now());
                key.user = user;
                Ok(Response::new(pb::PreAuthKeyResponse {
                    pre_auth_key: Some(key),
                }))
            }
            _ => Err(status::unexpected(what)),
        }
    }

    async fn propose_api_key(&self, command: Command) -> Reply<pb::ApiKeyResponse> {
        let what = command.name();
        match self.propose(command).await? {
            Outcome::ApiKey(key) => Ok(Response::new(pb::ApiKeyResponse {
                api_key: Some(convert::api_key(&key, None, Timestamp::now())),
            })),
            _ => Err(status::unexpected(what)),
        }
    }

    async fn membership_reply(
        &self,
        result: Result<(), crate::raft::ProposeError>,
        what: &str,
    ) -> Reply<pb::ClusterStatusResponse> {
        let audit = Command::RecordAudit {
            actor: super::audit::current_actor(),
            action: format!("cluster {what}"),
            target: String::new(),
            result: match &result {
                Ok(()) => "ok".into(),
                Err(error) => error.to_string(),
            },
        };
        if let Err(error) = self.deps.cluster.propose(audit).await {
            tracing::warn!(%error, "could not record a membership change in the audit log");
        }
        match result {
            Ok(()) => {
                tracing::info!(change = what, "cluster membership changed");
                let status = self.deps.cluster.status().await;
                Ok(Response::new(convert::cluster_status(&status)))
            }
            Err(error) => {
                tracing::warn!(change = what, %error, "cluster membership change failed");
                Err(status::from_propose(&error))
            }
        }
    }
}

/// A listing's optional user filter: empty = everyone; an unknown name is NotFound.
fn user_filter(view: &Registry, name: &str) -> Result<Option<crate::registry::UserId>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    user_must_exist(view, name)?;
    Ok(view.user_by_name(name).map(|u| u.id))
}

fn user_must_exist(view: &Registry, name: &str) -> Result<(), Status> {
    if view.user_by_name(name).is_none() {
        return Err(status::from_rejection(&Rejection::UserNotFound(
            name.to_string(),
        )));
    }
    Ok(())
}

fn validate_user_name(name: &str) -> Result<(), Status> {
    names::validate_user_name(name)
        .map_err(|reason| status::from_rejection(&Rejection::InvalidName(name.to_string(), reason)))
}

/// A display name and an email are optional; set, they must look like what they are.
fn validate_profile(display_name: &str, email: &str) -> Result<(), Status> {
    if display_name.chars().count() > 256 || display_name.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "a display name has at most 256 characters and no control characters",
        ));
    }
    let looks_like_email = email.len() <= 320
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((local, domain)) if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if !email.is_empty() && !looks_like_email {
        return Err(Status::invalid_argument(format!(
            "{email:?} is not an email address"
        )));
    }
    Ok(())
}

fn validate_tags(tags: &[String]) -> Result<(), Status> {
    for tag in tags {
        let label = tag.strip_prefix("tag:").unwrap_or("");
        if names::validate_label(label).is_err() {
            return Err(status::from_rejection(&Rejection::InvalidTag(tag.clone())));
        }
    }
    Ok(())
}

/// The lookup prefix of a key given as the full secret, a truncated secret, or the prefix.
pub fn key_prefix(kind: SecretKind, text: &str) -> Result<String, Status> {
    let text = text.trim();
    if let Some((prefix, _)) = secrets::parse(kind, text) {
        return Ok(prefix);
    }
    let tag = match kind {
        SecretKind::PreAuth => "hskey-auth-",
        SecretKind::Api => "hskey-api-",
    };
    let prefix = match text.strip_prefix(tag) {
        Some(rest) => rest.split('-').next().unwrap_or(""),
        None => text,
    };
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Status::invalid_argument(format!(
            "{text:?} is neither a key nor a key prefix"
        )));
    }
    Ok(prefix.to_string())
}

/// The registration id from `hsctl nodes register --key`: the id itself, or the AuthURL
/// that ends with it (`https://…/register/<id>`).
pub fn registration_id(text: &str) -> Result<String, Status> {
    let text = text.trim();
    let text = text.split(['?', '#']).next().unwrap_or("");
    let id = text.rsplit('/').find(|s| !s.is_empty()).unwrap_or("");
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "a registration key is required (--key)",
        ));
    }
    Ok(id.to_string())
}

fn node_id(id: u64) -> Result<NodeId, Status> {
    if id == 0 {
        return Err(Status::invalid_argument("node ids start at 1"));
    }
    Ok(NodeId(id))
}

fn member_id(id: u64) -> Result<u64, Status> {
    if id == 0 {
        return Err(Status::invalid_argument("member ids start at 1"));
    }
    Ok(id)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    // ----- users -----

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Reply<pb::UserResponse> {
        let request = request.into_inner();
        validate_user_name(&request.name)?;
        validate_profile(&request.display_name, &request.email)?;
        self.propose_user(Command::CreateUser {
            name: request.name,
            display_name: request.display_name,
            email: request.email,
        })
        .await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Reply<pb::ListUsersResponse> {
        let request = request.into_inner();
        let view = self.read(request.local).await?;
        let users = view
            .users()
            .filter(|u| request.name.is_empty() || u.name == request.name)
            .map(convert::user)
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn rename_user(
        &self,
        request: Request<pb::RenameUserRequest>,
    ) -> Reply<pb::UserResponse> {
        let request = request.into_inner();
        validate_user_name(&request.new_name)?;
        self.propose_user(Command::RenameUser {
            old: request.old_name,
            new: request.new_name,
        })
        .await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Reply<pb::UserResponse> {
        let name = request.into_inner().name;
        self.propose_user(Command::DeleteUser { name }).await
    }

    // ----- pre-auth keys -----

    async fn create_pre_auth_key(
        &self,
        request: Request<pb::CreatePreAuthKeyRequest>,
    ) -> Reply<pb::PreAuthKeyResponse> {
        let request = request.into_inner();
        validate_tags(&request.tags)?;
        let secret = secrets::generate(SecretKind::PreAuth);
        let user = request.user.clone();
        let command = Command::CreatePreAuthKey {
            user: request.user,
            prefix: secret.prefix,
            hash: secret.hash,
            reusable: request.reusable,
            ephemeral: request.ephemeral,
            expiration: request.expiration.as_ref().map(convert::from_timestamp),
            tags: request.tags,
        };
        match self.propose(command).await? {
            Outcome::PreAuthKey(key) => {
                let mut key =
                    convert::preauth_key(&self.view(), &key, Some(secret.full), Timestamp::now());
                // This member may not have applied the write yet; the name is known anyway.
                key.user = user;
                Ok(Response::new(pb::PreAuthKeyResponse {
                    pre_auth_key: Some(key),
                }))
            }
            _ => Err(status::unexpected("create_preauthkey")),
        }
    }

    async fn list_pre_auth_keys(
        &self,
        request: Request<pb::ListPreAuthKeysRequest>,
    ) -> Reply<pb::ListPreAuthKeysResponse> {
        let request = request.into_inner();
        let view = self.read(request.local).await?;
        let user = user_filter(&view, &request.user)?;
        let now = Timestamp::now();
        let pre_auth_keys = view
            .preauth_keys()
            .filter(|k| user.is_none_or(|u| k.user == u))
            .map(|k| convert::preauth_key(&view, k, None, now))
            .collect();
        Ok(Response::new(pb::ListPreAuthKeysResponse { pre_auth_keys }))
    }

    async fn expire_pre_auth_key(
        &self,
        request: Request<pb::ExpirePreAuthKeyRequest>,
    ) -> Reply<pb::PreAuthKeyResponse> {
        let request = request.into_inner();
        let prefix = key_prefix(SecretKind::PreAuth, &request.key)?;
        let command = Command::ExpirePreAuthKey {
            user: request.user.clone(),
            prefix,
        };
        self.propose_preauth_key(command, request.user).await
    }

    async fn delete_pre_auth_key(
        &self,
        request: Request<pb::ExpirePreAuthKeyRequest>,
    ) -> Reply<pb::PreAuthKeyResponse> {
        let request = request.into_inner();
        let prefix = key_prefix(SecretKind::PreAuth, &request.key)?;
        let command = Command::DeletePreAuthKey {
            user: request.user.clone(),
            prefix,
        };
        self.propose_preauth_key(command, request.user).await
    }

    // ----- nodes -----

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Reply<pb::ListNodesResponse> {
        let request = request.into_inner();
        let view = self.read(request.local).await?;
        let user = user_filter(&view, &request.user)?;
        let sessions = self.deps.presence.sessions();
        let now = Timestamp::now();
        let access = self.access(&view);
        let nodes = view
            .nodes()
            .filter(|n| user.is_none_or(|u| n.user == u))
            .map(|n| convert::node(&view, n, &sessions, now, &access))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(&self, request: Request<pb::GetNodeRequest>) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let id = node_id(request.id)?;
        let view = self.read(request.local).await?;
        let node = view
            .node(id)
            .ok_or_else(|| status::from_rejection(&Rejection::NodeNotFound(id)))?;
        let sessions = self.deps.presence.sessions();
        let access = self.access(&view);
        Ok(Response::new(pb::NodeResponse {
            node: Some(convert::node(
                &view,
                node,
                &sessions,
                Timestamp::now(),
                &access,
            )),
        }))
    }

    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let auth_id = registration_id(&request.key)?;
        // Counted from the leader's stamp when the registration is applied.
        let expiry = self
            .deps
            .node_key_expiry
            .map(|d| Expiry::AfterMillis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        let command = Command::CompleteInteractive {
            auth_id,
            user: request.user.clone(),
            auto_approve: self.deps.auto_approve,
            expiry,
        };
        self.propose_node(command, Some(&request.user)).await
    }

    async fn reject_registration(
        &self,
        request: Request<pb::RejectRegistrationRequest>,
    ) -> Reply<pb::RejectRegistrationResponse> {
        let auth_id = registration_id(&request.into_inner().auth_id)?;
        self.propose(Command::RejectInteractive { auth_id }).await?;
        Ok(Response::new(pb::RejectRegistrationResponse {}))
    }

    async fn approve_node(&self, request: Request<pb::NodeIdRequest>) -> Reply<pb::NodeResponse> {
        let id = node_id(request.into_inner().id)?;
        self.propose_node(Command::ApproveNode { id }, None).await
    }

    async fn expire_node(
        &self,
        request: Request<pb::ExpireNodeRequest>,
    ) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let id = node_id(request.id)?;
        let until = match (request.disable_expiry, &request.expiry) {
            (true, _) => ExpireUntil::Never,
            (false, Some(at)) => ExpireUntil::At(convert::from_timestamp(at)),
            (false, None) => ExpireUntil::Now,
        };
        self.propose_node(Command::ExpireNode { id, until }, None)
            .await
    }

    async fn rename_node(
        &self,
        request: Request<pb::RenameNodeRequest>,
    ) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let id = node_id(request.id)?;
        names::validate_label(&request.new_name).map_err(|reason| {
            status::from_rejection(&Rejection::InvalidName(request.new_name.clone(), reason))
        })?;
        self.propose_node(
            Command::RenameNode {
                id,
                name: request.new_name,
            },
            None,
        )
        .await
    }

    async fn delete_node(
        &self,
        request: Request<pb::NodeIdRequest>,
    ) -> Reply<pb::DeleteNodeResponse> {
        let id = node_id(request.into_inner().id)?;
        match self.propose(Command::DeleteNode { id }).await? {
            Outcome::Removed(_) => Ok(Response::new(pb::DeleteNodeResponse { id: id.0 })),
            _ => Err(status::unexpected("delete_node")),
        }
    }

    async fn move_node(&self, request: Request<pb::MoveNodeRequest>) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let id = node_id(request.id)?;
        let command = Command::MoveNode {
            id,
            user: request.user.clone(),
        };
        self.propose_node(command, Some(&request.user)).await
    }

    async fn set_tags(&self, request: Request<pb::SetTagsRequest>) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let id = node_id(request.id)?;
        validate_tags(&request.tags)?;
        self.propose_node(
            Command::TagNode {
                id,
                tags: request.tags,
            },
            None,
        )
        .await
    }

    async fn approve_routes(
        &self,
        request: Request<pb::ApproveRoutesRequest>,
    ) -> Reply<pb::NodeResponse> {
        let request = request.into_inner();
        let id = node_id(request.id)?;
        let mut routes = Vec::new();
        for r in &request.routes {
            let net = crate::policy::parse_route(r)
                .map_err(|e| Status::invalid_argument(format!("route {r:?}: {e}")))?;
            routes.push(net);
        }
        self.propose_node(Command::ApproveRoutes { id, routes }, None)
            .await
    }

    // ----- API keys -----

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Reply<pb::ApiKeyResponse> {
        let request = request.into_inner();
        let secret = secrets::generate(SecretKind::Api);
        let command = Command::CreateApiKey {
            prefix: secret.prefix,
            hash: secret.hash,
            expiration: request.expiration.as_ref().map(convert::from_timestamp),
        };
        match self.propose(command).await? {
            Outcome::ApiKey(key) => {
                let key = convert::api_key(&key, Some(secret.full), Timestamp::now());
                Ok(Response::new(pb::ApiKeyResponse { api_key: Some(key) }))
            }
            _ => Err(status::unexpected("create_apikey")),
        }
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Reply<pb::ListApiKeysResponse> {
        let now = Timestamp::now();
        let api_keys = self
            .read(request.into_inner().local)
            .await?
            .api_keys()
            .map(|k| convert::api_key(k, None, now))
            .collect();
        Ok(Response::new(pb::ListApiKeysResponse { api_keys }))
    }

    async fn expire_api_key(
        &self,
        request: Request<pb::ApiKeyPrefixRequest>,
    ) -> Reply<pb::ApiKeyResponse> {
        let prefix = key_prefix(SecretKind::Api, &request.into_inner().prefix)?;
        self.propose_api_key(Command::ExpireApiKey { prefix }).await
    }

    async fn delete_api_key(
        &self,
        request: Request<pb::ApiKeyPrefixRequest>,
    ) -> Reply<pb::ApiKeyResponse> {
        let prefix = key_prefix(SecretKind::Api, &request.into_inner().prefix)?;
        self.propose_api_key(Command::DeleteApiKey { prefix }).await
    }

    // ----- policy -----

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Reply<pb::PolicyResponse> {
        let view = self.read(request.into_inner().local).await?;
        Ok(Response::new(pb::PolicyResponse {
            policy: view.policy().to_string(),
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Reply<pb::PolicyResponse> {
        let policy = request.into_inner().policy;
        self.refuse_in_file_mode()?;
        self.check(&policy)?;
        match self
            .propose(Command::SetPolicy {
                policy: policy.clone(),
            })
            .await?
        {
            Outcome::Done => Ok(Response::new(pb::PolicyResponse { policy })),
            _ => Err(status::unexpected("set_policy")),
        }
    }

    async fn list_policy_versions(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Reply<pb::ListPolicyVersionsResponse> {
        let view = self.read(request.into_inner().local).await?;
        let versions = view
            .policy_versions()
            .map(|v| pb::PolicyVersion {
                version: v.version,
                policy: v.policy.clone(),
                at: Some(convert::timestamp(v.at)),
                current: v.policy == view.policy(),
            })
            .collect();
        Ok(Response::new(pb::ListPolicyVersionsResponse { versions }))
    }

    async fn rollback_policy(
        &self,
        request: Request<pb::RollbackPolicyRequest>,
    ) -> Reply<pb::PolicyResponse> {
        let version = request.into_inner().version;
        self.refuse_in_file_mode()?;
        let view = self.view();
        let policy = view
            .policy_version(version)
            .map(|v| v.policy.clone())
            .ok_or_else(|| status::from_rejection(&Rejection::PolicyVersionNotFound(version)))?;
        // The tailnet may have changed since (a tag's owners, a user's domain).
        self.check(&policy)?;
        match self.propose(Command::RollbackPolicy { version }).await? {
            Outcome::Done => Ok(Response::new(pb::PolicyResponse { policy })),
            _ => Err(status::unexpected("rollback_policy")),
        }
    }

    async fn check_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Reply<pb::PolicyResponse> {
        let policy = request.into_inner().policy;
        self.check(&policy)?;
        Ok(Response::new(pb::PolicyResponse { policy }))
    }

    // ----- cluster -----

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        let status = self.deps.cluster.status().await;
        Ok(Response::new(convert::cluster_status(&status)))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        let request = request.into_inner();
        let id = member_id(request.id)?;
        if request.address.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a member address (HOST:PORT) is required",
            ));
        }
        tracing::info!(member.id = id, member.addr = %request.address, "adding member");
        let result = self
            .deps
            .cluster
            .add_member(id, request.address, request.control_url)
            .await;
        self.membership_reply(result, "add").await
    }

    async fn promote_member(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        let id = member_id(request.into_inner().id)?;
        tracing::info!(member.id = id, "promoting member");
        let result = self.deps.cluster.promote_member(id).await;
        self.membership_reply(result, "promote").await
    }

    async fn remove_member(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        let id = member_id(request.into_inner().id)?;
        tracing::info!(member.id = id, "removing member");
        let result = self.deps.cluster.remove_member(id).await;
        self.membership_reply(result, "remove").await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        let to = request.into_inner().id.map(member_id).transpose()?;
        tracing::info!(member.to = ?to, "transferring leadership");
        let result = self.deps.cluster.transfer_leader(to).await;
        self.membership_reply(result, "transfer-leader").await
    }

    async fn drain_member(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> Reply<pb::ClusterStatusResponse> {
        let id = member_id(request.into_inner().id)?;
        tracing::info!(member.id = id, "draining member");
        let result = self.deps.cluster.drain_member(id).await;
        self.membership_reply(result, "drain").await
    }

    async fn version(&self, _request: Request<pb::VersionRequest>) -> Reply<pb::VersionResponse> {
        Ok(Response::new(pb::VersionResponse {
            version: self.deps.version.to_string(),
            member_id: self.deps.cluster.member_id(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Reply<pb::ListAuditResponse> {
        let request = request.into_inner();
        let since = request
            .since
            .as_ref()
            .map(convert::from_timestamp)
            .unwrap_or_default();
        let view = self.read(request.local).await?;
        let records = view
            .audit_since(since)
            .filter(|r| request.actor.is_empty() || r.actor == request.actor)
            .map(|r| pb::AuditRecord {
                seq: r.seq,
                time: Some(convert::timestamp(r.at)),
                actor: r.actor.clone(),
                action: r.action.clone(),
                target: r.target.clone(),
                result: r.result.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListAuditResponse { records }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefix_accepts_full_key_truncated_key_or_prefix() {
        let secret = secrets::generate(SecretKind::PreAuth);
        assert_eq!(
            key_prefix(SecretKind::PreAuth, &secret.full).unwrap(),
            secret.prefix
        );
        assert_eq!(
            key_prefix(SecretKind::PreAuth, &secret.full[..30]).unwrap(),
            secret.prefix
        );
        assert_eq!(
            key_prefix(SecretKind::PreAuth, &secret.prefix).unwrap(),
            secret.prefix
        );
        assert_eq!(
            key_prefix(SecretKind::PreAuth, "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            key_prefix(SecretKind::Api, "a b").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn registration_id_accepts_the_id_or_its_auth_url() {
        assert_eq!(registration_id("abc123").unwrap(), "abc123");
        assert_eq!(
            registration_id("http://127.0.0.1:8080/register/abc123").unwrap(),
            "abc123"
        );
        assert_eq!(
            registration_id("http://h/register/abc123/?x=1").unwrap(),
            "abc123"
        );
        assert!(registration_id("  ").is_err());
    }
}

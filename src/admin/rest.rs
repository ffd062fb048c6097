//! The REST admin API on the control port (`/api/v1/…`), as headscale users script it:
//! `Authorization: Bearer <API key>` on every call, JSON in and out. Each route calls the
//! same `AdminService` method hsctl's gRPC call reaches, and prints the same JSON fields
//! as `hsctl -o json`, so the two never disagree.

use axum::Router;
use axum::extract::{Json, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Code;

use super::grpc::AdminApi;
use super::{AdminDeps, auth};
use crate::proto::admin as pb;
use crate::proto::admin::admin_service_server::AdminService;
use crate::proto::json;
use crate::registry::Timestamp;

/// A gRPC status as an HTTP answer: the usual gateway mapping, `{"code", "message"}` body.
struct ApiError(Box<tonic::Status>);

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        ApiError(Box::new(s))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = json!({ "code": self.0.code() as i32, "message": self.0.message() });
        (status, Json(body)).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::from(tonic::Status::invalid_argument(message))
}

/// Every route requires a valid, unexpired API key.
async fn require_api_key(State(deps): State<AdminDeps>, request: Request, next: Next) -> Response {
    let source = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(refusal) = deps.failed_auth.refusal_for(source) {
        return ApiError::from(refusal).into_response();
    }
    let header = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let actor = super::audit::bearer_actor(header);
    match auth::check_bearer(&deps.cluster.view(), header, Timestamp::now()) {
        Ok(()) => super::audit::with_actor(actor, next.run(request)).await,
        Err(reason) => {
            tracing::debug!(reason = reason.as_str(), "REST admin call refused");
            deps.failed_auth
                .report(actor, "rest", reason.as_str(), source);
            ApiError::from(tonic::Status::unauthenticated(
                "a valid API key is required (Authorization: Bearer hskey-api-…)",
            ))
            .into_response()
        }
    }
}

/// The `/api/v1` routes, to merge into the control router.
pub fn router(deps: AdminDeps) -> Router {
    let api = AdminApi::new(deps.clone());
    Router::new()
        .route("/api/v1/user", get(list_users).post(create_user))
        .route("/api/v1/user/{name}", delete(delete_user))
        .route("/api/v1/user/{old}/rename/{new}", post(rename_user))
        .route(
            "/api/v1/preauthkey",
            get(list_preauth_keys).post(create_preauth_key),
        )
        .route("/api/v1/preauthkey/expire", post(expire_preauth_key))
        .route("/api/v1/node", get(list_nodes))
        .route("/api/v1/node/register", post(register_node))
        .route("/api/v1/node/{id}", get(get_node).delete(delete_node))
        .route("/api/v1/node/{id}/expire", post(expire_node))
        .route("/api/v1/node/{id}/approve", post(approve_node))
        .route("/api/v1/node/{id}/rename/{name}", post(rename_node))
        .route("/api/v1/node/{id}/approve_routes", post(approve_routes))
        .route("/api/v1/policy", get(get_policy).put(set_policy))
        .route("/api/v1/policy/check", post(check_policy))
        .route("/api/v1/apikey", get(list_api_keys).post(create_api_key))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/apikey/expire", post(expire_api_key))
        .route("/api/v1/cluster/status", get(cluster_status))
        .with_state(api)
        .layer(middleware::from_fn_with_state(deps, require_api_key))
}

fn req<T>(t: T) -> tonic::Request<T> {
    tonic::Request::new(t)
}

/// An RFC 3339 time, a duration from now ("1h", "90d"), or "never"; absent = none.
fn expiration(value: Option<&str>) -> Result<Option<prost_types::Timestamp>, ApiError> {
    let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        }));
    }
    let relative: crate::proto::Expiration = text.parse().map_err(bad_request)?;
    Ok(relative.to_timestamp())
}

/// Decodes a request body or query as one of the routes would (`which` picks the route),
/// including the expiration text where the route takes one. Nothing else is done: the
/// fuzz harness feeds it outside bytes.
pub fn check_request_input(which: u8, input: &[u8]) -> Result<(), String> {
    fn body<T: for<'de> Deserialize<'de>>(input: &[u8]) -> Result<T, String> {
        serde_json::from_slice(input).map_err(|e| e.to_string())
    }
    fn query<T: for<'de> Deserialize<'de>>(input: &[u8]) -> Result<T, String> {
        let text = std::str::from_utf8(input).map_err(|e| e.to_string())?;
        serde_urlencoded::from_str(text).map_err(|e| e.to_string())
    }
    let expires = |text: Option<String>| {
        expiration(text.as_deref())
            .map(drop)
            .map_err(|e| e.0.message().to_string())
    };
    match which % 7 {
        0 => body::<CreateUser>(input).map(drop),
        1 => expires(body::<CreatePreAuthKey>(input)?.expiration),
        2 => body::<ExpirePreAuthKey>(input).map(drop),
        3 => expires(body::<CreateApiKey>(input)?.expiration),
        4 => body::<ApiKeyPrefix>(input).map(drop),
        5 => query::<ReadParams>(input).map(drop),
        _ => query::<RegisterParams>(input).map(drop),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ReadParams {
    /// Answer from this member's state without a read index.
    local: bool,
    user: Option<String>,
}

async fn list_users(State(api): State<AdminApi>, Query(p): Query<ReadParams>) -> ApiResult {
    let r = api
        .list_users(req(pb::ListUsersRequest {
            local: p.local,
            name: p.user.unwrap_or_default(),
        }))
        .await?;
    Ok(Json(
        json!({ "users": r.into_inner().users.iter().map(json::user).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    name: String,
}

async fn create_user(State(api): State<AdminApi>, Json(body): Json<CreateUser>) -> ApiResult {
    let r = api
        .create_user(req(pb::CreateUserRequest { name: body.name }))
        .await?
        .into_inner();
    Ok(Json(json!({ "user": r.user.as_ref().map(json::user) })))
}

async fn delete_user(State(api): State<AdminApi>, Path(name): Path<String>) -> ApiResult {
    api.delete_user(req(pb::DeleteUserRequest { name })).await?;
    Ok(Json(json!({})))
}

async fn rename_user(
    State(api): State<AdminApi>,
    Path((old, new)): Path<(String, String)>,
) -> ApiResult {
    let r = api
        .rename_user(req(pb::RenameUserRequest {
            old_name: old,
            new_name: new,
        }))
        .await?
        .into_inner();
    Ok(Json(json!({ "user": r.user.as_ref().map(json::user) })))
}

async fn list_preauth_keys(State(api): State<AdminApi>, Query(p): Query<ReadParams>) -> ApiResult {
    let user = p
        .user
        .ok_or_else(|| bad_request("the user query parameter is required"))?;
    let r = api
        .list_pre_auth_keys(req(pb::ListPreAuthKeysRequest {
            local: p.local,
            user,
        }))
        .await?;
    Ok(Json(
        json!({ "pre_auth_keys": r.into_inner().pre_auth_keys.iter().map(json::preauth_key).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePreAuthKey {
    user: String,
    #[serde(default)]
    reusable: bool,
    #[serde(default)]
    ephemeral: bool,
    /// RFC 3339 or a duration such as "1h"; headscale's default is 1h.
    expiration: Option<String>,
    #[serde(default, alias = "acl_tags", alias = "aclTags")]
    tags: Vec<String>,
}

async fn create_preauth_key(
    State(api): State<AdminApi>,
    Json(body): Json<CreatePreAuthKey>,
) -> ApiResult {
    let expiration = expiration(Some(body.expiration.as_deref().unwrap_or("1h")))?;
    let r = api
        .create_pre_auth_key(req(pb::CreatePreAuthKeyRequest {
            user: body.user,
            reusable: body.reusable,
            ephemeral: body.ephemeral,
            expiration,
            tags: body.tags,
        }))
        .await?
        .into_inner();
    Ok(Json(
        json!({ "pre_auth_key": r.pre_auth_key.as_ref().map(json::preauth_key) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpirePreAuthKey {
    user: String,
    key: String,
}

async fn expire_preauth_key(
    State(api): State<AdminApi>,
    Json(body): Json<ExpirePreAuthKey>,
) -> ApiResult {
    let r = api
        .expire_pre_auth_key(req(pb::ExpirePreAuthKeyRequest {
            user: body.user,
            key: body.key,
        }))
        .await?;
    Ok(Json(
        json!({ "pre_auth_key": r.into_inner().pre_auth_key.as_ref().map(json::preauth_key) }),
    ))
}

async fn list_nodes(State(api): State<AdminApi>, Query(p): Query<ReadParams>) -> ApiResult {
    let r = api
        .list_nodes(req(pb::ListNodesRequest {
            local: p.local,
            user: p.user.unwrap_or_default(),
        }))
        .await?;
    Ok(Json(
        json!({ "nodes": r.into_inner().nodes.iter().map(json::node).collect::<Vec<_>>() }),
    ))
}

fn node_reply(r: tonic::Response<pb::NodeResponse>) -> ApiResult {
    Ok(Json(
        json!({ "node": r.into_inner().node.as_ref().map(json::node) }),
    ))
}

async fn get_node(
    State(api): State<AdminApi>,
    Path(id): Path<u64>,
    Query(p): Query<ReadParams>,
) -> ApiResult {
    node_reply(
        api.get_node(req(pb::GetNodeRequest { local: p.local, id }))
            .await?,
    )
}

#[derive(Deserialize)]
struct RegisterParams {
    user: String,
    key: String,
}

async fn register_node(State(api): State<AdminApi>, Query(p): Query<RegisterParams>) -> ApiResult {
    node_reply(
        api.register_node(req(pb::RegisterNodeRequest {
            user: p.user,
            key: p.key,
        }))
        .await?,
    )
}

async fn delete_node(State(api): State<AdminApi>, Path(id): Path<u64>) -> ApiResult {
    api.delete_node(req(pb::NodeIdRequest { id })).await?;
    Ok(Json(json!({})))
}

async fn expire_node(State(api): State<AdminApi>, Path(id): Path<u64>) -> ApiResult {
    node_reply(api.expire_node(req(pb::NodeIdRequest { id })).await?)
}

async fn approve_node(State(api): State<AdminApi>, Path(id): Path<u64>) -> ApiResult {
    node_reply(api.approve_node(req(pb::NodeIdRequest { id })).await?)
}

async fn rename_node(
    State(api): State<AdminApi>,
    Path((id, name)): Path<(u64, String)>,
) -> ApiResult {
    node_reply(
        api.rename_node(req(pb::RenameNodeRequest { id, new_name: name }))
            .await?,
    )
}

#[derive(Deserialize)]
struct Routes {
    #[serde(default)]
    routes: Vec<String>,
}

async fn approve_routes(
    State(api): State<AdminApi>,
    Path(id): Path<u64>,
    Json(body): Json<Routes>,
) -> ApiResult {
    node_reply(
        api.approve_routes(req(pb::ApproveRoutesRequest {
            id,
            routes: body.routes,
        }))
        .await?,
    )
}

#[derive(Deserialize)]
struct PolicyBody {
    policy: String,
}

async fn get_policy(State(api): State<AdminApi>, Query(p): Query<ReadParams>) -> ApiResult {
    let r = api
        .get_policy(req(pb::GetPolicyRequest { local: p.local }))
        .await?;
    Ok(Json(json!({ "policy": r.into_inner().policy })))
}

async fn set_policy(State(api): State<AdminApi>, Json(body): Json<PolicyBody>) -> ApiResult {
    let r = api
        .set_policy(req(pb::SetPolicyRequest {
            policy: body.policy,
        }))
        .await?;
    Ok(Json(json!({ "policy": r.into_inner().policy })))
}

async fn check_policy(State(api): State<AdminApi>, Json(body): Json<PolicyBody>) -> ApiResult {
    let r = api
        .check_policy(req(pb::SetPolicyRequest {
            policy: body.policy,
        }))
        .await?;
    Ok(Json(json!({ "policy": r.into_inner().policy })))
}

async fn list_api_keys(State(api): State<AdminApi>, Query(p): Query<ReadParams>) -> ApiResult {
    let r = api
        .list_api_keys(req(pb::ListApiKeysRequest { local: p.local }))
        .await?;
    Ok(Json(
        json!({ "api_keys": r.into_inner().api_keys.iter().map(json::api_key).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct AuditParams {
    local: bool,
    /// RFC 3339.
    since: Option<String>,
    actor: Option<String>,
}

async fn list_audit(State(api): State<AdminApi>, Query(p): Query<AuditParams>) -> ApiResult {
    let since = match p.since.as_deref() {
        None => None,
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| super::convert::timestamp(Timestamp(t.timestamp_millis())))
                .map_err(|_| bad_request(format!("since {text:?} is not an RFC 3339 time")))?,
        ),
    };
    let r = api
        .list_audit(req(pb::ListAuditRequest {
            since,
            actor: p.actor.unwrap_or_default(),
            local: p.local,
        }))
        .await?;
    Ok(Json(
        json!({ "records": r.into_inner().records.iter().map(json::audit_record).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct CreateApiKey {
    expiration: Option<String>,
}

async fn create_api_key(
    State(api): State<AdminApi>,
    body: Option<Json<CreateApiKey>>,
) -> ApiResult {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let expiration = expiration(Some(body.expiration.as_deref().unwrap_or("90d")))?;
    let r = api
        .create_api_key(req(pb::CreateApiKeyRequest { expiration }))
        .await?
        .into_inner();
    Ok(Json(
        json!({ "api_key": r.api_key.as_ref().map(json::api_key) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyPrefix {
    prefix: String,
}

async fn expire_api_key(State(api): State<AdminApi>, Json(body): Json<ApiKeyPrefix>) -> ApiResult {
    let r = api
        .expire_api_key(req(pb::ApiKeyPrefixRequest {
            prefix: body.prefix,
        }))
        .await?;
    Ok(Json(
        json!({ "api_key": r.into_inner().api_key.as_ref().map(json::api_key) }),
    ))
}

async fn cluster_status(State(api): State<AdminApi>) -> ApiResult {
    let r = api
        .cluster_status(req(pb::ClusterStatusRequest { local: true }))
        .await?;
    Ok(Json(json::cluster_status(&r.into_inner())))
}

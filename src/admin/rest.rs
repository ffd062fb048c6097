//! The REST admin API on the control port (`/api/v1/…`) as headscale v0.28/v0.29 serves
//! it through its gRPC gateway, so scripts, headplane and headscale-ui written for
//! headscale work unchanged: `Authorization: Bearer <API key>` on every call, headscale's
//! routes, request fields in lowerCamelCase or snake_case, ids as strings or numbers,
//! answers shaped by `proto::gateway`, errors as `{"code", "message", "details"}` with
//! the gateway's HTTP statuses. hsd's own additions (node approval, policy history,
//! audit, cluster) follow the same conventions. Each route calls the `AdminService`
//! method hsctl's gRPC call reaches, so the two never disagree.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Json, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tonic::Code;

use super::grpc::AdminApi;
use super::{AdminDeps, auth, console};
use crate::proto::admin as pb;
use crate::proto::admin::admin_service_server::AdminService;
use crate::proto::gateway;
use crate::registry::Timestamp;

/// A gRPC status as the gateway answers it: its HTTP status, `{"code","message","details"}`.
#[derive(Debug)]
pub struct ApiError(Box<tonic::Status>);

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        ApiError(Box::new(s))
    }
}

/// The HTTP status grpc-gateway gives each gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("valid status"),
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
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(status: StatusCode, code: Code, message: &str) -> Response {
    let body = json!({ "code": code as i32, "message": message, "details": [] });
    (status, Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(http_status(self.0.code()), self.0.code(), self.0.message())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::from(tonic::Status::invalid_argument(message))
}

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::from(tonic::Status::not_found(message))
}

/// Every route requires a valid, unexpired API key.
async fn require_api_key(State(deps): State<AdminDeps>, request: Request, next: Next) -> Response {
    let source = console::source_ip(&request);
    if let Some(refusal) = deps.failed_auth.refusal_for(source) {
        return ApiError::from(refusal).into_response();
    }
    // A script sends its key as a bearer token; the console's page, as its session cookie.
    let bearer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let session = match bearer {
        Some(_) => None,
        None => console::session(request.headers()),
    };
    if session.is_some() && !console::csrf_allows(request.method(), request.headers()) {
        return ApiError::from(tonic::Status::permission_denied(
            "a console write needs its CSRF token in the X-CSRF-Token header",
        ))
        .into_response();
    }
    let from_cookie = match session {
        Some(console::Session::ApiKey(key)) => Some(format!("Bearer {key}")),
        Some(console::Session::Oidc(sealed)) => {
            let admin = deps.oidc.as_ref().and_then(|o| o.open_session(sealed));
            return match admin {
                Some(admin) => {
                    let actor = format!("oidc:{}", admin.who);
                    super::audit::with_actor(actor, next.run(request)).await
                }
                None => ApiError::from(tonic::Status::unauthenticated(
                    "the console session has ended; log in again",
                ))
                .into_response(),
            };
        }
        None => None,
    };
    let header = bearer.or(from_cookie);
    let header = header.as_deref();
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

/// The `/api/v1` routes, `/version` and the console at `/admin`, to merge into the control
/// router.
pub fn router(deps: AdminDeps) -> Router {
    let api = AdminApi::new(deps.clone());
    let deps_for_console = deps.clone();
    let authenticated = Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/version", get(version))
        .route("/api/v1/user", get(list_users).post(create_user))
        .route("/api/v1/user/{id}", axum::routing::delete(delete_user))
        .route("/api/v1/user/{old_id}/rename/{new_name}", post(rename_user))
        .route(
            "/api/v1/preauthkey",
            get(list_preauth_keys)
                .post(create_preauth_key)
                .delete(delete_preauth_key),
        )
        .route("/api/v1/preauthkey/expire", post(expire_preauth_key))
        .route("/api/v1/node", get(list_nodes))
        .route("/api/v1/node/register", post(register_node))
        .route("/api/v1/node/backfillips", post(backfill_ips))
        .route("/api/v1/node/{id}", get(get_node).delete(delete_node))
        .route("/api/v1/node/{id}/expire", post(expire_node))
        .route("/api/v1/node/{id}/approve", post(approve_node))
        .route("/api/v1/node/{id}/rename/{new_name}", post(rename_node))
        .route("/api/v1/node/{id}/tags", post(set_tags))
        .route("/api/v1/node/{id}/user", post(move_node))
        .route("/api/v1/node/{id}/approve_routes", post(approve_routes))
        .route("/api/v1/auth/register", post(auth_register))
        .route("/api/v1/auth/approve", post(auth_approve))
        .route("/api/v1/auth/reject", post(auth_reject))
        .route("/api/v1/apikey", get(list_api_keys).post(create_api_key))
        .route("/api/v1/apikey/expire", post(expire_api_key))
        .route(
            "/api/v1/apikey/{prefix}",
            axum::routing::delete(delete_api_key),
        )
        .route("/api/v1/policy", get(get_policy).put(set_policy))
        .route("/api/v1/policy/check", post(check_policy))
        .route("/api/v1/policy/history", get(policy_history))
        .route("/api/v1/policy/rollback", post(rollback_policy))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/cluster/status", get(cluster_status))
        .route("/api/v1/{*rest}", any(unknown_route))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api.clone())
        .layer(middleware::from_fn_with_state(deps, require_api_key));
    let public = Router::new()
        .route("/api/v1/openapi.json", get(super::openapi::document))
        .route("/version", get(version))
        .with_state(api);
    Router::new()
        .merge(console::router(deps_for_console))
        .merge(public)
        .merge(authenticated)
}

async fn unknown_route() -> Response {
    error_response(StatusCode::NOT_FOUND, Code::NotFound, "Not Found")
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unimplemented,
        "Method Not Allowed",
    )
}

fn req<T>(t: T) -> tonic::Request<T> {
    tonic::Request::new(t)
}

// ----- request decoding, as the gateway's protojson reads it -----

/// A JSON body: unknown fields ignored, an empty body read as `{}`.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("invalid request body: {e}")))
}

/// A uint64 as protojson takes it: a JSON number or a decimal string.
fn de_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Null => Ok(0),
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| D::Error::custom(format!("{n} is not an unsigned 64-bit id"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("{s:?} is not an unsigned 64-bit id"))),
        other => Err(D::Error::custom(format!("{other} is not an id"))),
    }
}

/// A path or query id, with the gateway's wording when it is not a number.
fn parse_id(parameter: &str, text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|e| {
        bad_request(format!(
            "type mismatch, parameter: {parameter}, error: {text:?}: {e}"
        ))
    })
}

/// A query parameter under its proto name or its lowerCamelCase JSON name.
fn param<'a>(query: &'a HashMap<String, String>, proto_name: &str) -> Option<&'a str> {
    let camel = lower_camel(proto_name);
    query
        .get(proto_name)
        .or_else(|| query.get(&camel))
        .map(String::as_str)
}

fn lower_camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn flag(query: &HashMap<String, String>, proto_name: &str) -> Result<bool, ApiError> {
    match param(query, proto_name) {
        None | Some("") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(bad_request(format!(
            "type mismatch, parameter: {proto_name}, error: {other:?} is not a boolean"
        ))),
    }
}

/// hsd's `?local=true`: answer from this member's state without a read index.
fn local(query: &HashMap<String, String>) -> Result<bool, ApiError> {
    flag(query, "local")
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

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct CreateUser {
    name: String,
    #[serde(alias = "display_name")]
    display_name: String,
    email: String,
    /// Accepted as headscale takes it; hsd keeps no pictures.
    #[serde(alias = "picture_url")]
    #[allow(dead_code)]
    picture_url: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct CreatePreAuthKey {
    #[serde(deserialize_with = "de_u64")]
    user: u64,
    reusable: bool,
    ephemeral: bool,
    /// RFC 3339 (or a duration such as "1h"); unset = 1 hour, as headscale's CLI.
    expiration: Option<String>,
    #[serde(alias = "acl_tags")]
    acl_tags: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ById {
    #[serde(deserialize_with = "de_u64")]
    id: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CreateApiKey {
    expiration: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ApiKeyRef {
    prefix: String,
    #[serde(deserialize_with = "de_u64")]
    id: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Tags {
    tags: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Routes {
    routes: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PolicyBody {
    policy: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct AuthRegister {
    user: String,
    #[serde(alias = "auth_id")]
    auth_id: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct AuthId {
    #[serde(alias = "auth_id")]
    auth_id: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Rollback {
    #[serde(deserialize_with = "de_u64")]
    version: u64,
}

/// Decodes a request body or query as one of the routes would (`which` picks the route),
/// including the expiration text where the route takes one. Nothing else is done: the
/// fuzz harness feeds it outside bytes.
pub fn check_request_input(which: u8, input: &[u8]) -> Result<(), String> {
    fn query(input: &[u8]) -> Result<HashMap<String, String>, String> {
        let text = std::str::from_utf8(input).map_err(|e| e.to_string())?;
        serde_urlencoded::from_str(text).map_err(|e| e.to_string())
    }
    let message = |e: ApiError| e.0.message().to_string();
    let expires = |text: Option<String>| expiration(text.as_deref()).map(drop).map_err(message);
    match which % 8 {
        0 => body::<CreateUser>(input).map(drop).map_err(message),
        1 => expires(body::<CreatePreAuthKey>(input).map_err(message)?.expiration),
        2 => body::<ById>(input).map(drop).map_err(message),
        3 => expires(body::<CreateApiKey>(input).map_err(message)?.expiration),
        4 => body::<ApiKeyRef>(input).map(drop).map_err(message),
        5 => body::<AuthRegister>(input).map(drop).map_err(message),
        6 => {
            let q = query(input)?;
            expires(param(&q, "expiry").map(str::to_string))?;
            flag(&q, "disable_expiry").map(drop).map_err(message)
        }
        _ => {
            let q = query(input)?;
            if let Some(id) = param(&q, "id") {
                parse_id("id", id).map_err(message)?;
            }
            local(&q).map(drop).map_err(message)
        }
    }
}

// ----- lookups the gateway's id-based routes need -----

async fn all_users(api: &AdminApi, local: bool) -> Result<Vec<pb::User>, ApiError> {
    let request = pb::ListUsersRequest {
        local,
        name: String::new(),
    };
    Ok(api.list_users(req(request)).await?.into_inner().users)
}

async fn user_by_id(api: &AdminApi, id: u64) -> Result<pb::User, ApiError> {
    all_users(api, false)
        .await?
        .into_iter()
        .find(|u| u.id == id)
        .ok_or_else(|| not_found(format!("user {id} not found")))
}

async fn all_preauth_keys(api: &AdminApi, local: bool) -> Result<Vec<pb::PreAuthKey>, ApiError> {
    let request = pb::ListPreAuthKeysRequest {
        local,
        user: String::new(),
    };
    Ok(api
        .list_pre_auth_keys(req(request))
        .await?
        .into_inner()
        .pre_auth_keys)
}

async fn preauth_key_by_id(api: &AdminApi, id: u64) -> Result<pb::PreAuthKey, ApiError> {
    if id == 0 {
        return Err(bad_request("id is required"));
    }
    all_preauth_keys(api, false)
        .await?
        .into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| not_found(format!("pre-auth key {id} not found")))
}

/// Everything a node's JSON embeds (its user, its pre-auth key), looked up once per answer.
struct NodeContext {
    users: Vec<pb::User>,
    keys: Vec<pb::PreAuthKey>,
}

impl NodeContext {
    async fn load(api: &AdminApi, local: bool) -> Result<NodeContext, ApiError> {
        Ok(NodeContext {
            users: all_users(api, local).await?,
            keys: all_preauth_keys(api, local).await?,
        })
    }

    fn node(&self, n: &pb::Node) -> Value {
        let owner = self
            .users
            .iter()
            .find(|u| u.id == n.user_id && n.tags.is_empty());
        let key = n
            .pre_auth_key_id
            .and_then(|id| self.keys.iter().find(|k| k.id == id));
        gateway::node(n, owner, key)
    }
}

async fn node_reply(api: &AdminApi, r: tonic::Response<pb::NodeResponse>) -> ApiResult {
    let context = NodeContext::load(api, false).await?;
    let node = r.into_inner().node.map(|n| context.node(&n));
    Ok(Json(json!({ "node": node })))
}

// ----- health and version -----

/// headscale's `{"databaseConnectivity"}`: true while this member's Raft runs.
async fn health(State(api): State<AdminApi>) -> ApiResult {
    let healthy = api.deps().cluster.fatal().is_none();
    Ok(Json(json!({ "databaseConnectivity": healthy })))
}

async fn version(State(api): State<AdminApi>) -> Json<Value> {
    Json(json!({
        "version": api.deps().version,
        "memberId": gateway::id(api.deps().cluster.member_id()),
    }))
}

// ----- users -----

async fn list_users(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = param(&q, "id").map(|t| parse_id("id", t)).transpose()?;
    let name = param(&q, "name").filter(|n| !n.is_empty());
    let email = param(&q, "email").filter(|e| !e.is_empty());
    let users: Vec<Value> = all_users(&api, local(&q)?)
        .await?
        .iter()
        .filter(|u| id.is_none_or(|id| id == 0 || u.id == id))
        .filter(|u| name.is_none_or(|n| u.name == n))
        .filter(|u| email.is_none_or(|e| u.email == e))
        .map(gateway::user)
        .collect();
    Ok(Json(json!({ "users": users })))
}

async fn create_user(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let b: CreateUser = body(&bytes)?;
    let r = api
        .create_user(req(pb::CreateUserRequest {
            name: b.name,
            display_name: b.display_name,
            email: b.email,
        }))
        .await?
        .into_inner();
    Ok(Json(json!({ "user": r.user.as_ref().map(gateway::user) })))
}

async fn delete_user(State(api): State<AdminApi>, Path(id): Path<String>) -> ApiResult {
    let user = user_by_id(&api, parse_id("id", &id)?).await?;
    api.delete_user(req(pb::DeleteUserRequest { name: user.name }))
        .await?;
    Ok(Json(json!({})))
}

async fn rename_user(
    State(api): State<AdminApi>,
    Path((old_id, new_name)): Path<(String, String)>,
) -> ApiResult {
    let user = user_by_id(&api, parse_id("old_id", &old_id)?).await?;
    let r = api
        .rename_user(req(pb::RenameUserRequest {
            old_name: user.name,
            new_name,
        }))
        .await?
        .into_inner();
    Ok(Json(json!({ "user": r.user.as_ref().map(gateway::user) })))
}

// ----- pre-auth keys -----

async fn list_preauth_keys(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let local = local(&q)?;
    let users = all_users(&api, local).await?;
    // headscale before v0.28 listed one user's keys (`?user=ID`); it still narrows.
    let only = match param(&q, "user").filter(|u| !u.is_empty()) {
        Some(text) => Some(parse_id("user", text)?),
        None => None,
    };
    let keys: Vec<Value> = all_preauth_keys(&api, local)
        .await?
        .iter()
        .filter_map(|k| {
            let owner = users.iter().find(|u| u.name == k.user);
            let wanted = only.is_none_or(|id| owner.is_some_and(|u| u.id == id));
            wanted.then(|| gateway::preauth_key(k, owner))
        })
        .collect();
    Ok(Json(json!({ "preAuthKeys": keys })))
}

async fn create_preauth_key(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let b: CreatePreAuthKey = body(&bytes)?;
    let owner = match b.user {
        0 if !b.acl_tags.is_empty() => None,
        0 => return Err(bad_request("user is required for a key without tags")),
        id => Some(user_by_id(&api, id).await?),
    };
    let expiration = expiration(Some(b.expiration.as_deref().unwrap_or("1h")))?;
    let r = api
        .create_pre_auth_key(req(pb::CreatePreAuthKeyRequest {
            user: owner.as_ref().map(|u| u.name.clone()).unwrap_or_default(),
            reusable: b.reusable,
            ephemeral: b.ephemeral,
            expiration,
            tags: b.acl_tags,
        }))
        .await?
        .into_inner();
    let key = r
        .pre_auth_key
        .as_ref()
        .map(|k| gateway::preauth_key(k, owner.as_ref()));
    Ok(Json(json!({ "preAuthKey": key })))
}

async fn expire_preauth_key(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let key = preauth_key_by_id(&api, body::<ById>(&bytes)?.id).await?;
    api.expire_pre_auth_key(req(pb::ExpirePreAuthKeyRequest {
        user: key.user,
        key: key.prefix,
    }))
    .await?;
    Ok(Json(json!({})))
}

async fn delete_preauth_key(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = param(&q, "id").map_or(Ok(0), |t| parse_id("id", t))?;
    let key = preauth_key_by_id(&api, id).await?;
    api.delete_pre_auth_key(req(pb::ExpirePreAuthKeyRequest {
        user: key.user,
        key: key.prefix,
    }))
    .await?;
    Ok(Json(json!({})))
}

// ----- nodes -----

async fn list_nodes(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let local = local(&q)?;
    let r = api
        .list_nodes(req(pb::ListNodesRequest {
            local,
            user: param(&q, "user").unwrap_or_default().to_string(),
        }))
        .await?;
    let context = NodeContext::load(&api, local).await?;
    let nodes: Vec<Value> = r
        .into_inner()
        .nodes
        .iter()
        .map(|n| context.node(n))
        .collect();
    Ok(Json(json!({ "nodes": nodes })))
}

async fn get_node(
    State(api): State<AdminApi>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    let local = local(&q)?;
    let r = api.get_node(req(pb::GetNodeRequest { local, id })).await?;
    node_reply(&api, r).await
}

async fn register_node(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let request = pb::RegisterNodeRequest {
        user: param(&q, "user").unwrap_or_default().to_string(),
        key: param(&q, "key").unwrap_or_default().to_string(),
    };
    let r = api.register_node(req(request)).await?;
    node_reply(&api, r).await
}

async fn delete_node(State(api): State<AdminApi>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    api.delete_node(req(pb::NodeIdRequest { id })).await?;
    Ok(Json(json!({})))
}

async fn expire_node(
    State(api): State<AdminApi>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let request = pb::ExpireNodeRequest {
        id: parse_id("node_id", &id)?,
        expiry: expiration(param(&q, "expiry"))?,
        disable_expiry: flag(&q, "disable_expiry")?,
    };
    let r = api.expire_node(req(request)).await?;
    node_reply(&api, r).await
}

async fn approve_node(State(api): State<AdminApi>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    let r = api.approve_node(req(pb::NodeIdRequest { id })).await?;
    node_reply(&api, r).await
}

async fn rename_node(
    State(api): State<AdminApi>,
    Path((id, new_name)): Path<(String, String)>,
) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    let r = api
        .rename_node(req(pb::RenameNodeRequest { id, new_name }))
        .await?;
    node_reply(&api, r).await
}

async fn set_tags(State(api): State<AdminApi>, Path(id): Path<String>, bytes: Bytes) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    let tags = body::<Tags>(&bytes)?.tags;
    let r = api.set_tags(req(pb::SetTagsRequest { id, tags })).await?;
    node_reply(&api, r).await
}

/// headscale before v0.27 had `POST /api/v1/node/{id}/user?user=NAME` to move a node.
async fn move_node(
    State(api): State<AdminApi>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    let user = param(&q, "user").unwrap_or_default().to_string();
    let r = api.move_node(req(pb::MoveNodeRequest { id, user })).await?;
    node_reply(&api, r).await
}

async fn approve_routes(
    State(api): State<AdminApi>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    let id = parse_id("node_id", &id)?;
    let routes = body::<Routes>(&bytes)?.routes;
    let r = api
        .approve_routes(req(pb::ApproveRoutesRequest { id, routes }))
        .await?;
    node_reply(&api, r).await
}

/// Every node gets its addresses when it registers, from the configured prefixes; there
/// is nothing to backfill.
async fn backfill_ips(Query(q): Query<HashMap<String, String>>) -> ApiResult {
    if !flag(&q, "confirmed")? {
        return Err(ApiError::from(tonic::Status::unknown(
            "not confirmed, aborting",
        )));
    }
    Ok(Json(json!({ "changes": [] })))
}

// ----- interactive registrations (/register/<auth id>) -----

async fn auth_register(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let b: AuthRegister = body(&bytes)?;
    let r = api
        .register_node(req(pb::RegisterNodeRequest {
            user: b.user,
            key: b.auth_id,
        }))
        .await?;
    node_reply(&api, r).await
}

/// headscale approves a pending re-authentication that needs no user. An hsd registration
/// always needs one (`/api/v1/auth/register`); a known one is answered with that advice.
async fn auth_approve(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let auth_id = body::<AuthId>(&bytes)?.auth_id;
    pending_registration(&api, &auth_id)?;
    Err(ApiError::from(tonic::Status::failed_precondition(format!(
        "registration {auth_id} needs a user: POST /api/v1/auth/register with user and authId"
    ))))
}

/// Voids the registration: its AuthURL stops working and the client starts over.
async fn auth_reject(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let auth_id = body::<AuthId>(&bytes)?.auth_id;
    pending_registration(&api, &auth_id)?;
    api.reject_registration(req(pb::RejectRegistrationRequest { auth_id }))
        .await?;
    Ok(Json(json!({})))
}

fn pending_registration(api: &AdminApi, auth_id: &str) -> Result<(), ApiError> {
    if auth_id.is_empty() {
        return Err(bad_request("invalid auth_id: empty"));
    }
    match api.deps().cluster.view().pending(auth_id) {
        Some(_) => Ok(()),
        None => Err(not_found(format!(
            "no pending auth session for auth_id {auth_id}"
        ))),
    }
}

// ----- API keys -----

async fn list_api_keys(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let r = api
        .list_api_keys(req(pb::ListApiKeysRequest { local: local(&q)? }))
        .await?;
    let keys: Vec<Value> = r
        .into_inner()
        .api_keys
        .iter()
        .map(gateway::api_key)
        .collect();
    Ok(Json(json!({ "apiKeys": keys })))
}

async fn create_api_key(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let b: CreateApiKey = body(&bytes)?;
    let expiration = expiration(Some(b.expiration.as_deref().unwrap_or("90d")))?;
    let r = api
        .create_api_key(req(pb::CreateApiKeyRequest { expiration }))
        .await?
        .into_inner();
    let full = r.api_key.and_then(|k| k.key).unwrap_or_default();
    Ok(Json(json!({ "apiKey": full })))
}

/// The key's prefix, given as a prefix (`hskey-api-PREFIX-***` too) or by id.
async fn api_key_prefix(api: &AdminApi, key: ApiKeyRef) -> Result<String, ApiError> {
    if !key.prefix.is_empty() {
        return Ok(key.prefix);
    }
    if key.id == 0 {
        return Err(bad_request("prefix or id is required"));
    }
    let keys = api
        .list_api_keys(req(pb::ListApiKeysRequest { local: false }))
        .await?
        .into_inner()
        .api_keys;
    keys.into_iter()
        .find(|k| k.id == key.id)
        .map(|k| k.prefix)
        .ok_or_else(|| not_found(format!("API key {} not found", key.id)))
}

async fn expire_api_key(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let prefix = api_key_prefix(&api, body(&bytes)?).await?;
    api.expire_api_key(req(pb::ApiKeyPrefixRequest { prefix }))
        .await?;
    Ok(Json(json!({})))
}

async fn delete_api_key(
    State(api): State<AdminApi>,
    Path(prefix): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = param(&q, "id").map_or(Ok(0), |t| parse_id("id", t))?;
    let prefix = api_key_prefix(&api, ApiKeyRef { prefix, id }).await?;
    api.delete_api_key(req(pb::ApiKeyPrefixRequest { prefix }))
        .await?;
    Ok(Json(json!({})))
}

// ----- policy -----

/// `{"policy", "updatedAt"}`: the time the running version was accepted (null when no
/// policy was ever set).
async fn policy_reply(api: &AdminApi, policy: String, local: bool) -> ApiResult {
    let versions = api
        .list_policy_versions(req(pb::GetPolicyRequest { local }))
        .await?
        .into_inner()
        .versions;
    let updated = versions.iter().find(|v| v.current).and_then(|v| v.at);
    Ok(Json(json!({
        "policy": policy,
        "updatedAt": crate::proto::json::time(&updated),
    })))
}

async fn get_policy(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let local = local(&q)?;
    let r = api.get_policy(req(pb::GetPolicyRequest { local })).await?;
    policy_reply(&api, r.into_inner().policy, local).await
}

async fn set_policy(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let policy = body::<PolicyBody>(&bytes)?.policy;
    let r = api.set_policy(req(pb::SetPolicyRequest { policy })).await?;
    policy_reply(&api, r.into_inner().policy, false).await
}

async fn check_policy(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let policy = body::<PolicyBody>(&bytes)?.policy;
    api.check_policy(req(pb::SetPolicyRequest { policy }))
        .await?;
    Ok(Json(json!({})))
}

async fn policy_history(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let r = api
        .list_policy_versions(req(pb::GetPolicyRequest { local: local(&q)? }))
        .await?;
    let versions: Vec<Value> = r
        .into_inner()
        .versions
        .iter()
        .map(gateway::policy_version)
        .collect();
    Ok(Json(json!({ "versions": versions })))
}

async fn rollback_policy(State(api): State<AdminApi>, bytes: Bytes) -> ApiResult {
    let version = body::<Rollback>(&bytes)?.version;
    let r = api
        .rollback_policy(req(pb::RollbackPolicyRequest { version }))
        .await?;
    policy_reply(&api, r.into_inner().policy, false).await
}

// ----- audit and cluster -----

async fn list_audit(
    State(api): State<AdminApi>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let since = match param(&q, "since").filter(|s| !s.is_empty()) {
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
            actor: param(&q, "actor").unwrap_or_default().to_string(),
            local: local(&q)?,
        }))
        .await?;
    let records: Vec<Value> = r
        .into_inner()
        .records
        .iter()
        .map(gateway::audit_record)
        .collect();
    Ok(Json(json!({ "records": records })))
}

async fn cluster_status(State(api): State<AdminApi>) -> ApiResult {
    let r = api
        .cluster_status(req(pb::ClusterStatusRequest { local: true }))
        .await?;
    Ok(Json(gateway::cluster_status(&r.into_inner())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_as_numbers_or_strings_and_unknown_fields_are_ignored() {
        let b: ById = body(br#"{"id": "42", "extra": 1}"#).unwrap();
        assert_eq!(b.id, 42);
        let b: ById = body(br#"{"id": 42}"#).unwrap();
        assert_eq!(b.id, 42);
        assert!(body::<ById>(br#"{"id": "x"}"#).is_err());
        assert!(body::<ById>(br#"{"id": -1}"#).is_err());
        assert_eq!(body::<ById>(b"").unwrap().id, 0);
    }

    #[test]
    fn fields_come_in_lower_camel_case_or_snake_case() {
        let a: CreatePreAuthKey = body(br#"{"user": "1", "aclTags": ["tag:a"]}"#).unwrap();
        let b: CreatePreAuthKey = body(br#"{"user": 1, "acl_tags": ["tag:a"]}"#).unwrap();
        assert_eq!(a.acl_tags, b.acl_tags);
        assert_eq!(a.user, b.user);
        let q: HashMap<String, String> =
            serde_urlencoded::from_str("disableExpiry=true&local=false").unwrap();
        assert!(flag(&q, "disable_expiry").unwrap());
        assert!(!local(&q).unwrap());
    }

    #[test]
    fn a_bad_id_is_a_type_mismatch_with_the_gateways_status() {
        let e = parse_id("node_id", "abc").err().unwrap();
        assert_eq!(e.0.code(), Code::InvalidArgument);
        assert!(
            e.0.message()
                .starts_with("type mismatch, parameter: node_id")
        );
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::AlreadyExists), StatusCode::CONFLICT);
    }
}

//! `POST /machine/register`: login, key rotation, logout.
//!
//! Paths are checked in the order the client's `doLogin` relies on (protocol.md §4):
//! logout, already-registered node, follow-up of an interactive login, key rotation,
//! pre-auth key, and finally a new interactive login.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::Rng;

use super::tailcfg::{self, LoginJson, RegisterRequest, RegisterResponse, UserJson};
use super::{ControlDeps, NoisePeer};
use crate::raft::ProposeError;
use crate::registry::secrets::{self, SecretKind};
use crate::registry::{
    Command, Expiry, MachineKey, Node, NodeAuth, NodeRequest, Outcome, Registry, Rejection,
};

/// Largest register body accepted; real ones are a few KiB.
const MAX_REGISTER_BODY_BYTES: usize = 1 << 20;
/// How long a follow-up request waits for `hsctl nodes register` before the client is
/// told to ask again.
const FOLLOWUP_WAIT: Duration = Duration::from_secs(60);
const AUTH_ID_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    BadRequest(String),
    #[error("node key {0} belongs to another machine")]
    MachineKeyMismatch(String),
    #[error("{0}")]
    Rejected(#[from] Rejection),
    #[error("cluster write failed")]
    Propose(#[from] ProposeError),
    #[error("this member is shutting down")]
    ShuttingDown,
}

impl RegisterError {
    fn outcome_label(&self) -> &'static str {
        match self {
            RegisterError::BadRequest(_) => "bad_request",
            RegisterError::MachineKeyMismatch(_) => "machine_key_mismatch",
            RegisterError::Rejected(_) => "rejected",
            RegisterError::Propose(_) | RegisterError::ShuttingDown => "unavailable",
        }
    }
}

pub async fn handle(
    State(deps): State<ControlDeps>,
    Extension(peer): Extension<NoisePeer>,
    body: Bytes,
) -> Response {
    if let Some(source) = peer.source
        && !deps.limits.registrations.allow(&source)
    {
        tracing::info!(%source, "registration refused: rate limit");
        let refusal = deps
            .limits
            .registrations
            .refusal(&source, "registrations from this address");
        return super::rate_limited(refusal);
    }
    let result = match parse(&body) {
        Ok(req) => register(&deps, peer.machine_key, req).await,
        Err(e) => Err(e),
    };
    match result {
        Ok((outcome, response)) => {
            deps.metrics
                .registrations
                .with_label_values(&[outcome])
                .inc();
            axum::Json(response).into_response()
        }
        Err(error) => {
            deps.metrics
                .registrations
                .with_label_values(&[error.outcome_label()])
                .inc();
            tracing::info!(machine.key = %peer.machine_key.short(), %error, "registration refused");
            match error {
                RegisterError::BadRequest(msg) => {
                    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
                }
                RegisterError::MachineKeyMismatch(_) => {
                    (StatusCode::UNAUTHORIZED, format!("{error}\n")).into_response()
                }
                // A refused key is shown to the user: 200 with `Error`, as the client expects.
                RegisterError::Rejected(rejection) => axum::Json(RegisterResponse {
                    error: format!("registration refused: {rejection}"),
                    ..Default::default()
                })
                .into_response(),
                // Retryable: the client backs off and tries again (maybe another member).
                RegisterError::Propose(_) | RegisterError::ShuttingDown => {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("{error}; retry\n")).into_response()
                }
            }
        }
    }
}

/// Decodes and checks a `RegisterRequest` body (bounded, a known capability version, a
/// node key) before anything else looks at it.
pub fn parse(body: &[u8]) -> Result<RegisterRequest, RegisterError> {
    if body.len() > MAX_REGISTER_BODY_BYTES {
        return Err(RegisterError::BadRequest(
            "register request too large".into(),
        ));
    }
    let req: RegisterRequest = serde_json::from_slice(body)
        .map_err(|e| RegisterError::BadRequest(format!("invalid RegisterRequest JSON: {e}")))?;
    if req.version < tailcfg::MIN_CAPABILITY_VERSION {
        return Err(RegisterError::BadRequest(format!(
            "client capability version {} is too old; need {} (tailscale 1.64) or newer",
            req.version,
            tailcfg::MIN_CAPABILITY_VERSION
        )));
    }
    if req.node_key.is_zero() {
        return Err(RegisterError::BadRequest(
            "RegisterRequest has no NodeKey".into(),
        ));
    }
    if req.node_key.is_low_order() {
        return Err(RegisterError::BadRequest(
            "RegisterRequest NodeKey is a small-order point, not a usable key".into(),
        ));
    }
    Ok(req)
}

/// The response describing a registered node.
pub fn node_response(view: &Registry, node: &Node) -> RegisterResponse {
    let user = view.user(node.user);
    let name = user.map(|u| u.name.clone()).unwrap_or_default();
    RegisterResponse {
        user: UserJson {
            id: node.user.0,
            login_name: name.clone(),
            display_name: name.clone(),
            ..Default::default()
        },
        login: LoginJson {
            id: node.user.0,
            provider: "hsd".into(),
            login_name: name.clone(),
            display_name: name,
            ..Default::default()
        },
        machine_authorized: node.approved,
        ..Default::default()
    }
}

fn node_request(machine_key: MachineKey, req: &RegisterRequest) -> NodeRequest {
    let hostinfo = req
        .hostinfo
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    let hostname = hostinfo
        .get("Hostname")
        .and_then(|v| v.as_str())
        .unwrap_or("node")
        .to_string();
    let request_tags = hostinfo
        .get("RequestTags")
        .and_then(|v| v.as_array())
        .map(|tags| {
            tags.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    NodeRequest {
        machine_key,
        node_key: req.node_key,
        hostname,
        hostinfo: super::map::stable_hostinfo(&hostinfo),
        request_tags,
        ephemeral: req.ephemeral,
    }
}

/// Key expiry of a new node, counted by the state machine from the leader's stamp.
fn key_expiry(deps: &ControlDeps) -> Option<Expiry> {
    deps.settings
        .node_key_expiry
        .map(|d| Expiry::AfterMillis(d.as_millis().min(i64::MAX as u128) as i64))
}

async fn propose_node(
    deps: &ControlDeps,
    command: Command,
) -> Result<(Node, Arc<Registry>), RegisterError> {
    // Returns once this member applied the write, so the view holds the node.
    match deps.cluster.propose(command).await? {
        Outcome::Node(node) => Ok((*node, deps.cluster.view())),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(RegisterError::BadRequest(format!(
            "unexpected outcome {other:?}"
        ))),
    }
}

async fn register(
    deps: &ControlDeps,
    machine_key: MachineKey,
    req: RegisterRequest,
) -> Result<(&'static str, RegisterResponse), RegisterError> {
    super::check_hostinfo_size(deps, req.hostinfo.as_ref()).map_err(RegisterError::BadRequest)?;
    let view = deps.cluster.view();
    let now = deps.cluster.now().to_datetime();

    // 1. Logout: an expiry in the past (the client sends 1970-01-01T00:02:03Z).
    if let Some(expiry) = req.expiry {
        if expiry > now {
            return Err(RegisterError::BadRequest(
                "extending key expiry is not supported".into(),
            ));
        }
        if let Some(node) = view.node_by_key(&req.node_key) {
            if node.machine_key != machine_key {
                return Err(RegisterError::MachineKeyMismatch(req.node_key.short()));
            }
            deps.cluster
                .propose(Command::LogoutNode {
                    machine_key,
                    node_key: req.node_key,
                })
                .await?;
        }
        return Ok((
            "logout",
            RegisterResponse {
                node_key_expired: true,
                ..Default::default()
            },
        ));
    }

    let auth_key = req
        .auth
        .as_ref()
        .map(|a| a.auth_key.trim())
        .filter(|k| !k.is_empty());
    let now_ts = deps.cluster.now();

    // 2. Already registered and not expired, no new credentials: report current state.
    if let Some(node) = view.node_by_key(&req.node_key) {
        if node.machine_key != machine_key {
            return Err(RegisterError::MachineKeyMismatch(req.node_key.short()));
        }
        if !node.is_expired(now_ts) && auth_key.is_none() {
            return Ok(("existing", node_response(&view, node)));
        }
    }

    // 3. Follow-up of an interactive login.
    if !req.followup.is_empty() && auth_key.is_none() {
        return followup(deps, machine_key, &req).await;
    }

    // 4. Key rotation of a live node.
    if !req.old_node_key.is_zero()
        && let Some(old) = view.node_by_key(&req.old_node_key)
        && old.machine_key == machine_key
        && !old.is_expired(now_ts)
        && auth_key.is_none()
    {
        let (node, view) = propose_node(
            deps,
            Command::RotateNodeKey {
                machine_key,
                old: req.old_node_key,
                new: req.node_key,
            },
        )
        .await?;
        return Ok(("rotated", node_response(&view, &node)));
    }

    // 5. Pre-auth key.
    if let Some(full) = auth_key {
        let (prefix, hash) =
            secrets::parse(SecretKind::PreAuth, full).ok_or(Rejection::PreAuthKeyNotFound)?;
        // Refuse a bad key without touching the log; apply checks again.
        view.check_preauth_key(&prefix, &hash, &machine_key, now_ts)?;
        let (node, view) = propose_node(
            deps,
            Command::RegisterNode {
                request: node_request(machine_key, &req),
                auth: NodeAuth::PreAuthKey { prefix, hash },
                auto_approve: deps.settings.auto_approve,
                expiry: key_expiry(deps),
            },
        )
        .await?;
        tracing::info!(node.id = %node.id, node.name = %node.given_name, "node registered with a pre-auth key");
        return Ok(("preauthkey", node_response(&view, &node)));
    }

    // 6. Interactive login: the admin completes it with `hsctl nodes register`. A machine
    // asking again for the same node key gets its open registration back, without a write.
    if let Some(open) = view.pending_for_machine(&machine_key)
        && open.request.node_key == req.node_key
        && open.expires_at > now_ts
    {
        return Ok(("interactive", auth_url_response(deps, &open.auth_id)));
    }
    let auth_id: String = {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::thread_rng();
        (0..AUTH_ID_LEN)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect()
    };
    let timeout_ms = deps
        .settings
        .registration_timeout
        .as_millis()
        .min(i64::MAX as u128) as i64;
    match deps
        .cluster
        .propose(Command::BeginInteractive {
            auth_id: auth_id.clone(),
            request: node_request(machine_key, &req),
            ttl_ms: timeout_ms,
            max_pending: deps.settings.max_pending_registrations,
        })
        .await?
    {
        Outcome::Rejected(r) => {
            if matches!(r, Rejection::TooManyPending(_)) {
                deps.metrics
                    .limit_refusals
                    .with_label_values(&["max_pending_registrations"])
                    .inc();
            }
            return Err(r.into());
        }
        _ => tracing::info!(auth.id = %auth_id, "interactive registration started"),
    }
    Ok(("interactive", auth_url_response(deps, &auth_id)))
}

fn auth_url_response(deps: &ControlDeps, auth_id: &str) -> RegisterResponse {
    RegisterResponse {
        auth_url: format!("{}/register/{auth_id}", deps.settings.server_url),
        ..Default::default()
    }
}

/// Waits until the interactive registration named by `Followup` is completed.
async fn followup(
    deps: &ControlDeps,
    machine_key: MachineKey,
    req: &RegisterRequest,
) -> Result<(&'static str, RegisterResponse), RegisterError> {
    let auth_id = req.followup.rsplit('/').next().unwrap_or("").to_string();
    let mut views = deps.cluster.watch_view();
    let deadline = tokio::time::Instant::now() + FOLLOWUP_WAIT;
    loop {
        let view = views.borrow_and_update().clone();
        match view.pending(&auth_id) {
            Some(p) if p.request.machine_key != machine_key => {
                return Err(RegisterError::MachineKeyMismatch(req.node_key.short()));
            }
            Some(p) => {
                if let Some(node) = p.node.and_then(|id| view.node(id)) {
                    return Ok(("interactive_done", node_response(&view, node)));
                }
            }
            // Gone or expired: start over with a fresh URL.
            None => {
                let fresh = RegisterRequest {
                    followup: String::new(),
                    ..clone_request(req)
                };
                return Box::pin(register(deps, machine_key, fresh)).await;
            }
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() {
                return Err(RegisterError::ShuttingDown);
            },
            () = tokio::time::sleep_until(deadline) => {
                // Same URL again: the client backs off and follows up once more.
                return Ok(("interactive_wait", RegisterResponse { auth_url: req.followup.clone(), ..Default::default() }));
            }
            () = deps.stop.cancelled() => return Err(RegisterError::ShuttingDown),
        }
    }
}

fn clone_request(req: &RegisterRequest) -> RegisterRequest {
    RegisterRequest {
        version: req.version,
        node_key: req.node_key,
        old_node_key: req.old_node_key,
        auth: None,
        expiry: req.expiry,
        followup: req.followup.clone(),
        hostinfo: req.hostinfo.clone(),
        ephemeral: req.ephemeral,
    }
}

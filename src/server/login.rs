//! The pages a person sees when a device asks to join interactively: the AuthURL
//! (`/register/<id>`) and, with OIDC, the provider's way back (`/oidc/callback`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};

use super::http::HttpState;
use crate::oidc::{Oidc, OidcError, ProviderAnswer};
use crate::registry::{Command, Expiry, Outcome, Proposal, Rejection};
use crate::util::message_page as page;

/// OIDC as this member runs it: the relying party and the key expiry it gives nodes.
pub(super) struct OidcLogin {
    /// Shared with the web console, whose admins log in through the same provider.
    pub rp: Arc<Oidc>,
    /// `oidc.expiry`; `None` = never.
    pub node_expiry: Option<Duration>,
}

/// The page an interactive AuthURL opens: with OIDC, the way to the identity provider;
/// without it, how an admin completes the registration.
pub(super) async fn register_page(
    UrlPath(auth_id): UrlPath<String>,
    State(s): State<HttpState>,
) -> Response {
    let safe = auth_id.chars().all(|c| c.is_ascii_alphanumeric());
    if !safe || s.control.cluster.view().pending(&auth_id).is_none() {
        return page(
            StatusCode::NOT_FOUND,
            "Unknown or expired registration",
            "Start the login again from the device.",
        );
    }
    let Some(oidc) = &s.oidc else {
        return page(
            StatusCode::OK,
            "Register this node",
            &format!(
                "Ask an administrator to run: hsctl nodes register --user USERNAME --key {auth_id}"
            ),
        );
    };
    let callback = format!("{}/oidc/callback", s.control.settings.server_url);
    match oidc.rp.begin(&auth_id, &callback).await {
        Ok(url) => Redirect::to(&url).into_response(),
        Err(error) => {
            tracing::warn!(%error, "oidc login could not start");
            failure(&error)
        }
    }
}

/// Where the provider sends the browser back, on any member: checks the answer, then
/// registers the waiting device to the user it names. An admin's console login (one
/// callback URL serves both, as providers register one) goes on to the console.
pub(super) async fn oidc_callback(
    Query(answer): Query<ProviderAnswer>,
    RawQuery(raw): RawQuery,
    State(s): State<HttpState>,
) -> Response {
    let Some(oidc) = s.oidc.clone() else {
        return page(
            StatusCode::NOT_FOUND,
            "Not found",
            "This cluster has no identity provider configured.",
        );
    };
    if answer
        .state
        .as_deref()
        .is_some_and(|st| oidc.rp.is_console_flow(st))
    {
        let query = raw.unwrap_or_default();
        return Redirect::to(&format!("/admin/oidc/finish?{query}")).into_response();
    }
    let (code, state) = match answer.code_and_state() {
        Ok(pair) => pair,
        Err(unusable) => return unusable.into_response(),
    };
    let login = match oidc.rp.finish(&code, &state).await {
        Ok(login) => login,
        Err(error) => {
            tracing::warn!(%error, "oidc login refused");
            if let OidcError::NotAllowed { who, auth_id } = &error {
                record_refusal(&s, who, auth_id).await;
            }
            return failure(&error);
        }
    };
    register(&s, &oidc, login).await
}

async fn register(s: &HttpState, oidc: &OidcLogin, login: crate::oidc::Login) -> Response {
    let expiry = match login.token_expiry {
        Some(at) => Some(Expiry::At(at)),
        None => oidc
            .node_expiry
            .map(|d| Expiry::AfterMillis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
    };
    let actor = format!("oidc:{}", login.identity.label());
    let command = Command::OidcLogin {
        auth_id: login.auth_id.clone(),
        identity: login.identity,
        auto_approve: s.control.settings.auto_approve,
        expiry,
    };
    match s
        .control
        .cluster
        .propose_once(Proposal::by(actor, command))
        .await
    {
        Ok(Outcome::Node(node)) => {
            let view = s.control.cluster.view();
            let user = view
                .user(node.user)
                .map(|u| u.name.clone())
                .unwrap_or_default();
            tracing::info!(auth.id = %login.auth_id, %user, node = %node.given_name, "oidc login");
            page(
                StatusCode::OK,
                "Logged in",
                &format!(
                    "{} is now in the tailnet as {user}. You can close this page.",
                    node.given_name
                ),
            )
        }
        Ok(Outcome::Rejected(
            r @ (Rejection::RegistrationNotFound(_) | Rejection::RegistrationCompleted(_)),
        )) => page(
            StatusCode::GONE,
            "Login already used or expired",
            &r.to_string(),
        ),
        Ok(Outcome::Rejected(r)) => page(StatusCode::CONFLICT, "Login refused", &r.to_string()),
        Ok(other) => page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Login failed",
            &format!("unexpected outcome {other:?}"),
        ),
        Err(error) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            &format!("The cluster could not record the login: {error}"),
        ),
    }
}

/// An allow-list refusal lands in the audit log like a refused admin login.
async fn record_refusal(s: &HttpState, who: &str, auth_id: &str) {
    let command = Command::RecordAudit {
        actor: format!("oidc:{who}"),
        action: "oidc_login".into(),
        target: format!("registration {auth_id}"),
        result: "refused: not allowed by oidc.allowed_*".into(),
    };
    if let Err(error) = s.control.cluster.propose(command).await {
        tracing::warn!(%error, "could not record a refused oidc login");
    }
}

fn failure(error: &OidcError) -> Response {
    page(error.http_status(), "Login failed", &error.to_string())
}

/// Builds this member's OIDC login from its config, if one is configured.
pub(super) fn oidc_login(
    config: &crate::config::OidcConfig,
    cluster_secret: &[u8; 32],
) -> Result<Option<Arc<OidcLogin>>, crate::oidc::SetupError> {
    if !config.enabled() {
        return Ok(None);
    }
    Ok(Some(Arc::new(OidcLogin {
        rp: Arc::new(Oidc::new(config, cluster_secret)?),
        node_expiry: Some(config.expiry.0).filter(|d| !d.is_zero()),
    })))
}

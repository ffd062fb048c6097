//! The pages a person sees when a device asks to join interactively: the AuthURL
//! (`/register/<id>`) and, with OIDC, the provider's way back (`/oidc/callback`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::http::HttpState;
use crate::oidc::{Oidc, OidcError};
use crate::registry::{Command, Expiry, Outcome, Proposal, Rejection};

/// OIDC as this member runs it: the relying party and the key expiry it gives nodes.
pub(super) struct OidcLogin {
    pub rp: Oidc,
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

#[derive(Deserialize)]
pub(super) struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Where the provider sends the browser back, on any member: checks the answer, then
/// registers the waiting device to the user it names.
pub(super) async fn oidc_callback(
    Query(q): Query<Callback>,
    State(s): State<HttpState>,
) -> Response {
    let Some(oidc) = s.oidc.clone() else {
        return page(
            StatusCode::NOT_FOUND,
            "Not found",
            "This cluster has no identity provider configured.",
        );
    };
    if let Some(error) = q.error {
        let detail = q.error_description.unwrap_or_default();
        return page(
            StatusCode::FORBIDDEN,
            "Login refused",
            &format!("The identity provider answered {error}. {detail}"),
        );
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Login failed",
            "The identity provider's answer had no code or state.",
        );
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
    let actor = actor(&login.identity.email, &login.identity.provider_id());
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

fn actor(email: &str, provider_id: &str) -> String {
    if email.is_empty() {
        format!("oidc:{provider_id}")
    } else {
        format!("oidc:{email}")
    }
}

fn failure(error: &OidcError) -> Response {
    let status = match error {
        OidcError::Provider(_) => StatusCode::BAD_GATEWAY,
        OidcError::NotAllowed { .. } => StatusCode::FORBIDDEN,
        OidcError::BadState | OidcError::Expired | OidcError::Refused(_) | OidcError::Token(_) => {
            StatusCode::BAD_REQUEST
        }
    };
    page(status, "Login failed", &error.to_string())
}

/// A small page with a heading and one message (escaped: parts come from outside).
fn page(status: StatusCode, title: &str, message: &str) -> Response {
    let html = format!(
        "<!doctype html><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
         <title>hsd: {t}</title><h1>{t}</h1><p>{m}</p>",
        t = escape(title),
        m = escape(message),
    );
    (status, Html(html)).into_response()
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
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
        rp: Oidc::new(config, cluster_secret)?,
        node_expiry: Some(config.expiry.0).filter(|d| !d.is_zero()),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_comes_from_outside() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}

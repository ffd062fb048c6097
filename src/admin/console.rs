//! The web console at `/admin` on the control port: one page and its script and style,
//! embedded in the binary, driving the same `/api/v1` routes scripts use.
//!
//! Logging in with an API key sets two cookies, both `SameSite=Strict` (and `Secure` when
//! the control URL is https): `hsd_session` carries the key, `HttpOnly` so no script can
//! read it; `hsd_csrf` is a random token the page copies into an `X-CSRF-Token` header on
//! every write — a write authenticated by the cookie without a matching header is refused.
//! Any member accepts the session (the key is checked against the replicated registry),
//! expiring or deleting the key ends it, and login and logout are audited.
//!
//! With `oidc.admin_users` or `oidc.admin_groups` set, admins can instead log in through
//! the identity provider (`/admin/oidc/login`; the provider's answer comes back through
//! `/oidc/callback` to `/admin/oidc/finish`, which must see the `hsd_oidc_flow` cookie
//! set when the login began in that browser). The session cookie then carries
//! `oidc.<sealed session>` (see `crate::oidc::AdminSession`): any member opens it, and it
//! ends after 12 hours or as soon as the admin lists no longer name its holder.

use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::{AdminDeps, auth};
use crate::oidc::{OidcError, ProviderAnswer};
use crate::registry::{Command, Timestamp};
use crate::util::message_page;

const SESSION_COOKIE: &str = "hsd_session";
/// Marks a session cookie that carries an identity-provider login, not an API key.
const OIDC_SESSION_PREFIX: &str = "oidc.";
/// Binds a console login at the provider to the browser that began it. `SameSite=Lax`:
/// it must come back on the provider's cross-site redirect, which a `Strict` one would not.
const OIDC_FLOW_COOKIE: &str = "hsd_oidc_flow";
const OIDC_FLOW_SECONDS: u64 = 10 * 60;
const CSRF_COOKIE: &str = "hsd_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long the browser keeps a session (the key's own expiry ends it sooner).
const SESSION_SECONDS: u64 = 12 * 3600;
const MAX_LOGIN_BYTES: usize = 4096;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

pub fn router(deps: AdminDeps) -> Router {
    Router::new()
        .route(
            "/admin",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/admin/",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/admin/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/admin/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/oidc", get(oidc_offered))
        .route("/admin/oidc/login", get(oidc_login))
        .route("/admin/oidc/finish", get(oidc_finish))
        .with_state(deps)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-cache"),
        // The console loads nothing from elsewhere and may not be framed.
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    (headers, body).into_response()
}

/// The address a request came from, for the per-source limit on failed logins.
pub(super) fn source_ip(request: &Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip())
}

/// The value of cookie `name` in the request, if sent.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// What a console session cookie carries.
pub enum Session<'a> {
    /// The API key the admin logged in with.
    ApiKey(&'a str),
    /// A sealed identity-provider login (`Oidc::open_session` opens it).
    Oidc(&'a str),
}

/// The console session the request carries, if any.
pub fn session(headers: &HeaderMap) -> Option<Session<'_>> {
    let value = cookie(headers, SESSION_COOKIE).filter(|k| !k.is_empty())?;
    Some(match value.strip_prefix(OIDC_SESSION_PREFIX) {
        Some(sealed) => Session::Oidc(sealed),
        None => Session::ApiKey(value),
    })
}

/// The audit log's name for whoever holds the session `headers` carry.
fn session_actor(deps: &AdminDeps, headers: &HeaderMap) -> Option<String> {
    match session(headers)? {
        Session::ApiKey(key) => Some(super::audit::bearer_actor(Some(&format!("Bearer {key}")))),
        Session::Oidc(sealed) => {
            let admin = deps.oidc.as_ref()?.open_session(sealed)?;
            Some(format!("oidc:{}", admin.who))
        }
    }
}

/// Whether a request authenticated by the session cookie may go on: reads always; writes
/// only with the CSRF cookie's token repeated in the `X-CSRF-Token` header.
pub fn csrf_allows(method: &Method, headers: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    match (cookie(headers, CSRF_COOKIE), sent) {
        (Some(expected), Some(sent)) => !expected.is_empty() && constant_time_eq(expected, sent),
        _ => false,
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Cookies are `Secure` when browsers reach the console over https.
fn secure_attribute(deps: &AdminDeps) -> &'static str {
    if deps.server_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    }
}

fn set_cookie(
    deps: &AdminDeps,
    name: &str,
    value: &str,
    http_only: bool,
    max_age: u64,
) -> HeaderValue {
    let secure = secure_attribute(deps);
    let http_only = if http_only { "; HttpOnly" } else { "" };
    let text =
        format!("{name}={value}; Path=/; Max-Age={max_age}; SameSite=Strict{http_only}{secure}");
    HeaderValue::from_str(&text).expect("cookie values are ASCII")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Login {
    api_key: String,
}

async fn login(State(deps): State<AdminDeps>, request: Request) -> Response {
    let source = source_ip(&request);
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_LOGIN_BYTES).await else {
        return refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the login request is too large",
        );
    };
    if let Some(refusal) = deps.failed_auth.refusal_for(source) {
        return refused(StatusCode::TOO_MANY_REQUESTS, refusal.message());
    }
    let Ok(Login { api_key }) = serde_json::from_slice::<Login>(&body) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "send {\"apiKey\": \"hskey-api-…\"}",
        );
    };
    let api_key = api_key.trim().to_string();
    let actor = super::audit::bearer_actor(Some(&format!("Bearer {api_key}")));
    if let Err(reason) = auth::check_api_key(&deps.cluster.view(), &api_key, Timestamp::now()) {
        deps.failed_auth
            .report(actor, "console", reason.as_str(), source);
        return refused(
            StatusCode::UNAUTHORIZED,
            "that API key is not valid (create one with: hsctl apikeys create)",
        );
    }
    record(&deps, actor, "console login").await;
    let response = (StatusCode::OK, axum::Json(json!({ "ok": true }))).into_response();
    with_session(&deps, response, &api_key)
}

/// `response` with the cookies of a new session carrying `value`, and a fresh CSRF token.
fn with_session(deps: &AdminDeps, mut response: Response, value: &str) -> Response {
    let csrf = hex::encode(rand::random::<[u8; 16]>());
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(deps, SESSION_COOKIE, value, true, SESSION_SECONDS),
    );
    headers.append(
        header::SET_COOKIE,
        set_cookie(deps, CSRF_COOKIE, &csrf, false, SESSION_SECONDS),
    );
    response
}

/// Whether the login page should offer the identity provider.
async fn oidc_offered(State(deps): State<AdminDeps>) -> Response {
    let enabled = deps.oidc.as_ref().is_some_and(|o| o.console_enabled());
    axum::Json(json!({ "enabled": enabled })).into_response()
}

/// Sends the admin's browser to the identity provider.
async fn oidc_login(State(deps): State<AdminDeps>) -> Response {
    let Some(oidc) = deps.oidc.clone().filter(|o| o.console_enabled()) else {
        return message_page(
            StatusCode::NOT_FOUND,
            "No identity provider",
            "Console login through an identity provider needs oidc.admin_users or \
             oidc.admin_groups in the config; log in with an API key instead.",
        );
    };
    let callback = format!("{}/oidc/callback", deps.server_url);
    let browser = hex::encode(rand::random::<[u8; 16]>());
    match oidc.begin_console(&browser, &callback).await {
        Ok(url) => {
            let mut response = axum::response::Redirect::to(&url).into_response();
            response.headers_mut().append(
                header::SET_COOKIE,
                flow_cookie(&deps, &browser, OIDC_FLOW_SECONDS),
            );
            response
        }
        Err(error) => {
            tracing::warn!(%error, "console oidc login could not start");
            message_page(error.http_status(), "Login failed", &error.to_string())
        }
    }
}

/// The cookie binding a console login to this browser (`max_age` 0 clears it).
fn flow_cookie(deps: &AdminDeps, value: &str, max_age: u64) -> HeaderValue {
    let secure = secure_attribute(deps);
    let text = format!(
        "{OIDC_FLOW_COOKIE}={value}; Path=/admin/oidc; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    );
    HeaderValue::from_str(&text).expect("cookie values are ASCII")
}

/// The provider's answer to a console login (forwarded by `/oidc/callback`): an admin
/// gets a session and the console; anyone else a refusal, recorded.
async fn oidc_finish(
    State(deps): State<AdminDeps>,
    Query(answer): Query<ProviderAnswer>,
    request: Request,
) -> Response {
    let source = source_ip(&request);
    let Some(oidc) = deps.oidc.clone().filter(|o| o.console_enabled()) else {
        return message_page(StatusCode::NOT_FOUND, "Not found", "No identity provider.");
    };
    let (code, state) = match answer.code_and_state() {
        Ok(pair) => pair,
        Err(unusable) => return unusable.into_response(),
    };
    let browser = cookie(request.headers(), OIDC_FLOW_COOKIE);
    match oidc.finish_console(&code, &state, browser).await {
        Ok(admin) => {
            record(&deps, format!("oidc:{}", admin.who), "console login").await;
            let sealed = format!("{OIDC_SESSION_PREFIX}{}", oidc.seal_session(&admin));
            let mut back = axum::response::Redirect::to("/admin").into_response();
            back.headers_mut()
                .append(header::SET_COOKIE, flow_cookie(&deps, "", 0));
            with_session(&deps, back, &sealed)
        }
        Err(error) => {
            tracing::warn!(%error, "console oidc login refused");
            if let OidcError::NotAllowed { who, .. } = &error {
                let actor = format!("oidc:{who}");
                deps.failed_auth
                    .report(actor, "console", "not in oidc.admin_*", source);
                let message = format!(
                    "{who} is not an administrator of this cluster \
                     (oidc.admin_users, oidc.admin_groups)."
                );
                return message_page(StatusCode::FORBIDDEN, "Not an administrator", &message);
            }
            message_page(error.http_status(), "Login failed", &error.to_string())
        }
    }
}

/// Ends the browser's session (the key itself stays valid for its other users).
async fn logout(State(deps): State<AdminDeps>, headers: HeaderMap) -> Response {
    if let Some(actor) = session_actor(&deps, &headers) {
        record(&deps, actor, "console logout").await;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    for name in [SESSION_COOKIE, CSRF_COOKIE] {
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(&deps, name, "", name == SESSION_COOKIE, 0),
        );
    }
    response
}

async fn record(deps: &AdminDeps, actor: String, action: &str) {
    let command = Command::RecordAudit {
        actor,
        action: action.into(),
        target: String::new(),
        result: "ok".into(),
    };
    if let Err(error) = deps.cluster.propose(command).await {
        tracing::warn!(%error, action, "could not record a console session event");
    }
}

fn refused(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn writes_need_the_csrf_token_repeated_in_a_header() {
        let cookies = ("cookie", "hsd_session=k; hsd_csrf=abc123");
        assert!(csrf_allows(&Method::GET, &headers(&[cookies])));
        assert!(!csrf_allows(&Method::POST, &headers(&[cookies])));
        assert!(!csrf_allows(
            &Method::POST,
            &headers(&[cookies, ("x-csrf-token", "abc124")])
        ));
        assert!(csrf_allows(
            &Method::DELETE,
            &headers(&[cookies, ("x-csrf-token", "abc123")])
        ));
        assert!(!csrf_allows(
            &Method::PUT,
            &headers(&[("cookie", "hsd_csrf="), ("x-csrf-token", "")])
        ));
        assert!(matches!(
            session(&headers(&[cookies])),
            Some(Session::ApiKey("k"))
        ));
        let oidc = ("cookie", "hsd_session=oidc.abc");
        assert!(matches!(
            session(&headers(&[oidc])),
            Some(Session::Oidc("abc"))
        ));
    }
}

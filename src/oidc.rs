//! Logging in through an OpenID Connect provider (the authorization code flow, with nonce
//! and PKCE): a client's AuthURL sends the browser to the provider, and the provider sends
//! it back to `/oidc/callback` on any member.
//!
//! No member keeps the flow's secrets. They travel sealed inside the `state` parameter,
//! under a key every member derives from the cluster's shared Noise key, so the member the
//! provider calls back need not be the one that started the flow.
//!
//! The same flow logs admins in to the web console (`begin_console`): the callback then
//! proves an admin (`oidc.admin_users` / `oidc.admin_groups`), and the console keeps a
//! session sealed the same way under a key of its own, so any member accepts it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce as AeadNonce};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::OidcConfig;
use crate::registry::{OidcIdentity, Timestamp};
use crate::util::{error_chain, message_page};

/// How long a browser may take at the provider.
const FLOW_TTL: Duration = Duration::from_secs(10 * 60);
/// Provider metadata and signing keys are fetched again after this (keys rotate).
const DISCOVERY_TTL: Duration = Duration::from_secs(10 * 60);
/// Bounds every call to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `state` or session accepted back: an honest one is a few hundred bytes.
const MAX_STATE_LEN: usize = 4096;
/// How long a console session lasts before the admin logs in again.
const ADMIN_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider could not be reached or refused hsd: {0}")]
    Provider(String),
    #[error("this login link is not valid (it was changed or comes from another cluster)")]
    BadState,
    #[error("this login took longer than 10 minutes; start again from the device")]
    Expired,
    #[error("the identity provider refused the login: {0}")]
    Refused(String),
    #[error("the identity provider's token was not valid: {0}")]
    Token(String),
    #[error("this login was started in another browser (or its cookie was lost); start again")]
    OtherBrowser,
    #[error("{who} may not log in to this tailnet")]
    NotAllowed { who: String, auth_id: String },
}

impl OidcError {
    /// The status of the page that tells the browser.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            OidcError::Provider(_) => StatusCode::BAD_GATEWAY,
            OidcError::NotAllowed { .. } => StatusCode::FORBIDDEN,
            OidcError::BadState
            | OidcError::OtherBrowser
            | OidcError::Expired
            | OidcError::Refused(_)
            | OidcError::Token(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Why OIDC could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("reading oidc.client_secret_path {path}")]
    SecretFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the HTTP client for the identity provider")]
    HttpClient(#[source] openidconnect::reqwest::Error),
}

/// What a login proved: which registration it completes, for whom, until when.
#[derive(Debug)]
pub struct Login {
    pub auth_id: String,
    pub identity: OidcIdentity,
    /// The ID token's expiry, when `use_expiry_from_token` asks for it.
    pub token_expiry: Option<Timestamp>,
}

/// An admin's console session: who, and what made them an admin, until when. Checked
/// against the admin lists again on every use, so removing someone from the config ends
/// their session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminSession {
    /// The email (or `issuer/subject`) the audit log names.
    pub who: String,
    email: String,
    email_verified: bool,
    /// Only the groups that `oidc.admin_groups` names (keeps the cookie small).
    groups: BTreeSet<String>,
    /// Unix seconds after which the session is refused.
    until: i64,
}

/// What the provider's verified ID token says.
struct Verified {
    identity: OidcIdentity,
    email_verified: Option<bool>,
    groups: BTreeSet<String>,
    expires: Timestamp,
}

/// The provider's answer to `/oidc/callback`, as its query string carries it.
#[derive(Deserialize)]
pub struct ProviderAnswer {
    code: Option<String>,
    pub state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Why a provider's answer cannot finish a login; its `IntoResponse` is the page that
/// tells the browser.
pub enum UnusableAnswer {
    Refused { error: String, detail: String },
    Incomplete,
}

impl ProviderAnswer {
    /// The code and state to finish the login with.
    pub fn code_and_state(self) -> Result<(String, String), UnusableAnswer> {
        if let Some(error) = self.error {
            let detail = self.error_description.unwrap_or_default();
            return Err(UnusableAnswer::Refused { error, detail });
        }
        match (self.code, self.state) {
            (Some(code), Some(state)) => Ok((code, state)),
            _ => Err(UnusableAnswer::Incomplete),
        }
    }
}

impl axum::response::IntoResponse for UnusableAnswer {
    fn into_response(self) -> axum::response::Response {
        use axum::http::StatusCode;
        match self {
            UnusableAnswer::Refused { error, detail } => {
                let message = format!("The identity provider answered {error}. {detail}");
                message_page(StatusCode::FORBIDDEN, "Login refused", &message)
            }
            UnusableAnswer::Incomplete => {
                let message = "The identity provider's answer had no code or state.";
                message_page(StatusCode::BAD_REQUEST, "Login failed", message)
            }
        }
    }
}

/// Which login an answer to `/oidc/callback` must complete.
enum Expect<'a> {
    Device,
    /// A console login, in the browser carrying this binding cookie (if any).
    Console {
        browser: Option<&'a str>,
    },
}

/// The flow's secrets, sealed into `state`.
#[derive(Serialize, Deserialize)]
struct FlowState {
    /// The registration this login completes (empty for a console login).
    auth_id: String,
    /// Set for a console login only: its random binding to the browser that began it
    /// (also in a cookie there), so nobody can slip their own login into someone else's
    /// browser.
    #[serde(default)]
    browser: Option<String>,
    nonce: String,
    verifier: Option<String>,
    redirect: String,
    /// Unix seconds after which the callback is refused.
    until: i64,
}

/// The relying party: one per member, shared by its HTTP handlers.
pub struct Oidc {
    config: OidcConfig,
    client_secret: Option<String>,
    http: openidconnect::reqwest::Client,
    flow_key: ChaCha20Poly1305,
    session_key: ChaCha20Poly1305,
    provider: tokio::sync::Mutex<Option<(CoreProviderMetadata, Instant)>>,
}

impl Oidc {
    /// `cluster_secret` is the same on every member (the Noise private key).
    pub fn new(config: &OidcConfig, cluster_secret: &[u8; 32]) -> Result<Oidc, SetupError> {
        let client_secret = match &config.client_secret_path {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| SetupError::SecretFile {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => Some(config.client_secret.clone()).filter(|s| !s.is_empty()),
        };
        let http = openidconnect::reqwest::ClientBuilder::new()
            // Following redirects would let a provider's answer point hsd anywhere.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(PROVIDER_TIMEOUT)
            .build()
            .map_err(SetupError::HttpClient)?;
        Ok(Oidc {
            config: config.clone(),
            client_secret,
            http,
            flow_key: derived_key(b"hsd oidc flow state", cluster_secret),
            session_key: derived_key(b"hsd console session", cluster_secret),
            provider: tokio::sync::Mutex::new(None),
        })
    }

    /// The provider's URL to send the browser to for registration `auth_id`; the provider
    /// will call back `redirect` (this member's `/oidc/callback`).
    pub async fn begin(&self, auth_id: &str, redirect: &str) -> Result<String, OidcError> {
        self.begin_flow(auth_id, None, redirect).await
    }

    /// The provider's URL to send an admin to for a console login begun in the browser
    /// holding `browser` (a random value the console keeps in a cookie).
    pub async fn begin_console(&self, browser: &str, redirect: &str) -> Result<String, OidcError> {
        self.begin_flow("", Some(browser.to_string()), redirect)
            .await
    }

    /// Whether the web console offers a login through the provider.
    pub fn console_enabled(&self) -> bool {
        !self.config.admin_users.is_empty() || !self.config.admin_groups.is_empty()
    }

    /// Whether `state` (checked, not yet spent) belongs to a console login.
    pub fn is_console_flow(&self, state: &str) -> bool {
        self.open_state(state)
            .is_ok_and(|flow| flow.browser.is_some())
    }

    /// `browser` is set for console logins only.
    async fn begin_flow(
        &self,
        auth_id: &str,
        browser: Option<String>,
        redirect: &str,
    ) -> Result<String, OidcError> {
        let client = self.client(redirect).await?;
        let nonce = Nonce::new_random();
        let (challenge, verifier) = if self.config.pkce.enabled {
            let (c, v) = PkceCodeChallenge::new_random_sha256();
            (Some(c), Some(v))
        } else {
            (None, None)
        };
        let flow = FlowState {
            auth_id: auth_id.to_string(),
            browser,
            nonce: nonce.secret().clone(),
            verifier: verifier.map(|v| v.secret().clone()),
            redirect: redirect.to_string(),
            until: chrono::Utc::now().timestamp() + FLOW_TTL.as_secs() as i64,
        };
        let state = seal(&self.flow_key, &flow);
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            move || CsrfToken::new(state),
            move || nonce,
        );
        for scope in self.config.scope.iter().filter(|s| s.as_str() != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        for (name, value) in &self.config.extra_params {
            request = request.add_extra_param(name.clone(), value.clone());
        }
        if let Some(challenge) = challenge {
            request = request.set_pkce_challenge(challenge);
        }
        Ok(request.url().0.to_string())
    }

    /// Checks the provider's answer to `/oidc/callback` and says who logged in.
    pub async fn finish(&self, code: &str, state: &str) -> Result<Login, OidcError> {
        let (flow, v) = self.exchange(code, state, Expect::Device).await?;
        self.check_allowed(&v.identity, v.email_verified, &v.groups)
            .map_err(|who| OidcError::NotAllowed {
                who,
                auth_id: flow.auth_id.clone(),
            })?;
        Ok(Login {
            auth_id: flow.auth_id,
            identity: v.identity,
            token_expiry: self.config.use_expiry_from_token.then_some(v.expires),
        })
    }

    /// Checks the provider's answer to a console login in the browser holding `browser`;
    /// the admin's session if the admin lists admit them.
    pub async fn finish_console(
        &self,
        code: &str,
        state: &str,
        browser: Option<&str>,
    ) -> Result<AdminSession, OidcError> {
        let (_, v) = self
            .exchange(code, state, Expect::Console { browser })
            .await?;
        let session = AdminSession {
            who: v.identity.label(),
            email: v.identity.email.clone(),
            email_verified: v.email_verified != Some(false),
            groups: v
                .groups
                .into_iter()
                .filter(|g| self.config.admin_groups.contains(g))
                .collect(),
            until: chrono::Utc::now().timestamp() + ADMIN_SESSION_TTL.as_secs() as i64,
        };
        if !self.admits_admin(&session) {
            return Err(OidcError::NotAllowed {
                who: session.who,
                auth_id: String::new(),
            });
        }
        Ok(session)
    }

    /// The cookie value that carries `session`.
    pub fn seal_session(&self, session: &AdminSession) -> String {
        seal(&self.session_key, session)
    }

    /// The session a cookie carries, if it is genuine, current and still an admin's.
    pub fn open_session(&self, sealed: &str) -> Option<AdminSession> {
        let session: AdminSession = open(&self.session_key, sealed).ok()?;
        (chrono::Utc::now().timestamp() <= session.until && self.admits_admin(&session))
            .then_some(session)
    }

    fn admits_admin(&self, s: &AdminSession) -> bool {
        let c = &self.config;
        let by_email = s.email_verified
            && !s.email.is_empty()
            && c.admin_users
                .iter()
                .any(|u| u.eq_ignore_ascii_case(&s.email));
        by_email || c.admin_groups.iter().any(|g| s.groups.contains(g))
    }

    /// Spends the provider's code for this flow and verifies the ID token it brings. The
    /// flow must be of the kind expected (checked before the code is spent).
    async fn exchange(
        &self,
        code: &str,
        state: &str,
        expect: Expect<'_>,
    ) -> Result<(FlowState, Verified), OidcError> {
        let flow = self.open_state(state)?;
        match (expect, flow.browser.as_deref()) {
            (Expect::Device, None) => {}
            (Expect::Console { browser }, Some(began_in)) => {
                if browser != Some(began_in) {
                    return Err(OidcError::OtherBrowser);
                }
            }
            _ => return Err(OidcError::BadState),
        }
        if chrono::Utc::now().timestamp() > flow.until {
            return Err(OidcError::Expired);
        }
        let client = self.client(&flow.redirect).await?;
        let mut exchange = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| OidcError::Provider(format!("no token endpoint: {e}")))?;
        if let Some(verifier) = &flow.verifier {
            exchange = exchange.set_pkce_verifier(PkceCodeVerifier::new(verifier.clone()));
        }
        let tokens = exchange
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Refused(error_chain(&e)))?;
        let id_token = tokens
            .id_token()
            .ok_or_else(|| OidcError::Token("the answer had no ID token".into()))?;
        let claims = id_token
            .claims(&client.id_token_verifier(), &Nonce::new(flow.nonce.clone()))
            .map_err(|e| OidcError::Token(error_chain(&e)))?;
        let email = claims
            .email()
            .map(|e| e.as_str().to_string())
            .unwrap_or_default();
        let identity = OidcIdentity {
            issuer: claims.issuer().as_str().to_string(),
            subject: claims.subject().as_str().to_string(),
            name: claims
                .preferred_username()
                .map(|u| u.as_str().to_string())
                .unwrap_or_else(|| email.clone()),
            display_name: claims
                .name()
                .and_then(|n| n.get(None))
                .map(|n| n.as_str().to_string())
                .unwrap_or_default(),
            email,
        };
        let verified = Verified {
            identity,
            email_verified: claims.email_verified(),
            // Verified above; read once more for the one claim the core types do not carry.
            groups: groups_claim(&id_token.to_string()),
            expires: Timestamp(claims.expiration().timestamp_millis()),
        };
        Ok((flow, verified))
    }

    /// The allow-lists: each one configured must admit the user; `Err` names who was refused.
    fn check_allowed(
        &self,
        who: &OidcIdentity,
        email_verified: Option<bool>,
        groups: &BTreeSet<String>,
    ) -> Result<(), String> {
        let c = &self.config;
        let label = who.label();
        let email = who.email.to_ascii_lowercase();
        let by_email = !c.allowed_domains.is_empty() || !c.allowed_users.is_empty();
        if by_email && (email.is_empty() || email_verified == Some(false)) {
            return Err(format!("{label} (no verified email)"));
        }
        let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        if !c.allowed_domains.is_empty()
            && !c
                .allowed_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
        {
            return Err(label);
        }
        if !c.allowed_users.is_empty()
            && !c
                .allowed_users
                .iter()
                .any(|u| u.eq_ignore_ascii_case(&email))
        {
            return Err(label);
        }
        if !c.allowed_groups.is_empty() && !c.allowed_groups.iter().any(|g| groups.contains(g)) {
            return Err(label);
        }
        Ok(())
    }

    /// A client for the provider, calling back `redirect`. Discovery is cached.
    async fn client(
        &self,
        redirect: &str,
    ) -> Result<
        openidconnect::core::CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        OidcError,
    > {
        let metadata = self.metadata().await?;
        let redirect = RedirectUrl::new(redirect.to_string())
            .map_err(|e| OidcError::Provider(format!("callback URL {redirect}: {e}")))?;
        Ok(CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            self.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect))
    }

    async fn metadata(&self) -> Result<CoreProviderMetadata, OidcError> {
        let mut cached = self.provider.lock().await;
        if let Some((metadata, at)) = cached.as_ref()
            && at.elapsed() < DISCOVERY_TTL
        {
            return Ok(metadata.clone());
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|e| OidcError::Provider(format!("oidc.issuer: {e}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::Provider(error_chain(&e)))?;
        *cached = Some((metadata.clone(), Instant::now()));
        Ok(metadata)
    }

    fn open_state(&self, state: &str) -> Result<FlowState, OidcError> {
        open(&self.flow_key, state)
    }
}

/// A key for one purpose, derived from the secret every member shares.
fn derived_key(purpose: &[u8], cluster_secret: &[u8; 32]) -> ChaCha20Poly1305 {
    let key: [u8; 32] = sha2::Sha256::new()
        .chain_update(purpose)
        .chain_update(cluster_secret)
        .finalize()
        .into();
    ChaCha20Poly1305::new(&key.into())
}

/// `value` as JSON, encrypted and authenticated under `key`, URL- and cookie-safe.
fn seal(key: &ChaCha20Poly1305, value: &impl Serialize) -> String {
    let nonce: [u8; 12] = rand::random();
    let plain = serde_json::to_vec(value).expect("sealed values serialize");
    let sealed = key
        .encrypt(AeadNonce::from_slice(&nonce), plain.as_slice())
        .expect("sealing cannot fail");
    URL_SAFE_NO_PAD.encode([nonce.as_slice(), &sealed].concat())
}

fn open<T: serde::de::DeserializeOwned>(
    key: &ChaCha20Poly1305,
    sealed: &str,
) -> Result<T, OidcError> {
    if sealed.len() > MAX_STATE_LEN {
        return Err(OidcError::BadState);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(sealed)
        .map_err(|_| OidcError::BadState)?;
    if raw.len() < 12 {
        return Err(OidcError::BadState);
    }
    let (nonce, sealed) = raw.split_at(12);
    let plain = key
        .decrypt(AeadNonce::from_slice(nonce), sealed)
        .map_err(|_| OidcError::BadState)?;
    serde_json::from_slice(&plain).map_err(|_| OidcError::BadState)
}

/// The `groups` claim of a JWT already verified: a list of names, or one name.
fn groups_claim(jwt: &str) -> BTreeSet<String> {
    let payload = jwt
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok());
    match payload.as_ref().and_then(|p| p.get("groups")) {
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(one)) => BTreeSet::from([one.clone()]),
        _ => BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(config: OidcConfig) -> Oidc {
        Oidc::new(&config, &[7; 32]).unwrap()
    }

    fn someone(email: &str) -> OidcIdentity {
        OidcIdentity {
            issuer: "https://idp".into(),
            subject: "s1".into(),
            name: "someone".into(),
            display_name: String::new(),
            email: email.into(),
        }
    }

    #[test]
    fn state_opens_only_under_the_cluster_key() {
        let a = rp(OidcConfig::default());
        let flow = FlowState {
            auth_id: "abc".into(),
            browser: None,
            nonce: "n".into(),
            verifier: Some("v".into()),
            redirect: "http://m1/oidc/callback".into(),
            until: 1,
        };
        let state = seal(&a.flow_key, &flow);
        assert_eq!(a.open_state(&state).unwrap().auth_id, "abc");
        let other = Oidc::new(&OidcConfig::default(), &[8; 32]).unwrap();
        assert!(matches!(other.open_state(&state), Err(OidcError::BadState)));
        let mut tampered = state.into_bytes();
        tampered[20] ^= 1;
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(matches!(a.open_state(&tampered), Err(OidcError::BadState)));
        assert!(matches!(a.open_state("x"), Err(OidcError::BadState)));
    }

    #[test]
    fn allow_lists_each_must_admit() {
        let open = rp(OidcConfig::default());
        assert!(
            open.check_allowed(&someone(""), None, &BTreeSet::new())
                .is_ok()
        );

        let domains = rp(OidcConfig {
            allowed_domains: vec!["example.com".into()],
            ..Default::default()
        });
        assert!(
            domains
                .check_allowed(&someone("a@Example.com"), None, &BTreeSet::new())
                .is_ok()
        );
        assert!(
            domains
                .check_allowed(&someone("a@evil.com"), None, &BTreeSet::new())
                .is_err()
        );
        assert!(
            domains
                .check_allowed(&someone("a@example.com"), Some(false), &BTreeSet::new())
                .is_err()
        );

        let both = rp(OidcConfig {
            allowed_users: vec!["a@example.com".into()],
            allowed_groups: vec!["admins".into()],
            ..Default::default()
        });
        let admins = BTreeSet::from(["admins".to_string()]);
        assert!(
            both.check_allowed(&someone("a@example.com"), Some(true), &admins)
                .is_ok()
        );
        assert!(
            both.check_allowed(&someone("a@example.com"), Some(true), &BTreeSet::new())
                .is_err()
        );
        assert!(
            both.check_allowed(&someone("b@example.com"), Some(true), &admins)
                .is_err()
        );
    }

    #[test]
    fn admin_sessions_open_on_any_member_until_the_admin_lists_drop_them() {
        let config = OidcConfig {
            admin_users: vec!["root@example.com".into()],
            admin_groups: vec!["ops".into()],
            ..Default::default()
        };
        let session = |email: &str, verified: bool, groups: &[&str]| AdminSession {
            who: email.into(),
            email: email.into(),
            email_verified: verified,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            until: chrono::Utc::now().timestamp() + 60,
        };
        let (m1, m2) = (rp(config.clone()), rp(config));
        let by_email = m1.seal_session(&session("Root@example.com", true, &[]));
        assert_eq!(m2.open_session(&by_email).unwrap().who, "Root@example.com");
        let by_group = m1.seal_session(&session("op@example.com", false, &["ops"]));
        assert!(m2.open_session(&by_group).is_some());
        // An unverified email is not enough; nor is someone else's group.
        assert!(!m1.admits_admin(&session("root@example.com", false, &[])));
        assert!(!m1.admits_admin(&session("x@example.com", true, &["devs"])));
        // Expired, forged, sealed for flows, or no longer listed: refused.
        let mut old = session("root@example.com", true, &[]);
        old.until -= 120;
        assert!(m1.open_session(&m1.seal_session(&old)).is_none());
        assert!(m1.open_session("oidc.x").is_none());
        assert!(
            m1.open_session(&seal(&m1.flow_key, &session("root@example.com", true, &[])))
                .is_none()
        );
        let demoted = rp(OidcConfig::default());
        assert!(demoted.open_session(&by_email).is_none());
    }

    #[test]
    fn groups_come_as_a_list_or_one_name() {
        let jwt = |claims: &str| format!("h.{}.s", URL_SAFE_NO_PAD.encode(claims));
        assert_eq!(
            groups_claim(&jwt(r#"{"groups":["a","b"]}"#)),
            BTreeSet::from(["a".to_string(), "b".to_string()])
        );
        assert_eq!(groups_claim(&jwt(r#"{"groups":"a"}"#)).len(), 1);
        assert!(groups_claim(&jwt(r#"{}"#)).is_empty());
        assert!(groups_claim("garbage").is_empty());
    }
}

//! API-key authentication for the TCP listener.
//!
//! A presented key is split into its public prefix and hashed; it is valid when a stored
//! key with that prefix has the same hash and has not expired. Every failure answers the
//! same `Unauthenticated`, so probing learns nothing about which part was wrong.

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::registry::secrets::{self, SecretKind};
use crate::registry::{Registry, Timestamp};

/// Checks `authorization: Bearer <api key>` on every call, against this member's view.
#[derive(Clone)]
pub struct ApiKeyCheck {
    cluster: crate::raft::Cluster,
    failed: super::audit::FailedAuth,
}

impl ApiKeyCheck {
    pub fn new(cluster: crate::raft::Cluster, failed: super::audit::FailedAuth) -> Self {
        ApiKeyCheck { cluster, failed }
    }
}

impl Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let source = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map(|a| a.ip());
        if let Some(refusal) = self.failed.refusal_for(source) {
            return Err(refusal);
        }
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match check_bearer(&self.cluster.view(), header, Timestamp::now()) {
            Ok(()) => Ok(request),
            Err(reason) => {
                tracing::debug!(reason = reason.as_str(), "admin call refused");
                let from = source.map_or_else(|| "unknown".into(), |ip| ip.to_string());
                let actor = format!("{} from {from}", super::audit::bearer_actor(header));
                self.failed.report(actor, "grpc", reason.as_str(), source);
                Err(Status::unauthenticated(
                    "a valid API key is required (authorization: Bearer hskey-api-…)",
                ))
            }
        }
    }
}

/// Why a key was refused (for debug logs only; the caller sees one generic answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    UnknownPrefix,
    WrongSecret,
    Expired,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::UnknownPrefix => "unknown prefix",
            Refusal::WrongSecret => "wrong secret",
            Refusal::Expired => "expired",
        }
    }
}

/// Checks an `authorization` header value against the registry.
pub fn check_bearer(view: &Registry, header: Option<&str>, now: Timestamp) -> Result<(), Refusal> {
    let header = header.ok_or(Refusal::Missing)?.trim();
    let key = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(Refusal::Malformed)?
        .trim();
    check_api_key(view, key, now)
}

/// Checks a full API key (`hskey-api-<prefix>-<secret>`) against the registry.
pub fn check_api_key(view: &Registry, key: &str, now: Timestamp) -> Result<(), Refusal> {
    let (prefix, hash) = secrets::parse(SecretKind::Api, key).ok_or(Refusal::Malformed)?;
    let stored = view
        .api_key_by_prefix(&prefix)
        .ok_or(Refusal::UnknownPrefix)?;
    if !stored.hash.matches(&hash) {
        return Err(Refusal::WrongSecret);
    }
    if stored.is_expired(now) {
        return Err(Refusal::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterSettings, Command, Request};

    fn registry_with_key(expiration: Option<Timestamp>) -> (Registry, String) {
        let mut reg = Registry::new(ClusterSettings::default());
        let secret = secrets::generate(SecretKind::Api);
        let cmd = Command::CreateApiKey {
            prefix: secret.prefix.clone(),
            hash: secret.hash,
            expiration,
        };
        let mut applied = reg.apply(&Request::single(Timestamp(1_000), cmd));
        assert!(applied.outcomes.remove(0).into_result().is_ok());
        (reg, secret.full)
    }

    #[test]
    fn valid_api_key_is_accepted() {
        let (reg, key) = registry_with_key(None);
        assert_eq!(check_api_key(&reg, &key, Timestamp(2_000)), Ok(()));
        assert_eq!(
            check_bearer(&reg, Some(&format!("Bearer {key}")), Timestamp(2_000)),
            Ok(())
        );
    }

    #[test]
    fn api_key_with_wrong_secret_is_refused() {
        let (reg, key) = registry_with_key(None);
        let mut wrong = key.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'a' { 'b' } else { 'a' });
        assert_eq!(
            check_api_key(&reg, &wrong, Timestamp(2_000)),
            Err(Refusal::WrongSecret)
        );
    }

    #[test]
    fn expired_api_key_is_refused() {
        let (reg, key) = registry_with_key(Some(Timestamp(5_000)));
        assert_eq!(check_api_key(&reg, &key, Timestamp(4_999)), Ok(()));
        assert_eq!(
            check_api_key(&reg, &key, Timestamp(5_000)),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn unknown_prefix_missing_or_malformed_keys_are_refused() {
        let (reg, _) = registry_with_key(None);
        let other = secrets::generate(SecretKind::Api).full;
        assert_eq!(
            check_api_key(&reg, &other, Timestamp(2_000)),
            Err(Refusal::UnknownPrefix)
        );
        assert_eq!(
            check_bearer(&reg, None, Timestamp(2_000)),
            Err(Refusal::Missing)
        );
        assert_eq!(
            check_bearer(&reg, Some(&other), Timestamp(2_000)),
            Err(Refusal::Malformed)
        );
        let preauth = secrets::generate(SecretKind::PreAuth).full;
        assert_eq!(
            check_api_key(&reg, &preauth, Timestamp(2_000)),
            Err(Refusal::Malformed)
        );
    }
}

//! The audit log's admin side: who is calling (a unix-socket peer's uid, or the API key's
//! prefix), carried with every admin write so the state machine records it with the
//! outcome, and refused authentications recorded through a bounded queue (a flood of bad
//! keys fills the queue and is counted, never the Raft log).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::registry::Command;
use crate::registry::secrets::{self, SecretKind};

tokio::task_local! {
    static ACTOR: String;
}

/// Refused authentications waiting to be written; more are dropped (and counted).
const FAILED_AUTH_QUEUE: usize = 64;

/// The caller of the admin call being served, as the audit log names it.
pub fn current_actor() -> String {
    ACTOR
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "unknown".into())
}

/// Names the caller from the connection (unix peer credentials) or the API key prefix.
fn actor_of<B>(req: &http::Request<B>) -> String {
    if let Some(info) = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
    {
        return match info.peer_cred.as_ref() {
            Some(cred) => format!("uid:{}", cred.uid()),
            None => "unix:unknown".into(),
        };
    }
    bearer_actor(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
}

/// Runs `fut` with `actor` as the caller (the REST middleware's way in).
pub async fn with_actor<F: Future>(actor: String, fut: F) -> F::Output {
    ACTOR.scope(actor, fut).await
}

/// The API key prefix a bearer header names, for the audit log (never the secret).
pub fn bearer_actor(header: Option<&str>) -> String {
    let key = header
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .and_then(|k| secrets::parse(SecretKind::Api, k.trim()));
    match key {
        Some((prefix, _)) => format!("apikey:{prefix}"),
        None => "anonymous".into(),
    }
}

/// A tower layer that runs each admin call with its caller in scope.
pub fn actor_layer<S>(inner: S) -> WithActor<S> {
    WithActor { inner }
}

#[derive(Clone)]
pub struct WithActor<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for WithActor<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let actor = actor_of(&req);
        Box::pin(ACTOR.scope(actor, self.inner.call(req)))
    }
}

/// Where refused authentications go to be recorded.
#[derive(Clone)]
pub struct FailedAuth {
    tx: mpsc::Sender<Command>,
    dropped: prometheus::IntCounter,
    /// Failures per source address (`limits.failed_admin_auth_per_minute`).
    per_source: std::sync::Arc<crate::limit::RateLimiter<std::net::IpAddr>>,
}

impl FailedAuth {
    /// Starts the writer; it stops with `stop`.
    pub fn start(
        cluster: crate::raft::Cluster,
        dropped: prometheus::IntCounter,
        per_source: crate::limit::RateLimiter<std::net::IpAddr>,
        stop: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> FailedAuth {
        let (tx, mut rx) = mpsc::channel::<Command>(FAILED_AUTH_QUEUE);
        tasks.spawn(async move {
            loop {
                let command = tokio::select! {
                    () = stop.cancelled() => return,
                    next = rx.recv() => match next {
                        Some(c) => c,
                        None => return,
                    },
                };
                if let Err(error) = cluster.propose(command).await {
                    tracing::warn!(%error, "could not record a refused admin authentication");
                }
            }
        });
        FailedAuth {
            tx,
            dropped,
            per_source: std::sync::Arc::new(per_source),
        }
    }

    /// `None` while `source` may still try a key; otherwise the refusal to send without
    /// checking it: it failed too often lately.
    pub fn refusal_for(&self, source: Option<std::net::IpAddr>) -> Option<tonic::Status> {
        let source = source?;
        if self.per_source.has_budget(&source) {
            return None;
        }
        let what = format!("failed authentications from {source}");
        let refusal = self.per_source.refusal(&source, &what);
        Some(tonic::Status::resource_exhausted(refusal.message))
    }

    /// Records that `actor` was refused on `surface` (`grpc`, `rest`), and spends one of
    /// `source`'s tries.
    pub fn report(
        &self,
        actor: String,
        surface: &str,
        reason: &str,
        source: Option<std::net::IpAddr>,
    ) {
        if let Some(source) = source {
            self.per_source.allow(&source);
        }
        let command = Command::RecordAudit {
            actor,
            action: format!("authenticate ({surface})"),
            target: String::new(),
            result: format!("refused: {reason}"),
        };
        if self.tx.try_send(command).is_err() {
            self.dropped.inc();
        }
    }
}

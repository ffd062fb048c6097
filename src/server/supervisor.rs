//! Supervision: a member that cannot do its job exits non-zero instead of limping on, so
//! systemd or Kubernetes restart it (and its clients move to the other members meanwhile).
//!
//! It fails when an essential task (a listener, the Raft service) ends or panics while the
//! member is not stopping, when openraft stops on its own (a storage error makes it fatal),
//! and when its config disagrees with the settings the cluster recorded.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::raft::Cluster;

/// Exit code for a generic failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a bad configuration, or one the cluster refuses (settings that differ,
/// a missing shared key): restarting will not help. The same code as `hsd config check`.
pub const EXIT_CONFIG: u8 = 64;

/// Why the member stopped on its own.
#[derive(Clone, Debug)]
pub struct Failure {
    pub reason: String,
    pub exit_code: u8,
}

/// Owns the member's stop token and records the first failure.
#[derive(Clone)]
pub struct Supervisor {
    stop: CancellationToken,
    failure: Arc<OnceLock<Failure>>,
}

impl Supervisor {
    pub fn new(stop: CancellationToken) -> Self {
        Supervisor {
            stop,
            failure: Arc::default(),
        }
    }

    /// Records `reason` (the first one wins) and stops the member.
    pub fn fail(&self, reason: impl Into<String>, exit_code: u8) {
        let failure = Failure {
            reason: reason.into(),
            exit_code,
        };
        if self.failure.set(failure.clone()).is_ok() {
            tracing::error!(reason = %failure.reason, "member failed; shutting down");
        }
        self.stop.cancel();
    }

    pub fn failure(&self) -> Option<Failure> {
        self.failure.get().cloned()
    }

    /// Spawns a task the member cannot run without: if it ends or panics before the member
    /// stops, the member fails.
    pub fn spawn_essential(
        &self,
        tasks: &TaskTracker,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let supervisor = self.clone();
        tasks.spawn(async move {
            let result = AssertUnwindSafe(task).catch_unwind().await;
            if supervisor.stop.is_cancelled() {
                return;
            }
            let reason = match result {
                Ok(()) => format!("{name} stopped unexpectedly"),
                Err(_) => format!("{name} panicked"),
            };
            supervisor.fail(reason, EXIT_FAILURE);
        });
    }

    /// Fails the member as soon as Raft stops on its own (storage failure, fatal state).
    pub async fn watch_raft(self, cluster: Cluster) {
        let mut metrics = cluster.metrics();
        loop {
            if let Some(reason) = cluster.fatal() {
                self.fail(format!("raft stopped: {reason}"), EXIT_FAILURE);
                return;
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                changed = metrics.changed() => if changed.is_err() {
                    if !self.stop.is_cancelled() {
                        self.fail("raft stopped", EXIT_FAILURE);
                    }
                    return;
                },
            }
        }
    }

    /// Records this member's cluster-wide settings (first start) or confirms they match;
    /// fails the member with the key that differs otherwise.
    pub async fn record_settings(self, cluster: Cluster) {
        tokio::select! {
            () = self.stop.cancelled() => {}
            result = cluster.record_settings() => if let Err(error) = result {
                self.fail(error.to_string(), EXIT_CONFIG);
            },
        }
    }
}

//! Background work every member runs: following the Raft membership into the DERP map,
//! dial plan and mesh; removing inactive ephemeral nodes (leader only); refreshing gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{AuditConfig, ClusterMemberConfig};
use crate::control::policy::AccessCache;
use crate::control::{ControlDeps, Topology};
use crate::derp::region::TopologyInputs;
use crate::derp::server::DerpServer;
use crate::raft::{Cluster, QuietCheck};
use crate::registry::{Command, Timestamp};
use crate::telemetry::Metrics;

/// How often the leader looks for ephemeral nodes to remove.
const EPHEMERAL_GC_INTERVAL: Duration = Duration::from_secs(10);
/// Relay clients are re-checked at most this often after node changes…
const RELAY_RECHECK_MIN_GAP: Duration = Duration::from_millis(200);
/// …and at least this often, for keys that expire by time alone.
const RELAY_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often the leader checks the audit log against `audit.*`.
const AUDIT_PRUNE_INTERVAL: Duration = Duration::from_secs(5);
/// How often a member checks that its DERP key is pinned (sooner while it is not).
const DERP_PIN_RECHECK: Duration = Duration::from_secs(30);
const DERP_PIN_RETRY: Duration = Duration::from_secs(1);
/// How often gauges that mirror Raft state are refreshed.
const GAUGE_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a memtable must go without writes before it is flushed: the same second after
/// which the allocator hands freed pages back (`hsd.rs`), so a member's memory follows a
/// burst of joins down on both sides.
const MEMTABLE_QUIET_AFTER: Duration = Duration::from_secs(1);

/// The current Raft membership as member entries of the config (empty = not known yet).
fn raft_members(cluster: &Cluster) -> Vec<ClusterMemberConfig> {
    cluster
        .metrics()
        .borrow()
        .membership_config
        .nodes()
        .map(|(id, m)| ClusterMemberConfig {
            id: *id,
            address: m.raft_addr.clone(),
            control_url: (!m.control_url.is_empty()).then(|| m.control_url.clone()),
            region_id: m.region_id,
            region_code: None,
            region_name: None,
        })
        .collect()
}

/// Recomputes the topology whenever the Raft membership changes; meshes with new members.
pub(super) async fn follow_membership(
    inputs: TopologyInputs,
    cluster: Cluster,
    tx: tokio::sync::watch::Sender<Arc<Topology>>,
    derp: Arc<DerpServer>,
    stop: CancellationToken,
) {
    let mut metrics = cluster.metrics();
    let mut last: Option<Vec<ClusterMemberConfig>> = None;
    loop {
        metrics.borrow_and_update();
        let members = raft_members(&cluster);
        // The first round runs even with no membership yet: the config's list stands in.
        if last.as_ref() != Some(&members) {
            let (topology, mesh) = inputs.topology(&members);
            if inputs.config.derp.server.enabled {
                derp.start_mesh(mesh);
            }
            derp.drop_refused_mesh_peers();
            if last.as_ref().is_some_and(|l| !l.is_empty()) {
                tracing::info!(
                    members = members.len(),
                    "membership changed; clients get a new DERP map and dial plan"
                );
            }
            // Sessions resend a full map only when what clients see really changed.
            tx.send_if_modified(|cur| {
                let changed = **cur != topology;
                if changed {
                    *cur = Arc::new(topology);
                }
                changed
            });
            last = Some(members);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

/// Removes ephemeral nodes that have been offline longer than the inactivity timeout.
/// Only the leader proposes, so members do not race to delete the same nodes.
pub(super) async fn ephemeral_gc(deps: ControlDeps) {
    let mut tick = tokio::time::interval(EPHEMERAL_GC_INTERVAL);
    loop {
        tokio::select! {
            () = deps.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let is_leader =
            deps.cluster.metrics().borrow().current_leader == Some(deps.cluster.member_id());
        if !is_leader {
            continue;
        }
        let timeout_ms = deps.settings.ephemeral_inactivity_timeout.as_millis() as i64;
        let now = deps.cluster.now();
        let view = deps.cluster.view();
        if !view.nodes().any(|n| n.ephemeral) {
            continue;
        }
        // Sessions on every reachable member, not just this one.
        let online = deps.presence.sessions();
        let stale: Vec<_> = view
            .nodes()
            .filter(|n| n.ephemeral && !online.contains_key(&n.id))
            .filter(|n| n.last_seen.unwrap_or(n.created_at).plus_millis(timeout_ms) <= now)
            .map(|n| n.id)
            .collect();
        if stale.is_empty() {
            continue;
        }
        match deps
            .cluster
            .propose(Command::DeleteNodes { ids: stale.clone() })
            .await
        {
            Ok(_) => tracing::info!(count = stale.len(), "removed inactive ephemeral nodes"),
            Err(error) => tracing::warn!(%error, "could not remove inactive ephemeral nodes"),
        }
    }
}

pub(super) async fn refresh_gauges(
    cluster: Cluster,
    access: Arc<AccessCache>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_REFRESH_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = cluster.metrics().borrow().clone();
        metrics
            .raft_applied_index
            .set(m.last_applied.map(|l| l.index as i64).unwrap_or(0));
        metrics
            .raft_is_leader
            .set(i64::from(m.current_leader == Some(cluster.member_id())));
        let index = |l: Option<openraft::LogId<u64>>| l.map(|l| l.index as i64).unwrap_or(0);
        metrics.raft_snapshot_index.set(index(m.snapshot));
        metrics.raft_purged_index.set(index(m.purged));
        let (kept, alone) = access.compiles();
        for (kind, total) in [("kept", kept), ("alone", alone)] {
            let counter = metrics.policy_compiles.with_label_values(&[kind]);
            Metrics::mirror_counter(&counter, total);
        }
        let (slow, refused) = cluster.presence_poll_failures();
        for (reason, total) in [("slow", slow), ("refused", refused)] {
            let counter = metrics.presence_polls_failed.with_label_values(&[reason]);
            Metrics::mirror_counter(&counter, total);
        }
        for (cf, bytes) in cluster.memtable_bytes() {
            metrics
                .memtable_bytes
                .with_label_values(&[cf])
                .set(bytes as i64);
        }
    }
}

/// Flushes memtables that writes have left alone for `MEMTABLE_QUIET_AFTER`, returning
/// their memory; under a steady stream of writes it does nothing.
pub(super) async fn reclaim_memtables(cluster: Cluster, stop: CancellationToken) {
    let mut tick = tokio::time::interval(MEMTABLE_QUIET_AFTER);
    let mut check = QuietCheck::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (next, flushed) = cluster.flush_quiet_memtables(check).await;
        check = next;
        match flushed {
            Ok(cfs) if !cfs.is_empty() => tracing::debug!(?cfs, "flushed quiet memtables"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not flush quiet memtables"),
        }
    }
}

/// Cuts relay clients off once their node key stops being valid: after every applied
/// batch that changed a node (removed, expired, unapproved, key rotated), at most every
/// `RELAY_RECHECK_MIN_GAP`, and every `RELAY_SWEEP_INTERVAL` for keys that expire by time.
pub(super) async fn guard_relay(cluster: Cluster, derp: Arc<DerpServer>, stop: CancellationToken) {
    use tokio::sync::broadcast::error::RecvError;
    let mut batches = cluster.feed().batches.subscribe();
    let mut sweep = tokio::time::interval(RELAY_SWEEP_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = sweep.tick() => {}
            batch = batches.recv() => match batch {
                Ok(batch) if !touches_nodes(&batch) => continue,
                Err(RecvError::Closed) => return,
                // Node changes, or missed batches (which may have held some).
                _ => {
                    tokio::time::sleep(RELAY_RECHECK_MIN_GAP).await;
                    while batches.try_recv().is_ok() {}
                }
            },
        }
        derp.drop_refused_clients();
    }
}

fn touches_nodes(batch: &crate::raft::AppliedBatch) -> bool {
    use crate::registry::Change;
    batch.full_resync
        || batch
            .changes
            .iter()
            .any(|c| matches!(c, Change::NodeUpserted(_) | Change::NodeRemoved(_)))
}

/// Keeps the audit log within `audit.retention` and `audit.max_records` (leader only).
pub(super) async fn prune_audit(cluster: Cluster, audit: AuditConfig, stop: CancellationToken) {
    let mut tick = tokio::time::interval(AUDIT_PRUNE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if cluster.metrics().borrow().current_leader != Some(cluster.member_id()) {
            continue;
        }
        let retention_ms = i64::try_from(audit.retention.0.as_millis()).unwrap_or(i64::MAX);
        let before = if retention_ms == 0 {
            Timestamp(i64::MIN)
        } else {
            cluster.now().plus_millis(-retention_ms)
        };
        let (count, oldest) = cluster.view().audit_extent();
        let too_old = oldest.is_some_and(|at| at < before);
        if !too_old && count as u64 <= audit.max_records {
            continue;
        }
        let prune = Command::PruneAudit {
            before,
            keep_at_most: audit.max_records,
        };
        if let Err(error) = cluster.propose(prune).await {
            tracing::warn!(%error, "could not prune the audit log");
        }
    }
}

/// Pins this member's DERP key in the registry, so the other members' relays accept its
/// mesh connection (and nobody else's with the mesh key alone).
pub(super) async fn pin_derp_key(cluster: Cluster, key: [u8; 32], stop: CancellationToken) {
    let me = cluster.member_id();
    loop {
        let pinned = cluster.view().member_derp_key(me) == Some(&key);
        let wait = if pinned {
            DERP_PIN_RECHECK
        } else {
            match cluster
                .propose(Command::SetMemberDerpKey { member: me, key })
                .await
            {
                Ok(_) => {
                    tracing::info!("pinned this member's DERP key for the mesh");
                    DERP_PIN_RECHECK
                }
                Err(error) => {
                    tracing::debug!(%error, "could not pin the DERP key yet; retrying");
                    DERP_PIN_RETRY
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// How often a policy file (`policy.mode: file`) is re-read; SIGHUP re-reads at once.
const POLICY_FILE_POLL: Duration = Duration::from_secs(2);

/// `policy.mode: file`: keeps the replicated policy equal to the file. A changed file is
/// checked first; one that would be refused is logged and the running policy stays (the
/// same text is not retried until the file changes again). Every member watching the same
/// file proposes only when the cluster's policy differs, so the write happens once.
pub(super) async fn follow_policy_file(
    cluster: Cluster,
    presence: crate::presence::Presence,
    path: std::path::PathBuf,
    stop: CancellationToken,
) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut refused: Option<String> = None;
    loop {
        match tokio::fs::read_to_string(&path).await {
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read the policy file")
            }
            Ok(text) if Some(&text) == refused.as_ref() => {}
            Ok(text) if cluster.view().policy() == text => {}
            Ok(text) => match crate::control::policy::check(&cluster.view(), &presence, &text) {
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "policy file refused; the running policy stays");
                    refused = Some(text);
                }
                Ok(()) => {
                    let proposal = crate::registry::Proposal::by(
                        format!("policy file {}", path.display()),
                        Command::SetPolicy { policy: text },
                    );
                    match cluster.propose_once(proposal).await {
                        Ok(_) => tracing::info!(path = %path.display(), "policy loaded from file"),
                        Err(error) => {
                            tracing::warn!(%error, "could not store the policy file's policy")
                        }
                    }
                    refused = None;
                }
            },
        }
        let hup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLICY_FILE_POLL) => {}
            () = hup => tracing::info!("SIGHUP: re-reading the policy file"),
        }
    }
}

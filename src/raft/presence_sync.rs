//! Presence between members: each member long-polls every other member's live sessions
//! (`WatchPresence`) and merges them into its own `Presence`, so a node streaming from
//! member 2 shows online, with endpoints and home DERP, in netmaps served by members 1
//! and 3 — within one round trip of the change, and without touching the Raft log.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cluster::Cluster;
use crate::presence::NodePresence;
use crate::proto::raft::WatchPresenceRequest;
use crate::registry::NodeId;

/// How long one long poll may wait on the remote side.
const POLL_WAIT: Duration = Duration::from_secs(10);
/// A member that has not answered for this long is taken to hold no sessions.
const STALE_AFTER: Duration = Duration::from_secs(3);
/// How often the set of members to watch is refreshed.
const MEMBERSHIP_REFRESH: Duration = Duration::from_secs(1);

/// Keeps one poller per other member of the current membership.
pub async fn run(cluster: Cluster, stop: CancellationToken, tasks: TaskTracker) {
    let mut pollers: HashMap<u64, (String, CancellationToken)> = HashMap::new();
    let mut tick = tokio::time::interval(MEMBERSHIP_REFRESH);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let members: HashMap<u64, String> = cluster
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .filter(|(id, _)| **id != cluster.member_id())
            .map(|(id, n)| (*id, n.raft_addr.clone()))
            .collect();
        pollers.retain(|id, (addr, token)| {
            let keep = members.get(id) == Some(addr);
            if !keep {
                token.cancel();
                cluster.presence().forget_member(*id);
            }
            keep
        });
        for (id, addr) in members {
            if pollers.contains_key(&id) {
                continue;
            }
            let token = stop.child_token();
            tasks.spawn(poll_member(
                cluster.clone(),
                id,
                addr.clone(),
                token.clone(),
            ));
            pollers.insert(id, (addr, token));
        }
    }
    for (_, (_, token)) in pollers {
        token.cancel();
    }
}

async fn poll_member(cluster: Cluster, member: u64, addr: String, stop: CancellationToken) {
    // u64::MAX never equals a real version, so the first poll answers at once.
    let mut version = u64::MAX;
    let mut last_ok = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    let mut holding = false;
    loop {
        let call = async {
            let mut client = cluster.peers().client(&addr).ok()?;
            let mut req = tonic::Request::new(WatchPresenceRequest {
                after_version: version,
                wait_ms: POLL_WAIT.as_millis() as u64,
                deltas: true,
            });
            req.set_timeout(POLL_WAIT + Duration::from_secs(2));
            match client.watch_presence(req).await {
                Ok(reply) => Some(reply.into_inner()),
                Err(status) => {
                    // Refused or reset (not a slow answer): the member may have died.
                    if status.code() != tonic::Code::DeadlineExceeded {
                        cluster.leader_seems_gone(member);
                    }
                    None
                }
            }
        };
        let reply = tokio::select! {
            () = stop.cancelled() => return,
            reply = call => reply,
        };
        match reply {
            Some(snapshot) if snapshot.member == member => {
                version = snapshot.version;
                last_ok = tokio::time::Instant::now();
                backoff = Duration::from_millis(100);
                let entries: Vec<(NodeId, Option<NodePresence>)> = snapshot
                    .entries
                    .into_iter()
                    .map(|e| {
                        let p = NodePresence {
                            member,
                            sessions: e.sessions,
                            endpoints: e.endpoints,
                            home_derp: e.home_derp,
                            online_since: e.online_since,
                        };
                        (NodeId(e.node), (p.sessions > 0).then_some(p))
                    })
                    .collect();
                holding = true;
                cluster
                    .presence()
                    .apply_remote(member, snapshot.delta, entries);
            }
            _ => {
                if holding && last_ok.elapsed() >= STALE_AFTER {
                    tracing::info!(member, "member unreachable; its sessions count as offline");
                    cluster.presence().forget_member(member);
                    holding = false;
                }
                version = u64::MAX;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

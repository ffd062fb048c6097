//! Presence between members: each member long-polls every other member's live sessions
//! (`WatchPresence`) and merges them into its own `Presence`, so a node streaming from
//! member 2 shows online, with endpoints and home DERP, in netmaps served by members 1
//! and 3 — within one round trip of the change, and without touching the Raft log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cluster::Cluster;
use super::network::timed_out;
use crate::presence::NodePresence;
use crate::proto::raft::{PresenceSnapshot, WatchPresenceRequest};
use crate::registry::NodeId;

/// How long one long poll may wait on the remote side.
const POLL_WAIT: Duration = Duration::from_secs(10);
/// How long the caller waits for a long poll's answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(12);
/// A member that has refused or dropped calls for this long is taken to hold no sessions.
const STALE_AFTER: Duration = Duration::from_secs(3);
/// A member whose polls only time out is alive but busy (a dead or cut-off one refuses
/// connections, or fails HTTP/2 keep-alive, well before this). Taking its sessions offline
/// would send every client a delta for each of them, and another when they come back,
/// which makes every member busier still; so it gets longer.
const STALE_WHEN_SLOW: Duration = Duration::from_secs(30);
/// How often the set of members to watch is refreshed.
const MEMBERSHIP_REFRESH: Duration = Duration::from_secs(1);

/// Why a poll got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoAnswer {
    /// The call timed out: the member may just be busy.
    Slow,
    /// The call was refused, reset or could not be made: the member may have died.
    Refused,
}

impl NoAnswer {
    fn of(status: &tonic::Status) -> NoAnswer {
        if timed_out(status) {
            NoAnswer::Slow
        } else {
            NoAnswer::Refused
        }
    }

    /// Whether a member silent for `silent`, its last poll failing this way, counts as
    /// holding no sessions.
    fn is_stale(self, silent: Duration) -> bool {
        match self {
            NoAnswer::Slow => silent >= STALE_WHEN_SLOW,
            NoAnswer::Refused => silent >= STALE_AFTER,
        }
    }
}

/// Presence polls that got no answer, by reason (exported as a metric).
#[derive(Debug, Default)]
pub struct PollFailures {
    slow: AtomicU64,
    refused: AtomicU64,
}

impl PollFailures {
    fn count(&self, why: NoAnswer) {
        let counter = match why {
            NoAnswer::Slow => &self.slow,
            NoAnswer::Refused => &self.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (timed out, refused) since this member started.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.slow.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

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
        let reply = tokio::select! {
            () = stop.cancelled() => return,
            reply = poll(&cluster, member, &addr, version) => reply,
        };
        let why = match reply {
            Ok(snapshot) => {
                version = snapshot.version;
                last_ok = tokio::time::Instant::now();
                backoff = Duration::from_millis(100);
                holding = true;
                apply(&cluster, member, snapshot);
                continue;
            }
            Err(why) => why,
        };
        cluster.inner.presence_poll_failures.count(why);
        let silent = last_ok.elapsed();
        if holding && why.is_stale(silent) {
            tracing::info!(
                member,
                ?why,
                ?silent,
                "member unreachable; its sessions count as offline"
            );
            cluster.presence().forget_member(member);
            holding = false;
        }
        if why == NoAnswer::Slow {
            // Ask again from the same version: the answer that timed out is not lost, the
            // member keeps its changes for the next poll.
            continue;
        }
        version = u64::MAX;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One long poll of `member` for the changes after `version`.
async fn poll(
    cluster: &Cluster,
    member: u64,
    addr: &str,
    version: u64,
) -> Result<PresenceSnapshot, NoAnswer> {
    let mut client = cluster
        .peers()
        .client(addr)
        .map_err(|_| NoAnswer::Refused)?;
    let mut req = tonic::Request::new(WatchPresenceRequest {
        after_version: version,
        wait_ms: POLL_WAIT.as_millis() as u64,
        deltas: true,
    });
    req.set_timeout(POLL_TIMEOUT);
    match client.watch_presence(req).await {
        Ok(reply) if reply.get_ref().member == member => Ok(reply.into_inner()),
        // Another member answers at that address (membership is changing).
        Ok(_) => Err(NoAnswer::Refused),
        Err(status) => {
            let why = NoAnswer::of(&status);
            if why == NoAnswer::Refused {
                cluster.leader_seems_gone(member);
            }
            Err(why)
        }
    }
}

/// Merges `member`'s table or delta into this member's presence.
fn apply(cluster: &Cluster, member: u64, snapshot: PresenceSnapshot) {
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
    cluster
        .presence()
        .apply_remote(member, snapshot.delta, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_member_is_given_longer_than_a_refusing_one() {
        let just_past = STALE_AFTER + Duration::from_millis(1);
        assert!(NoAnswer::Refused.is_stale(just_past));
        assert!(!NoAnswer::Slow.is_stale(just_past));
        assert!(!NoAnswer::Slow.is_stale(POLL_TIMEOUT * 2));
        assert!(NoAnswer::Slow.is_stale(STALE_WHEN_SLOW));
    }

    #[test]
    fn timeouts_are_slow_and_other_failures_refusals() {
        let slow = [
            tonic::Status::cancelled("Timeout expired"),
            tonic::Status::deadline_exceeded(""),
        ];
        for status in slow {
            assert_eq!(NoAnswer::of(&status), NoAnswer::Slow, "{status:?}");
        }
        let refused = [
            tonic::Status::unavailable("tcp connect error"),
            tonic::Status::unknown("reset"),
        ];
        for status in refused {
            assert_eq!(NoAnswer::of(&status), NoAnswer::Refused, "{status:?}");
        }
    }
}

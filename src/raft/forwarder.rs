//! Forward batching: the writes a member takes while another member leads go to the leader
//! together — one member-to-member call for all the writes queued meanwhile, as the
//! leader's own batcher puts them in one log entry. A write whose batch fails is retried
//! on its own by the caller (its id keeps it exactly once).

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batcher::next_batch;
use super::forward::FORWARD_TIMEOUT;
use super::network::{Peers, decode, encode};
use super::status::member_addr;
use super::{LeaderOp, LeaderReply, RaftMetrics};
use crate::registry::{Outcome, Proposal};

/// Batches in flight to the leader at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// Most writes in one call.
const MAX_BATCH: usize = 512;
/// Writes waiting to be forwarded; senders wait when it is full.
const QUEUE: usize = 4096;

/// The outcome and log index of a forwarded write; `None` if the batch did not get it
/// applied (no leader, the leader changed, the call failed).
pub type Forwarded = Option<(Outcome, u64)>;

struct Queued {
    proposal: Proposal,
    reply: oneshot::Sender<Forwarded>,
}

#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Queued>,
}

impl Forwarder {
    pub fn start(
        me: u64,
        metrics: watch::Receiver<RaftMetrics>,
        peers: Peers,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn(run(me, metrics, peers, rx, stop, tasks.clone()));
        Forwarder { tx }
    }

    /// Sends one write to the leader with whatever else is queued.
    pub async fn submit(&self, proposal: Proposal) -> Forwarded {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Queued { proposal, reply }).await.ok()?;
        rx.await.ok().flatten()
    }
}

async fn run(
    me: u64,
    metrics: watch::Receiver<RaftMetrics>,
    peers: Peers,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some((permit, batch)) = next_batch(&mut rx, &in_flight, MAX_BATCH, &stop).await {
        let leader = {
            let m = metrics.borrow();
            m.current_leader
                .filter(|l| *l != me)
                .and_then(|l| member_addr(&m, l))
        };
        let peers = peers.clone();
        tasks.spawn(async move {
            let results = match leader {
                Some(addr) => send(&peers, &addr, &batch).await,
                None => None,
            };
            let mut results = results.unwrap_or_default().into_iter();
            for q in batch {
                let _ = q.reply.send(results.next().flatten());
            }
            drop(permit);
        });
    }
}

/// One call to the leader for the whole batch.
async fn send(peers: &Peers, addr: &str, batch: &[Queued]) -> Option<Vec<Forwarded>> {
    let proposals = batch.iter().map(|q| q.proposal.clone()).collect();
    let mut client = peers.client(addr).ok()?;
    let mut req = tonic::Request::new(encode(&LeaderOp::ProposeMany(proposals)));
    req.set_timeout(FORWARD_TIMEOUT);
    let reply = client.forward(req).await.ok()?;
    match decode(addr, reply.get_ref()).ok()? {
        LeaderReply::AppliedMany(results) if results.len() == batch.len() => Some(results),
        _ => None,
    }
}

//! Group commit on the leader: proposals that arrive while earlier entries are being
//! written go out together as one log entry (one fsync on each member instead of one per
//! write), stamped with the leader's clock.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MemberInfo, Raft};
use crate::registry::{Outcome, Proposal, Registry, Request, Timestamp};

/// Entries being written at once. More lets proposals queue into bigger batches behind
/// them; fewer keeps latency low at light load.
const ENTRIES_IN_FLIGHT: usize = 4;
/// Most proposals in one entry.
const MAX_BATCH_PROPOSALS: usize = 512;
/// Proposals waiting for the batcher; senders wait when it is full.
const QUEUE: usize = 4096;

/// Why a batched write did not produce an outcome.
#[derive(Debug, Clone)]
pub enum WriteFailure {
    /// This member does not lead (any more); the proposer retries at the leader.
    NotLeader(Option<u64>),
    /// Raft stopped or refused the entry.
    Failed(String),
}

/// A proposal's outcome and the log index it was applied at.
pub type Written = Result<(Outcome, u64), WriteFailure>;

struct Queued {
    proposal: Proposal,
    reply: oneshot::Sender<Written>,
}

/// The handle proposals are submitted through (on the leader).
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Queued>,
}

impl Batcher {
    /// Starts the batching task; it ends when `stop` is cancelled.
    pub fn start(
        raft: Raft,
        view: watch::Receiver<Arc<Registry>>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Batcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn(run(raft, view, rx, stop, tasks.clone()));
        Batcher { tx }
    }

    /// Writes one proposal as part of the next entry and waits for its outcome.
    pub async fn submit(&self, proposal: Proposal) -> Written {
        let (reply, rx) = oneshot::channel();
        let stopped = || WriteFailure::Failed("this member is shutting down".into());
        self.tx
            .send(Queued { proposal, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(
    raft: Raft,
    view: watch::Receiver<Arc<Registry>>,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let in_flight = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT));
    let mut clock = Timestamp::default();
    while let Some((permit, batch)) =
        next_batch(&mut rx, &in_flight, MAX_BATCH_PROPOSALS, &stop).await
    {
        // The leader's clock, never behind what it (or an earlier leader) stamped.
        clock = Timestamp::now().max(clock).max(view.borrow().clock());
        let raft = raft.clone();
        tasks.spawn(async move {
            write_entry(&raft, clock, batch).await;
            drop(permit);
        });
    }
}

/// The next batch from `rx`, once one of `in_flight`'s permits is free: the first item
/// waited for, then whatever queued meanwhile (at most `max`). Waiting for room before
/// draining lets items that arrive meanwhile join the batch. `None` once `stop` fires or
/// every sender is gone.
pub(super) async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    in_flight: &Arc<Semaphore>,
    max: usize,
    stop: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    let first = tokio::select! {
        () = stop.cancelled() => return None,
        next = rx.recv() => next?,
    };
    let permit = in_flight.clone().acquire_owned().await.ok()?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some((permit, batch))
}

async fn write_entry(raft: &Raft, at: Timestamp, batch: Vec<Queued>) {
    let (proposals, replies): (Vec<Proposal>, Vec<_>) =
        batch.into_iter().map(|q| (q.proposal, q.reply)).unzip();
    let count = proposals.len();
    let proposals = proposals.into();
    match raft.client_write(Request { at, proposals }).await {
        Ok(resp) => {
            let index = resp.log_id.index;
            let mut outcomes = resp.data.into_iter();
            for reply in replies {
                let outcome = outcomes
                    .next()
                    .expect("the state machine answers every proposal of an entry");
                let _ = reply.send(Ok((outcome, index)));
            }
            if count > 1 {
                tracing::trace!(count, index, "wrote a batch of proposals");
            }
        }
        Err(error) => {
            let failure = failure(error);
            for reply in replies {
                let _ = reply.send(Err(failure.clone()));
            }
        }
    }
}

fn failure(e: RaftError<u64, ClientWriteError<u64, MemberInfo>>) -> WriteFailure {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            WriteFailure::NotLeader(f.leader_id)
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            WriteFailure::Failed(e.to_string())
        }
        RaftError::Fatal(e) => WriteFailure::Failed(format!("raft stopped: {e}")),
    }
}

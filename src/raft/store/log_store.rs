//! The Raft log and vote (`RaftLogStorage`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, RaftLogReader, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{
    CF_LOGS, CF_META, DbError, KEY_LAST_PURGED, KEY_VOTE, StorageError, Store, index_key, json,
};
use crate::raft::TypeConfig;

/// Entries kept in memory after they are written: replication to followers and applying
/// read the recent log, and serving it from memory saves a read and a decode each. A
/// follower in step is a few entries behind; one further back (restarting) reads rocksdb.
/// Each entry costs about 600 bytes on every member, and a burst of registrations is about
/// one entry each: with 1,024 kept, 1,000 clients joining cost the members about 1.5 KiB
/// more per client than with 256.
const CACHED_ENTRIES: usize = 256;

/// The tail of the log, contiguous: `entries[0]` has index `first`.
#[derive(Default)]
struct Tail {
    first: u64,
    entries: std::collections::VecDeque<Entry<TypeConfig>>,
}

impl Tail {
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn push(&mut self, new: Vec<Entry<TypeConfig>>) {
        let Some(start) = new.first().map(|e| e.log_id.index) else {
            return;
        };
        if self.entries.is_empty() || start != self.end() {
            self.entries.clear();
            self.first = start;
        }
        self.entries.extend(new);
        while self.entries.len() > CACHED_ENTRIES {
            self.entries.pop_front();
            self.first += 1;
        }
    }

    /// Entries `start..end` if all of them are here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        if start < self.first || end > self.end() || start > end {
            return None;
        }
        let (from, to) = ((start - self.first) as usize, (end - self.first) as usize);
        Some(self.entries.range(from..to).cloned().collect())
    }

    /// Forgets entries from `index` on (a truncated log).
    fn truncate(&mut self, index: u64) {
        if index <= self.first {
            self.entries.clear();
        } else {
            self.entries.truncate((index - self.first) as usize);
        }
    }

    /// Forgets entries up to `index` (a purged log).
    fn purge(&mut self, index: u64) {
        while self.first <= index && !self.entries.is_empty() {
            self.entries.pop_front();
            self.first += 1;
        }
    }
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    tail: std::sync::Arc<std::sync::Mutex<Tail>>,
}

impl LogStore {
    pub(super) fn new(store: Store) -> Self {
        LogStore {
            store,
            tail: Default::default(),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        // Each update is one whole push, truncate or purge: no half-done state to fear.
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_entries(
    store: &Store,
    start: u64,
    end: Bound<u64>,
) -> Result<Vec<Entry<TypeConfig>>, DbError> {
    let mut out = Vec::new();
    let from = index_key(start);
    let iter = store.db.iterator_cf(
        store.cf(CF_LOGS),
        IteratorMode::From(&from, Direction::Forward),
    );
    for item in iter {
        let (k, v) = item?;
        let index = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
        let inside = match end {
            Bound::Included(e) => index <= e,
            Bound::Excluded(e) => index < e,
            Bound::Unbounded => true,
        };
        if !inside {
            break;
        }
        let entry = serde_json::from_slice(&v).map_err(|source| DbError::Decode {
            key: format!("log entry {index}"),
            source,
        })?;
        out.push(entry);
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = range.end_bound().cloned();
        let end_exclusive = match end {
            Bound::Included(e) => e.checked_add(1),
            Bound::Excluded(e) => Some(e),
            Bound::Unbounded => None,
        };
        if let Some(cached) = end_exclusive.and_then(|e| self.tail().get(start, e)) {
            return Ok(cached);
        }
        self.store
            .run(move |s| read_entries(s, start, end))
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<openraft::LogState<TypeConfig>, StorageError> {
        self.store
            .run(|s| {
                let last_purged: Option<LogId<u64>> = s.get_json(CF_META, KEY_LAST_PURGED)?;
                let last = match s.db.iterator_cf(s.cf(CF_LOGS), IteratorMode::End).next() {
                    None => last_purged,
                    Some(item) => {
                        let (_, v) = item?;
                        let entry: Entry<TypeConfig> =
                            serde_json::from_slice(&v).map_err(|source| DbError::Decode {
                                key: "last log entry".into(),
                                source,
                            })?;
                        Some(entry.log_id)
                    }
                };
                Ok(LogState {
                    last_purged_log_id: last_purged,
                    last_log_id: last,
                })
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let value = json(vote);
        self.store
            .run(move |s| {
                let mut batch = WriteBatch::default();
                batch.put_cf(s.cf(CF_META), KEY_VOTE, value);
                s.write(batch, true)
            })
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.store
            .run(|s| s.get_json(CF_META, KEY_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, _committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        // Not stored: the state machine persists what it applied, and a restarted member
        // learns the commit point from the leader. (Storing it cost a write per commit.)
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        Ok(None)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let encoded: Vec<([u8; 8], Vec<u8>)> = entries
            .iter()
            .map(|e| (index_key(e.log_id.index), json(e)))
            .collect();
        // Synced before the callback: an acknowledged entry survives a crash.
        let result = self
            .store
            .run(move |s| {
                let cf = s.cf(CF_LOGS);
                let mut batch = WriteBatch::default();
                for (key, value) in encoded {
                    batch.put_cf(cf, key, value);
                }
                s.write(batch, true)
            })
            .await;
        if result.is_ok() {
            self.tail().push(entries);
        }
        let io = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io);
        result.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        self.tail().truncate(log_id.index);
        self.store
            .run(move |s| {
                let cf = s.cf(CF_LOGS);
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(cf, index_key(log_id.index), index_key(u64::MAX));
                batch.delete_cf(cf, index_key(u64::MAX));
                s.write(batch, true)
            })
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        self.tail().purge(log_id.index);
        self.store
            .run(move |s| {
                let mut batch = WriteBatch::default();
                batch.put_cf(s.cf(CF_META), KEY_LAST_PURGED, json(&log_id));
                batch.delete_range_cf(s.cf(CF_LOGS), index_key(0), index_key(log_id.index + 1));
                s.write(batch, true)
            })
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        tracing::debug!(upto = log_id.index, "purged the log");
        Ok(())
    }
}

//! Durable Raft storage on one rocksdb database (`<data_dir>/raft`) with three column
//! families: `logs` (entries by big-endian index), `meta` (vote, purge point, applied
//! state, current snapshot) and `sm` (the registry's records).
//!
//! The state machine writes a batch's records, its last-applied log id and membership in
//! one synced `WriteBatch`, so a crash never leaves records and last-applied disagreeing.
//! The registry itself is kept in memory and published as an immutable view after each
//! batch.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{AppliedBatch, MemberInfo, TypeConfig};
use crate::registry::{Outcome, Registry, RegistrySettings};

pub type StorageError = openraft::StorageError<u64>;
type Membership = StoredMembership<u64, MemberInfo>;
/// Raw (key, value) pairs of one column family.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_APPLIED: &[u8] = b"sm_applied";
const KEY_MEMBERSHIP: &[u8] = b"sm_membership";
const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// Opening the store failed: the data dir is unusable or holds damaged data.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening rocksdb at {path}")]
    Open {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("reading stored registry state")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Opens (or creates) the database and loads the applied registry.
pub fn open(
    dir: &Path,
    settings: RegistrySettings,
    view_tx: watch::Sender<Arc<Registry>>,
    batches: broadcast::Sender<Arc<AppliedBatch>>,
) -> Result<(LogStore, StateMachine), OpenError> {
    let path = dir.join("raft");
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs =
        [CF_LOGS, CF_META, CF_SM].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|source| OpenError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let db = Arc::new(db);
    let store = Store { db };

    let load = |e: Box<dyn std::error::Error + Send + Sync>| OpenError::Load(e);
    let last_applied: Option<LogId<u64>> = store
        .get_json(CF_META, KEY_APPLIED)
        .map_err(|e| load(Box::new(e)))?;
    let membership: Membership = store
        .get_json(CF_META, KEY_MEMBERSHIP)
        .map_err(|e| load(Box::new(e)))?
        .unwrap_or_default();
    let records = store.scan(CF_SM).map_err(|e| load(Box::new(e)))?;
    let registry =
        Registry::from_records(settings.clone(), records).map_err(|e| load(Box::new(e)))?;
    view_tx.send_replace(Arc::new(registry.clone()));

    let sm = StateMachine {
        store: store.clone(),
        settings,
        registry,
        last_applied,
        membership,
        view_tx,
        batches,
        snapshot_seq: 0,
    };
    Ok((LogStore { store }, sm))
}

/// Shared access to the database with JSON helpers.
#[derive(Clone)]
struct Store {
    db: Arc<DB>,
}

#[derive(Debug, thiserror::Error)]
enum DbError {
    #[error(transparent)]
    Rocks(#[from] rocksdb::Error),
    #[error("decoding stored value {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Store {
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created on open")
    }

    fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        cf: &str,
        key: &[u8],
    ) -> Result<Option<T>, DbError> {
        match self.db.get_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| DbError::Decode {
                        key: String::from_utf8_lossy(key).into_owned(),
                        source,
                    })
            }
        }
    }

    fn scan(&self, cf: &str) -> Result<Records, DbError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft types always serialize")
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    // openraft's error type is large by design; this mirrors its trait signatures.
    #[allow(clippy::result_large_err)]
    fn last_purged(&self) -> Result<Option<LogId<u64>>, StorageError> {
        self.store
            .get_json(CF_META, KEY_LAST_PURGED)
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
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
        let cf = self.store.cf(CF_LOGS);
        let mut out = Vec::new();
        let from = index_key(start);
        for item in self
            .store
            .db
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> = serde_json::from_slice(&v)
                .map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged = self.last_purged()?;
        let cf = self.store.cf(CF_LOGS);
        let last = match self.store.db.iterator_cf(cf, IteratorMode::End).next() {
            None => last_purged,
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(CF_META), KEY_VOTE, json(vote));
        self.store
            .write_synced(batch)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.store
            .get_json(CF_META, KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-deriving the commit point from the leader.
        self.store
            .db
            .put_cf(self.store.cf(CF_META), KEY_COMMITTED, json(&committed))
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        Ok(self
            .store
            .get_json::<Option<LogId<u64>>>(CF_META, KEY_COMMITTED)
            .map_err(|e| StorageIOError::read(&e))?
            .flatten())
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
        let cf = self.store.cf(CF_LOGS);
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, index_key(entry.log_id.index), json(&entry));
        }
        // Synced before the callback: an acknowledged entry survives kill -9.
        let result = self.store.write_synced(batch);
        let io = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io);
        result.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.store.cf(CF_LOGS),
            index_key(log_id.index),
            index_key(u64::MAX),
        );
        batch.delete_cf(self.store.cf(CF_LOGS), index_key(u64::MAX));
        self.store
            .write_synced(batch)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(CF_META), KEY_LAST_PURGED, json(&log_id));
        batch.delete_range_cf(
            self.store.cf(CF_LOGS),
            index_key(0),
            index_key(log_id.index + 1),
        );
        self.store
            .write_synced(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        tracing::debug!(upto = log_id.index, "purged the log");
        Ok(())
    }
}

/// The registry state machine.
pub struct StateMachine {
    store: Store,
    settings: RegistrySettings,
    registry: Registry,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    view_tx: watch::Sender<Arc<Registry>>,
    batches: broadcast::Sender<Arc<AppliedBatch>>,
    snapshot_seq: u64,
}

/// The snapshot format: the registry's records plus where they stand in the log.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    /// (key, value) pairs as written by `Registry::encode_record`; both are UTF-8.
    records: Vec<(String, String)>,
}

impl StateMachine {
    fn publish(&self, changes: Vec<crate::registry::Change>, full_resync: bool) {
        let view = Arc::new(self.registry.clone());
        self.view_tx.send_replace(view.clone());
        let batch = AppliedBatch {
            last_applied: self.last_applied.map(|l| l.index).unwrap_or(0),
            changes,
            view,
            full_resync,
        };
        // No receivers is fine: nobody is streaming maps yet.
        let _ = self.batches.send(Arc::new(batch));
    }

    fn store_snapshot(
        &self,
        meta: &SnapshotMeta<u64, MemberInfo>,
        data: &[u8],
        batch: &mut WriteBatch,
    ) {
        batch.put_cf(self.store.cf(CF_META), KEY_SNAPSHOT_META, json(meta));
        batch.put_cf(self.store.cf(CF_META), KEY_SNAPSHOT_DATA, data);
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut changes = Vec::new();
        let mut touched = std::collections::BTreeSet::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Outcome::Done),
                EntryPayload::Normal(request) => {
                    let applied = self.registry.apply(&request);
                    changes.extend(applied.changes);
                    touched.extend(applied.records);
                    replies.push(applied.outcome);
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    replies.push(Outcome::Done);
                }
            }
        }
        let mut batch = WriteBatch::default();
        let sm = self.store.cf(CF_SM);
        for record in &touched {
            match self.registry.encode_record(record) {
                (key, Some(value)) => batch.put_cf(sm, key, value),
                (key, None) => batch.delete_cf(sm, key),
            }
        }
        batch.put_cf(
            self.store.cf(CF_META),
            KEY_APPLIED,
            json(&self.last_applied),
        );
        batch.put_cf(
            self.store.cf(CF_META),
            KEY_MEMBERSHIP,
            json(&self.membership),
        );
        self.store
            .write_synced(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.publish(changes, false);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            store: self.store.clone(),
            registry: self.registry.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, MemberInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let sig = Some(meta.signature());
        let file: SnapshotFile = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let records: Vec<(Vec<u8>, Vec<u8>)> = file
            .records
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
            .collect();
        let registry = Registry::from_records(self.settings.clone(), records.clone())
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;

        let mut batch = WriteBatch::default();
        let sm = self.store.cf(CF_SM);
        for (key, _) in self
            .store
            .scan(CF_SM)
            .map_err(|e| StorageIOError::read_state_machine(&e))?
        {
            batch.delete_cf(sm, key);
        }
        for (key, value) in &records {
            batch.put_cf(sm, key, value);
        }
        batch.put_cf(self.store.cf(CF_META), KEY_APPLIED, json(&meta.last_log_id));
        batch.put_cf(
            self.store.cf(CF_META),
            KEY_MEMBERSHIP,
            json(&meta.last_membership),
        );
        self.store_snapshot(meta, &data, &mut batch);
        self.store
            .write_synced(batch)
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;

        self.registry = registry;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.publish(Vec::new(), true);
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta: Option<SnapshotMeta<u64, MemberInfo>> = self
            .store
            .get_json(CF_META, KEY_SNAPSHOT_META)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(meta) = meta else { return Ok(None) };
        let data = self
            .store
            .db
            .get_cf(self.store.cf(CF_META), KEY_SNAPSHOT_DATA)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
            .unwrap_or_default();
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds a snapshot from a copy of the registry taken at a consistent applied point.
pub struct SnapshotBuilder {
    store: Store,
    registry: Registry,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let records = self
            .registry
            .all_records()
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect();
        let file = SnapshotFile {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            records,
        };
        let data = json(&file);
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(CF_META), KEY_SNAPSHOT_META, json(&meta));
        batch.put_cf(self.store.cf(CF_META), KEY_SNAPSHOT_DATA, &data);
        self.store
            .write_synced(batch)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::debug!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests;

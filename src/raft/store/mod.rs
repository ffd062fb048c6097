//! Durable Raft storage on one rocksdb database (`<data_dir>/raft`) with three column
//! families: `logs` (entries by big-endian index), `meta` (vote, purge point, applied
//! state, current snapshot) and `sm` (the registry's records).
//!
//! Every rocksdb call runs on tokio's blocking pool (`Store::run`), never on the async
//! workers that also serve map streams and DERP.
//!
//! Durability: log appends, votes and snapshots are synced before they are acknowledged.
//! The state machine writes a batch's records, its last-applied log id and membership in
//! one `WriteBatch` without its own fsync: all column families share one write-ahead log,
//! so the next synced write (the next append, vote or snapshot) makes it durable, and until
//! then the synced log still holds every entry it applied, which a restart re-applies. A
//! kill -9 loses nothing either way: the WAL write reached the kernel before apply returned.

mod log_store;
mod state_machine;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::{LogId, StoredMembership};
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{AppliedBatch, MemberInfo};
use crate::registry::{Record, Registry};

pub use log_store::LogStore;
pub use state_machine::{StateMachine, check_snapshot};

/// The memory the database holds: figures for gauges, and giving memtables back once
/// writes pause.
#[derive(Clone)]
pub struct StoreMemory(Store);

/// What one `flush_quiet` call saw, for the next call to compare.
#[derive(Default)]
pub struct QuietCheck {
    /// The store's written bytes at the previous call.
    written: u64,
    /// The store's written bytes when the memtables were last flushed.
    flushed_at: u64,
}

impl StoreMemory {
    /// Bytes held by each column family's memtables (active, immutable and pinned).
    pub fn memtable_bytes(&self) -> Vec<(&'static str, u64)> {
        ALL_CFS
            .into_iter()
            .map(|name| (name, self.int_property(name, "rocksdb.size-all-mem-tables")))
            .collect()
    }

    /// Flushes the memtables once the store took no write since the previous call, if at
    /// least `QUIET_FLUSH_MIN_BYTES` were written since the last such flush; returns the
    /// column families flushed. A memtable otherwise keeps every write since its last flush
    /// resident until it fills (8 MiB per column family), which after a burst of joins is
    /// memory nobody reads: the registry lives in memory, the log tail too. (The memtables'
    /// own sizes cannot tell: they grow in whole arena blocks.) Blocking: call it on a
    /// blocking thread.
    pub fn flush_quiet(&self, check: &mut QuietCheck) -> Result<Vec<&'static str>, rocksdb::Error> {
        let written = self.0.written.load(Ordering::Relaxed);
        let quiet = written == check.written;
        check.written = written;
        if !quiet || written - check.flushed_at < QUIET_FLUSH_MIN_BYTES {
            return Ok(Vec::new());
        }
        check.flushed_at = written;
        let mut flushed = Vec::new();
        for name in ALL_CFS {
            if self.int_property(name, "rocksdb.num-entries-active-mem-table") > 0 {
                self.0.db.flush_cf(self.0.cf(name))?;
                flushed.push(name);
            }
        }
        Ok(flushed)
    }

    fn int_property(&self, cf: &str, property: &str) -> u64 {
        let store = &self.0;
        store
            .db
            .property_int_value_cf(store.cf(cf), property)
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

pub type StorageError = openraft::StorageError<u64>;
type Membership = StoredMembership<u64, MemberInfo>;
/// Raw (key, value) pairs of one column family.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";
const ALL_CFS: [&str; 3] = [CF_LOGS, CF_META, CF_SM];

/// Memory all memtables may use together before rocksdb flushes them.
const MEMTABLE_BUDGET_BYTES: usize = 32 << 20;
/// Fewer bytes written since the last flush are not worth level-0 files of their own.
const QUIET_FLUSH_MIN_BYTES: u64 = 256 << 10;
/// Memtable memory comes in blocks of this size, allocated with the C allocator; `hsd`
/// makes glibc map blocks this large on their own, so a flushed memtable's memory leaves
/// the process.
pub const MEMTABLE_BLOCK_BYTES: usize = 1 << 20;
/// Level-0 files of registry records that trigger a compaction (rocksdb's default is 4).
const SM_L0_FILES_PER_COMPACTION: i32 = 16;

const KEY_VOTE: &[u8] = b"vote";
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

/// Opens (or creates) the database and loads the applied registry. Blocking: call it from
/// a blocking thread.
pub fn open(
    dir: &Path,
    view_tx: watch::Sender<Arc<Registry>>,
    applied_tx: watch::Sender<u64>,
    batches: broadcast::Sender<Arc<AppliedBatch>>,
) -> Result<(LogStore, StateMachine, StoreMemory), OpenError> {
    let path = dir.join("raft");
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // The registry lives in memory; rocksdb only needs to absorb writes between flushes.
    // Its default (64 MiB memtables per column family) would cost more than the registry.
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    let cf_options = |name: &str| {
        let mut cf = Options::default();
        cf.set_write_buffer_size(MEMTABLE_BUDGET_BYTES / 4);
        cf.set_arena_block_size(MEMTABLE_BLOCK_BYTES);
        if name == CF_SM {
            // The registry's records: every memtable flushed into level 0 overlaps all of
            // the records below it, so each compaction rewrites the whole registry. Let more
            // level-0 files gather first (they are only read when a member starts).
            cf.set_level_zero_file_num_compaction_trigger(SM_L0_FILES_PER_COMPACTION);
            cf.set_level_zero_slowdown_writes_trigger(SM_L0_FILES_PER_COMPACTION * 3);
            cf.set_level_zero_stop_writes_trigger(SM_L0_FILES_PER_COMPACTION * 4);
        }
        cf
    };
    let cfs = ALL_CFS.map(|name| ColumnFamilyDescriptor::new(name, cf_options(name)));
    let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|source| OpenError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let store = Store {
        db: Arc::new(db),
        data_dir: dir.to_path_buf(),
        snapshot_lock: Arc::default(),
        written: Arc::default(),
    };

    let load = |e: DbError| OpenError::Load(Box::new(e));
    let last_applied: Option<LogId<u64>> = store.get_json(CF_META, KEY_APPLIED).map_err(load)?;
    let membership: Membership = store
        .get_json(CF_META, KEY_MEMBERSHIP)
        .map_err(load)?
        .unwrap_or_default();
    let records = store.scan(CF_SM).map_err(load)?;
    let registry = Registry::from_records(records).map_err(|e| OpenError::Load(Box::new(e)))?;
    store.rewrite_settings(&registry).map_err(load)?;
    view_tx.send_replace(Arc::new(registry.clone()));
    applied_tx.send_replace(last_applied.map(|l| l.index).unwrap_or(0));

    let sm = StateMachine::new(
        store.clone(),
        registry,
        last_applied,
        membership,
        view_tx,
        applied_tx,
        batches,
    );
    Ok((LogStore::new(store.clone()), sm, StoreMemory(store)))
}

/// Shared access to the database with JSON helpers.
#[derive(Clone)]
struct Store {
    db: Arc<DB>,
    data_dir: PathBuf,
    /// Held while the current snapshot is compared and replaced, so a build that finishes
    /// late never overwrites a newer snapshot installed meanwhile.
    snapshot_lock: Arc<Mutex<()>>,
    /// Bytes of write batches written so far (what the memtables took), for `flush_quiet`.
    written: Arc<AtomicU64>,
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
    #[error("storage task failed: {0}")]
    Task(String),
    #[cfg(feature = "fault-injection")]
    #[error("injected storage failure ({0} exists)")]
    Injected(String),
}

impl Store {
    /// Runs blocking storage work off the async workers.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .unwrap_or_else(|e| Err(DbError::Task(e.to_string())))
    }

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

    /// Writes the records whose layout changed between versions (the counters, policy and
    /// DNS settings; see `Registry::snapshot_records`) in this version's layout, so a store
    /// written by an earlier version never mixes the two. Unsynced, like an applied batch.
    fn rewrite_settings(&self, registry: &Registry) -> Result<(), DbError> {
        let mut batch = WriteBatch::default();
        for record in [Record::Meta, Record::Policy, Record::Dns] {
            match registry.encode_record(&record) {
                (key, Some(value)) => batch.put_cf(self.cf(CF_SM), key, value),
                (key, None) => batch.delete_cf(self.cf(CF_SM), key),
            }
        }
        self.write(batch, false)
    }

    /// Writes a batch; `sync` waits for the fsync.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), DbError> {
        self.check_injected_failure()?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        let bytes = batch.size_in_bytes() as u64;
        self.db.write_opt(batch, &wo)?;
        self.written.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Test builds only: a file `FAIL_STORAGE` in the data dir makes every write fail, as a
    /// dying disk would.
    #[cfg(feature = "fault-injection")]
    fn check_injected_failure(&self) -> Result<(), DbError> {
        let marker = self.data_dir.join("FAIL_STORAGE");
        if marker.exists() {
            return Err(DbError::Injected(marker.display().to_string()));
        }
        Ok(())
    }

    #[cfg(not(feature = "fault-injection"))]
    fn check_injected_failure(&self) -> Result<(), DbError> {
        let _ = &self.data_dir;
        Ok(())
    }

    /// Writes `extra` (an install's registry records, or nothing) and, unless a newer
    /// snapshot is already stored, `meta`/`data` as the current snapshot, in one synced
    /// batch. Returns whether the snapshot was stored.
    fn save_snapshot(
        &self,
        meta: &openraft::SnapshotMeta<u64, MemberInfo>,
        data: &[u8],
        mut extra: WriteBatch,
    ) -> Result<bool, DbError> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current: Option<openraft::SnapshotMeta<u64, MemberInfo>> =
            self.get_json(CF_META, KEY_SNAPSHOT_META)?;
        let newer = current.is_none_or(|c| c.last_log_id <= meta.last_log_id);
        if newer {
            extra.put_cf(self.cf(CF_META), KEY_SNAPSHOT_META, json(meta));
            extra.put_cf(self.cf(CF_META), KEY_SNAPSHOT_DATA, data);
        }
        self.write(extra, true)?;
        Ok(newer)
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("raft types always serialize")
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

#[cfg(test)]
mod tests;

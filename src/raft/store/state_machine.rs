//! The registry state machine (`RaftStateMachine`): applies entries into the in-memory
//! `Registry`, persists the records they touched, publishes an immutable view and the
//! changes to map sessions, and builds and installs snapshots.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::{
    CF_META, CF_SM, DbError, KEY_APPLIED, KEY_MEMBERSHIP, KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_META,
    Membership, StorageError, Store, json,
};
use crate::raft::{AppliedBatch, MemberInfo, TypeConfig};
use crate::registry::{Change, Outcome, Registry};

/// The registry state machine.
pub struct StateMachine {
    store: Store,
    registry: Registry,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    view_tx: watch::Sender<Arc<Registry>>,
    /// The last applied index, for writers waiting to read their write here.
    applied_tx: watch::Sender<u64>,
    batches: broadcast::Sender<Arc<AppliedBatch>>,
    snapshot_seq: u64,
}

/// The snapshot format: the registry's records plus where they stand in the log.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    /// (key, value) pairs as listed by `Registry::snapshot_records`; both are UTF-8.
    records: Vec<(String, String)>,
}

impl StateMachine {
    pub(super) fn new(
        store: Store,
        registry: Registry,
        last_applied: Option<LogId<u64>>,
        membership: Membership,
        view_tx: watch::Sender<Arc<Registry>>,
        applied_tx: watch::Sender<u64>,
        batches: broadcast::Sender<Arc<AppliedBatch>>,
    ) -> Self {
        StateMachine {
            store,
            registry,
            last_applied,
            membership,
            view_tx,
            applied_tx,
            batches,
            snapshot_seq: 0,
        }
    }

    /// Publishes the applied state: a new view (O(1): persistent maps) and what changed.
    fn publish(&self, changes: Vec<Change>, full_resync: bool) {
        self.view_tx.send_replace(Arc::new(self.registry.clone()));
        let applied = self.last_applied.map(|l| l.index).unwrap_or(0);
        self.applied_tx.send_replace(applied);
        // The batch carries only what changed: the ring buffer of batches would otherwise
        // keep hundreds of registry versions alive.
        let batch = AppliedBatch {
            last_applied: applied,
            changes,
            full_resync,
        };
        // No receivers is fine: nobody is streaming maps yet.
        let _ = self.batches.send(Arc::new(batch));
    }

    /// The batch persisting `touched` records with the applied position.
    fn applied_batch(
        &self,
        touched: &BTreeSet<crate::registry::Record>,
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        touched
            .iter()
            .map(|record| self.registry.encode_record(record))
            .collect()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, Membership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Outcome>>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut changes = Vec::new();
        let mut touched = BTreeSet::new();
        let mut membership_changed = false;
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Vec::new()),
                EntryPayload::Normal(request) => {
                    let applied = self.registry.apply(&request);
                    changes.extend(applied.changes);
                    touched.extend(applied.records);
                    replies.push(applied.outcomes);
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    membership_changed = true;
                    replies.push(Vec::new());
                }
            }
        }
        let records = self.applied_batch(&touched);
        let applied = json(&self.last_applied);
        // Rewritten only when it changed: every batch would fill the memtable with copies.
        let membership = membership_changed.then(|| json(&self.membership));
        self.store
            .run(move |s| {
                let mut batch = WriteBatch::default();
                let sm = s.cf(CF_SM);
                for (key, value) in records {
                    match value {
                        Some(value) => batch.put_cf(sm, key, value),
                        None => batch.delete_cf(sm, key),
                    }
                }
                batch.put_cf(s.cf(CF_META), KEY_APPLIED, applied);
                if let Some(membership) = membership {
                    batch.put_cf(s.cf(CF_META), KEY_MEMBERSHIP, membership);
                }
                // See the module doc: made durable by the next synced write.
                s.write(batch, false)
            })
            .await
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
        let meta_owned = meta.clone();
        // Decoding and writing a large snapshot stays off the async workers.
        let registry = self
            .store
            .run(move |s| {
                let file: SnapshotFile =
                    serde_json::from_slice(&data).map_err(|source| DbError::Decode {
                        key: "snapshot".into(),
                        source,
                    })?;
                let records = file
                    .records
                    .into_iter()
                    .map(|(k, v)| (k.into_bytes(), v.into_bytes()));
                let registry = Registry::from_records(records)
                    .map_err(|e| DbError::Task(format!("snapshot records: {e}")))?;
                // Stored in this member's layout, which may differ from the snapshot's.
                install_records(s, &meta_owned, &data, registry.all_records())?;
                Ok(registry)
            })
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;

        self.registry = registry;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.publish(Vec::new(), true);
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored = self
            .store
            .run(|s| {
                let meta: Option<SnapshotMeta<u64, MemberInfo>> =
                    s.get_json(CF_META, KEY_SNAPSHOT_META)?;
                let data = s.db.get_cf(s.cf(CF_META), KEY_SNAPSHOT_DATA)?;
                Ok(meta.map(|m| (m, data.unwrap_or_default())))
            })
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Decodes a snapshot as an install would (its file format, then every record), without
/// storing anything. For the fuzz harness and offline checks.
pub fn check_snapshot(data: &[u8]) -> Result<(), String> {
    let file: SnapshotFile = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let records = file
        .records
        .into_iter()
        .map(|(k, v)| (k.into_bytes(), v.into_bytes()));
    Registry::from_records(records)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Replaces the stored registry by a snapshot's records, in one synced batch with the
/// applied position and the snapshot itself.
fn install_records(
    s: &Store,
    meta: &SnapshotMeta<u64, MemberInfo>,
    data: &[u8],
    records: Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), DbError> {
    let mut batch = WriteBatch::default();
    let sm = s.cf(CF_SM);
    for (key, _) in s.scan(CF_SM)? {
        batch.delete_cf(sm, key);
    }
    for (key, value) in &records {
        batch.put_cf(sm, key, value);
    }
    batch.put_cf(s.cf(CF_META), KEY_APPLIED, json(&meta.last_log_id));
    batch.put_cf(s.cf(CF_META), KEY_MEMBERSHIP, json(&meta.last_membership));
    s.save_snapshot(meta, data, batch)?;
    Ok(())
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
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let (registry, meta_owned) = (self.registry.clone(), meta.clone());
        // Encoding a large registry is CPU and disk work: keep it off the async workers.
        let (data, stored) = self
            .store
            .run(move |s| {
                let data = encode_snapshot(&registry, &meta_owned);
                let stored = s.save_snapshot(&meta_owned, &data, WriteBatch::default())?;
                Ok((data, stored))
            })
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        if stored {
            tracing::debug!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        } else {
            tracing::debug!(snapshot = %meta.snapshot_id, "a newer snapshot was installed meanwhile; kept it");
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

fn encode_snapshot(registry: &Registry, meta: &SnapshotMeta<u64, MemberInfo>) -> Vec<u8> {
    let records = registry
        .snapshot_records()
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    json(&SnapshotFile {
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        records,
    })
}

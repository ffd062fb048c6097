use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use tokio::sync::{broadcast, watch};

use super::*;
use crate::raft::TypeConfig;
use crate::registry::{Command, Outcome, Registry, Request, Timestamp};

/// A store opened in `dir`, with the receiving ends of what it publishes.
struct Opened {
    log: LogStore,
    sm: StateMachine,
    memory: StoreMemory,
    view: watch::Receiver<Arc<Registry>>,
    batches: broadcast::Receiver<Arc<AppliedBatch>>,
}

fn open_in(dir: &Path) -> Opened {
    let (view_tx, view) = watch::channel(Arc::new(Registry::default()));
    let (batches_tx, batches) = broadcast::channel(16);
    let (log, sm, memory) =
        open(dir, view_tx, watch::channel(0).0, batches_tx).expect("open store");
    Opened {
        log,
        sm,
        memory,
        view,
        batches,
    }
}

struct Builder;

impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir>
    for Builder
{
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let Opened { log, sm, .. } = open_in(dir.path());
        Ok((dir, log, sm))
    }
}

/// openraft's own storage conformance suite.
#[test]
fn openraft_storage_suite() {
    openraft::testing::Suite::test_all(Builder).expect("storage suite");
}

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::single(Timestamp(1_700_000_000_000), command)),
    }
}

/// Applied records and last-applied survive reopening the database.
#[tokio::test]
async fn applied_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sm = open_in(dir.path()).sm;
        let out = sm
            .apply(vec![
                entry(1, Command::create_user("alice")),
                entry(2, Command::create_user("bob")),
            ])
            .await
            .unwrap();
        assert!(matches!(out[0][0], Outcome::User(_)));
    }
    let Opened { mut sm, view, .. } = open_in(dir.path());
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
    let view = view.borrow().clone();
    assert!(view.user_by_name("alice").is_some() && view.user_by_name("bob").is_some());
}

/// A snapshot built on one store installs on another and yields the same registry.
#[tokio::test]
async fn snapshot_round_trip() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut sm1 = open_in(d1.path()).sm;
    sm1.apply(vec![entry(1, Command::create_user("carol"))])
        .await
        .unwrap();
    let snap = sm1
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();

    let Opened {
        sm: mut sm2,
        view: view_rx,
        batches: mut batch_rx,
        ..
    } = open_in(d2.path());
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert!(view_rx.borrow().user_by_name("carol").is_some());
    assert!(batch_rx.try_recv().unwrap().full_resync);
    let current = sm2
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("snapshot stored");
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(1));
}

/// A store written before the policy had a record of its own keeps it inside `meta`. Opening
/// rewrites that in this version's layout, so the counters rewritten by the next
/// registration do not take the policy with them.
#[tokio::test]
async fn a_store_from_an_earlier_version_keeps_its_policy() {
    let dir = tempfile::tempdir().unwrap();
    let open_here = || {
        let Opened { sm, view, .. } = open_in(dir.path());
        (sm, view)
    };
    let policy = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
    let mut earlier = Registry::default();
    earlier.apply(&Request::single(
        Timestamp(1_700_000_000_000),
        Command::SetPolicy {
            policy: policy.into(),
        },
    ));
    {
        // The earlier layout, as a snapshot still carries it: the policy inside `meta`.
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf(&opts, dir.path().join("raft"), [CF_LOGS, CF_META, CF_SM]).unwrap();
        let sm = db.cf_handle(CF_SM).unwrap();
        for (key, value) in earlier.snapshot_records() {
            db.put_cf(sm, key, value).unwrap();
        }
    }
    let (mut sm, view) = open_here();
    assert_eq!(view.borrow().policy(), policy);
    sm.apply(vec![entry(1, Command::create_user("dave"))])
        .await
        .unwrap();
    drop(sm);
    let (_sm, view) = open_here();
    assert_eq!(view.borrow().policy(), policy);
    assert!(view.borrow().user_by_name("dave").is_some());
}

/// Memtables that writes have left alone are flushed (their memory given back) once enough
/// was written to be worth it; while writes go on, nothing is.
#[tokio::test]
async fn quiet_memtables_are_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let Opened { mut sm, memory, .. } = open_in(dir.path());
    let registry_bytes = |memory: &StoreMemory| {
        memory
            .memtable_bytes()
            .into_iter()
            .find(|(cf, _)| *cf == CF_SM)
            .map(|(_, bytes)| bytes)
            .unwrap()
    };
    let users = |from: u64, to: u64| {
        (from..to)
            .map(|i| entry(i, Command::create_user(format!("user{i}"))))
            .collect::<Vec<_>>()
    };
    let mut check = QuietCheck::default();
    sm.apply(users(1, 11)).await.unwrap();
    memory.flush_quiet(&mut check).unwrap();
    assert_eq!(
        memory.flush_quiet(&mut check).unwrap(),
        Vec::<&str>::new(),
        "ten users are not worth a flush"
    );

    sm.apply(users(11, 4_001)).await.unwrap();
    assert_eq!(memory.flush_quiet(&mut check).unwrap(), Vec::<&str>::new());
    sm.apply(users(4_001, 4_002)).await.unwrap();
    assert_eq!(
        memory.flush_quiet(&mut check).unwrap(),
        Vec::<&str>::new(),
        "written since the last check"
    );
    let full = registry_bytes(&memory);
    assert!(memory.flush_quiet(&mut check).unwrap().contains(&CF_SM));
    let after = registry_bytes(&memory);
    assert!(
        after < full / 4,
        "{full} bytes before the flush, {after} after"
    );
    assert_eq!(memory.flush_quiet(&mut check).unwrap(), Vec::<&str>::new());
}

//! Store behaviour on real sled files in temporary directories.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use ordermesh_storage::{Append, IdempotencyRecord, Snapshot, StorageError, Store, StoreOptions, WriteBatch};

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap()
}

fn append(entity: &str, expected: u64, events: Vec<Vec<u8>>) -> WriteBatch {
    WriteBatch {
        appends: vec![Append { entity: entity.to_owned(), expected_version: expected, events }],
        ..WriteBatch::default()
    }
}

fn event(entity: &str, seq: u64) -> Vec<u8> {
    format!("{entity}:{seq}").into_bytes()
}

fn claim(key: &str, value: &[u8], created_at_ms: u64) -> IdempotencyRecord {
    IdempotencyRecord { key: key.to_owned(), value: value.to_vec(), created_at_ms }
}

/// The error names the store's directory, as every disk error must.
fn assert_names_path(err: &StorageError, dir: &Path) {
    let text = err.to_string();
    assert!(text.contains(&dir.display().to_string()), "error does not name {}: {text}", dir.display());
}

// 1 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed() {
    const TASKS: u64 = 256;
    const PER_TASK: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let before = store.stats();

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let entity = format!("order-{t}");
            for seq in 1..=PER_TASK {
                let committed = store.commit(append(&entity, seq - 1, vec![event(&entity, seq)])).await.unwrap();
                assert_eq!(committed.versions, vec![(entity.clone(), seq)]);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    for t in 0..TASKS {
        let entity = format!("order-{t}");
        assert_eq!(store.version(&entity).unwrap(), PER_TASK);
        let events = store.read_events(&entity, 0).unwrap();
        let expected: Vec<_> = (1..=PER_TASK).map(|s| (s, event(&entity, s))).collect();
        let got: Vec<_> = events.into_iter().map(|e| (e.seq, e.bytes)).collect();
        assert_eq!(got, expected);
    }
    let stats = store.stats();
    let writes = TASKS * PER_TASK;
    let fsyncs = stats.fsyncs - before.fsyncs;
    assert_eq!(stats.writes, writes);
    eprintln!("{writes} writes: {fsyncs} fsyncs, {} rounds", stats.rounds);
    assert!(fsyncs < writes / 4, "{fsyncs} fsyncs for {writes} writes ({} rounds): not batched", stats.rounds);
    store.close().unwrap();
}

// 2 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_expected_version_one_wins_the_other_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.commit(append("order-1", 0, vec![b"first".to_vec()])).await.unwrap();
    let err = store.commit(append("order-1", 0, vec![b"second".to_vec()])).await.unwrap_err();
    match err {
        StorageError::Conflict { entity, expected, actual } => {
            assert_eq!((entity.as_str(), expected, actual), ("order-1", 0, 1))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.read_events("order-1", 0).unwrap().len(), 1);
}

/// Many contenders at once: most land in the same commit groups, where they are checked against
/// each other (the group-local map), not only against the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_contenders_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let contenders = (0..100).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.commit(append("sku-1", 0, vec![format!("c{i}").into_bytes()])).await })
    });
    let mut wins = 0;
    for c in contenders.collect::<Vec<_>>() {
        match c.await.unwrap() {
            Ok(committed) => {
                wins += 1;
                assert_eq!(committed.versions, vec![("sku-1".to_owned(), 1)]);
            }
            Err(StorageError::Conflict { expected, actual, .. }) => assert_eq!((expected, actual), (0, 1)),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(store.version("sku-1").unwrap(), 1);
    assert_eq!(store.read_events("sku-1", 0).unwrap().len(), 1);
    assert_eq!(store.stats().writes, 1);
}

#[tokio::test]
async fn one_batch_appending_twice_to_an_entity_must_chain_its_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut chained = append("a", 0, vec![b"1".to_vec()]);
    chained.appends.push(Append { entity: "a".to_owned(), expected_version: 1, events: vec![b"2".to_vec()] });
    let committed = store.commit(chained).await.unwrap();
    assert_eq!(committed.versions, vec![("a".to_owned(), 1), ("a".to_owned(), 2)]);

    let mut clashing = append("b", 0, vec![b"1".to_vec()]);
    clashing.appends.push(Append { entity: "b".to_owned(), expected_version: 0, events: vec![b"1bis".to_vec()] });
    let err = store.commit(clashing).await.unwrap_err();
    assert!(matches!(err, StorageError::Conflict { .. }), "{err:?}");
    assert_eq!(store.version("b").unwrap(), 0, "nothing of a rejected batch is written");
}

// 3 -------------------------------------------------------------------------------------------

/// Writes 40 entities of 10 events each (in several groups) and closes the store.
async fn populate(dir: &Path) {
    let store = open(dir);
    for round in 0..10u64 {
        let commits = (0..40).map(|e| {
            let entity = format!("order-{e}");
            let store = store.clone();
            async move { store.commit(append(&entity, round, vec![vec![b'z'; 200]])).await.unwrap() }
        });
        futures_join_all(commits).await;
    }
    store.close().unwrap();
}

/// Tiny join_all (no futures crate in the dependencies).
async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>)
where
    F::Output: Send,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

/// After damage to the files: opening or reading is an error naming the store, or every record
/// is still there. Never a panic, never a silently shorter history.
fn assert_damage_is_loud(dir: &Path) {
    let store = match Store::open(dir, StoreOptions::default()) {
        Err(err) => {
            eprintln!("damage detected at open: {err}");
            assert!(matches!(err, StorageError::Open { .. } | StorageError::Corrupt { .. }), "{err:?}");
            assert_names_path(&err, dir);
            return;
        }
        Ok(store) => store,
    };
    for e in 0..40 {
        let entity = format!("order-{e}");
        match store.read_events(&entity, 0) {
            Err(err) => {
                eprintln!("damage detected reading {entity}: {err}");
                assert_names_path(&err, dir);
                return;
            }
            Ok(events) => assert_eq!(events.len(), 10, "{entity} silently lost events"),
        }
        match store.version(&entity) {
            Err(err) => {
                assert_names_path(&err, dir);
                return;
            }
            Ok(v) => assert_eq!(v, 10, "{entity} silently lost its version"),
        }
    }
    eprintln!("damage was harmless: every record is intact");
}

fn damage(dir: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join("db");
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.is_empty());
    f(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_middle_of_the_log_is_an_error_not_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    damage(dir.path(), |bytes| {
        let len = bytes.len();
        for (i, b) in bytes[len / 4..3 * len / 4].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ 0x5A;
        }
    });
    assert_damage_is_loud(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_log_is_an_error_not_a_shorter_history() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    damage(dir.path(), |bytes| bytes.truncate(bytes.len() / 2));
    assert_damage_is_loud(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroed_log_is_an_error_not_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    damage(dir.path(), |bytes| bytes.fill(0));
    assert_damage_is_loud(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_anywhere_never_panic_or_lose_silently() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    let pristine = std::fs::read(dir.path().join("db")).unwrap();
    let len = pristine.len();
    // A spread of single-byte flips across the file, each on a fresh copy.
    for k in 1..16 {
        let at = len * k / 16;
        std::fs::write(dir.path().join("db"), &pristine).unwrap();
        damage(dir.path(), |bytes| bytes[at] ^= 0xFF);
        assert_damage_is_loud(dir.path());
    }
}

/// Copies an open store's files as a crash would leave them: the write-ahead log first, then
/// sled's files, so a checkpoint running meanwhile can only make the image more complete.
fn copy_crash_image(live: &Path, image: &Path) {
    std::fs::create_dir_all(image.join("blobs")).unwrap();
    std::fs::create_dir_all(image.join("wal")).unwrap();
    for entry in std::fs::read_dir(live.join("wal")).unwrap() {
        let entry = entry.unwrap();
        // A segment deleted by a checkpoint between readdir and copy is covered by sled's files.
        let _ = std::fs::copy(entry.path(), image.join("wal").join(entry.file_name()));
    }
    for file in ["db", "conf", "ORDERMESH_STORE"] {
        std::fs::copy(live.join(file), image.join(file)).unwrap();
    }
}

/// Acknowledged writes that sled has not flushed yet (it is flushed only at checkpoints) are in
/// the write-ahead log: an image taken right after the acks opens with all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_not_yet_in_sleds_files_are_replayed_from_the_log() {
    let live = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let store = open(live.path());
    for round in 0..5u64 {
        let commits = (0..50).map(|e| {
            let store = store.clone();
            async move {
                let entity = format!("order-{e}");
                let mut batch = append(&entity, round, vec![event(&entity, round + 1)]);
                batch.outbox = vec![format!("{entity}-{round}").into_bytes()];
                store.commit(batch).await.unwrap();
            }
        });
        futures_join_all(commits).await;
    }
    copy_crash_image(live.path(), image.path());
    // Segments are written over zeros: count what was written, not the files' sizes.
    let logged: usize = std::fs::read_dir(image.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .map(|path| std::fs::read(path).unwrap().iter().filter(|b| **b != 0).count())
        .sum();
    assert!(logged > 0, "the acknowledged writes should be in the log");
    drop(store);

    let reopened = open(image.path());
    for e in 0..50 {
        let entity = format!("order-{e}");
        assert_eq!(reopened.version(&entity).unwrap(), 5);
        let events = reopened.read_events(&entity, 0).unwrap();
        assert_eq!(
            events.iter().map(|e| e.bytes.clone()).collect::<Vec<_>>(),
            (1..=5).map(|s| event(&entity, s)).collect::<Vec<_>>()
        );
    }
    assert_eq!(reopened.outbox_pending(None, 1000).unwrap().len(), 250);
    // The next commit gets the next outbox id, and the replayed store is checkpointed: a second
    // reopen needs no log.
    let next = reopened.commit(WriteBatch { outbox: vec![b"after".to_vec()], ..WriteBatch::default() }).await.unwrap();
    assert_eq!(next.outbox_ids, vec![251]);
}

/// A crash image (the files copied while the store is open and writing) opens with every
/// acknowledged write; the same image with a damaged log is refused, thanks to the commit-group
/// checkpoint the committer writes about once a second (no clean close involved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_crash_image_is_refused_thanks_to_the_checkpoint() {
    let live = tempfile::tempdir().unwrap();
    let store = open(live.path());
    let sentinel = live.path().join("ORDERMESH_STORE");
    let initial = std::fs::read_to_string(&sentinel).unwrap();
    for round in 0..10u64 {
        let commits = (0..20).map(|e| {
            let store = store.clone();
            async move {
                let entity = format!("order-{e}");
                store.commit(append(&entity, round, vec![vec![b'y'; 300]])).await.unwrap();
            }
        });
        futures_join_all(commits).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    store.commit(append("last", 0, vec![b"x".to_vec()])).await.unwrap();
    // The checkpoint is written just after that group is acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&sentinel).unwrap() == initial {
        assert!(std::time::Instant::now() < deadline, "no checkpoint written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let image = |name: &str| {
        let dir = live
            .path()
            .parent()
            .unwrap()
            .join(format!("{}-{name}", live.path().file_name().unwrap().to_string_lossy()));
        copy_crash_image(live.path(), &dir);
        dir
    };
    let intact = image("intact");
    let damaged = image("damaged");
    drop(store);

    let reopened = open(&intact);
    for e in 0..20 {
        assert_eq!(reopened.version(&format!("order-{e}")).unwrap(), 10);
    }
    assert_eq!(reopened.version("last").unwrap(), 1);
    drop(reopened);

    damage(&damaged, |bytes| {
        let at = bytes.len() / 3;
        bytes[at] ^= 0xFF;
    });
    let outcome = Store::open(&damaged, StoreOptions::default());
    match outcome {
        Err(err) => {
            eprintln!("damaged image refused: {err}");
            assert_names_path(&err, &damaged);
        }
        // The flipped byte may sit in unused space; then everything must be there.
        Ok(store) => {
            for e in 0..20 {
                assert_eq!(store.version(&format!("order-{e}")).unwrap(), 10);
            }
        }
    }
    std::fs::remove_dir_all(intact).unwrap();
    std::fs::remove_dir_all(damaged).unwrap();
}

#[tokio::test]
async fn a_deleted_log_is_an_error_not_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path()).await;
    std::fs::remove_file(dir.path().join("db")).unwrap();
    let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StorageError::Open { .. }), "{err:?}");
    assert_names_path(&err, dir.path());
}

#[test]
fn an_unopenable_directory_is_an_open_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file, StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StorageError::Open { .. }), "{err:?}");
    assert_names_path(&err, &file);
}

#[test]
fn a_store_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StorageError::Open { .. }), "{err:?}");
}

// 4 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![7u8; 300 * 1024]; // over sled's blob threshold: stored as a separate file
    let mut outbox_ids = Vec::new();
    {
        let store = open(dir.path());
        for i in 0..50u64 {
            let entity = format!("order-{}", i % 5);
            let version = store.version(&entity).unwrap();
            let mut batch = append(&entity, version, vec![event(&entity, version + 1)]);
            batch.outbox = vec![format!("out-{i}").into_bytes()];
            batch.idempotency = vec![claim(&format!("idem-{i}"), b"resp", i)];
            batch.index_put = vec![(format!("by-status/open/{i:03}").into_bytes(), entity.clone().into_bytes())];
            batch.snapshots =
                vec![Snapshot { entity: entity.clone(), seq: version + 1, bytes: format!("state-{i}").into_bytes() }];
            let committed = store.commit(batch).await.unwrap();
            outbox_ids.extend(committed.outbox_ids);
        }
        store.commit(append("big", 0, vec![big.clone()])).await.unwrap();
        store.close().unwrap();
        // Closed means closed, even with this clone still alive.
        assert!(matches!(store.commit(WriteBatch::default()).await, Err(StorageError::Closed)));
    }
    assert!(outbox_ids.windows(2).all(|w| w[0] < w[1]));

    let store = open(dir.path());
    for e in 0..5u64 {
        let entity = format!("order-{e}");
        assert_eq!(store.version(&entity).unwrap(), 10);
        let events = store.read_events(&entity, 0).unwrap();
        assert_eq!(events.len(), 10);
        assert_eq!(events[9].bytes, event(&entity, 10));
        assert_eq!(store.read_events(&entity, 7).unwrap().len(), 3);
        let snap = store.load_snapshot(&entity).unwrap().unwrap();
        assert_eq!(snap.seq, 10);
        assert_eq!(snap.bytes, format!("state-{}", 45 + e).into_bytes());
    }
    assert_eq!(store.read_events("big", 0).unwrap()[0].bytes, big);
    let pending = store.outbox_pending(None, 1000).unwrap();
    assert_eq!(pending.iter().map(|p| p.id).collect::<Vec<_>>(), outbox_ids);
    assert_eq!(pending[49].bytes, b"out-49");
    for i in 0..50u64 {
        assert_eq!(store.idempotency_get(&format!("idem-{i}")).unwrap(), Some(claim(&format!("idem-{i}"), b"resp", i)));
    }
    assert_eq!(store.index_scan(b"by-status/open/", None, 1000).unwrap().len(), 50);

    // Versions come back from the log itself: a stale append conflicts, the right one succeeds.
    let stale = store.commit(append("order-0", 9, vec![b"stale".to_vec()])).await.unwrap_err();
    assert!(matches!(stale, StorageError::Conflict { expected: 9, actual: 10, .. }), "{stale:?}");
    store.commit(append("order-0", 10, vec![event("order-0", 11)])).await.unwrap();
    assert_eq!(store.version("order-0").unwrap(), 11);

    // Outbox ids keep increasing after a restart, even once every entry was acknowledged.
    let last = *outbox_ids.last().unwrap();
    store.outbox_ack(&outbox_ids).unwrap();
    assert!(store.outbox_pending(None, 1000).unwrap().is_empty());
    drop(store); // the last clone's drop closes too
    let store = open(dir.path());
    assert!(store.outbox_pending(None, 1000).unwrap().is_empty(), "ack survived close");
    let batch = WriteBatch { outbox: vec![b"after-restart".to_vec()], ..WriteBatch::default() };
    let ids = store.commit(batch).await.unwrap().outbox_ids;
    assert!(ids[0] > last, "outbox id {} reused after restart (last {last})", ids[0]);
}

// 5 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_idempotency_claims_one_winner_others_see_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let claims: Vec<_> = (0..20u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let batch = WriteBatch {
                    idempotency: vec![claim("pay-req-1", format!("resp-{i}").as_bytes(), i)],
                    ..WriteBatch::default()
                };
                (i, store.commit(batch).await)
            })
        })
        .collect();
    let mut winner = None;
    let mut losers = Vec::new();
    for c in claims {
        match c.await.unwrap() {
            (i, Ok(_)) => {
                assert!(winner.is_none(), "two winners");
                winner = Some(claim("pay-req-1", format!("resp-{i}").as_bytes(), i));
            }
            (_, Err(StorageError::IdempotencyKeyTaken { key, existing })) => {
                assert_eq!(key, "pay-req-1");
                losers.push(existing);
            }
            (_, Err(other)) => panic!("unexpected {other:?}"),
        }
    }
    let winner = winner.expect("one claim wins");
    assert_eq!(losers.len(), 19);
    assert!(losers.iter().all(|l| *l == winner), "a loser saw another record");
    assert_eq!(store.idempotency_get("pay-req-1").unwrap(), Some(winner));
}

#[tokio::test]
async fn purge_removes_only_old_idempotency_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batch = WriteBatch {
        idempotency: (0..10u64).map(|i| claim(&format!("k{i}"), b"v", i * 100)).collect(),
        ..WriteBatch::default()
    };
    store.commit(batch).await.unwrap();
    assert_eq!(store.purge_idempotency(500).unwrap(), 5);
    assert_eq!(store.idempotency_get("k4").unwrap(), None);
    assert!(store.idempotency_get("k5").unwrap().is_some());
    // A purged key can be claimed again.
    let again = WriteBatch { idempotency: vec![claim("k0", b"new", 1000)], ..WriteBatch::default() };
    store.commit(again).await.unwrap();
}

// 6 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_pending_pages_in_id_order_and_ack_removes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let notify = store.outbox_notify();
    let batch = WriteBatch { outbox: (0..5).map(|i| format!("p{i}").into_bytes()).collect(), ..WriteBatch::default() };
    let ids = store.commit(batch).await.unwrap().outbox_ids;
    assert_eq!(ids.len(), 5);
    // The commit that added entries notified (a permit is kept for a relay not yet waiting).
    tokio::time::timeout(Duration::from_secs(5), notify.notified()).await.expect("outbox notify after commit");

    let all = store.outbox_pending(None, 100).unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(all[0].bytes, b"p0");
    let page = store.outbox_pending(Some(ids[1]), 2).unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..4].to_vec());
    assert!(store.outbox_pending(Some(ids[4]), 10).unwrap().is_empty());
    assert!(store.outbox_pending(None, 0).unwrap().is_empty());

    store.outbox_ack(&ids[..3]).unwrap();
    let rest = store.outbox_pending(None, 100).unwrap();
    assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), ids[3..].to_vec());
}

/// A relay polling while writers commit only ever sees entries whose commit is acknowledged (or
/// about to be: the ack is sent right after the watermark moves), and sees each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_sees_every_durable_entry_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let batch = WriteBatch { outbox: vec![format!("{w}-{i}").into_bytes()], ..WriteBatch::default() };
                    store.commit(batch).await.unwrap();
                }
            })
        })
        .collect();
    let relay = {
        let store = store.clone();
        tokio::spawn(async move {
            let notify = store.outbox_notify();
            let mut seen = Vec::new();
            let mut after = None;
            while seen.len() < 320 {
                let page = store.outbox_pending(after, 64).unwrap();
                if page.is_empty() {
                    let _ = tokio::time::timeout(Duration::from_millis(50), notify.notified()).await;
                    continue;
                }
                after = page.last().map(|e| e.id);
                seen.extend(page.iter().map(|e| e.id));
                store.outbox_ack(&page.iter().map(|e| e.id).collect::<Vec<_>>()).unwrap();
            }
            seen
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), relay).await.expect("relay finished").unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 320);
    assert!(store.outbox_pending(None, 1000).unwrap().is_empty());
}

// Index, snapshots, keys, close ------------------------------------------------------------------

#[tokio::test]
async fn index_scan_pages_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut batch = WriteBatch::default();
    for c in ["alice", "bob"] {
        for i in 0..5 {
            batch.index_put.push((format!("cust/{c}/{i}").into_bytes(), format!("{c}{i}").into_bytes()));
        }
    }
    batch.index_put.push((b"cust/alicex".to_vec(), b"other".to_vec()));
    store.commit(batch).await.unwrap();

    let first = store.index_scan(b"cust/alice/", None, 3).unwrap();
    let keys: Vec<_> = first.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, vec![b"cust/alice/0".to_vec(), b"cust/alice/1".to_vec(), b"cust/alice/2".to_vec()]);
    assert_eq!(first[0].1, b"alice0");
    let next = store.index_scan(b"cust/alice/", Some(b"cust/alice/2"), 10).unwrap();
    assert_eq!(next.len(), 2);
    assert_eq!(next[1].0, b"cust/alice/4");
    // start_after before the prefix starts at the prefix; after it, nothing.
    assert_eq!(store.index_scan(b"cust/bob/", Some(b"a"), 10).unwrap().len(), 5);
    assert!(store.index_scan(b"cust/bob/", Some(b"z"), 10).unwrap().is_empty());
    assert_eq!(store.index_get(b"cust/bob/3").unwrap(), Some(b"bob3".to_vec()));

    let moves = WriteBatch {
        index_delete: vec![b"cust/bob/3".to_vec(), b"cust/bob/4".to_vec()],
        index_put: vec![(b"cust/bob/4".to_vec(), b"moved".to_vec())], // a put wins over a delete
        ..WriteBatch::default()
    };
    store.commit(moves).await.unwrap();
    assert_eq!(store.index_get(b"cust/bob/3").unwrap(), None);
    assert_eq!(store.index_get(b"cust/bob/4").unwrap(), Some(b"moved".to_vec()));
}

#[tokio::test]
async fn snapshots_replace_and_reads_start_after_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.load_snapshot("o").unwrap(), None);
    assert_eq!(store.version("o").unwrap(), 0);
    store.commit(append("o", 0, (1..=4).map(|s| event("o", s)).collect())).await.unwrap();
    for seq in [2, 4] {
        let batch = WriteBatch {
            snapshots: vec![Snapshot { entity: "o".to_owned(), seq, bytes: format!("s{seq}").into_bytes() }],
            ..WriteBatch::default()
        };
        store.commit(batch).await.unwrap();
    }
    let snap = store.load_snapshot("o").unwrap().unwrap();
    assert_eq!((snap.seq, snap.bytes), (4, b"s4".to_vec()));
    assert!(store.read_events("o", 4).unwrap().is_empty());
    let tail = store.read_events("o", 2).unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
    // Entities whose names extend each other do not mix.
    store.commit(append("o1", 0, vec![b"x".to_vec()])).await.unwrap();
    assert_eq!(store.read_events("o", 0).unwrap().len(), 4);
}

#[tokio::test]
async fn invalid_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for entity in ["", "a\0b"] {
        let err = store.commit(append(entity, 0, vec![b"x".to_vec()])).await.unwrap_err();
        assert!(matches!(err, StorageError::InvalidKey { .. }), "{err:?}");
        assert!(matches!(store.read_events(entity, 0), Err(StorageError::InvalidKey { .. })));
    }
    let batch = WriteBatch { idempotency: vec![claim("", b"resp", 0)], ..WriteBatch::default() };
    assert!(matches!(store.commit(batch).await, Err(StorageError::InvalidKey { .. })));
}

#[tokio::test]
async fn close_is_idempotent_and_releases_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clone = store.clone();
    store.commit(append("a", 0, vec![b"1".to_vec()])).await.unwrap();
    store.close().unwrap();
    clone.close().unwrap();
    assert!(matches!(clone.version("a"), Err(StorageError::Closed)));
    // Reopen while the old handles still exist.
    let reopened = open(dir.path());
    assert_eq!(reopened.version("a").unwrap(), 1);
    drop(store);
    drop(clone);
    assert_eq!(reopened.version("a").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_are_listed_in_name_order_one_page_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // "a" is a prefix of "ab": its events must not hide "ab", nor "ab"'s make "a" appear twice.
    for (entity, events) in [("b", 3), ("a", 2), ("ab", 1), ("c", 1)] {
        store.commit(append(entity, 0, (1..=events).map(|s| event(entity, s)).collect())).await.unwrap();
    }
    assert_eq!(store.entities_after(None, 10).unwrap(), ["a", "ab", "b", "c"]);
    assert_eq!(store.entities_after(None, 2).unwrap(), ["a", "ab"]);
    assert_eq!(store.entities_after(Some("ab"), 2).unwrap(), ["b", "c"]);
    assert_eq!(store.entities_after(Some("a"), 1).unwrap(), ["ab"]);
    assert_eq!(store.entities_after(Some("c"), 5).unwrap(), Vec::<String>::new());
    assert_eq!(store.entities_after(Some("zzz"), 5).unwrap(), Vec::<String>::new());
    assert!(store.entities_after(Some("x\0y"), 5).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_of_one_append_read_back_from_any_seq_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let events = |from: u64, to: u64| (from..=to).map(|s| event("order-1", s)).collect::<Vec<_>>();
    {
        let store = open(dir.path());
        store.commit(append("order-1", 0, events(1, 3))).await.unwrap(); // one record: 1..=3
        store.commit(append("order-1", 3, events(4, 4))).await.unwrap();
        store.commit(append("order-1", 4, events(5, 6))).await.unwrap(); // one record: 5..=6
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.version("order-1").unwrap(), 6);
    for after in 0..=6 {
        let read: Vec<_> = store.read_events("order-1", after).unwrap().into_iter().map(|e| (e.seq, e.bytes)).collect();
        let want: Vec<_> = (after + 1..=6).map(|s| (s, event("order-1", s))).collect();
        assert_eq!(read, want, "after {after}");
    }
    let err = store.commit(append("order-1", 5, events(6, 6))).await.unwrap_err();
    assert!(matches!(err, StorageError::Conflict { actual: 6, .. }), "{err:?}");
    store.commit(append("order-1", 6, events(7, 7))).await.unwrap();
    assert_eq!(store.read_events("order-1", 5).unwrap().len(), 2);
}

/// sled writes a snapshot of its page table at every open, into `snap.<lsn>.generating`, and
/// renames it once synced; a kill before the rename leaves that file half written, and sled
/// 0.34 then picks it as the newest snapshot at every later open and refuses the store as
/// corrupt (seen in the kill -9 crash test). The store removes such leftovers before sled opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_sled_was_killed_writing_does_not_stop_the_store_from_opening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.commit(append("order-1", 0, vec![event("order-1", 1)])).await.unwrap();
        store.close().unwrap();
    }
    let leftover = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&leftover, b"half of a snapshot, no length, no checksum").unwrap();

    let store = open(dir.path());
    assert!(!leftover.exists());
    let events = store.read_events("order-1", 0).unwrap();
    assert_eq!(events.iter().map(|e| e.bytes.clone()).collect::<Vec<_>>(), vec![event("order-1", 1)]);
}

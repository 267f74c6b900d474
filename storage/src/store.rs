//! The public [`Store`]: opening, the write path's front half (validation and encoding of a
//! [`WriteBatch`] on the caller's thread) and every read.
//!
//! Writes go through the committer ([`crate::committer`]) into the write buffer
//! ([`crate::buffer`]); reads look at the buffer, then sled, which is safe to read from many
//! threads. A read may observe a write between the moment it is applied and the moment its fsync
//! returns (a millisecond or two). Nothing is acknowledged to a writer, and no outbox entry is
//! handed out, before it is durable; and if that fsync fails the store refuses every later call
//! ([`StorageError::Poisoned`]).

use std::fmt;
use std::fs;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::buffer::{Found, Merged, WriteBuffer};
use crate::codec;
use crate::committer::{self, Committer};
use crate::error::StorageError;
use crate::keys;
use crate::wal;

/// Name of the file that marks a directory as an initialised store (see [`Store::open`]).
const SENTINEL: &str = "ORDERMESH_STORE";

/// An index entry: (key, value).
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Tuning of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync the write-ahead log after each round (and sled's files at checkpoints). Only tests
    /// that want speed turn this off; with it off a commit survives `kill -9` (the log was written
    /// to the kernel) but not power loss.
    pub fsync: bool,
    /// Bytes of sled's page cache. sled's default is 1 GiB per database, and a node opens three;
    /// the hot set of an order store (live sagas, recent orders) is far smaller. sled counts
    /// less than the nodes really take: at 64 MiB per store the process held about 280 MB more
    /// after 237,000 orders than at 16 MiB, with the same throughput.
    pub cache_bytes: u64,
    /// Least time between the starts of two log rounds (write + fsync) while writers are
    /// concurrent; a lone writer is never held back. Each round costs tens of microseconds of
    /// CPU whatever it carries, so under load fewer, fuller rounds leave more CPU for the work,
    /// at the price of half this interval of latency per write on average. Twice this while the
    /// machine's cores are all busy (then the CPU saved is worth more than the latency). Zero:
    /// a round starts as soon as the last one ends.
    pub min_round_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { fsync: true, cache_bytes: 16 * 1024 * 1024, min_round_interval: Duration::from_millis(1) }
    }
}

/// Everything one caller wants committed atomically: all of it becomes durable, or none of it.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// Events to append, each list with an expected-version check.
    pub appends: Vec<Append>,
    /// Snapshots replacing the entity's previous one.
    pub snapshots: Vec<Snapshot>,
    /// New outbox payloads; the store gives each a monotonically increasing id.
    pub outbox: Vec<Vec<u8>>,
    /// Idempotency claims (insert if absent). If a key is taken, the whole batch fails with
    /// [`StorageError::IdempotencyKeyTaken`], carrying the existing record.
    pub idempotency: Vec<IdempotencyRecord>,
    /// Secondary index entries to put (key, value).
    pub index_put: Vec<KeyValue>,
    /// Secondary index keys to delete.
    pub index_delete: Vec<Vec<u8>>,
}

impl WriteBatch {
    /// True if the batch would write nothing.
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.snapshots.is_empty()
            && self.outbox.is_empty()
            && self.idempotency.is_empty()
            && self.index_put.is_empty()
            && self.index_delete.is_empty()
    }
}

/// Events to append to one entity. They get seqs `expected_version + 1 ..`; if the entity's
/// version is not `expected_version` the whole batch fails with [`StorageError::Conflict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The entity (non-empty, no 0x00 byte).
    pub entity: String,
    /// The version the caller last saw (0 for a new entity).
    pub expected_version: u64,
    /// The events, already encoded by the caller.
    pub events: Vec<Vec<u8>>,
}

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its position in the entity's log, from 1.
    pub seq: u64,
    /// The caller's bytes.
    pub bytes: Vec<u8>,
}

/// The latest snapshot of an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The entity.
    pub entity: String,
    /// The seq of the last event folded into it.
    pub seq: u64,
    /// The caller's bytes.
    pub bytes: Vec<u8>,
}

/// An outbox entry waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Store-assigned, increasing, never reused (even across restarts).
    pub id: u64,
    /// The caller's bytes.
    pub bytes: Vec<u8>,
}

/// A claimed idempotency key and the result to replay to a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The key (non-empty).
    pub key: String,
    /// The caller's bytes (typically the response).
    pub value: Vec<u8>,
    /// When it was claimed (ms since the epoch), for [`Store::purge_idempotency`].
    pub created_at_ms: u64,
}

/// What a durable commit produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Committed {
    /// Ids given to the batch's outbox payloads, in order.
    pub outbox_ids: Vec<u64>,
    /// The new version of each appended entity, in the order of `appends`.
    pub versions: Vec<(String, u64)>,
}

/// Counters of the write path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// fsync calls made so far (files and directories, including those at open).
    pub fsyncs: u64,
    /// Rounds of the log that made writes durable (one log write and one fsync each: the
    /// groups of group commit).
    pub rounds: u64,
    /// WriteBatches committed (acknowledged as durable).
    pub writes: u64,
}

// ---------------------------------------------------------------------------------------------
// Values we encode ourselves (with the versioned codec). Events, outbox payloads and index values
// are the callers' bytes and stored as they are.

/// Value of `s\0<entity>`.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotValue {
    pub(crate) seq: u64,
    #[serde(with = "bytes_field")]
    pub(crate) bytes: Vec<u8>,
}

/// Value of `k\0<key>`.
#[derive(Serialize, Deserialize)]
pub(crate) struct IdempotencyValue {
    #[serde(with = "bytes_field")]
    pub(crate) value: Vec<u8>,
    pub(crate) created_at_ms: u64,
}

/// Serialises `Vec<u8>` with serde's bytes methods: same bincode layout as the default
/// (length, then the bytes) but one memcpy instead of a call per byte.
pub(crate) mod bytes_field {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A WriteBatch turned into keys and encoded values, on the caller's thread, so the committer
// thread (the bottleneck) only checks versions and claims and fills the sled batch.

pub(crate) struct PreparedAppend {
    pub(crate) entity: String,
    pub(crate) expected: u64,
    pub(crate) new_version: u64,
    /// `e\0<entity>\0`: the prefix of the entity's event keys, and its key in the committer's
    /// version cache.
    pub(crate) prefix: Vec<u8>,
    /// (event key, event bytes).
    pub(crate) events: Vec<(Vec<u8>, Vec<u8>)>,
}

pub(crate) struct PreparedClaim {
    pub(crate) record: IdempotencyRecord,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

pub(crate) struct Prepared {
    pub(crate) appends: Vec<PreparedAppend>,
    /// (key, encoded SnapshotValue).
    pub(crate) snapshots: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) outbox: Vec<Vec<u8>>,
    pub(crate) idempotency: Vec<PreparedClaim>,
    pub(crate) index_put: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) index_delete: Vec<Vec<u8>>,
}

fn encode_internal<T: Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StorageError> {
    // Our own record types cannot fail to encode; if bincode ever says otherwise, it is an error
    // of this write, not a panic.
    codec::encode(value).map_err(|e| StorageError::InvalidKey { reason: format!("cannot encode {what}: {e}") })
}

impl Prepared {
    pub(crate) fn new(batch: WriteBatch) -> Result<Prepared, StorageError> {
        let mut appends = Vec::with_capacity(batch.appends.len());
        for append in batch.appends {
            keys::check_entity(&append.entity)?;
            let count = append.events.len() as u64;
            let new_version = append.expected_version.checked_add(count).ok_or_else(|| StorageError::InvalidKey {
                reason: format!("version of {} would overflow", append.entity),
            })?;
            let prefix = keys::event_prefix(&append.entity);
            // The events of one append go into as few records as possible: every sled insert
            // costs far more than its bytes (the orders' saga writes two events at once).
            let mut events = Vec::new();
            let mut last = append.expected_version;
            let mut rest = append.events.into_iter().peekable();
            while rest.peek().is_some() {
                let mut chunk: Vec<Vec<u8>> = rest.by_ref().take(keys::MAX_PACKED).collect();
                last += chunk.len() as u64;
                events.push(match chunk.len() {
                    1 => (keys::event_key(&prefix, last), chunk.swap_remove(0)),
                    n => (keys::packed_event_key(&prefix, last, n as u8), keys::pack_events(&chunk)),
                });
            }
            appends.push(PreparedAppend {
                prefix,
                entity: append.entity,
                expected: append.expected_version,
                new_version,
                events,
            });
        }
        let mut snapshots = Vec::with_capacity(batch.snapshots.len());
        for snap in batch.snapshots {
            keys::check_entity(&snap.entity)?;
            let value = encode_internal(&SnapshotValue { seq: snap.seq, bytes: snap.bytes }, "snapshot")?;
            snapshots.push((keys::tagged(keys::SNAPSHOT, snap.entity.as_bytes()), value));
        }
        let mut idempotency = Vec::with_capacity(batch.idempotency.len());
        for record in batch.idempotency {
            keys::check_name("idempotency key", &record.key)?;
            let value = encode_internal(
                &IdempotencyValue { value: record.value.clone(), created_at_ms: record.created_at_ms },
                "idempotency record",
            )?;
            idempotency.push(PreparedClaim {
                key: keys::tagged(keys::IDEMPOTENCY, record.key.as_bytes()),
                record,
                value,
            });
        }
        let index_put = batch.index_put.into_iter().map(|(k, v)| (keys::tagged(keys::INDEX, &k), v)).collect();
        let index_delete = batch.index_delete.into_iter().map(|k| keys::tagged(keys::INDEX, &k)).collect();
        Ok(Prepared { appends, snapshots, outbox: batch.outbox, idempotency, index_put, index_delete })
    }
}

// ---------------------------------------------------------------------------------------------

/// State shared by every clone of a [`Store`], its committer and its syncer and checkpoint threads.
pub(crate) struct Shared {
    pub(crate) path: PathBuf,
    /// The directory's file name: the `store` label of metrics and logs.
    pub(crate) name: String,
    /// `None` once closed, so that closing really releases sled's files (and its lock on them).
    ///
    /// After open, only the checkpoint (`Checkpointer::write_to_sled`) writes into sled: the
    /// write buffer's bound on the keys sled holds (`WriteBuffer::release`) relies on it. Any
    /// other writer must raise that bound first, or reads above it will not see its keys.
    db: RwLock<Option<sled::Db>>,
    /// Highest outbox id that is durable. Entries above it may be applied but not yet fsynced and
    /// must not be delivered: a crash could still lose them after a consumer saw them.
    pub(crate) durable_outbox: AtomicU64,
    pub(crate) notify: Arc<Notify>,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) rounds: AtomicU64,
    pub(crate) writes: AtomicU64,
    closed: AtomicBool,
    /// Set forever by the first failed flush/fsync.
    pub(crate) poisoned: OnceLock<String>,
    /// Moving average of the committer's time per write (ns), read by the syncer.
    pub(crate) write_cost_ns: AtomicU64,
    /// Where commit groups go until a checkpoint writes them into sled; every read looks here
    /// first.
    pub(crate) buffer: WriteBuffer,
}

impl Shared {
    pub(crate) fn poisoned_error(&self) -> Option<StorageError> {
        self.poisoned.get().map(|cause| StorageError::Poisoned { path: self.path.clone(), cause: cause.clone() })
    }

    pub(crate) fn io_error(&self, op: &'static str, e: impl fmt::Display) -> StorageError {
        StorageError::Io { path: self.path.clone(), op, message: e.to_string() }
    }

    /// Maps a sled error: its checksum failures become [`StorageError::Corrupt`].
    pub(crate) fn sled_error(&self, op: &'static str, e: sled::Error) -> StorageError {
        match e {
            sled::Error::Corruption { at, .. } => StorageError::Corrupt {
                path: self.path.clone(),
                key: format!("(engine page {at:?})"),
                detail: format!("sled detected corruption during {op}"),
                source: None,
            },
            other => self.io_error(op, other),
        }
    }

    pub(crate) fn corrupt(
        &self,
        key: &[u8],
        detail: impl Into<String>,
        source: Option<codec::CodecError>,
    ) -> StorageError {
        StorageError::Corrupt { path: self.path.clone(), key: keys::describe(key), detail: detail.into(), source }
    }

    /// Decodes a value we encoded ourselves; failure names the key.
    pub(crate) fn decode<T: serde::de::DeserializeOwned>(&self, key: &[u8], value: &[u8]) -> Result<T, StorageError> {
        codec::decode(value).map_err(|e| self.corrupt(key, "cannot decode value", Some(e)))
    }

    /// A key's value: the write buffer's if it has the key, else sled's.
    pub(crate) fn get(&self, db: &sled::Db, key: &[u8]) -> sled::Result<Option<sled::IVec>> {
        #[cfg(debug_assertions)]
        self.buffer.assert_bound_holds(db, &Bound::Included(key.to_vec()), &Bound::Included(key.to_vec()));
        match self.buffer.get(key) {
            Found::Value(value) => Ok(Some(value)),
            Found::Absent => Ok(None),
            Found::Unknown => db.get(key),
        }
    }

    /// A scan of a key range through the write buffer and sled, ascending (descending if
    /// `reverse`).
    pub(crate) fn scan<'a>(
        &'a self,
        db: &'a sled::Db,
        lower: Bound<Vec<u8>>,
        upper: Bound<Vec<u8>>,
        reverse: bool,
    ) -> Merged<'a> {
        #[cfg(debug_assertions)]
        self.buffer.assert_bound_holds(db, &lower, &upper);
        Merged::new(&self.buffer, db, lower, upper, reverse)
    }

    /// Runs a read against the open database.
    fn read<R>(&self, f: impl FnOnce(&sled::Db) -> Result<R, StorageError>) -> Result<R, StorageError> {
        if let Some(e) = self.poisoned_error() {
            return Err(e);
        }
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(StorageError::Closed),
        }
    }
}

/// The handle all clones share; dropping the last one closes the store.
struct Handle {
    shared: Arc<Shared>,
    /// The write path's front half, run by each writer in turn; `None` once closed.
    committer: Mutex<Option<Committer>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(store = %self.shared.name, error = %e, "closing store on drop failed");
        }
    }
}

impl Handle {
    fn close(&self) -> Result<(), StorageError> {
        // Writers hold this lock while they hand their write on, so every write taken before
        // this point is answered by the syncer's final round; later ones find `None` (Closed).
        let Some(mut committer) = self.committer.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return Ok(()); // already closed
        };
        self.shared.closed.store(true, Ordering::SeqCst);
        let result = committer.stop();
        // Drop our sled handles so its files and lock are released now, not when the last clone
        // of the Store goes away.
        drop(committer);
        let db = self.shared.db.write().unwrap_or_else(PoisonError::into_inner).take();
        drop(db);
        tracing::info!(store = %self.shared.name, path = %self.shared.path.display(), "store closed");
        result
    }
}

/// A durable store of one service: event log, snapshots, outbox, idempotency keys and a
/// secondary index, in one sled database in its own directory. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Handle>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.shared.path).field("stats", &self.stats()).finish()
    }
}

fn open_error(path: &Path, source: io::Error) -> StorageError {
    StorageError::Open { path: path.to_path_buf(), source }
}

fn open_error_msg(path: &Path, kind: io::ErrorKind, msg: impl Into<String>) -> StorageError {
    open_error(path, io::Error::new(kind, msg.into()))
}

fn sled_open_error(path: &Path, e: sled::Error) -> StorageError {
    open_error(path, io::Error::from(e))
}

impl Store {
    /// Opens (creating if absent) the store in `dir`.
    ///
    /// A corrupt or unreadable store is an [`StorageError::Open`] naming the path; it never
    /// silently starts empty or shorter: a directory that holds an initialised store (it has the
    /// sentinel file) but whose database lost its layout marker, or recovered fewer commit groups
    /// than were durable at the last clean close, is refused.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StorageError> {
        let (shared, mut committer) = open_parts(dir.as_ref(), options)?;
        committer.start_syncer().map_err(|e| open_error(&shared.path, e))?;
        Ok(Store { inner: Arc::new(Handle { shared, committer: Mutex::new(Some(committer)) }) })
    }

    /// For unit tests: a store whose syncer runs inline, on the writer's thread (each write is
    /// its own round), so a test can drive the committer by hand (see `with_committer`).
    #[cfg(test)]
    pub(crate) fn open_manual(dir: &Path, options: StoreOptions) -> Result<Store, StorageError> {
        let (shared, committer) = open_parts(dir, options)?;
        Ok(Store { inner: Arc::new(Handle { shared, committer: Mutex::new(Some(committer)) }) })
    }

    #[cfg(test)]
    pub(crate) fn with_committer<R>(&self, f: impl FnOnce(&mut Committer) -> R) -> R {
        let mut committer = self.inner.committer.lock().unwrap_or_else(PoisonError::into_inner);
        f(committer.as_mut().expect("store is open"))
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Group-committed durable write. Returns only after the batch is applied and on stable
    /// storage (in the write-ahead log, fsynced; see [`crate::wal`]). Atomic: all of the batch or
    /// nothing.
    ///
    /// Dropping the returned future does not cancel the write: it may still commit.
    pub async fn commit(&self, batch: WriteBatch) -> Result<Committed, StorageError> {
        let shared = self.shared();
        if shared.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        if let Some(e) = shared.poisoned_error() {
            return Err(e);
        }
        let prepared = Prepared::new(batch)?;
        let (reply, answer) = oneshot::channel();
        {
            let mut committer = self.inner.committer.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(committer) = committer.as_mut() else { return Err(StorageError::Closed) };
            committer.commit(prepared, reply);
        }
        // A dropped reply means the syncer stopped (closed) without taking this write.
        answer.await.map_err(|_| StorageError::Closed)?
    }

    /// Events of `entity` with seq > `after_seq`, in seq order, as raw bytes.
    pub fn read_events(&self, entity: &str, after_seq: u64) -> Result<Vec<StoredEvent>, StorageError> {
        keys::check_entity(entity)?;
        let shared = self.shared();
        let prefix = keys::event_prefix(entity);
        // A packed record is keyed by its last seq, so this start also finds one that holds
        // `after_seq + 1` among earlier events.
        let start = keys::event_key(&prefix, after_seq.saturating_add(1));
        let end = keys::prefix_end(&prefix)
            .ok_or_else(|| StorageError::InvalidKey { reason: "entity name has no upper bound".to_owned() })?;
        shared.read(|db| {
            let mut out = Vec::new();
            let mut expected = after_seq.saturating_add(1);
            for item in shared.scan(db, Bound::Included(start), Bound::Excluded(end), false) {
                let (key, value) = item.map_err(|e| shared.sled_error("read events", e))?;
                let (last, count) =
                    keys::event_seq(&prefix, &key).ok_or_else(|| shared.corrupt(&key, "malformed event key", None))?;
                let first = last - u64::from(count) + 1;
                // Seqs are assigned contiguously and events are never deleted: a gap means the
                // engine lost a record, which must not pass as a shorter history. A record may
                // start before `expected`: a packed one holding it among earlier events, or
                // records the checkpoint packed together, seen both ways while it moves them
                // (or both kept after a crash in the middle): events already read are skipped.
                if first > expected {
                    return Err(shared.corrupt(
                        &key,
                        format!("event sequence gap: expected seq {expected}, found {first}"),
                        None,
                    ));
                }
                if last < expected {
                    continue;
                }
                let events = keys::record_events(&value, count)
                    .ok_or_else(|| shared.corrupt(&key, format!("packed record does not hold {count} events"), None))?;
                out.extend(
                    (first..)
                        .zip(events)
                        .filter(|(seq, _)| *seq >= expected)
                        .map(|(seq, bytes)| StoredEvent { seq, bytes }),
                );
                expected = last + 1;
            }
            Ok(out)
        })
    }

    /// Names of entities with events, in name order, after `after` (`None`: from the first),
    /// at most `limit`. One seek per entity: every entity's events are one key range.
    pub fn entities_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        let shared = self.shared();
        let space = keys::tagged(keys::EVENT, b"");
        let space_end = keys::prefix_end(&space)
            .ok_or_else(|| StorageError::InvalidKey { reason: "event keyspace has no upper bound".to_owned() })?;
        let mut start = match after {
            Some(entity) => {
                keys::check_entity(entity)?;
                keys::prefix_end(&keys::event_prefix(entity))
                    .ok_or_else(|| StorageError::InvalidKey { reason: "entity name has no upper bound".to_owned() })?
            }
            None => space.clone(),
        };
        shared.read(|db| {
            let mut out = Vec::new();
            while out.len() < limit {
                let mut range =
                    shared.scan(db, Bound::Included(start.clone()), Bound::Excluded(space_end.clone()), false);
                let Some(item) = range.next() else { break };
                let (key, _) = item.map_err(|e| shared.sled_error("scan entities", e))?;
                let name = key[space.len()..]
                    .split(|b| *b == 0)
                    .next()
                    .filter(|name| !name.is_empty())
                    .ok_or_else(|| shared.corrupt(&key, "malformed event key", None))?;
                let name =
                    std::str::from_utf8(name).map_err(|_| shared.corrupt(&key, "entity name is not UTF-8", None))?;
                start = keys::prefix_end(&keys::event_prefix(name))
                    .ok_or_else(|| shared.corrupt(&key, "entity name has no upper bound", None))?;
                out.push(name.to_owned());
            }
            Ok(out)
        })
    }

    /// The entity's latest snapshot, if any.
    pub fn load_snapshot(&self, entity: &str) -> Result<Option<Snapshot>, StorageError> {
        keys::check_entity(entity)?;
        let shared = self.shared();
        let key = keys::tagged(keys::SNAPSHOT, entity.as_bytes());
        shared.read(|db| {
            let Some(value) = shared.get(db, &key).map_err(|e| shared.sled_error("load snapshot", e))? else {
                return Ok(None);
            };
            let snap: SnapshotValue = shared.decode(&key, &value)?;
            Ok(Some(Snapshot { entity: entity.to_owned(), seq: snap.seq, bytes: snap.bytes }))
        })
    }

    /// Current version of `entity` (seq of its last event; 0 if none).
    pub fn version(&self, entity: &str) -> Result<u64, StorageError> {
        keys::check_entity(entity)?;
        let shared = self.shared();
        let prefix = keys::event_prefix(entity);
        shared.read(|db| committer::read_version(shared, db, &prefix))
    }

    /// Outbox entries with id > `after` (`None`: from the start), at most `limit`, in id order;
    /// only entries already durable.
    pub fn outbox_pending(&self, after: Option<u64>, limit: usize) -> Result<Vec<OutboxEntry>, StorageError> {
        let shared = self.shared();
        let durable = shared.durable_outbox.load(Ordering::Acquire);
        let start = after.map_or(0, |a| a.saturating_add(1));
        if limit == 0 || start > durable {
            return Ok(Vec::new());
        }
        let (lower, upper) =
            (Bound::Included(keys::outbox_key(start).to_vec()), Bound::Included(keys::outbox_key(durable).to_vec()));
        shared.read(|db| {
            let mut out = Vec::with_capacity(limit.min(1024));
            for item in shared.scan(db, lower, upper, false).take(limit) {
                let (key, value) = item.map_err(|e| shared.sled_error("read outbox", e))?;
                let id = keys::outbox_id(&key).ok_or_else(|| shared.corrupt(&key, "malformed outbox key", None))?;
                out.push(OutboxEntry { id, bytes: value.to_vec() });
            }
            Ok(out)
        })
    }

    /// Removes delivered outbox entries. Not logged nor fsynced by itself (the next checkpoint,
    /// or close, carries it): a lost delete only causes a redelivery, which consumers dedup.
    pub fn outbox_ack(&self, ids: &[u64]) -> Result<(), StorageError> {
        if ids.is_empty() {
            return Ok(());
        }
        let shared = self.shared();
        // Into the write buffer: an entry delivered before the next checkpoint never reaches
        // sled. An ack lost in a crash only means a redelivery, which consumers deduplicate.
        shared.read(|_| {
            shared.buffer.remove(ids.iter().map(|id| keys::outbox_key(*id).to_vec()));
            Ok(())
        })
    }

    /// The outbox's wake-up: notified after each durable commit that added outbox entries. It
    /// keeps a permit when nobody is waiting, so a relay that checks `outbox_pending` and then
    /// waits misses nothing.
    pub fn outbox_notify(&self) -> Arc<Notify> {
        self.shared().notify.clone()
    }

    /// The record of a claimed idempotency key.
    pub fn idempotency_get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StorageError> {
        let shared = self.shared();
        let tree_key = keys::tagged(keys::IDEMPOTENCY, key.as_bytes());
        shared.read(|db| committer::read_claim(shared, db, &tree_key, key))
    }

    /// Deletes idempotency records created before `cutoff_ms`; returns how many. Not fsynced by
    /// itself (a lost delete only keeps a record longer).
    pub fn purge_idempotency(&self, cutoff_ms: u64) -> Result<usize, StorageError> {
        let shared = self.shared();
        let prefix = keys::tagged(keys::IDEMPOTENCY, b"");
        shared.read(|db| {
            let mut purged = 0;
            let end = keys::prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
            for item in shared.scan(db, Bound::Included(prefix.clone()), end, false) {
                let (key, value) = item.map_err(|e| shared.sled_error("scan idempotency", e))?;
                let record: IdempotencyValue = shared.decode(&key, &value)?;
                if record.created_at_ms >= cutoff_ms {
                    continue;
                }
                // Compare-and-remove: only delete the exact record we judged old, never one that a
                // concurrent commit claimed anew after another purge removed the old one.
                match shared.buffer.remove_if(db, &key, &value) {
                    Ok(true) => purged += 1,
                    Ok(false) => {} // changed under us: not ours to delete
                    Err(e) => return Err(shared.sled_error("purge idempotency", e)),
                }
            }
            Ok(purged)
        })
    }

    /// Index entries whose key starts with `prefix`, strictly after `start_after` (a full key) if
    /// given, ascending, at most `limit`.
    pub fn index_scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let shared = self.shared();
        let full_prefix = keys::tagged(keys::INDEX, prefix);
        let start = match start_after {
            Some(after) => {
                let after = keys::tagged(keys::INDEX, after);
                if after >= full_prefix { Bound::Excluded(after) } else { Bound::Included(full_prefix.clone()) }
            }
            None => Bound::Included(full_prefix.clone()),
        };
        // `x` is not 0xFF, so the keyspace prefix always has an end.
        let end = keys::prefix_end(&full_prefix).map_or(Bound::Unbounded, Bound::Excluded);
        if let (Bound::Excluded(s) | Bound::Included(s), Bound::Excluded(e)) = (&start, &end)
            && s >= e
        {
            return Ok(Vec::new());
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        shared.read(|db| {
            let mut out = Vec::new();
            for item in shared.scan(db, start, end, false).take(limit) {
                let (key, value) = item.map_err(|e| shared.sled_error("scan index", e))?;
                out.push((key[2..].to_vec(), value.to_vec()));
            }
            Ok(out)
        })
    }

    /// One index entry.
    pub fn index_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let shared = self.shared();
        let tree_key = keys::tagged(keys::INDEX, key);
        shared.read(|db| {
            shared.get(db, &tree_key).map(|v| v.map(|v| v.to_vec())).map_err(|e| shared.sled_error("read index", e))
        })
    }

    /// Counters of the write path.
    pub fn stats(&self) -> StoreStats {
        let shared = self.shared();
        StoreStats {
            fsyncs: shared.fsyncs.load(Ordering::Relaxed),
            rounds: shared.rounds.load(Ordering::Relaxed),
            writes: shared.writes.load(Ordering::Relaxed),
        }
    }

    /// Waits until queued commits are done, flushes and fsyncs, stops the syncer thread and
    /// releases the database files. Idempotent; also done when the last clone is dropped. Blocks
    /// the calling thread for about one fsync.
    pub fn close(&self) -> Result<(), StorageError> {
        self.inner.close()
    }
}

/// Name of the store directory's metric and log label.
fn store_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

type Parts = (Arc<Shared>, Committer);

/// Removes the keys of [`keys::RETIRED`] keyspaces left by older builds (after the log's replay,
/// which may put some back, and the integrity checks; before the write buffer reads what sled
/// holds). Straight into sled, unlogged: a crash in the middle only leaves some for the next
/// open. Made durable with everything else recovery found when the committer starts.
fn remove_retired_keyspaces(db: &sled::Db, store: &str) -> sled::Result<()> {
    const BATCH: usize = 10_000;
    for &(tag, what) in keys::RETIRED {
        let prefix = [tag, 0];
        let end = Bound::Excluded(vec![tag, 1]);
        let mut from = Bound::Included(prefix.to_vec());
        let mut removed = 0usize;
        loop {
            let batch = db.range((from.clone(), end.clone())).keys().take(BATCH).collect::<sled::Result<Vec<_>>>()?;
            let Some(last) = batch.last() else { break };
            from = Bound::Excluded(last.to_vec());
            for key in &batch {
                db.remove(key)?;
            }
            removed += batch.len();
            tracing::debug!(store, removed, "removing {what} no build reads any more");
        }
        if removed > 0 {
            tracing::info!(store, removed, "removed {what} no build reads any more");
        }
    }
    Ok(())
}

/// Opens sled, checks the store's integrity markers, restores counters and makes the recovered
/// state durable; everything of `Store::open` but starting the syncer thread.
fn open_parts(path: &Path, options: StoreOptions) -> Result<Parts, StorageError> {
    let path = path.to_path_buf();
    fs::create_dir_all(&path).map_err(|e| open_error(&path, e))?;
    let name = store_name(&path);
    let sentinel = read_sentinel(&path)?;

    let config = sled::Config::new()
        .path(&path)
        .mode(sled::Mode::HighThroughput)
        .segment_size(segment_size(&path))
        .cache_capacity(options.cache_bytes)
        // Durability comes from our write-ahead log and sled is flushed at our checkpoints;
        // sled's background flusher would only add I/O and contend with the committer.
        .flush_every_ms(None);
    remove_unfinished_sled_snapshots(&path)?;
    // sled 0.34 has unwraps in its recovery path; a corrupt file must be an error naming the
    // store, not a crashed node.
    let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            open_error_msg(
                &path,
                io::ErrorKind::InvalidData,
                format!("storage engine panicked while recovering: {msg}"),
            )
        })?
        .map_err(|e| sled_open_error(&path, e))?;

    // The layout marker is the first thing a new store writes and is never deleted, so an
    // initialised store without it has lost data (or is not ours).
    match db.get(keys::META_LAYOUT) {
        Ok(Some(v)) => {
            let layout: u32 = decode_meta(&path, keys::META_LAYOUT, &v)?;
            if layout != keys::LAYOUT_VERSION {
                return Err(open_error_msg(
                    &path,
                    io::ErrorKind::InvalidData,
                    format!("store key layout version {layout}, this build reads {}", keys::LAYOUT_VERSION),
                ));
            }
        }
        Ok(None) if sentinel.is_some() => {
            return Err(open_error_msg(
                &path,
                io::ErrorKind::InvalidData,
                "store was initialised but its layout marker is gone: data lost or damaged",
            ));
        }
        Ok(None) => {
            let marker = codec::encode(&keys::LAYOUT_VERSION)
                .map_err(|e| open_error_msg(&path, io::ErrorKind::InvalidData, e.to_string()))?;
            db.insert(keys::META_LAYOUT, marker).map_err(|e| sled_open_error(&path, e))?;
        }
        Err(e) => return Err(sled_open_error(&path, e)),
    }

    // sled recovered some prefix of the applied commit groups (each one atomic batch with its
    // number); the write-ahead log has every group acknowledged since the last checkpoint.
    let recovered: u64 = match db.get(keys::META_COMMIT_SEQ) {
        Ok(Some(v)) => decode_meta(&path, keys::META_COMMIT_SEQ, &v)?,
        Ok(None) => 0,
        Err(e) => return Err(sled_open_error(&path, e)),
    };
    let commit_seq = wal::replay(&path.join(wal::WAL_DIR), recovered, |record| {
        committer::apply_changes(&db, record.changes).map_err(|e| e.to_string())
    })
    .map_err(|e| match e {
        wal::ReplayError::Io(e) => open_error(&path, e),
        wal::ReplayError::Damaged(what) => open_error_msg(
            &path,
            io::ErrorKind::InvalidData,
            format!("write-ahead log damaged: {what}; acknowledged data would be lost"),
        ),
        wal::ReplayError::Apply(e) => {
            open_error_msg(&path, io::ErrorKind::Other, format!("cannot apply the write-ahead log: {e}"))
        }
    })?;
    if commit_seq > recovered {
        tracing::info!(store = %name, groups = commit_seq - recovered, "replayed the write-ahead log");
    }

    // sled treats a corrupt record like a torn tail and silently recovers the log up to it. The
    // commit-group count recorded durably at the last clean close (or once a second while
    // writing) catches that case when the log cannot make up for it.
    if let Some(durable) = sentinel
        && commit_seq < durable
    {
        return Err(open_error_msg(
            &path,
            io::ErrorKind::InvalidData,
            format!(
                "store recovered {commit_seq} commit groups but {durable} were known durable: \
                 data lost or damaged"
            ),
        ));
    }

    remove_retired_keyspaces(&db, &name).map_err(|e| sled_open_error(&path, e))?;
    let next_outbox = restore_outbox_counter(&db, &path)?;

    let shared = Arc::new(Shared {
        name,
        path: path.clone(),
        db: RwLock::new(Some(db.clone())),
        durable_outbox: AtomicU64::new(next_outbox - 1),
        notify: Arc::new(Notify::new()),
        fsyncs: AtomicU64::new(0),
        rounds: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        poisoned: OnceLock::new(),
        write_cost_ns: AtomicU64::new(0),
        buffer: WriteBuffer::over(&db).map_err(|e| sled_open_error(&path, e))?,
    });

    // Creating the committer makes what recovery found (and the marker) durable before anything
    // is built on it, and starts a fresh write-ahead log.
    let committer =
        Committer::new(db, shared.clone(), &options, next_outbox, commit_seq).map_err(|e| open_error(&path, e))?;
    if sentinel.is_none() {
        write_sentinel(&path, commit_seq).map_err(|e| open_error(&path, e))?;
        shared.fsyncs.fetch_add(2, Ordering::Relaxed);
    }

    tracing::info!(store = %shared.name, path = %path.display(), next_outbox, commit_seq, "store opened");
    Ok((shared, committer))
}

/// Removes the snapshots sled was killed writing. sled 0.34 writes a snapshot of its page table
/// at every open into `snap.<lsn>.generating` and renames it to `snap.<lsn>` once synced, and
/// deletes the older ones only after that; but it lists `.generating` files among the snapshots
/// it reads, and takes the last one by name, so a kill before the rename left a half-written
/// file that it then refused as corrupt at every later open (`Corruption { at: None }`: seen in
/// the kill -9 crash test). Without it, sled reads the previous snapshot and its log, as if the
/// kill had come before the write began.
fn remove_unfinished_sled_snapshots(path: &Path) -> Result<(), StorageError> {
    for entry in fs::read_dir(path).map_err(|e| open_error(path, e))? {
        let file = entry.map_err(|e| open_error(path, e))?.path();
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(store = %path.display(), file = name, "removing a snapshot sled did not finish writing");
            fs::remove_file(&file).map_err(|e| open_error(path, e))?;
        }
    }
    Ok(())
}

/// sled's log segment (and I/O buffer) size. sled writes and `sync_file_range`s a buffer each
/// time one fills: with its default of 512 KiB that was a fifth of the saga bench's CPU; at 8 MiB
/// it writes 16 times less often. sled refuses to open a database with a size other than the one
/// it was created with, so an existing store keeps the size in its `conf` file.
fn segment_size(path: &Path) -> usize {
    const NEW_STORES: usize = 8 * 1024 * 1024;
    fs::read_to_string(path.join("conf"))
        .ok()
        .and_then(|conf| {
            conf.lines().find_map(|line| line.strip_prefix("segment_size: ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(NEW_STORES)
}

fn decode_meta<T: serde::de::DeserializeOwned>(path: &Path, key: &[u8], value: &[u8]) -> Result<T, StorageError> {
    codec::decode(value).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        key: keys::describe(key),
        detail: "cannot decode store metadata".to_owned(),
        source: Some(e),
    })
}

/// The next outbox id: past the persisted counter and past the last entry present. (The counter
/// is written in the same atomic batch as the entries, so it alone should do; the last key costs
/// one lookup and guards against reusing an id, which would make consumers drop a message.)
fn restore_outbox_counter(db: &sled::Db, path: &Path) -> Result<u64, StorageError> {
    let counter: u64 = match db.get(keys::META_OUTBOX_NEXT) {
        Ok(Some(v)) => decode_meta(path, keys::META_OUTBOX_NEXT, &v)?,
        Ok(None) => 1,
        Err(e) => return Err(sled_open_error(path, e)),
    };
    let range = keys::outbox_key(0)..=keys::outbox_key(u64::MAX);
    let last = match db.range(range).next_back() {
        Some(Ok((key, _))) => keys::outbox_id(&key).ok_or_else(|| StorageError::Corrupt {
            path: path.to_path_buf(),
            key: keys::describe(&key),
            detail: "malformed outbox key".to_owned(),
            source: None,
        })?,
        Some(Err(e)) => return Err(sled_open_error(path, e)),
        None => 0,
    };
    Ok(counter.max(last.saturating_add(1)).max(1))
}

const SENTINEL_HEADER: &str = "ordermesh store";

/// Reads the sentinel file: `None` if the directory holds no initialised store, else the commit
/// group count last recorded as durable (at a clean close, or by the committer's checkpoint).
fn read_sentinel(path: &Path) -> Result<Option<u64>, StorageError> {
    let text = match fs::read_to_string(path.join(SENTINEL)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(open_error(path, e)),
    };
    let mut lines = text.lines();
    let mut seq = None;
    if lines.next() == Some(SENTINEL_HEADER) {
        for line in lines {
            if let Some(v) = line.strip_prefix("durable_commit_seq ") {
                seq = v.trim().parse::<u64>().ok();
            }
        }
    }
    match seq {
        Some(seq) => Ok(Some(seq)),
        None => Err(open_error_msg(path, io::ErrorKind::InvalidData, format!("unreadable {SENTINEL} file"))),
    }
}

/// Writes the sentinel file atomically and durably (temp file, fsync, rename, fsync dir).
pub(crate) fn write_sentinel(path: &Path, durable_commit_seq: u64) -> io::Result<()> {
    let tmp = path.join(format!("{SENTINEL}.tmp"));
    let file = fs::File::create(&tmp)?;
    io::Write::write_all(
        &mut &file,
        format!("{SENTINEL_HEADER}\nlayout {}\ndurable_commit_seq {durable_commit_seq}\n", keys::LAYOUT_VERSION)
            .as_bytes(),
    )?;
    file.sync_all()?;
    fs::rename(&tmp, path.join(SENTINEL))?;
    fs::File::open(path)?.sync_all()
}

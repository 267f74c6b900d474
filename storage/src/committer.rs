//! Group commit: the write path's back half.
//!
//! Why group commit: an fsync costs milliseconds (about 3.4 ms on our machines), so one fsync per
//! write caps a store near 300 writes/s. Instead every `Store::commit` hands its (already
//! encoded) batch on and waits; one log write and one fsync acknowledge everything handed on
//! meanwhile.
//!
//! Two stages:
//!
//! - the *committer*, run by each writer in turn under the store's committer lock (no thread of
//!   its own, see [`Committer`]), checks the batch against everything applied before it, gives
//!   it the next commit-group number, applies it to the write buffer ([`crate::buffer`]), encodes
//!   its write-ahead log record ([`crate::wal`]) and hands it to the syncer;
//! - the *syncer*, a thread, takes every write handed over since its last round, appends their
//!   records to the log, fsyncs it, and only then publishes the durable outbox watermark and
//!   answers their waiters. It also asks the checkpoint thread ([`crate::checkpoint`]) to move
//!   the write buffer into sled and make sled's files durable from time to time, after which the
//!   older log goes.
//!
//! So applying (CPU) overlaps with logging and fsyncing (the disk), and an fsync covers every
//! write applied while the previous one ran: under load each fsync acknowledges hundreds of
//! writes. The syncer may also wait a fraction of a round for writers it just acknowledged to
//! come back (see `Syncer::gather`), so that a moderate number of writers shares one fsync
//! instead of settling into two alternating half-size cohorts.
//!
//! The syncer and the checkpointer are std threads, not tokio tasks, because all they do is
//! block (fsync, sled writes) and they must not starve or be starved by async work.
//!
//! Because only the committer writes versions and idempotency claims, and one
//! writer at a time, its checks cannot race with another writer, and it may cache entity
//! versions. A write it applies may be visible to reads before its fsync returns; nobody is
//! acknowledged, and no outbox entry handed out, before that. If a log write, fsync or
//! checkpoint fails, nothing of the failed round nor anything after it is ever acknowledged:
//! the store is poisoned (see [`StorageError::Poisoned`]).

use std::io;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use foldhash::HashMap;
use tokio::sync::oneshot;

use crate::checkpoint::{Checkpointer, Checkpoints};
use crate::codec;
use crate::cpu;
use crate::error::StorageError;
use crate::keys;
use crate::store::{Committed, IdempotencyRecord, IdempotencyValue, Prepared, Shared, StoreOptions};
use crate::wal::{self, Change, WAL_DIR, Wal, WalRecord};

/// How often the syncer records the durable commit-group count in the sentinel file (two
/// fsyncs). sled recovers a log with a corrupt record as if it ended there, silently; with this
/// record, an open that recovers fewer groups than were durable a second before the crash is
/// an error instead of a shorter history.
const SENTINEL_EVERY: Duration = Duration::from_secs(1);

/// How often the syncer checkpoints: flushes sled and fsyncs its files, after which the
/// write-ahead log up to that point is redundant and retired. Bounds the log's size and the
/// replay at open; sled writes its full buffers by itself meanwhile.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// A write-ahead log segment this large checkpoints early.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// How many times `min_round_interval` the syncer paces its rounds while the machine's cores
/// are saturated (see `Syncer::pace`): measured in `ordermesh dev` under a closed loop of 64,
/// 2 gave about 10% more orders per second, 3 no more than 2.
const SATURATED_PACING: u32 = 2;

/// Entity versions the committer caches per generation (two generations, ~100 bytes each).
/// Small on purpose: a table of 100,000 was a cache miss per lookup (about 1% of `dev`'s CPU
/// under load), and what is written again soon (an order's saga steps, a hot stock item) was
/// written within the last few thousand writes.
const VERSION_GENERATION: usize = 4096;

type Reply = oneshot::Sender<Result<Committed, StorageError>>;

/// One write the committer has checked (and applied, if accepted), on its way to the disk.
struct Applied {
    reply: Reply,
    /// Rejections are answered too, but only once the state they were judged against is durable.
    answer: Result<Committed, StorageError>,
    /// Highest outbox id the write added, if it added any.
    outbox_watermark: Option<u64>,
    /// Its commit-group number and framed write-ahead log record, if it was accepted.
    logged: Option<(u64, Vec<u8>)>,
    /// When it was applied (see `Syncer::gather`).
    applied_at: Instant,
}

/// Longest time the syncer waits for more writes before starting a round (see `Syncer::gather`).
const MAX_GATHER_WINDOW: Duration = Duration::from_millis(1);

/// The committer's final count and where to answer, when it asks the syncer to stop.
type CloseRequest = (u64, mpsc::SyncSender<Result<(), StorageError>>);

/// A message to the syncer.
enum SyncMessage {
    Write(Applied),
    /// Make everything durable (with the final commit-group count) and stop.
    Close {
        commit_seq: u64,
        reply: mpsc::SyncSender<Result<(), StorageError>>,
    },
}

/// Reads an entity's version: the seq of its last event (0 if it has none). `prefix` is the
/// entity's event-key prefix. There is no separate head record: writing one with every append
/// cost about a third of the write path's CPU in sled, and the last event key says the same.
pub(crate) fn read_version(shared: &Shared, db: &sled::Db, prefix: &[u8]) -> Result<u64, StorageError> {
    // An event prefix ends with the 0x00 separator, so it always has an end.
    let Some(end) = keys::prefix_end(prefix) else {
        return Ok(0);
    };
    match shared.scan(db, Bound::Included(prefix.to_vec()), Bound::Excluded(end), true).next() {
        None => Ok(0),
        Some(Ok((key, _))) => keys::event_seq(prefix, &key)
            .map(|(last, _)| last)
            .ok_or_else(|| shared.corrupt(&key, "malformed event key", None)),
        Some(Err(e)) => Err(shared.sled_error("read version", e)),
    }
}

/// Reads an idempotency record.
pub(crate) fn read_claim(
    shared: &Shared,
    db: &sled::Db,
    tree_key: &[u8],
    key: &str,
) -> Result<Option<IdempotencyRecord>, StorageError> {
    match shared.get(db, tree_key).map_err(|e| shared.sled_error("read idempotency", e))? {
        Some(v) => {
            let value: IdempotencyValue = shared.decode(tree_key, &v)?;
            Ok(Some(IdempotencyRecord { key: key.to_owned(), value: value.value, created_at_ms: value.created_at_ms }))
        }
        None => Ok(None),
    }
}

/// Where the committer sends applied writes: a syncer thread, or (unit tests) a syncer driven
/// inline.
enum SyncStage {
    Inline(Box<Syncer>),
    Thread { sender: mpsc::Sender<SyncMessage>, thread: JoinHandle<()> },
    Stopped,
}

/// Entity versions by event key prefix, in two generations: writes go to the young one, and
/// when it holds [`VERSION_GENERATION`] entries it becomes the old one (the old one's entries
/// are dropped). An entity written again within a generation or two is found; one that is not is
/// read from the store again.
#[derive(Default)]
struct VersionCache {
    young: HashMap<Vec<u8>, u64>,
    old: HashMap<Vec<u8>, u64>,
}

impl VersionCache {
    fn get(&self, prefix: &[u8]) -> Option<&u64> {
        self.young.get(prefix).or_else(|| self.old.get(prefix))
    }

    fn insert(&mut self, prefix: Vec<u8>, version: u64) {
        if self.young.len() >= VERSION_GENERATION {
            // The old table's memory is reused for the next young one.
            std::mem::swap(&mut self.young, &mut self.old);
            self.young.clear();
        }
        self.young.insert(prefix, version);
    }
}

/// The front half of the write path, run by each writer under the store's committer lock.
///
/// Why not a thread of its own (as before the write buffer): once a write no longer touched
/// sled, checking and applying it took microseconds, and handing it to a committer thread cost
/// more than that: a futex wake and two context switches per write (8 writes per order).
/// Under the lock, writes are numbered, checked against everything applied before them and put
/// into the write buffer in one order, which is also the log's order.
pub(crate) struct Committer {
    pub(crate) db: sled::Db,
    pub(crate) shared: Arc<Shared>,
    next_outbox: u64,
    /// Commit groups ever applied to this store (see `keys`); each accepted write is one.
    commit_seq: u64,
    /// Entity versions as of the last applied write. Exact, not a guess: only the committer
    /// writes versions. Bounded by [`VersionCache`]'s two generations.
    versions: VersionCache,
    sync: SyncStage,
}

impl Committer {
    pub(crate) fn new(
        db: sled::Db,
        shared: Arc<Shared>,
        options: &StoreOptions,
        next_outbox: u64,
        commit_seq: u64,
    ) -> io::Result<Committer> {
        // Makes what recovery found durable and starts the write-ahead log after it.
        let syncer = Syncer::new(db.clone(), shared.clone(), options, commit_seq)?;
        Ok(Committer {
            db,
            shared,
            next_outbox,
            commit_seq,
            versions: VersionCache::default(),
            sync: SyncStage::Inline(Box::new(syncer)),
        })
    }

    /// Moves the syncer onto a thread of its own (a store not yet started syncs inline).
    pub(crate) fn start_syncer(&mut self) -> io::Result<()> {
        let SyncStage::Inline(syncer) = std::mem::replace(&mut self.sync, SyncStage::Stopped) else {
            return Ok(());
        };
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("storage-sync-{}", self.shared.name))
            .spawn(move || syncer.run(receiver))?;
        self.sync = SyncStage::Thread { sender, thread };
        Ok(())
    }

    /// Checks one write and applies it (to the write buffer), then hands it to the syncer,
    /// which answers `reply` once its log record is durable.
    pub(crate) fn commit(&mut self, batch: Prepared, reply: Reply) {
        if let Some(cause) = self.shared.poisoned.get() {
            let _ = reply.send(Err(StorageError::Poisoned { path: self.shared.path.clone(), cause: cause.clone() }));
            return;
        }
        let started = Instant::now();
        let (answer, logged) = match self.check(&batch) {
            Err(rejection) => (Err(rejection), None),
            Ok(()) => {
                let (committed, changes) = self.accept(batch);
                match self.apply(changes, !committed.outbox_ids.is_empty()) {
                    Ok(logged) => (Ok(committed), Some(logged)),
                    Err(cause) => {
                        tracing::error!(store = %self.shared.name, error = %cause, "commit failed; store poisoned");
                        let _ = self.shared.poisoned.set(cause.clone());
                        let _ = reply.send(Err(self.shared.io_error("commit", &cause)));
                        return;
                    }
                }
            }
        };
        // Moving average (weight 1/8) of the cost of one write here, for the syncer's gather.
        let cost = started.elapsed().as_nanos() as u64;
        let average = self.shared.write_cost_ns.load(Ordering::Relaxed);
        self.shared.write_cost_ns.store((average * 7 + cost) / 8, Ordering::Relaxed);
        let applied = Applied {
            outbox_watermark: answer.as_ref().ok().and_then(|c| c.outbox_ids.last().copied()),
            reply,
            answer,
            logged,
            applied_at: Instant::now(),
        };
        match &mut self.sync {
            SyncStage::Inline(syncer) => syncer.sync_writes(vec![applied]),
            SyncStage::Thread { sender, .. } => {
                if let Err(mpsc::SendError(SyncMessage::Write(applied))) = sender.send(SyncMessage::Write(applied)) {
                    // The syncer is gone (it panicked): nobody can make this durable.
                    let _ = self.shared.poisoned.set("syncer thread is gone".to_owned());
                    let _ = applied.reply.send(Err(self.shared.io_error("commit", "syncer thread is gone")));
                }
            }
            SyncStage::Stopped => {
                let _ = applied.reply.send(Err(StorageError::Closed));
            }
        }
    }

    /// Validates one batch against the store (as of every write applied before it). Does not
    /// change anything, so a rejected batch leaves no trace.
    fn check(&self, batch: &Prepared) -> Result<(), StorageError> {
        for (i, append) in batch.appends.iter().enumerate() {
            // An entity may appear twice in one batch: the later append builds on the earlier.
            let current = match batch.appends[..i].iter().rev().find(|a| a.prefix == append.prefix) {
                Some(earlier) => earlier.new_version,
                None => match self.versions.get(&append.prefix) {
                    Some(v) => *v,
                    None => read_version(&self.shared, &self.db, &append.prefix)?,
                },
            };
            if current != append.expected {
                return Err(StorageError::Conflict {
                    entity: append.entity.clone(),
                    expected: append.expected,
                    actual: current,
                });
            }
        }
        for (i, claim) in batch.idempotency.iter().enumerate() {
            let existing = match batch.idempotency[..i].iter().find(|c| c.key == claim.key) {
                Some(earlier) => Some(earlier.record.clone()),
                None => read_claim(&self.shared, &self.db, &claim.key, &claim.record.key)?,
            };
            if let Some(existing) = existing {
                return Err(StorageError::IdempotencyKeyTaken { key: claim.record.key.clone(), existing });
            }
        }
        Ok(())
    }

    /// Turns an accepted batch into its changes, numbering its outbox entries.
    fn accept(&mut self, prepared: Prepared) -> (Committed, Vec<Change>) {
        let mut batch = Vec::new();
        let mut versions = Vec::with_capacity(prepared.appends.len());
        for append in prepared.appends {
            for (key, bytes) in append.events {
                batch.push(Change::Put(key, bytes));
            }
            self.versions.insert(append.prefix, append.new_version);
            versions.push((append.entity, append.new_version));
        }
        for (key, value) in prepared.snapshots {
            batch.push(Change::Put(key, value));
        }
        let mut outbox_ids = Vec::with_capacity(prepared.outbox.len());
        for payload in prepared.outbox {
            let id = self.next_outbox;
            self.next_outbox += 1;
            batch.push(Change::Put(keys::outbox_key(id).to_vec(), payload));
            outbox_ids.push(id);
        }
        for claim in prepared.idempotency {
            batch.push(Change::Put(claim.key, claim.value));
        }
        // Deletes before puts: a later change of the same key wins.
        for key in prepared.index_delete {
            batch.push(Change::Remove(key));
        }
        for (key, value) in prepared.index_put {
            batch.push(Change::Put(key, value));
        }
        (Committed { outbox_ids, versions }, batch)
    }

    /// Applies a write (to the write buffer) as the next commit group, with the store's
    /// counters, and returns its number and framed write-ahead log record. The error is a
    /// message: the caller poisons the store with it.
    fn apply(&mut self, mut changes: Vec<Change>, added_outbox: bool) -> Result<(u64, Vec<u8>), String> {
        let seq = self.commit_seq + 1;
        if added_outbox {
            // Persist the counter with the entries, so ids never go backwards after a restart
            // even when every entry has been acknowledged and deleted.
            let next = codec::encode(&self.next_outbox).map_err(|e| e.to_string())?;
            changes.push(Change::Put(keys::META_OUTBOX_NEXT.to_vec(), next));
        }
        // The group's number goes last in its log record: replaying the log at open applies the
        // records after the number sled holds (see `apply_changes`). In the buffer it is the
        // table's `last_seq`, which a checkpoint writes to sled after everything else.
        let mut record = WalRecord { seq, changes };
        record
            .changes
            .push(Change::Put(keys::META_COMMIT_SEQ.to_vec(), codec::encode(&seq).map_err(|e| e.to_string())?));
        let framed = wal::frame(&record).map_err(|e| format!("encode log record: {e}"))?;
        record.changes.pop();
        self.shared.buffer.apply_group(seq, record.changes);
        self.commit_seq = seq;
        Ok((seq, framed))
    }

    /// For unit tests of a store whose syncer runs inline: moves the write buffer into sled now.
    #[cfg(test)]
    pub(crate) fn drain_buffer(&mut self) -> io::Result<()> {
        match &mut self.sync {
            SyncStage::Inline(syncer) => syncer.checkpoints.inline_drain(),
            _ => Err(io::Error::other("the syncer is not inline")),
        }
    }

    /// Makes everything durable, stops the syncer, and records the final commit-group count.
    pub(crate) fn stop(&mut self) -> Result<(), StorageError> {
        let commit_seq = self.commit_seq;
        match std::mem::replace(&mut self.sync, SyncStage::Stopped) {
            SyncStage::Inline(mut syncer) => syncer.final_sync(commit_seq),
            SyncStage::Thread { sender, thread } => {
                let (reply, answer) = mpsc::sync_channel(1);
                let result = match sender.send(SyncMessage::Close { commit_seq, reply }) {
                    Ok(()) => answer.recv().unwrap_or_else(|_| {
                        Err(self.shared.io_error("close", "syncer thread ended without answering"))
                    }),
                    Err(_) => Err(self.shared.io_error("close", "syncer thread is gone")),
                };
                if thread.join().is_err() {
                    tracing::error!(store = %self.shared.name, "syncer thread panicked");
                }
                result
            }
            SyncStage::Stopped => Ok(()),
        }
    }
}

/// Applies a logged group's changes to sled one by one, in order: the log's replay at open
/// (before the write buffer reads the greatest keys sled holds; see `Shared::db`).
///
/// Why not sled's atomic `apply_batch`: in sled 0.34 every batch seals and writes sled's I/O
/// buffer twice (each time a `pwrite` and a `sync_file_range` on sled's threads). Atomicity comes
/// from the write-ahead log instead: sled recovers a prefix of its log, so after a crash it holds
/// everything up to the last recovered `m\0commit_seq` (written last by each checkpoint and by
/// each replayed record) plus perhaps a part of what followed, and replaying the log from that
/// number on redoes it whole (puts and removes of given values are idempotent).
pub(crate) fn apply_changes(db: &sled::Db, changes: Vec<Change>) -> sled::Result<()> {
    for change in changes {
        match change {
            Change::Put(key, value) => db.insert(key, value)?,
            Change::Remove(key) => db.remove(key)?,
        };
    }
    Ok(())
}

/// The syncer: log + fsync + acknowledgements; asks for checkpoints.
struct Syncer {
    shared: Arc<Shared>,
    fsync: bool,
    /// The write-ahead log: a round is durable once its records are appended and synced here.
    wal: Wal,
    dir: PathBuf,
    checkpoints: Checkpoints,
    /// The commit-group count last written to the sentinel file, and when.
    sentinel: (u64, Instant),
    /// The count covered by the last successful log sync.
    durable_seq: u64,
    /// When the last round's waiters were answered, how many, and the moving average of a
    /// round's time (see `gather`).
    acked_at: Instant,
    last_round: usize,
    round_avg: Duration,
    /// When the last round started, and the least time between two starts (see `gather`).
    round_started: Instant,
    min_round_interval: Duration,
    fsync_seconds: metrics::Histogram,
    commits: metrics::Counter,
    /// Writes made durable per round (per fsync).
    round_size: metrics::Histogram,
}

impl Syncer {
    /// At open: makes whatever recovery found (sled's state plus the replayed log) durable in
    /// sled's files, then starts a fresh log after `commit_seq`, deleting the replayed one.
    fn new(db: sled::Db, shared: Arc<Shared>, options: &StoreOptions, commit_seq: u64) -> io::Result<Syncer> {
        let (fsync, min_round_interval) = (options.fsync, options.min_round_interval);
        let dir = shared.path.clone();
        let mut checkpointer = Checkpointer::new(db, shared.clone(), fsync)?;
        checkpointer.sync_at_open()?;
        let wal = Wal::start(&dir.join(WAL_DIR), commit_seq + 1)?;
        wal::retire_before(&dir.join(WAL_DIR), commit_seq + 1, None)?;
        let label = shared.name.clone();
        Ok(Syncer {
            fsync_seconds: metrics::histogram!("storage_fsync_seconds", "store" => label.clone()),
            commits: metrics::counter!("storage_commits_total", "store" => label.clone()),
            round_size: metrics::histogram!("storage_commit_group_size", "store" => label),
            wal,
            shared,
            fsync,
            dir,
            checkpoints: Checkpoints::new(checkpointer, commit_seq),
            sentinel: (commit_seq, Instant::now()),
            durable_seq: commit_seq,
            acked_at: Instant::now(),
            last_round: 0,
            round_avg: Duration::ZERO,
            round_started: Instant::now(),
            min_round_interval,
        })
    }

    /// The syncer thread's body.
    fn run(mut self, groups: mpsc::Receiver<SyncMessage>) {
        if let Err(e) = self.checkpoints.start(&self.shared.name) {
            let cause = format!("cannot start the checkpoint thread: {e}");
            tracing::error!(store = %self.shared.name, error = %cause, "store unusable");
            let _ = self.shared.poisoned.set(cause);
        }
        loop {
            let mut round = Vec::new();
            let mut close = None;
            self.pace();
            let message = if self.checkpoints.requested != self.durable_seq {
                // Something is only in the log: wake up for the checkpoint even if idle.
                let wait = CHECKPOINT_EVERY.saturating_sub(self.checkpoints.requested_at.elapsed());
                match groups.recv_timeout(wait) {
                    Ok(message) => Some(message),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match groups.recv() {
                    Ok(message) => Some(message),
                    Err(mpsc::RecvError) => return, // the committer is gone
                }
            };
            match message {
                Some(SyncMessage::Write(write)) => round.push(write),
                Some(SyncMessage::Close { commit_seq, reply }) => close = Some((commit_seq, reply)),
                None => {}
            }
            if close.is_none() && !round.is_empty() {
                close = self.gather(&groups, &mut round);
            }
            if !round.is_empty() {
                let started = Instant::now();
                self.round_started = started;
                let writes = round.len();
                self.sync_writes(round);
                self.acked_at = Instant::now();
                self.last_round = writes;
                // Moving average (weight 1/8) of a round's time, for the gather window.
                self.round_avg = (self.round_avg * 7 + self.acked_at.duration_since(started)) / 8;
            }
            if let Some((commit_seq, reply)) = close {
                let _ = reply.send(self.final_sync(commit_seq));
                return;
            }
            self.maybe_checkpoint();
        }
    }

    /// While writers are concurrent (the last round carried more than one write), sleeps until
    /// `min_round_interval` after the last round started, twice that while the cores (or the CPU
    /// quota) are saturated ([`cpu::cores_saturated`]); writes handed over meanwhile wait in the
    /// channel for the next round.
    ///
    /// Why: a round costs 50-80 µs of CPU however few writes it carries (the `fdatasync` alone
    /// is ~50 µs of kernel time here, plus the wake-ups), and with a fast disk (0.2 ms) and many
    /// writers, rounds came back to back: 4,000+ a second for the three stores of `dev`, a fifth
    /// of the machine. One round per millisecond per store at most costs each write half a
    /// millisecond on average. A sleep, not a wait on the channel: that would wake this thread
    /// for every write. A lone writer (one saga step after another on an idle node) never waits.
    fn pace(&self) {
        if self.last_round > 1 {
            let interval = if cpu::cores_saturated() {
                self.min_round_interval.saturating_mul(SATURATED_PACING)
            } else {
                self.min_round_interval
            };
            let wait = interval.saturating_sub(self.round_started.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
    }

    /// Takes every write already handed over, and waits a little for more when the writers the
    /// last round acknowledged are about to be back.
    ///
    /// Why wait: when a round acknowledges N writers that write again at once, they come back
    /// one at a time. Starting the flush before they are back makes each of them wait
    /// for a whole extra round, and rounds settle into two alternating half-size cohorts: with a
    /// slow fsync (3.4 ms) and 16 writers that halves throughput. So while fewer writes applied
    /// *since the last acknowledgement* are in hand than that round acknowledged, wait, but only
    /// if the committer can apply the missing ones within a quarter of a round (flush + fsync),
    /// and never longer than that nor [`MAX_GATHER_WINDOW`]. With many writers (256) the missing
    /// ones would take longer to apply than that; not waiting then lets their apply overlap this
    /// round's fsync, which is better. A lone writer never waits (it is back as soon as it is
    /// acknowledged), and neither does a round after a quiet spell (nothing was acknowledged).
    fn gather(&mut self, writes: &mpsc::Receiver<SyncMessage>, round: &mut Vec<Applied>) -> Option<CloseRequest> {
        let window = (self.round_avg / 4).min(MAX_GATHER_WINDOW);
        let deadline = Instant::now() + window;
        let write_cost = Duration::from_nanos(self.shared.write_cost_ns.load(Ordering::Relaxed));
        let returned = |w: &Applied| w.applied_at >= self.acked_at;
        let mut back = round.iter().filter(|w| returned(w)).count();
        loop {
            let message = match writes.try_recv() {
                Ok(message) => message,
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) => {
                    let now = Instant::now();
                    let missing = self.last_round.saturating_sub(back);
                    if missing == 0
                        || now >= deadline
                        || write_cost.saturating_mul(u32::try_from(missing).unwrap_or(u32::MAX)) > window
                    {
                        return None;
                    }
                    match writes.recv_timeout(deadline - now) {
                        Ok(message) => message,
                        Err(_) => return None,
                    }
                }
            };
            match message {
                SyncMessage::Write(write) => {
                    back += usize::from(returned(&write));
                    round.push(write);
                }
                SyncMessage::Close { commit_seq, reply } => return Some((commit_seq, reply)),
            }
        }
    }

    /// Makes a round of applied writes durable and answers their waiters.
    pub(crate) fn sync_writes(&mut self, round: Vec<Applied>) {
        if let Some(cause) = self.shared.poisoned.get() {
            for write in round {
                let _ = write
                    .reply
                    .send(Err(StorageError::Poisoned { path: self.shared.path.clone(), cause: cause.clone() }));
            }
            return;
        }
        let accepted = round.iter().filter(|w| w.logged.is_some()).count() as u64;
        if accepted > 0
            && let Err(cause) = self.log(&round)
        {
            tracing::error!(store = %self.shared.name, error = %cause,
                    "write-ahead log write or fsync failed; store poisoned");
            let _ = self.shared.poisoned.set(cause.clone());
            for write in round {
                // Never an ack: the round may or may not be on disk.
                let _ = write.reply.send(Err(self.shared.io_error("commit", &cause)));
            }
            return;
        }
        let watermark = round.iter().filter_map(|w| w.outbox_watermark).max();
        if let Some(watermark) = watermark {
            self.shared.durable_outbox.fetch_max(watermark, Ordering::Release);
            // Wake current waiters and leave a permit for a relay that is between checks.
            self.shared.notify.notify_waiters();
            self.shared.notify.notify_one();
        }
        if accepted > 0 {
            self.shared.rounds.fetch_add(1, Ordering::Relaxed);
            self.round_size.record(accepted as f64);
        }
        self.shared.writes.fetch_add(accepted, Ordering::Relaxed);
        self.commits.increment(accepted);
        if let Some(seq) = round.iter().filter_map(|w| w.logged.as_ref().map(|(seq, _)| *seq)).max() {
            self.durable_seq = self.durable_seq.max(seq);
        }
        for write in round {
            // The waiter may have given up (dropped its future); its write stands regardless.
            let _ = write.reply.send(write.answer);
        }
        if self.sentinel.0 != self.durable_seq && self.sentinel.1.elapsed() >= SENTINEL_EVERY {
            self.write_sentinel();
        }
    }

    /// Appends the round's records to the log, then the one fsync that acknowledges them all.
    fn log(&mut self, round: &[Applied]) -> Result<(), String> {
        let path = || self.dir.join(WAL_DIR).display().to_string();
        let records = round.iter().filter_map(|w| w.logged.as_ref()).map(|(_, record)| record.as_slice());
        self.wal.append(records).map_err(|e| format!("write {}: {e}", path()))?;
        if !self.fsync {
            return Ok(());
        }
        let started = Instant::now();
        self.wal.sync().map_err(|e| format!("fsync {}: {e}", path()))?;
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.fsync_seconds.record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Asks for a checkpoint when it is time (or the log grew large), something is only in the
    /// log, and no checkpoint is running. New records go to a new segment from here on; the
    /// checkpoint retires the older ones once sled's files hold what they held, making the
    /// spare of the segment after this one from them, sized by this one's `segment_bytes`.
    fn maybe_checkpoint(&mut self) {
        let checkpoints = &self.checkpoints;
        let due = checkpoints.requested_at.elapsed() >= CHECKPOINT_EVERY || self.wal.segment_bytes >= CHECKPOINT_BYTES;
        if checkpoints.requested == self.durable_seq
            || !due
            || checkpoints.busy()
            || self.shared.poisoned.get().is_some()
        {
            return;
        }
        let segment_bytes = self.wal.segment_bytes;
        let requested = self
            .wal
            .next_segment(self.durable_seq + 1)
            .map_err(|e| format!("start log segment in {}: {e}", self.dir.display()))
            .and_then(|()| self.checkpoints.request(self.durable_seq, segment_bytes));
        if let Err(cause) = requested {
            tracing::error!(store = %self.shared.name, error = %cause, "checkpoint failed; store poisoned");
            let _ = self.shared.poisoned.set(cause);
        }
    }

    /// Records the durable commit-group count in the sentinel file. A failure only weakens the
    /// loss detection at the next open, so it is logged, not fatal.
    fn write_sentinel(&mut self) {
        match crate::store::write_sentinel(&self.dir, self.durable_seq) {
            Ok(()) => {
                self.shared.fsyncs.fetch_add(2, Ordering::Relaxed);
                self.sentinel = (self.durable_seq, Instant::now());
            }
            Err(e) => {
                tracing::warn!(store = %self.shared.name, error = %e, "cannot write store sentinel");
                // Retry after another interval, not on every round.
                self.sentinel.1 = Instant::now();
            }
        }
    }

    /// At close: make everything durable in sled's files, including what did not go through a
    /// commit group (outbox acks, idempotency purges), empty the log, then record in the sentinel
    /// file how many commit groups the store holds, so the next open can tell if the engine lost
    /// any.
    fn final_sync(&mut self, commit_seq: u64) -> Result<(), StorageError> {
        if let Some(e) = self.shared.poisoned_error() {
            return Err(e);
        }
        self.durable_seq = self.durable_seq.max(commit_seq);
        let first_kept = self.durable_seq + 1;
        self.wal.next_segment(first_kept).map_err(|e| self.shared.io_error("close", e))?;
        let checkpointer = self.checkpoints.stop().map_err(|cause| self.shared.io_error("close", cause))?;
        checkpointer.checkpoint(first_kept, None).map_err(|e| self.shared.io_error("close", e))?;
        crate::store::write_sentinel(&self.dir, self.durable_seq).map_err(|e| self.shared.io_error("close", e))?;
        self.shared.fsyncs.fetch_add(2, Ordering::Relaxed);
        self.sentinel = (self.durable_seq, Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::{Store, WriteBatch};
    use crate::{Append, StoredEvent};

    type Answer = oneshot::Receiver<Result<Committed, StorageError>>;

    /// Commits through the committer by hand; the syncer is inline, so the answer is there.
    fn commit(store: &Store, batch: WriteBatch) -> Result<Committed, StorageError> {
        let (reply, mut answer): (Reply, Answer) = oneshot::channel();
        store.with_committer(|c| c.commit(Prepared::new(batch).unwrap(), reply));
        answer.try_recv().unwrap()
    }

    fn append(entity: &str, expected: u64, events: &[&[u8]]) -> WriteBatch {
        WriteBatch {
            appends: vec![Append {
                entity: entity.to_owned(),
                expected_version: expected,
                events: events.iter().map(|e| e.to_vec()).collect(),
            }],
            ..WriteBatch::default()
        }
    }

    fn claim(key: &str, value: &[u8]) -> IdempotencyRecord {
        IdempotencyRecord { key: key.to_owned(), value: value.to_vec(), created_at_ms: 1 }
    }

    fn options() -> StoreOptions {
        StoreOptions { fsync: false, ..StoreOptions::default() }
    }

    /// Each batch is checked against every one applied before it, durable or not; a rejected
    /// one leaves nothing behind, not even its other writes.
    #[test]
    fn batches_are_checked_against_those_applied_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();

        assert_eq!(commit(&store, append("order-1", 0, &[b"a1"])).unwrap().versions, vec![("order-1".to_owned(), 1)]);
        let same_version = commit(&store, append("order-1", 0, &[b"b1"])).unwrap_err();
        assert!(matches!(same_version, StorageError::Conflict { expected: 0, actual: 1, .. }));
        let chained = commit(&store, append("order-1", 1, &[b"c2", b"c3"])).unwrap();
        assert_eq!(chained.versions, vec![("order-1".to_owned(), 3)]);
        let mut with_claims = append("order-2", 0, &[b"d1"]);
        with_claims.idempotency = vec![claim("k1", b"first")];
        assert_eq!(commit(&store, with_claims).unwrap().versions, vec![("order-2".to_owned(), 1)]);
        // A batch with a taken claim writes nothing, not even its appends.
        let mut with_taken = append("order-3", 0, &[b"e1"]);
        with_taken.idempotency = vec![claim("k1", b"other")];
        assert!(matches!(commit(&store, with_taken).unwrap_err(), StorageError::IdempotencyKeyTaken { .. }));
        let taken = WriteBatch { idempotency: vec![claim("k1", b"second")], ..WriteBatch::default() };
        match commit(&store, taken).unwrap_err() {
            StorageError::IdempotencyKeyTaken { key, existing } => {
                assert_eq!(key, "k1");
                assert_eq!(existing, claim("k1", b"first"));
            }
            other => panic!("expected IdempotencyKeyTaken, got {other:?}"),
        }

        let events = store.read_events("order-1", 0).unwrap();
        let bytes: Vec<&[u8]> = events.iter().map(|e| e.bytes.as_slice()).collect();
        assert_eq!(bytes, vec![&b"a1"[..], b"c2", b"c3"]);
        assert_eq!(store.version("order-3").unwrap(), 0);
        assert_eq!(store.read_events("order-3", 0).unwrap(), Vec::<StoredEvent>::new());
        assert_eq!(store.idempotency_get("k1").unwrap(), Some(claim("k1", b"first")));
        assert_eq!(store.stats().writes, 3);
    }

    /// The version cache keeps two generations of writes: an entity written long ago (its
    /// version no longer cached) is checked against the store, recent ones against the cache, and
    /// both give the same answers.
    #[test]
    fn versions_are_checked_exactly_whether_cached_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();
        let entities = 3 * VERSION_GENERATION;
        for i in 0..entities {
            commit(&store, append(&format!("order-{i}"), 0, &[b"placed"])).unwrap();
        }
        // "order-0" left the cache two generations ago; the last one is in the young one.
        for i in [0, VERSION_GENERATION, entities - 1] {
            let entity = format!("order-{i}");
            let stale = commit(&store, append(&entity, 0, &[b"again"])).unwrap_err();
            assert!(matches!(stale, StorageError::Conflict { expected: 0, actual: 1, .. }), "{entity}: {stale:?}");
            let next = commit(&store, append(&entity, 1, &[b"reserved"])).unwrap();
            assert_eq!(next.versions, vec![(entity.clone(), 2)]);
            let stale = commit(&store, append(&entity, 1, &[b"again"])).unwrap_err();
            assert!(matches!(stale, StorageError::Conflict { expected: 1, actual: 2, .. }), "{entity}: {stale:?}");
        }
    }

    /// Between a write's apply and its fsync, its outbox entries are in the write buffer but must
    /// not be handed to a relay: a crash could still lose them after a consumer acted on them.
    #[test]
    fn applied_but_not_yet_durable_outbox_entries_are_not_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();
        let batch = WriteBatch { outbox: vec![b"durable".to_vec()], ..WriteBatch::default() };
        assert_eq!(commit(&store, batch).unwrap().outbox_ids, vec![1]);

        // What the committer has done for the next write just before its fsync: applied only.
        let applied = vec![Change::Put(keys::outbox_key(2).to_vec(), b"not yet durable".to_vec())];
        store.with_committer(|c| c.shared.buffer.apply_group(2, applied));

        let pending = store.outbox_pending(None, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, 1);
        assert_eq!(pending[0].bytes, b"durable");
    }

    /// After a failed flush/fsync the store refuses everything: it cannot know what is on disk.
    #[test]
    fn a_poisoned_store_refuses_writes_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();
        store.with_committer(|c| c.shared.poisoned.set("fsync: injected".to_owned()).unwrap());
        assert!(matches!(commit(&store, append("order-1", 0, &[b"x"])), Err(StorageError::Poisoned { .. })));
        let err = store.version("order-1").unwrap_err();
        assert!(matches!(err, StorageError::Poisoned { .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    /// The checkpoint packs the event records one entity wrote since the last move into one;
    /// reads are exact before, while both forms are visible, after, and after a restart.
    #[test]
    fn event_records_packed_by_the_checkpoint_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();
        // sled must hold an event key above order-1's first, or the buffer would rightly answer
        // order-1's reads without sled, and the packed record written below would go unread.
        commit(&store, append("order-9", 0, &[b"z1"])).unwrap();
        store.with_committer(|c| c.drain_buffer()).unwrap();
        commit(&store, append("order-1", 0, &[b"a1"])).unwrap();
        commit(&store, append("order-1", 1, &[b"a2", b"a3"])).unwrap();
        commit(&store, append("order-1", 3, &[b"a4"])).unwrap();
        let all: Vec<&[u8]> = vec![b"a1", b"a2", b"a3", b"a4"];
        let check = |store: &Store| {
            for after in 0..=4u64 {
                let events = store.read_events("order-1", after).unwrap();
                let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
                assert_eq!(seqs, ((after + 1)..=4).collect::<Vec<_>>(), "after {after}");
                let bytes: Vec<&[u8]> = events.iter().map(|e| e.bytes.as_slice()).collect();
                assert_eq!(bytes, all[after as usize..].to_vec(), "after {after}");
            }
            assert_eq!(store.version("order-1").unwrap(), 4);
        };
        check(&store);

        // What the checkpoint writes before it releases the buffer: both forms are visible.
        let prefix = keys::event_prefix("order-1");
        let events: Vec<Vec<u8>> = all.iter().map(|e| e.to_vec()).collect();
        store.with_committer(|c| {
            c.db.insert(keys::packed_event_key(&prefix, 4, 4), keys::pack_events(&events)).unwrap()
        });
        check(&store);

        store.with_committer(|c| c.drain_buffer()).unwrap();
        let records = store.with_committer(|c| c.db.scan_prefix(&prefix).count());
        assert_eq!(records, 1, "one packed record in sled");
        check(&store);

        store.close().unwrap();
        let reopened = Store::open(dir.path(), options()).unwrap();
        check(&reopened);
    }

    /// Keys of a retired keyspace (an older build's inbox marks) are gone after the next open,
    /// and nothing else is.
    #[test]
    fn retired_keyspaces_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();
        commit(&store, append("order-1", 0, &[b"a1"])).unwrap();
        store.with_committer(|c| {
            for i in 0..25_000 {
                c.db.insert(keys::tagged(b'i', format!("order-{i}/payment/2").as_bytes()), vec![]).unwrap();
            }
        });
        store.close().unwrap();
        drop(store);
        let store = Store::open_manual(dir.path(), options()).unwrap();
        assert_eq!(store.with_committer(|c| c.db.scan_prefix([b'i', 0]).count()), 0);
        assert_eq!(store.read_events("order-1", 0).unwrap().len(), 1);
        assert!(store.with_committer(|c| c.db.get(keys::META_LAYOUT).unwrap()).is_some());
        store.close().unwrap();
    }

    /// A key a drain wrote into sled and a later drain removes is removed from sled: the bound
    /// a drain raises covers it (an acknowledged outbox entry, the usual case under load: a
    /// relay acknowledges more than a drain period after the commit).
    #[test]
    fn a_removal_of_a_key_drained_before_reaches_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_manual(dir.path(), options()).unwrap();
        let batch = WriteBatch { outbox: vec![b"payload".to_vec()], ..append("order-1", 0, &[b"a1"]) };
        let id = commit(&store, batch).unwrap().outbox_ids[0];
        store.with_committer(|c| c.drain_buffer()).unwrap();
        let key = keys::outbox_key(id);
        assert!(store.with_committer(|c| c.db.get(key).unwrap()).is_some(), "drained into sled");
        store.outbox_ack(&[id]).unwrap();
        store.with_committer(|c| c.drain_buffer()).unwrap();
        assert!(store.with_committer(|c| c.db.get(key).unwrap()).is_none(), "removed from sled");
        assert!(store.outbox_pending(None, 10).unwrap().is_empty());
        store.close().unwrap();
    }
}

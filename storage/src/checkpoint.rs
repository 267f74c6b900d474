//! Checkpoints: writing the write buffer into sled and making sled's own files durable, after
//! which the write-ahead log before that point is redundant and retired (one segment becomes
//! the next one's zero-filled spare, the rest are deleted).
//!
//! Why a thread of its own: a checkpoint's fsync of sled's file writes back everything sled wrote
//! since the last one (tens of MiB under load) and took hundreds of milliseconds; done by the
//! syncer, it held every commit of the store for that long. Here the syncer only starts a new log
//! segment and asks; commits go on being logged and acknowledged meanwhile.
//!
//! Every group the syncer has logged when it asks was applied to the write buffer before that, so
//! the table the checkpoint then freezes and writes into sled holds them all (and perhaps some
//! groups not yet logged: sled may hold a group the log lacks, never the reverse).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::buffer::Table;
use crate::store::Shared;
use crate::{codec, keys, wal};

/// How often the write buffer is moved into sled between checkpoints. Long enough that most
/// keys removed soon after they are written (delivered outbox entries, the index entries of
/// sagas that ended) die in the buffer; short enough to keep each move small.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// Held by each drain, so that the stores of one process (`ordermesh dev` has three) never move
/// their buffers into sled at the same moment: a drain is milliseconds of CPU in one go, and two
/// at once took both cores of a 2-core machine from the request path (place p99 under a closed
/// loop of 64, four alternating pairs: lower in each, by 1 to 9 ms). The work is the same either
/// way; only its overlap goes. (Not held across a checkpoint's fsync, which waits on the disk.)
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Does the checkpoints of one store.
pub(crate) struct Checkpointer {
    db: sled::Db,
    shared: Arc<Shared>,
    fsync: bool,
    /// sled's log file. sled 0.34's flush only calls `sync_file_range`, which neither makes the
    /// file's metadata durable nor flushes the disk's write cache; this handle gets the real fsync.
    db_file: fs::File,
    dir: PathBuf,
    /// Blob files (values too large for the log, in `<dir>/blobs`) already fsynced. sled writes
    /// them once and never syncs them.
    synced_blobs: HashSet<OsString>,
    seconds: metrics::Histogram,
}

impl Checkpointer {
    pub(crate) fn new(db: sled::Db, shared: Arc<Shared>, fsync: bool) -> io::Result<Checkpointer> {
        let dir = shared.path.clone();
        Ok(Checkpointer {
            db_file: fs::File::open(dir.join("db"))?,
            seconds: metrics::histogram!("storage_checkpoint_seconds", "store" => shared.name.clone()),
            db,
            shared,
            fsync,
            dir,
            synced_blobs: HashSet::new(),
        })
    }

    /// At open: makes what recovery found durable, with the directory entries of sled's files
    /// (sled never fsyncs the directory, so a fresh store's files could vanish on power loss even
    /// after their contents were synced).
    pub(crate) fn sync_at_open(&mut self) -> io::Result<()> {
        self.sync_sled()?;
        if self.fsync {
            let conf = self.dir.join("conf");
            if conf.exists() {
                fs::File::open(conf)?.sync_all()?;
                self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
            fs::File::open(&self.dir)?.sync_all()?;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes the write buffer into sled and makes sled's files durable, then retires the log
    /// segments before `first_kept`, one of them becoming the spare for a segment expected to
    /// reach `next_segment_bytes` (with fsync off, none: its only use is a cheaper fsync).
    pub(crate) fn checkpoint(&mut self, first_kept: u64, next_segment_bytes: Option<u64>) -> io::Result<()> {
        let started = Instant::now();
        self.drain()?;
        self.sync_sled()?;
        let spare = next_segment_bytes.filter(|_| self.fsync);
        wal::retire_before(&self.dir.join(wal::WAL_DIR), first_kept, spare)?;
        self.seconds.record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Moves what the write buffer holds into sled (sled's memory: durable there only at the next
    /// checkpoint; until then the log has it). Runs every [`DRAIN_EVERY`] between checkpoints:
    /// the whole half second's worth at once took tens of milliseconds of CPU in one go, and
    /// every request waiting for a core behind it felt that in its latency.
    pub(crate) fn drain(&self) -> io::Result<()> {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = self.shared.buffer.freeze();
        let written = self.write_to_sled(&table)?;
        self.shared.buffer.release(&written);
        Ok(())
    }

    /// Writes a frozen table's entries in key order, then the number of its last commit group:
    /// sled recovers a prefix of its writes, so a crash in the middle leaves the older number and
    /// the log's replay redoes the whole table.
    ///
    /// The event records of one entity written since the last move become one packed record
    /// (an order's three saga steps, a stock item's reservations from many orders): a sled insert
    /// costs microseconds whatever it holds. Until the table is released, a reader may see both
    /// the table's records and the packed one; `read_events` skips the events it already has.
    ///
    /// Returns the greatest key inserted per first byte (for [`WriteBuffer::release`]).
    ///
    /// [`WriteBuffer::release`]: crate::buffer::WriteBuffer::release
    fn write_to_sled(&self, table: &Table) -> io::Result<Vec<Vec<u8>>> {
        let mut greatest = Greatest::default();
        let mut entries = table.entries.iter().peekable();
        while let Some((key, value)) = entries.next() {
            let Some(value) = value else {
                // Most removals are of keys put since the last drain (a delivered outbox entry,
                // a finished saga's `r/` entry), above everything sled holds: nothing to remove,
                // and sled's walk down its tree to find that out was 1.6% of `dev`'s CPU.
                if table.carries_failed || self.shared.buffer.sled_may_hold(key) {
                    self.db.remove(key.as_slice()).map_err(io::Error::from)?;
                }
                continue;
            };
            let Some(prefix) = keys::event_key_prefix(key) else {
                self.db.insert(key.as_slice(), value.clone()).map_err(io::Error::from)?;
                greatest.note(key);
                continue;
            };
            let mut run = vec![(key.as_slice(), value.as_ref())];
            while let Some((next, Some(next_value))) = entries.peek() {
                if keys::event_key_prefix(next) != Some(prefix) || run.len() == keys::MAX_PACKED {
                    break;
                }
                run.push((next.as_slice(), next_value.as_ref()));
                entries.next();
            }
            let last = self.write_events(prefix, &run).map_err(io::Error::from)?;
            greatest.note(&last);
        }
        if table.last_seq > 0 {
            let seq = codec::encode(&table.last_seq)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            self.db.insert(keys::META_COMMIT_SEQ, seq).map_err(io::Error::from)?;
            greatest.note(keys::META_COMMIT_SEQ);
        }
        Ok(greatest.0)
    }

    /// Writes consecutive event records of one entity as one packed record when they hold
    /// contiguous seqs and at most [`keys::MAX_PACKED`] events; otherwise as they are. Returns
    /// the greatest key written (a packed key sorts after the plain keys of its events).
    fn write_events(&self, prefix: &[u8], run: &[(&[u8], &[u8])]) -> sled::Result<Vec<u8>> {
        let packed = (run.len() > 1).then(|| pack_run(prefix, run)).flatten();
        match packed {
            Some((key, value)) => {
                self.db.insert(key.as_slice(), value)?;
                Ok(key)
            }
            None => {
                run.iter().try_for_each(|(key, value)| self.db.insert(*key, *value).map(drop))?;
                Ok(run.last().map_or_else(Vec::new, |(key, _)| key.to_vec()))
            }
        }
    }

    /// sled flush (writes sled's buffers to its file), then the real fsync of its files.
    fn sync_sled(&mut self) -> io::Result<()> {
        self.db.flush().map_err(io::Error::from)?;
        // sled frees every sealed I/O buffer through crossbeam-epoch's deferred garbage, and a
        // flush seals the current one, so this thread defers a buffer (an `Arc` to its 8 MiB
        // segment) per checkpoint. Deferred frees wait in a thread-local bag until 64 have
        // gathered: at two checkpoints a second, that held every segment sled wrote in the last
        // ~30 s (hundreds of MiB under load), and forever once the load stopped, since an idle
        // store takes no checkpoints. Handing the bag over to the global queue now lets the
        // other threads' pins free them within a few epochs.
        crossbeam_epoch::pin().flush();
        if !self.fsync {
            return Ok(());
        }
        // fdatasync: the data and the file size, not the mtime.
        self.db_file.sync_data()?;
        let blobs = self.sync_new_blobs()?;
        self.shared.fsyncs.fetch_add(1 + blobs, Ordering::Relaxed);
        Ok(())
    }

    /// fsyncs blob files written since the last call, and the blobs directory if there were any.
    /// Returns the number of fsync calls. Blobs are rare (values over ~128 KiB), so this is one
    /// readdir of an empty directory per checkpoint in practice.
    fn sync_new_blobs(&mut self) -> io::Result<u64> {
        let blob_dir = self.dir.join("blobs");
        let entries = match fs::read_dir(&blob_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut count = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match fs::File::open(entry.path()) {
                    Ok(file) => {
                        file.sync_all()?;
                        count += 1;
                    }
                    // Removed by sled's GC between readdir and open: nothing to sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            present.insert(name);
        }
        if count > 0 {
            fs::File::open(&blob_dir)?.sync_all()?;
            count += 1;
        }
        self.synced_blobs = present;
        Ok(count)
    }
}

/// One packed record holding every event of `run` (key and value), if their seqs are
/// contiguous and fit in one record.
fn pack_run(prefix: &[u8], run: &[(&[u8], &[u8])]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut events = Vec::new();
    let mut last = None;
    for (key, value) in run {
        let (seq, count) = keys::event_seq(prefix, key)?;
        let first = seq - u64::from(count) + 1;
        if last.is_some_and(|last| first != last + 1) {
            return None;
        }
        events.extend(keys::record_events(value, count)?);
        last = Some(seq);
    }
    let count = u8::try_from(events.len()).ok()?;
    Some((keys::packed_event_key(prefix, last?, count), keys::pack_events(&events)))
}

/// A checkpoint request: the commit-group count to cover and the size of the log segment just
/// closed.
type Request = (u64, u64);

/// The syncer's side: at most one checkpoint in flight, on the checkpoint thread once started.
pub(crate) struct Checkpoints {
    /// Before `start` (and in unit tests): checkpoints run on the caller's thread.
    inline: Option<Box<Checkpointer>>,
    thread: Option<(mpsc::Sender<Request>, JoinHandle<Box<Checkpointer>>)>,
    /// The commit-group count the last finished checkpoint covers.
    done: Arc<AtomicU64>,
    /// The count the last requested one covers, and when it was requested.
    pub(crate) requested: u64,
    pub(crate) requested_at: Instant,
}

impl Checkpoints {
    pub(crate) fn new(checkpointer: Checkpointer, commit_seq: u64) -> Checkpoints {
        Checkpoints {
            inline: Some(Box::new(checkpointer)),
            thread: None,
            done: Arc::new(AtomicU64::new(commit_seq)),
            requested: commit_seq,
            requested_at: Instant::now(),
        }
    }

    /// Moves the checkpointer onto a thread of its own.
    pub(crate) fn start(&mut self, name: &str) -> io::Result<()> {
        let Some(mut checkpointer) = self.inline.take() else { return Ok(()) };
        let (sender, requests) = mpsc::channel::<Request>();
        let done = self.done.clone();
        let spawned = std::thread::Builder::new().name(format!("storage-ckpt-{name}")).spawn(move || {
            loop {
                let (result, covered) = match requests.recv_timeout(DRAIN_EVERY) {
                    Ok((seq, segment_bytes)) => (checkpointer.checkpoint(seq + 1, Some(segment_bytes)), Some(seq)),
                    Err(mpsc::RecvTimeoutError::Timeout) => (checkpointer.drain(), None),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                if let Err(e) = result {
                    let cause = format!("checkpoint {}: {e}", checkpointer.dir.display());
                    tracing::error!(store = %checkpointer.shared.name, error = %cause, "checkpoint failed; store poisoned");
                    let _ = checkpointer.shared.poisoned.set(cause);
                    break;
                }
                if let Some(seq) = covered {
                    done.store(seq, Ordering::Release);
                }
            }
            checkpointer
        });
        self.thread = Some((sender, spawned?));
        Ok(())
    }

    /// For unit tests: a drain on the caller's thread (before `start`).
    #[cfg(test)]
    pub(crate) fn inline_drain(&mut self) -> io::Result<()> {
        self.inline.as_ref().map_or_else(|| Err(io::Error::other("checkpoint thread started")), |c| c.drain())
    }

    /// A checkpoint is running.
    pub(crate) fn busy(&self) -> bool {
        self.done.load(Ordering::Acquire) < self.requested
    }

    /// Asks for a checkpoint covering every group up to `seq`, whose log records are all in
    /// segments before `seq + 1`'s, the last of which holds `segment_bytes` (the next is
    /// expected to hold about as much). Inline, runs it now; the error poisons the store.
    pub(crate) fn request(&mut self, seq: u64, segment_bytes: u64) -> Result<(), String> {
        self.requested = seq;
        self.requested_at = Instant::now();
        if let Some((sender, _)) = &self.thread {
            return sender.send((seq, segment_bytes)).map_err(|_| "checkpoint thread is gone".to_owned());
        }
        if let Some(checkpointer) = &mut self.inline {
            checkpointer.checkpoint(seq + 1, Some(segment_bytes)).map_err(|e| format!("checkpoint: {e}"))?;
            self.done.store(seq, Ordering::Release);
        }
        Ok(())
    }

    /// Waits for the checkpoint in flight and stops the thread; returns the checkpointer for a
    /// final checkpoint on the caller's thread.
    pub(crate) fn stop(&mut self) -> Result<&mut Checkpointer, String> {
        if let Some((sender, thread)) = self.thread.take() {
            drop(sender);
            let checkpointer = thread.join().map_err(|_| "checkpoint thread panicked".to_owned())?;
            self.inline = Some(checkpointer);
        }
        self.inline.as_deref_mut().ok_or_else(|| "no checkpointer".to_owned())
    }
}

/// The greatest key written per first byte, in the order the tags were first seen.
#[derive(Default)]
struct Greatest(Vec<Vec<u8>>);

impl Greatest {
    fn note(&mut self, key: &[u8]) {
        let Some(tag) = key.first() else { return };
        match self.0.iter_mut().find(|k| k.first() == Some(tag)) {
            Some(greatest) if key > greatest.as_slice() => {
                greatest.clear();
                greatest.extend_from_slice(key);
            }
            Some(_) => {}
            None => self.0.push(key.to_vec()),
        }
    }
}

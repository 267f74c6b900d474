//! The store's write-ahead log: what makes a commit group durable.
//!
//! Why a log of our own in front of sled: making a group durable through sled costs a sled flush
//! (a handoff to sled's I/O threads, a `pwrite` and a `sync_file_range` of its buffer) plus our
//! fsync of sled's file, every round, on every store. Measured with the saga bench that was a
//! third of the process's CPU. Appending the group's already-encoded changes here and calling
//! `fdatasync` once per round costs one `write` and one sync; sled then only needs a flush at a
//! checkpoint, a few times a second, when its buffers are large.
//!
//! Layout: `<store>/wal/<first seq, 20 digits>.log` segments. Each record is one applied commit
//! group: `[payload length u32 LE][crc32 of payload u32 LE][payload]`, the payload being the
//! codec-encoded [`WalRecord`]: the group's sequence number and every key it put or removed.
//! Replaying a record is applying those changes again, so it is exact and idempotent.
//!
//! Recovery (see `Store::open`): sled recovers some prefix of what was moved into it (each move
//! of the write buffer writes the number of its last group, `m\0commit_seq`, after everything
//! else); every record with a higher sequence number is applied again, in order. A checkpoint
//! (move, sled flush, fsync of its files) makes the records up to it redundant, so the log then
//! starts a new segment and deletes the older ones.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::store::bytes_field;

/// One change of a commit group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Change {
    Put(#[serde(with = "bytes_field")] Vec<u8>, #[serde(with = "bytes_field")] Vec<u8>),
    Remove(#[serde(with = "bytes_field")] Vec<u8>),
}

/// One commit group as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WalRecord {
    pub(crate) seq: u64,
    pub(crate) changes: Vec<Change>,
}

/// The log's directory inside the store's.
pub(crate) const WAL_DIR: &str = "wal";

const FRAME_HEADER: usize = 8;
/// A record larger than this is damage, not data (a group is at most a few MiB).
const MAX_RECORD: usize = 1 << 30;
const SEGMENT_SUFFIX: &str = ".log";

/// Encodes one record with its frame header, ready to append.
pub(crate) fn frame(record: &WalRecord) -> Result<Vec<u8>, codec::CodecError> {
    let payload = codec::encode(record)?;
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The open tail segment, appended to by the syncer thread only.
pub(crate) struct Wal {
    dir: PathBuf,
    file: fs::File,
    /// Bytes in the current segment.
    pub(crate) segment_bytes: u64,
    /// Where [`Wal::append`] puts a round's records together for their one `write`.
    batch: Vec<u8>,
}

/// The largest scratch buffer for a round's records kept between rounds.
const BATCH_KEPT: usize = 1024 * 1024;

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The segments in `dir`, oldest first, with the first seq each may hold.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)).and_then(|n| n.parse().ok())
        else {
            continue; // not ours (an editor's backup, a temp file): leave it alone
        };
        out.push((first, entry.path()));
    }
    out.sort();
    Ok(out)
}

impl Wal {
    /// Starts a new, empty segment for records from `first_seq` on and makes its directory
    /// entry durable. Older segments stay until [`delete_before`].
    pub(crate) fn start(dir: &Path, first_seq: u64) -> io::Result<Wal> {
        fs::create_dir_all(dir)?;
        let path = dir.join(segment_name(first_seq));
        let file = fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
        fs::File::open(dir)?.sync_all()?;
        Ok(Wal { dir: dir.to_path_buf(), file, segment_bytes: 0, batch: Vec::new() })
    }

    /// Switches to a new segment for records from `first_seq` on; the older ones stay until a
    /// checkpoint deletes them ([`delete_before`]).
    pub(crate) fn next_segment(&mut self, first_seq: u64) -> io::Result<()> {
        *self = Wal::start(&self.dir, first_seq)?;
        Ok(())
    }

    /// Appends framed records (written, not yet synced) with one `write`: a round carries tens
    /// of records, and one `write` each cost about 4% of `ordermesh dev`'s CPU under load.
    pub(crate) fn append<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        self.batch.clear();
        records.into_iter().for_each(|framed| self.batch.extend_from_slice(framed));
        self.file.write_all(&self.batch)?;
        self.segment_bytes += self.batch.len() as u64;
        if self.batch.capacity() > BATCH_KEPT {
            self.batch = Vec::new(); // after a burst of large records: don't keep megabytes
        }
        Ok(())
    }

    /// `fdatasync`: the appended bytes and the file's size, not its mtime.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Deletes the segments older than the one starting at `first_seq`: the caller guarantees that
/// everything before `first_seq` is durable elsewhere (in sled's files, after a checkpoint).
pub(crate) fn delete_before(dir: &Path, first_seq: u64) -> io::Result<()> {
    let mut deleted = false;
    for (first, path) in segments(dir)? {
        if first < first_seq {
            fs::remove_file(path)?;
            deleted = true;
        }
    }
    if deleted {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Why a log could not be replayed.
#[derive(Debug)]
pub(crate) enum ReplayError {
    Io(io::Error),
    /// A damaged record (or a gap in the sequence) that is not a torn tail: acknowledged data
    /// would be lost.
    Damaged(String),
    /// Applying a record failed.
    Apply(String),
}

/// Reads every record of the log in `dir` with `seq > after`, in order, and hands each to
/// `apply`. Returns the seq of the last record applied (or `after`).
///
/// A record that is cut short or fails its checksum at the very end of the newest segment is a
/// write the crash interrupted: it was never acknowledged (acks wait for the sync), so it is
/// ignored. Anywhere else it is damage, and so is a gap in the sequence.
pub(crate) fn replay(
    dir: &Path,
    after: u64,
    mut apply: impl FnMut(WalRecord) -> Result<(), String>,
) -> Result<u64, ReplayError> {
    let segments = segments(dir).map_err(ReplayError::Io)?;
    let mut last = after;
    let count = segments.len();
    for (i, (_, path)) in segments.iter().enumerate() {
        let newest = i + 1 == count;
        let mut bytes = Vec::new();
        fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(ReplayError::Io)?;
        let mut at = 0usize;
        while at < bytes.len() {
            let start = at;
            let damaged = |what: &str| ReplayError::Damaged(format!("{}: {what} at byte {start}", path.display()));
            let record = match read_frame(&bytes[at..]) {
                Frame::Record { payload, len } => {
                    let record: WalRecord =
                        codec::decode(payload).map_err(|e| damaged(&format!("undecodable ({e})")))?;
                    at += len;
                    record
                }
                Frame::Torn if newest => {
                    if bytes[at..].iter().all(|b| *b == 0) || tail_is_unreadable(&bytes[at..]) {
                        tracing::warn!(path = %path.display(), at, "ignoring the torn tail of the log (never acknowledged)");
                        break;
                    }
                    return Err(damaged("damaged record"));
                }
                Frame::Torn => return Err(damaged("damaged record")),
            };
            if record.seq <= last {
                continue; // already in sled (or an older segment not yet deleted)
            }
            if record.seq != last + 1 {
                return Err(damaged(&format!("gap in the log: expected group {}, found {}", last + 1, record.seq)));
            }
            last = record.seq;
            apply(record).map_err(ReplayError::Apply)?;
        }
    }
    Ok(last)
}

/// After a bad frame in the newest segment: is the rest just the remains of one interrupted
/// write (no complete, valid record follows)? A valid record after it means the bad one was
/// damaged in place, and acknowledged records follow.
fn tail_is_unreadable(rest: &[u8]) -> bool {
    (1..rest.len()).all(|skip| !matches!(read_frame(&rest[skip..]), Frame::Record { .. }))
}

enum Frame<'a> {
    Record { payload: &'a [u8], len: usize },
    Torn,
}

fn read_frame(bytes: &[u8]) -> Frame<'_> {
    let Some(header) = bytes.get(..FRAME_HEADER) else { return Frame::Torn };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD {
        return Frame::Torn;
    }
    match bytes.get(FRAME_HEADER..FRAME_HEADER + len) {
        Some(payload) if crc32fast::hash(payload) == crc => Frame::Record { payload, len: FRAME_HEADER + len },
        _ => Frame::Torn,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(seq: u64) -> WalRecord {
        WalRecord {
            seq,
            changes: vec![Change::Put(format!("k{seq}").into_bytes(), vec![7; 40]), Change::Remove(b"x".to_vec())],
        }
    }

    fn write(dir: &Path, first: u64, seqs: impl IntoIterator<Item = u64>) -> PathBuf {
        let mut wal = Wal::start(dir, first).unwrap();
        // Rounds of up to three records, as the syncer writes them.
        let frames: Vec<Vec<u8>> = seqs.into_iter().map(|seq| frame(&record(seq)).unwrap()).collect();
        for round in frames.chunks(3) {
            wal.append(round.iter().map(Vec::as_slice)).unwrap();
        }
        assert_eq!(wal.segment_bytes, frames.iter().map(|f| f.len() as u64).sum::<u64>());
        wal.sync().unwrap();
        dir.join(segment_name(first))
    }

    fn replayed(dir: &Path, after: u64) -> Result<Vec<u64>, ReplayError> {
        let mut seen = vec![];
        replay(dir, after, |r| {
            assert_eq!(r, record(r.seq));
            seen.push(r.seq);
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn replays_records_after_the_given_seq_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1, 1..=5);
        assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(replayed(dir.path(), 3).unwrap(), vec![4, 5]);
        assert_eq!(replayed(dir.path(), 9).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_new_segment_keeps_the_older_ones_until_deleted() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1, 1..=3);
        let mut wal = Wal::start(dir.path(), 4).unwrap();
        wal.append([frame(&record(4)).unwrap().as_slice()]).unwrap();
        assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2, 3, 4]);
        delete_before(dir.path(), 4).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        assert_eq!(replayed(dir.path(), 3).unwrap(), vec![4]);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 1, 1..=3);
        let full = fs::read(&path).unwrap();
        let one = frame(&record(3)).unwrap().len();
        for cut in [1, FRAME_HEADER - 1, FRAME_HEADER + 3, one - 1] {
            fs::write(&path, &full[..full.len() - cut]).unwrap();
            assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2], "cut {cut}");
        }
        // Zeroes after the last record (a file extended but not written) are a torn tail too.
        let mut zeroed = full.clone();
        zeroed.extend_from_slice(&[0; 100]);
        fs::write(&path, zeroed).unwrap();
        assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn damage_before_valid_records_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 1, 1..=4);
        let mut bytes = fs::read(&path).unwrap();
        bytes[FRAME_HEADER + 2] ^= 0xFF; // inside record 1's payload
        fs::write(&path, bytes).unwrap();
        assert!(matches!(replayed(dir.path(), 0), Err(ReplayError::Damaged(_))));
    }

    #[test]
    fn damage_in_an_older_segment_is_an_error_even_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let old = write(dir.path(), 1, 1..=2);
        let saved = fs::read(&old).unwrap();
        write(dir.path(), 3, 3..=4);
        fs::write(&old, &saved[..saved.len() - 1]).unwrap();
        assert!(matches!(replayed(dir.path(), 0), Err(ReplayError::Damaged(_))));
    }

    #[test]
    fn a_gap_in_the_sequence_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 5..=6);
        assert!(matches!(replayed(dir.path(), 2), Err(ReplayError::Damaged(msg)) if msg.contains("gap")));
        assert_eq!(replayed(dir.path(), 4).unwrap(), vec![5, 6]);
    }
}

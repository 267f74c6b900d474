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
//! Segments are written over zeros. A segment's file is a spare the checkpoint thread made
//! from a segment it retired: zero-filled to a little more than the last segment's size and
//! synced before it is named `spare`, renamed into place when the syncer starts a segment
//! (`Wal::start`). Why: appending grows the file, so every round's `fdatasync` also wrote the
//! inode (the file's size) and waited for it, and deleting a segment every half second freed
//! its blocks (a discard on a filesystem mounted with `discard`, which blocked the checkpoint
//! thread). Writing into blocks that exist costs one data write and the flush (measured on
//! this machine's disk: 4,800 syncs/s appending, 7,600 overwriting; the machine's CPU per sync
//! halved). So a segment ends where its zeros begin, and a round's write can be torn in a new
//! way: the disk may keep a later sector of it and not an earlier one, leaving zeros between
//! records (see `replay`). Each round's write is padded with zeros to a 512-byte sector
//! boundary, so a round never shares a sector with the acknowledged one before it and a lost
//! sector of it reads as a whole sector of zeros.
//!
//! Recovery (see `Store::open`): sled recovers some prefix of what was moved into it (each move
//! of the write buffer writes the number of its last group, `m\0commit_seq`, after everything
//! else); every record with a higher sequence number is applied again, in order. A checkpoint
//! (move, sled flush, fsync of its files) makes the records up to it redundant, so the log then
//! starts a new segment and retires the older ones.

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
/// The next segment's file, zero-filled and synced (no `.log` suffix: not a segment).
const SPARE: &str = "spare";
/// A spare being zero-filled.
const SPARE_TMP: &str = "spare.tmp";
/// The smallest spare, and the unit spares are sized in.
const SPARE_UNIT: u64 = 1024 * 1024;
/// The largest spare: room past the 64 MiB at which the syncer checkpoints early
/// (`committer::CHECKPOINT_BYTES`) for the rounds until it switches segments.
const SPARE_MAX: u64 = 80 * 1024 * 1024;
/// A disk writes whole sectors: one of zeros inside a write that was cut short is a sector the
/// disk had not written yet.
const SECTOR: usize = 512;

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
    /// Starts a new, empty segment for records from `first_seq` on, in the spare if there is
    /// one, and makes its directory entry durable. Older segments stay until [`retire_before`].
    pub(crate) fn start(dir: &Path, first_seq: u64) -> io::Result<Wal> {
        fs::create_dir_all(dir)?;
        let path = dir.join(segment_name(first_seq));
        let file = match fs::rename(dir.join(SPARE), &path) {
            // Written from its start, over its zeros.
            Ok(()) => fs::OpenOptions::new().write(true).open(&path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?
            }
            Err(e) => return Err(e),
        };
        fs::File::open(dir)?.sync_all()?;
        Ok(Wal { dir: dir.to_path_buf(), file, segment_bytes: 0, batch: Vec::new() })
    }

    /// Switches to a new segment for records from `first_seq` on; the older ones stay until a
    /// checkpoint retires them ([`retire_before`]).
    pub(crate) fn next_segment(&mut self, first_seq: u64) -> io::Result<()> {
        *self = Wal::start(&self.dir, first_seq)?;
        Ok(())
    }

    /// Appends framed records (written, not yet synced) with one `write`: a round carries tens
    /// of records, and one `write` each cost about 4% of `ordermesh dev`'s CPU under load. The
    /// write is padded with zeros to a sector boundary (see the module's doc).
    pub(crate) fn append<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        self.batch.clear();
        records.into_iter().for_each(|framed| self.batch.extend_from_slice(framed));
        let end = self.segment_bytes as usize + self.batch.len();
        self.batch.resize(self.batch.len() + (end.next_multiple_of(SECTOR) - end), 0);
        self.file.write_all(&self.batch)?;
        self.segment_bytes += self.batch.len() as u64;
        if self.batch.capacity() > BATCH_KEPT {
            self.batch = Vec::new(); // after a burst of large records: don't keep megabytes
        }
        Ok(())
    }

    /// `fdatasync`: the written bytes (and the file's size if it grew), not its mtime.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Retires the segments older than the one starting at `first_seq`: the caller guarantees that
/// everything before `first_seq` is durable elsewhere (in sled's files, after a checkpoint).
///
/// With `next_segment_bytes` (the size of the segment last closed: the spare will hold the one
/// after the segment in use) and no spare yet, the newest retired segment becomes the spare
/// instead of being deleted: zero-filled to that size and a quarter (in whole MiB, at most
/// `SPARE_MAX`) and synced, in its own blocks. The others are deleted. Making the spare is
/// best effort: when it fails (a full disk), the next segment is appended to as before.
pub(crate) fn retire_before(dir: &Path, first_seq: u64, next_segment_bytes: Option<u64>) -> io::Result<()> {
    let mut retired: Vec<PathBuf> =
        segments(dir)?.into_iter().filter(|(first, _)| *first < first_seq).map(|(_, path)| path).collect();
    let recycled = match next_segment_bytes {
        Some(bytes) if !dir.join(SPARE).exists() => retired.pop().map(|path| (path, bytes)),
        _ => None,
    };
    let renamed = !retired.is_empty() || recycled.is_some();
    for path in retired {
        fs::remove_file(path)?;
    }
    if let Some((path, _)) = &recycled {
        fs::rename(path, dir.join(SPARE_TMP))?;
    }
    if renamed {
        // Before the zero-filling: a crash in the middle must not leave a segment half zeroed.
        fs::File::open(dir)?.sync_all()?;
    }
    if let Some((_, bytes)) = recycled {
        let size = spare_size(bytes);
        // No directory sync: a spare lost in a crash is only a segment that appends.
        let made =
            zero_fill(&dir.join(SPARE_TMP), size).and_then(|()| fs::rename(dir.join(SPARE_TMP), dir.join(SPARE)));
        if let Err(e) = made {
            tracing::warn!(dir = %dir.display(), size, error = %e, "cannot make a spare log segment; the next one appends");
            let _ = fs::remove_file(dir.join(SPARE_TMP));
        }
    }
    Ok(())
}

/// A spare for segments of about `bytes`: a quarter more, in whole MiB, 1 to `SPARE_MAX`.
fn spare_size(bytes: u64) -> u64 {
    bytes.saturating_add(bytes / 4).div_ceil(SPARE_UNIT).clamp(1, SPARE_MAX / SPARE_UNIT) * SPARE_UNIT
}

/// Writes `size` zero bytes over the file at `path` from its start (real writes, not a hole
/// or `fallocate`: writing into either later changes the file's metadata too), cuts off
/// anything beyond, and syncs it.
fn zero_fill(path: &Path, size: u64) -> io::Result<()> {
    // A static block (in .bss: neither in the binary nor resident, reads map the zero page): a
    // zeroed allocation of a MiB per spare was 6% of the instructions per order at 150
    // orders/s (mimalloc clears it with memset).
    static ZEROS: [u8; SPARE_UNIT as usize] = [0; SPARE_UNIT as usize];
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    let mut left = size;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        file.write_all(&ZEROS[..n as usize])?;
        left -= n;
    }
    if file.metadata()?.len() > size {
        file.set_len(size)?;
    }
    file.sync_all()
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
/// Zeros end a segment: to the file's end they are the spare it was written over, and up to the
/// next sector boundary they pad a round. A segment whose successor starts at or before
/// `after + 1` holds nothing to replay and is not read.
///
/// A record that is cut short or fails its checksum at the end of the newest segment is a write
/// the crash interrupted: it was never acknowledged (acks wait for the sync), so it is ignored,
/// and so is one followed by a whole sector of zeros before later records (the disk kept later
/// sectors of the last round and not that one: [`holds_unwritten_sector`]). Anywhere else it is
/// damage, and so is a gap in the sequence.
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
        if segments.get(i + 1).is_some_and(|(next_first, _)| *next_first <= after.saturating_add(1)) {
            continue; // every record in it is already in sled
        }
        let mut bytes = Vec::new();
        fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(ReplayError::Io)?;
        // Where the written bytes end: zeros (a spare's) follow.
        let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |last| last + 1);
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
                // The zeros the segment was written over: its end.
                Frame::Torn if at >= end => break,
                // A round's padding: zeros to the next sector boundary, written bytes after it.
                Frame::Torn
                    if !at.is_multiple_of(SECTOR)
                        && bytes[at..at.next_multiple_of(SECTOR).min(end)].iter().all(|b| *b == 0) =>
                {
                    at = at.next_multiple_of(SECTOR);
                    continue;
                }
                Frame::Torn if newest => {
                    if tail_is_unreadable(&bytes, at, end) || holds_unwritten_sector(&bytes, at, end) {
                        tracing::warn!(path = %path.display(), at, "ignoring the torn tail of the log (never acknowledged)");
                        break;
                    }
                    return Err(damaged("damaged record"));
                }
                Frame::Torn => return Err(damaged("damaged record")),
            };
            if record.seq <= last {
                continue; // already in sled (or an older segment not yet retired)
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

/// After a bad frame at `at` in the newest segment: is the rest just the remains of one
/// interrupted write (no complete, valid record follows)? A valid record after it means the bad
/// one was damaged in place, and acknowledged records follow. Only frames that start before
/// `end` (the last non-zero byte) and end within a sector after it are tried: a spare's
/// megabytes of zeros hold none, and a length read from torn bytes must not send a checksum
/// over them.
fn tail_is_unreadable(bytes: &[u8], at: usize, end: usize) -> bool {
    let rest = &bytes[at..(end + SECTOR).min(bytes.len())];
    (1..end.saturating_sub(at)).all(|skip| !matches!(read_frame(&rest[skip..]), Frame::Record { .. }))
}

/// After a bad frame at `at` in the newest segment: is there a whole sector of zeros between it
/// and `end` (the last non-zero byte)? Then the last write was cut short with a later part of it on
/// disk and an earlier part not (a disk keeps sectors in no particular order): everything from
/// `at` is that one unacknowledged round, since a round is written only once the one before it
/// is synced. A sector of an acknowledged record that a faulty disk zeroed afterwards would
/// pass for this too, and the records after it would be dropped; the store's sentinel count
/// still catches a loss of more than about a second of commits.
fn holds_unwritten_sector(bytes: &[u8], at: usize, end: usize) -> bool {
    (at.next_multiple_of(SECTOR)..end.saturating_sub(SECTOR - 1))
        .step_by(SECTOR)
        .any(|sector| bytes[sector..sector + SECTOR].iter().all(|b| *b == 0))
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
        let framed = frames.iter().map(|f| f.len() as u64).sum::<u64>();
        assert!(
            wal.segment_bytes >= framed && wal.segment_bytes.is_multiple_of(SECTOR as u64),
            "rounds padded to sectors"
        );
        wal.sync().unwrap();
        dir.join(segment_name(first))
    }

    /// A segment as records appended back to back (no padding), as older builds wrote them.
    fn raw(dir: &Path, first: u64, seqs: impl IntoIterator<Item = u64>) -> PathBuf {
        let path = dir.join(segment_name(first));
        fs::write(&path, seqs.into_iter().map(|seq| frame(&record(seq)).unwrap()).collect::<Vec<_>>().concat())
            .unwrap();
        path
    }

    fn replayed(dir: &Path, after: u64) -> Result<Vec<u64>, ReplayError> {
        let mut seen = vec![];
        replay(dir, after, |r| {
            assert!(r == record(r.seq) || r == big(r.seq), "{r:?}");
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
        retire_before(dir.path(), 4, None).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        assert_eq!(replayed(dir.path(), 3).unwrap(), vec![4]);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw(dir.path(), 1, 1..=3);
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
        let old = raw(dir.path(), 1, 1..=2);
        let saved = fs::read(&old).unwrap();
        write(dir.path(), 3, 3..=4);
        fs::write(&old, &saved[..saved.len() - 1]).unwrap();
        assert!(matches!(replayed(dir.path(), 0), Err(ReplayError::Damaged(_))));
    }

    /// Records big enough to span sectors.
    fn big(seq: u64) -> WalRecord {
        WalRecord { seq, changes: vec![Change::Put(format!("k{seq}").into_bytes(), vec![7; 1500])] }
    }

    #[test]
    fn a_retired_segment_becomes_a_zeroed_spare_that_the_next_segment_is_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let old = write(dir.path(), 1, 1..=5);
        let mut wal = Wal::start(dir.path(), 6).unwrap();
        wal.append([frame(&record(6)).unwrap().as_slice()]).unwrap();
        retire_before(dir.path(), 6, Some(3 * SPARE_UNIT)).unwrap();
        assert!(!old.exists());
        let spare = fs::read(dir.path().join(SPARE)).unwrap();
        // 3 MiB and a quarter more, in whole MiB.
        assert_eq!(spare.len() as u64, 4 * SPARE_UNIT);
        assert!(spare.iter().all(|b| *b == 0), "no stale record survives in the spare");
        assert_eq!(segments(dir.path()).unwrap().len(), 1);

        // The next segment takes the spare (and only the first one does).
        let mut wal = Wal::start(dir.path(), 7).unwrap();
        let path = dir.path().join(segment_name(7));
        assert_eq!(fs::metadata(&path).unwrap().len(), 4 * SPARE_UNIT);
        assert!(!dir.path().join(SPARE).exists());
        wal.append([frame(&record(7)).unwrap().as_slice(), frame(&record(8)).unwrap().as_slice()]).unwrap();
        wal.sync().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 4 * SPARE_UNIT, "written over, not appended");
        // The older segment's zeros end it like the newest one's.
        Wal::start(dir.path(), 9).unwrap().append([frame(&record(9)).unwrap().as_slice()]).unwrap();
        assert_eq!(replayed(dir.path(), 5).unwrap(), vec![6, 7, 8, 9]);

        // No second spare is made while one is waiting: 1 MiB and a quarter, then nothing.
        retire_before(dir.path(), 7, Some(SPARE_UNIT)).unwrap();
        retire_before(dir.path(), 9, Some(SPARE_UNIT)).unwrap();
        assert_eq!(fs::metadata(dir.path().join(SPARE)).unwrap().len(), 2 * SPARE_UNIT);
        assert_eq!(segments(dir.path()).unwrap().len(), 1, "the other retired segment is deleted");
    }

    /// A segment written over a spare: rounds of big records, padded, then zeros.
    fn over_zeros(dir: &Path, rounds: &[&[u64]]) -> (PathBuf, Vec<usize>) {
        let mut wal = Wal::start(dir, rounds[0][0]).unwrap();
        let mut starts = vec![];
        for round in rounds {
            starts.push(wal.segment_bytes as usize);
            let frames: Vec<Vec<u8>> = round.iter().map(|seq| frame(&big(*seq)).unwrap()).collect();
            wal.append(frames.iter().map(Vec::as_slice)).unwrap();
        }
        let path = dir.join(segment_name(rounds[0][0]));
        let mut bytes = fs::read(&path).unwrap();
        bytes.resize(bytes.len() + 8192, 0);
        fs::write(&path, &bytes).unwrap();
        (path, starts)
    }

    #[test]
    fn a_write_into_zeros_cut_short_out_of_order_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (path, starts) = over_zeros(dir.path(), &[&[1, 2], &[3, 4]]);
        // The disk kept the last round's later sectors but not its first one.
        let mut bytes = fs::read(&path).unwrap();
        bytes[starts[1]..starts[1] + SECTOR].fill(0);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2]);

        // The same hole in an older segment is damage: a later segment was written after it.
        Wal::start(dir.path(), 5).unwrap();
        assert!(matches!(replayed(dir.path(), 0), Err(ReplayError::Damaged(_))));
        // Unless that segment is covered by what sled holds: then it is not read at all.
        assert_eq!(replayed(dir.path(), 4).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_write_into_zeros_cut_short_in_order_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (path, starts) = over_zeros(dir.path(), &[&[1, 2], &[3, 4]]);
        let mut bytes = fs::read(&path).unwrap();
        bytes[starts[1] + 1000..].fill(0); // record 3 half written, nothing after it
        fs::write(&path, &bytes).unwrap();
        assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2]);
    }

    #[test]
    fn padding_between_rounds_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (_, starts) = over_zeros(dir.path(), &[&[1], &[2, 3], &[4]]);
        assert!(starts.iter().all(|s| s.is_multiple_of(SECTOR)), "{starts:?}");
        assert_eq!(replayed(dir.path(), 0).unwrap(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn spares_are_a_quarter_larger_in_whole_mib_up_to_a_bound() {
        assert_eq!(spare_size(0), SPARE_UNIT);
        assert_eq!(spare_size(3 * SPARE_UNIT), 4 * SPARE_UNIT);
        assert_eq!(spare_size(4 * SPARE_UNIT + 1), 6 * SPARE_UNIT);
        assert_eq!(spare_size(u64::MAX), SPARE_MAX);
    }

    #[test]
    fn a_damaged_record_with_no_zeroed_sector_before_valid_ones_is_still_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let mut bytes: Vec<u8> = (1..=4).map(|seq| frame(&big(seq)).unwrap()).collect::<Vec<_>>().concat();
        bytes.resize(bytes.len() + 8192, 0);
        bytes[frame(&big(1)).unwrap().len() + FRAME_HEADER + 700] ^= 0xFF; // inside record 2
        fs::write(&path, &bytes).unwrap();
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

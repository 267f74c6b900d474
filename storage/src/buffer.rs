//! The write buffer: commit groups land here, not in sled; each checkpoint moves them into sled.
//!
//! Why: a sled insert costs microseconds of CPU (a delta linked to its page and serialized into
//! sled's I/O buffer, a page rewrite every few deltas, a leaf split every eight or so new keys):
//! inserts were a quarter of `ordermesh dev`'s CPU under load. And much of what a commit group
//! writes is gone again within milliseconds: an outbox entry once it is delivered, the `r/` index
//! entry of a saga once it ends, `m\0commit_seq` at the next group. Here a group is a few
//! `BTreeMap` inserts; a checkpoint writes the buffer's *final* state to sled, in key order, so a
//! key put and removed between two checkpoints never reaches sled (its removal is a lookup).
//!
//! Durability does not change: the write-ahead log keeps every group until a checkpoint has
//! written it into sled and fsynced sled's files (see [`crate::checkpoint`]).
//!
//! Two tables: the *active* one takes new groups (from the committer, and the outbox acks); a
//! checkpoint *freezes* it (it becomes the read-only frozen table and an empty active one
//! starts), writes it to sled, makes sled durable and then *releases* it. A read asks the active
//! table, then the frozen one, then sled; the first that knows the key answers (a removed key is
//! known: its entry is a tombstone).
//!
//! The buffer also knows, for each keyspace tag (a key's first byte), the greatest key sled
//! holds with it, so a read of a key above it never goes to sled. Most reads of a key that does
//! not exist are of a new order or payment, named by a time-ordered id (UUIDv7), usually greater
//! than every id sled holds (not always: ids minted in the same millisecond, or on a node whose
//! clock is behind, may sort below; those reads still ask sled): each such miss was a walk down
//! sled's tree (two per new entity, its activation's read and the committer's version check; 5%
//! of `dev`'s CPU under load).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock};

use sled::IVec;

use crate::wal::Change;

/// A table of the buffer: the last value of each key written since it started (`None`: removed).
#[derive(Default)]
pub(crate) struct Table {
    pub(crate) entries: BTreeMap<Vec<u8>, Option<IVec>>,
    /// The last commit group written into it (0: none); a checkpoint records it in sled after
    /// the entries, as `m\0commit_seq`.
    pub(crate) last_seq: u64,
    /// It holds what a failed checkpoint may have written into sled in part, without raising
    /// the bound on sled's keys: its removals must all reach sled (none may be skipped as
    /// "above everything sled holds").
    pub(crate) carries_failed: bool,
}

#[derive(Default)]
struct Tables {
    active: Table,
    frozen: Option<Arc<Table>>,
    /// Counts releases. A sled iterator opened before a release may already be past keys the
    /// release moved into sled; a scan that sees this change reopens its sled iterator.
    generation: u64,
    /// The greatest key sled holds per first byte (`None`: none); raised by every release, so
    /// it changes with `generation`. `None` as a whole: not known, every read asks sled.
    sled_max: Option<Vec<Option<Vec<u8>>>>,
}

impl Tables {
    /// False if sled holds no key in `[lower, upper)` (either bound may be inclusive): both
    /// bounds within one keyspace tag, and the lower above every key sled holds with it.
    fn sled_may_hold(&self, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
        let Some(sled_max) = &self.sled_max else { return true };
        let (Bound::Included(low) | Bound::Excluded(low)) = lower else { return true };
        let (Bound::Included(high) | Bound::Excluded(high)) = upper else { return true };
        match (low.first(), high.first()) {
            (Some(tag), Some(high_tag)) if tag == high_tag => {
                sled_max[usize::from(*tag)].as_deref().is_some_and(|max| low <= max)
            }
            _ => true,
        }
    }

    fn sled_may_hold_key(&self, key: &[u8]) -> bool {
        self.sled_may_hold(Bound::Included(key), Bound::Included(key))
    }
}

/// The greatest key of each first byte, as [`Tables::sled_max`] keeps it.
fn greatest_keys_of(db: &sled::Db) -> sled::Result<Vec<Option<Vec<u8>>>> {
    (0..=u8::MAX).map(|tag| Ok(db.scan_prefix([tag]).next_back().transpose()?.map(|(key, _)| key.to_vec()))).collect()
}

/// What the buffer knows of a key.
pub(crate) enum Found {
    Value(IVec),
    /// Removed since the last checkpoint, or above every key sled holds.
    Absent,
    /// Ask sled.
    Unknown,
}

/// One store's write buffer (see the module docs).
#[derive(Default)]
pub(crate) struct WriteBuffer {
    tables: RwLock<Tables>,
}

/// A buffered entry as a scan sees it: key and value (`None`: removed).
type Entry = (Vec<u8>, Option<IVec>);

/// How many buffered entries a scan copies at a time (under the read lock).
const CHUNK: usize = 128;

impl WriteBuffer {
    /// An empty buffer over `db`, knowing the greatest key sled holds per keyspace (a few
    /// hundred lookups). `WriteBuffer::default()` does not know them: every read asks sled.
    pub(crate) fn over(db: &sled::Db) -> sled::Result<WriteBuffer> {
        let tables = Tables { sled_max: Some(greatest_keys_of(db)?), ..Tables::default() };
        Ok(WriteBuffer { tables: RwLock::new(tables) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes commit group `seq`, all of it at once for readers.
    pub(crate) fn apply_group(&self, seq: u64, changes: Vec<Change>) {
        let mut tables = self.write();
        for change in changes {
            match change {
                Change::Put(key, value) => tables.active.entries.insert(key, Some(IVec::from(value))),
                Change::Remove(key) => tables.active.entries.insert(key, None),
            };
        }
        tables.active.last_seq = seq;
    }

    /// Removes keys outside any commit group (delivered outbox entries): not logged, so a crash
    /// before the next checkpoint forgets the removal.
    pub(crate) fn remove(&self, keys: impl IntoIterator<Item = Vec<u8>>) {
        let mut tables = self.write();
        for key in keys {
            tables.active.entries.insert(key, None);
        }
    }

    /// Removes `key` if its current value is `expected`; true if it did. The whole comparison
    /// happens under the write lock, so no commit group can claim the key in between.
    pub(crate) fn remove_if(&self, db: &sled::Db, key: &[u8], expected: &[u8]) -> sled::Result<bool> {
        let mut tables = self.write();
        let current = match find(&tables, key) {
            Found::Value(v) => Some(v),
            Found::Absent => None,
            Found::Unknown => db.get(key)?,
        };
        if current.as_deref() != Some(expected) {
            return Ok(false);
        }
        tables.active.entries.insert(key.to_vec(), None);
        Ok(true)
    }

    pub(crate) fn get(&self, key: &[u8]) -> Found {
        find(&self.read(), key)
    }

    /// Starts a checkpoint: the active table becomes the frozen one (returned), and new writes
    /// go to a fresh table. A frozen table left by a failed checkpoint is kept under the new one.
    pub(crate) fn freeze(&self) -> Arc<Table> {
        let mut tables = self.write();
        let mut table = std::mem::take(&mut tables.active);
        if let Some(older) = tables.frozen.take() {
            for (key, value) in &older.entries {
                table.entries.entry(key.clone()).or_insert_with(|| value.clone());
            }
            table.last_seq = table.last_seq.max(older.last_seq);
            table.carries_failed = true;
        }
        let table = Arc::new(table);
        tables.frozen = Some(table.clone());
        table
    }

    /// Ends a checkpoint: the frozen table is in sled, and durable there. `written` holds, per
    /// first byte, the greatest key the checkpoint wrote into sled.
    pub(crate) fn release(&self, written: &[Vec<u8>]) {
        let mut tables = self.write();
        tables.frozen = None;
        tables.generation += 1;
        if let Some(sled_max) = &mut tables.sled_max {
            for key in written {
                let Some(tag) = key.first() else { continue };
                let max = &mut sled_max[usize::from(*tag)];
                if max.as_ref().is_none_or(|max| key > max) {
                    *max = Some(key.clone());
                }
            }
        }
    }

    /// Whether sled may hold `key` (false: it is above every key sled holds with its tag).
    pub(crate) fn sled_may_hold(&self, key: &[u8]) -> bool {
        self.read().sled_may_hold_key(key)
    }

    /// Debug builds: checks the bound on sled's keys against sled itself, under the read lock
    /// (so no release moves it meanwhile): if the bound says sled holds no key in the range,
    /// every key sled holds there is one the running drain is writing from the frozen table
    /// (itself, or the packed record of that entity's events the frozen table holds).
    #[cfg(debug_assertions)]
    pub(crate) fn assert_bound_holds(&self, db: &sled::Db, lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) {
        let tables = self.read();
        if is_empty(lower, upper) || tables.sled_may_hold(bound_ref(lower), bound_ref(upper)) {
            return;
        }
        for item in db.range::<Vec<u8>, _>((lower.clone(), upper.clone())) {
            let Ok((key, _)) = item else { return };
            let draining = tables.frozen.as_ref().is_some_and(|t| {
                let packing = crate::keys::event_key_prefix(&key).is_some_and(|prefix| {
                    t.entries
                        .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
                        .next()
                        .is_some_and(|(k, _)| k.starts_with(prefix))
                });
                t.entries.contains_key(key.as_ref()) || packing
            });
            assert!(draining, "sled holds {key:?}, above the write buffer's bound on its keys");
        }
    }

    /// The generation, and whether sled may hold a key within the bounds.
    fn sled_view(&self, lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> (u64, bool) {
        let tables = self.read();
        (tables.generation, tables.sled_may_hold(bound_ref(lower), bound_ref(upper)))
    }

    /// Up to [`CHUNK`] entries within the bounds, in key order (descending if `reverse`), the
    /// active table's winning over the frozen one's; and the generation they were read at.
    fn chunk(&self, lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>, reverse: bool) -> (u64, Vec<Entry>) {
        let tables = self.read();
        if is_empty(lower, upper) {
            return (tables.generation, Vec::new()); // (BTreeMap::range would panic)
        }
        let bounds = (bound_ref(lower), bound_ref(upper));
        let empty = BTreeMap::new();
        let frozen = tables.frozen.as_ref().map_or(&empty, |t| &t.entries);
        let (active, frozen) = (tables.active.entries.range::<[u8], _>(bounds), frozen.range::<[u8], _>(bounds));
        let out = if reverse { merge(active.rev(), frozen.rev(), true) } else { merge(active, frozen, false) };
        (tables.generation, out)
    }
}

fn find(tables: &Tables, key: &[u8]) -> Found {
    let value = tables.active.entries.get(key).or_else(|| tables.frozen.as_ref().and_then(|t| t.entries.get(key)));
    match value {
        Some(Some(v)) => Found::Value(v.clone()),
        Some(None) => Found::Absent,
        None if tables.sled_may_hold_key(key) => Found::Unknown,
        None => Found::Absent,
    }
}

/// True if no key lies within the bounds.
fn is_empty(lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    match (lower, upper) {
        (Bound::Included(l), Bound::Included(u)) => l > u,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Included(u) | Bound::Excluded(u)) => l >= u,
        _ => false,
    }
}

fn bound_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Merges two sorted runs (`newer` wins on equal keys), at most [`CHUNK`] entries.
fn merge<'a>(
    newer: impl Iterator<Item = (&'a Vec<u8>, &'a Option<IVec>)>,
    older: impl Iterator<Item = (&'a Vec<u8>, &'a Option<IVec>)>,
    reverse: bool,
) -> Vec<Entry> {
    let (mut newer, mut older) = (newer.peekable(), older.peekable());
    let mut out = Vec::new();
    while out.len() < CHUNK {
        let take_newer = match (newer.peek(), older.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((n, _)), Some((o, _))) => {
                let order = if reverse { o.cmp(n) } else { n.cmp(o) };
                if order == Ordering::Equal {
                    older.next();
                }
                order != Ordering::Greater
            }
        };
        let (key, value) = if take_newer { newer.next() } else { older.next() }.expect("peeked");
        out.push((key.clone(), value.clone()));
    }
    out
}

type SledIter = Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + Send>;

/// A scan of a key range through the buffer and sled: what sled holds, overridden by the
/// buffer's entries (a tombstone hides sled's value). Lazy on both sides; not a snapshot (like a
/// sled scan, it may or may not see a group committed while it runs).
pub(crate) struct Merged<'a> {
    buffer: &'a WriteBuffer,
    db: &'a sled::Db,
    reverse: bool,
    /// The range not yet yielded: the scan moves its lower bound up (or its upper bound down).
    lower: Bound<Vec<u8>>,
    upper: Bound<Vec<u8>>,
    /// Buffered entries copied but not yet merged, and where the next copy starts (`None`: the
    /// buffer holds nothing more in range).
    chunk: std::vec::IntoIter<Entry>,
    chunk_next: Option<Bound<Vec<u8>>>,
    sled: Peekable<SledIter>,
    generation: u64,
}

impl<'a> Merged<'a> {
    pub(crate) fn new(
        buffer: &'a WriteBuffer,
        db: &'a sled::Db,
        lower: Bound<Vec<u8>>,
        upper: Bound<Vec<u8>>,
        reverse: bool,
    ) -> Merged<'a> {
        let (generation, sled_may_hold) = buffer.sled_view(&lower, &upper);
        let sled = sled_iter(db, &lower, &upper, reverse, sled_may_hold);
        let chunk_next = Some(if reverse { upper.clone() } else { lower.clone() });
        Merged { buffer, db, reverse, lower, upper, chunk: Vec::new().into_iter(), chunk_next, sled, generation }
    }

    /// Copies the next buffered entries. If a checkpoint released its table since the sled
    /// iterator was opened, reopens that at the scan's position: sled now holds what the
    /// released table held, perhaps behind the old iterator's position.
    fn refill(&mut self) {
        let Some(from) = self.chunk_next.take() else { return };
        let (generation, entries) = if self.reverse {
            self.buffer.chunk(&self.lower, &from, true)
        } else {
            self.buffer.chunk(&from, &self.upper, false)
        };
        if generation != self.generation {
            // The generation may have moved on again; the iterator then sees at least as much.
            let (generation, sled_may_hold) = self.buffer.sled_view(&self.lower, &self.upper);
            self.generation = generation;
            self.sled = sled_iter(self.db, &self.lower, &self.upper, self.reverse, sled_may_hold);
        }
        if entries.len() == CHUNK {
            self.chunk_next = entries.last().map(|(key, _)| Bound::Excluded(key.clone()));
        }
        self.chunk = entries.into_iter();
    }

    /// Records that the scan is past `key`.
    fn passed(&mut self, key: &[u8]) {
        let past = Bound::Excluded(key.to_vec());
        if self.reverse { self.upper = past } else { self.lower = past }
    }
}

fn sled_iter(
    db: &sled::Db,
    lower: &Bound<Vec<u8>>,
    upper: &Bound<Vec<u8>>,
    reverse: bool,
    sled_may_hold: bool,
) -> Peekable<SledIter> {
    if !sled_may_hold || is_empty(lower, upper) {
        return (Box::new(std::iter::empty()) as SledIter).peekable();
    }
    let range = db.range::<Vec<u8>, _>((lower.clone(), upper.clone()));
    let iter: SledIter = if reverse { Box::new(range.rev()) } else { Box::new(range) };
    iter.peekable()
}

impl Iterator for Merged<'_> {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.chunk.len() == 0 {
                self.refill();
            }
            let buffered = self.chunk.as_slice().first().map(|(key, _)| key.as_slice());
            let stored = match self.sled.peek() {
                Some(Ok((key, _))) => Some(key.as_ref()),
                Some(Err(_)) => return self.sled.next(),
                None => None,
            };
            let from_buffer = match (buffered, stored) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(b), Some(s)) => {
                    let order = if self.reverse { s.cmp(b) } else { b.cmp(s) };
                    if order == Ordering::Equal {
                        self.sled.next(); // the buffer's entry is newer
                    }
                    order != Ordering::Greater
                }
            };
            if !from_buffer {
                let item = self.sled.next()?;
                if let Ok((key, _)) = &item {
                    self.passed(key);
                }
                return Some(item);
            }
            let (key, value) = self.chunk.next()?;
            self.passed(&key);
            if let Some(value) = value {
                return Some(Ok((IVec::from(key), value)));
            }
            // A tombstone: sled's entry (if any) was skipped above.
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, db)
    }

    fn put(key: &str, value: &str) -> Change {
        Change::Put(key.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    fn scan(buffer: &WriteBuffer, db: &sled::Db, reverse: bool) -> Vec<(String, String)> {
        Merged::new(buffer, db, Bound::Unbounded, Bound::Unbounded, reverse)
            .map(|item| {
                let (k, v) = item.unwrap();
                (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap())
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// Active over frozen over sled, tombstones hiding older values, both directions.
    #[test]
    fn reads_see_the_newest_layer() {
        let (_dir, db) = db();
        for (k, v) in [("a", "sled"), ("b", "sled"), ("c", "sled"), ("e", "sled")] {
            db.insert(k, v).unwrap();
        }
        let buffer = WriteBuffer::default();
        buffer.apply_group(1, vec![put("b", "frozen"), put("d", "frozen"), Change::Remove(b"e".to_vec())]);
        buffer.freeze();
        buffer.apply_group(2, vec![put("d", "active"), Change::Remove(b"a".to_vec()), put("f", "active")]);

        let expected = pairs(&[("b", "frozen"), ("c", "sled"), ("d", "active"), ("f", "active")]);
        assert_eq!(scan(&buffer, &db, false), expected);
        assert_eq!(scan(&buffer, &db, true), expected.into_iter().rev().collect::<Vec<_>>());
        assert!(matches!(buffer.get(b"a"), Found::Absent));
        assert!(matches!(buffer.get(b"b"), Found::Value(v) if v == "frozen"));
        assert!(matches!(buffer.get(b"c"), Found::Unknown));
    }

    /// Longer than a chunk, with a checkpoint (write to sled, release) in the middle of the
    /// scan: nothing is missed and nothing is seen twice.
    #[test]
    fn a_scan_survives_a_checkpoint_under_it() {
        let (_dir, db) = db();
        let buffer = WriteBuffer::default();
        let keys: Vec<String> = (0..3 * CHUNK).map(|i| format!("k{i:05}")).collect();
        // Every other key in sled already, the rest only buffered.
        for (i, key) in keys.iter().enumerate() {
            if i % 2 == 0 {
                db.insert(key.as_bytes(), b"old".as_slice()).unwrap();
            }
        }
        buffer.apply_group(1, keys.iter().skip(1).step_by(2).map(|k| put(k, "new")).collect());
        let mut merged = Merged::new(&buffer, &db, Bound::Unbounded, Bound::Unbounded, false);
        let mut seen: Vec<Vec<u8>> = (0..10).map(|_| merged.next().unwrap().unwrap().0.to_vec()).collect();

        let frozen = buffer.freeze();
        for (key, value) in &frozen.entries {
            db.insert(key.as_slice(), value.clone().unwrap()).unwrap();
        }
        buffer.release(&[]);

        seen.extend(merged.map(|item| item.unwrap().0.to_vec()));
        let expected: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        assert_eq!(seen, expected);
    }

    /// Keys above the greatest one sled holds with their first byte are answered without
    /// sled, by gets and by scans within one keyspace; a release raises the bound, also under
    /// a scan already open. (Keys written into sled behind the buffer's back show which reads
    /// asked sled: only a checkpoint writes there.)
    #[test]
    fn keys_above_what_sled_holds_are_not_looked_up_there() {
        let (_dir, db) = db();
        db.insert("e-01", "sled").unwrap();
        let buffer = WriteBuffer::over(&db).unwrap();
        for key in ["e-05", "x-01"] {
            db.insert(key, "behind").unwrap();
        }
        assert!(matches!(buffer.get(b"e-05"), Found::Absent));
        assert!(matches!(buffer.get(b"x-01"), Found::Absent), "sled held no key of this keyspace");
        assert!(matches!(buffer.get(b"e-01"), Found::Unknown));
        let range = |from: &str, to: &str| {
            Merged::new(&buffer, &db, Bound::Included(from.into()), Bound::Excluded(to.into()), false)
                .map(|item| String::from_utf8(item.unwrap().0.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(range("e-02", "e-09"), Vec::<String>::new());
        assert_eq!(range("e-00", "e-09"), ["e-01", "e-05"], "a lower bound below the greatest key asks sled");
        assert_eq!(range("e-00", "y"), ["e-01", "e-05", "x-01"], "a scan across keyspaces asks sled");

        // A checkpoint of e-07 while a scan is open (it has not read yet): the scan sees it once.
        buffer.apply_group(1, vec![put("e-07", "new")]);
        let mut open =
            Merged::new(&buffer, &db, Bound::Included(b"e-06".to_vec()), Bound::Excluded(b"e-09".to_vec()), false);
        let frozen = buffer.freeze();
        for (key, value) in &frozen.entries {
            db.insert(key.as_slice(), value.clone().unwrap()).unwrap();
        }
        buffer.release(&[b"e-07".to_vec()]);
        assert_eq!(open.next().unwrap().unwrap().0, b"e-07".as_slice());
        assert!(open.next().is_none());
        assert!(matches!(buffer.get(b"e-05"), Found::Unknown));
        assert_eq!(range("e-02", "e-09"), ["e-05", "e-07"]);
    }

    #[test]
    fn remove_if_removes_only_the_expected_value() {
        let (_dir, db) = db();
        db.insert("k", "old").unwrap();
        let buffer = WriteBuffer::default();
        assert!(!buffer.remove_if(&db, b"k", b"other").unwrap());
        assert!(buffer.remove_if(&db, b"k", b"old").unwrap());
        assert!(matches!(buffer.get(b"k"), Found::Absent));
        buffer.apply_group(1, vec![put("k", "new")]);
        assert!(!buffer.remove_if(&db, b"k", b"old").unwrap());
    }
}

//! Durable stores for ordermesh services: event log, snapshots, outbox, idempotency keys,
//! a secondary index, with group commit. The only crate that knows sled (and bincode).
//!
//! # Layout
//!
//! - [`codec`]: the versioned binary record format (`[0xA5, FORMAT_VERSION]` + bincode 2). The
//!   one place bincode is used; decoders return errors, never panic.
//! - `error`: [`StorageError`]; every error that comes from disk names the store's directory.
//! - `store`: [`Store`] and its types: opening, the caller-side half of a commit (checking keys,
//!   encoding values), and every read.
//! - `committer`: group commit. The *committer*, run by each writer in turn under a lock, checks
//!   its batch (versions, claims) against everything applied before, applies it to the write
//!   buffer and encodes it as a write-ahead log record; the *syncer* thread appends the records
//!   of every write handed over meanwhile to the log (`wal`) and fsyncs it, one round for all of
//!   them (at most one a millisecond while writers are concurrent), and only then acknowledges the
//!   waiters and publishes the durable outbox watermark.
//! - `buffer`: the write buffer, where writes land instead of sled; reads look there first.
//!   Every 100 ms the checkpoint thread (`checkpoint`) moves it into sled, so keys removed soon
//!   after they were written never reach sled; twice a second it also flushes sled, fsyncs its
//!   files and retires the log segments they now cover (one becomes the zero-filled spare the
//!   next segment is written over).
//! - `wal`: the write-ahead log (`<dir>/wal/`), checksummed records of commit groups, replayed
//!   at open over what sled recovered (each move into sled writes the last group's number,
//!   `m\0commit_seq`, last). Why our own log: sled 0.34 makes a batch durable only through its
//!   flush, and every atomic batch writes its I/O buffer; through sled, durability cost most of
//!   the CPU.
//! - `keys`: the key layout below.
//!
//! One store is one sled database in its own directory, holding one tree. Every key starts with a
//! keyspace tag and 0x00, so a commit group is one run of writes to one tree:
//!
//! | key                          | value                                         |
//! |------------------------------|-----------------------------------------------|
//! | `e\0<entity>\0<seq u64 BE>`  | event bytes (the caller's)                    |
//! | `e\0<entity>\0<seq BE><n u8>` | the `n` (2..=255) events of one append up to `seq`, each `len u32 LE` + bytes |
//! | `s\0<entity>`                | snapshot, codec-encoded `{seq, bytes}`        |
//! | `o\0<id u64 BE>`             | outbox payload (the caller's)                 |
//! | `i\0<message id>`            | retired (older builds' inbox marks): removed at open |
//! | `k\0<idempotency key>`       | codec-encoded `{value, created_at_ms}`        |
//! | `x\0<key>`                   | index value (the caller's)                    |
//! | `m\0layout`                  | codec-encoded `u32` key layout version        |
//! | `m\0outbox_next`             | codec-encoded `u64`: next outbox id           |
//! | `m\0commit_seq`              | codec-encoded `u64`: commit groups applied    |
//!
//! Entity names are non-empty and contain no 0x00, so one entity's events never fall inside
//! another's key range; big-endian seqs and ids make byte order numeric order. An entity's
//! version is the seq of its last event key: there is no separate head record, because writing
//! one with every append cost about a third of the write path's CPU inside sled (measured with
//! the `group_commit` bench), and the committer caches versions anyway.
//!
//! Besides sled's own files (`db`, `conf`, `blobs/`, `snap.*`) and the log (`wal/`), the directory holds the file
//! `ORDERMESH_STORE`, written once a new store is durable and then rewritten (atomically) at each
//! clean close and once a second while commits flow, with the number of commit groups known to be
//! durable (`m\0commit_seq` counts them inside the database). sled recovers a log that has a
//! corrupt record as if the log ended there, silently; so opening a store whose database lacks the
//! `m\0layout` marker, or holds fewer commit groups (after the log's replay) than the sentinel
//! file says, or whose log has a gap or a damaged record before its tail (other than a torn
//! last round, see `wal::replay`), is an error
//! instead of a silently empty or shorter store.

mod buffer;
mod checkpoint;
pub mod codec;
mod committer;
mod cpu;
mod error;
mod keys;
mod store;
mod wal;

pub use cpu::cores_saturated;
pub use error::StorageError;
pub use store::{
    Append, Committed, IdempotencyRecord, KeyValue, OutboxEntry, Snapshot, Store, StoreOptions, StoreStats,
    StoredEvent, WriteBatch,
};

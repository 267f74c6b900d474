//! Durable stores for ordermesh services: event log, snapshots, outbox, inbox, idempotency keys,
//! a secondary index, with group commit. The only crate that knows sled (and bincode).
//!
//! # Layout
//!
//! - [`codec`]: the versioned binary record format (`[0xA5, FORMAT_VERSION]` + bincode 2). The
//!   one place bincode is used; decoders return errors, never panic.
//! - `error`: [`StorageError`]; every error that comes from disk names the store's directory.
//! - `store`: [`Store`] and its types: opening, the caller-side half of a commit (checking keys,
//!   encoding values, so the committer thread does not), and every read.
//! - `committer`: group commit, a two-stage pipeline on two threads. The *committer* takes every
//!   queued [`WriteBatch`], checks versions and claims (also against earlier batches of the same
//!   group), and applies the accepted ones as one atomic sled batch; the *syncer* then flushes
//!   sled and fsyncs the files for real (sled 0.34's flush only calls `sync_file_range`), one
//!   round for every group applied meanwhile, and only then acknowledges the waiters and
//!   publishes the durable outbox watermark.
//! - `keys`: the key layout below.
//!
//! One store is one sled database in its own directory, holding one tree. Every key starts with a
//! keyspace tag and 0x00, so a whole commit group is a single atomic `apply_batch`:
//!
//! | key                          | value                                         |
//! |------------------------------|-----------------------------------------------|
//! | `e\0<entity>\0<seq u64 BE>`  | event bytes (the caller's)                    |
//! | `s\0<entity>`                | snapshot, codec-encoded `{seq, bytes}`        |
//! | `o\0<id u64 BE>`             | outbox payload (the caller's)                 |
//! | `i\0<message id>`            | empty: the message was processed              |
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
//! Besides sled's own files (`db`, `conf`, `blobs/`, `snap.*`), the directory holds the file
//! `ORDERMESH_STORE`, written once a new store is durable and then rewritten (atomically) at each
//! clean close and once a second while commits flow, with the number of commit groups known to be
//! durable (`m\0commit_seq` counts them inside the database). sled recovers a log that has a
//! corrupt record as if the log ended there, silently; so opening a store whose database lacks the
//! `m\0layout` marker, or holds fewer commit groups than the sentinel file says, is an error
//! instead of a silently empty or shorter store.

pub mod codec;
mod committer;
mod error;
mod keys;
mod store;

pub use error::StorageError;
pub use store::{
    Append, Committed, IdempotencyRecord, KeyValue, OutboxEntry, Snapshot, Store, StoreOptions, StoreStats,
    StoredEvent, WriteBatch,
};

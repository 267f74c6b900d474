//! Errors of the storage crate.
//!
//! Every error that comes from the disk names the store's directory, so an operator reading a
//! log line knows which of a node's stores (order, inventory, payment) is in trouble. No sled or
//! bincode type appears here: the engine and the format can change without touching callers.

use std::io;
use std::path::PathBuf;

use crate::codec::CodecError;
use crate::store::IdempotencyRecord;

/// Everything that can go wrong in a [`Store`](crate::Store).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The store could not be opened: missing permissions, locked by another process, corrupt
    /// files, an existing store whose data is gone. A store never silently starts empty.
    #[error("cannot open store at {path}: {source}")]
    Open {
        /// The store's directory.
        path: PathBuf,
        /// What the engine or the file system said.
        #[source]
        source: io::Error,
    },

    /// A read or write of the engine failed after the store was open.
    #[error("storage i/o error in {path} during {op}: {message}")]
    Io {
        /// The store's directory.
        path: PathBuf,
        /// What we were doing ("commit", "read events", "fsync", ...).
        op: &'static str,
        /// What the engine or the file system said.
        message: String,
    },

    /// A stored record could not be decoded (or the engine reported a checksum failure).
    #[error("corrupt record in {path} at key {key}: {detail}")]
    Corrupt {
        /// The store's directory.
        path: PathBuf,
        /// A printable description of the key (keyspace and name).
        key: String,
        /// Why the record is unusable.
        detail: String,
        /// The codec's error, when the failure was a decode.
        #[source]
        source: Option<CodecError>,
    },

    /// An optimistic-concurrency check failed: the entity's version moved since the caller read it.
    #[error("version conflict on {entity}: expected {expected}, found {actual}")]
    Conflict {
        /// The entity whose append was rejected.
        entity: String,
        /// The version the caller expected.
        expected: u64,
        /// The version the store has.
        actual: u64,
    },

    /// An idempotency key was already claimed; `existing` is the winner's record, so the caller
    /// can answer with the original result.
    #[error("idempotency key {key} is already taken")]
    IdempotencyKeyTaken {
        /// The key.
        key: String,
        /// The record stored by whoever claimed it first.
        existing: IdempotencyRecord,
    },

    /// A key that cannot be stored (empty, or containing the 0x00 separator).
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },

    /// A flush or fsync failed earlier. What reached the disk is unknown (the kernel may have
    /// dropped dirty pages, see "fsyncgate"), so the store refuses all further work; the only
    /// safe recovery is to reopen it, which replays what really is on disk.
    #[error("store at {path} is unusable after a failed write ({cause}); reopen it")]
    Poisoned {
        /// The store's directory.
        path: PathBuf,
        /// The original failure.
        cause: String,
    },

    /// The store was closed.
    #[error("store is closed")]
    Closed,
}

impl StorageError {
    /// True for the errors that reject one write because of its content (conflict,
    /// taken key, invalid key), as opposed to a failure of the store.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            StorageError::Conflict { .. } | StorageError::IdempotencyKeyTaken { .. } | StorageError::InvalidKey { .. }
        )
    }
}

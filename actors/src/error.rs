//! The errors the services give their callers: a small set of codes, each of which the
//! gateway maps to exactly one HTTP status.

use ordermesh_runtime::CallError;
use ordermesh_storage::StorageError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The entity does not exist, or the requester may not see it (404, never 403).
    #[error("not found")]
    NotFound,
    /// The request breaks a rule (422).
    #[error("{0}")]
    Invalid(String),
    /// The idempotency key was used before with a different request (422).
    #[error("idempotency key reused with a different request")]
    IdempotencyMismatch,
    /// A service the request needs is unreachable or overloaded (503 + Retry-After).
    #[error("{service} unavailable: {detail}")]
    Unavailable { service: &'static str, detail: String },
    /// Storage failed; the request may or may not have taken effect (500).
    #[error("storage: {0}")]
    Storage(String),
}

impl ServiceError {
    /// Seconds a client should wait before retrying, for the errors where retrying helps.
    pub fn retry_after_secs(&self) -> Option<u64> {
        matches!(self, Self::Unavailable { .. }).then_some(1)
    }
}

impl From<CallError> for ServiceError {
    fn from(err: CallError) -> Self {
        let service = match err {
            CallError::Timeout { service, .. }
            | CallError::Unavailable { service }
            | CallError::Overloaded { service } => service,
        };
        Self::Unavailable { service, detail: err.to_string() }
    }
}

impl From<StorageError> for ServiceError {
    fn from(err: StorageError) -> Self {
        Self::Storage(err.to_string())
    }
}

impl From<ordermesh_storage::codec::CodecError> for ServiceError {
    fn from(err: ordermesh_storage::codec::CodecError) -> Self {
        Self::Storage(err.to_string())
    }
}

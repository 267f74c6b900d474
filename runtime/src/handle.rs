//! The caller's side of a service's entities: send or call an entity by key, with a timeout on
//! every call. An active entity gets the message straight into its mailbox; otherwise the
//! caller activates the key on an idle entity actor, or the router spawns one (see `entity.rs`).

use crate::entity::{Directory, RouterMsg};
use ractor::{ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Why a call to an entity got no answer. A call that timed out may still run later, so
/// every handler the runtime hosts is idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("{service} did not answer within {timeout:?}")]
    Timeout { service: &'static str, timeout: Duration },
    #[error("{service} is unavailable")]
    Unavailable { service: &'static str },
    /// Too many requests in flight to the node or router that owns the entity.
    #[error("{service} is overloaded")]
    Overloaded { service: &'static str },
}

/// Reaches the entities of one service on this node (made by `Router::start`).
pub struct RouterHandle<M: Send + 'static> {
    router: ActorRef<RouterMsg<M>>,
    directory: Arc<Directory<M>>,
    service: &'static str,
}

impl<M: Send + 'static> Clone for RouterHandle<M> {
    fn clone(&self) -> Self {
        Self { router: self.router.clone(), directory: self.directory.clone(), service: self.service }
    }
}

impl<M: Send + 'static> RouterHandle<M> {
    pub(crate) fn new(router: ActorRef<RouterMsg<M>>, directory: Arc<Directory<M>>, service: &'static str) -> Self {
        Self { router, directory, service }
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Fire and forget (the entity's own log makes the effect durable, not this send).
    pub fn send(&self, key: &str, msg: M) -> Result<(), CallError> {
        let Err(msg) = self.directory.deliver(key, msg) else {
            return Ok(());
        };
        self.router
            .send_message(RouterMsg::Deliver { key: key.to_owned(), msg })
            .map_err(|_| CallError::Unavailable { service: self.service })
    }

    /// Request/response with the entity `key`.
    pub async fn call<T: Send + 'static>(
        &self,
        key: &str,
        build: impl FnOnce(RpcReplyPort<T>) -> M,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let (reply, answer) = oneshot::channel();
        self.send(key, build(reply.into()))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(value)) => Ok(value),
            Err(_) => Err(CallError::Timeout { service: self.service, timeout }),
            // The entity dropped the reply port: it failed (and will reload on next message).
            Ok(Err(_)) => Err(CallError::Unavailable { service: self.service }),
        }
    }

    /// Number of entities of this service in memory on this node.
    pub fn active_entities(&self) -> usize {
        self.directory.len()
    }

    /// Stops the router and every entity it hosts.
    pub fn stop(&self) {
        self.router.stop(Some("shutdown".into()));
    }
}

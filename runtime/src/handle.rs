//! The caller's side of a router: send or call an entity by key, with a timeout on every call.

use crate::entity::RouterMsg;
use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};
use std::time::Duration;

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

/// Reaches the entities of one service through its router.
pub struct RouterHandle<M: Send + 'static> {
    router: ActorRef<RouterMsg<M>>,
    service: &'static str,
}

impl<M: Send + 'static> Clone for RouterHandle<M> {
    fn clone(&self) -> Self {
        Self { router: self.router.clone(), service: self.service }
    }
}

impl<M: Send + 'static> RouterHandle<M> {
    pub fn new(router: ActorRef<RouterMsg<M>>, service: &'static str) -> Self {
        Self { router, service }
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Fire and forget (the entity's own log makes the effect durable, not this send).
    pub fn send(&self, key: impl Into<String>, msg: M) -> Result<(), CallError> {
        self.router
            .send_message(RouterMsg::Deliver { key: key.into(), msg })
            .map_err(|_| CallError::Unavailable { service: self.service })
    }

    /// Request/response with the entity `key`.
    pub async fn call<T: Send + 'static>(
        &self,
        key: impl Into<String>,
        build: impl FnOnce(RpcReplyPort<T>) -> M,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let key = key.into();
        let result = self
            .router
            .call(|reply| RouterMsg::Deliver { key, msg: build(reply) }, Some(timeout))
            .await
            .map_err(|_| CallError::Unavailable { service: self.service })?;
        match result {
            CallResult::Success(value) => Ok(value),
            CallResult::Timeout => Err(CallError::Timeout { service: self.service, timeout }),
            // The entity dropped the reply port: it failed (and will reload on next message).
            CallResult::SenderError => Err(CallError::Unavailable { service: self.service }),
        }
    }

    /// Number of entities of this service in memory on this node.
    pub async fn active_entities(&self) -> Result<usize, CallError> {
        match self.router.call(RouterMsg::CountActive, Some(Duration::from_secs(5))).await {
            Ok(CallResult::Success(n)) => Ok(n),
            _ => Err(CallError::Unavailable { service: self.service }),
        }
    }

    /// Stops the router and every entity it hosts.
    pub fn stop(&self) {
        self.router.stop(Some("shutdown".into()));
    }
}

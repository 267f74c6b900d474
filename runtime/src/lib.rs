//! The ordermesh actor runtime: it hosts entities and moves messages; it knows nothing of
//! orders or payments.
//!
//! # Layout
//!
//! - [`entity`]: one actor per entity, activated on demand by a per-service router,
//!   passivated when idle (the [`entity::Entity`] trait is what a service implements).
//! - [`handle`]: the caller's side: send or call an entity by key, with timeouts.
//! - [`relay`]: delivers a store's outbox at least once, with retries.
//! - [`resilience`]: backoff with jitter, circuit breaker.
//! - [`cluster`]: membership on ractor_cluster, heartbeats, reconnect, shard ownership and the
//!   remotable routers (the only module that knows ractor_cluster).
//!
//! Cluster membership, shard ownership and remote routing come here too (cluster issue); the
//! router and message shapes are made so that a router can become remote without a rewrite.

pub mod cluster;
pub mod entity;
pub mod handle;
pub mod relay;
pub mod resilience;

pub use entity::{Entity, EntityContext, HostingOptions, Mailbox, Router, RouterMsg};
pub use handle::{CallError, RouterHandle};
pub use resilience::{Backoff, BreakerState, CircuitBreaker};

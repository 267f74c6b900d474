//! The ordermesh domain and the services that host it.
//!
//! # Layout
//!
//! - [`domain`]: order, stock item and payment as pure state machines (no actors, no disks).
//! - [`services`]: the actors hosting them (one per entity), the order saga, the typed
//!   service handles callers use, integration events, and [`services::Services`], which
//!   starts all three services on one node.
//! - [`provider`]: the payment provider seam and its simulated implementation.
//! - [`error`]: the errors the services give callers.

pub mod domain;
pub mod error;
pub mod provider;
pub mod services;

pub use error::ServiceError;
pub use services::{Services, Settings};

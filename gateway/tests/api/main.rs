//! The gateway over real HTTP: each test starts its own server on 127.0.0.1:0 with real
//! services on a temporary data directory (`common::spawn_app`), and talks to it with
//! reqwest (or a raw socket where a test must hold a request half-sent).
//!
//! One test binary with modules, rather than one per file: each binary links the whole
//! stack, and on a small machine the links dominate the suite's time.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod edge;
mod inventory;
mod openapi;
mod operations;
mod orders;
mod payments;

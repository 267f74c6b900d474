//! The HTTP gateway (built in the gateway issue).

pub mod auth;
pub mod config;
pub mod problem;

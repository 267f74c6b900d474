//! The ordermesh domain and the actors that host it.
pub mod domain;

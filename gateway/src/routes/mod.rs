//! The handlers, one module per resource. Each handler carries its `#[utoipa::path]`
//! annotation, so the OpenAPI document ([`crate::openapi`]) is written next to the code it
//! describes.

pub mod health;
pub mod inventory;
pub mod orders;

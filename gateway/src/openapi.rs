//! The OpenAPI document, served at `/openapi.json`.
//!
//! It is assembled by utoipa from the handlers' `#[utoipa::path]` annotations and the
//! `ToSchema` types of [`crate::api`], so it lives next to the code. What keeps it true is a
//! test (`tests/api/openapi.rs`): the (method, path) pairs it lists are exactly those the
//! router serves, and real responses have exactly the properties of their schemas.

use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::api;
use crate::routes::{health, inventory, orders};

/// An RFC 9457 problem, the body of every error (`application/problem+json`). Documentation
/// only; responses are built by [`crate::problem::Problem`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDoc {
    /// URI identifying the kind of problem, e.g. `https://ordermesh.dev/problems/not-found`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short summary, the same for every occurrence of this `type`.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// The input that broke a rule (`items[2].quantity`, `limit`, `Idempotency-Key`), when
    /// one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The document's root.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ordermesh",
        version = "1",
        description = "Order platform API. Every `/v1` route needs `Authorization: Bearer <JWT>`; \
                       every error is `application/problem+json` (RFC 9457)."
    ),
    paths(
        orders::place_order,
        orders::list_orders,
        orders::get_order,
        orders::wait_orders,
        orders::cancel_order,
        inventory::set_stock,
        inventory::get_stock,
        health::livez,
        health::readyz,
        health::metrics,
        health::openapi_json,
    ),
    components(schemas(
        api::PlaceOrderRequest,
        api::OrderItemRequest,
        api::Order,
        api::OrderLine,
        api::OrderStatus,
        api::CancelReason,
        api::OrderPage,
        api::WaitOrdersRequest,
        api::WaitedOrders,
        api::SetStockRequest,
        api::StockItem,
        api::Health,
        ProblemDoc,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "orders", description = "Place, read, list and cancel orders"),
        (name = "inventory", description = "Stock levels and prices"),
        (name = "operations", description = "Health, metrics and this document"),
    ),
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the `/v1` operations refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The document as JSON.
pub fn document_json() -> String {
    ApiDoc::openapi().to_json().unwrap_or_else(|err| {
        tracing::error!(%err, "cannot serialize the OpenAPI document");
        "{}".to_owned()
    })
}

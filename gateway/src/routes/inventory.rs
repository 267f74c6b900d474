//! `/v1/inventory/{sku}`: read stock (any role), set stock and price (admins).

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use ordermesh_actors::domain::Sku;

use crate::AppState;
use crate::api::{self, SetStockRequest, StockItem};
use crate::auth::{Auth, Authenticator};
use crate::openapi::ProblemDoc;
use crate::problem::{JsonBody, Problem};

/// An admin caller, or a 403. An extractor rather than a check in the handler, so a
/// customer is refused before its body is read: a customer never learns anything about the
/// admin API's validation rules from 400s and 422s.
#[derive(Debug, Clone)]
pub struct Admin(pub crate::auth::Principal);

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    std::sync::Arc<Authenticator>: axum::extract::FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Auth(principal) = Auth::from_request_parts(parts, state).await?;
        principal.require_admin()?;
        Ok(Self(principal))
    }
}

/// Set a sku's available stock and unit price (admins only).
///
/// `available` replaces the units free for new orders; units reserved by orders in flight
/// are not touched. A sku not seen before is created. A malformed sku is a 422 (it could
/// never be created), not a 404.
#[utoipa::path(
    put,
    path = "/v1/inventory/{sku}",
    tag = "inventory",
    params(("sku" = String, Path, description = "1 to 64 characters of `[A-Za-z0-9._-]`")),
    request_body = SetStockRequest,
    responses(
        (status = 200, description = "The item after the change", body = StockItem),
        (status = 400, description = "Not JSON, unknown field or wrong JSON type", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "The caller is not an admin", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Body not sent as `application/json`", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Negative value, missing field, or malformed sku", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or unreachable; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn set_stock(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(sku): Path<String>,
    JsonBody(request): JsonBody<SetStockRequest>,
) -> Result<Json<StockItem>, Problem> {
    let sku = Sku::parse(sku).map_err(|err| api::invalid_field("sku".into(), err.reason))?;
    let (available, price) = request.validate()?;
    let view = state.services.inventory.set_stock(&sku, available, price).await?;
    tracing::info!(%sku, available, price_cents = price.cents(), by = %admin.subject, "stock set");
    Ok(Json(view.into()))
}

/// Read a sku's stock and price (any role).
#[utoipa::path(
    get,
    path = "/v1/inventory/{sku}",
    tag = "inventory",
    params(("sku" = String, Path, description = "The sku")),
    responses(
        (status = 200, description = "The item; `available` excludes `reserved`", body = StockItem),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "Unknown (or malformed) sku", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or unreachable; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn get_stock(
    State(state): State<AppState>,
    Auth(_principal): Auth,
    Path(sku): Path<String>,
) -> Result<Json<StockItem>, Problem> {
    let not_found = || Problem::not_found("no such sku");
    // A malformed sku names nothing that could exist: the same 404 as an unknown one.
    let sku = Sku::parse(sku).map_err(|_| not_found())?;
    let view = state.services.inventory.get(&sku).await?.ok_or_else(not_found)?;
    Ok(Json(view.into()))
}

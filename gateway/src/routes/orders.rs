//! `/v1/orders`: place, read, list and cancel orders.
//!
//! Who may see what: a customer sees and cancels only its own orders, an admin all of them.
//! Someone else's order answers 404, exactly like a missing one, so ids of other customers'
//! orders cannot be probed (no 403 that would confirm they exist). The check itself is the
//! service's ([`Requester`]); the gateway only says who is asking.

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ordermesh_actors::domain::{CustomerId, OrderId};
use ordermesh_actors::services::order::{ListQuery, Requester};

use crate::AppState;
use crate::api::{
    self, GetOrderParams, ListOrdersParams, OrderPage, PlaceOrderRequest, WaitOrdersRequest, WaitedOrders,
    encode_page_token,
};
use crate::auth::{Auth, Principal};
use crate::openapi::ProblemDoc;
use crate::problem::{JsonBody, Problem};

/// The header that carries a client's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest accepted `Idempotency-Key`: keys are stored per customer; a bound keeps a client
/// from storing megabytes under one.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Set to `true` on a `POST /v1/orders` answered from an earlier request with the same
/// `Idempotency-Key` (the status and body are those of the original order).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The optional `Idempotency-Key` header, checked before the body is read: at most one,
/// 1 to 255 visible ASCII characters, or 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else { return Ok(Self(None)) };
        let bad = |reason: String| Problem::bad_request(reason).with_extension("field", "Idempotency-Key");
        if values.next().is_some() {
            return Err(bad("send at most one `Idempotency-Key` header".into()));
        }
        let key = value.to_str().map_err(|_| bad("`Idempotency-Key` must be visible ASCII".into()))?;
        if key.is_empty() {
            return Err(bad("`Idempotency-Key` must not be empty".into()));
        }
        if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(bad(format!(
                "`Idempotency-Key` must be at most {MAX_IDEMPOTENCY_KEY_LEN} characters (it has {})",
                key.len()
            )));
        }
        Ok(Self(Some(key.to_owned())))
    }
}

/// The customer a principal places orders as: its subject, admins included.
fn customer_of(principal: &Principal) -> Result<CustomerId, Problem> {
    // The token verified, but its subject cannot be a customer id (say, it contains '/'):
    // the token is fine, this subject may just not own orders.
    CustomerId::parse(principal.subject.clone())
        .map_err(|err| Problem::forbidden(format!("the token's subject cannot own orders: {}", err.reason)))
}

/// Who is asking, as the order service's access checks need it.
fn requester_of(principal: &Principal) -> Result<Requester, Problem> {
    if principal.is_admin() { Ok(Requester::Admin) } else { customer_of(principal).map(Requester::Customer) }
}

/// Ids that do not parse cannot name an order: the same 404 as a missing one.
fn order_id(raw: &str) -> Result<OrderId, Problem> {
    OrderId::parse(raw).map_err(|_| order_not_found())
}

fn order_not_found() -> Problem {
    Problem::not_found("no such order")
}

fn location(order: &api::Order) -> HeaderValue {
    // Ids are UUIDs, always a valid header value.
    HeaderValue::try_from(format!("/v1/orders/{}", order.id)).unwrap_or(HeaderValue::from_static("/v1/orders"))
}

/// Place an order.
///
/// The order is durable before the answer is sent; it then moves on by itself (reserve
/// stock, charge, confirm, or cancel): poll `GET /v1/orders/{id}`. Prices come from
/// inventory; the customer is the token's subject. With an `Idempotency-Key`, a retry with
/// the same body returns the original order (same id, same status code, header
/// `Idempotent-Replayed: true`); the same key with another body is a 422.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    request_body = PlaceOrderRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, max_length = 255,
         description = "Makes retries safe: the same key and body from the same customer give the same order."),
    ),
    responses(
        (status = 202, description = "Accepted: the order is durable and its saga started (also for an idempotent replay).",
         body = api::Order,
         headers(
             ("Location" = String, description = "`/v1/orders/{id}`"),
             ("Idempotent-Replayed" = Option<String>, description = "`true` when this is the original order of a reused key"),
         )),
        (status = 400, description = "Not JSON, unknown field, wrong JSON type, or a bad `Idempotency-Key` header", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "The token's subject cannot own orders", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit (64 KiB by default)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Body not sent as `application/json`", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "A rule is broken (`detail` and `field` name it), or the `Idempotency-Key` was used with another body", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or a service is unreachable; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 504, description = "Deadline passed, outcome unknown: retry with the same `Idempotency-Key`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn place_order(
    State(state): State<AppState>,
    Auth(principal): Auth,
    IdempotencyKey(key): IdempotencyKey,
    JsonBody(request): JsonBody<PlaceOrderRequest>,
) -> Result<Response, Problem> {
    let new = request.into_new_order(customer_of(&principal)?)?;
    let outcome = state.services.orders.place(new, key).await?;
    let order = api::Order::from(&outcome.order);
    if outcome.created {
        tracing::info!(order_id = %order.id, customer = %order.customer_id, total_cents = order.total_cents, "order placed");
    }
    let mut response = (StatusCode::ACCEPTED, [(LOCATION, location(&order))], Json(order)).into_response();
    if !outcome.created {
        response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Read an order (its owner or an admin; anyone else gets 404).
///
/// With `wait_ms`, a long poll: the answer comes as soon as the order is `confirmed` or
/// `cancelled`, or when the wait is over (with the order as it is then), so a client learns
/// the outcome with one request instead of a polling loop.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "Order id"), GetOrderParams),
    responses(
        (status = 200, description = "The order", body = api::Order),
        (status = 400, description = "Bad or unknown query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not the caller's", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or unreachable; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn get_order(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<api::Order>, Problem> {
    // Parsed here rather than with a `Query` argument so its rejection is our 400 problem.
    let Query(params) = Query::<GetOrderParams>::try_from_uri(&uri)
        .map_err(|err| Problem::bad_request(format!("bad query string: {}", err.body_text())))?;
    let wait = params.wait()?.min(state.max_order_wait);
    let id = order_id(&id)?;
    let requester = requester_of(&principal)?;
    let orders = &state.services.orders;
    let order = if wait.is_zero() {
        orders.get(id, &requester).await?
    } else {
        orders.get_when_terminal(id, &requester, wait).await?
    };
    Ok(Json(api::Order::from(&order.ok_or_else(order_not_found)?)))
}

/// Wait for any of many orders to end (their owner or an admin).
///
/// Answers as soon as at least one named order is `confirmed` or `cancelled` (or names no
/// order the caller may see), with the named orders found so (in a cluster, those of the
/// nodes that answered first), or when the wait is over (then possibly with none). A client
/// following many orders sends the ones still open again: one request for many orders
/// instead of one long poll each.
#[utoipa::path(
    post,
    path = "/v1/orders/wait",
    tag = "orders",
    request_body = WaitOrdersRequest,
    responses(
        (status = 200, description = "The named orders that ended, and the ids that name none", body = WaitedOrders),
        (status = 400, description = "Not JSON, unknown field or wrong JSON type", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit (64 KiB by default, enough for 1000 ids)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Body not sent as `application/json`", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "No ids, more than 1000, or `wait_ms` out of range", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded, or the owner of a named order is unreachable; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn wait_orders(
    State(state): State<AppState>,
    Auth(principal): Auth,
    JsonBody(request): JsonBody<WaitOrdersRequest>,
) -> Result<Json<WaitedOrders>, Problem> {
    let wait = request.checked_wait()?.min(state.max_order_wait);
    let requester = requester_of(&principal)?;
    let mut not_found = Vec::new();
    let mut ids = Vec::with_capacity(request.ids.len());
    for raw in request.ids {
        match OrderId::parse(&raw) {
            Ok(id) => ids.push(id),
            Err(_) => not_found.push(raw),
        }
    }
    // An id that names nothing is news already: answer now.
    let wait = if not_found.is_empty() { wait } else { std::time::Duration::ZERO };
    let waited = if ids.is_empty() {
        Default::default()
    } else {
        state.services.orders.wait_any_terminal(&ids, &requester, wait).await?
    };
    not_found.extend(waited.not_found.iter().map(ToString::to_string));
    Ok(Json(WaitedOrders { orders: waited.terminal.iter().map(api::Order::from).collect(), not_found }))
}

/// List orders: a customer's own, or (admin) everyone's, optionally one customer's.
///
/// Pages follow creation order; pass `next_page_token` back as `page_token` for the next.
#[utoipa::path(
    get,
    path = "/v1/orders",
    tag = "orders",
    params(ListOrdersParams),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "A query parameter is invalid or unknown", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "A customer asked for another customer's orders", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn list_orders(
    State(state): State<AppState>,
    Auth(principal): Auth,
    uri: Uri,
) -> Result<Json<OrderPage>, Problem> {
    // Parsed here rather than with a `Query` argument so its rejection is our 400 problem.
    let Query(params) = Query::<ListOrdersParams>::try_from_uri(&uri)
        .map_err(|rejection| Problem::bad_request(format!("invalid query: {}", rejection.body_text())))?;
    let query = params.validate()?;
    let customer = if principal.is_admin() {
        query.customer
    } else {
        let own = customer_of(&principal)?;
        if query.customer.as_ref().is_some_and(|asked| *asked != own) {
            return Err(Problem::forbidden("customers can list only their own orders: leave out `customer`"));
        }
        Some(own)
    };
    let list = ListQuery { customer, status: query.status, limit: query.limit, after: query.after };
    let page = state.services.orders.list(&list).await?;
    Ok(Json(OrderPage {
        orders: page.orders.iter().map(api::Order::from).collect(),
        next_page_token: page.next.map(encode_page_token),
    }))
}

/// Cancel an order (its owner or an admin).
///
/// A confirmed order is refunded and its stock released. Cancelling a cancelled order
/// changes nothing and answers 200.
#[utoipa::path(
    post,
    path = "/v1/orders/{id}/cancel",
    tag = "orders",
    params(("id" = String, Path, description = "Order id")),
    responses(
        (status = 202, description = "Cancelled now (compensation done or under way)", body = api::Order),
        (status = 200, description = "Already cancelled: nothing changed", body = api::Order),
        (status = 401, description = "No valid bearer token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or not the caller's", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "The order cannot be cancelled", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Rate limit of this subject exceeded", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or unreachable; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])),
)]
pub async fn cancel_order(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = order_id(&id)?;
    let requester = requester_of(&principal)?;
    let outcome = state.services.orders.cancel(id, &requester).await?;
    let status = if outcome.already_cancelled { StatusCode::OK } else { StatusCode::ACCEPTED };
    if !outcome.already_cancelled {
        tracing::info!(order_id = %id, by = %principal.subject, "order cancelled");
    }
    Ok((status, Json(api::Order::from(&outcome.order))).into_response())
}

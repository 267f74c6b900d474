//! The JSON of the v1 API, and its conversion to and from the domain.
//!
//! Requests are read into plain, permissive types (`String`, `i64`) with
//! `deny_unknown_fields`, then converted into the domain's validated newtypes (`Sku`,
//! `Quantity`, `PaymentToken`, ...). The permissive first step is deliberate: a quantity of
//! `0` or `-3` then reaches our check and is answered with a 422 naming the exact field
//! (`items[2].quantity: must be between 1 and 1000`) instead of a generic serde message.
//! Unknown fields are refused (400), so a client cannot set `status`, `total_cents` or
//! `customer_id`: those come from the server (prices from inventory, the customer from the
//! token).
//!
//! Responses are separate types from the domain's, so the wire format changes only here and
//! the OpenAPI schemas (derived from these types) describe exactly what is sent.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use ordermesh_actors::domain::{
    self, CustomerId, InvalidValue, Money, OrderId, PaymentToken, Quantity, Sku, StockView, UnixMillis,
};
use ordermesh_actors::services::order::NewOrder;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::problem::Problem;

/// The body of `POST /v1/orders`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlaceOrder)]
pub struct PlaceOrderRequest {
    /// The lines to order: 1 to 100. Repeated skus are merged.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderItemRequest>,
    /// A payment method token: `tok_` then 1 to 60 letters, digits or `_`
    /// (test tokens: `tok_visa`, `tok_chargeDeclined`, `tok_flaky`, `tok_timeout`).
    #[schema(example = "tok_visa", pattern = "^tok_[A-Za-z0-9_]{1,60}$")]
    pub payment_token: String,
}

/// One line of a new order. Its price comes from inventory, never from the client.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = PlaceOrderItem)]
pub struct OrderItemRequest {
    /// 1 to 64 characters of `[A-Za-z0-9._-]`.
    #[schema(example = "apple", min_length = 1, max_length = 64)]
    pub sku: String,
    /// Units, 1 to 1000. Signed, so that out-of-range values reach the validation that
    /// names the line.
    #[schema(minimum = 1, maximum = 1000)]
    pub quantity: i64,
}

impl PlaceOrderRequest {
    /// Validates every field into the domain's types; the first failure is a 422 naming the
    /// field. `customer` is the token's subject: a client never chooses whose order it is.
    pub fn into_new_order(self, customer: CustomerId) -> Result<NewOrder, Problem> {
        let max_lines = domain::Order::MAX_LINES;
        if self.items.is_empty() || self.items.len() > max_lines {
            return Err(invalid_field(
                "items".into(),
                format!("must have 1 to {max_lines} lines (it has {})", self.items.len()),
            ));
        }
        let items = self
            .items
            .into_iter()
            .enumerate()
            .map(|(i, line)| {
                let sku = Sku::parse(line.sku).map_err(|err| invalid_value(format!("items[{i}].sku"), &err))?;
                let quantity = u32::try_from(line.quantity)
                    .map_err(|_| ())
                    .and_then(|units| Quantity::new(units).map_err(|_| ()))
                    .map_err(|()| {
                        invalid_field(
                            format!("items[{i}].quantity"),
                            format!("must be between 1 and {}", Quantity::MAX),
                        )
                    })?;
                Ok((sku, quantity))
            })
            .collect::<Result<Vec<_>, Problem>>()?;
        let payment_token =
            PaymentToken::parse(self.payment_token).map_err(|err| invalid_value("payment_token".into(), &err))?;
        Ok(NewOrder { customer, items, payment_token })
    }
}

/// A 422 whose detail starts with the field's path and that names it in `field` too, so a
/// client can highlight the input without parsing prose.
pub fn invalid_field(field: String, reason: impl fmt::Display) -> Problem {
    Problem::unprocessable(format!("{field}: {reason}")).with_extension("field", field)
}

fn invalid_value(field: String, err: &InvalidValue) -> Problem {
    invalid_field(field, &err.reason)
}

/// The body of `PUT /v1/inventory/{sku}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SetStock)]
pub struct SetStockRequest {
    /// Units on hand for new orders (not counting units reserved by orders in flight).
    #[schema(minimum = 0)]
    pub available: i64,
    /// Unit price in cents.
    #[schema(minimum = 0)]
    pub price_cents: i64,
}

impl SetStockRequest {
    /// Validates into units and a price; negative values are a 422 naming the field.
    pub fn validate(&self) -> Result<(u64, Money), Problem> {
        let available =
            u64::try_from(self.available).map_err(|_| invalid_field("available".into(), "must not be negative"))?;
        let price = Money::try_from_cents(self.price_cents).map_err(|err| invalid_value("price_cents".into(), &err))?;
        Ok((available, price))
    }
}

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// The order id (a UUIDv7: ids sort by creation time).
    #[schema(format = "uuid")]
    pub id: String,
    /// The customer who placed it: the `sub` of the token used.
    pub customer_id: String,
    /// The lines, with the unit price quoted when the order was placed.
    pub items: Vec<OrderLine>,
    /// Sum of `quantity * unit_price_cents`.
    pub total_cents: u64,
    /// Where the order is in its life.
    pub status: OrderStatus,
    /// Why it was cancelled; `null` unless `status` is `cancelled`.
    #[schema(required = true)]
    pub cancel_reason: Option<CancelReason>,
    /// RFC 3339, UTC, milliseconds.
    #[schema(format = DateTime, example = "2025-01-31T12:00:00.123Z")]
    pub created_at: String,
    /// RFC 3339, UTC, milliseconds: when the status last changed.
    #[schema(format = DateTime, example = "2025-01-31T12:00:00.456Z")]
    pub updated_at: String,
    /// Number of changes the order went through; grows with every change.
    pub version: u64,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    /// The sku ordered.
    pub sku: String,
    /// Units, 1 to 1000.
    pub quantity: u32,
    /// Unit price in cents, quoted by inventory at placement.
    pub unit_price_cents: u64,
}

/// The status of an order. It moves forward only: `pending` -> `reserved` -> `paid` ->
/// `confirmed`, or to `cancelled` from any non-terminal status (and from `confirmed` by an
/// explicit cancel, with refund).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed and durable; stock not yet reserved.
    Pending,
    /// Stock reserved; payment in progress.
    Reserved,
    /// Payment captured; stock being committed.
    Paid,
    /// Terminal: paid and stock committed.
    Confirmed,
    /// Terminal: see `cancel_reason`.
    Cancelled,
}

impl OrderStatus {
    /// The wire name (`pending`, ...), as used by the `status` query parameter too.
    pub fn as_str(self) -> &'static str {
        domain::OrderStatus::from(self).as_str()
    }
}

impl From<domain::OrderStatus> for OrderStatus {
    fn from(status: domain::OrderStatus) -> Self {
        match status {
            domain::OrderStatus::Pending => Self::Pending,
            domain::OrderStatus::Reserved => Self::Reserved,
            domain::OrderStatus::Paid => Self::Paid,
            domain::OrderStatus::Confirmed => Self::Confirmed,
            domain::OrderStatus::Cancelled => Self::Cancelled,
        }
    }
}

impl From<OrderStatus> for domain::OrderStatus {
    fn from(status: OrderStatus) -> Self {
        match status {
            OrderStatus::Pending => Self::Pending,
            OrderStatus::Reserved => Self::Reserved,
            OrderStatus::Paid => Self::Paid,
            OrderStatus::Confirmed => Self::Confirmed,
            OrderStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// A line asked for more units than were available.
    OutOfStock,
    /// A line named a sku inventory does not know.
    UnknownSku,
    /// The payment provider declined the charge.
    PaymentDeclined,
    /// The provider kept failing until the payment deadline.
    PaymentFailed,
    /// The customer (or an admin) cancelled it.
    CustomerRequest,
    /// The order as a whole missed its deadline.
    Timeout,
}

impl From<domain::CancelReason> for CancelReason {
    fn from(reason: domain::CancelReason) -> Self {
        match reason {
            domain::CancelReason::OutOfStock => Self::OutOfStock,
            domain::CancelReason::UnknownSku => Self::UnknownSku,
            domain::CancelReason::PaymentDeclined => Self::PaymentDeclined,
            domain::CancelReason::PaymentFailed => Self::PaymentFailed,
            domain::CancelReason::CustomerRequest => Self::CustomerRequest,
            domain::CancelReason::Timeout => Self::Timeout,
        }
    }
}

impl From<&domain::Order> for Order {
    fn from(order: &domain::Order) -> Self {
        // The domain keeps a decided-but-unfinished cancellation in `cancel_requested`; the
        // API shows a reason only once the order really is cancelled, as the contract says.
        let cancel_reason = match order.status {
            domain::OrderStatus::Cancelled => order.cancel_reason.map(CancelReason::from),
            _ => None,
        };
        Self {
            id: order.id.to_string(),
            customer_id: order.customer.to_string(),
            items: order
                .lines
                .iter()
                .map(|line| OrderLine {
                    sku: line.sku.to_string(),
                    quantity: line.quantity.get(),
                    unit_price_cents: line.unit_price.cents(),
                })
                .collect(),
            total_cents: order.total.cents(),
            status: order.status.into(),
            cancel_reason,
            created_at: rfc3339_millis(order.created_at),
            updated_at: rfc3339_millis(order.updated_at),
            version: order.version,
        }
    }
}

/// `2025-01-31T12:00:00.123Z`.
pub fn rfc3339_millis(at: UnixMillis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

/// Most ids one `POST /v1/orders/wait` may name.
pub const MAX_WAIT_IDS: usize = 1000;

/// The body of `POST /v1/orders/wait`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WaitOrders)]
pub struct WaitOrdersRequest {
    /// The orders to wait for: 1 to 1000 ids.
    #[schema(min_items = 1, max_items = 1000)]
    pub ids: Vec<String>,
    /// How long to wait for one of them to end, in ms (0 to 60000; the server may wait less).
    #[serde(default)]
    pub wait_ms: u64,
}

impl WaitOrdersRequest {
    /// The wait, or a 422 naming the field.
    pub fn checked_wait(&self) -> Result<std::time::Duration, Problem> {
        if self.ids.is_empty() || self.ids.len() > MAX_WAIT_IDS {
            return Err(invalid_field(
                "ids".into(),
                format!("must name 1 to {MAX_WAIT_IDS} orders (it names {})", self.ids.len()),
            ));
        }
        if self.wait_ms > MAX_WAIT_MS {
            return Err(invalid_field("wait_ms".into(), format!("must be from 0 to {MAX_WAIT_MS}")));
        }
        Ok(std::time::Duration::from_millis(self.wait_ms))
    }
}

/// The answer to `POST /v1/orders/wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitedOrders {
    /// The named orders that are `confirmed` or `cancelled`.
    pub orders: Vec<Order>,
    /// The named ids with no order the caller may see (missing, not its own, or not an id).
    pub not_found: Vec<String>,
}

/// A page of `GET /v1/orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPage {
    /// Orders in creation order.
    pub orders: Vec<Order>,
    /// Pass as `page_token` to get the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_page_token: Option<String>,
}

/// Query parameters of `GET /v1/orders/{id}`, as received (strings, so a bad value is a 400
/// naming the parameter; unknown parameters are refused).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetOrderParams {
    /// Long poll: if the order is not yet `confirmed` or `cancelled`, answer as soon as it is,
    /// or after this many milliseconds with the order as it is then (0 to 60000; the server
    /// waits at most half its request timeout, 5 s by default).
    #[param(value_type = Option<u32>, minimum = 0, maximum = 60000)]
    pub wait_ms: Option<String>,
}

/// Largest accepted `wait_ms`.
pub const MAX_WAIT_MS: u64 = 60_000;

impl GetOrderParams {
    /// The requested wait (zero when absent), or a 400 naming `wait_ms`.
    pub fn wait(&self) -> Result<std::time::Duration, Problem> {
        let Some(raw) = &self.wait_ms else { return Ok(std::time::Duration::ZERO) };
        raw.parse::<u64>()
            .ok()
            .filter(|ms| *ms <= MAX_WAIT_MS)
            .map(std::time::Duration::from_millis)
            .ok_or_else(|| bad_param("wait_ms", format!("must be an integer from 0 to {MAX_WAIT_MS}")))
    }
}

/// Query parameters of `GET /v1/orders`, as received. Kept as strings so each bad value is
/// a 400 that names the parameter; unknown parameters are refused, so a typo such as
/// `stauts=paid` cannot silently return every order.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListOrdersParams {
    /// Only orders with this status.
    #[param(value_type = Option<OrderStatus>)]
    pub status: Option<String>,
    /// Orders per page, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// Opaque token from the previous page's `next_page_token`.
    pub page_token: Option<String>,
    /// Admins only: only this customer's orders. Customers always see only their own (a
    /// customer naming someone else gets 403).
    pub customer: Option<String>,
}

/// Default and bounds of `limit`.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest accepted `limit`.
pub const MAX_PAGE_SIZE: usize = 500;

/// A validated `GET /v1/orders` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOrders {
    /// Status filter.
    pub status: Option<domain::OrderStatus>,
    /// Page size, 1..=500.
    pub limit: usize,
    /// Continue after this order.
    pub after: Option<OrderId>,
    /// Customer filter as asked (authorization is the handler's business).
    pub customer: Option<CustomerId>,
}

impl ListOrdersParams {
    /// Validates every parameter; each failure is a 400 naming the parameter.
    pub fn validate(self) -> Result<ListOrders, Problem> {
        let status = self
            .status
            .map(|raw| {
                domain::OrderStatus::parse(&raw).ok_or_else(|| {
                    let known: Vec<&str> = domain::OrderStatus::ALL.iter().map(|s| s.as_str()).collect();
                    bad_param("status", format!("must be one of {}", known.join(", ")))
                })
            })
            .transpose()?;
        let limit = match self.limit {
            None => DEFAULT_PAGE_SIZE,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|limit| (1..=MAX_PAGE_SIZE).contains(limit))
                .ok_or_else(|| bad_param("limit", format!("must be an integer from 1 to {MAX_PAGE_SIZE}")))?,
        };
        let after = self
            .page_token
            .map(|token| {
                decode_page_token(&token).ok_or_else(|| bad_param("page_token", "is not a token this server issued"))
            })
            .transpose()?;
        let customer = self
            .customer
            .map(|raw| CustomerId::parse(raw).map_err(|err| bad_param("customer", err.reason)))
            .transpose()?;
        Ok(ListOrders { status, limit, after, customer })
    }
}

fn bad_param(name: &str, reason: impl fmt::Display) -> Problem {
    Problem::bad_request(format!("query parameter `{name}` {reason}")).with_extension("field", name)
}

/// Page tokens are the id of the last order of the page, in UUID simple form: ids sort by
/// creation, so "after this id" is a stable cursor. Clients must treat it as opaque, which
/// leaves room to change its encoding.
pub fn encode_page_token(last: OrderId) -> String {
    last.to_string().replace('-', "")
}

/// The inverse of [`encode_page_token`]; `None` for anything it did not produce.
pub fn decode_page_token(token: &str) -> Option<OrderId> {
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    OrderId::parse(token).ok()
}

/// A stock item as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockItem {
    /// The sku.
    pub sku: String,
    /// Units free for new orders (excludes `reserved`).
    pub available: u64,
    /// Units held by orders in flight.
    pub reserved: u64,
    /// Unit price in cents.
    pub price_cents: u64,
}

impl From<StockView> for StockItem {
    fn from(view: StockView) -> Self {
        Self {
            sku: view.sku.to_string(),
            available: view.available,
            reserved: view.reserved,
            price_cents: view.price.cents(),
        }
    }
}

/// The body of `/livez` and of a ready `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `live` or `ready`.
    pub status: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn line(sku: &str, quantity: i64) -> OrderItemRequest {
        OrderItemRequest { sku: sku.into(), quantity }
    }

    fn customer() -> CustomerId {
        CustomerId::parse("alice").unwrap()
    }

    fn detail(request: PlaceOrderRequest) -> String {
        let problem = request.into_new_order(customer()).unwrap_err();
        assert_eq!(problem.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        problem.detail().to_owned()
    }

    #[test]
    fn place_order_validation_names_the_field() {
        let request =
            |items: Vec<OrderItemRequest>, token: &str| PlaceOrderRequest { items, payment_token: token.into() };
        let ok = request(vec![line("apple", 1), line("pear", 1000)], "tok_visa").into_new_order(customer()).unwrap();
        assert_eq!(ok.items.len(), 2);
        assert!(detail(request(vec![], "tok_visa")).starts_with("items: must have 1 to 100 lines"));
        assert!(detail(request((0..101).map(|_| line("a", 1)).collect(), "tok_visa")).starts_with("items:"));
        for bad in [0, -1, 1001, i64::MAX] {
            let d = detail(request(vec![line("a", 1), line("b", 1), line("c", bad)], "tok_visa"));
            assert_eq!(d, "items[2].quantity: must be between 1 and 1000");
        }
        assert!(detail(request(vec![line("", 1)], "tok_visa")).starts_with("items[0].sku: must not be empty"));
        assert!(detail(request(vec![line(&"x".repeat(65), 1)], "tok_visa")).starts_with("items[0].sku:"));
        assert!(detail(request(vec![line("a", 1)], "visa")).starts_with("payment_token:"));
    }

    #[test]
    fn list_params_are_validated() {
        let params = |status: Option<&str>, limit: Option<&str>, token: Option<&str>| ListOrdersParams {
            status: status.map(Into::into),
            limit: limit.map(Into::into),
            page_token: token.map(Into::into),
            customer: None,
        };
        let ok = params(None, None, None).validate().unwrap();
        assert_eq!(ok.limit, DEFAULT_PAGE_SIZE);
        assert_eq!(params(Some("paid"), Some("500"), None).validate().unwrap().status, Some(domain::OrderStatus::Paid));
        for (status, limit, token) in [
            (Some("shipped"), None, None),
            (None, Some("0"), None),
            (None, Some("501"), None),
            (None, Some("ten"), None),
            (None, None, Some("nope")),
            (None, None, Some("0198c5a3-6f50-7c4e-9a4e-3b1f2c7d8e9f")),
        ] {
            let problem = params(status, limit, token).validate().unwrap_err();
            assert_eq!(problem.status(), axum::http::StatusCode::BAD_REQUEST);
        }
        let id = OrderId::generate();
        let token = encode_page_token(id);
        assert_eq!(params(None, None, Some(&token)).validate().unwrap().after, Some(id));
    }

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(1_738_324_800_123), "2025-01-31T12:00:00.123Z");
    }

    #[test]
    fn stock_request_refuses_negatives() {
        assert!(SetStockRequest { available: 3, price_cents: 0 }.validate().is_ok());
        let err = SetStockRequest { available: -1, price_cents: 5 }.validate().unwrap_err();
        assert!(err.detail().starts_with("available:"));
        let err = SetStockRequest { available: 1, price_cents: -5 }.validate().unwrap_err();
        assert!(err.detail().starts_with("price_cents:"));
    }
}

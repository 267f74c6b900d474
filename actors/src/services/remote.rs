//! The services' side of cross-node routing: the versioned, codec-encoded requests a
//! service handle sends to the owning node's router, and the [`WireHandler`]s that answer them
//! there by calling the same handle's local path.
//!
//! Every request below is encoded with `ordermesh_storage::codec` (format header) inside the
//! runtime's versioned envelope (`WIRE_VERSION`); adding a field or variant means a new wire
//! version. Every request is idempotent on the owner (stock commands per order id, payments per
//! order id, settlements per event id; a `Place` carries the order id chosen by the caller, so
//! a retried place of the same id is rejected as a duplicate rather than creating a second).

use super::events::{IntegrationEvent, PaymentOutcome};
use super::inventory::InventoryService;
use super::order::{ListQuery, NewOrder, OrderService, Requester};
use super::payment::PaymentService;
use crate::domain::{Order, OrderId, Sku, StockCommand, StockRejection, StockView};
use crate::error::ServiceError;
use ordermesh_runtime::cluster::wire::{BoxFuture, WireHandler};
use ordermesh_runtime::cluster::{Cluster, RemoteError, RemoteRouter, Target};
use ordermesh_storage::codec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// [`ServiceError`] as it crosses the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireServiceError {
    NotFound,
    Invalid(String),
    IdempotencyMismatch,
    Unavailable { service: String, detail: String },
    Storage(String),
}

fn static_service(service: &str) -> &'static str {
    match service {
        "order" => "order",
        "inventory" => "inventory",
        "payment" => "payment",
        _ => "cluster",
    }
}

impl From<ServiceError> for WireServiceError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::NotFound => Self::NotFound,
            ServiceError::Invalid(s) => Self::Invalid(s),
            ServiceError::IdempotencyMismatch => Self::IdempotencyMismatch,
            ServiceError::Unavailable { service, detail } => Self::Unavailable { service: service.into(), detail },
            ServiceError::Storage(s) => Self::Storage(s),
        }
    }
}

impl From<WireServiceError> for ServiceError {
    fn from(err: WireServiceError) -> Self {
        match err {
            WireServiceError::NotFound => Self::NotFound,
            WireServiceError::Invalid(s) => Self::Invalid(s),
            WireServiceError::IdempotencyMismatch => Self::IdempotencyMismatch,
            WireServiceError::Unavailable { service, detail } => {
                Self::Unavailable { service: static_service(&service), detail }
            }
            WireServiceError::Storage(s) => Self::Storage(s),
        }
    }
}

type WireResult<T> = Result<T, WireServiceError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InventoryRequest {
    /// -> `WireResult<Result<StockView, StockRejection>>`
    Execute { sku: Sku, command: StockCommand },
    /// -> `WireResult<Option<StockView>>`
    Get { sku: Sku },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OrderRequest {
    /// -> `WireResult<(Order, bool)>` (the order, created)
    Place { id: OrderId, new: NewOrder, idempotency_key: Option<String> },
    /// -> `WireResult<Option<Order>>`
    Get { id: OrderId, requester: Requester },
    /// -> `WireResult<(Order, bool)>` (the order, already cancelled)
    Cancel { id: OrderId, requester: Requester },
    /// -> `WireResult<(Vec<Order>, Option<OrderId>)>` (this node's orders only)
    List { query: ListQuery },
    /// -> `WireResult<()>`
    PaymentSettled { order: OrderId, event_id: String, outcome: PaymentOutcome },
    /// -> `WireResult<Option<Order>>`, once the order is terminal or `wait_ms` has passed
    GetWhenTerminal { id: OrderId, requester: Requester, wait_ms: u64 },
    /// -> `WireResult<Waited>`, once one of the orders is terminal or `wait_ms` has passed
    WaitAnyTerminal { ids: Vec<OrderId>, requester: Requester, wait_ms: u64 },
}

/// Longest long poll a node serves for another (the gateway asks for less).
const MAX_REMOTE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PaymentRequest {
    /// -> `WireResult<()>`
    Deliver(IntegrationEvent),
}

/// The cluster a handle routes through (`None`: single node, everything local).
pub(crate) type Placement = Option<Arc<Cluster>>;

/// `Ok(None)`: handle it locally; `Ok(Some)`: send it to that router; `Err`: the owner is
/// unreachable (fail fast, 503).
pub(crate) fn locate(
    placement: &Placement,
    service: &'static str,
    key: &str,
) -> Result<Option<RemoteRouter>, ServiceError> {
    let Some(cluster) = placement else { return Ok(None) };
    match cluster.locate(service, key)? {
        Target::Local => Ok(None),
        Target::Remote(router) => Ok(Some(router)),
    }
}

/// Sends `request` to `router`, decodes the typed answer.
pub(crate) async fn call<Req: Serialize, T: DeserializeOwned>(
    router: &RemoteRouter,
    service: &'static str,
    request: &Req,
    timeout: Duration,
) -> Result<T, ServiceError> {
    let body = codec::encode(request)?;
    let unavailable = |detail: String| ServiceError::Unavailable { service, detail };
    let answer = router.call(body, timeout).await.map_err(|err| match err {
        RemoteError::Call(call) => ServiceError::from(call),
        RemoteError::Wire(wire) => unavailable(format!("node {}: {wire}", router.node())),
    })?;
    let result: WireResult<T> =
        codec::decode(&answer).map_err(|e| unavailable(format!("bad answer from {}: {e}", router.node())))?;
    result.map_err(ServiceError::from)
}

fn answer<T: Serialize>(result: Result<T, ServiceError>) -> Result<Vec<u8>, String> {
    codec::encode(&result.map_err(WireServiceError::from)).map_err(|e| e.to_string())
}

pub(crate) struct InventoryWire(pub InventoryService);

impl WireHandler for InventoryWire {
    fn handle(self: Arc<Self>, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            match codec::decode::<InventoryRequest>(&body).map_err(|e| e.to_string())? {
                InventoryRequest::Execute { sku, command } => {
                    let result: Result<Result<StockView, StockRejection>, _> =
                        self.0.execute_local(&sku, command).await;
                    answer(result)
                }
                InventoryRequest::Get { sku } => answer(self.0.get_local(&sku).await),
            }
        })
    }
}

pub(crate) struct OrderWire(pub OrderService);

impl WireHandler for OrderWire {
    fn handle(self: Arc<Self>, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            let orders = &self.0;
            match codec::decode::<OrderRequest>(&body).map_err(|e| e.to_string())? {
                OrderRequest::Place { id, new, idempotency_key } => {
                    answer(orders.place_local(id, new, idempotency_key).await.map(|o| (o.order, o.created)))
                }
                OrderRequest::Get { id, requester } => answer(orders.get_local(id, &requester)),
                OrderRequest::Cancel { id, requester } => {
                    answer(orders.cancel_local(id, &requester).await.map(|o| (o.order, o.already_cancelled)))
                }
                OrderRequest::List { query } => {
                    answer(orders.list_local_blocking(query).await.map(|p| (p.orders, p.next)))
                }
                OrderRequest::PaymentSettled { order, event_id, outcome } => {
                    answer(orders.payment_settled_local(order, event_id, outcome).await)
                }
                OrderRequest::GetWhenTerminal { id, requester, wait_ms } => {
                    let wait = Duration::from_millis(wait_ms).min(MAX_REMOTE_WAIT);
                    answer(orders.get_when_terminal_local(id, &requester, wait).await)
                }
                OrderRequest::WaitAnyTerminal { ids, requester, wait_ms } => {
                    let wait = Duration::from_millis(wait_ms).min(MAX_REMOTE_WAIT);
                    answer(orders.wait_any_terminal_local(ids, &requester, wait).await)
                }
            }
        })
    }
}

pub(crate) struct PaymentWire(pub PaymentService);

impl WireHandler for PaymentWire {
    fn handle(self: Arc<Self>, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            match codec::decode::<PaymentRequest>(&body).map_err(|e| e.to_string())? {
                PaymentRequest::Deliver(event) => answer(self.0.deliver_local(event).await),
            }
        })
    }
}

/// Merges per-node pages of orders (each sorted by id, with the position the node's scan
/// reached, `None` when it reached its end) into one page of at most `limit`. Past the lowest
/// position some node stopped at, that node's orders are unknown, so the page ends there.
pub(crate) fn merge_pages(pages: Vec<(Vec<Order>, Option<OrderId>)>, limit: usize) -> (Vec<Order>, Option<OrderId>) {
    let reached = pages.iter().filter_map(|(_, next)| *next).min();
    let mut all: Vec<Order> =
        pages.into_iter().flat_map(|(orders, _)| orders).filter(|o| reached.is_none_or(|r| o.id <= r)).collect();
    all.sort_by_key(|o| o.id);
    all.dedup_by_key(|o| o.id);
    if all.len() > limit {
        all.truncate(limit);
        let next = all.last().map(|o| o.id);
        return (all, next);
    }
    (all, reached)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn order(n: u128) -> Order {
        use crate::domain::{CustomerId, Money, OrderEvent, OrderLine, PaymentToken, Quantity, Sku};
        let line = OrderLine {
            sku: Sku::parse("s").unwrap(),
            quantity: Quantity::new(1).unwrap(),
            unit_price: Money::from_cents(1),
        };
        let placed = OrderEvent::Placed {
            id: OrderId::from_u128(n),
            customer: CustomerId::parse("c").unwrap(),
            lines: vec![line],
            total: Money::from_cents(1),
            payment_token: PaymentToken::parse("tok_visa").unwrap(),
            deadline_at: 1,
            at: 0,
        };
        Order::apply(None, &placed).unwrap()
    }

    fn ids(orders: &[Order]) -> Vec<OrderId> {
        orders.iter().map(|o| o.id).collect()
    }

    fn id(n: u128) -> OrderId {
        OrderId::from_u128(n)
    }

    #[test]
    fn merged_pages_end_where_the_shortest_scan_stopped() {
        // Node a scanned up to 5 (a filtered page cut short), node b to its end.
        let pages = vec![(vec![order(1), order(4)], Some(id(5))), (vec![order(2), order(6), order(7)], None)];
        let (orders, next) = merge_pages(pages, 10);
        assert_eq!((ids(&orders), next), (vec![id(1), id(2), id(4)], Some(id(5))));
        // Everything fits and every node reached its end: no next page.
        let (orders, next) = merge_pages(vec![(vec![order(3)], None), (vec![order(1)], None)], 10);
        assert_eq!((ids(&orders), next), (vec![id(1), id(3)], None));
        // More than a page: cut at `limit`, next is the last one returned.
        let pages = vec![(vec![order(1), order(3)], Some(id(3))), (vec![order(2), order(4)], Some(id(4)))];
        let (orders, next) = merge_pages(pages, 2);
        assert_eq!((ids(&orders), next), (vec![id(1), id(2)], Some(id(2))));
    }

    #[test]
    fn service_errors_survive_the_wire() {
        for err in [
            ServiceError::NotFound,
            ServiceError::Invalid("x".into()),
            ServiceError::IdempotencyMismatch,
            ServiceError::Unavailable { service: "inventory", detail: "down".into() },
            ServiceError::Storage("disk".into()),
        ] {
            let bytes = codec::encode(&WireServiceError::from(err.clone())).unwrap_or_default();
            let back: WireServiceError = codec::decode(&bytes).unwrap_or(WireServiceError::NotFound);
            assert_eq!(ServiceError::from(back), err);
        }
    }

    #[test]
    fn garbage_requests_are_errors() {
        assert!(codec::decode::<OrderRequest>(b"garbage").is_err());
        assert!(codec::decode::<InventoryRequest>(&[0xa5, 1, 200, 3]).is_err());
    }
}

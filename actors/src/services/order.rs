//! The order service: one entity per order, each running its own saga.
//!
//! The saga, driven by [`Order::next_step`] so a restart resumes exactly where the log says:
//!
//! ```text
//! Placed ──reserve every line (request/response to inventory)──▶ Reserved + outbox PaymentRequested
//!   │ any line refused                                              │ PaymentSettled (from payment's outbox)
//!   ▼                                                               ▼
//! CancelRequested ──release every line──▶ Cancelled      Captured: commit every line ──▶ Paid, Confirmed
//!   ▲                                                    Declined/Failed ──▶ CancelRequested ...
//!   └── customer cancel, or the saga deadline (a persisted timestamp, re-armed on activation)
//! ```
//!
//! A cancel after the payment was requested also puts `PaymentCancelRequested` in the outbox,
//! so the payment service voids or refunds. `Cancelled` is written only after every line is
//! released, so an order shown as cancelled holds no stock.

use super::events::{IntegrationEvent, PaymentOutcome, event_id};
use super::inventory::InventoryService;
use super::remote::{OrderRequest, Placement, call, locate, merge_pages};
use super::{Settings, now_ms};
use crate::domain::{
    CancelReason, CustomerId, Order, OrderCommand, OrderEvent, OrderId, OrderLine, OrderRejection, OrderStatus,
    PaymentToken, Quantity, SagaStep, Sku, StockRejection,
};
use crate::error::ServiceError;
use foldhash::{HashMap, HashSet};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, join_all};
use futures_util::stream::FuturesUnordered;
use metrics::{Counter, Histogram};
use ordermesh_runtime::cluster::{RemoteRouter, Target};
use ordermesh_runtime::{Entity, EntityContext, RouterHandle};
use ordermesh_storage::{Append, IdempotencyRecord, StorageError, Store, WriteBatch, codec};
use ractor::{ActorProcessingErr, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub enum OrderMsg {
    /// Creates the order (durably) and starts its saga.
    Place { request: PlaceRequest, reply: RpcReplyPort<Result<Order, PlaceError>> },
    /// Customer or admin cancel: replies once the cancellation is durable (and, when inventory
    /// answers, complete).
    Cancel { reply: RpcReplyPort<Result<Order, ServiceError>> },
    /// The payment service's verdict (from its outbox; a repeat finds the order no longer
    /// awaiting payment; `event_id` names the delivery in logs).
    PaymentSettled { event_id: String, outcome: PaymentOutcome, reply: RpcReplyPort<Result<(), ServiceError>> },
    /// Take the saga's next step (sent by the order itself, and by recovery at start).
    Continue,
    /// The saga deadline timer fired.
    Deadline,
}

/// A new order, priced and validated by the service handle.
pub struct PlaceRequest {
    pub customer: CustomerId,
    pub lines: Vec<OrderLine>,
    pub payment_token: PaymentToken,
    pub idempotency: Option<IdempotencyClaim>,
}

pub struct IdempotencyClaim {
    pub key: String,
    /// What a retry must match: the canonical encoding of the client's request.
    pub request: Vec<u8>,
}

/// What the order id and request of an idempotency key were.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdempotencyValue {
    order: OrderId,
    request: Vec<u8>,
}

pub enum PlaceError {
    Service(ServiceError),
    /// Another request already claimed the idempotency key.
    KeyTaken {
        order: OrderId,
        request: Vec<u8>,
    },
}

#[derive(Clone)]
pub struct OrderDeps {
    pub store: Store,
    pub inventory: InventoryService,
    pub settings: Arc<Settings>,
    pub live: LiveOrders,
    pub metrics: Arc<OrderMetrics>,
}

/// The order service's metrics, registered once when the service starts: a macro call looks its
/// metric up in the recorder's registry (labels copied, hashed, a lock taken) every time.
pub struct OrderMetrics {
    placed: Counter,
    /// `orders_refused_total`, new orders refused at admission, by reason: `limit` (the node's
    /// limit, after the wait), `held` (the node's limit, at once during an overflow hold),
    /// `share` (past the customer's share).
    refused: Refused,
    reserve_seconds: Histogram,
    confirm_seconds: Histogram,
    release_seconds: Histogram,
    /// `orders_completed_total` by outcome: `confirmed`, then each cancel reason.
    completed: Vec<(&'static str, Counter)>,
}

struct Refused {
    limit: Counter,
    held: Counter,
    share: Counter,
}

impl OrderMetrics {
    pub fn register() -> OrderMetrics {
        let step = |step: &'static str| metrics::histogram!("saga_step_seconds", "step" => step);
        let outcomes = std::iter::once("confirmed").chain(CancelReason::ALL.map(CancelReason::as_str));
        OrderMetrics {
            placed: metrics::counter!("orders_placed_total"),
            refused: Refused {
                limit: metrics::counter!("orders_refused_total", "reason" => "limit"),
                held: metrics::counter!("orders_refused_total", "reason" => "held"),
                share: metrics::counter!("orders_refused_total", "reason" => "share"),
            },
            reserve_seconds: step("reserve"),
            confirm_seconds: step("confirm"),
            release_seconds: step("release"),
            completed: outcomes.map(|o| (o, metrics::counter!("orders_completed_total", "outcome" => o))).collect(),
        }
    }

    fn completed(&self, outcome: &str) {
        if let Some((_, counter)) = self.completed.iter().find(|(known, _)| *known == outcome) {
            counter.increment(1);
        }
    }
}

/// The state of every order whose entity is in memory, as of its last durable change, and of
/// the orders that left memory finished most recently. Clients poll an order until it is
/// confirmed: answering from here costs no store read (a sled range scan cost as much CPU as a
/// tenth of the whole saga) and no message to a busy entity. It is also where a client waiting
/// for an order's outcome (a long poll) is woken: the order's end (`confirmed` or
/// `cancelled`), and its passivation, wake the waiters of that order.
#[derive(Clone, Default)]
pub struct LiveOrders(Arc<LiveShared>);

#[derive(Default)]
struct LiveShared {
    state: std::sync::Mutex<LiveState>,
    /// Told once per order that stops counting in flight, to let one placement waiting for
    /// admission look again.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct LiveState {
    orders: HashMap<OrderId, Order>,
    /// Up to [`RECENTLY_ENDED`] orders that left memory with their saga done (their ids in
    /// `ended_ids`, oldest first, to forget them in turn). A client waiting for an order reads
    /// it right after its end, when its entity has just passivated: from here rather than from
    /// the store (that read was about 1.7% of `dev`'s CPU under load). Only this node's entity
    /// changes the order, and each time it leaves memory it replaces its copy here, or removes
    /// it when the saga is not done (a customer's cancel of a confirmed order that failed half
    /// way): `orders` hides this copy meanwhile.
    ended: HashMap<OrderId, Order>,
    ended_ids: VecDeque<OrderId>,
    /// Per order, the waiting requests to tell when it ends or passivates (each request's
    /// channel, registered once per order it waits for). Keyed by ids clients send (before
    /// anyone checks they exist), so with std's hasher, seeded against HashDoS.
    waiters: std::collections::HashMap<OrderId, Vec<mpsc::UnboundedSender<OrderId>>>,
    /// How many of `orders` and of `admitting` each customer has (for the admission share).
    per_customer: std::collections::HashMap<CustomerId, usize>,
    /// The orders of placements admitted whose entity has not put them in `orders` yet (and
    /// may never: a placement can fail). Each is counted once: here, then in `orders`.
    admitting: HashSet<OrderId>,
    /// When a placement last waited its whole admission wait in vain while orders left (others
    /// got in before it): the node is overloaded, and placements beyond the limit are refused at
    /// once for [`OVERFLOW_HOLD`] after it.
    overflowed_at: Option<Instant>,
    /// How many orders have stopped counting in flight, to tell an overload (orders leave, but
    /// too few for the waiters) from a stall (none leave).
    departures: u64,
}

/// A customer may have at most this fraction (1 / N) of the limit of orders in flight.
const CUSTOMER_SHARE_OF_IN_FLIGHT: usize = 10;

/// How long after a placement waited in vain for admission, while other orders left, the next
/// ones beyond the limit are refused at once instead of waiting. Under an open-loop overload
/// waiting placements only added their wait to the latency and held connections open (at
/// 12,000 orders/s offered on 2 cores, 100 ms of waiting gave 2,800-5,900 placed/s, median
/// 3,900, against 4,700-8,900, median 6,100, when refused at once; session 16), while in a
/// closed loop of clients the waiters get in.
const OVERFLOW_HOLD: Duration = Duration::from_secs(1);

/// The limit of orders in flight a placement was checked against.
#[derive(Debug, Clone, Copy)]
struct Limit {
    orders: usize,
    /// The machine's cores (or the CPU quota) were all busy, so the limit was the lower one.
    busy: bool,
}

/// Why [`LiveOrders::admit`] refused a placement: the counts it saw last.
#[derive(Debug)]
struct Refusal {
    in_flight: usize,
    customers: usize,
    limit: Limit,
    share: usize,
    /// Refused without waiting, since a placement waited in vain less than [`OVERFLOW_HOLD`] ago.
    held: bool,
}

/// How many recently ended orders [`LiveOrders`] keeps (about 400 bytes each for a one-line
/// order: under 2 MiB).
const RECENTLY_ENDED: usize = 4096;

impl LiveState {
    /// Keeps `left`, an order that just left memory, among the recently ended ones if its saga
    /// is done; otherwise forgets any copy from before this activation, stale now. (A forgotten
    /// copy's id stays in `ended_ids` until its turn; that only shortens the list for a while.)
    fn keep_if_ended(&mut self, left: Order) {
        let id = left.id;
        if left.next_step() != SagaStep::Done {
            self.ended.remove(&id);
            return;
        }
        if self.ended.insert(id, left).is_none() {
            self.ended_ids.push_back(id);
        }
        if self.ended_ids.len() > RECENTLY_ENDED
            && let Some(oldest) = self.ended_ids.pop_front()
        {
            self.ended.remove(&oldest);
        }
    }

    fn count_out(&mut self, customer: &CustomerId) {
        if let Some(count) = self.per_customer.get_mut(customer) {
            *count -= 1;
            if *count == 0 {
                self.per_customer.remove(customer);
            }
        }
    }

    fn wake(&mut self, id: OrderId) {
        for waiter in self.waiters.remove(&id).into_iter().flatten() {
            let _ = waiter.send(id);
        }
    }
}

impl LiveOrders {
    fn state(&self) -> std::sync::MutexGuard<'_, LiveState> {
        self.0.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `look` at the live order `id`, if it is live or ended recently.
    fn with<T>(&self, id: OrderId, look: impl FnOnce(&Order) -> T) -> Option<T> {
        let state = self.state();
        state.orders.get(&id).or_else(|| state.ended.get(&id)).map(look)
    }

    fn set(&self, order: &Order) {
        let mut state = self.state();
        // An admitted order moves from `admitting` to `orders`, already counted for its customer.
        if state.orders.insert(order.id, order.clone()).is_none() && !state.admitting.remove(&order.id) {
            *state.per_customer.entry(order.customer.clone()).or_default() += 1;
        }
        // Waiters wait for an order's end: the steps before it would only wake them to look
        // and register again (three times per order).
        if order.status.is_terminal() {
            state.wake(order.id);
        }
    }

    /// Admits the placement of order `id` for `customer` if the orders in flight (entities in
    /// memory, sagas running or just ended, plus the placements admitted before whose order is
    /// not in memory yet) are fewer than the limit, and the customer's fewer than a tenth of
    /// it. The check and the count are one step, so concurrent placements cannot pass it
    /// together. At the limit it waits up to `wait` for an order to leave, looking again each
    /// time one does (with `limit()` then: it can change meanwhile), unless a placement waited
    /// in vain while orders left less than [`OVERFLOW_HOLD`] ago; beyond the customer's share
    /// it is refused at once.
    async fn admit(
        &self,
        id: OrderId,
        customer: &CustomerId,
        limit: impl Fn() -> Limit,
        wait: Duration,
    ) -> Result<Admission, Refusal> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut waited_in_vain = false;
        let mut departures_before = None;
        loop {
            // Registered before the check, so an order that leaves between the two is not missed.
            let freed = self.0.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let limit = limit();
            let share = (limit.orders / CUSTOMER_SHARE_OF_IN_FLIGHT).max(1);
            {
                let mut state = self.state();
                let in_flight = state.orders.len() + state.admitting.len();
                let customers = state.per_customer.get(customer).copied().unwrap_or(0);
                if in_flight < limit.orders && customers < share && state.admitting.insert(id) {
                    *state.per_customer.entry(customer.clone()).or_default() += 1;
                    if in_flight + 1 < limit.orders {
                        // Room for more (the limit rose, or a wake came meant for a slot this
                        // placement did not need): the next waiter looks too.
                        self.0.freed.notify_one();
                    }
                    return Ok(Admission { live: self.clone(), id, customer: customer.clone() });
                }
                let held = state.overflowed_at.is_some_and(|at| at.elapsed() < OVERFLOW_HOLD);
                let refusal = Refusal { in_flight, customers, limit, share, held };
                if in_flight < limit.orders {
                    // Past its share, or an id admitted twice: no order leaving changes that. A
                    // slot is free, though, and the wake this placement took may have been for
                    // it: the next waiter looks.
                    self.0.freed.notify_one();
                    return Err(refusal);
                }
                if customers >= share || held {
                    return Err(refusal);
                }
                if waited_in_vain {
                    // Orders left, and others got in first: an overload. None left: a stall
                    // (a slow fsync holds every saga up), which a hold would only make worse
                    // for clients that retry at once.
                    if departures_before != Some(state.departures) {
                        state.overflowed_at = Some(Instant::now());
                    }
                    return Err(refusal);
                }
                departures_before.get_or_insert(state.departures);
            }
            // On time out, one more look before refusing: an order may have left meanwhile.
            waited_in_vain = tokio::time::timeout_at(deadline, freed).await.is_err();
        }
    }

    /// Counts an order that stopped counting in flight, and lets one waiting placement look again.
    fn depart(&self, state: &mut LiveState) {
        state.departures += 1;
        self.0.freed.notify_one();
    }

    /// Forgets `order` unless a newer activation of the same order has replaced it meanwhile.
    fn forget(&self, order: &Order) {
        let mut state = self.state();
        if state.orders.get(&order.id).is_some_and(|live| live.version == order.version) {
            if let Some(left) = state.orders.remove(&order.id) {
                state.count_out(&left.customer);
                state.keep_if_ended(left);
                self.depart(&mut state);
            }
            state.wake(order.id);
        }
    }

    /// Registers a waiting request for the moment each of `ids` ends (becomes `confirmed` or
    /// `cancelled`) or its entity passivates. Register before reading the orders, so a change
    /// between the read and the wait is not missed.
    fn watch(&self, ids: &[OrderId]) -> Watch {
        let (tx, changes) = mpsc::unbounded_channel();
        let watch = Watch { live: self.clone(), ids: ids.to_vec(), tx, changes };
        let mut state = self.state();
        for id in ids {
            state.waiters.entry(*id).or_default().push(watch.tx.clone());
        }
        watch
    }

    /// Orders with waiters registered.
    fn waited_on(&self) -> usize {
        self.state().waiters.len()
    }
}

/// A placement counted in flight by [`LiveOrders::admit`] until its order is in memory (then
/// counted there) or the placement is answered (dropped) without it.
struct Admission {
    live: LiveOrders,
    id: OrderId,
    customer: CustomerId,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.live.state();
        if state.admitting.remove(&self.id) {
            state.count_out(&self.customer);
            self.live.depart(&mut state);
        }
    }
}

/// Longest wait [`OrderService::wait_any_terminal`] asks of another node at once.
const REMOTE_WAIT_SLICE: Duration = Duration::from_secs(1);

/// What [`OrderService::wait_any_terminal`] found: the orders that are `confirmed` or
/// `cancelled`, and the ids that do not exist (or are not the requester's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Waited {
    pub terminal: Vec<Order>,
    pub not_found: Vec<OrderId>,
}

impl Waited {
    fn is_empty(&self) -> bool {
        self.terminal.is_empty() && self.not_found.is_empty()
    }
}

/// A waiting request's registrations with [`LiveOrders`]: one channel for all its orders, so
/// waiting for 64 orders costs 64 map entries, not 64 channels and futures (registrations were
/// about 2.5% of `dev`'s CPU: a batched wait names up to 64 orders, and each order is named by
/// a dozen waits before it ends). Dropping it leaves nothing behind in the map.
struct Watch {
    live: LiveOrders,
    ids: Vec<OrderId>,
    tx: mpsc::UnboundedSender<OrderId>,
    changes: mpsc::UnboundedReceiver<OrderId>,
}

impl Watch {
    /// The next of its orders that ended (or passivated); its registration is used up.
    async fn next(&mut self) -> OrderId {
        // `self.tx` keeps the channel open, so this only ever waits or answers.
        self.changes.recv().await.unwrap_or_else(|| unreachable!("the watch holds a sender"))
    }

    /// Watches `id` again (after [`Watch::next`] named it), before it is read again.
    fn again(&self, id: OrderId) {
        self.live.state().waiters.entry(id).or_default().push(self.tx.clone());
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut state = self.live.state();
        for id in &self.ids {
            if let Some(waiters) = state.waiters.get_mut(id) {
                waiters.retain(|waiter| !waiter.same_channel(&self.tx));
                if waiters.is_empty() {
                    state.waiters.remove(id);
                }
            }
        }
    }
}

pub struct OrderEntity {
    id: OrderId,
    order: Option<Order>,
    live: LiveOrders,
    deadline_timer: Option<JoinHandle<()>>,
    /// A retry of the current saga step is scheduled (inventory was unreachable).
    retry: Option<JoinHandle<()>>,
    retry_attempt: u32,
}

impl Drop for OrderEntity {
    fn drop(&mut self) {
        for timer in [self.deadline_timer.take(), self.retry.take()].into_iter().flatten() {
            timer.abort();
        }
        if let Some(order) = &self.order {
            self.live.forget(order);
        }
    }
}

impl Entity for OrderEntity {
    type Msg = OrderMsg;
    type Deps = OrderDeps;

    async fn activate(key: &str, deps: &OrderDeps) -> Result<Self, ActorProcessingErr> {
        let id = OrderId::parse(key)?;
        let order = load_order(&deps.store, id)?;
        if let Some(order) = &order {
            deps.live.set(order);
        }
        Ok(Self { id, order, live: deps.live.clone(), deadline_timer: None, retry: None, retry_attempt: 0 })
    }

    fn on_activated(&mut self, ctx: &EntityContext<Self>) {
        if self.order.as_ref().is_some_and(|o| o.next_step() != SagaStep::Done) {
            ctx.send_self(OrderMsg::Continue);
        }
    }

    fn can_passivate(&self) -> bool {
        // An order whose saga is in flight stays in memory: its deadline timer lives here.
        self.order.as_ref().is_none_or(|o| o.next_step() == SagaStep::Done)
    }

    fn finished(&self) -> bool {
        self.can_passivate()
    }

    async fn handle(&mut self, msg: OrderMsg, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        match msg {
            OrderMsg::Place { request, reply } => {
                let result = self.place(ctx, request).await;
                let placed = result.is_ok();
                let _ = reply.send(result);
                if placed {
                    // Right away, not as a `Continue` through the mailbox: a message less per order.
                    self.advance(ctx).await?;
                }
            }
            OrderMsg::Cancel { reply } => {
                let result = self.cancel(ctx).await;
                let _ = reply.send(result);
            }
            OrderMsg::PaymentSettled { event_id, outcome, reply } => {
                let result = self.payment_settled(ctx, event_id, outcome).await;
                let _ = reply.send(result);
            }
            OrderMsg::Continue => {
                self.retry = None;
                self.advance(ctx).await?;
            }
            OrderMsg::Deadline => {
                self.deadline_timer = None;
                self.deadline_passed(ctx).await?;
            }
        }
        Ok(())
    }
}

impl OrderEntity {
    async fn place(&mut self, ctx: &EntityContext<Self>, request: PlaceRequest) -> Result<Order, PlaceError> {
        let deps = ctx.deps();
        let now = now_ms();
        let command = OrderCommand::Place {
            id: self.id,
            customer: request.customer,
            lines: request.lines,
            payment_token: request.payment_token,
            deadline_at: now + deps.settings.saga_deadline().as_millis() as u64,
            now,
        };
        let events = Order::decide(self.order.as_ref(), &command)
            .map_err(|rejection| PlaceError::Service(rejection_error(rejection)))?;
        let mut batch = WriteBatch::default();
        if let (Some(claim), Some(OrderCommand::Place { customer, .. })) = (&request.idempotency, Some(&command)) {
            let value = IdempotencyValue { order: self.id, request: claim.request.clone() };
            batch.idempotency.push(IdempotencyRecord {
                key: idempotency_key(customer, &claim.key),
                value: codec::encode(&value).map_err(|e| PlaceError::Service(e.into()))?,
                created_at_ms: now,
            });
        }
        match self.persist(deps, events, batch, vec![]).await {
            Ok(()) => {}
            Err(PersistError::Storage(StorageError::IdempotencyKeyTaken { existing, .. })) => {
                let existing: IdempotencyValue =
                    codec::decode(&existing.value).map_err(|e| PlaceError::Service(e.into()))?;
                return Err(PlaceError::KeyTaken { order: existing.order, request: existing.request });
            }
            Err(err) => return Err(PlaceError::Service(err.into())),
        }
        deps.metrics.placed.increment(1);
        self.order.clone().ok_or(PlaceError::Service(ServiceError::Storage("order vanished".into())))
    }

    async fn cancel(&mut self, ctx: &EntityContext<Self>) -> Result<Order, ServiceError> {
        let order = self.order.as_ref().ok_or(ServiceError::NotFound)?;
        if order.status == OrderStatus::Cancelled {
            return Ok(order.clone());
        }
        self.request_cancel(ctx, CancelReason::CustomerRequest).await.map_err(ServiceError::from)?;
        // Finish the compensation now if inventory answers; otherwise it is retried and the
        // reply shows the order as it is (the cancellation itself is already durable).
        self.advance(ctx).await.map_err(|e| ServiceError::Storage(e.to_string()))?;
        self.order.clone().ok_or(ServiceError::NotFound)
    }

    async fn payment_settled(
        &mut self,
        ctx: &EntityContext<Self>,
        event_id: String,
        outcome: PaymentOutcome,
    ) -> Result<(), ServiceError> {
        let deps = ctx.deps();
        let Some(order) = &self.order else { return Err(ServiceError::NotFound) };
        // Redeliveries need no inbox: the first settlement to arrive ends the wait for payment
        // (durably, in the same commit as its outcome), and a settlement that finds the order
        // no longer waiting changes nothing.
        let awaiting = matches!(order.next_step(), SagaStep::AwaitPayment { .. });
        match outcome {
            PaymentOutcome::Captured if awaiting => {
                let started = Instant::now();
                match self.for_each_line(deps, Stock::Commit).await? {
                    Ok(()) => {
                        let now = now_ms();
                        let mut events = self.decide(&OrderCommand::MarkPaid { now })?;
                        let paid = events.iter().fold(self.order.clone(), Order::apply);
                        events.extend(
                            Order::decide(paid.as_ref(), &OrderCommand::MarkConfirmed { now })
                                .map_err(rejection_error)?,
                        );
                        self.persist(deps, events, WriteBatch::default(), vec![]).await?;
                        deps.metrics.confirm_seconds.record(started.elapsed());
                        self.record_outcome(deps);
                    }
                    Err(rejection) => {
                        // The stock is gone (released by a race we lost): undo the payment.
                        tracing::error!(order = %self.id, %event_id, %rejection, "captured order lost its reservation");
                        self.request_cancel(ctx, CancelReason::Timeout).await?;
                        self.advance(ctx).await.map_err(|e| ServiceError::Storage(e.to_string()))?;
                    }
                }
            }
            PaymentOutcome::Declined | PaymentOutcome::Failed if awaiting => {
                let reason = match outcome {
                    PaymentOutcome::Declined => CancelReason::PaymentDeclined,
                    _ => CancelReason::PaymentFailed,
                };
                self.request_cancel(ctx, reason).await?;
                self.advance(ctx).await.map_err(|e| ServiceError::Storage(e.to_string()))?;
            }
            // Already cancelled or confirmed: the payment service was told (or needs nothing).
            _ => {}
        }
        Ok(())
    }

    /// Takes saga steps until the saga waits (for payment, or a retry) or is done.
    async fn advance(&mut self, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        let deps = ctx.deps();
        loop {
            let Some(order) = &self.order else { return Ok(()) };
            let step = order.next_step();
            let started = Instant::now();
            let outcome = match step {
                SagaStep::Done => return Ok(()),
                SagaStep::AwaitPayment { deadline_at } => {
                    self.arm_deadline(ctx, deadline_at);
                    return Ok(());
                }
                SagaStep::ReserveStock => {
                    if now_ms() >= order.deadline_at {
                        self.request_cancel(ctx, CancelReason::Timeout).await?;
                        continue;
                    }
                    self.for_each_line(deps, Stock::Reserve).await
                }
                SagaStep::CommitStock => self.for_each_line(deps, Stock::Commit).await,
                SagaStep::ReleaseStock => self.for_each_line(deps, Stock::Release).await,
            };
            let now = now_ms();
            match (step, outcome) {
                (_, Err(unavailable)) => {
                    // Inventory unreachable: try again later (compensation never gives up).
                    let delay = deps.settings.retry_backoff.delay(self.retry_attempt);
                    tracing::debug!(order = %self.id, error = %unavailable, ?delay, "saga step will be retried");
                    self.retry_attempt = self.retry_attempt.saturating_add(1);
                    self.retry = Some(ctx.send_self_after(delay, OrderMsg::Continue));
                    if let Some(order) = &self.order {
                        self.arm_deadline(ctx, order.deadline_at);
                    }
                    return Ok(());
                }
                (SagaStep::ReserveStock, Ok(Ok(()))) => {
                    let events = self.decide(&OrderCommand::MarkReserved { now })?;
                    let outbox = vec![self.payment_requested_event(&deps.settings)?];
                    self.persist(deps, events, WriteBatch::default(), outbox).await?;
                    deps.metrics.reserve_seconds.record(started.elapsed());
                }
                (SagaStep::ReserveStock, Ok(Err(rejection))) => {
                    let reason = match rejection {
                        StockRejection::UnknownSku => CancelReason::UnknownSku,
                        _ => CancelReason::OutOfStock,
                    };
                    self.request_cancel(ctx, reason).await?;
                }
                (SagaStep::CommitStock, Ok(Ok(()))) => {
                    let events = self.decide(&OrderCommand::MarkConfirmed { now })?;
                    self.persist(deps, events, WriteBatch::default(), vec![]).await?;
                    self.record_outcome(deps);
                }
                (SagaStep::CommitStock, Ok(Err(rejection))) => {
                    tracing::error!(order = %self.id, %rejection, "paid order lost its reservation");
                    self.request_cancel(ctx, CancelReason::Timeout).await?;
                }
                (SagaStep::ReleaseStock, Ok(_)) => {
                    let events = self.decide(&OrderCommand::MarkCancelled { now })?;
                    self.persist(deps, events, WriteBatch::default(), vec![]).await?;
                    deps.metrics.release_seconds.record(started.elapsed());
                    self.record_outcome(deps);
                }
                (SagaStep::AwaitPayment { .. } | SagaStep::Done, Ok(_)) => return Ok(()),
            }
            self.retry_attempt = 0;
        }
    }

    async fn deadline_passed(&mut self, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        let Some(order) = &self.order else { return Ok(()) };
        let waiting = matches!(order.next_step(), SagaStep::AwaitPayment { .. } | SagaStep::ReserveStock);
        if !waiting {
            return Ok(());
        }
        if now_ms() < order.deadline_at {
            self.arm_deadline(ctx, order.deadline_at);
            return Ok(());
        }
        tracing::info!(order = %self.id, "saga deadline passed, cancelling");
        self.request_cancel(ctx, CancelReason::Timeout).await?;
        self.advance(ctx).await
    }

    fn arm_deadline(&mut self, ctx: &EntityContext<Self>, deadline_at: u64) {
        if self.deadline_timer.is_none() {
            let delay = Duration::from_millis(deadline_at.saturating_sub(now_ms()));
            self.deadline_timer = Some(ctx.send_self_after(delay, OrderMsg::Deadline));
        }
    }

    /// Makes a cancellation decision durable (with the payment's void/refund request when a
    /// charge may exist).
    async fn request_cancel(&mut self, ctx: &EntityContext<Self>, reason: CancelReason) -> Result<(), PersistError> {
        let Some(order) = &self.order else { return Ok(()) };
        let events = self.decide(&OrderCommand::RequestCancel { reason, now: now_ms() })?;
        let mut outbox = vec![];
        let payment_may_charge = !matches!(reason, CancelReason::PaymentDeclined | CancelReason::PaymentFailed);
        if !events.is_empty() && order.payment_requested() && payment_may_charge {
            let seq = order.version + 1;
            outbox.push(IntegrationEvent::PaymentCancelRequested {
                event_id: event_id(self.id, "order", seq),
                order: self.id,
            });
        }
        self.persist(ctx.deps(), events, WriteBatch::default(), outbox).await
    }

    /// Asks the payment service to charge, within the payment deadline from now.
    fn payment_requested_event(&self, settings: &Settings) -> Result<IntegrationEvent, PersistError> {
        let order = self.order.as_ref().ok_or(PersistError::Rejected(OrderRejection::NotFound))?;
        Ok(IntegrationEvent::PaymentRequested {
            event_id: event_id(self.id, "order", order.version + 1),
            order: self.id,
            amount: order.total,
            token: order.payment_token.clone(),
            deadline_at: now_ms() + settings.payment_deadline.as_millis() as u64,
        })
    }

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, PersistError> {
        Order::decide(self.order.as_ref(), command).map_err(PersistError::Rejected)
    }

    fn record_outcome(&self, deps: &OrderDeps) {
        if let Some(order) = &self.order {
            let outcome = match (order.status, order.cancel_reason) {
                (OrderStatus::Confirmed, _) => "confirmed",
                (_, Some(reason)) => reason.as_str(),
                _ => return,
            };
            deps.metrics.completed(outcome);
        }
    }

    /// Runs one stock command for every line concurrently. `Err`: inventory did not answer;
    /// `Ok(Err)`: a line was refused (for reserve: unknown sku wins over out of stock).
    async fn for_each_line(&self, deps: &OrderDeps, op: Stock) -> Result<Result<(), StockRejection>, ServiceError> {
        let Some(order) = &self.order else { return Ok(Ok(())) };
        let id = self.id;
        let calls = order.lines.iter().map(|line| {
            let inventory = &deps.inventory;
            async move {
                match op {
                    Stock::Reserve => inventory.reserve(&line.sku, id, line.quantity).await,
                    Stock::Commit => inventory.commit(&line.sku, id).await,
                    Stock::Release => inventory.release(&line.sku, id).await,
                }
            }
        });
        let results = join_all(calls).await;
        let mut refused = None;
        for result in results {
            match result? {
                Ok(_) => {}
                Err(StockRejection::UnknownSku) => refused = Some(StockRejection::UnknownSku),
                Err(other) => {
                    refused.get_or_insert(other);
                }
            }
        }
        Ok(refused.map_or(Ok(()), Err))
    }

    /// Appends `events` (plus `extra` and `outbox`) durably, keeps the indexes in step, then
    /// applies the events to the in-memory state.
    async fn persist(
        &mut self,
        deps: &OrderDeps,
        events: Vec<OrderEvent>,
        mut batch: WriteBatch,
        outbox: Vec<IntegrationEvent>,
    ) -> Result<(), PersistError> {
        if events.is_empty() && batch.is_empty() && outbox.is_empty() {
            return Ok(());
        }
        let before = self.order.as_ref();
        let after = events.iter().fold(before.cloned(), Order::apply);
        let expected_version = before.map_or(0, |o| o.version);
        if !events.is_empty() {
            let encoded = events.iter().map(codec::encode).collect::<Result<Vec<_>, _>>()?;
            batch.appends.push(Append { entity: self.id.to_string(), expected_version, events: encoded });
        }
        for event in &outbox {
            batch.outbox.push(codec::encode(event)?);
        }
        if let Some(after) = &after {
            index_changes(before, after, &mut batch);
        }
        deps.store.commit(batch).await?;
        if let Some(order) = &after {
            deps.live.set(order);
        }
        self.order = after;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Stock {
    Reserve,
    Commit,
    Release,
}

/// Why a state change was not persisted.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Rejected(OrderRejection),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Codec(#[from] ordermesh_storage::codec::CodecError),
}

impl From<PersistError> for ServiceError {
    fn from(err: PersistError) -> Self {
        match err {
            PersistError::Rejected(rejection) => rejection_error(rejection),
            PersistError::Storage(e) => e.into(),
            PersistError::Codec(e) => e.into(),
        }
    }
}

fn rejection_error(rejection: OrderRejection) -> ServiceError {
    match rejection {
        OrderRejection::NotFound => ServiceError::NotFound,
        other => ServiceError::Invalid(other.to_string()),
    }
}

// ------------------------------------------------------------------------------------------
// Indexes (in the order store's index keyspace), kept in the same commit as the events:
//   c/<customer>\0<order id>          every order of a customer
//   r/<order id>                      orders whose saga is not done (recovery at start)
// Every order (admin listing) needs no index: the event log's entity names are the order ids,
// in order (`Store::entities_after`). Status is not indexed either: a listing reads every
// order it returns anyway, so it filters on the order itself. Indexing status cost four more
// keys per status change (a third of all the order store's writes per order); the price is
// that a filtered page may look past orders that do not match (`LIST_SCAN_BUDGET` bounds it).

/// Index entries a filtered listing page looks at before it returns what it found.
const LIST_SCAN_BUDGET: usize = 5_000;

const SEP: u8 = 0;

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(SEP);
        }
        k.extend_from_slice(p);
    }
    k
}

fn index_changes(before: Option<&Order>, after: &Order, batch: &mut WriteBatch) {
    let id = after.id.to_string();
    if before.is_none() {
        let customer = after.customer.as_str().as_bytes();
        batch.index_put.push((key(&[b"c", customer, id.as_bytes()]), vec![]));
    }
    let running = |o: &Order| o.next_step() != SagaStep::Done;
    match (before.is_some_and(running), running(after)) {
        (false, true) => batch.index_put.push((key(&[b"r", id.as_bytes()]), vec![])),
        (true, false) => batch.index_delete.push(key(&[b"r", id.as_bytes()])),
        _ => {}
    }
}

fn idempotency_key(customer: &CustomerId, key: &str) -> String {
    format!("{customer}\u{1f}{key}")
}

/// The first of at most `tries` fresh order ids that `is_wanted`, else one more fresh id (any
/// id is correct; `is_wanted` only decides where it lives).
fn generate_id_where(tries: u32, is_wanted: impl Fn(&str) -> bool) -> OrderId {
    (0..tries).map(|_| OrderId::generate()).find(|id| is_wanted(&id.to_string())).unwrap_or_else(OrderId::generate)
}

/// The ownership key of an idempotency key (the same string the store keys it by).
fn idempotency_key_of(customer: &CustomerId, key: &str) -> String {
    idempotency_key(customer, key)
}

fn load_order(store: &Store, id: OrderId) -> Result<Option<Order>, ServiceError> {
    let events = store.read_events(&id.to_string(), 0)?;
    let mut order = None;
    for stored in events {
        order = Order::apply(order, &codec::decode::<OrderEvent>(&stored.bytes)?);
    }
    Ok(order)
}

// ------------------------------------------------------------------------------------------
// The typed handle

/// Who is asking: customers see and cancel only their own orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Requester {
    Customer(CustomerId),
    Admin,
}

impl Requester {
    fn may_see(&self, order: &Order) -> bool {
        match self {
            Requester::Admin => true,
            Requester::Customer(c) => *c == order.customer,
        }
    }
}

/// A new order as a client asks for it (validated types; prices come from inventory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    pub customer: CustomerId,
    pub items: Vec<(Sku, Quantity)>,
    pub payment_token: PaymentToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOutcome {
    pub order: Order,
    /// False when an idempotent retry returned the order placed earlier.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelOutcome {
    pub order: Order,
    /// True when the order was already cancelled (a no-op).
    pub already_cancelled: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    /// Only this customer's orders (always set for a customer requester).
    pub customer: Option<CustomerId>,
    pub status: Option<OrderStatus>,
    pub limit: usize,
    /// Continue after this order id (from the previous page).
    pub after: Option<OrderId>,
}

#[derive(Debug, Clone)]
pub struct OrderPage {
    pub orders: Vec<Order>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<OrderId>,
}

/// Typed handle to the order service. In a cluster, each request goes to the node owning the
/// order; listing asks every order node and merges.
#[derive(Clone)]
pub struct OrderService {
    /// This node's router and store (`None` on a node that does not host orders).
    local: Option<(RouterHandle<OrderMsg>, Store)>,
    live: LiveOrders,
    inventory: InventoryService,
    settings: Arc<Settings>,
    placement: Placement,
    metrics: Arc<OrderMetrics>,
}

impl OrderService {
    pub(crate) fn new(
        local: Option<(RouterHandle<OrderMsg>, Store)>,
        live: LiveOrders,
        inventory: InventoryService,
        settings: Arc<Settings>,
        placement: Placement,
        metrics: Arc<OrderMetrics>,
    ) -> Self {
        Self { local, live, inventory, settings, placement, metrics }
    }

    fn local(&self) -> Result<&(RouterHandle<OrderMsg>, Store), ServiceError> {
        self.local
            .as_ref()
            .ok_or(ServiceError::Unavailable { service: "order", detail: "this node does not host orders".into() })
    }

    fn store(&self) -> Result<&Store, ServiceError> {
        Ok(&self.local()?.1)
    }

    /// A remote place waits for admission, then runs pricing and the durable write on the
    /// owner: allow for all three.
    fn remote_timeout(&self) -> Duration {
        self.settings.admission_wait + self.settings.call_timeout * 2
    }

    /// Places an order: prices its lines from inventory, makes it durable, starts its saga.
    /// With an idempotency key, a retry of the same request returns the first order.
    pub async fn place(&self, new: NewOrder, idempotency_key: Option<String>) -> Result<PlaceOutcome, ServiceError> {
        if new.items.is_empty() || new.items.len() > Order::MAX_LINES {
            return Err(ServiceError::Invalid(format!("an order needs 1 to {} items", Order::MAX_LINES)));
        }
        let id = match (&self.placement, &idempotency_key) {
            // The order goes to the node whose store holds the idempotency key, so a retry
            // through any gateway finds it: pick an id in the key's shard.
            (Some(cluster), Some(key)) => {
                let shard = cluster.shard_of(&idempotency_key_of(&new.customer, key));
                generate_id_where(100_000, |id| cluster.shard_of(id) == shard)
            }
            // Any id will do: pick one this node owns, so the order's saga and the status reads
            // of a client that stays with this gateway need no cross-node call (cross-node
            // messages were about a quarter of a loopback cluster's CPU). Behind a load
            // balancer the orders still spread over the order nodes. 64 tries: with three
            // members, a random id is another node's 2 times in 3.
            (Some(cluster), None) if self.local.is_some() => match cluster.owned_here("order") {
                Some(owned_here) => generate_id_where(64, owned_here),
                None => OrderId::generate(), // ownership undecidable: placing fails fast below
            },
            _ => OrderId::generate(),
        };
        match locate(&self.placement, "order", &id.to_string())? {
            None => self.place_local(id, new, idempotency_key).await,
            Some(remote) => {
                let request = OrderRequest::Place { id, new, idempotency_key };
                let (order, created) = call(&remote, "order", &request, self.remote_timeout()).await?;
                Ok(PlaceOutcome { order, created })
            }
        }
    }

    /// [`Self::place`] on this node, with the order id chosen by the caller.
    pub(crate) async fn place_local(
        &self,
        id: OrderId,
        new: NewOrder,
        idempotency_key: Option<String>,
    ) -> Result<PlaceOutcome, ServiceError> {
        if new.items.is_empty() || new.items.len() > Order::MAX_LINES {
            return Err(ServiceError::Invalid(format!("an order needs 1 to {} items", Order::MAX_LINES)));
        }
        let (router, _) = self.local()?;
        let claim = match idempotency_key {
            Some(key) => {
                let request = codec::encode(&new)?;
                if let Some(replay) = self.replay_idempotent(&new.customer, &key, &request).await? {
                    return Ok(replay);
                }
                Some(IdempotencyClaim { key, request })
            }
            None => None,
        };
        let _admission = self.admit(id, &new.customer).await?;
        let lines = self.price(&new.items).await?;
        let request = PlaceRequest {
            customer: new.customer.clone(),
            lines,
            payment_token: new.payment_token.clone(),
            idempotency: claim,
        };
        let timeout = self.settings.call_timeout;
        let result = router.call(&id.to_string(), |reply| OrderMsg::Place { request, reply }, timeout).await?;
        match result {
            Ok(order) => Ok(PlaceOutcome { order, created: true }),
            Err(PlaceError::Service(err)) => Err(err),
            Err(PlaceError::KeyTaken { order, request }) => {
                if request != codec::encode(&new)? {
                    return Err(ServiceError::IdempotencyMismatch);
                }
                let order = self.read(order)?.ok_or(ServiceError::NotFound)?;
                Ok(PlaceOutcome { order, created: false })
            }
        }
    }

    /// Admission: an order admitted beyond what the sagas can finish would only wait in them,
    /// and under an open-loop overload their backlog grew without end (55,000 orders in memory
    /// after 15 s at 9,500 orders/s offered, confirmations 10 s late, fewer confirmed per
    /// second than at capacity). So a placement beyond the limit waits up to
    /// `admission_wait` for an order to leave, then is refused (`Unavailable`: 503 +
    /// Retry-After) and the client retries later. Refused at once instead, a closed loop of
    /// clients sent its refused placements again at once: at 256 of them, 18,000 refusals a
    /// second took the CPU the sagas needed (3,500 placed/s, against 11,000 with 64), and a
    /// stall of some 40 ms in a closed loop of 64 at 11,000/s refused orders too (session 16).
    /// A customer gets a share of the limit, so a few whose payments hang (each order held up
    /// to the payment deadline) cannot lock everyone else out.
    /// While the machine's cores are all busy the limit is lower: a saga backlog then only
    /// waits for CPU, and longer sagas cost more (their writes span more of the stores' moves
    /// into sled), so under an open-loop overload of 8,000 orders/s the node's goodput fell to
    /// 3,900-5,300/s with 2,000 in flight against 6,000/s with 500 (BENCHMARKS.md). An idle
    /// machine keeps the whole limit for orders that wait on a slow payment.
    async fn admit(&self, id: OrderId, customer: &CustomerId) -> Result<Admission, ServiceError> {
        let limit = || {
            let busy = ordermesh_storage::cores_saturated();
            let full = self.settings.max_orders_in_flight;
            let orders = if busy { self.settings.max_orders_in_flight_when_busy.min(full) } else { full };
            Limit { orders, busy }
        };
        self.live.admit(id, customer, limit, self.settings.admission_wait).await.map_err(|refusal| {
            let Refusal { in_flight, customers, limit, share, held } = refusal;
            let refused = &self.metrics.refused;
            let (reason, whose) = if customers >= share {
                (&refused.share, format!("this customer's share of {share}"))
            } else {
                (if held { &refused.held } else { &refused.limit }, format!("this node's limit of {}", limit.orders))
            };
            reason.increment(1);
            let when = if limit.busy { " while its cores are busy" } else { "" };
            let how = if held {
                "; new orders do not wait for room, since orders left too slowly for one that waited"
            } else {
                ""
            };
            ServiceError::Unavailable {
                service: "order",
                detail: format!(
                    "{in_flight} orders are in flight on this node ({customers} of this customer's), {whose}{when}{how}; retry shortly"
                ),
            }
        })
    }

    async fn replay_idempotent(
        &self,
        customer: &CustomerId,
        key: &str,
        request: &[u8],
    ) -> Result<Option<PlaceOutcome>, ServiceError> {
        let Some(record) = self.store()?.idempotency_get(&idempotency_key(customer, key))? else { return Ok(None) };
        let value: IdempotencyValue = codec::decode(&record.value)?;
        if value.request != request {
            return Err(ServiceError::IdempotencyMismatch);
        }
        let order = self.read(value.order)?.ok_or(ServiceError::NotFound)?;
        Ok(Some(PlaceOutcome { order, created: false }))
    }

    /// Merges repeated skus and prices every line from inventory (an unknown sku is priced 0;
    /// its order is then cancelled with `unknown_sku`, as the contract says).
    async fn price(&self, items: &[(Sku, Quantity)]) -> Result<Vec<OrderLine>, ServiceError> {
        let mut merged: BTreeMap<&Sku, u32> = BTreeMap::new();
        for (sku, quantity) in items {
            *merged.entry(sku).or_default() += quantity.get();
        }
        let mut lines = Vec::with_capacity(merged.len());
        let quotes = join_all(merged.keys().map(|sku| self.inventory.get(sku))).await;
        for ((sku, units), quote) in merged.into_iter().zip(quotes) {
            let quantity = Quantity::new(units)
                .map_err(|_| ServiceError::Invalid(format!("quantity of {sku} over {} in total", Quantity::MAX)))?;
            let unit_price = quote?.map_or(crate::domain::Money::ZERO, |view| view.price);
            lines.push(OrderLine { sku: sku.clone(), quantity, unit_price });
        }
        Ok(lines)
    }

    /// Reads an order as `requester` may see it (`None` also when it is someone else's).
    pub async fn get(&self, id: OrderId, requester: &Requester) -> Result<Option<Order>, ServiceError> {
        match locate(&self.placement, "order", &id.to_string())? {
            None => self.get_local(id, requester),
            Some(remote) => {
                let request = OrderRequest::Get { id, requester: requester.clone() };
                call(&remote, "order", &request, self.settings.call_timeout).await
            }
        }
    }

    pub(crate) fn get_local(&self, id: OrderId, requester: &Requester) -> Result<Option<Order>, ServiceError> {
        Ok(self.read(id)?.filter(|o| requester.may_see(o)))
    }

    /// Reads an order like [`Self::get`], but if it is not yet confirmed or cancelled, waits up
    /// to `wait` for it to be (a long poll: one request instead of a client's polling loop).
    /// Returns the order as it is when it ends or when `wait` runs out.
    pub async fn get_when_terminal(
        &self,
        id: OrderId,
        requester: &Requester,
        wait: Duration,
    ) -> Result<Option<Order>, ServiceError> {
        match locate(&self.placement, "order", &id.to_string())? {
            None => self.get_when_terminal_local(id, requester, wait).await,
            Some(remote) => {
                let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                let request = OrderRequest::GetWhenTerminal { id, requester: requester.clone(), wait_ms };
                call(&remote, "order", &request, wait + self.settings.call_timeout).await
            }
        }
    }

    /// Waits up to `wait` until at least one of `ids` is `confirmed` or `cancelled` (or does not
    /// exist for `requester`), then returns those that are so: one request for a client
    /// following many orders, where [`Self::get_when_terminal`] takes one per order (about
    /// 55 µs of server CPU each, BENCHMARKS.md). In a cluster each owner waits for its own ids
    /// (in slices of [`REMOTE_WAIT_SLICE`]) and the first owner's answer with news ends the wait
    /// (with what the owners that answered so far found: the client asks again for the rest);
    /// an owner that is down fails the whole wait (503) unless another has news.
    pub async fn wait_any_terminal(
        &self,
        ids: &[OrderId],
        requester: &Requester,
        wait: Duration,
    ) -> Result<Waited, ServiceError> {
        let mut local = Vec::new();
        let mut remote: BTreeMap<String, (RemoteRouter, Vec<OrderId>)> = BTreeMap::new();
        for id in ids {
            match locate(&self.placement, "order", &id.to_string())? {
                None => local.push(*id),
                Some(router) => {
                    remote.entry(router.node().to_owned()).or_insert_with(|| (router, Vec::new())).1.push(*id)
                }
            }
        }
        if remote.is_empty() {
            return self.wait_any_terminal_local(local, requester, wait).await;
        }
        // Owners are asked in slices of at most a second: the first answer with news ends the
        // wait, and the others' waits (which cannot be called off) end soon after.
        let until = tokio::time::Instant::now() + wait;
        loop {
            let slice = until.saturating_duration_since(tokio::time::Instant::now()).min(REMOTE_WAIT_SLICE);
            let mut waits: FuturesUnordered<BoxFuture<'_, Result<Waited, ServiceError>>> = FuturesUnordered::new();
            if !local.is_empty() {
                waits.push(Box::pin(self.wait_any_terminal_local(local.clone(), requester, slice)));
            }
            let wait_ms = u64::try_from(slice.as_millis()).unwrap_or(u64::MAX);
            for (router, ids) in remote.values() {
                let request = OrderRequest::WaitAnyTerminal { ids: ids.clone(), requester: requester.clone(), wait_ms };
                let timeout = slice + self.settings.call_timeout;
                waits.push(Box::pin(async move { call(router, "order", &request, timeout).await }));
            }
            // An owner that fails fails the wait only if no other has news.
            let mut found = Waited::default();
            let mut failed = None;
            while let Some(waited) = waits.next().await {
                match waited {
                    Ok(waited) => {
                        found.terminal.extend(waited.terminal);
                        found.not_found.extend(waited.not_found);
                        if !found.is_empty() {
                            return Ok(found);
                        }
                    }
                    Err(err) => failed = Some(err),
                }
            }
            if let Some(err) = failed {
                return Err(err);
            }
            if tokio::time::Instant::now() >= until {
                return Ok(found);
            }
        }
    }

    pub(crate) async fn wait_any_terminal_local(
        &self,
        mut ids: Vec<OrderId>,
        requester: &Requester,
        wait: Duration,
    ) -> Result<Waited, ServiceError> {
        ids.sort_unstable();
        ids.dedup(); // one registration per order, however often it is named
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        // Registered before the first read, so no change between the two is missed.
        let mut watch = self.live.watch(&ids);
        let mut found = self.terminal_among(&ids, requester)?;
        // A change of one order re-checks that order only: the others' registrations stay.
        while found.is_empty() {
            tokio::select! {
                id = watch.next() => {
                    watch.again(id);
                    if !self.terminal_among(std::slice::from_ref(&id), requester)?.is_empty() {
                        found = self.terminal_among(&ids, requester)?;
                    }
                }
                // The wait is over: a last look, for a change that raced the deadline.
                () = &mut deadline => return self.terminal_among(&ids, requester),
            }
        }
        Ok(found)
    }

    /// Those of `ids` that are terminal, or that `requester` cannot see.
    fn terminal_among(&self, ids: &[OrderId], requester: &Requester) -> Result<Waited, ServiceError> {
        let mut found = Waited::default();
        for id in ids {
            // Only ended orders are copied: most of the orders a wait names are still running.
            let visible =
                self.read_with(*id, |o| requester.may_see(o).then(|| o.status.is_terminal().then(|| o.clone())))?;
            match visible.flatten() {
                None => found.not_found.push(*id),
                Some(Some(order)) => found.terminal.push(order),
                Some(None) => {}
            }
        }
        Ok(found)
    }

    /// Orders that long polls are waiting on right now (a finished wait leaves nothing behind).
    pub fn orders_waited_on(&self) -> usize {
        self.live.waited_on()
    }

    pub(crate) async fn get_when_terminal_local(
        &self,
        id: OrderId,
        requester: &Requester,
        wait: Duration,
    ) -> Result<Option<Order>, ServiceError> {
        let until = tokio::time::Instant::now() + wait;
        let mut watch = self.live.watch(&[id]);
        loop {
            let order = self.get_local(id, requester)?;
            if order.as_ref().is_none_or(|o| o.status.is_terminal()) {
                return Ok(order);
            }
            // An order whose entity is not in memory (after a restart, before recovery reached
            // it) wakes this when it ends after its activation (or is found ended by it); the
            // timeout bounds the wait in every case.
            if tokio::time::timeout_at(until, watch.next()).await.is_err() {
                return self.get_local(id, requester);
            }
            watch.again(id);
        }
    }

    /// The order as of its last durable change: from its live entity if it has one (or from its
    /// copy if it ended recently), else from the store (no actor is activated).
    fn read(&self, id: OrderId) -> Result<Option<Order>, ServiceError> {
        self.read_with(id, Order::clone)
    }

    /// `look` at the order as [`Self::read`] finds it, without copying a live one.
    fn read_with<T>(&self, id: OrderId, look: impl Fn(&Order) -> T) -> Result<Option<T>, ServiceError> {
        let store = self.store()?;
        match self.live.with(id, &look) {
            Some(seen) => Ok(Some(seen)),
            None => Ok(load_order(store, id)?.as_ref().map(look)),
        }
    }

    pub async fn cancel(&self, id: OrderId, requester: &Requester) -> Result<CancelOutcome, ServiceError> {
        match locate(&self.placement, "order", &id.to_string())? {
            None => self.cancel_local(id, requester).await,
            Some(remote) => {
                let request = OrderRequest::Cancel { id, requester: requester.clone() };
                let (order, already_cancelled) = call(&remote, "order", &request, self.remote_timeout()).await?;
                Ok(CancelOutcome { order, already_cancelled })
            }
        }
    }

    pub(crate) async fn cancel_local(&self, id: OrderId, requester: &Requester) -> Result<CancelOutcome, ServiceError> {
        let order = self.get_local(id, requester)?.ok_or(ServiceError::NotFound)?;
        if order.status == OrderStatus::Cancelled {
            return Ok(CancelOutcome { order, already_cancelled: true });
        }
        let timeout = self.settings.call_timeout;
        let (router, _) = self.local()?;
        let order = router.call(&id.to_string(), |reply| OrderMsg::Cancel { reply }, timeout).await??;
        Ok(CancelOutcome { order, already_cancelled: false })
    }

    /// Lists orders in id (creation) order; in a cluster, merges a page from every order node.
    /// The store reads run on a blocking thread, never on an async worker.
    pub async fn list(&self, query: &ListQuery) -> Result<OrderPage, ServiceError> {
        let limit = query.limit.clamp(1, 500);
        let query = ListQuery { limit, ..query.clone() };
        let Some(cluster) = &self.placement else { return self.list_local_blocking(query).await };
        let mut pages = Vec::new();
        for member in cluster.members_of("order")? {
            pages.push(match cluster.target("order", &member)? {
                Target::Local => {
                    let page = self.list_local_blocking(query.clone()).await?;
                    (page.orders, page.next)
                }
                Target::Remote(remote) => {
                    let request = OrderRequest::List { query: query.clone() };
                    call::<_, (Vec<Order>, Option<OrderId>)>(&remote, "order", &request, self.settings.call_timeout)
                        .await?
                }
            });
        }
        let (orders, next) = merge_pages(pages, limit);
        Ok(OrderPage { orders, next })
    }

    /// [`Self::list_local`] on a blocking thread (it reads up to 500 orders from the store).
    pub(crate) async fn list_local_blocking(&self, query: ListQuery) -> Result<OrderPage, ServiceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.list_local(&query))
            .await
            .map_err(|e| ServiceError::Storage(format!("order listing task failed: {e}")))?
    }

    /// Lists this node's orders in id (creation) order: a customer's from the `c/` index,
    /// everyone's from the event log's entity names (every order has events; no index needed).
    /// With a status filter, a page stops after `LIST_SCAN_BUDGET` orders looked at even if it
    /// holds fewer than `limit`; its `next` then says where to go on.
    pub(crate) fn list_local(&self, query: &ListQuery) -> Result<OrderPage, ServiceError> {
        let limit = query.limit.clamp(1, 500);
        let store = self.store()?;
        let bad = |e: String| ServiceError::Storage(format!("order listing: {e}"));
        let ids_after = |after: Option<OrderId>, n: usize| -> Result<Vec<OrderId>, ServiceError> {
            let names = match &query.customer {
                Some(c) => {
                    let prefix = key(&[b"c", c.as_str().as_bytes(), b""]);
                    let start = after.map(|id| [prefix.as_slice(), id.to_string().as_bytes()].concat());
                    let entries = store.index_scan(&prefix, start.as_deref(), n)?;
                    entries
                        .into_iter()
                        .map(|(k, _)| String::from_utf8(k[prefix.len()..].to_vec()).map_err(|e| bad(e.to_string())))
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => store.entities_after(after.map(|id| id.to_string()).as_deref(), n)?,
            };
            names.iter().map(|name| OrderId::parse(name).map_err(|e| bad(e.to_string()))).collect()
        };
        let mut after = query.after;
        let mut orders = Vec::with_capacity(limit);
        let mut scanned = 0;
        loop {
            let chunk = limit + 1;
            let ids = ids_after(after, chunk)?;
            let exhausted = ids.len() < chunk;
            for id in ids {
                let matches = |o: &Order| query.status.is_none_or(|s| o.status == s);
                if let Some(order) = self.read(id)?.filter(matches) {
                    if orders.len() == limit {
                        // One more than fits: the page is full and there is a next one.
                        return Ok(OrderPage { next: orders.last().map(|o: &Order| o.id), orders });
                    }
                    orders.push(order);
                }
                scanned += 1;
                after = Some(id);
                if scanned >= LIST_SCAN_BUDGET {
                    return Ok(OrderPage { orders, next: Some(id) });
                }
            }
            if exhausted {
                return Ok(OrderPage { orders, next: None });
            }
        }
    }

    /// Delivers the payment service's verdict (used by the payment outbox relay) to the node
    /// owning the order.
    pub(crate) async fn payment_settled(
        &self,
        order: OrderId,
        event_id: String,
        outcome: PaymentOutcome,
    ) -> Result<(), ServiceError> {
        match locate(&self.placement, "order", &order.to_string())? {
            None => self.payment_settled_local(order, event_id, outcome).await,
            Some(remote) => {
                let request = OrderRequest::PaymentSettled { order, event_id, outcome };
                call(&remote, "order", &request, self.settings.call_timeout).await
            }
        }
    }

    pub(crate) async fn payment_settled_local(
        &self,
        order: OrderId,
        event_id: String,
        outcome: PaymentOutcome,
    ) -> Result<(), ServiceError> {
        let timeout = self.settings.call_timeout;
        let (router, _) = self.local()?;
        router.call(&order.to_string(), |reply| OrderMsg::PaymentSettled { event_id, outcome, reply }, timeout).await?
    }

    /// Ids of this node's orders whose saga is not finished (resumed at start).
    pub(crate) fn running(&self) -> Result<Vec<OrderId>, ServiceError> {
        let Some((_, store)) = &self.local else { return Ok(vec![]) };
        let prefix = key(&[b"r", b""]);
        let mut ids = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store.index_scan(&prefix, after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            ids.extend(
                page.iter().filter_map(|(k, _)| OrderId::parse(std::str::from_utf8(&k[prefix.len()..]).ok()?).ok()),
            );
        }
        Ok(ids)
    }

    pub(crate) fn resume(&self, id: OrderId) {
        if let Some((router, _)) = &self.local {
            let _ = router.send(&id.to_string(), OrderMsg::Continue);
        }
    }

    pub(crate) fn stop(&self) {
        if let Some((router, _)) = &self.local {
            router.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::Money;

    fn order(status: OrderStatus, version: u64) -> Order {
        Order {
            id: OrderId::from_u128(7),
            customer: CustomerId::parse("alice").unwrap(),
            lines: vec![],
            total: Money::from_cents(100),
            payment_token: PaymentToken::parse("tok_visa").unwrap(),
            status,
            cancel_reason: None,
            cancel_requested: None,
            created_at: 1,
            updated_at: 1,
            deadline_at: 2,
            version,
        }
    }

    fn status_seen(live: &LiveOrders) -> Option<(OrderStatus, u64)> {
        live.with(OrderId::from_u128(7), |o| (o.status, o.version))
    }

    #[test]
    fn an_ended_order_is_read_after_it_left_memory_as_its_entity_last_saw_it() {
        let live = LiveOrders::default();
        live.set(&order(OrderStatus::Confirmed, 4));
        live.forget(&order(OrderStatus::Confirmed, 4));
        assert_eq!(status_seen(&live), Some((OrderStatus::Confirmed, 4)));
        // The customer cancels it: active again, and its entity fails before the stock is back.
        live.set(&order(OrderStatus::Confirmed, 4));
        let cancelling =
            Order { cancel_requested: Some(CancelReason::CustomerRequest), ..order(OrderStatus::Confirmed, 5) };
        live.set(&cancelling);
        assert_eq!(status_seen(&live), Some((OrderStatus::Confirmed, 5)), "the live state hides the copy");
        live.forget(&cancelling);
        assert_eq!(status_seen(&live), None, "half cancelled: read from the store, not the stale copy");
        // Cancelled in the end: the newest state is kept.
        let cancelled = Order { status: OrderStatus::Cancelled, ..cancelling };
        live.set(&cancelled);
        live.forget(&cancelled);
        assert_eq!(status_seen(&live), Some((OrderStatus::Cancelled, 5)));
        assert_eq!(live.state().ended.len(), 1);
    }

    #[tokio::test]
    async fn a_watch_hears_each_end_once_per_registration_and_leaves_nothing_behind() {
        let live = LiveOrders::default();
        let (a, b) =
            (order(OrderStatus::Reserved, 2), Order { id: OrderId::from_u128(8), ..order(OrderStatus::Reserved, 2) });
        live.set(&a);
        live.set(&b);
        let mut watch = live.watch(&[a.id, b.id]);
        let other = live.watch(&[b.id]);
        assert_eq!(live.waited_on(), 2);
        live.set(&Order { status: OrderStatus::Confirmed, ..b.clone() });
        assert_eq!(watch.next().await, b.id);
        assert_eq!(live.waited_on(), 1, "b's registrations are used up, a's stays");
        watch.again(b.id);
        drop(other);
        live.forget(&a); // passivated before its end: a wake too
        assert_eq!(watch.next().await, a.id);
        drop(watch);
        assert_eq!(live.waited_on(), 0);
        assert!(live.state().waiters.is_empty());
    }

    fn limit(orders: usize) -> impl Fn() -> Limit {
        move || Limit { orders, busy: false }
    }

    #[tokio::test]
    async fn an_admitted_order_counts_once_whether_it_is_being_placed_or_in_memory() {
        let live = LiveOrders::default();
        let (alice, bob) = (CustomerId::parse("alice").unwrap(), CustomerId::parse("bob").unwrap());
        let placed = order(OrderStatus::Reserved, 1);
        let admission = live.admit(placed.id, &alice, limit(20), Duration::ZERO).await.unwrap();
        live.set(&placed); // the entity has it in memory before its placement is answered
        let second = live.admit(OrderId::from_u128(8), &alice, limit(20), Duration::ZERO).await.unwrap();
        let refused = live.admit(OrderId::from_u128(9), &alice, limit(20), Duration::ZERO).await.err();
        assert_eq!(refused.map(|r| (r.in_flight, r.customers, r.share)), Some((2, 2, 2)), "at alice's share");
        let refused = live.admit(OrderId::from_u128(9), &bob, limit(2), Duration::ZERO).await.err();
        assert_eq!(refused.map(|r| (r.in_flight, r.customers)), Some((2, 0)), "at the node's limit");
        drop(admission);
        drop(second); // a placement that failed: nothing of it stays
        let refused = live.admit(OrderId::from_u128(9), &bob, limit(1), Duration::ZERO).await.err();
        assert_eq!(refused.map(|r| (r.in_flight, r.customers)), Some((1, 0)));
        live.forget(&placed);
        let state = live.state();
        assert!(state.admitting.is_empty() && state.per_customer.is_empty() && state.orders.is_empty());
    }

    #[tokio::test]
    async fn a_placement_at_the_limit_waits_for_an_order_to_leave_and_no_longer_than_its_wait() {
        let bob = CustomerId::parse("bob").unwrap();
        let running = order(OrderStatus::Reserved, 1); // alice's
        let live = LiveOrders::default();
        live.set(&running);
        let waiting = tokio::spawn({
            let (live, bob) = (live.clone(), bob.clone());
            async move { live.admit(OrderId::from_u128(9), &bob, limit(1), Duration::from_secs(60)).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "admitted while the limit was full");
        live.forget(&running);
        let admitted = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(matches!(admitted, Ok(Ok(true))), "not admitted when the order left: {admitted:?}");

        // A stall: nothing leaves. Each placement waits its whole wait, and no hold follows.
        let live = LiveOrders::default();
        live.set(&running);
        let wait = Duration::from_millis(50);
        for id in [8, 9] {
            let started = Instant::now();
            let refused =
                tokio::time::timeout(Duration::from_secs(10), live.admit(OrderId::from_u128(id), &bob, limit(1), wait))
                    .await
                    .expect("waited far longer than its wait")
                    .err();
            assert!(started.elapsed() >= wait, "refused after {:?}", started.elapsed());
            assert_eq!(refused.map(|r| (r.in_flight, r.customers, r.held)), Some((1, 0, false)));
        }

        // An overload: an order leaves, another placement gets in first, and this one waits in
        // vain. The next ones are refused at once.
        let first = tokio::spawn({
            let (live, carol) = (live.clone(), CustomerId::parse("carol").unwrap());
            async move { live.admit(OrderId::from_u128(10), &carol, limit(1), Duration::from_secs(60)).await.ok() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = tokio::spawn({
            let (live, bob) = (live.clone(), bob.clone());
            async move { live.admit(OrderId::from_u128(11), &bob, limit(1), wait).await.err() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        live.forget(&running);
        let _first = tokio::time::timeout(Duration::from_secs(10), first).await.unwrap().unwrap().expect("admitted");
        let second = tokio::time::timeout(Duration::from_secs(10), second).await.unwrap().unwrap();
        assert_eq!(second.map(|r| r.held), Some(false), "refused after its wait");
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            live.admit(OrderId::from_u128(12), &CustomerId::parse("dave").unwrap(), limit(1), Duration::from_secs(60)),
        )
        .await
        .expect("waited while held");
        assert!(refused.err().is_some_and(|r| r.held));

        // Past its share, a customer is refused at once: orders leaving would not change that.
        let live = LiveOrders::default();
        live.set(&running);
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            live.admit(OrderId::from_u128(10), &running.customer, limit(1), Duration::from_secs(60)),
        )
        .await
        .expect("waited past its share");
        assert_eq!(refused.err().map(|r| (r.customers, r.share)), Some((1, 1)));
    }

    #[tokio::test]
    async fn a_wake_that_a_placement_cannot_use_goes_to_the_next_waiter() {
        // A limit of 20 (a share of 2), full: carol has 1 order in flight, 19 others one each.
        let live = LiveOrders::default();
        let carol = CustomerId::parse("carol").unwrap();
        let others: Vec<Order> = (0..19)
            .map(|n| Order {
                id: OrderId::from_u128(100 + n),
                customer: CustomerId::parse(format!("c{n}")).unwrap(),
                ..order(OrderStatus::Reserved, 1)
            })
            .collect();
        live.set(&Order { id: OrderId::from_u128(99), customer: carol.clone(), ..order(OrderStatus::Reserved, 1) });
        others.iter().for_each(|o| live.set(o));
        let wait = |id: u128, customer: &CustomerId| {
            let (live, customer) = (live.clone(), customer.clone());
            // The admission is handed back, so that it keeps counting.
            tokio::spawn(async move {
                live.admit(OrderId::from_u128(id), &customer, limit(20), Duration::from_secs(60)).await.ok()
            })
        };
        // Carol's two placements wait first, then dave's.
        let carol_first = wait(1, &carol);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let carol_second = wait(2, &carol);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let dave = wait(3, &CustomerId::parse("dave").unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;

        live.forget(&others[0]); // carol's first gets in: carol is at her share now
        let first = tokio::time::timeout(Duration::from_secs(10), carol_first).await.unwrap().unwrap();
        assert!(first.is_some());
        live.forget(&others[1]); // wakes carol's second, refused for her share: dave gets the room
        let second = tokio::time::timeout(Duration::from_secs(10), carol_second).await.unwrap().unwrap();
        assert!(second.is_none());
        let dave = tokio::time::timeout(Duration::from_secs(10), dave).await;
        assert!(matches!(dave, Ok(Ok(Some(_)))), "dave slept with room free");
    }

    #[test]
    fn only_the_most_recently_ended_orders_are_kept() {
        let live = LiveOrders::default();
        for n in 0..=RECENTLY_ENDED as u128 {
            let ended = Order { id: OrderId::from_u128(100 + n), ..order(OrderStatus::Cancelled, 3) };
            live.set(&ended);
            live.forget(&ended);
        }
        assert!(live.with(OrderId::from_u128(100), |_| ()).is_none(), "the oldest was forgotten");
        assert!(live.with(OrderId::from_u128(101), |_| ()).is_some());
        assert!(live.with(OrderId::from_u128(100 + RECENTLY_ENDED as u128), |_| ()).is_some());
        assert_eq!(live.state().ended.len(), RECENTLY_ENDED);
    }
}

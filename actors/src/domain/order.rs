//! An order as a pure state machine, and the saga's next step derived from its state.
//!
//! Status moves forward only: `pending -> reserved -> paid -> confirmed`, or to `cancelled`
//! from any non-terminal status (and from `confirmed` by an explicit customer cancel). A
//! cancellation is two events: `CancelRequested` makes the decision durable (so compensation
//! resumes after a crash), `Cancelled` is written once the stock is given back, so that an
//! order shown as `cancelled` holds no stock.

use super::types::{CustomerId, Money, OrderId, PaymentToken, Quantity, Sku, UnixMillis};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Reserved,
    Paid,
    Confirmed,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 5] = [Self::Pending, Self::Reserved, Self::Paid, Self::Confirmed, Self::Cancelled];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Confirmed | Self::Cancelled)
    }

    /// Position in the forward-only order of statuses.
    pub fn rank(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Reserved => "reserved",
            Self::Paid => "paid",
            Self::Confirmed => "confirmed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    OutOfStock,
    UnknownSku,
    PaymentDeclined,
    /// The provider kept failing until the payment deadline.
    PaymentFailed,
    CustomerRequest,
    /// The saga as a whole missed its deadline.
    Timeout,
}

impl CancelReason {
    pub const ALL: [CancelReason; 6] = [
        Self::OutOfStock,
        Self::UnknownSku,
        Self::PaymentDeclined,
        Self::PaymentFailed,
        Self::CustomerRequest,
        Self::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "out_of_stock",
            Self::UnknownSku => "unknown_sku",
            Self::PaymentDeclined => "payment_declined",
            Self::PaymentFailed => "payment_failed",
            Self::CustomerRequest => "customer_request",
            Self::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    /// Quoted by inventory when the order was placed; never taken from the client.
    pub unit_price: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: OrderId,
    pub customer: CustomerId,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub payment_token: PaymentToken,
    pub status: OrderStatus,
    pub cancel_reason: Option<CancelReason>,
    /// Set once a cancellation is decided; compensation runs until `status` is `Cancelled`.
    pub cancel_requested: Option<CancelReason>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// When the saga gives up waiting (persisted, so it fires after a restart too).
    pub deadline_at: UnixMillis,
    /// Number of events applied: the order's version in its log.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderCommand {
    Place {
        id: OrderId,
        customer: CustomerId,
        lines: Vec<OrderLine>,
        payment_token: PaymentToken,
        deadline_at: UnixMillis,
        now: UnixMillis,
    },
    /// Every line is reserved.
    MarkReserved {
        now: UnixMillis,
    },
    /// The payment was captured.
    MarkPaid {
        now: UnixMillis,
    },
    /// Stock is committed: the order is done.
    MarkConfirmed {
        now: UnixMillis,
    },
    RequestCancel {
        reason: CancelReason,
        now: UnixMillis,
    },
    /// Compensation (stock release) is done.
    MarkCancelled {
        now: UnixMillis,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    Placed {
        id: OrderId,
        customer: CustomerId,
        lines: Vec<OrderLine>,
        total: Money,
        payment_token: PaymentToken,
        deadline_at: UnixMillis,
        at: UnixMillis,
    },
    Reserved {
        at: UnixMillis,
    },
    Paid {
        at: UnixMillis,
    },
    Confirmed {
        at: UnixMillis,
    },
    CancelRequested {
        reason: CancelReason,
        at: UnixMillis,
    },
    Cancelled {
        reason: CancelReason,
        at: UnixMillis,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum OrderRejection {
    #[error("the order already exists")]
    AlreadyExists,
    #[error("no such order")]
    NotFound,
    #[error("an order needs 1 to {max} lines")]
    BadLineCount { max: usize },
    #[error("the order total overflows")]
    TotalOverflow,
    #[error("cannot {action} an order that is {status:?}")]
    InvalidTransition { action: &'static str, status: OrderStatus },
}

/// What the saga must do next for an order, derived from its state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaStep {
    /// Reserve every line with inventory, then `MarkReserved` (or cancel on refusal).
    ReserveStock,
    /// Wait for the payment service's verdict until the deadline.
    AwaitPayment {
        deadline_at: UnixMillis,
    },
    /// Commit every line's reservation, then `MarkConfirmed`.
    CommitStock,
    /// Release every line, then `MarkCancelled`.
    ReleaseStock,
    Done,
}

impl Order {
    pub const MAX_LINES: usize = 100;

    /// Decides the events a command causes on `state` (`None`: the order does not exist yet).
    pub fn decide(state: Option<&Order>, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderRejection> {
        let order = match (state, command) {
            (None, OrderCommand::Place { id, customer, lines, payment_token, deadline_at, now }) => {
                if lines.is_empty() || lines.len() > Self::MAX_LINES {
                    return Err(OrderRejection::BadLineCount { max: Self::MAX_LINES });
                }
                let total = lines
                    .iter()
                    .try_fold(Money::ZERO, |sum, l| l.unit_price.times(l.quantity).and_then(|t| sum.checked_add(t)))
                    .ok_or(OrderRejection::TotalOverflow)?;
                return Ok(vec![OrderEvent::Placed {
                    id: *id,
                    customer: customer.clone(),
                    lines: lines.clone(),
                    total,
                    payment_token: payment_token.clone(),
                    deadline_at: *deadline_at,
                    at: *now,
                }]);
            }
            (Some(_), OrderCommand::Place { .. }) => return Err(OrderRejection::AlreadyExists),
            (None, _) => return Err(OrderRejection::NotFound),
            (Some(order), _) => order,
        };
        order.decide_existing(command)
    }

    fn decide_existing(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderRejection> {
        use OrderStatus::*;
        let refuse = |action| Err(OrderRejection::InvalidTransition { action, status: self.status });
        let cancelling = self.cancel_requested.is_some();
        Ok(match *command {
            OrderCommand::Place { .. } => return Err(OrderRejection::AlreadyExists),
            OrderCommand::MarkReserved { now } => match self.status {
                Pending if !cancelling => vec![OrderEvent::Reserved { at: now }],
                Reserved | Paid | Confirmed => vec![],
                _ => return refuse("reserve"),
            },
            OrderCommand::MarkPaid { now } => match self.status {
                Reserved if !cancelling => vec![OrderEvent::Paid { at: now }],
                Paid | Confirmed => vec![],
                _ => return refuse("pay"),
            },
            OrderCommand::MarkConfirmed { now } => match self.status {
                Paid if !cancelling => vec![OrderEvent::Confirmed { at: now }],
                Confirmed => vec![],
                _ => return refuse("confirm"),
            },
            OrderCommand::RequestCancel { reason, now } => match self.status {
                Cancelled => vec![],
                _ if cancelling => vec![],
                // Only the customer (or an admin) takes back a finished order; a late
                // failure signal must not undo a confirmation.
                Confirmed if reason != CancelReason::CustomerRequest => return refuse("cancel"),
                _ => vec![OrderEvent::CancelRequested { reason, at: now }],
            },
            OrderCommand::MarkCancelled { now } => match (self.status, self.cancel_requested) {
                (Cancelled, _) => vec![],
                (_, Some(reason)) => vec![OrderEvent::Cancelled { reason, at: now }],
                (_, None) => return refuse("finish cancelling"),
            },
        })
    }

    /// Applies an event to the state (`None` before `Placed`). Events that make no sense for
    /// the state are ignored rather than panicking: `decide` never produces them.
    pub fn apply(state: Option<Order>, event: &OrderEvent) -> Option<Order> {
        let mut order = match (state, event) {
            (None, OrderEvent::Placed { id, customer, lines, total, payment_token, deadline_at, at }) => {
                return Some(Order {
                    id: *id,
                    customer: customer.clone(),
                    lines: lines.clone(),
                    total: *total,
                    payment_token: payment_token.clone(),
                    status: OrderStatus::Pending,
                    cancel_reason: None,
                    cancel_requested: None,
                    created_at: *at,
                    updated_at: *at,
                    deadline_at: *deadline_at,
                    version: 1,
                });
            }
            (None, _) => return None,
            (Some(order), _) => order,
        };
        let at = match *event {
            OrderEvent::Placed { at, .. } => at,
            OrderEvent::Reserved { at } => {
                order.status = OrderStatus::Reserved;
                at
            }
            OrderEvent::Paid { at } => {
                order.status = OrderStatus::Paid;
                at
            }
            OrderEvent::Confirmed { at } => {
                order.status = OrderStatus::Confirmed;
                at
            }
            OrderEvent::CancelRequested { reason, at } => {
                order.cancel_requested = Some(reason);
                at
            }
            OrderEvent::Cancelled { reason, at } => {
                order.status = OrderStatus::Cancelled;
                order.cancel_reason = Some(reason);
                at
            }
        };
        order.updated_at = at;
        order.version += 1;
        Some(order)
    }

    /// Replays a log from the beginning.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a OrderEvent>) -> Option<Order> {
        events.into_iter().fold(None, Order::apply)
    }

    pub fn next_step(&self) -> SagaStep {
        if self.status == OrderStatus::Cancelled {
            return SagaStep::Done;
        }
        if self.cancel_requested.is_some() {
            return SagaStep::ReleaseStock;
        }
        match self.status {
            OrderStatus::Pending => SagaStep::ReserveStock,
            OrderStatus::Reserved => SagaStep::AwaitPayment { deadline_at: self.deadline_at },
            OrderStatus::Paid => SagaStep::CommitStock,
            OrderStatus::Confirmed | OrderStatus::Cancelled => SagaStep::Done,
        }
    }

    /// Whether the payment service may have been asked to charge (so a cancel must tell it
    /// to void or refund).
    pub fn payment_requested(&self) -> bool {
        matches!(self.status, OrderStatus::Reserved | OrderStatus::Paid | OrderStatus::Confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn placed() -> OrderCommand {
        OrderCommand::Place {
            id: OrderId::from_u128(7),
            customer: CustomerId::parse("alice").expect("valid"),
            lines: vec![OrderLine {
                sku: Sku::parse("widget").expect("valid"),
                quantity: Quantity::new(2).expect("valid"),
                unit_price: Money::from_cents(250),
            }],
            payment_token: PaymentToken::parse("tok_visa").expect("valid"),
            deadline_at: 1_000,
            now: 1,
        }
    }

    fn reason() -> impl Strategy<Value = CancelReason> {
        prop_oneof![
            Just(CancelReason::OutOfStock),
            Just(CancelReason::UnknownSku),
            Just(CancelReason::PaymentDeclined),
            Just(CancelReason::PaymentFailed),
            Just(CancelReason::CustomerRequest),
            Just(CancelReason::Timeout),
        ]
    }

    fn command() -> impl Strategy<Value = OrderCommand> {
        let now = 2u64..10_000;
        prop_oneof![
            now.clone().prop_map(|now| OrderCommand::MarkReserved { now }),
            now.clone().prop_map(|now| OrderCommand::MarkPaid { now }),
            now.clone().prop_map(|now| OrderCommand::MarkConfirmed { now }),
            (reason(), now.clone()).prop_map(|(reason, now)| OrderCommand::RequestCancel { reason, now }),
            now.prop_map(|now| OrderCommand::MarkCancelled { now }),
            Just(placed()),
        ]
    }

    proptest! {
        /// Status only moves forward (confirmed -> cancelled only by customer request), the
        /// version counts the events, and replaying the log gives exactly the state.
        #[test]
        fn forward_only_and_replayable(commands in proptest::collection::vec(command(), 0..40)) {
            let mut state = None;
            let mut log = Vec::new();
            for c in std::iter::once(placed()).chain(commands) {
                let before = state.clone();
                if let Ok(events) = Order::decide(state.as_ref(), &c) {
                    for e in &events {
                        state = Order::apply(state, e);
                    }
                    log.extend(events);
                }
                if let (Some(b), Some(a)) = (&before, &state) {
                    let back_from_confirmed = b.status == OrderStatus::Confirmed
                        && a.status == OrderStatus::Cancelled
                        && a.cancel_reason == Some(CancelReason::CustomerRequest);
                    prop_assert!(a.status.rank() >= b.status.rank() || back_from_confirmed || b.status == a.status,
                        "{:?} -> {:?}", b.status, a.status);
                    prop_assert!(!(b.status == OrderStatus::Cancelled && a != b), "a cancelled order never changes");
                }
                prop_assert_eq!(state.as_ref().map(|o| o.version), Some(log.len() as u64));
            }
            prop_assert_eq!(Order::replay(&log), state);
        }
    }

    #[test]
    fn place_computes_the_total_from_quoted_prices() {
        let events = Order::decide(None, &placed()).expect("placed");
        let order = Order::replay(&events).expect("exists");
        assert_eq!(order.total, Money::from_cents(500));
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.next_step(), SagaStep::ReserveStock);
    }

    #[test]
    fn a_late_failure_does_not_undo_a_confirmation() {
        let mut state = Order::replay(&Order::decide(None, &placed()).expect("placed"));
        for c in [
            OrderCommand::MarkReserved { now: 2 },
            OrderCommand::MarkPaid { now: 3 },
            OrderCommand::MarkConfirmed { now: 4 },
        ] {
            for e in Order::decide(state.as_ref(), &c).expect("ok") {
                state = Order::apply(state, &e);
            }
        }
        let order = state.expect("exists");
        assert!(
            Order::decide(Some(&order), &OrderCommand::RequestCancel { reason: CancelReason::Timeout, now: 5 })
                .is_err()
        );
        let by_customer =
            Order::decide(Some(&order), &OrderCommand::RequestCancel { reason: CancelReason::CustomerRequest, now: 5 })
                .expect("customer may cancel");
        assert_eq!(by_customer.len(), 1);
    }

    #[test]
    fn cancel_is_requested_then_finished() {
        let order = Order::replay(&Order::decide(None, &placed()).expect("placed")).expect("exists");
        let events =
            Order::decide(Some(&order), &OrderCommand::RequestCancel { reason: CancelReason::CustomerRequest, now: 2 })
                .expect("ok");
        let order = events.iter().fold(Some(order), Order::apply).expect("exists");
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.next_step(), SagaStep::ReleaseStock);
        assert!(Order::decide(Some(&order), &OrderCommand::MarkReserved { now: 3 }).is_err());
        let events = Order::decide(Some(&order), &OrderCommand::MarkCancelled { now: 3 }).expect("ok");
        let order = events.iter().fold(Some(order), Order::apply).expect("exists");
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(order.cancel_reason, Some(CancelReason::CustomerRequest));
        assert_eq!(order.next_step(), SagaStep::Done);
    }
}

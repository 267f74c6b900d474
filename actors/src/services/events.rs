//! Integration events: what one service tells another through its outbox.
//!
//! Each is written to the producer's outbox in the same atomic commit as the events that
//! caused it, and delivered at least once by the producer's relay. Consumers need no inbox:
//! each event names one entity (the order, or its payment) whose state already says whether
//! the event was taken (a payment exists, a cancel was requested, the order no longer awaits
//! payment), and that state changes in the same commit as the event's effects. `event_id`
//! (deterministic: `<order>/<service>/<seq of the causing event>`) names a delivery in logs.

use crate::domain::{Money, OrderId, PaymentToken, UnixMillis};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntegrationEvent {
    /// order -> payment: stock is reserved, charge the customer.
    PaymentRequested { event_id: String, order: OrderId, amount: Money, token: PaymentToken, deadline_at: UnixMillis },
    /// order -> payment: the order is cancelled; void the charge or refund it.
    PaymentCancelRequested { event_id: String, order: OrderId },
    /// payment -> order: the charge's final outcome.
    PaymentSettled { event_id: String, order: OrderId, outcome: PaymentOutcome },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentOutcome {
    Captured,
    Declined,
    /// Retries exhausted before the payment deadline.
    Failed,
}

pub(crate) fn event_id(order: OrderId, service: &str, seq: u64) -> String {
    format!("{order}/{service}/{seq}")
}

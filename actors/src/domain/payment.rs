//! A payment (one per order) as a pure state machine.
//!
//! Idempotent per order: a second request, capture or refund for the same order changes
//! nothing and the caller reads the first result from the state. A cancel that arrives while a
//! charge is in flight is remembered, and a capture that lands afterwards is refunded, so a
//! cancelled order never stays charged. A cancel that arrives before the request leaves a
//! tombstone (`Voided`) so the late request charges nothing.

use super::types::{Money, OrderId, PaymentToken, UnixMillis};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Asked to charge; the provider has not given a final answer yet.
    Pending,
    Captured,
    Declined,
    /// Retries exhausted before the payment deadline.
    Failed,
    /// Captured, then refunded because the order was cancelled.
    Refunded,
    /// Cancelled before any charge: nothing will be charged.
    Voided,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub order: OrderId,
    pub amount: Money,
    pub token: Option<PaymentToken>,
    pub status: PaymentStatus,
    /// The provider's id of the one capture, if any.
    pub charge_id: Option<String>,
    pub refund_id: Option<String>,
    /// The order was cancelled: whatever gets captured must be refunded.
    pub cancel_requested: bool,
    pub deadline_at: UnixMillis,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentCommand {
    Request {
        order: OrderId,
        amount: Money,
        token: PaymentToken,
        deadline_at: UnixMillis,
    },
    RecordCaptured {
        charge_id: String,
    },
    RecordDeclined {
        reason: String,
    },
    RecordFailed {
        reason: String,
    },
    /// The order was cancelled: void, or refund what was captured.
    Cancel {
        order: OrderId,
    },
    RecordRefunded {
        refund_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentEvent {
    Requested { order: OrderId, amount: Money, token: PaymentToken, deadline_at: UnixMillis },
    Captured { charge_id: String },
    Declined { reason: String },
    Failed { reason: String },
    CancelRequested,
    Refunded { refund_id: String },
    Voided { order: OrderId },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PaymentRejection {
    #[error("no payment was requested for this order")]
    NotRequested,
    #[error("cannot {action} a payment that is {status:?}")]
    InvalidTransition { action: &'static str, status: PaymentStatus },
}

/// What the payment service must do next for a payment, derived from its state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentStep {
    Charge { deadline_at: UnixMillis },
    Refund,
    Done,
}

impl Payment {
    pub fn decide(state: Option<&Payment>, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentRejection> {
        use PaymentStatus::*;
        let Some(p) = state else {
            return match command {
                PaymentCommand::Request { order, amount, token, deadline_at } => Ok(vec![PaymentEvent::Requested {
                    order: *order,
                    amount: *amount,
                    token: token.clone(),
                    deadline_at: *deadline_at,
                }]),
                PaymentCommand::Cancel { order } => Ok(vec![PaymentEvent::Voided { order: *order }]),
                _ => Err(PaymentRejection::NotRequested),
            };
        };
        let refuse = |action| Err(PaymentRejection::InvalidTransition { action, status: p.status });
        Ok(match command {
            PaymentCommand::Request { .. } => vec![],
            PaymentCommand::RecordCaptured { charge_id } => match p.status {
                Pending => vec![PaymentEvent::Captured { charge_id: charge_id.clone() }],
                Captured | Refunded => vec![],
                _ => return refuse("capture"),
            },
            PaymentCommand::RecordDeclined { reason } => match p.status {
                Pending => vec![PaymentEvent::Declined { reason: reason.clone() }],
                Declined => vec![],
                _ => return refuse("decline"),
            },
            PaymentCommand::RecordFailed { reason } => match p.status {
                Pending => vec![PaymentEvent::Failed { reason: reason.clone() }],
                Failed => vec![],
                _ => return refuse("fail"),
            },
            PaymentCommand::Cancel { .. } => match p.status {
                _ if p.cancel_requested => vec![],
                Pending | Captured => vec![PaymentEvent::CancelRequested],
                Declined | Failed | Refunded | Voided => vec![],
            },
            PaymentCommand::RecordRefunded { refund_id } => match p.status {
                Captured if p.cancel_requested => vec![PaymentEvent::Refunded { refund_id: refund_id.clone() }],
                Refunded => vec![],
                _ => return refuse("refund"),
            },
        })
    }

    pub fn apply(state: Option<Payment>, event: &PaymentEvent) -> Option<Payment> {
        let mut p = match (state, event) {
            (None, PaymentEvent::Requested { order, amount, token, deadline_at }) => {
                return Some(Payment {
                    order: *order,
                    amount: *amount,
                    token: Some(token.clone()),
                    status: PaymentStatus::Pending,
                    charge_id: None,
                    refund_id: None,
                    cancel_requested: false,
                    deadline_at: *deadline_at,
                    version: 1,
                });
            }
            (None, PaymentEvent::Voided { order }) => {
                return Some(Payment {
                    order: *order,
                    amount: Money::ZERO,
                    token: None,
                    status: PaymentStatus::Voided,
                    charge_id: None,
                    refund_id: None,
                    cancel_requested: true,
                    deadline_at: 0,
                    version: 1,
                });
            }
            (None, _) => return None,
            (Some(p), _) => p,
        };
        match event {
            PaymentEvent::Requested { .. } | PaymentEvent::Voided { .. } => {}
            PaymentEvent::Captured { charge_id } => {
                p.status = PaymentStatus::Captured;
                p.charge_id = Some(charge_id.clone());
            }
            PaymentEvent::Declined { .. } => p.status = PaymentStatus::Declined,
            PaymentEvent::Failed { .. } => p.status = PaymentStatus::Failed,
            PaymentEvent::CancelRequested => p.cancel_requested = true,
            PaymentEvent::Refunded { refund_id } => {
                p.status = PaymentStatus::Refunded;
                p.refund_id = Some(refund_id.clone());
            }
        }
        p.version += 1;
        Some(p)
    }

    pub fn replay<'a>(events: impl IntoIterator<Item = &'a PaymentEvent>) -> Option<Payment> {
        events.into_iter().fold(None, Payment::apply)
    }

    pub fn next_step(&self) -> PaymentStep {
        match self.status {
            PaymentStatus::Pending => PaymentStep::Charge { deadline_at: self.deadline_at },
            PaymentStatus::Captured if self.cancel_requested => PaymentStep::Refund,
            _ => PaymentStep::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order() -> OrderId {
        OrderId::from_u128(9)
    }

    fn command() -> impl Strategy<Value = PaymentCommand> {
        let id = (0u8..4).prop_map(|n| format!("id_{n}"));
        prop_oneof![
            Just(PaymentCommand::Request {
                order: order(),
                amount: Money::from_cents(100),
                token: PaymentToken::parse("tok_visa").expect("valid"),
                deadline_at: 100,
            }),
            id.clone().prop_map(|charge_id| PaymentCommand::RecordCaptured { charge_id }),
            Just(PaymentCommand::RecordDeclined { reason: "declined".into() }),
            Just(PaymentCommand::RecordFailed { reason: "deadline".into() }),
            Just(PaymentCommand::Cancel { order: order() }),
            id.prop_map(|refund_id| PaymentCommand::RecordRefunded { refund_id }),
        ]
    }

    proptest! {
        /// At most one capture and one refund per order, a refund only after a capture and a
        /// cancel, a cancelled payment never ends captured-and-kept, and replay is exact.
        #[test]
        fn captured_at_most_once_and_refunded_only_when_cancelled(
            commands in proptest::collection::vec(command(), 0..40),
        ) {
            let mut state: Option<Payment> = None;
            let mut log = Vec::new();
            for c in &commands {
                if let Ok(events) = Payment::decide(state.as_ref(), c) {
                    for e in &events {
                        state = Payment::apply(state, e);
                    }
                    log.extend(events);
                }
            }
            let captures = log.iter().filter(|e| matches!(e, PaymentEvent::Captured { .. })).count();
            let refunds = log.iter().filter(|e| matches!(e, PaymentEvent::Refunded { .. })).count();
            prop_assert!(captures <= 1);
            prop_assert!(refunds <= captures);
            if let Some(p) = &state {
                if p.status == PaymentStatus::Refunded {
                    prop_assert!(p.cancel_requested && p.charge_id.is_some());
                }
                if p.cancel_requested && p.status == PaymentStatus::Captured {
                    prop_assert_eq!(p.next_step(), PaymentStep::Refund);
                }
            }
            prop_assert_eq!(Payment::replay(&log), state);
        }
    }

    #[test]
    fn second_capture_keeps_the_first_charge() {
        let mut state = None;
        for c in [
            PaymentCommand::Request {
                order: order(),
                amount: Money::from_cents(1),
                token: PaymentToken::parse("tok_visa").expect("valid"),
                deadline_at: 10,
            },
            PaymentCommand::RecordCaptured { charge_id: "ch_1".into() },
            PaymentCommand::RecordCaptured { charge_id: "ch_2".into() },
        ] {
            for e in Payment::decide(state.as_ref(), &c).expect("ok") {
                state = Payment::apply(state, &e);
            }
        }
        assert_eq!(state.expect("exists").charge_id.as_deref(), Some("ch_1"));
    }

    #[test]
    fn cancel_before_request_voids_it() {
        let events = Payment::decide(None, &PaymentCommand::Cancel { order: order() }).expect("ok");
        let p = Payment::replay(&events).expect("tombstone");
        let late = PaymentCommand::Request {
            order: order(),
            amount: Money::from_cents(1),
            token: PaymentToken::parse("tok_visa").expect("valid"),
            deadline_at: 10,
        };
        assert_eq!(Payment::decide(Some(&p), &late), Ok(vec![]));
        assert_eq!(p.next_step(), PaymentStep::Done);
    }
}

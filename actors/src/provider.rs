//! The payment provider: the one external system, simulated like a card processor's test mode.
//!
//! [`PaymentProvider`] is the seam a real provider adapter would implement. Calls carry an
//! idempotency key (the order id), as real processors take one, so a retried charge never
//! charges twice. [`SimulatedProvider`] behaves by test token, as the contract says:
//!
//! | token                | behaviour                                                      |
//! |----------------------|----------------------------------------------------------------|
//! | `tok_chargeDeclined` | declined                                                       |
//! | `tok_flaky`          | fails transiently the first few attempts per key, then approves |
//! | `tok_timeout`        | never answers                                                  |
//! | any other `tok_...`  | approved                                                       |

use crate::domain::{Money, PaymentToken};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// The provider dedups on this: the same key never charges twice.
    pub idempotency_key: String,
    pub amount: Money,
    pub token: PaymentToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeDecision {
    Approved { charge_id: String },
    Declined { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub charge_id: String,
    pub amount: Money,
}

/// A failure worth retrying (the provider's answer is unknown or "try again").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payment provider: {0}")]
pub struct ProviderError(pub String);

pub trait PaymentProvider: Send + Sync + 'static {
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<ChargeDecision, ProviderError>>;
    /// Returns the refund id.
    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<String, ProviderError>>;
}

/// In-memory provider for development, tests and benchmarks.
#[derive(Debug, Default)]
pub struct SimulatedProvider {
    /// Per idempotency key: attempts seen and the decision once made.
    charges: Mutex<HashMap<String, SimCharge>>,
    refunds: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct SimCharge {
    attempts: u32,
    decision: Option<ChargeDecision>,
}

impl SimulatedProvider {
    /// How many attempts per key fail before `tok_flaky` approves.
    pub const FLAKY_FAILURES: u32 = 2;

    pub fn new() -> Self {
        Self::default()
    }

    /// Distinct approved charges so far (a retry with the same key is not a new charge).
    pub fn approved_charges(&self) -> usize {
        let charges = self.charges.lock().unwrap_or_else(|p| p.into_inner());
        charges.values().filter(|c| matches!(c.decision, Some(ChargeDecision::Approved { .. }))).count()
    }

    pub fn refunds(&self) -> usize {
        self.refunds.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

impl PaymentProvider for SimulatedProvider {
    fn charge(&self, request: ChargeRequest) -> BoxFuture<'_, Result<ChargeDecision, ProviderError>> {
        Box::pin(async move {
            if request.token.as_str() == "tok_timeout" {
                return std::future::pending().await;
            }
            let mut charges = self.charges.lock().unwrap_or_else(|p| p.into_inner());
            let charge = charges.entry(request.idempotency_key).or_default();
            charge.attempts += 1;
            if let Some(decision) = &charge.decision {
                return Ok(decision.clone());
            }
            let decision = match request.token.as_str() {
                "tok_chargeDeclined" => ChargeDecision::Declined { reason: "card declined".into() },
                "tok_flaky" if charge.attempts <= Self::FLAKY_FAILURES => {
                    return Err(ProviderError(format!("transient failure (attempt {})", charge.attempts)));
                }
                _ => ChargeDecision::Approved { charge_id: self.new_id("ch") },
            };
            charge.decision = Some(decision.clone());
            Ok(decision)
        })
    }

    fn refund(&self, request: RefundRequest) -> BoxFuture<'_, Result<String, ProviderError>> {
        Box::pin(async move {
            let mut refunds = self.refunds.lock().unwrap_or_else(|p| p.into_inner());
            let id = refunds.entry(request.idempotency_key).or_insert_with(|| self.new_id("re"));
            Ok(id.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, token: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            amount: Money::from_cents(100),
            token: PaymentToken::parse(token).expect("valid"),
        }
    }

    #[tokio::test]
    async fn flaky_fails_then_approves_once_per_key() {
        let p = SimulatedProvider::new();
        for _ in 0..SimulatedProvider::FLAKY_FAILURES {
            assert!(p.charge(request("o1", "tok_flaky")).await.is_err());
        }
        let first = p.charge(request("o1", "tok_flaky")).await.expect("approved");
        let again = p.charge(request("o1", "tok_flaky")).await.expect("approved");
        assert_eq!(first, again, "a retry with the same key returns the first charge");
        assert_eq!(p.approved_charges(), 1);
    }

    #[tokio::test]
    async fn declined_and_timeout() {
        let p = SimulatedProvider::new();
        assert!(matches!(p.charge(request("o2", "tok_chargeDeclined")).await, Ok(ChargeDecision::Declined { .. })));
        let hung = tokio::time::timeout(std::time::Duration::from_millis(50), p.charge(request("o3", "tok_timeout")));
        assert!(hung.await.is_err(), "tok_timeout never answers");
    }
}

//! Retries with exponential backoff and jitter, and a circuit breaker, for calls to things
//! that fail (the payment provider, other nodes).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Exponential backoff with full jitter: attempt `n` waits a random time in
/// `[0, min(max, base * 2^n)]`, so many retrying callers do not hammer a recovering service
/// in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// Delay before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX)).min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { rand::random_range(0..=nanos) })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast until the cooldown ends.
    Open,
    /// One trial call is let through; its outcome closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// For a gauge: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

/// Opens after `failure_threshold` consecutive failures, stays open for `cooldown`, then lets
/// one trial call through. Shared by every caller of one dependency.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: &'static str,
    failure_threshold: u32,
    cooldown: Duration,
    inner: Mutex<BreakerInner>,
}

#[derive(Debug)]
struct BreakerInner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

/// Proof that a call was admitted; report its outcome with `success` or `failure`. A trial
/// call dropped unreported (its task was cancelled) frees the trial slot for another one:
/// otherwise the breaker would stay half-open, refusing every call, for good.
#[must_use = "report the call's outcome to the breaker"]
#[derive(Debug)]
pub struct Admitted<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    reported: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.trial && !self.reported {
            self.breaker.lock().trial_in_flight = false;
        }
    }
}

impl CircuitBreaker {
    pub fn new(name: &'static str, failure_threshold: u32, cooldown: Duration) -> Self {
        // Export the state from the start, not only after the first change.
        metrics::gauge!("circuit_breaker_state", "breaker" => name).set(BreakerState::Closed.as_gauge());
        Self {
            name,
            failure_threshold: failure_threshold.max(1),
            cooldown,
            inner: Mutex::new(BreakerInner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: None,
                trial_in_flight: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        // A panic while holding this lock leaves only counters behind: keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// `Some` if the call may go ahead now, `None` if the breaker is open.
    pub fn admit(&self) -> Option<Admitted<'_>> {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Some(Admitted { breaker: self, trial: false, reported: false }),
            BreakerState::Open => {
                if inner.opened_at.is_some_and(|t| t.elapsed() >= self.cooldown) {
                    self.set(&mut inner, BreakerState::HalfOpen);
                    inner.trial_in_flight = true;
                    Some(Admitted { breaker: self, trial: true, reported: false })
                } else {
                    None
                }
            }
            BreakerState::HalfOpen if !inner.trial_in_flight => {
                inner.trial_in_flight = true;
                Some(Admitted { breaker: self, trial: true, reported: false })
            }
            BreakerState::HalfOpen => None,
        }
    }

    pub fn success(&self, mut admitted: Admitted<'_>) {
        admitted.reported = true;
        let mut inner = self.lock();
        if admitted.trial {
            inner.trial_in_flight = false;
        }
        inner.consecutive_failures = 0;
        if inner.state != BreakerState::Closed {
            self.set(&mut inner, BreakerState::Closed);
        }
    }

    pub fn failure(&self, mut admitted: Admitted<'_>) {
        admitted.reported = true;
        let mut inner = self.lock();
        if admitted.trial {
            inner.trial_in_flight = false;
        }
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let reopen = inner.state == BreakerState::HalfOpen;
        if reopen || (inner.state == BreakerState::Closed && inner.consecutive_failures >= self.failure_threshold) {
            inner.opened_at = Some(Instant::now());
            self.set(&mut inner, BreakerState::Open);
        }
    }

    fn set(&self, inner: &mut BreakerInner, state: BreakerState) {
        tracing::info!(breaker = self.name, from = ?inner.state, to = ?state, "circuit breaker changed state");
        inner.state = state;
        metrics::gauge!("circuit_breaker_state", "breaker" => self.name).set(state.as_gauge());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_exponential_ceiling() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(10 * 2u64.saturating_pow(attempt)).min(Duration::from_millis(500));
            assert!(b.delay(attempt) <= ceiling, "attempt {attempt}");
        }
    }

    #[test]
    fn breaker_opens_after_threshold_then_half_opens_after_cooldown() {
        let breaker = CircuitBreaker::new("test", 3, Duration::from_millis(30));
        for _ in 0..3 {
            let a = breaker.admit().expect("closed admits");
            breaker.failure(a);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.admit().is_none(), "open fails fast");
        std::thread::sleep(Duration::from_millis(40));
        let trial = breaker.admit().expect("half-open admits one trial");
        assert!(breaker.admit().is_none(), "only one trial at a time");
        breaker.failure(trial);
        assert_eq!(breaker.state(), BreakerState::Open, "failed trial reopens");
        std::thread::sleep(Duration::from_millis(40));
        let trial = breaker.admit().expect("trial");
        breaker.success(trial);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.admit().is_some());
    }

    #[test]
    fn a_trial_dropped_unreported_lets_another_trial_through() {
        let breaker = CircuitBreaker::new("test", 1, Duration::from_millis(10));
        breaker.failure(breaker.admit().expect("closed admits"));
        std::thread::sleep(Duration::from_millis(20));
        let trial = breaker.admit().expect("half-open admits one trial");
        assert!(breaker.admit().is_none(), "only one trial at a time");
        drop(trial); // its call was cancelled
        let trial = breaker.admit().expect("the slot is free again");
        breaker.success(trial);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = CircuitBreaker::new("test", 2, Duration::from_secs(60));
        let a = breaker.admit().expect("closed");
        breaker.failure(a);
        let a = breaker.admit().expect("closed");
        breaker.success(a);
        let a = breaker.admit().expect("closed");
        breaker.failure(a);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}

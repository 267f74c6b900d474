//! The open loop's arrival schedule: order `i` is due `i / rate` seconds after the start,
//! whatever happened to the orders before it. Latency is measured from that intended time,
//! so a server that stalls cannot make the generator wait and hide its own queueing
//! (coordinated omission).

use std::time::Duration;

/// Fixed-rate arrivals over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
    window: Duration,
}

impl Schedule {
    /// `rate` orders per second for `window`. The caller has checked that `rate` is finite
    /// and positive.
    pub fn new(rate: f64, window: Duration) -> Self {
        Self { rate, window }
    }

    /// When order `i` is due, as an offset from the start; `None` once past the window.
    /// Computed from `i` directly (not by adding periods), so rounding never accumulates.
    pub fn offset(&self, i: u64) -> Option<Duration> {
        let secs = i as f64 / self.rate;
        (secs < self.window.as_secs_f64()).then(|| Duration::from_secs_f64(secs))
    }

    /// How many orders the schedule holds: those with an offset inside the window.
    pub fn sends(&self) -> u64 {
        let estimate = (self.window.as_secs_f64() * self.rate).ceil() as u64;
        match estimate.checked_sub(1) {
            Some(last) if self.offset(last).is_none() => last,
            _ => estimate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_evenly_spaced_from_the_start() {
        let schedule = Schedule::new(50.0, Duration::from_secs(2));
        assert_eq!(schedule.offset(0), Some(Duration::ZERO));
        assert_eq!(schedule.offset(1), Some(Duration::from_millis(20)));
        assert_eq!(schedule.offset(99), Some(Duration::from_millis(1980)));
        assert_eq!(schedule.offset(100), None, "2.0 s is outside a 2 s window");
        assert_eq!(schedule.sends(), 100);
    }

    #[test]
    fn offsets_do_not_drift_over_long_runs() {
        // 1/3 s is not exact in binary; adding it a million times would drift.
        let schedule = Schedule::new(3.0, Duration::from_secs(1_000_000));
        let offset = schedule.offset(2_999_999).unwrap_or_default();
        let expected = Duration::from_secs_f64(2_999_999.0 / 3.0);
        assert!(offset.abs_diff(expected) < Duration::from_micros(1), "{offset:?}");
    }

    #[test]
    fn fractional_rates_and_short_windows() {
        // One order every 2 s in a 1 s window: just the one at t = 0.
        let slow = Schedule::new(0.5, Duration::from_secs(1));
        assert_eq!(slow.sends(), 1);
        assert_eq!(slow.offset(1), None);
        // 4000/s: 250 µs apart.
        let fast = Schedule::new(4000.0, Duration::from_secs(15));
        assert_eq!(fast.offset(4), Some(Duration::from_millis(1)));
        assert_eq!(fast.sends(), 60_000);
        // A window that is not a whole number of periods.
        let odd = Schedule::new(3.0, Duration::from_millis(1100));
        assert_eq!(odd.sends(), 4, "t = 0, 1/3, 2/3, 1");
        assert!(odd.offset(3).is_some() && odd.offset(4).is_none());
    }

    #[test]
    fn sends_matches_offsets() {
        for (rate, millis) in [(1.0, 1000), (7.0, 999), (50.0, 2000), (1234.5, 3333), (0.3, 10_000)] {
            let schedule = Schedule::new(rate, Duration::from_millis(millis));
            let n = schedule.sends();
            assert!(schedule.offset(n).is_none(), "rate {rate}, {millis} ms: offset({n}) inside");
            assert!(n == 0 || schedule.offset(n - 1).is_some(), "rate {rate}, {millis} ms: {n} too many");
        }
    }
}

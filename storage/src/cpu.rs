//! Whether the machine's cores are all busy: what decides how long the syncer paces its rounds
//! (and, outside this crate, how many orders the order service admits).
//!
//! Why: a log round costs tens of microseconds of CPU however few writes it carries. When the
//! cores are saturated, every round saved is CPU for the work itself, and a longer interval
//! between rounds (fuller rounds) raised `ordermesh dev`'s closed-loop throughput by about 10%
//! with no worse tail. When they are not, that CPU is free and the longer interval only adds
//! latency (at 1,000 orders/s, +1 ms at the median of each order's confirmation). So the syncer
//! paces longer only while the machine is saturated.
//!
//! The reading is the whole machine's (`/proc/stat`), not this process's: the nodes of a cluster
//! on one machine, or a load generator beside the server, compete for the same cores. Where
//! there is no `/proc/stat`, the machine never counts as saturated. Not measured here: in a
//! container with a CPU quota, the host's reading says nothing of the quota (a throttled pod
//! does not look saturated, a busy neighbour makes an idle pod pace longer); the cgroup's
//! `cpu.stat` throttling or `cpu.pressure` would be the reading there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How often the reading is refreshed.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Saturated once the idle share of the last sample falls below this, and no longer once it
/// rises above [`IDLE_UNSATURATED`]: apart, so that the pacing's own effect on the load does not
/// flip it back and forth.
const IDLE_SATURATED: f64 = 0.05;
const IDLE_UNSATURATED: f64 = 0.15;

/// The machine's CPU time so far, in clock ticks: (idle, total).
type Ticks = (u64, u64);

/// The process's one sampler (every store's syncer asks), and its last answer.
static SAMPLER: LazyLock<Mutex<CpuSaturation>> = LazyLock::new(|| Mutex::new(CpuSaturation::new()));
static SATURATED: AtomicBool = AtomicBool::new(false);

/// Whether the machine's cores were saturated over the last sample. Never blocks: while
/// another thread refreshes the sample, the last answer stands.
pub fn machine_saturated() -> bool {
    if let Ok(mut sampler) = SAMPLER.try_lock() {
        SATURATED.store(sampler.saturated(), Ordering::Relaxed);
    }
    SATURATED.load(Ordering::Relaxed)
}

/// A sampler of the machine's CPU saturation.
struct CpuSaturation {
    last: Option<Ticks>,
    sampled_at: Instant,
    saturated: bool,
}

impl CpuSaturation {
    fn new() -> CpuSaturation {
        CpuSaturation { last: read_ticks(), sampled_at: Instant::now(), saturated: false }
    }

    /// Whether the cores were saturated over the last sample (refreshed when it is stale).
    fn saturated(&mut self) -> bool {
        if self.sampled_at.elapsed() >= SAMPLE_EVERY {
            self.sampled_at = Instant::now();
            let now = read_ticks();
            if let (Some(before), Some(now)) = (self.last, now) {
                self.saturated = next_state(self.saturated, before, now);
            }
            self.last = now;
        }
        self.saturated
    }
}

/// The state after a sample from `before` to `now` (see the thresholds above).
fn next_state(saturated: bool, before: Ticks, now: Ticks) -> bool {
    let total = now.1.saturating_sub(before.1);
    if total == 0 {
        return saturated;
    }
    let idle = now.0.saturating_sub(before.0) as f64 / total as f64;
    if saturated { idle <= IDLE_UNSATURATED } else { idle < IDLE_SATURATED }
}

fn read_ticks() -> Option<Ticks> {
    parse_cpu_line(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The first line of `/proc/stat`: `cpu  user nice system idle iowait irq softirq steal ...`.
/// Idle counts `idle` and `iowait` (a core waiting for the disk could run other work).
fn parse_cpu_line(stat: &str) -> Option<Ticks> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields = line.split_whitespace().map(str::parse::<u64>).collect::<Result<Vec<_>, _>>().ok()?;
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    // guest and guest_nice (9th and 10th) are already counted in user and nice.
    let total = fields.iter().take(8).sum();
    Some((idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_idle_and_total_from_the_cpu_line() {
        let stat = "cpu  100 5 50 800 20 1 4 0 7 0\ncpu0 50 2 25 400 10 0 2 0 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some((820, 980)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4\n"), None, "not the summary line");
        assert_eq!(parse_cpu_line("cpu  1 2 x 4\n"), None);
        assert_eq!(parse_cpu_line(""), None);
    }

    #[test]
    fn saturation_has_hysteresis() {
        // 2% idle: saturated; 10% idle: stays as it was; 30% idle: not saturated.
        let sample = |idle_pct: u64| ((0, 0), (idle_pct, 100));
        let (b, n) = sample(2);
        assert!(next_state(false, b, n));
        let (b, n) = sample(10);
        assert!(next_state(true, b, n));
        assert!(!next_state(false, b, n));
        let (b, n) = sample(30);
        assert!(!next_state(true, b, n));
        assert!(next_state(true, (5, 5), (5, 5)), "no time passed: unchanged");
    }

    #[test]
    fn this_machine_has_a_reading() {
        if cfg!(target_os = "linux") {
            let (idle, total) = read_ticks().expect("/proc/stat");
            assert!(idle <= total && total > 0);
        }
    }
}

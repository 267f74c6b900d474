//! Whether the cores this process may use are all busy (the machine's, and its CPU quota if it
//! has one): what decides how long the syncer paces its rounds (and, outside this crate, how many
//! orders the order service admits).
//!
//! Why: a log round costs tens of microseconds of CPU however few writes it carries. When the
//! cores are saturated, every round saved is CPU for the work itself, and a longer interval
//! between rounds (fuller rounds) raised `ordermesh dev`'s closed-loop throughput by about 10%
//! with no worse tail. When they are not, that CPU is free and the longer interval only adds
//! latency (at 1,000 orders/s, +1 ms at the median of each order's confirmation). So the syncer
//! paces longer only while the machine is saturated.
//!
//! The reading is the whole machine's (`/proc/stat`), not this process's: the nodes of a cluster
//! on one machine, or a load generator beside the server, compete for the same cores. In a
//! container with a CPU limit (a Kubernetes `resources.limits.cpu`: a cgroup v2 `cpu.max` quota
//! on this process's cgroup or one above it), the machine's cores say nothing of the limit: a pod
//! allowed one core of sixteen is throttled long before the machine looks busy. So each quota
//! counts as cores too: the idle share is the smallest of the machine's and every quota's (the
//! quota less what its cgroup used, from its `cpu.stat`). Quotas are looked up again every
//! [`FIND_QUOTAS_EVERY`] (a pod's limit may be resized in place). Read where containers mount
//! cgroup v2, `/sys/fs/cgroup`; cgroup v1 quotas, or a hierarchy mounted elsewhere, are not
//! read. With neither `/proc/stat` nor a quota, the cores never count as saturated.

use std::path::{Path, PathBuf};
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

/// Whether the machine's cores, or this process's CPU quota, were saturated over the last
/// sample. Never blocks: while another thread refreshes the sample, the last answer stands.
pub fn cores_saturated() -> bool {
    if let Ok(mut sampler) = SAMPLER.try_lock() {
        SATURATED.store(sampler.saturated(), Ordering::Relaxed);
    }
    SATURATED.load(Ordering::Relaxed)
}

/// How often the quotas are looked up again.
const FIND_QUOTAS_EVERY: Duration = Duration::from_secs(10);

/// A sampler of the machine's CPU saturation (and of this process's CPU quotas, if it has any).
struct CpuSaturation {
    last: Option<Ticks>,
    /// Each quota, with its cgroup's CPU time at the last sample (microseconds).
    quotas: Vec<(Quota, Option<u64>)>,
    quotas_found_at: Instant,
    sampled_at: Instant,
    saturated: bool,
}

impl CpuSaturation {
    fn new() -> CpuSaturation {
        CpuSaturation {
            last: read_ticks(),
            quotas: find_own_quotas(),
            quotas_found_at: Instant::now(),
            sampled_at: Instant::now(),
            saturated: false,
        }
    }

    /// Whether the cores were saturated over the last sample (refreshed when it is stale).
    fn saturated(&mut self) -> bool {
        let elapsed = self.sampled_at.elapsed();
        if elapsed < SAMPLE_EVERY {
            return self.saturated;
        }
        self.sampled_at = Instant::now();
        let now = read_ticks();
        let mut idle = match (self.last, now) {
            (Some(before), Some(now)) => idle_share(before, now),
            _ => None,
        };
        self.last = now;
        for (quota, last_usage) in &mut self.quotas {
            let usage = quota.usage_us();
            if let (Some(before), Some(now)) = (*last_usage, usage) {
                let share = quota.idle_share(now.saturating_sub(before), elapsed);
                idle = Some(idle.map_or(share, |idle| idle.min(share)));
            }
            *last_usage = usage;
        }
        if let Some(idle) = idle {
            self.saturated = next_state(self.saturated, idle);
        }
        if self.quotas_found_at.elapsed() >= FIND_QUOTAS_EVERY {
            // Their usage read now is the next sample's start, as the one just taken would be.
            self.quotas_found_at = Instant::now();
            self.quotas = find_own_quotas();
        }
        self.saturated
    }
}

/// This process's quotas, each with its cgroup's CPU time now.
fn find_own_quotas() -> Vec<(Quota, Option<u64>)> {
    let Ok(cgroup) = std::fs::read_to_string("/proc/self/cgroup") else { return Vec::new() };
    find_quotas(&cgroup, Path::new(CGROUP_ROOT))
        .into_iter()
        .map(|quota| {
            let usage = quota.usage_us();
            (quota, usage)
        })
        .collect()
}

/// The share of the machine's CPU time idle from `before` to `now` (`None`: no time passed).
fn idle_share(before: Ticks, now: Ticks) -> Option<f64> {
    let total = now.1.saturating_sub(before.1);
    (total > 0).then(|| now.0.saturating_sub(before.0) as f64 / total as f64)
}

/// The state after a sample whose idle share was `idle` (see the thresholds above).
fn next_state(saturated: bool, idle: f64) -> bool {
    if saturated { idle <= IDLE_UNSATURATED } else { idle < IDLE_SATURATED }
}

/// Where cgroup v2 is mounted (inside a container with its own cgroup namespace, its root is
/// the container's cgroup).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A CPU quota on this process: the `cpu.max` of its cgroup or of one above it.
#[derive(Debug, PartialEq)]
struct Quota {
    /// The cores the quota allows (`quota / period`: 0.5 is half of one core).
    cores: f64,
    /// The `cpu.stat` of the cgroup that sets it (its usage counts every process below it, so a
    /// parent's quota shared with busy siblings can run out before this process's own).
    stat: PathBuf,
}

impl Quota {
    /// The cgroup's CPU time so far, in microseconds.
    fn usage_us(&self) -> Option<u64> {
        parse_usage_us(&std::fs::read_to_string(&self.stat).ok()?)
    }

    /// The share of the quota left unused by `used_us` of CPU time over `elapsed`.
    fn idle_share(&self, used_us: u64, elapsed: Duration) -> f64 {
        let allowed_us = self.cores * elapsed.as_micros() as f64;
        if allowed_us <= 0.0 { 1.0 } else { (1.0 - used_us as f64 / allowed_us).clamp(0.0, 1.0) }
    }
}

/// The quotas on the cgroup v2 named in `proc_self_cgroup` (the `0::<path>` line of
/// `/proc/self/cgroup`) under `root` and on its ancestors up to `root`: none without cgroup v2,
/// with no quota (`cpu.max` of `max`) up the tree, or when the path leaves `root` (`..`: the
/// cgroup lies outside this namespace's view, and the files under `root` are someone else's).
fn find_quotas(proc_self_cgroup: &str, root: &Path) -> Vec<Quota> {
    use std::path::Component;
    let Some(path) = proc_self_cgroup.lines().find_map(|line| line.strip_prefix("0::")) else { return Vec::new() };
    let mut dir = root.to_path_buf();
    for component in Path::new(path.trim()).components() {
        match component {
            Component::Normal(name) => dir.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Vec::new(),
        }
    }
    dir.ancestors()
        .take_while(|d| d.starts_with(root))
        .filter_map(|dir| {
            let cores = parse_cpu_max(&std::fs::read_to_string(dir.join("cpu.max")).ok()?)?;
            Some(Quota { cores, stat: dir.join("cpu.stat") })
        })
        .collect()
}

/// `cpu.max`: `<quota> <period>` in microseconds, or `max <period>` for none.
fn parse_cpu_max(max: &str) -> Option<f64> {
    let mut fields = max.split_whitespace();
    let quota = fields.next()?.parse::<u64>().ok()?;
    let period = fields.next()?.parse::<u64>().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// `cpu.stat`'s `usage_usec` line.
fn parse_usage_us(stat: &str) -> Option<u64> {
    stat.lines().find_map(|line| line.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse().ok())
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
        assert!(next_state(false, 0.02));
        assert!(next_state(true, 0.10));
        assert!(!next_state(false, 0.10));
        assert!(!next_state(true, 0.30));
        assert_eq!(idle_share((0, 0), (30, 100)), Some(0.3));
        assert_eq!(idle_share((5, 5), (5, 5)), None, "no time passed: no reading");
    }

    #[test]
    fn reads_a_cgroup_quota_and_usage() {
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(parse_cpu_max("200000 100000"), Some(2.0));
        assert_eq!(parse_cpu_max("max 100000\n"), None, "no quota");
        assert_eq!(parse_cpu_max(""), None);
        let stat = "usage_usec 8123456\nuser_usec 6000000\nsystem_usec 2123456\nnr_periods 0\n";
        assert_eq!(parse_usage_us(stat), Some(8_123_456));
        assert_eq!(parse_usage_us("user_usec 1\n"), None);

        let quota = Quota { cores: 0.5, stat: PathBuf::new() };
        let tenth = Duration::from_millis(100);
        assert!((quota.idle_share(50_000, tenth) - 0.0).abs() < 1e-9, "all of half a core used");
        assert!((quota.idle_share(40_000, tenth) - 0.2).abs() < 1e-9);
        assert_eq!(quota.idle_share(90_000, tenth), 0.0, "more than the quota (a sample's edges): none left");
    }

    /// A cgroup tree as the kernel shows it (here in a temporary directory): every `cpu.max` on
    /// the way from this process's cgroup up to the root is a quota, measured by the `cpu.stat`
    /// beside it; none anywhere, no cgroup v2 line, or a path out of the root is none.
    #[test]
    fn finds_the_quotas_up_the_tree() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pod = root.path().join("kubepods/pod1");
        let container = pod.join("c1");
        std::fs::create_dir_all(&container).unwrap_or_else(|e| panic!("{e}"));
        let write = |dir: &Path, name: &str, text: &str| {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{e}"));
        };
        let cgroup = "12:memory:/ignored\n0::/kubepods/pod1/c1\n";
        assert_eq!(find_quotas(cgroup, root.path()), vec![], "no cpu.max files");

        write(&container, "cpu.max", "max 100000\n");
        write(root.path(), "cpu.max", "max 100000\n");
        assert_eq!(find_quotas(cgroup, root.path()), vec![], "max everywhere");

        write(&pod, "cpu.max", "150000 100000\n");
        let pod_quota = || Quota { cores: 1.5, stat: pod.join("cpu.stat") };
        assert_eq!(find_quotas(cgroup, root.path()), vec![pod_quota()]);
        write(&container, "cpu.max", "50000 100000\n");
        let container_quota = Quota { cores: 0.5, stat: container.join("cpu.stat") };
        assert_eq!(find_quotas(cgroup, root.path()), vec![container_quota, pod_quota()]);
        write(&container, "cpu.stat", "usage_usec 42\n");
        assert_eq!(find_quotas(cgroup, root.path())[0].usage_us(), Some(42));

        assert_eq!(find_quotas("0::/\n", root.path()), vec![], "the root's own max");
        assert_eq!(find_quotas("4:cpu:/kubepods/pod1/c1\n", root.path()), vec![], "cgroup v1 only");
        assert_eq!(find_quotas("0::/../kubepods/pod1/c1\n", root.path()), vec![], "outside the root");
    }

    #[test]
    fn this_machine_has_a_reading() {
        if cfg!(target_os = "linux") {
            let (idle, total) = read_ticks().expect("/proc/stat");
            assert!(idle <= total && total > 0);
        }
    }
}

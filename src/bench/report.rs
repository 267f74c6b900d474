//! What a run measured, as a table for people and one JSON object for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use super::Mode;

/// Latency percentiles in milliseconds, from a histogram of microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty histogram: no figure is better than a made-up zero.
    pub fn of(micros: &Histogram<u64>) -> Option<Self> {
        if micros.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: micros.len(),
            p50: ms(micros.value_at_quantile(0.5)),
            p90: ms(micros.value_at_quantile(0.9)),
            p99: ms(micros.value_at_quantile(0.99)),
            p999: ms(micros.value_at_quantile(0.999)),
            max: ms(micros.max()),
        })
    }
}

/// How confirmations were observed, for the note under the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Polling {
    /// One `GET /v1/orders/{id}?wait_ms=` at a time, each answered when the order ends (or
    /// after `wait`, then asked again).
    LongPoll { wait: Duration },
    /// Plain `GET`s, `first` after the 202, then `growth` times longer intervals up to `max`.
    Intervals { first: Duration, max: Duration, growth: f64 },
    /// `POST /v1/orders/wait` for many orders at once, each answered when one of them ends (or
    /// after `wait`); the ones still open are asked again.
    Batched { wait: Duration },
}

/// Everything a run counted.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub target: String,
    pub mode: Mode,
    /// The sending window (`--duration`): the denominator of every rate.
    pub duration: Duration,
    /// The load sent before the measured window and not counted in it (`--warmup`).
    pub warmup: Option<Warmup>,
    /// Wall time from the first send to the end of the wait for confirmations.
    pub elapsed: Duration,
    pub customers: u32,
    pub skus: u32,
    pub pollers: u32,
    pub max_in_flight: u32,
    pub polling: Polling,
    /// Open loop: sends on the schedule (`sent` + `dropped` once the run is through).
    pub scheduled: Option<u64>,
    /// `POST /v1/orders` requests started.
    pub sent: u64,
    /// Orders answered `202` with a readable body.
    pub placed: u64,
    pub confirmed: u64,
    /// Orders that ended `cancelled` (with `tok_visa` and ample stock, none should).
    pub cancelled: u64,
    /// Placed orders whose confirmation was not tracked (the tracking bound was full).
    pub untracked: u64,
    /// Open loop: sends skipped because `--max-in-flight` requests were outstanding.
    pub dropped: u64,
    /// `POST` answered with anything but `202`, by status code.
    pub errors_by_status: BTreeMap<u16, u64>,
    /// `POST` that got no HTTP answer (connect, reset, timeout).
    pub transport_errors: u64,
    /// `202` whose body was not an order.
    pub bad_responses: u64,
    pub polls: u64,
    pub poll_errors_by_status: BTreeMap<u16, u64>,
    pub poll_transport_errors: u64,
    /// `POST` until `202` received, from the intended send time in the open loop.
    pub place: Option<Percentiles>,
    /// `202` received until a poll saw `confirmed`.
    pub confirm: Option<Percentiles>,
    /// Open loop: how late each send started after its intended time.
    pub behind: Option<Percentiles>,
    /// How long polls waited for a poller slot: when it is large, the pollers bound, not the
    /// server, sets the confirm figure's resolution.
    pub poll_wait: Option<Percentiles>,
    /// CPU time the generator process used (user + system), where the OS tells.
    pub generator_cpu: Option<Duration>,
}

/// What the warm-up sent (the same load as the measured window, just before it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warmup {
    pub duration: Duration,
    pub placed: u64,
    pub errors: u64,
}

impl Summary {
    /// Placed orders that neither confirmed nor cancelled by the end of the grace period.
    pub fn unconfirmed(&self) -> u64 {
        self.placed.saturating_sub(self.confirmed + self.cancelled + self.untracked)
    }

    /// Failed `POST`s: every non-202 status, every transport error, every unreadable 202.
    pub fn errors(&self) -> u64 {
        self.errors_by_status.values().sum::<u64>() + self.transport_errors + self.bad_responses
    }

    pub fn poll_errors(&self) -> u64 {
        self.poll_errors_by_status.values().sum::<u64>() + self.poll_transport_errors
    }

    fn per_s(&self, count: u64) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 { count as f64 / secs } else { 0.0 }
    }

    pub fn placed_per_s(&self) -> f64 {
        self.per_s(self.placed)
    }

    pub fn confirmed_per_s(&self) -> f64 {
        self.per_s(self.confirmed)
    }

    /// The human report.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let grace = self.elapsed.saturating_sub(self.duration);
        // Writing to a String cannot fail.
        let _ = writeln!(out, "ordermesh bench against {}", self.target);
        let _ = writeln!(out, "  mode         {}", self.mode);
        let _ = writeln!(
            out,
            "  duration     {:.1} s (then {:.1} s waiting for confirmations)",
            self.duration.as_secs_f64(),
            grace.as_secs_f64()
        );
        if let Some(warmup) = self.warmup {
            let _ = writeln!(
                out,
                "  warm-up      {:.1} s before it, not counted ({} orders placed, {} errors)",
                warmup.duration.as_secs_f64(),
                warmup.placed,
                warmup.errors
            );
        }
        let _ = writeln!(
            out,
            "  load         {} customers, {} skus, at most {} requests in flight and {} pollers",
            self.customers, self.skus, self.max_in_flight, self.pollers
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  {:<24}{:>10}{:>11}", "orders", "count", "per s");
        let mut count_row = |label: &str, count: u64, always: bool| {
            if always || count > 0 {
                let _ = writeln!(out, "  {label:<24}{count:>10}{:>11.1}", self.per_s(count));
            }
        };
        if let Some(scheduled) = self.scheduled {
            count_row("scheduled", scheduled, true);
        }
        count_row("sent", self.sent, true);
        count_row("placed (202)", self.placed, true);
        count_row("confirmed", self.confirmed, true);
        count_row("cancelled", self.cancelled, false);
        count_row("unconfirmed", self.unconfirmed(), false);
        count_row("untracked", self.untracked, false);
        count_row("dropped by generator", self.dropped, false);
        count_row("failed", self.errors(), false);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<24}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "count"
        );
        let rows = [
            ("place (POST to 202)", Some(self.place)),
            ("confirm (202 to conf.)", Some(self.confirm)),
            ("behind schedule", matches!(self.mode, Mode::Open { .. }).then_some(self.behind)),
        ];
        for (label, row) in rows {
            match row {
                None => {}
                Some(Some(p)) => {
                    let _ = writeln!(
                        out,
                        "  {label:<24}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}",
                        format_ms(p.p50),
                        format_ms(p.p90),
                        format_ms(p.p99),
                        format_ms(p.p999),
                        format_ms(p.max),
                        p.count
                    );
                }
                Some(None) => {
                    let _ = writeln!(out, "  {label:<24}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}", "-", "-", "-", "-", "-", 0);
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  errors       {}",
            format_errors(&self.errors_by_status, self.transport_errors, self.bad_responses)
        );
        let per_order = if self.placed > 0 { self.polls as f64 / self.placed as f64 } else { 0.0 };
        let waited = self.poll_wait.map_or_else(String::new, |wait| {
            format!(", waited for a poller p50 {} ms, p99 {} ms", format_ms(wait.p50), format_ms(wait.p99))
        });
        let _ = writeln!(
            out,
            "  polls        {} ({per_order:.1} per order{waited}), errors: {}",
            self.polls,
            format_errors(&self.poll_errors_by_status, self.poll_transport_errors, 0)
        );
        if let Some(cpu) = self.generator_cpu {
            let cores = cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9);
            let _ = writeln!(out, "  generator    {:.1} s of CPU ({cores:.2} cores)", cpu.as_secs_f64());
        }
        for note in self.notes() {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }

    /// Caveats that apply to this run's figures.
    fn notes(&self) -> Vec<String> {
        let mut notes = vec![match self.polling {
            Polling::LongPoll { wait } => format!(
                "confirm latency is observed by long polls (GET /v1/orders/{{id}}?wait_ms={}, at most {} in flight), \
                 answered when the order ends: each figure is late by one response's trip",
                wait.as_millis(),
                self.pollers
            ),
            Polling::Batched { wait } => format!(
                "confirm latency is observed by batched waits (POST /v1/orders/wait naming up to 64 open orders, \
                 wait_ms={}, at most {} in flight), each answered when one of its orders ends: each figure is late \
                 by one response's trip, plus the wait for a free waiter when every waiter holds orders that do not end",
                wait.as_millis(),
                self.pollers
            ),
            Polling::Intervals { first, max, growth } => format!(
                "confirm latency is observed by polling GET /v1/orders/{{id}} ({} ms after the 202, then x{growth} up \
                 to every {} ms, at most {} polls in flight): each figure is an upper bound, late by up to one poll \
                 interval plus one round trip",
                first.as_millis(),
                max.as_millis(),
                self.pollers
            ),
        }];
        if let Mode::Closed { .. } = self.mode {
            notes.push(
                "closed loop: a worker waits for each answer before sending again, so a slow server lowers the \
                 load instead of queueing it; use --rate for latency under a fixed load"
                    .into(),
            );
        }
        if self.dropped > 0 {
            notes.push(format!(
                "{} sends were dropped because {} requests were already in flight: the server is not keeping up \
                 with {} (raise --max-in-flight only to queue more)",
                self.dropped, self.max_in_flight, self.mode
            ));
        }
        if let Some(behind) = self.behind
            && behind.p99 > 5.0
        {
            notes.push(format!(
                "the generator fell behind its schedule (p99 {} ms, max {} ms): latencies still count from the intended \
                 send times, but this machine could not offer the full rate",
                format_ms(behind.p99),
                format_ms(behind.max)
            ));
        }
        if self.errors_by_status.contains_key(&429) || self.poll_errors_by_status.contains_key(&429) {
            notes.push("429s are per-subject rate limits: raise --customers to spread the load".into());
        }
        let coarse_after = match self.polling {
            Polling::LongPoll { .. } | Polling::Batched { .. } => Duration::from_millis(5),
            Polling::Intervals { max, .. } => max,
        };
        if let Some(wait) = self.poll_wait
            && wait.p99 > coarse_after.as_secs_f64() * 1000.0
        {
            notes.push(format!(
                "polls waited for one of the {} pollers (p99 {} ms): the confirm figure's resolution is that \
                 coarse; --pollers raises the bound, at the price of more load from polling",
                self.pollers,
                format_ms(wait.p99)
            ));
        }
        if self.untracked > 0 {
            notes.push(format!(
                "{} orders were placed but not followed to confirmation (tracking bound)",
                self.untracked
            ));
        }
        notes
    }

    /// The machine-readable report: one flat object.
    pub fn json(&self) -> Value {
        let mut object = Map::new();
        let (mode, rate, concurrency) = match self.mode {
            Mode::Open { rate } => ("open", json!(rate), Value::Null),
            Mode::Closed { concurrency } => ("closed", Value::Null, json!(concurrency)),
        };
        object.insert("target".into(), json!(self.target));
        object.insert("mode".into(), json!(mode));
        object.insert("rate".into(), rate);
        object.insert("concurrency".into(), concurrency);
        object.insert("duration_s".into(), json!(round3(self.duration.as_secs_f64())));
        object.insert("elapsed_s".into(), json!(round3(self.elapsed.as_secs_f64())));
        object.insert("warmup_s".into(), json!(round3(self.warmup.map_or(0.0, |w| w.duration.as_secs_f64()))));
        object.insert("warmup_placed".into(), json!(self.warmup.map_or(0, |w| w.placed)));
        object.insert("warmup_errors".into(), json!(self.warmup.map_or(0, |w| w.errors)));
        object.insert("customers".into(), json!(self.customers));
        object.insert("skus".into(), json!(self.skus));
        object.insert("pollers".into(), json!(self.pollers));
        object.insert("max_in_flight".into(), json!(self.max_in_flight));
        object.insert("scheduled".into(), json!(self.scheduled));
        object.insert("sent".into(), json!(self.sent));
        object.insert("placed".into(), json!(self.placed));
        object.insert("confirmed".into(), json!(self.confirmed));
        object.insert("cancelled".into(), json!(self.cancelled));
        object.insert("unconfirmed".into(), json!(self.unconfirmed()));
        object.insert("untracked".into(), json!(self.untracked));
        object.insert("dropped".into(), json!(self.dropped));
        object.insert("sent_per_s".into(), json!(round3(self.per_s(self.sent))));
        object.insert("placed_per_s".into(), json!(round3(self.placed_per_s())));
        object.insert("confirmed_per_s".into(), json!(round3(self.confirmed_per_s())));
        let histograms =
            [("place", self.place), ("confirm", self.confirm), ("behind", self.behind), ("poll_wait", self.poll_wait)];
        for (prefix, percentiles) in histograms {
            let figures = percentiles.map(|p| [p.p50, p.p90, p.p99, p.p999, p.max]);
            for (i, name) in ["p50", "p90", "p99", "p999", "max"].into_iter().enumerate() {
                let value = figures.map_or(Value::Null, |figures| json!(round3(figures[i])));
                object.insert(format!("{prefix}_{name}_ms"), value);
            }
            object.insert(format!("{prefix}_count"), json!(percentiles.map_or(0, |p| p.count)));
        }
        object.insert("errors".into(), json!(self.errors()));
        object.insert("errors_by_status".into(), status_map(&self.errors_by_status));
        object.insert("transport_errors".into(), json!(self.transport_errors));
        object.insert("bad_responses".into(), json!(self.bad_responses));
        object.insert("polls".into(), json!(self.polls));
        object.insert("poll_errors".into(), json!(self.poll_errors()));
        object.insert("poll_errors_by_status".into(), status_map(&self.poll_errors_by_status));
        object.insert("poll_transport_errors".into(), json!(self.poll_transport_errors));
        match self.polling {
            Polling::LongPoll { wait } => {
                object.insert("confirm_by".into(), json!("long_poll"));
                object.insert("long_poll_wait_ms".into(), json!(round3(wait.as_secs_f64() * 1000.0)));
            }
            Polling::Batched { wait } => {
                object.insert("confirm_by".into(), json!("batched_wait"));
                object.insert("long_poll_wait_ms".into(), json!(round3(wait.as_secs_f64() * 1000.0)));
            }
            Polling::Intervals { first, max, .. } => {
                object.insert("confirm_by".into(), json!("poll"));
                object.insert("poll_first_ms".into(), json!(round3(first.as_secs_f64() * 1000.0)));
                object.insert("poll_max_interval_ms".into(), json!(round3(max.as_secs_f64() * 1000.0)));
            }
        }
        object.insert(
            "generator_cpu_s".into(),
            self.generator_cpu.map_or(Value::Null, |d| json!(round3(d.as_secs_f64()))),
        );
        Value::Object(object)
    }
}

/// Milliseconds with as many decimals as are meaningful at that size.
pub fn format_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 1000.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// `none`, or `429: 3, 503: 12, transport: 2` (statuses in order, then the others).
pub fn format_errors(by_status: &BTreeMap<u16, u64>, transport: u64, bad_responses: u64) -> String {
    let mut parts: Vec<String> =
        by_status.iter().filter(|(_, n)| **n > 0).map(|(status, n)| format!("{status}: {n}")).collect();
    if transport > 0 {
        parts.push(format!("transport: {transport}"));
    }
    if bad_responses > 0 {
        parts.push(format!("unreadable 202: {bad_responses}"));
    }
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

fn status_map(by_status: &BTreeMap<u16, u64>) -> Value {
    Value::Object(by_status.iter().map(|(status, n)| (status.to_string(), json!(n))).collect())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn histogram(values_us: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in values_us {
            h.record(*v).unwrap();
        }
        h
    }

    fn summary(mode: Mode) -> Summary {
        let mut place = histogram(&(1..=1000).map(|i| i * 10).collect::<Vec<_>>()); // 10 µs .. 10 ms
        place.record(250_000).unwrap(); // one 250 ms outlier
        Summary {
            target: "http://127.0.0.1:8080/".into(),
            mode,
            duration: Duration::from_secs(20),
            warmup: None,
            elapsed: Duration::from_millis(21_500),
            customers: 1000,
            skus: 100,
            pollers: 64,
            max_in_flight: 4096,
            polling: Polling::Intervals {
                first: Duration::from_millis(2),
                max: Duration::from_millis(20),
                growth: 1.5,
            },
            scheduled: None,
            sent: 40_010,
            placed: 40_000,
            confirmed: 39_990,
            cancelled: 0,
            untracked: 0,
            dropped: 0,
            errors_by_status: BTreeMap::from([(503, 7), (429, 2)]),
            transport_errors: 1,
            bad_responses: 0,
            polls: 120_000,
            poll_errors_by_status: BTreeMap::new(),
            poll_transport_errors: 0,
            place: Percentiles::of(&place),
            confirm: None,
            behind: None,
            poll_wait: None,
            generator_cpu: Some(Duration::from_secs(10)),
        }
    }

    #[test]
    fn a_warm_up_is_reported_apart() {
        let cold = summary(Mode::Closed { concurrency: 64 });
        assert!(!cold.table().contains("warm-up"));
        assert_eq!((cold.json()["warmup_s"].clone(), cold.json()["warmup_placed"].clone()), (json!(0.0), json!(0)));
        let warm =
            Summary { warmup: Some(Warmup { duration: Duration::from_secs(5), placed: 12_345, errors: 2 }), ..cold };
        assert!(warm.table().contains("warm-up      5.0 s before it, not counted (12345 orders placed, 2 errors)"));
        let json = warm.json();
        assert_eq!((json["warmup_s"].clone(), json["warmup_placed"].clone()), (json!(5.0), json!(12_345)));
        assert_eq!(json["warmup_errors"], 2);
        assert_eq!(json["placed"], 40_000, "the measured window's counts are its own");
    }

    #[test]
    fn percentiles_are_milliseconds_and_empty_is_none() {
        let p = Percentiles::of(&histogram(&(1..=1000).map(|i| i * 10).collect::<Vec<_>>())).unwrap();
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 5.0).abs() < 0.01, "{p:?}");
        assert!((p.p90 - 9.0).abs() < 0.01, "{p:?}");
        assert!((p.p99 - 9.9).abs() < 0.01, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.01, "{p:?}");
        assert_eq!(Percentiles::of(&histogram(&[])), None);
    }

    #[test]
    fn milliseconds_keep_meaningful_decimals() {
        assert_eq!(format_ms(0.123_4), "0.12");
        assert_eq!(format_ms(9.999), "10.00");
        assert_eq!(format_ms(12.34), "12.3");
        assert_eq!(format_ms(1234.5), "1234");
    }

    #[test]
    fn errors_read_by_status_then_transport() {
        let by_status = BTreeMap::from([(503, 12), (429, 3), (500, 0)]);
        assert_eq!(format_errors(&by_status, 2, 0), "429: 3, 503: 12, transport: 2");
        assert_eq!(format_errors(&BTreeMap::new(), 0, 0), "none");
        assert_eq!(format_errors(&BTreeMap::new(), 0, 1), "unreadable 202: 1");
    }

    #[test]
    fn counts_derive_rates_errors_and_unconfirmed() {
        let s = summary(Mode::Closed { concurrency: 64 });
        assert_eq!(s.placed_per_s(), 2000.0);
        assert_eq!(s.confirmed_per_s(), 1999.5);
        assert_eq!(s.errors(), 10);
        assert_eq!(s.unconfirmed(), 10);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let json = summary(Mode::Closed { concurrency: 64 }).json();
        for key in [
            "placed_per_s",
            "confirmed_per_s",
            "place_p50_ms",
            "place_p90_ms",
            "place_p99_ms",
            "place_p999_ms",
            "place_max_ms",
            "confirm_p50_ms",
            "confirm_p99_ms",
            "errors",
            "errors_by_status",
            "mode",
            "rate",
            "concurrency",
            "duration_s",
            "behind_max_ms",
            "poll_wait_p99_ms",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["mode"], "closed");
        assert_eq!(json["concurrency"], 64);
        assert_eq!(json["rate"], Value::Null);
        assert_eq!(json["placed_per_s"], 2000.0);
        assert_eq!(json["errors"], 10);
        assert_eq!(json["errors_by_status"], json!({"429": 2, "503": 7}));
        // 3 significant digits: the largest value equivalent to 250 ms at that precision.
        assert_eq!(json["place_max_ms"], 250.111);
        assert_eq!(json["confirm_p50_ms"], Value::Null, "no confirmation measured: null, not 0");
        assert_eq!(json["behind_max_ms"], Value::Null);
        // One line, so it can be the last line of stdout.
        assert!(!json.to_string().contains('\n'));
    }

    #[test]
    fn table_shows_rates_percentiles_errors_and_notes() {
        let mut s = summary(Mode::Open { rate: 2000.0 });
        s.dropped = 5;
        s.scheduled = Some(40_015);
        s.behind = Percentiles::of(&histogram(&[100, 200, 30_000]));
        s.poll_wait = Percentiles::of(&histogram(&[10, 20, 45_000]));
        let table = s.table();
        assert!(table.contains("open loop, 2000 orders/s"), "{table}");
        assert!(table.contains("placed (202)"), "{table}");
        assert!(table.contains("2000.0"), "{table}");
        assert!(table.contains("dropped by generator"), "{table}");
        assert!(table.contains("scheduled"), "{table}");
        assert!(table.contains("429: 2, 503: 7, transport: 1"), "{table}");
        assert!(table.contains("behind schedule"), "{table}");
        assert!(table.contains("fell behind its schedule"), "{table}");
        assert!(table.contains("raise --customers"), "{table}");
        assert!(table.contains("upper bound"), "{table}");
        assert!(table.contains("waited for one of the 64 pollers (p99 45.0 ms)"), "{table}");
        assert!(table.contains("waited for a poller p50 0.02 ms, p99 45.0 ms"), "{table}");
        let place_line = table.lines().find(|l| l.trim_start().starts_with("place (")).unwrap();
        assert!(place_line.contains(" 5.0") && place_line.contains(" 250.1 "), "{place_line}");
        let confirm_line = table.lines().find(|l| l.trim_start().starts_with("confirm (")).unwrap();
        assert!(confirm_line.contains(" - "), "{confirm_line}");

        let closed = summary(Mode::Closed { concurrency: 64 }).table();
        assert!(!closed.contains("behind schedule"), "{closed}");
        assert!(closed.contains("closed loop: a worker waits"), "{closed}");
    }

    #[test]
    fn batched_waits_are_named_in_the_note_and_the_json() {
        let mut s = summary(Mode::Closed { concurrency: 64 });
        s.polling = Polling::Batched { wait: Duration::from_secs(5) };
        s.pollers = 8;
        let table = s.table();
        assert!(table.contains("batched waits (POST /v1/orders/wait"), "{table}");
        assert!(table.contains("wait_ms=5000, at most 8 in flight"), "{table}");
        let json = s.json();
        assert_eq!(json["confirm_by"], "batched_wait");
        assert_eq!(json["long_poll_wait_ms"], 5000.0);
    }
}

//! `ordermesh bench`: a load generator written for this API.
//!
//! It mints its own tokens (one admin, `--customers` customers) with the server's key
//! configuration, seeds `--skus` skus (`bench-sku-0..`) with ample stock, then places
//! one-line `tok_visa` orders for `--duration`, spread over the customers so per-subject
//! rate limits do not shape the figure:
//!
//! - **open loop** (`--rate N`): order `i` is due `i / N` seconds after the start, whatever
//!   happened before. Place latency counts from that intended time, so a server that queues
//!   cannot hide it by slowing the generator down (no coordinated omission); how late the
//!   generator itself started each send is reported as "behind schedule". At most
//!   `--max-in-flight` POSTs are outstanding; a send due beyond that is dropped and counted.
//! - **closed loop** (`--concurrency N`, the default with 64): N workers each place orders
//!   back to back. This measures throughput; its latencies are those of a load that backs
//!   off when the server slows.
//!
//! Two latencies per order: `POST /v1/orders` until its `202`, and that `202` until the
//! order is `confirmed`, observed by batched waits, `POST /v1/orders/wait` naming up to 64
//! open orders, that the server answers as soon as one of them ends (late by one response's
//! trip; one request for many orders). `--long-poll` follows each order with its own long
//! poll, `GET /v1/orders/{id}?wait_ms=5000` (one request per order). `--poll` observes it by
//! plain polling (first after 2 ms, then 1.5x longer intervals up to 20 ms), as a client of a
//! server without long polls would: an upper bound, late by up to one poll interval, and
//! several requests per order. At most `--pollers` of them are in flight. After `--duration`, the run waits up to `--grace`
//! for outstanding confirmations; orders still not terminal then are `unconfirmed`.
//!
//! `--warmup D` first sends the same load for `D` and counts none of it: a freshly started
//! server grows its memory and the generator opens its connections in the first seconds, and
//! an open loop near capacity queues behind that for seconds (4,500 orders/s on the 2-core
//! machine: p50 130 ms in the first second, 3 ms from the fourth on). The report says how
//! long the warm-up was and what it placed.

mod http;
mod load;
mod report;
mod schedule;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ordermesh_gateway::auth::{Authenticator, Role};
use reqwest::Url;

use crate::wiring::mint;

/// File in a dev data dir holding the generated HS256 secret (as `wiring` writes it).
/// Most customers (tokens are minted up front) and skus (each is seeded with one PUT).
const MAX_CUSTOMERS: u32 = 1_000_000;
const MAX_SKUS: u32 = 100_000;
const MAX_RATE: f64 = 1_000_000.0;
const MAX_GRACE: Duration = Duration::from_secs(600);
const MAX_WARMUP: Duration = Duration::from_secs(3600);
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_CONCURRENCY: u32 = 64;
/// Subjects each batched waiter waits as, in turn (see `run`).
const WATCHER_SUBJECTS_PER_WAITER: usize = 4;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Base URL of the gateway, e.g. http://127.0.0.1:8080 (plain HTTP). Several (repeated or
    /// comma-separated: the gateways of a cluster) take the orders in turn, as a load balancer
    /// would; each order's status is read through the gateway that placed it.
    #[arg(long, value_name = "URL", required = true, value_delimiter = ',')]
    target: Vec<String>,
    /// How long to send orders (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Send the same load this long first and count none of it, so the figures are those of a
    /// warm server and generator (memory grown, connections open) rather than of their start.
    /// The measured window starts once the warm-up's orders have ended (within --grace).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Open loop: place N orders per second on a fixed schedule; latency counts from each
    /// order's intended send time.
    #[arg(long, value_name = "N", conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop: N workers each placing orders back to back [default: 64].
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// Customers to spread orders over (one minted token each).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    customers: u32,
    /// Skus to seed and order from (bench-sku-0..), with ample stock at 100 cents.
    #[arg(long, value_name = "N", default_value_t = 100)]
    skus: u32,
    /// Also print the summary as one JSON object, the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Data directory of a `dev` server whose generated key to use [default: ./data/dev].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Most order requests in flight at once; in the open loop, a send due beyond it is
    /// dropped and counted instead of queued.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_in_flight: u32,
    /// Most status requests in flight at once [default: 8 batched waits, 1024 with --long-poll,
    /// 64 with --poll].
    #[arg(long, value_name = "N")]
    pollers: Option<u32>,
    /// Observe confirmations by polling every few ms instead of batched waits.
    #[arg(long, conflicts_with = "long_poll")]
    poll: bool,
    /// Observe confirmations by one long poll per order instead of batched waits.
    #[arg(long)]
    long_poll: bool,
    /// After --duration, how long to wait for outstanding confirmations.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Timeout of one HTTP request.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Payment token of every order (see the contract's test tokens); `tok_timeout` keeps
    /// orders in flight until the payment deadline, e.g. to measure memory per live order.
    #[arg(long, value_name = "TOKEN", default_value = "tok_visa")]
    payment_token: String,
}

/// Open or closed loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Open { rate: f64 },
    Closed { concurrency: u32 },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Open { rate } => write!(f, "open loop, {rate} orders/s"),
            Mode::Closed { concurrency } => write!(f, "closed loop, concurrency {concurrency}"),
        }
    }
}

/// Validated arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Base URLs (at least one), each path ending in `/` so `v1/orders` joins under it.
    pub targets: Vec<Url>,
    pub duration: Duration,
    /// Load sent first and not counted (0: none).
    pub warmup: Duration,
    pub mode: Mode,
    pub customers: u32,
    pub skus: u32,
    pub max_in_flight: u32,
    pub pollers: u32,
    /// Plain polling instead of batched waits.
    pub poll: bool,
    /// One long poll per order instead of batched waits.
    pub long_poll: bool,
    pub grace: Duration,
    pub timeout: Duration,
    pub json: bool,
    pub payment_token: String,
}

impl Plan {
    /// Batched waiters: `--pollers`, but at least one per target; none with `--poll` or
    /// `--long-poll`.
    pub fn batched_waiters(&self) -> usize {
        if self.poll || self.long_poll { 0 } else { (self.pollers as usize).max(self.targets.len()) }
    }
}

impl BenchArgs {
    /// Checks every argument; the error names the flag.
    pub fn plan(&self) -> Result<Plan, String> {
        // At least one: clap requires the flag.
        let targets = self.target.iter().map(|raw| parse_target(raw)).collect::<Result<Vec<_>, _>>()?;
        if !self.payment_token.starts_with("tok_") || self.payment_token.len() > 64 {
            return Err(format!("--payment-token must be a test token like tok_visa, not {:?}", self.payment_token));
        }
        if self.duration.is_zero() {
            return Err("--duration must be greater than 0".into());
        }
        if self.duration > MAX_DURATION {
            return Err(format!("--duration must be at most {}", humantime::format_duration(MAX_DURATION)));
        }
        if self.warmup > MAX_WARMUP {
            return Err(format!("--warmup must be at most {}", humantime::format_duration(MAX_WARMUP)));
        }
        if self.max_in_flight == 0 {
            return Err("--max-in-flight must be at least 1".into());
        }
        let mode = match (self.rate, self.concurrency) {
            (Some(_), Some(_)) => return Err("--rate (open loop) and --concurrency (closed loop) are exclusive".into()),
            (Some(rate), None) => {
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(format!("--rate must be a number of orders per second greater than 0 (got {rate})"));
                }
                if rate > MAX_RATE {
                    return Err(format!("--rate must be at most {MAX_RATE} (got {rate})"));
                }
                Mode::Open { rate }
            }
            (None, concurrency) => {
                let concurrency = concurrency.unwrap_or(DEFAULT_CONCURRENCY);
                if concurrency == 0 {
                    return Err("--concurrency must be at least 1".into());
                }
                if concurrency > self.max_in_flight {
                    return Err(format!(
                        "--concurrency ({concurrency}) must not exceed --max-in-flight ({})",
                        self.max_in_flight
                    ));
                }
                Mode::Closed { concurrency }
            }
        };
        if !(1..=MAX_CUSTOMERS).contains(&self.customers) {
            return Err(format!("--customers must be between 1 and {MAX_CUSTOMERS} (got {})", self.customers));
        }
        if !(1..=MAX_SKUS).contains(&self.skus) {
            return Err(format!("--skus must be between 1 and {MAX_SKUS} (got {})", self.skus));
        }
        let pollers = self.pollers.unwrap_or(match (self.poll, self.long_poll) {
            (true, _) => 64,
            (false, true) => 1024,
            (false, false) => 8,
        });
        if pollers == 0 {
            return Err("--pollers must be at least 1".into());
        }
        if self.grace > MAX_GRACE {
            return Err(format!("--grace must be at most {}", humantime::format_duration(MAX_GRACE)));
        }
        if self.timeout.is_zero() {
            return Err("--timeout must be greater than 0".into());
        }
        Ok(Plan {
            targets,
            duration: self.duration,
            warmup: self.warmup,
            mode,
            customers: self.customers,
            skus: self.skus,
            max_in_flight: self.max_in_flight,
            pollers,
            poll: self.poll,
            long_poll: self.long_poll,
            grace: self.grace,
            timeout: self.timeout,
            json: self.json,
            payment_token: self.payment_token.clone(),
        })
    }
}

/// An `http://` base URL, normalized to end in `/`.
fn parse_target(raw: &str) -> Result<Url, String> {
    if !raw.contains("://") {
        return Err(format!("--target `{raw}` has no scheme: did you mean http://{raw} ?"));
    }
    let mut url = Url::parse(raw).map_err(|err| format!("--target `{raw}` is not a URL: {err}"))?;
    match url.scheme() {
        "http" => {}
        "https" => return Err("--target: https is not supported, the bench speaks plain HTTP only".into()),
        other => return Err(format!("--target `{raw}`: unsupported scheme `{other}`, expected http")),
    }
    if url.host().is_none() {
        return Err(format!("--target `{raw}` has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("--target `{raw}` must be a base URL, without query or fragment"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

pub fn run(config_file: Option<&Path>, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = args.plan().map_err(anyhow::Error::msg)?;
    let authenticator = signing_key(config_file, args.data_dir)?;
    // Valid for the whole run whatever happens, not much longer.
    let ttl = plan.warmup + plan.duration + 2 * plan.grace + Duration::from_secs(600);
    let admin = mint(&authenticator, "bench-admin", Role::Admin, ttl)?;
    // Batched waits name many customers' orders, so they are an admin's. Each waiter waits as
    // several subjects in turn: near 4,000 orders/s a wait ends every few milliseconds, and one
    // subject per waiter met the per-subject rate limit (200/s by default) and got 429s.
    let watchers = (0..plan.batched_waiters() * WATCHER_SUBJECTS_PER_WAITER)
        .map(|i| mint(&authenticator, &format!("bench-watcher-{i}"), Role::Admin, ttl))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let customers = (0..plan.customers)
        .map(|i| mint(&authenticator, &format!("bench-customer-{i}"), Role::Customer, ttl))
        .collect::<anyhow::Result<Vec<_>>>()?;
    warn_if_few_file_descriptors(&plan);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    let summary = runtime.block_on(load::run(&plan, &admin, &watchers, &customers))?;
    // Outstanding tasks (a poll past the grace period) are not waited for.
    runtime.shutdown_background();

    print!("{}", summary.table());
    if plan.json {
        println!("{}", summary.json());
    }
    if summary.placed == 0 {
        anyhow::bail!("no order was accepted (see the errors above)");
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's key, through the same layers as every command (see
/// [`crate::wiring::client_authenticator`]).
fn signing_key(config_file: Option<&Path>, data_dir: Option<PathBuf>) -> anyhow::Result<Authenticator> {
    crate::wiring::client_authenticator(config_file, data_dir)
}

/// Every connection is a file descriptor; say so before the run rather than as a wall of
/// transport errors in it. Linux only (reads `/proc/self/limits`).
fn warn_if_few_file_descriptors(plan: &Plan) {
    let connections = match plan.mode {
        Mode::Open { .. } => plan.max_in_flight,
        Mode::Closed { concurrency } => concurrency,
    } + plan.pollers;
    let Some(limit) = open_files_limit() else { return };
    let needed = u64::from(connections) + 64;
    if needed > limit {
        eprintln!(
            "warning: up to {connections} connections may be open but only {limit} files may be (ulimit -n): \
             raise the limit or lower --max-in-flight/--concurrency/--pollers"
        );
    }
}

fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<Plan, String> {
        let cli = TestCli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map_err(|err| err.to_string())?;
        cli.args.plan()
    }

    #[test]
    fn defaults_are_a_closed_loop_of_64_for_30s() {
        let plan = parse(&["--target", "http://127.0.0.1:8080"]).unwrap();
        assert_eq!(plan.mode, Mode::Closed { concurrency: 64 });
        assert_eq!(plan.duration, Duration::from_secs(30));
        assert_eq!((plan.customers, plan.skus, plan.max_in_flight), (1000, 100, 4096));
        assert_eq!(plan.grace, Duration::from_secs(10));
        assert_eq!(plan.warmup, Duration::ZERO, "no warm-up unless asked");
        assert_eq!(plan.targets[0].as_str(), "http://127.0.0.1:8080/");
        assert!(!plan.json);
    }

    #[test]
    fn rate_selects_the_open_loop() {
        let plan = parse(&["--target", "http://h:1", "--rate", "2500", "--duration", "15s", "--json"]).unwrap();
        assert_eq!(plan.mode, Mode::Open { rate: 2500.0 });
        assert_eq!(plan.duration, Duration::from_secs(15));
        assert!(plan.json);
        assert_eq!(parse(&["--target", "http://h:1", "--rate", "0.5"]).unwrap().mode, Mode::Open { rate: 0.5 });
    }

    #[test]
    fn rate_and_concurrency_are_exclusive() {
        let err = parse(&["--target", "http://h:1", "--rate", "10", "--concurrency", "4"]).unwrap_err();
        assert!(err.contains("cannot be used with"), "{err}");
    }

    #[test]
    fn bad_rates_are_refused() {
        for rate in ["0", "-5", "NaN", "inf", "2000000"] {
            let err = parse(&["--target", "http://h:1", &format!("--rate={rate}")]).unwrap_err();
            assert!(err.contains("--rate"), "{rate}: {err}");
        }
        let err = parse(&["--target", "http://h:1", "--rate", "fast"]).unwrap_err();
        assert!(err.contains("--rate"), "{err}");
    }

    #[test]
    fn durations_must_be_positive() {
        let err = parse(&["--target", "http://h:1", "--duration", "0s"]).unwrap_err();
        assert!(err.contains("--duration must be greater than 0"), "{err}");
        let err = parse(&["--target", "http://h:1", "--duration", "soon"]).unwrap_err();
        assert!(err.contains("--duration"), "{err}");
        let err = parse(&["--target", "http://h:1", "--timeout", "0s"]).unwrap_err();
        assert!(err.contains("--timeout"), "{err}");
        let err = parse(&["--target", "http://h:1", "--grace", "1h"]).unwrap_err();
        assert!(err.contains("--grace"), "{err}");
        assert!(parse(&["--target", "http://h:1", "--grace", "0s"]).is_ok(), "no grace is allowed");
        assert_eq!(parse(&["--target", "http://h:1", "--warmup", "5s"]).unwrap().warmup, Duration::from_secs(5));
        let err = parse(&["--target", "http://h:1", "--duration", "30days"]).unwrap_err();
        assert!(err.contains("--duration must be at most"), "{err}");
        let err = parse(&["--target", "http://h:1", "--warmup", "2h"]).unwrap_err();
        assert!(err.contains("--warmup"), "{err}");
    }

    #[test]
    fn confirmations_are_followed_by_batched_waits_unless_told_otherwise() {
        let batched = parse(&["--target", "http://h:1"]).unwrap();
        assert_eq!((batched.poll, batched.long_poll, batched.pollers), (false, false, 8));
        let long = parse(&["--target", "http://h:1", "--long-poll"]).unwrap();
        assert_eq!((long.poll, long.long_poll, long.pollers), (false, true, 1024));
        let polls = parse(&["--target", "http://h:1", "--poll"]).unwrap();
        assert_eq!((polls.poll, polls.pollers), (true, 64));
        assert!(parse(&["--target", "http://h:1", "--poll", "--long-poll"]).is_err());
        assert_eq!((batched.batched_waiters(), long.batched_waiters(), polls.batched_waiters()), (8, 0, 0));
        let few = parse(&["--target", "http://a:1,http://b:1,http://c:1", "--pollers", "2"]).unwrap();
        assert_eq!(few.batched_waiters(), 3, "every gateway gets a waiter");
    }

    #[test]
    fn several_targets_repeated_or_comma_separated() {
        let plan = parse(&["--target", "http://a:1,http://b:2", "--target", "http://c:3/"]).unwrap();
        let targets: Vec<&str> = plan.targets.iter().map(Url::as_str).collect();
        assert_eq!(targets, ["http://a:1/", "http://b:2/", "http://c:3/"]);
        let err = parse(&["--target", "http://a:1,b:2"]).unwrap_err();
        assert!(err.contains("b:2"), "{err}");
        assert!(parse(&[]).is_err(), "a target is required");
    }

    #[test]
    fn targets_must_be_plain_http_base_urls() {
        let err = parse(&["--target", "127.0.0.1:8080"]).unwrap_err();
        assert!(err.contains("did you mean http://127.0.0.1:8080"), "{err}");
        let err = parse(&["--target", "https://example.com"]).unwrap_err();
        assert!(err.contains("https is not supported"), "{err}");
        let err = parse(&["--target", "ftp://example.com"]).unwrap_err();
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
        let err = parse(&["--target", "http://"]).unwrap_err();
        assert!(err.contains("--target"), "{err}");
        let err = parse(&["--target", "http://h:1/?x=1"]).unwrap_err();
        assert!(err.contains("without query"), "{err}");
        let with_prefix = parse(&["--target", "http://gw.local:8080/api"]).unwrap();
        assert_eq!(with_prefix.targets[0].join("v1/orders").unwrap().as_str(), "http://gw.local:8080/api/v1/orders");
    }

    #[test]
    fn counts_and_bounds_are_checked() {
        let cases: [(&[&str], &str); 6] = [
            (&["--concurrency", "0"], "--concurrency must be at least 1"),
            (&["--concurrency", "100", "--max-in-flight", "50"], "must not exceed --max-in-flight"),
            (&["--customers", "0"], "--customers"),
            (&["--skus", "0"], "--skus"),
            (&["--pollers", "0"], "--pollers"),
            (&["--max-in-flight", "0", "--rate", "5"], "--max-in-flight"),
        ];
        for (extra, expected) in cases {
            let mut args = vec!["--target", "http://h:1"];
            args.extend_from_slice(extra);
            let err = parse(&args).unwrap_err();
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
    }

    #[test]
    fn modes_read_well() {
        assert_eq!(Mode::Open { rate: 500.0 }.to_string(), "open loop, 500 orders/s");
        assert_eq!(Mode::Open { rate: 0.5 }.to_string(), "open loop, 0.5 orders/s");
        assert_eq!(Mode::Closed { concurrency: 64 }.to_string(), "closed loop, concurrency 64");
    }
}

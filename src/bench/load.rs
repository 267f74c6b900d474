//! The load itself: seeding, sending orders (open or closed loop), following each accepted
//! order to `confirmed`, counting, and the progress display.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use ordermesh_gateway::api::OrderStatus;
use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};

use super::http::{Answer, Gateway};
use super::report::{Percentiles, Polling, Summary, Warmup};
use super::schedule::Schedule;
use super::{Mode, Plan};

/// A long poll asks the server to wait this long for the order to end (then asks again).
pub const LONG_POLL_WAIT: Duration = Duration::from_secs(5);
/// With `--poll`, the first status poll comes this long after the 202...
pub const POLL_FIRST: Duration = Duration::from_millis(2);
/// ...then each interval grows by this factor...
pub const POLL_GROWTH: f64 = 1.5;
/// ...up to this one.
pub const POLL_MAX: Duration = Duration::from_millis(20);

/// Accepted orders followed to confirmation at once; beyond it an order is counted as
/// `untracked` instead of growing the generator's memory without bound (each is a task and
/// a timer, well under a kilobyte).
const MAX_TRACKED: u32 = 65_536;
/// How long confirmations may run past the grace period (a poll already in flight).
const FINAL_SLACK: Duration = Duration::from_secs(1);
/// How often the end of the run checks for outstanding requests.
const WAIT_POLL: Duration = Duration::from_millis(5);

/// Stock seeded per sku: more than any run can order.
const SEED_STOCK: u64 = 1_000_000_000;
const SEED_PRICE_CENTS: u64 = 100;
const SEED_CONCURRENCY: usize = 8;
const SEED_ATTEMPTS: u32 = 5;
pub const SKU_PREFIX: &str = "bench-sku-";
/// Paths of the requests sent through [`Gateway`], under the target's base URL.
const ORDERS_PATH: &str = "v1/orders";
const WAIT_PATH: &str = "v1/orders/wait";

/// A closed-loop worker whose request got no answer at all waits this long, rather than
/// spinning on a refused connection.
const TRANSPORT_BACKOFF: Duration = Duration::from_millis(10);

/// Histograms hold microseconds, up to an hour, to 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// What every sending and polling task shares.
struct Ctx {
    /// What every phase of the run shares.
    clients: Arc<Clients>,
    stats: Stats,
    /// Open loop: POST requests in flight.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// GET polls in flight.
    pollers: Semaphore,
    /// How orders are followed to their end: long polls, or with `--poll` intervals.
    polling: Polling,
    /// Orders being followed to confirmation.
    tracked: Arc<Semaphore>,
    /// Batched waits: per gateway, the accepted orders no waiter holds yet.
    unwatched: Vec<Unwatched>,
    next_order: AtomicU64,
    /// End of the grace period: no polling after it.
    hard_deadline: Instant,
}

struct Stats {
    sent: AtomicU64,
    placed: AtomicU64,
    confirmed: AtomicU64,
    cancelled: AtomicU64,
    untracked: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    transport_errors: AtomicU64,
    bad_responses: AtomicU64,
    errors_by_status: Mutex<BTreeMap<u16, u64>>,
    polls: AtomicU64,
    poll_transport_errors: AtomicU64,
    poll_errors_by_status: Mutex<BTreeMap<u16, u64>>,
    place: Mutex<Histogram<u64>>,
    confirm: Mutex<Histogram<u64>>,
    behind: Mutex<Histogram<u64>>,
    /// How long each poll waited for one of the `--pollers` slots.
    poll_wait: Mutex<Histogram<u64>>,
}

fn histogram() -> Mutex<Histogram<u64>> {
    // Constant, valid bounds: 1 <= low, high >= 2 * low, sigfig <= 5.
    Mutex::new(Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these leaves a counter or histogram, still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn record(histogram: &Mutex<Histogram<u64>>, elapsed: Duration) {
    lock(histogram).saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
}

fn count(by_status: &Mutex<BTreeMap<u16, u64>>, status: StatusCode) {
    *lock(by_status).entry(status.as_u16()).or_default() += 1;
}

impl Stats {
    fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            untracked: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            transport_errors: AtomicU64::new(0),
            bad_responses: AtomicU64::new(0),
            errors_by_status: Mutex::default(),
            polls: AtomicU64::new(0),
            poll_transport_errors: AtomicU64::new(0),
            poll_errors_by_status: Mutex::default(),
            place: histogram(),
            confirm: histogram(),
            behind: histogram(),
            poll_wait: histogram(),
        }
    }
}

/// The id and status of an order, from a 202 or a poll (other fields are ignored, so the
/// generator keeps working when the order body grows).
#[derive(Deserialize)]
struct OrderView {
    id: String,
    status: OrderStatus,
}

/// Accepted orders waiting for a batched-wait waiter (of one gateway).
#[derive(Default)]
struct Unwatched {
    /// Oldest first; orders a waiter brings back still open go to the front.
    orders: Mutex<VecDeque<(Accepted, OwnedSemaphorePermit)>>,
    added: tokio::sync::Notify,
}

/// An order the gateway accepted.
struct Accepted {
    id: String,
    customer: usize,
    /// Index of the gateway that placed it (its status is read there too).
    gateway: usize,
    at: Instant,
}

enum Failure {
    Status,
    Transport,
    BadResponse,
}

/// What the phases of a run share: the clients (so the warm-up's kept-alive connections
/// carry the measured load) and what each request is made of.
struct Clients {
    /// For the per-order polls (`--poll`, `--long-poll`).
    client: Client,
    /// Each target gateway, for orders and batched waits; order `i` goes to `i % len`.
    gateways: Vec<Gateway>,
    /// `.../v1/orders` of each target gateway.
    orders_urls: Vec<Url>,
    /// `Bearer ...` per customer.
    tokens: Vec<HeaderValue>,
    /// The JSON body of an order for each sku.
    bodies: Vec<Bytes>,
    /// `Bearer ...` of the admins the batched waiters wait as (waits name every customer's
    /// orders); waiter `i` of `n` waits as every `n`-th from the `i`-th, in turn.
    watchers: Vec<HeaderValue>,
}

/// Runs the whole benchmark: check the target, seed, warm up (`--warmup`, not counted), then
/// load and wait for confirmations.
pub async fn run(
    plan: &Plan,
    admin_token: &str,
    watcher_tokens: &[String],
    customer_tokens: &[String],
) -> anyhow::Result<Summary> {
    if watcher_tokens.len() < plan.batched_waiters() {
        bail!(
            "{} batched waiters need at least as many watcher tokens, got {}",
            plan.batched_waiters(),
            watcher_tokens.len()
        );
    }
    let client = client(plan)?;
    for target in &plan.targets {
        check_reachable(&client, target).await?;
    }
    // Any gateway reaches every sku's owner.
    seed(&client, &plan.targets[0], admin_token, plan.skus).await?;

    let gateways =
        plan.targets.iter().map(|target| Gateway::new(target, plan.timeout)).collect::<anyhow::Result<Vec<_>>>()?;
    let clients = Arc::new(Clients {
        client,
        gateways,
        orders_urls: join_each(&plan.targets, "v1/orders")?,
        tokens: bearers(customer_tokens)?,
        bodies: (0..plan.skus).map(|sku| Bytes::from(order_body(sku, &plan.payment_token))).collect(),
        watchers: bearers(watcher_tokens)?,
    });
    let warmup = if plan.warmup.is_zero() {
        None
    } else {
        let warmup = phase(plan, &clients, plan.warmup, "warm-up ").await;
        Some(Warmup { duration: plan.warmup, placed: warmup.placed, errors: warmup.errors() })
    };
    // A line for scripts that measure the server over the same window: examples/bench_dev.sh
    // (its CPU time) and examples/instructions_per_order.sh (its instructions) wait for it.
    eprintln!("bench: measured window starts");
    Ok(Summary { warmup, ..phase(plan, &clients, plan.duration, "").await })
}

/// Sends orders for `duration` and follows them until confirmed (or the grace period ends).
async fn phase(plan: &Plan, clients: &Arc<Clients>, duration: Duration, label: &'static str) -> Summary {
    let cpu_before = cpu_time();
    let start = Instant::now();
    let end = start + duration;
    let ctx = Arc::new(Ctx {
        clients: clients.clone(),
        stats: Stats::new(),
        in_flight: Arc::new(Semaphore::new(plan.max_in_flight as usize)),
        max_in_flight: plan.max_in_flight as usize,
        pollers: Semaphore::new(plan.pollers as usize),
        // Waits end within the request timeout, so the server's answer comes before the client
        // gives up.
        polling: match (plan.poll, plan.long_poll) {
            (true, _) => Polling::Intervals { first: POLL_FIRST, max: POLL_MAX, growth: POLL_GROWTH },
            (false, true) => Polling::LongPoll { wait: LONG_POLL_WAIT.min(plan.timeout / 2) },
            (false, false) => Polling::Batched { wait: LONG_POLL_WAIT.min(plan.timeout / 2) },
        },
        tracked: Arc::new(Semaphore::new(MAX_TRACKED as usize)),
        unwatched: plan.targets.iter().map(|_| Unwatched::default()).collect(),
        next_order: AtomicU64::new(0),
        hard_deadline: end + plan.grace,
    });
    let progress = Progress::start(ctx.clone(), start, duration, label);
    let waiters: Vec<JoinHandle<()>> = match ctx.polling {
        Polling::Batched { wait } => {
            let waiters = plan.batched_waiters();
            (0..waiters)
                .map(|i| {
                    let subjects = clients.watchers.iter().skip(i).step_by(waiters).cloned().collect();
                    tokio::spawn(batched_waiter(ctx.clone(), subjects, i % plan.targets.len(), wait))
                })
                .collect()
        }
        _ => Vec::new(),
    };

    match plan.mode {
        Mode::Open { rate } => {
            open_loop(&ctx, Schedule::new(rate, duration), start).await;
            wait_until_none(|| ctx.posts_in_flight(), ctx.hard_deadline).await;
        }
        Mode::Closed { concurrency } => {
            let workers: Vec<JoinHandle<()>> =
                (0..concurrency).map(|_| tokio::spawn(closed_loop_worker(ctx.clone(), end))).collect();
            for worker in workers {
                let _ = timeout_at(ctx.hard_deadline, worker).await;
            }
        }
    }
    // An order holds its tracking slot before it lets go of its POST (or its worker), so
    // none is missed here: every tracker ends confirmed, cancelled or out of time.
    wait_until_none(|| ctx.orders_tracked(), ctx.hard_deadline + FINAL_SLACK).await;
    let elapsed = start.elapsed();
    for waiter in waiters {
        waiter.abort();
    }
    progress.finish().await;

    let cpu = match (cpu_before, cpu_time()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    summarize(plan, &ctx.stats, ctx.polling, duration, elapsed, cpu)
}

/// `Bearer <token>` header values.
fn bearers(tokens: &[String]) -> anyhow::Result<Vec<HeaderValue>> {
    tokens
        .iter()
        .map(|token| HeaderValue::from_str(&format!("Bearer {token}")))
        .collect::<Result<Vec<_>, _>>()
        .context("a minted token is not a valid header value")
}

/// `path` under each target.
fn join_each(targets: &[Url], path: &str) -> anyhow::Result<Vec<Url>> {
    targets.iter().map(|target| target.join(path)).collect::<Result<Vec<_>, _>>().context("cannot build a request URL")
}

/// Waits until `outstanding()` is 0 or `deadline` passes.
async fn wait_until_none(outstanding: impl Fn() -> usize, deadline: Instant) {
    while outstanding() > 0 && Instant::now() < deadline {
        sleep(WAIT_POLL).await;
    }
}

impl Ctx {
    /// POSTs in flight (open loop; permits are only ever tried, never waited for).
    fn posts_in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Orders being followed to confirmation.
    fn orders_tracked(&self) -> usize {
        MAX_TRACKED as usize - self.tracked.available_permits()
    }

    /// A tracking slot for an accepted order, or `None` (counted as untracked) when
    /// `MAX_TRACKED` orders are being followed already.
    fn tracking_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.tracked.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.stats.untracked.fetch_add(1, Relaxed);
        }
        slot
    }
}

fn summarize(
    plan: &Plan,
    stats: &Stats,
    polling: Polling,
    duration: Duration,
    elapsed: Duration,
    generator_cpu: Option<Duration>,
) -> Summary {
    Summary {
        target: plan.targets.iter().map(Url::as_str).collect::<Vec<_>>().join(","),
        mode: plan.mode,
        duration,
        warmup: None,
        elapsed,
        customers: plan.customers,
        skus: plan.skus,
        pollers: plan.pollers,
        max_in_flight: plan.max_in_flight,
        polling,
        scheduled: match plan.mode {
            Mode::Open { rate } => Some(Schedule::new(rate, duration).sends()),
            Mode::Closed { .. } => None,
        },
        sent: stats.sent.load(Relaxed),
        placed: stats.placed.load(Relaxed),
        confirmed: stats.confirmed.load(Relaxed),
        cancelled: stats.cancelled.load(Relaxed),
        untracked: stats.untracked.load(Relaxed),
        dropped: stats.dropped.load(Relaxed),
        errors_by_status: lock(&stats.errors_by_status).clone(),
        transport_errors: stats.transport_errors.load(Relaxed),
        bad_responses: stats.bad_responses.load(Relaxed),
        polls: stats.polls.load(Relaxed),
        poll_errors_by_status: lock(&stats.poll_errors_by_status).clone(),
        poll_transport_errors: stats.poll_transport_errors.load(Relaxed),
        place: Percentiles::of(&lock(&stats.place)),
        confirm: Percentiles::of(&lock(&stats.confirm)),
        behind: match plan.mode {
            Mode::Open { .. } => Percentiles::of(&lock(&stats.behind)),
            Mode::Closed { .. } => None,
        },
        poll_wait: Percentiles::of(&lock(&stats.poll_wait)),
        generator_cpu,
    }
}

/// The HTTP/1.1 client of everything but orders and batched waits (those go through
/// [`Gateway`]): seeding, the reachability check and the per-order polls. Keep-alive
/// connections, as many kept idle as can be busy at once, no proxy (a benchmark measures the
/// target, not a proxy on the way).
fn client(plan: &Plan) -> anyhow::Result<Client> {
    Client::builder()
        .http1_only()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(plan.pollers as usize + SEED_CONCURRENCY)
        .timeout(plan.timeout)
        .connect_timeout(plan.timeout.min(Duration::from_secs(5)))
        .build()
        .context("cannot build the HTTP client")
}

/// `GET /livez` first, so an unreachable or wrong target is one clear error.
async fn check_reachable(client: &Client, target: &Url) -> anyhow::Result<()> {
    let url = target.join("livez").context("cannot build the /livez URL")?;
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|err| anyhow::anyhow!("cannot reach the gateway at {target}: {}", error_chain(&err)))?;
    let status = response.status();
    if status != StatusCode::OK {
        bail!("{url} answered {status}: is {target} an ordermesh gateway?");
    }
    Ok(())
}

/// reqwest's own message is often just "error sending request"; the cause is in the chain.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub fn sku_name(i: u32) -> String {
    format!("{SKU_PREFIX}{i}")
}

fn order_body(sku: u32, payment_token: &str) -> String {
    serde_json::json!({
        "items": [{"sku": sku_name(sku), "quantity": 1}],
        "payment_token": payment_token,
    })
    .to_string()
}

/// `PUT /v1/inventory/bench-sku-{i}` for every sku, a few at a time, with ample stock.
async fn seed(client: &Client, target: &Url, admin_token: &str, skus: u32) -> anyhow::Result<()> {
    let auth = HeaderValue::from_str(&format!("Bearer {admin_token}")).context("the admin token is not a header")?;
    let gate = Arc::new(Semaphore::new(SEED_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..skus {
        let url = target.join(&format!("v1/inventory/{}", sku_name(i))).context("cannot build an inventory URL")?;
        let (client, auth, gate) = (client.clone(), auth.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            seed_one(&client, url, auth).await
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("a seeding task failed")??;
    }
    Ok(())
}

async fn seed_one(client: &Client, url: Url, auth: HeaderValue) -> anyhow::Result<()> {
    let body = serde_json::json!({"available": SEED_STOCK, "price_cents": SEED_PRICE_CENTS});
    let mut attempt = 1;
    loop {
        let response = client
            .put(url.clone())
            .header(AUTHORIZATION, auth.clone())
            .json(&body)
            .send()
            .await
            .map_err(|err| anyhow::anyhow!("seeding: PUT {url}: {}", error_chain(&err)))?;
        let status = response.status();
        if status.is_success() {
            let _ = response.bytes().await;
            return Ok(());
        }
        let retryable = status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
        if retryable && attempt < SEED_ATTEMPTS {
            let wait = retry_after(response.headers().get(RETRY_AFTER)).unwrap_or(Duration::from_secs(1));
            let _ = response.bytes().await;
            sleep(wait.min(Duration::from_secs(5))).await;
            attempt += 1;
            continue;
        }
        let hint = match status {
            StatusCode::UNAUTHORIZED => {
                " (the gateway refused the admin token the bench minted: give bench the server's key, \
                 with --config, ORDERMESH_JWT_SECRET or the dev server's --data-dir)"
            }
            StatusCode::FORBIDDEN => " (the minted admin token lacks the admin role on this gateway)",
            _ => "",
        };
        let detail = response.text().await.unwrap_or_default();
        let detail: String = detail.chars().take(300).collect();
        bail!("seeding: PUT {url} answered {status}{hint}: {detail}");
    }
}

fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Sends on the schedule, each order in its own task, never waiting for answers. When
/// `max_in_flight` POSTs are outstanding, a due send is dropped (and counted), not queued.
async fn open_loop(ctx: &Arc<Ctx>, schedule: Schedule, start: Instant) {
    let mut i = 0;
    while let Some(offset) = schedule.offset(i) {
        let intended = start + offset;
        if intended > Instant::now() {
            sleep_until(intended).await;
        }
        match ctx.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    record(&ctx.stats.behind, Instant::now().saturating_duration_since(intended));
                    let placed = place(&ctx, i, intended).await;
                    let slot = placed.as_ref().ok().and_then(|_| ctx.tracking_slot());
                    drop(permit);
                    if let (Ok(order), Some(slot)) = (placed, slot) {
                        follow(&ctx, order, slot).await;
                    }
                });
            }
            Err(_) => {
                ctx.stats.dropped.fetch_add(1, Relaxed);
            }
        }
        i += 1;
    }
}

/// Places orders back to back until `end`; confirmations are followed in the background,
/// so the next order does not wait for the last one's saga.
async fn closed_loop_worker(ctx: Arc<Ctx>, end: Instant) {
    while Instant::now() < end {
        let i = ctx.next_order.fetch_add(1, Relaxed);
        match place(&ctx, i, Instant::now()).await {
            Ok(order) => {
                if let Some(slot) = ctx.tracking_slot() {
                    match ctx.polling {
                        Polling::Batched { .. } => ctx.hand_to_waiters(order, slot),
                        _ => {
                            let ctx = ctx.clone();
                            tokio::spawn(async move { track(&ctx, order, slot).await });
                        }
                    }
                }
            }
            Err(Failure::Transport) => sleep(TRANSPORT_BACKOFF).await,
            Err(Failure::Status | Failure::BadResponse) => {}
        }
    }
}

/// `POST /v1/orders` for order number `i`; latency counts from `intended`.
async fn place(ctx: &Ctx, i: u64, intended: Instant) -> Result<Accepted, Failure> {
    let clients = &ctx.clients;
    let customer = (i % clients.tokens.len() as u64) as usize;
    let gateway = (i % clients.gateways.len() as u64) as usize;
    let sku = rand::random_range(0..clients.bodies.len());
    ctx.stats.sent.fetch_add(1, Relaxed);
    let sent =
        clients.gateways[gateway].post_json(ORDERS_PATH, &clients.tokens[customer], clients.bodies[sku].clone()).await;
    let Ok(Answer { status, body }) = sent else {
        ctx.stats.transport_errors.fetch_add(1, Relaxed);
        ctx.stats.errors.fetch_add(1, Relaxed);
        return Err(Failure::Transport);
    };
    let answered = Instant::now();
    if status != StatusCode::ACCEPTED {
        count(&ctx.stats.errors_by_status, status);
        ctx.stats.errors.fetch_add(1, Relaxed);
        return Err(Failure::Status);
    }
    let Ok(order) = serde_json::from_slice::<OrderView>(&body) else {
        ctx.stats.bad_responses.fetch_add(1, Relaxed);
        ctx.stats.errors.fetch_add(1, Relaxed);
        return Err(Failure::BadResponse);
    };
    record(&ctx.stats.place, answered.saturating_duration_since(intended));
    ctx.stats.placed.fetch_add(1, Relaxed);
    Ok(Accepted { id: order.id, customer, gateway, at: answered })
}

/// Follows an accepted order to its end: hands it to the batched waiters, or follows it in
/// this task.
async fn follow(ctx: &Ctx, order: Accepted, slot: OwnedSemaphorePermit) {
    match ctx.polling {
        Polling::Batched { .. } => ctx.hand_to_waiters(order, slot),
        _ => track(ctx, order, slot).await,
    }
}

impl Ctx {
    fn hand_to_waiters(&self, order: Accepted, slot: OwnedSemaphorePermit) {
        let unwatched = &self.unwatched[order.gateway];
        lock(&unwatched.orders).push_back((order, slot));
        unwatched.added.notify_one();
    }
}

/// The answer to `POST /v1/orders/wait` (fields the bench does not use are ignored).
#[derive(Deserialize)]
struct WaitedView {
    orders: Vec<OrderView>,
    not_found: Vec<String>,
}

/// Most orders one wait names (the server takes 1,000): every answer sends the still-open ones
/// again, so smaller batches over several waiters cost the server less than one large one.
const MAX_WAIT_IDS: usize = 64;

/// One batched waiter of `gateway`: takes the orders no waiter holds, waits until one of them
/// ends, counts those that ended and puts the rest back, until the grace period is over.
async fn batched_waiter(ctx: Arc<Ctx>, subjects: Vec<HeaderValue>, gateway: usize, wait: Duration) {
    let unwatched = &ctx.unwatched[gateway];
    // The subjects take turns (see `WATCHER_SUBJECTS_PER_WAITER`).
    let mut turn = 0;
    loop {
        // The oldest first: taking the newest would leave the oldest waiting for a free waiter.
        let batch: Vec<(Accepted, OwnedSemaphorePermit)> = {
            let mut orders = lock(&unwatched.orders);
            let take = orders.len().min(MAX_WAIT_IDS);
            orders.drain(..take).collect()
        };
        if batch.is_empty() {
            if timeout_at(ctx.hard_deadline, unwatched.added.notified()).await.is_err() {
                break;
            }
            continue;
        }
        let left = ctx.hard_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ids: Vec<&str> = batch.iter().map(|(order, _)| order.id.as_str()).collect();
        let body = serde_json::json!({"ids": ids, "wait_ms": wait.min(left).as_millis() as u64});
        ctx.stats.polls.fetch_add(1, Relaxed);
        let subject = &subjects[turn % subjects.len()];
        turn += 1;
        let answer = wait_for_any(&ctx.clients.gateways[gateway], subject, &body).await;
        let mut open = Vec::new();
        match answer {
            Ok(waited) => {
                let ended: std::collections::HashMap<&str, OrderStatus> =
                    waited.orders.iter().map(|o| (o.id.as_str(), o.status)).collect();
                for (order, slot) in batch {
                    match ended.get(order.id.as_str()) {
                        Some(OrderStatus::Confirmed) => {
                            record(&ctx.stats.confirm, order.at.elapsed());
                            ctx.stats.confirmed.fetch_add(1, Relaxed);
                        }
                        Some(OrderStatus::Cancelled) => {
                            ctx.stats.cancelled.fetch_add(1, Relaxed);
                        }
                        _ if waited.not_found.contains(&order.id) => {
                            count(&ctx.stats.poll_errors_by_status, StatusCode::NOT_FOUND);
                        }
                        _ => open.push((order, slot)),
                    }
                }
            }
            Err(status) => {
                match status {
                    Some(status) => count(&ctx.stats.poll_errors_by_status, status),
                    None => {
                        ctx.stats.poll_transport_errors.fetch_add(1, Relaxed);
                    }
                }
                open = batch;
                sleep(POLL_MAX).await; // no tight loop of errors
            }
        }
        if !open.is_empty() {
            let mut orders = lock(&unwatched.orders);
            for order in open.into_iter().rev() {
                orders.push_front(order);
            }
            unwatched.added.notify_one();
        }
    }
    // Out of time: what is still unwatched gives back its tracking slot (unconfirmed).
    lock(&unwatched.orders).clear();
}

/// One `POST /v1/orders/wait`: the ended orders, or the error status (`None`: no HTTP answer or
/// an unreadable one).
async fn wait_for_any(
    gateway: &Gateway,
    token: &HeaderValue,
    body: &serde_json::Value,
) -> Result<WaitedView, Option<StatusCode>> {
    let body = Bytes::from(serde_json::to_vec(body).map_err(|_| None)?);
    let Answer { status, body } = gateway.post_json(WAIT_PATH, token, body).await.map_err(|_| None)?;
    if status != StatusCode::OK {
        return Err(Some(status));
    }
    serde_json::from_slice(&body).map_err(|_| Some(status))
}

/// Follows an order until it is confirmed or cancelled, or the grace period is over (then it
/// counts as unconfirmed): by long polls (`GET /v1/orders/{id}?wait_ms=`, each answered when
/// the order ends or the wait runs out), or with `--poll` by plain polls (2 ms, then 1.5x
/// longer intervals up to 20 ms). At most `pollers` requests are in flight. The confirm
/// latency is taken when the answer that shows `confirmed` arrives: late by the wait for a
/// poller slot (reported as `poll_wait`), one trip, and with `--poll` up to one interval.
async fn track(ctx: &Ctx, order: Accepted, _slot: OwnedSemaphorePermit) {
    let base = format!("{}/{}", ctx.clients.orders_urls[order.gateway], order.id);
    let token = &ctx.clients.tokens[order.customer];
    let mut interval = POLL_FIRST;
    loop {
        if Instant::now() >= ctx.hard_deadline {
            return;
        }
        let url = match ctx.polling {
            Polling::Intervals { .. } => {
                sleep_until((Instant::now() + interval).min(ctx.hard_deadline)).await;
                base.clone()
            }
            // Batched orders are never tracked one by one (see `follow`).
            Polling::LongPoll { wait } | Polling::Batched { wait } => {
                let left = ctx.hard_deadline.saturating_duration_since(Instant::now());
                format!("{base}?wait_ms={}", wait.min(left).as_millis())
            }
        };
        let queued = Instant::now();
        let Ok(Ok(_poller)) = timeout_at(ctx.hard_deadline, ctx.pollers.acquire()).await else {
            return;
        };
        record(&ctx.stats.poll_wait, queued.elapsed());
        ctx.stats.polls.fetch_add(1, Relaxed);
        match poll(ctx, &url, token).await {
            Ok(OrderStatus::Confirmed) => {
                record(&ctx.stats.confirm, order.at.elapsed());
                ctx.stats.confirmed.fetch_add(1, Relaxed);
                return;
            }
            Ok(OrderStatus::Cancelled) => {
                ctx.stats.cancelled.fetch_add(1, Relaxed);
                return;
            }
            Ok(OrderStatus::Pending | OrderStatus::Reserved | OrderStatus::Paid) => {}
            Err(Some(status)) => {
                count(&ctx.stats.poll_errors_by_status, status);
                sleep(POLL_MAX).await; // no tight loop of errors
            }
            Err(None) => {
                ctx.stats.poll_transport_errors.fetch_add(1, Relaxed);
                sleep(POLL_MAX).await;
            }
        }
        interval = interval.mul_f64(POLL_GROWTH).min(POLL_MAX);
    }
}

/// The order's status, or the error status (`None`: no HTTP answer or an unreadable one).
async fn poll(ctx: &Ctx, url: &str, token: &HeaderValue) -> Result<OrderStatus, Option<StatusCode>> {
    let response = ctx.clients.client.get(url).header(AUTHORIZATION, token.clone()).send().await.map_err(|_| None)?;
    let status = response.status();
    let body = response.bytes().await.map_err(|_| None)?;
    if status != StatusCode::OK {
        return Err(Some(status));
    }
    serde_json::from_slice::<OrderView>(&body).map(|order| order.status).map_err(|_| Some(status))
}

/// CPU time of this process (user + system), from `/proc/self/stat` on Linux.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The live line on stderr: an indicatif bar on a terminal, a plain line every few seconds
/// otherwise (CI logs).
struct Progress {
    bar: ProgressBar,
    task: JoinHandle<()>,
}

const PROGRESS_TICK: Duration = Duration::from_millis(250);
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);
const RATE_WINDOW: Duration = Duration::from_secs(1);

impl Progress {
    /// `label` goes before each progress line (`"warm-up "` while warming up).
    fn start(ctx: Arc<Ctx>, start: Instant, duration: Duration, label: &'static str) -> Self {
        let bar = ProgressBar::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        let style = ProgressStyle::with_template("{spinner} [{bar:24}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
            let mut last_plain = start;
            let mut ticker = tokio::time::interval(PROGRESS_TICK);
            loop {
                ticker.tick().await;
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(start);
                let placed = ctx.stats.placed.load(Relaxed);
                samples.push_back((now, placed));
                while samples.len() > 1 && samples.front().is_some_and(|(at, _)| now - *at > RATE_WINDOW) {
                    samples.pop_front();
                }
                let rate = match samples.front() {
                    Some((at, before)) if now > *at => (placed - before) as f64 / (now - *at).as_secs_f64(),
                    _ => 0.0,
                };
                let outstanding = ctx.orders_tracked();
                let line = label.to_owned()
                    + &progress_line(
                        elapsed,
                        duration,
                        placed,
                        ctx.stats.confirmed.load(Relaxed),
                        ctx.stats.errors.load(Relaxed),
                        rate,
                        outstanding,
                    );
                shown.set_position(u64::try_from(elapsed.min(duration).as_millis()).unwrap_or(u64::MAX));
                if shown.is_hidden() {
                    if now - last_plain >= PLAIN_PROGRESS_EVERY {
                        eprintln!("bench: {line}");
                        last_plain = now;
                    }
                } else {
                    shown.set_message(line);
                    shown.tick();
                }
            }
        });
        Self { bar, task }
    }

    async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        self.bar.finish_and_clear();
    }
}

/// `12.0s/20s  placed 24123  confirmed 24000  errors 0  2010/s`, then the wait for
/// confirmations once the sending window is over.
pub fn progress_line(
    elapsed: Duration,
    duration: Duration,
    placed: u64,
    confirmed: u64,
    errors: u64,
    rate: f64,
    outstanding: usize,
) -> String {
    let counts = format!("placed {placed}  confirmed {confirmed}  errors {errors}");
    if elapsed < duration {
        format!("{:.1}s/{}s  {counts}  {rate:.0}/s", elapsed.as_secs_f64(), duration.as_secs_f64())
    } else {
        format!("{:.1}s  {counts}  waiting for {outstanding} confirmations", elapsed.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_counts_and_rate_then_the_wait() {
        let during =
            progress_line(Duration::from_millis(12_000), Duration::from_secs(20), 24_123, 24_000, 3, 2010.4, 9);
        assert_eq!(during, "12.0s/20s  placed 24123  confirmed 24000  errors 3  2010/s");
        let after = progress_line(Duration::from_millis(20_500), Duration::from_secs(20), 40_000, 39_990, 0, 0.0, 10);
        assert_eq!(after, "20.5s  placed 40000  confirmed 39990  errors 0  waiting for 10 confirmations");
    }

    #[test]
    fn order_bodies_name_bench_skus_and_tok_visa() {
        let body: serde_json::Value = serde_json::from_str(&order_body(7, "tok_visa")).unwrap_or_default();
        assert_eq!(body["items"][0]["sku"], "bench-sku-7");
        assert_eq!(body["items"][0]["quantity"], 1);
        assert_eq!(body["payment_token"], "tok_visa");
    }

    #[test]
    fn retry_after_reads_seconds() {
        assert_eq!(retry_after(Some(&HeaderValue::from_static("2"))), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(Some(&HeaderValue::from_static("soon"))), None);
        assert_eq!(retry_after(None), None);
    }

    #[test]
    fn cpu_time_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(cpu_time().is_some());
        }
    }
}

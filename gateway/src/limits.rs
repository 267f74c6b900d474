//! Keeping the gateway's work bounded: a rate limit per JWT subject, a bound on requests in
//! flight, and a deadline per request. Each turns overload into a fast, explicit answer
//! (429 or 503 with `Retry-After`, 504) instead of an unbounded queue, because the cluster
//! transport below has no backpressure of its own.
//!
//! [`guard`] puts them, after authentication, around every `/v1` route.
//!
//! - **Rate limit**: tower_governor, keyed by the subject that
//!   [`crate::auth::authenticate`] stored in the request, so it must run after that
//!   middleware. tower_governor's `per_second(n)` means *one token every n seconds*; the
//!   period is computed here from requests per second instead.
//! - **In-flight bound and deadline** ([`bound_work`]): a semaphore that is tried, never
//!   waited on (a request over the bound is shed at once with 503), and a timeout around the
//!   handler (504: the outcome is unknown, so clients retry with the same
//!   `Idempotency-Key`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Response;
use axum::middleware::Next;
use axum::response::IntoResponse;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_governor::GovernorError;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;

use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use crate::problem::Problem;

/// How often idle subjects are forgotten by the rate limiter (its map grows by one entry per
/// subject seen otherwise).
const LIMITER_CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// Seconds a shed client is told to wait: capacity frees up as fast as requests finish.
const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;

/// Rate-limit key: the verified JWT subject.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubjectKey;

impl KeyExtractor for SubjectKey {
    type Key = String;

    fn extract<T>(&self, request: &axum::http::Request<T>) -> Result<Self::Key, GovernorError> {
        // Only present after `authenticate`; its absence is a wiring bug, answered as 401
        // by the error handler rather than letting an anonymous request through.
        request
            .extensions()
            .get::<Principal>()
            .map(|principal| principal.subject.clone())
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// Wraps every route of `router` (a router of `/v1` routes) in the guard stack, outermost
/// first: authenticate (401), rate limit by subject (429), in-flight bound (503) and
/// deadline (504). Built here as one function because tower_governor's layer type names a
/// governor type that crate does not re-export; inside one function it is inferred.
pub fn guard<S>(router: Router<S>, authenticator: Arc<Authenticator>, config: &Config) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let rate_limit = {
        let per_second = u64::from(config.rate_limit_per_second.max(1));
        let period = Duration::from_nanos((1_000_000_000 / per_second).max(1));
        let mut builder = GovernorConfigBuilder::default().key_extractor(SubjectKey);
        builder.period(period).burst_size(config.rate_limit_burst.max(1));
        // `finish` refuses only a zero period or burst, both excluded above.
        let governor = Arc::new(builder.finish().expect("rate limit period and burst are non-zero"));
        // Forget subjects whose quota is full again, so the limiter's memory follows the
        // active subjects rather than every subject ever seen. The task ends when the router
        // (and with it the limiter) is dropped; outside a Tokio runtime nothing is spawned.
        let limiter = Arc::downgrade(governor.limiter());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(LIMITER_CLEANUP_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(limiter) = limiter.upgrade() else { return };
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            });
        }
        GovernorLayer::new(governor).error_handler(rate_limit_problem)
    };
    let work = Arc::new(WorkLimits::new(config.max_in_flight, config.request_timeout()));
    router.route_layer(
        ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(authenticator, crate::auth::authenticate))
            .layer(rate_limit)
            .layer(axum::middleware::from_fn_with_state(work, bound_work)),
    )
}

fn rate_limit_problem(err: GovernorError) -> Response<Body> {
    match err {
        GovernorError::TooManyRequests { wait_time, .. } => {
            metrics::counter!("http_rate_limited_total").increment(1);
            // `wait_time` is rounded down to whole seconds; round up so a client that obeys
            // `Retry-After` is not refused again.
            Problem::too_many_requests(wait_time.saturating_add(1)).into_response()
        }
        GovernorError::UnableToExtractKey => {
            Problem::unauthorized("missing bearer token: send `Authorization: Bearer <JWT>`").into_response()
        }
        GovernorError::Other { code, msg, .. } => {
            Problem::new(code, "rate-limit", "Rate limit", msg.unwrap_or_else(|| "rate limiter refused".into()))
                .into_response()
        }
    }
}

/// The bound on requests in flight and their deadline.
#[derive(Debug)]
pub struct WorkLimits {
    /// One permit per request in flight; tried, never awaited.
    in_flight: Arc<Semaphore>,
    /// The same for long polls (`GET ...?wait_ms=N`), which spend their time waiting, not
    /// working: in the common bound, clients waiting for slow orders would crowd out placements.
    waiting: Arc<Semaphore>,
    /// How long a handler may run.
    timeout: Duration,
}

impl WorkLimits {
    /// At most `max_in_flight` requests (at least 1) running at once, and as many long polls
    /// waiting, each for at most `timeout`.
    pub fn new(max_in_flight: usize, timeout: Duration) -> Self {
        let bound = max_in_flight.max(1);
        Self { in_flight: Arc::new(Semaphore::new(bound)), waiting: Arc::new(Semaphore::new(bound)), timeout }
    }
}

/// A request that mostly waits: a `GET` asking to wait (a valid `wait_ms` other than 0,
/// parsed as the handler parses it, so the two cannot disagree), or a batched wait
/// (`POST /v1/orders/wait`).
fn is_long_poll(request: &Request) -> bool {
    match *request.method() {
        axum::http::Method::GET => axum::extract::Query::<crate::api::GetOrderParams>::try_from_uri(request.uri())
            .is_ok_and(|params| params.wait().is_ok_and(|wait| !wait.is_zero())),
        axum::http::Method::POST => request.uri().path() == "/v1/orders/wait",
        _ => false,
    }
}

/// Middleware: sheds a request when `max_in_flight` are already running (503 +
/// `Retry-After`; long polls count in a bound of their own) and answers 504 when the handler
/// overruns the deadline.
pub async fn bound_work(State(limits): State<Arc<WorkLimits>>, request: Request, next: Next) -> Response<Body> {
    let bound = if is_long_poll(&request) { &limits.waiting } else { &limits.in_flight };
    let Ok(_permit) = bound.clone().try_acquire_owned() else {
        metrics::counter!("http_shed_total").increment(1);
        return Problem::unavailable(
            OVERLOAD_RETRY_AFTER_SECS,
            "the gateway is at its limit of requests in flight; retry shortly",
        )
        .into_response();
    };
    match tokio::time::timeout(limits.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_timeouts_total").increment(1);
            tracing::warn!(timeout_ms = limits.timeout.as_millis() as u64, "request deadline passed");
            Problem::gateway_timeout(format!(
                "the request did not complete within {} ms; its outcome is unknown, retry with the same Idempotency-Key",
                limits.timeout.as_millis()
            ))
            .into_response()
        }
    }
}

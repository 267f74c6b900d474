//! Observability of every request: the Prometheus recorder, and [`observe`], the middleware
//! that gives each request a span, a log line, a counter and a latency sample, and that
//! turns any error response not yet in problem+json into one.
//!
//! Metrics are labelled by the *matched route template* (`/v1/orders/{id}`), never the raw
//! path: raw paths would make one time series per order id. Requests that matched no route
//! share the label `unmatched`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, Response, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use crate::problem::{PROBLEM_CONTENT_TYPE, Problem};

/// Upper bounds of the latency buckets of every `*_seconds` histogram, from sub-millisecond
/// reads to the 30 s payment deadline.
const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How often the recorder drains its histogram buffers (its documentation asks for a task
/// that does this; without it histogram memory grows between scrapes).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The `route` label of requests that matched no route.
const UNMATCHED_ROUTE: &str = "unmatched";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process (later calls return the same
/// handle) and spawns its upkeep task.
///
/// `*_seconds` metrics are rendered as histograms with [`SECONDS_BUCKETS`]. If another
/// recorder was installed first (by something outside the gateway), that one stays in charge
/// and the handle renders an empty registry; a warning says so.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let builder = PrometheusBuilder::new();
    let builder = match builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS) {
        Ok(builder) => builder,
        // Only an empty bucket list is refused, and ours is a non-empty constant.
        Err(err) => {
            tracing::warn!(%err, "cannot set histogram buckets; latencies are rendered as summaries");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(err) = metrics::set_global_recorder(recorder) {
        tracing::warn!(%err, "a metrics recorder is already installed; /metrics will be empty");
    }
    let upkeep = handle.clone();
    // A thread rather than a Tokio task: the recorder lives for the whole process, which may
    // create and drop several runtimes (tests do).
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        }
    });
    if let Err(err) = spawned {
        tracing::warn!(%err, "cannot start the metrics upkeep thread");
    }
    handle
}

/// Middleware around every route (and the fallback): one `http_request` span per request
/// carrying the request id, method, route, status and latency; `http_requests_total` and
/// `http_request_duration_seconds` by method, route and status; and the problem+json
/// safety net ([`ensure_problem`]).
pub async fn observe(State(metrics): State<Arc<RequestMetrics>>, request: Request, next: Next) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let route_label = route.as_ref().map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    let span = tracing::info_span!(
        "http_request",
        // Set by the request-id layer outside this one, from the client's header or a new UUID.
        // Read only if the span is enabled (the macro evaluates fields only then).
        request_id = %request.headers().get("x-request-id").and_then(|value| value.to_str().ok()).unwrap_or(""),
        method = %method,
        route = %route_label,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );

    let response = ensure_problem(next.run(request).instrument(span.clone()).await);

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    // Microsecond precision is plenty, and keeps log lines short.
    let latency_ms = (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    span.record("status", status);
    span.record("latency_ms", latency_ms);
    // The span carries status and latency, so the event needs no fields of its own. Lines
    // for each request are at debug (tower-http's choice too): at thousands of requests per
    // second an info line each would dominate the node's work. Server errors stand out.
    span.in_scope(|| {
        if response.status().is_server_error() {
            tracing::warn!("request failed");
        } else {
            tracing::debug!("request finished");
        }
    });
    metrics.record(&method, route_label, status, elapsed);
    response
}

/// The handles of `http_requests_total` and `http_request_duration_seconds`, one pair per
/// route, method and status, registered on first use. The macros look a metric up in the
/// recorder's registry at every call (its labels copied, hashed, a lock taken): per request
/// that was a dozen allocations.
#[derive(Default)]
pub struct RequestMetrics {
    by_route: RwLock<HashMap<String, Vec<RequestSeries>>>,
}

struct RequestSeries {
    method: &'static str,
    status: u16,
    count: Counter,
    seconds: Histogram,
}

impl RequestMetrics {
    fn record(&self, method: &Method, route: &str, status: u16, elapsed: Duration) {
        // Any token is a method to hyper, and this layer runs before authentication: a fixed
        // set of labels keeps a client from growing the series (and this map) at will.
        let method = method_label(method);
        let find = |all: &[RequestSeries]| all.iter().position(|s| s.method == method && s.status == status);
        {
            let by_route = self.by_route.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(all) = by_route.get(route)
                && let Some(at) = find(all)
            {
                return all[at].record(elapsed);
            }
        }
        let labels = [("method", method.to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
        let series = RequestSeries {
            method,
            status,
            count: metrics::counter!("http_requests_total", &labels),
            seconds: metrics::histogram!("http_request_duration_seconds", &labels),
        };
        series.record(elapsed);
        let mut by_route = self.by_route.write().unwrap_or_else(PoisonError::into_inner);
        let all = by_route.entry(route.to_owned()).or_default();
        // Another request may have registered the same series meanwhile: the handles are the
        // same metric, one copy is enough.
        if find(all).is_none() {
            all.push(series);
        }
    }
}

/// The `method` label: the methods HTTP defines, else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

impl RequestSeries {
    fn record(&self, elapsed: Duration) {
        self.count.increment(1);
        self.seconds.record(elapsed.as_secs_f64());
    }
}

/// The contract says every error is `application/problem+json`. Our handlers and layers
/// already answer that way; this catches the rest (axum's own 405, path and query
/// rejections, anything a future layer answers in plain text), keeping their headers
/// (`Allow`, `Retry-After`, ...) and their status.
pub fn ensure_problem(response: Response<Body>) -> Response<Body> {
    let status = response.status();
    let is_problem = response.headers().get(CONTENT_TYPE).is_some_and(|value| value == PROBLEM_CONTENT_TYPE);
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, _) = response.into_parts();
    let detail = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts.headers.get("allow").and_then(|value| value.to_str().ok()).unwrap_or("");
            format!("this route does not accept the request's method; allowed: {allowed}")
        }
        StatusCode::BAD_REQUEST => "the request's path or query could not be parsed".to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let slug = status.canonical_reason().unwrap_or("error").to_lowercase().replace(' ', "-");
    let title = status.canonical_reason().unwrap_or("Error");
    let mut problem = Problem::new(status, &slug, title.to_owned(), detail).into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH && !problem.headers().contains_key(name) {
            problem.headers_mut().append(name.clone(), value.clone());
        }
    }
    problem.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
    problem
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use axum::body::to_bytes;

    #[tokio::test]
    async fn plain_errors_become_problems_and_keep_their_headers() {
        let plain = Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header("allow", "GET,HEAD")
            .header(CONTENT_TYPE, "text/plain")
            .body(Body::from("nope"))
            .unwrap();
        let response = ensure_problem(plain);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[CONTENT_TYPE], PROBLEM_CONTENT_TYPE);
        assert_eq!(response.headers()["allow"], "GET,HEAD");
        let body: serde_json::Value =
            serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap();
        assert_eq!(body["status"], 405);
        assert!(body["detail"].as_str().unwrap().contains("GET,HEAD"));
    }

    #[test]
    fn methods_outside_http_share_one_label() {
        assert_eq!(method_label(&Method::PUT), "PUT");
        assert_eq!(method_label(&Method::from_bytes(b"FOO123").unwrap()), "other");
        assert_eq!(method_label(&Method::from_bytes(b"BAR").unwrap()), "other");
    }

    #[tokio::test]
    async fn successes_and_problems_pass_untouched() {
        let ok = ensure_problem(Response::new(Body::from("fine")));
        assert_eq!(ok.status(), StatusCode::OK);
        let problem = ensure_problem(Problem::not_found("x").into_response());
        let body = to_bytes(problem.into_body(), usize::MAX).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("\"detail\":\"x\""));
    }
}

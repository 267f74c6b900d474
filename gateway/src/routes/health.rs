//! Unauthenticated operational routes: liveness, readiness, metrics, the OpenAPI document,
//! and the answer to paths no route matches.
//!
//! They sit outside the `/v1` bounds (no rate limit, no in-flight limit): an overloaded
//! node must still tell its orchestrator that it is alive, and be scrapable.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::{OriginalUri, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::api::Health;
use crate::openapi::ProblemDoc;
use crate::problem::Problem;

/// Seconds a load balancer is told to wait before asking a not-ready node again.
const NOT_READY_RETRY_AFTER_SECS: u64 = 5;

/// Whether this node should receive traffic: not until [`Readiness::set_ready`]`(true)`
/// (storage open, cluster joined), and no longer once [`Readiness::set_draining`] is called
/// at shutdown, so load balancers stop sending new requests while in-flight ones finish.
/// Clones share the same flags.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    /// Set once the node can serve.
    ready: Arc<AtomicBool>,
    /// Set once, at the start of shutdown; never cleared.
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Not ready, not draining.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the node (not) ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Marks the node as shutting down: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ready and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining()
    }
}

/// Liveness: 200 while the process runs.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    responses((status = 200, description = "The process is running", body = Health)),
)]
pub async fn livez() -> Json<Health> {
    Json(Health { status: "live".into() })
}

/// Readiness: 200 when the node can serve; 503 before that and while draining.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic", body = Health),
        (status = 503, description = "Starting or draining; see `Retry-After`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, Problem> {
    if state.readiness.is_ready() {
        Ok(Json(Health { status: "ready".into() }))
    } else if state.readiness.is_draining() {
        Err(Problem::unavailable(NOT_READY_RETRY_AFTER_SECS, "the node is shutting down"))
    } else {
        Err(Problem::unavailable(NOT_READY_RETRY_AFTER_SECS, "the node is starting"))
    }
}

/// Metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain")),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// This API's OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", body = Object)),
)]
pub async fn openapi_json() -> Response {
    // Built once: it is a pure function of the code.
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let json = DOCUMENT.get_or_init(crate::openapi::document_json);
    ([(CONTENT_TYPE, HeaderValue::from_static("application/json"))], json.clone()).into_response()
}

/// The fallback: a 404 problem naming the path that matched nothing.
pub async fn no_route(method: Method, OriginalUri(uri): OriginalUri) -> Problem {
    Problem::not_found(format!("no route for {method} {}", uri.path()))
}

//! The ordermesh HTTP gateway: the only crate that knows HTTP and JWT.
//!
//! It turns the contract's `/v1` API into calls on the typed service handles
//! ([`OrderService`], [`InventoryService`]) and never touches actors, stores or channels.
//!
//! # Layout
//!
//! - [`router`] and [`serve`] (this file): the whole HTTP surface and its graceful server.
//! - [`routes`]: one module per resource, each handler documented for OpenAPI:
//!   [`routes::orders`], [`routes::inventory`], [`routes::health`] (`/livez`, `/readyz`,
//!   `/metrics`, `/openapi.json`, and the [`Readiness`] flag they read).
//! - [`api`]: the JSON shapes of requests and responses and their conversion to and from
//!   the domain's validated newtypes (the one place input is validated).
//! - [`auth`]: JWT verification and minting, the [`auth::Auth`] extractor, roles.
//! - [`problem`]: RFC 9457 problem details, the shape of every error, and the status each
//!   service error maps to.
//! - [`limits`]: per-subject rate limiting, bounded in-flight work and the request deadline.
//! - [`metrics`]: the Prometheus recorder and the per-request span, counters and histograms.
//! - [`openapi`]: the OpenAPI document, assembled from the handlers' annotations.
//! - [`config`]: layered configuration of every command (gateway and services alike).
//!
//! # The order of the layers a `/v1` request passes
//!
//! ```text
//! request id (set, propagated) -> span + metrics + problem safety net      every route
//!   -> authenticate (401) -> rate limit by subject (429)                   /v1 only
//!   -> in-flight bound (503) + request deadline (504) -> body limit (413) -> handler
//! ```
//!
//! Authentication comes first so the rate limiter can key on the verified subject (and
//! anonymous floods never reach it); the in-flight bound comes after the rate limit so a
//! single noisy subject is turned away before it occupies the shared capacity. Health,
//! metrics and the OpenAPI document bypass the bounds: an overloaded node must still answer
//! its liveness probe.

pub mod api;
pub mod auth;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod routes;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use ordermesh_actors::services::inventory::InventoryService;
use ordermesh_actors::services::order::OrderService;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::auth::Authenticator;
use crate::config::Config;

pub use crate::metrics::metrics_handle;
pub use crate::routes::health::Readiness;

/// The service handles the gateway calls; cheap to clone, each is a handle to a router.
#[derive(Clone)]
pub struct GatewayServices {
    /// Places, reads, lists and cancels orders.
    pub orders: OrderService,
    /// Reads and sets stock.
    pub inventory: InventoryService,
}

/// What every handler can reach, behind one `Arc`: axum clones the state for each request,
/// and cloning the service handles field by field (a dozen `Arc`s) showed up in profiles.
/// Public only because the handlers (public for the OpenAPI document) name it; its fields
/// are the crate's business.
#[derive(Clone)]
pub struct AppState(Arc<AppShared>);

impl std::ops::Deref for AppState {
    type Target = AppShared;

    fn deref(&self) -> &AppShared {
        &self.0
    }
}

/// The contents of an [`AppState`].
pub struct AppShared {
    /// The service handles.
    pub(crate) services: GatewayServices,
    /// Verifies bearer tokens; the [`auth::Auth`] extractor finds it through [`FromRef`].
    pub(crate) authenticator: Arc<Authenticator>,
    /// Whether `/readyz` answers 200.
    pub(crate) readiness: Readiness,
    /// Renders `/metrics`.
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Longest long poll of `GET /v1/orders/{id}?wait_ms=`: half the request deadline, so the
    /// answer always comes before the deadline's 504.
    pub(crate) max_order_wait: std::time::Duration,
}

impl FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        state.authenticator.clone()
    }
}

/// The complete HTTP API: `/v1` (authenticated, rate limited, bounded), health, metrics and
/// the OpenAPI document, with problem+json for every error including unknown routes.
///
/// Installs the Prometheus recorder if no router did before (see [`metrics_handle`]), and,
/// when called inside a Tokio runtime, starts the task that forgets idle rate-limit keys.
pub fn router(
    services: GatewayServices,
    config: &Config,
    authenticator: Arc<Authenticator>,
    readiness: Readiness,
) -> Router {
    let max_order_wait = std::time::Duration::from_millis(config.request_timeout_ms / 2);
    let state = AppState(Arc::new(AppShared {
        services,
        authenticator: authenticator.clone(),
        readiness,
        metrics: metrics_handle(),
        max_order_wait,
    }));

    let v1 = Router::new()
        .route("/v1/orders", post(routes::orders::place_order).get(routes::orders::list_orders))
        .route("/v1/orders/wait", post(routes::orders::wait_orders))
        .route("/v1/orders/{id}", get(routes::orders::get_order))
        .route("/v1/orders/{id}/cancel", post(routes::orders::cancel_order))
        .route("/v1/inventory/{sku}", get(routes::inventory::get_stock).put(routes::inventory::set_stock))
        // Enforced while the JSON extractor reads the body, so the rejection is a problem.
        .layer(DefaultBodyLimit::max(config.order_body_limit_bytes));
    // After the routes: `route_layer` wraps only the routes already added.
    let v1 = limits::guard(v1, authenticator, config);

    let outer = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(axum::middleware::from_fn_with_state(Arc::new(metrics::RequestMetrics::default()), metrics::observe));

    Router::new()
        .merge(v1)
        .route("/livez", get(routes::health::livez))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(routes::health::openapi_json))
        .fallback(routes::health::no_route)
        // `Router::layer` wraps every route and the fallback after routing, so the
        // observer sees the matched path template (a bounded label) and every status.
        .layer(outer)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting
/// connections and waits for the requests in flight to finish (graceful shutdown).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Responses are small and written at once; Nagle would only add latency to them.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "cannot set tcp_nodelay");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Serves until `signal`; then `/readyz` says draining, no new connection is taken and the
/// requests in flight get up to `drain_timeout` to finish (what `dev` and `node` do on
/// SIGTERM).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    router: Router,
    readiness: &Readiness,
    signal: impl Future<Output = ()> + Send + 'static,
    drain_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let draining = readiness.clone();
    let shutdown = async move {
        signal.await;
        tracing::info!("shutdown requested, draining");
        draining.set_draining();
        let _ = signalled_tx.send(());
    };
    let served = serve(listener, router, shutdown);
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => result,
        () = async { let _ = signalled_rx.await; tokio::time::sleep(drain_timeout).await } => {
            tracing::warn!(?drain_timeout, "in-flight requests did not finish in time");
            Ok(())
        }
    }
}

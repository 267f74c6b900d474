//! The three services on one node, their wiring, recovery and shutdown.
//!
//! ```text
//!   Services ── OrderService ──▶ Router<OrderEntity>     ─┐ order store   ── relay ──▶ PaymentService
//!            ── InventoryService ▶ Router<StockEntity>   ─┤ inventory store
//!            ── PaymentService ──▶ Router<PaymentEntity> ─┘ payment store ── relay ──▶ OrderService
//! ```
//!
//! Each service owns its own store (`<data dir>/<service>/`); no service reads another's. On
//! start, every order and payment whose work is unfinished is activated, so sagas resume.

pub mod events;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod remote;

use crate::provider::PaymentProvider;
use events::IntegrationEvent;
use inventory::{InventoryDeps, InventoryService, StockEntity, StockViews};
use order::{LiveOrders, OrderDeps, OrderEntity, OrderMetrics, OrderService};
use ordermesh_runtime::cluster::Cluster;
use ordermesh_runtime::relay::{RelayOptions, run_relay};
use ordermesh_runtime::{Backoff, CircuitBreaker, HostingOptions, Router};
use ordermesh_storage::{OutboxEntry, Store, StoreOptions, codec};
use payment::{PaymentDeps, PaymentEntity, PaymentService, SettledCounters};
use remote::Placement;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::ServiceError;

/// Milliseconds since the Unix epoch (the one clock the services read).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Tuning of the services; every value has a sensible default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long the payment service keeps trying to charge before giving up (`payment_failed`).
    pub payment_deadline: Duration,
    /// One provider call's timeout.
    pub payment_call_timeout: Duration,
    /// How long a new payment request waits for the provider's first answer before it is
    /// committed on its own and the charge goes on in the background (see `payment.rs`).
    pub payment_inline_wait: Duration,
    pub payment_backoff: Backoff,
    pub breaker_failure_threshold: u32,
    pub breaker_cooldown: Duration,
    /// Timeout of a call between services (reserve, release, commit, place).
    pub call_timeout: Duration,
    /// Backoff of saga steps whose service did not answer.
    pub retry_backoff: Backoff,
    /// How long an idle entity stays in memory.
    pub entity_idle: Duration,
    /// A stock item writes a snapshot every this many events.
    pub snapshot_every: u64,
    /// How long idempotency keys are kept.
    pub idempotency_retention: Duration,
    /// fsync every commit group (off only in tests that want speed over power-loss safety).
    pub fsync: bool,
    /// Least time between the starts of two log rounds of a store while writers are concurrent.
    pub commit_interval: Duration,
    /// Orders in flight on a node (in memory, their sagas running, or being placed) beyond which
    /// a new one waits up to `admission_wait` for one to leave, then is refused (`Unavailable`:
    /// 503 + Retry-After), so an overload queues at the clients, not in sagas. One customer may
    /// hold a tenth of it.
    pub max_orders_in_flight: usize,
    /// The limit while the machine's cores are all busy (never above `max_orders_in_flight`).
    pub max_orders_in_flight_when_busy: usize,
    /// How long a new order beyond the limit waits for an order to leave before it is refused.
    pub admission_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            payment_deadline: Duration::from_secs(30),
            payment_call_timeout: Duration::from_secs(2),
            payment_inline_wait: Duration::from_millis(100),
            payment_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            breaker_failure_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            retry_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            entity_idle: Duration::from_secs(30),
            snapshot_every: 1000,
            idempotency_retention: Duration::from_secs(24 * 3600),
            fsync: true,
            commit_interval: StoreOptions::default().min_round_interval,
            max_orders_in_flight: 2_000,
            max_orders_in_flight_when_busy: 500,
            admission_wait: Duration::from_millis(100),
        }
    }
}

impl Settings {
    /// The saga gives up (cancels with `timeout`) this long after placement: later than the
    /// payment deadline, so a payment that fails for good is reported as `payment_failed`.
    pub fn saga_deadline(&self) -> Duration {
        self.payment_deadline + self.call_timeout * 2 + Duration::from_secs(5)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the {service} store: {source}")]
    Store { service: &'static str, source: ordermesh_storage::StorageError },
    #[error("cannot start the {service} service: {reason}")]
    Actor { service: &'static str, reason: String },
    #[error("cannot use the {service} store: {reason}")]
    Layout { service: &'static str, reason: String },
    #[error("cannot resume unfinished work: {0}")]
    Recovery(ServiceError),
}

/// Which services a node hosts (a node hosting none is a gateway-only cluster member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hosted {
    pub order: bool,
    pub inventory: bool,
    pub payment: bool,
}

impl Hosted {
    pub const ALL: Hosted = Hosted { order: true, inventory: true, payment: true };

    /// Names of the hosted services (`order`, `inventory`, `payment`).
    pub fn names(&self) -> Vec<String> {
        [(self.order, "order"), (self.inventory, "inventory"), (self.payment, "payment")]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| name.to_owned())
            .collect()
    }

    /// Parses a comma list of service names (empty: none).
    pub fn parse(list: &str) -> Result<Hosted, String> {
        let mut hosted = Hosted { order: false, inventory: false, payment: false };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "order" => hosted.order = true,
                "inventory" => hosted.inventory = true,
                "payment" => hosted.payment = true,
                other => return Err(format!("unknown service `{other}` (expected order, inventory, payment)")),
            }
        }
        Ok(hosted)
    }
}

/// The order, inventory and payment services running on this node.
pub struct Services {
    pub orders: OrderService,
    pub inventory: InventoryService,
    pub payments: PaymentService,
    stores: Vec<Store>,
    shutdown: watch::Sender<bool>,
    background: JoinSet<()>,
}

impl Services {
    /// Opens the stores under `data_dir`, starts the services and resumes unfinished sagas.
    ///
    /// Install the metrics recorder before: the services register their metrics here, and a
    /// metric registered with no recorder installed stays a no-op.
    pub async fn start(
        data_dir: &Path,
        settings: Settings,
        provider: Arc<dyn PaymentProvider>,
    ) -> Result<Services, StartError> {
        Self::start_hosting(data_dir, settings, provider, Hosted::ALL, None).await
    }

    /// Starts only the `hosted` services on `data_dir`, outside any cluster (every key is
    /// local). For looking at one cluster node's stores once it has stopped, e.g. auditing
    /// its payments; a running node uses [`Self::start_node`].
    pub async fn start_standalone(
        data_dir: &Path,
        settings: Settings,
        provider: Arc<dyn PaymentProvider>,
        hosted: Hosted,
    ) -> Result<Services, StartError> {
        Self::start_hosting(data_dir, settings, provider, hosted, None).await
    }

    /// Starts the `hosted` services of a cluster node: their stores, routers, relays and
    /// remotable endpoints; requests for entities other nodes own go to those nodes.
    pub async fn start_node(
        data_dir: &Path,
        settings: Settings,
        provider: Arc<dyn PaymentProvider>,
        hosted: Hosted,
        cluster: Arc<Cluster>,
    ) -> Result<Services, StartError> {
        let services = Self::start_hosting(data_dir, settings, provider, hosted, Some(cluster.clone())).await?;
        let bound = cluster.max_in_flight_per_router();
        let serve = |service: &'static str, reason: String| StartError::Actor { service, reason };
        if hosted.inventory {
            cluster
                .serve("inventory", Arc::new(remote::InventoryWire(services.inventory.clone())), bound)
                .await
                .map_err(|e| serve("inventory", e))?;
        }
        if hosted.payment {
            cluster
                .serve("payment", Arc::new(remote::PaymentWire(services.payments.clone())), bound)
                .await
                .map_err(|e| serve("payment", e))?;
        }
        if hosted.order {
            cluster
                .serve("order", Arc::new(remote::OrderWire(services.orders.clone())), bound)
                .await
                .map_err(|e| serve("order", e))?;
        }
        Ok(services)
    }

    async fn start_hosting(
        data_dir: &Path,
        settings: Settings,
        provider: Arc<dyn PaymentProvider>,
        hosted: Hosted,
        placement: Placement,
    ) -> Result<Services, StartError> {
        let settings = Arc::new(settings);
        let open = |service: &'static str, on: bool| -> Result<Option<Store>, StartError> {
            if !on {
                return Ok(None);
            }
            let options = StoreOptions {
                fsync: settings.fsync,
                min_round_interval: settings.commit_interval,
                ..StoreOptions::default()
            };
            Store::open(service_dir(data_dir, service), options)
                .map(Some)
                .map_err(|source| StartError::Store { service, source })
        };
        let (order_store, inventory_store, payment_store) =
            (open("order", hosted.order)?, open("inventory", hosted.inventory)?, open("payment", hosted.payment)?);

        let hosting = |service| HostingOptions { service, idle_after: settings.entity_idle };
        let actor_err =
            |service| move |e: ractor::ActorProcessingErr| StartError::Actor { service, reason: e.to_string() };

        if let Some(store) = &inventory_store {
            inventory::check_layout(store)
                .await
                .map_err(|reason| StartError::Layout { service: "inventory", reason })?;
        }
        let inventory_local = match &inventory_store {
            Some(store) => {
                let views = StockViews::default();
                let deps = InventoryDeps { store: store.clone(), settings: settings.clone(), views: views.clone() };
                let router =
                    Router::<StockEntity>::start(hosting("inventory"), deps).await.map_err(actor_err("inventory"))?;
                Some((router, views))
            }
            None => None,
        };
        let inventory = InventoryService::new(inventory_local, settings.clone(), placement.clone());

        let payment_local = match &payment_store {
            Some(store) => {
                let breaker = Arc::new(CircuitBreaker::new(
                    "payment_provider",
                    settings.breaker_failure_threshold,
                    settings.breaker_cooldown,
                ));
                let router = Router::<PaymentEntity>::start(
                    hosting("payment"),
                    PaymentDeps {
                        store: store.clone(),
                        provider,
                        breaker,
                        settings: settings.clone(),
                        settled: Arc::new(SettledCounters::register()),
                    },
                )
                .await
                .map_err(actor_err("payment"))?;
                Some((router, store.clone()))
            }
            None => None,
        };
        let payments = PaymentService::new(payment_local, settings.clone(), placement.clone());

        let live_orders = LiveOrders::default();
        let order_metrics = Arc::new(OrderMetrics::register());
        let order_local = match &order_store {
            Some(store) => {
                let router = Router::<OrderEntity>::start(
                    hosting("order"),
                    OrderDeps {
                        store: store.clone(),
                        inventory: inventory.clone(),
                        settings: settings.clone(),
                        live: live_orders.clone(),
                        metrics: order_metrics.clone(),
                    },
                )
                .await
                .map_err(actor_err("order"))?;
                Some((router, store.clone()))
            }
            None => None,
        };
        let orders =
            OrderService::new(order_local, live_orders, inventory.clone(), settings.clone(), placement, order_metrics);

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut background = JoinSet::new();
        let relay = |name| RelayOptions { name, max_in_flight: 512, backoff: settings.retry_backoff };
        if let Some(order_store) = &order_store {
            let to_payment = payments.clone();
            background.spawn(run_relay(
                order_store.clone(),
                relay("order"),
                move |entry: OutboxEntry| {
                    let payments = to_payment.clone();
                    async move { payments.deliver(codec::decode::<IntegrationEvent>(&entry.bytes)?).await }
                },
                shutdown_rx.clone(),
            ));
            background.spawn(purge_idempotency_keys(
                order_store.clone(),
                settings.idempotency_retention,
                shutdown_rx.clone(),
            ));
        }
        if let Some(payment_store) = &payment_store {
            let to_orders = orders.clone();
            background.spawn(run_relay(
                payment_store.clone(),
                relay("payment"),
                move |entry: OutboxEntry| {
                    let orders = to_orders.clone();
                    async move {
                        match codec::decode::<IntegrationEvent>(&entry.bytes)? {
                            IntegrationEvent::PaymentSettled { event_id, order, outcome } => {
                                orders.payment_settled(order, event_id, outcome).await
                            }
                            other => {
                                Err(ServiceError::Invalid(format!("unexpected event in payment outbox: {other:?}")))
                            }
                        }
                    }
                },
                shutdown_rx.clone(),
            ));
        }

        // Resume unfinished work: activating an entity resumes its saga or provider call.
        let running_orders = orders.running().map_err(StartError::Recovery)?;
        let running_payments = payments.running().map_err(StartError::Recovery)?;
        if !running_orders.is_empty() || !running_payments.is_empty() {
            tracing::info!(
                orders = running_orders.len(),
                payments = running_payments.len(),
                "resuming unfinished work"
            );
        }
        for id in running_orders {
            orders.resume(id);
        }
        for id in running_payments {
            payments.resume(id);
        }

        Ok(Services {
            orders,
            inventory,
            payments,
            stores: [order_store, inventory_store, payment_store].into_iter().flatten().collect(),
            shutdown,
            background,
        })
    }

    /// Stops the relays and actors, then flushes and closes the stores.
    pub async fn shutdown(mut self) -> Result<(), ServiceError> {
        let _ = self.shutdown.send(true);
        while self.background.join_next().await.is_some() {}
        self.orders.stop();
        self.payments.stop();
        self.inventory.stop();
        for store in &self.stores {
            store.close()?;
        }
        Ok(())
    }
}

/// `<data dir>/<service>`: each service's own store.
pub fn service_dir(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join(service)
}

async fn purge_idempotency_keys(store: Store, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600).min(retention));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        match store.purge_idempotency(cutoff) {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired idempotency keys removed"),
            Err(err) => tracing::warn!(error = %err, "cannot purge idempotency keys"),
        }
    }
}

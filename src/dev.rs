//! `ordermesh dev`: the gateway and all three services in one process, on one data dir.

use crate::DevFlags;
use crate::wiring::{ensure_dev_secret, init_logging, load_config, mint, service_settings};
use anyhow::Context;
use ordermesh_actors::domain::{Money, Sku};
use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::services::Services;
use ordermesh_gateway::auth::Role;
use ordermesh_gateway::{GatewayServices, Readiness};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The demo catalogue seeded on first start: (sku, units, price in cents).
const DEMO_CATALOGUE: &[(&str, u64, u64)] = &[
    ("espresso", 1_000, 250),
    ("croissant", 500, 320),
    ("bagel", 200, 180),
    ("coffee-beans-1kg", 100, 2_400),
    ("mug", 3, 1_200),
];
const SEEDED_MARKER: &str = "demo-catalogue-seeded";

pub fn run(config_file: Option<&Path>, flags: DevFlags) -> anyhow::Result<ExitCode> {
    let mut config = load_config(config_file, flags)?;
    init_logging(&config.log)?;
    ensure_dev_secret(&mut config)?;
    let authenticator = Arc::new(config.authenticator()?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    runtime.block_on(async move {
        // Listen for SIGTERM before announcing anything: a signal that arrives between the
        // banner and the server must drain too, not kill the process.
        let signal = shutdown_signal()?;
        // Before anything records a metric, so every metric is exported.
        let _metrics = ordermesh_gateway::metrics_handle();
        let services = Services::start(&config.data_dir, service_settings(&config), Arc::new(SimulatedProvider::new()))
            .await
            .with_context(|| format!("cannot start the services on {}", config.data_dir.display()))?;
        seed_demo_catalogue(&services, &config.data_dir).await?;

        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("cannot listen on {} (setting `http`)", config.http))?;
        let addr = listener.local_addr()?;
        let readiness = Readiness::new();
        let gateway = GatewayServices { orders: services.orders.clone(), inventory: services.inventory.clone() };
        let router = ordermesh_gateway::router(gateway, &config, authenticator.clone(), readiness.clone());
        readiness.set_ready(true);

        let day = Duration::from_secs(24 * 3600);
        let customer = mint(&authenticator, "demo-customer", Role::Customer, day)?;
        let admin = mint(&authenticator, "demo-admin", Role::Admin, day)?;
        print_banner(addr, &config.data_dir, &customer, &admin);

        ordermesh_gateway::serve_until(listener, router, &readiness, signal, config.drain_timeout())
            .await
            .context("http server failed")?;
        services.shutdown().await.context("cannot close the stores cleanly")?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn seed_demo_catalogue(services: &Services, data_dir: &Path) -> anyhow::Result<()> {
    let marker = data_dir.join(SEEDED_MARKER);
    if marker.exists() {
        return Ok(());
    }
    for (sku, units, cents) in DEMO_CATALOGUE {
        services.inventory.set_stock(&Sku::parse(*sku)?, *units, Money::from_cents(*cents)).await?;
    }
    std::fs::write(&marker, b"").with_context(|| format!("cannot write {}", marker.display()))?;
    tracing::info!(skus = DEMO_CATALOGUE.len(), "demo catalogue seeded");
    Ok(())
}

fn print_banner(addr: std::net::SocketAddr, data_dir: &Path, customer: &str, admin: &str) {
    let skus: Vec<_> = DEMO_CATALOGUE.iter().map(|(sku, _, _)| *sku).collect();
    println!(
        "ordermesh dev is running\n\
         \n  listening on http://{addr}\
         \n  data dir     {data}\
         \n  demo skus    {skus}\
         \n\nCUSTOMER_TOKEN={customer}\
         \nADMIN_TOKEN={admin}\
         \n\nTry it:\
         \n  curl -s -X POST http://{addr}/v1/orders \\\
         \n    -H \"Authorization: Bearer $CUSTOMER_TOKEN\" -H 'Content-Type: application/json' \\\
         \n    -d '{{\"items\":[{{\"sku\":\"espresso\",\"quantity\":2}}],\"payment_token\":\"tok_visa\"}}'\
         \n\nStop with Ctrl-C.",
        data = data_dir.display(),
        skus = skus.join(", "),
    );
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

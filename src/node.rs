//! `ordermesh node`: one member of a cluster. It hosts some services (their stores under
//! `DIR/<service>/`), answers other nodes' requests for the entities it owns, and optionally
//! runs the gateway, which reaches every entity through the node that owns it.

use crate::wiring::{init_logging, load_config, service_settings};
use anyhow::{Context, bail};
use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::services::{Hosted, Services};
use ordermesh_gateway::auth::JwtAlgorithm;
use ordermesh_gateway::{GatewayServices, Readiness};
use ordermesh_runtime::cluster::{Cluster, ClusterConfig, PeerSpec};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// This node's stable name (its shards follow the name).
    #[arg(long)]
    name: String,
    /// Address the cluster transport listens on.
    #[arg(long, value_name = "ADDR")]
    cluster: SocketAddr,
    /// HOST:PORT other nodes reach this node at [default: the --cluster address].
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Other members, comma separated: NAME@HOST:PORT, or a DNS HOST:PORT resolving to them.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    peers: Vec<String>,
    /// Services hosted here: a comma list of order, inventory, payment ("" or "none": none).
    #[arg(long, value_name = "LIST", default_value = "order,inventory,payment")]
    services: String,
    /// Address the HTTP gateway listens on (no gateway without it).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Directory of this node's stores.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Shards per service. Every member must use the same count (a peer with another is
    /// refused), and it must never change for the life of the cluster's data.
    #[arg(long, value_name = "N", default_value_t = ordermesh_runtime::cluster::ownership::DEFAULT_SHARDS,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    shards: u32,
}

/// The flags that override layered settings.
#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<SocketAddr>,
    data_dir: PathBuf,
}

pub fn run(config_file: Option<&Path>, args: NodeArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(config_file, Overrides { http: args.http, data_dir: args.data_dir.clone() })?;
    init_logging(&config.log)?;
    let Some(cookie) = config.cluster_cookie.as_ref().map(|c| c.expose().to_owned()).filter(|c| !c.is_empty()) else {
        bail!("no cluster cookie: set ORDERMESH_CLUSTER_COOKIE (the shared secret of the cluster transport)");
    };
    if config.jwt_algorithm == JwtAlgorithm::HS256 && config.jwt_secret.is_none() {
        bail!("no JWT key: set ORDERMESH_JWT_SECRET (a node never generates its own key)");
    }
    let authenticator = Arc::new(config.authenticator()?);
    let services_list = if args.services.trim() == "none" { "" } else { args.services.as_str() };
    let hosted = Hosted::parse(services_list).map_err(anyhow::Error::msg)?;
    let peers = args
        .peers
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.parse::<PeerSpec>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    runtime.block_on(async move {
        let signal = crate::dev::shutdown_signal()?;
        let _metrics = ordermesh_gateway::metrics_handle();
        let advertise = args.advertise.clone().unwrap_or_else(|| args.cluster.to_string());
        let mut cluster_config =
            ClusterConfig::new(args.name.clone(), args.cluster, advertise, cookie, config.data_dir.clone());
        cluster_config.peers = peers;
        cluster_config.shards = args.shards;
        cluster_config.services = hosted.names();
        let cluster = Cluster::start(cluster_config).await.map_err(anyhow::Error::msg)?;
        let services = Services::start_node(
            &config.data_dir,
            service_settings(&config),
            Arc::new(SimulatedProvider::new()),
            hosted,
            cluster.clone(),
        )
        .await
        .with_context(|| format!("cannot start the services on {}", config.data_dir.display()))?;
        tracing::info!(name = args.name, cluster = %args.cluster, services = ?hosted.names(), "node started");

        let readiness = Readiness::new();
        let ready = readiness.clone();
        let watched = cluster.clone();
        let readiness_task = tokio::spawn(async move {
            loop {
                ready.set_ready(watched.joined());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });

        match args.http {
            Some(http) => {
                let listener = tokio::net::TcpListener::bind(http)
                    .await
                    .with_context(|| format!("cannot listen on {http} (flag --http)"))?;
                println!("ordermesh node {} listening on http://{}", args.name, listener.local_addr()?);
                let gateway =
                    GatewayServices { orders: services.orders.clone(), inventory: services.inventory.clone() };
                let router = ordermesh_gateway::router(gateway, &config, authenticator, readiness.clone());
                ordermesh_gateway::serve_until(listener, router, &readiness, signal, config.drain_timeout())
                    .await
                    .context("http server failed")?;
            }
            None => {
                println!("ordermesh node {} running (no gateway)", args.name);
                signal.await;
                tracing::info!("shutdown requested");
                readiness.set_draining();
            }
        }
        readiness_task.abort();
        services.shutdown().await.context("cannot close the stores cleanly")?;
        cluster.stop();
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

//! A 3-node ordermesh cluster on loopback, as child processes of the `ordermesh` binary:
//! orders placed through every gateway, one node killed with SIGKILL and restarted on its
//! data dir, then a report. Exits non-zero if an acknowledged order was lost or stock was not
//! conserved.
//!
//! ```text
//! cargo run --release --example local_cluster [-- --seconds 12]
//! ```
//!
//! It builds the `ordermesh` binary of its own profile first (`cargo build [--release] --bin
//! ordermesh`, a no-op when up to date), or uses `ORDERMESH_BIN` if set. It also times how long
//! after the kill, and after the restart, the first read of an order the killed node owns
//! succeeds again.

// The process and HTTP helpers the cluster tests use, shared rather than copied.
#[path = "../tests/common/cluster.rs"]
mod cluster;

use anyhow::{Context, bail, ensure};
use cluster::{Api, Cluster, Load, Pick, mint_token, owner, specs};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The HS256 secret of this throwaway cluster (`cluster.rs` reads it as `super::SECRET`).
const SECRET: &str = "local-cluster-example-secret-0123456789abcdef";
const SKUS: [&str; 6] = ["espresso", "latte", "mocha", "cortado", "ristretto", "lungo"];
const INITIAL_STOCK: u64 = 100_000;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("local_cluster: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// `--seconds N`: how long the load runs before the kill (and again after the restart).
fn seconds() -> anyhow::Result<u64> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(5),
        [flag, n] if flag == "--seconds" => n.parse().context("--seconds takes a whole number"),
        _ => bail!("usage: local_cluster [--seconds N]"),
    }
}

/// The `ordermesh` binary: `ORDERMESH_BIN`, or the one of this example's own profile, built now.
fn ordermesh_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ORDERMESH_BIN") {
        return Ok(bin.into());
    }
    // This example lives in <target dir>/<profile>/examples/; the binary goes in <profile>/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(|p| p.parent()).context("cannot locate the target directory")?;
    let target_dir = profile_dir.parent().context("cannot locate the target directory")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--bin", "ordermesh", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        build.arg("--release");
    }
    println!("building ordermesh ({})", if release { "release" } else { "debug" });
    let status = build.status().context("cannot run cargo (set ORDERMESH_BIN to a built ordermesh)")?;
    if !status.success() {
        bail!("cargo build --bin ordermesh failed");
    }
    Ok(profile_dir.join("ordermesh"))
}

fn run() -> anyhow::Result<bool> {
    let seconds = seconds()?;
    let bin = ordermesh_bin()?;
    let dir = tempfile::tempdir()?;
    let all = "order,inventory,payment";
    let roles = [("n1", all, true), ("n2", all, true), ("n3", all, true)];
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let started = Instant::now();
        let mut cluster = Cluster::new(&bin, specs(dir.path(), &roles)?);
        // The contract's default deadlines, not the tests' short ones: a payment requested just
        // before the kill still has time to be captured once its node is back.
        cluster.env = [("ORDERMESH_PAYMENT_DEADLINE_MS", "30000"), ("ORDERMESH_RESERVATION_TIMEOUT_MS", "5000")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec();
        for name in cluster.names() {
            cluster.start_node(&name)?;
        }
        let api =
            Api::new(mint_token(&bin, "example-admin", "admin")?, mint_token(&bin, "example-customer", "customer")?)?;
        let bases = cluster.bases();
        api.wait_ready(&bases, Duration::from_secs(30)).await?;
        println!("3 nodes ready in {:.1?}: {}", started.elapsed(), bases.join(" "));
        let mut initial = BTreeMap::new();
        for sku in SKUS {
            api.set_stock(&bases[0], sku, INITIAL_STOCK).await?;
            initial.insert(sku.to_owned(), INITIAL_STOCK);
        }

        // An order n3 owns, to time its recovery by: placed through n3's gateway, which
        // places an order without an idempotency key on its own node.
        let probe = api.place(&cluster.base("n3")?, &[(SKUS[0], 1)]).await?;
        ensure!(owner("order", &probe, &cluster.names()) == "n3", "order {probe} placed through n3 is not n3's");

        let pick: Pick = Arc::new(|w, n| {
            let i = (w * 7 + n as usize) % SKUS.len();
            vec![(SKUS[i].to_owned(), 1), (SKUS[(i + 2) % SKUS.len()].to_owned(), 2)]
        });
        let load = Load::start(&api, bases.clone(), 4, pick);
        progress(&load, "load", Duration::from_secs(seconds)).await;

        cluster.kill9("n3")?;
        let killed = Instant::now();
        println!("kill -9 n3");
        progress(&load, "n3 down", Duration::from_secs(3)).await;
        // Timed from the launch of the process: opening its stores and resuming its sagas count.
        let restarted = Instant::now();
        cluster.start_node("n3")?;
        println!("n3 restarted on its data dir");
        let recovered = loop {
            if api.order_status(&bases[0], &probe).await.is_ok_and(|(code, _)| code == 200) {
                break Instant::now();
            }
            if restarted.elapsed() > Duration::from_secs(60) {
                bail!("an order of n3 was still unreadable 60 s after its restart");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        println!(
            "first successful read of an n3 order: {:.2?} after the kill, {:.2?} after the relaunch",
            recovered - killed,
            recovered - restarted
        );
        progress(&load, "load", Duration::from_secs(seconds)).await;
        let attempts = load.stop().await?;

        let acknowledged: BTreeSet<String> = attempts.iter().filter_map(|a| a.id.clone()).collect();
        println!("waiting for {} acknowledged orders to finish", acknowledged.len());
        let ids: Vec<String> = acknowledged.iter().cloned().collect();
        api.wait_terminal(&bases[0], &ids, Duration::from_secs(120)).await?;
        let orders = api.all_orders(&bases[0]).await?;
        let listed: BTreeSet<String> = orders.iter().filter_map(|o| o["id"].as_str().map(str::to_owned)).collect();
        let lost = acknowledged.difference(&listed).count();
        // Orders whose reply the client never got (a 503 after a timeout, or a reset) may still
        // have been made durable by their owner: they run to the end like any other.
        let unacknowledged = listed.difference(&acknowledged).count();
        let count = |status: &str| orders.iter().filter(|o| o["status"] == status).count();
        let conserved = api.check_stock_conserved(&bases[0], &initial, &orders).await;
        let refused = attempts.iter().filter(|a| a.status != 202).count();
        cluster.stop_all()?;

        println!();
        println!("orders placed (202)   {}", acknowledged.len());
        println!("  refused (503/other) {refused}");
        println!("orders in the stores  {} ({unacknowledged} whose reply the client did not get)", orders.len());
        println!("  confirmed           {}", count("confirmed"));
        println!("  cancelled           {}", count("cancelled"));
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for order in orders.iter().filter(|o| o["status"] == "cancelled") {
            *reasons.entry(order["cancel_reason"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
        for (reason, n) in reasons {
            println!("    {reason:<19} {n}");
        }
        println!("  lost                {lost}");
        match &conserved {
            Ok(_) => println!("stock conserved       yes"),
            Err(err) => println!("stock conserved       NO: {err:#}"),
        }
        println!(
            "recovery              {:.2?} after the kill, {:.2?} after the restarted process was launched",
            recovered - killed,
            recovered - restarted
        );
        Ok(lost == 0 && conserved.is_ok())
    })
}

/// Prints the load's progress once a second, for `length`.
async fn progress(load: &Load, phase: &str, length: Duration) {
    let until = Instant::now() + length;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1).min(until - Instant::now())).await;
        let (accepted, refused) = load.counts();
        println!("  [{phase}] orders accepted {accepted}, refused {refused}");
    }
}

//! `ordermesh`: one binary for every role. This file only defines the command line and
//! dispatches; each command lives in its own module.

mod bench;
mod dev;
mod healthcheck;
mod node;
mod wiring;

use clap::{Parser, Subcommand};
use ordermesh_gateway::auth::Role;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// sled 0.34 copies and frees a tree node on every write: with glibc's malloc a fifth of the
/// saga's CPU went to the allocator (perf); mimalloc roughly halves that (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ordermesh", version, about = "Order processing on a durable actor runtime.")]
struct Cli {
    /// TOML file of settings (flat keys, as the ORDERMESH_* variables without the prefix).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: gateway + order, inventory and payment services.
    Dev(DevFlags),
    /// Print a signed JWT for testing, with the server's key configuration.
    Token(TokenArgs),
    /// Exit 0 if the gateway's /readyz answers 200 (for container health checks).
    Healthcheck(HealthcheckFlags),
    /// One cluster node: some services, optionally the gateway, joined to its peers.
    Node(node::NodeArgs),
    /// HTTP load generator: places orders against a running gateway and reports latencies.
    Bench(bench::BenchArgs),
}

/// Flags that override settings; only those given override the lower layers.
#[derive(clap::Args, Serialize)]
struct DevFlags {
    /// Address the HTTP API listens on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<SocketAddr>,
    /// Directory of the sled stores [default: ./data/dev].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The subject: the customer id the token speaks for.
    #[arg(long)]
    sub: String,
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// How long the token is valid (e.g. 30m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// Data directory of a `dev` server whose generated key to use [default: ./data/dev].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Serialize)]
struct HealthcheckFlags {
    /// Address of the gateway [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<SocketAddr>,
}

fn parse_role(raw: &str) -> Result<Role, String> {
    raw.parse().map_err(|_| format!("expected `customer` or `admin`, got `{raw}`"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev(flags) => dev::run(cli.config.as_deref(), flags),
        Command::Token(args) => {
            wiring::print_token(cli.config.as_deref(), args.data_dir, &args.sub, args.role, args.ttl)
        }
        Command::Healthcheck(flags) => healthcheck::run(cli.config.as_deref(), flags),
        Command::Node(args) => node::run(cli.config.as_deref(), args),
        Command::Bench(args) => bench::run(cli.config.as_deref(), args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

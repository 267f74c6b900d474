//! Turning settings into running parts: logging, the services' settings, the JWT key.

use anyhow::Context;
use ordermesh_actors::Settings;
use ordermesh_gateway::auth::{Authenticator, JwtAlgorithm, Role};
use ordermesh_gateway::config::{Config, Secret};
use ordermesh_runtime::Backoff;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Loads the layered configuration (defaults, file, `ORDERMESH_*`, flags) and validates it.
pub fn load_config(file: Option<&Path>, flags: impl serde::Serialize) -> anyhow::Result<Config> {
    let config = Config::load(file, flags)?;
    Ok(config)
}

/// Logs to stderr, filtered by `ORDERMESH_LOG` / the `log` setting (tracing syntax).
pub fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid value for `log`: `{filter}` is not a tracing filter"))?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

pub fn service_settings(config: &Config) -> Settings {
    let defaults = Settings::default();
    Settings {
        payment_deadline: config.payment_deadline(),
        payment_call_timeout: config.payment_call_timeout(),
        payment_inline_wait: config.payment_inline_wait(),
        payment_backoff: Backoff::new(defaults.payment_backoff.base, config.payment_max_backoff()),
        breaker_failure_threshold: config.breaker_failure_threshold,
        breaker_cooldown: config.breaker_cooldown(),
        call_timeout: config.reservation_timeout(),
        entity_idle: config.entity_idle(),
        idempotency_retention: config.idempotency_retention(),
        commit_interval: config.commit_interval(),
        max_orders_in_flight: config.max_orders_in_flight,
        max_orders_in_flight_when_busy: config.max_orders_in_flight_when_busy,
        admission_wait: config.admission_wait(),
        ..defaults
    }
}

/// File in a dev data dir holding the generated HS256 secret.
const DEV_SECRET_FILE: &str = "jwt-secret";

/// `dev` may run without a configured key: it generates one on first start and keeps it in
/// its data dir (so tokens stay valid across restarts, and `ordermesh token` finds it).
/// `ORDERMESH_JWT_SECRET` (or any configured key) always wins.
pub fn ensure_dev_secret(config: &mut Config) -> anyhow::Result<()> {
    if config.jwt_secret.is_some() || config.jwt_algorithm != JwtAlgorithm::HS256 {
        return Ok(());
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let path = config.data_dir.join(DEV_SECRET_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(secret) => secret.trim().to_owned(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
            write_private(&path, &secret)?;
            secret
        }
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    config.jwt_secret = Some(Secret::new(secret));
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The key of a client command (`token`, `bench`): the configured one (`--config`,
/// `ORDERMESH_*`), else the secret a `dev` server generated in `<data_dir>/jwt-secret`.
pub fn client_authenticator(file: Option<&Path>, data_dir: Option<PathBuf>) -> anyhow::Result<Authenticator> {
    #[derive(serde::Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        data_dir: Option<PathBuf>,
    }
    let mut config = load_config(file, Flags { data_dir })?;
    if config.jwt_secret.is_none() && config.jwt_algorithm == JwtAlgorithm::HS256 {
        let path = config.data_dir.join(DEV_SECRET_FILE);
        let secret = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no key configured: set ORDERMESH_JWT_SECRET as for the server, or point --data-dir at a \
                 `ordermesh dev` data dir (no {} here)",
                path.display()
            )
        })?;
        config.jwt_secret = Some(Secret::new(secret.trim()));
    }
    Ok(config.authenticator()?)
}

/// `ordermesh token`: prints a token signed with [`client_authenticator`]'s key.
pub fn print_token(
    file: Option<&Path>,
    data_dir: Option<PathBuf>,
    sub: &str,
    role: Role,
    ttl: Duration,
) -> anyhow::Result<ExitCode> {
    let authenticator = client_authenticator(file, data_dir)?;
    println!("{}", mint(&authenticator, sub, role, ttl)?);
    Ok(ExitCode::SUCCESS)
}

pub fn mint(authenticator: &Authenticator, sub: &str, role: Role, ttl: Duration) -> anyhow::Result<String> {
    authenticator.mint(sub, role, ttl).map_err(|e| anyhow::anyhow!("cannot sign a token: {e}"))
}

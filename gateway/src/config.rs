//! Configuration of every `ordermesh` command: one flat [`Config`], loaded in layers.
//!
//! Layers, each overriding the one before (the contract's order):
//! 1. defaults ([`Config::default`]),
//! 2. an optional TOML file (`--config FILE`), flat keys named like the fields,
//! 3. environment variables `ORDERMESH_<FIELD>` (`ORDERMESH_JWT_SECRET` -> `jwt_secret`),
//! 4. command-line flags: any `Serialize` struct whose field names are settings; `None`
//!    fields are skipped, so only flags the user gave override anything.
//!
//! Then [`Config::validate`] checks ranges and files, so a bad setting stops the process at
//! startup with a message that names the setting and where its value came from
//! (`invalid value for `http` (from env ORDERMESH_HTTP): invalid socket address syntax`),
//! instead of surfacing later as a mysterious timeout.
//!
//! Unknown keys are errors in every layer, `ORDERMESH_*` variables included: a typo such as
//! `ORDERMESH_JWT_SECERT` must not silently leave the default in force.
//!
//! Environment values of settings that are strings (secrets, paths, addresses, the log
//! filter) are taken verbatim. figment would otherwise parse them as TOML-ish values, turning
//! an all-digit secret into a number and `[abc]` into an array. Empty variables are ignored,
//! as docker-compose's `FOO=` usually means "unset".

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::auth::{AuthConfigError, Authenticator, JwtAlgorithm, JwtConfig, MAX_LEEWAY_SECS, MIN_HS256_SECRET_BYTES};

/// Prefix of the environment variables read as settings.
pub const ENV_PREFIX: &str = "ORDERMESH_";

/// Smallest accepted `order_body_limit_bytes`: a one-line order is a few hundred bytes.
pub const MIN_BODY_LIMIT_BYTES: usize = 1024;
/// Above this a commit interval is a stall, not a batching window: every saga step waits it.
pub const MAX_COMMIT_INTERVAL_US: u64 = 100_000;
/// Above this a new order waits for room longer than a client (or a remote gateway's call)
/// should wait for a 503.
pub const MAX_ADMISSION_WAIT_MS: u64 = 1_000;

const DEFAULTS_NAME: &str = "defaults";
const ENV_NAME: &str = "environment";
const FLAGS_NAME: &str = "command-line flags";

/// Settings whose values are secrets, never echoed in errors.
const SECRET_SETTINGS: &[&str] = &["jwt_secret", "cluster_cookie"];

/// A string that must not end up in logs or dumps: `Debug` and `Serialize` both write
/// `<redacted>` (nothing needs to serialize a secret; a config dump must not leak one).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// Every setting of every command. Field names are the TOML keys, the lowercased suffixes
/// of `ORDERMESH_*` variables, and the names flags must serialize under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP gateway listens on.
    pub http: SocketAddr,
    /// Root of the node's sled stores (one subdirectory per service).
    pub data_dir: PathBuf,
    /// `tracing` filter (`info`, `ordermesh=debug,info`, ...).
    pub log: String,

    /// The one JWT algorithm accepted (HS256, RS256 or EdDSA).
    pub jwt_algorithm: JwtAlgorithm,
    /// HS256 secret, at least 32 bytes. `node` refuses to start without a key; `dev` may
    /// generate one.
    pub jwt_secret: Option<Secret>,
    /// RS256/EdDSA public key (PEM), needed to verify.
    pub jwt_public_key_file: Option<PathBuf>,
    /// RS256/EdDSA private key (PEM), needed only to mint (`token`, `dev`, `bench`).
    pub jwt_private_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    pub jwt_issuer: String,
    /// Required `aud` claim.
    pub jwt_audience: String,
    /// Clock skew tolerated on `exp`, seconds (at most 300).
    pub jwt_leeway_secs: u64,

    /// Sustained requests per second allowed per JWT subject; beyond it, 429.
    pub rate_limit_per_second: u32,
    /// Requests a subject may send in a burst above the sustained rate.
    pub rate_limit_burst: u32,
    /// Largest accepted `POST /v1/orders` body; beyond it, 413.
    pub order_body_limit_bytes: usize,
    /// Deadline of one HTTP request inside the gateway.
    pub request_timeout_ms: u64,
    /// Requests in flight across the gateway; beyond it, 503 + Retry-After instead of
    /// unbounded queues (the cluster transport has no backpressure of its own).
    pub max_in_flight: usize,
    /// Orders in memory on a node (sagas running) beyond which a new order waits up to
    /// `admission_wait_ms` for one to leave, then gets 503 + Retry-After: an overload then
    /// waits at the clients instead of in an ever longer saga backlog. Orders that wait on a
    /// slow payment count too (up to `payment_deadline_ms`).
    pub max_orders_in_flight: usize,
    /// The same limit while the machine's cores, or the process's cgroup CPU quota, are all busy
    /// (at most `max_orders_in_flight`): then a longer backlog only makes each saga slower and
    /// dearer, and the node's goodput under overload fell to about half of its capacity.
    pub max_orders_in_flight_when_busy: usize,
    /// How long a new order beyond the limit waits for an order to leave before its 503
    /// (0: refused at once). Clients that retry a 503 at once, ignoring Retry-After, then wait
    /// here instead of spending the node's CPU on refusals. For a second after one waited in
    /// vain while other orders left (an overload, not a stall), new orders beyond the limit are
    /// refused at once. At most 1,000.
    pub admission_wait_ms: u64,

    /// Time an order may spend getting paid before it is cancelled as `payment_failed`.
    pub payment_deadline_ms: u64,
    /// Timeout of one call to the payment provider; must be below the deadline.
    pub payment_call_timeout_ms: u64,
    /// How long a new payment waits for the provider's first answer before its request is
    /// committed alone and the charge goes on in the background (0: only an immediate answer).
    pub payment_inline_wait_ms: u64,
    /// Cap of the exponential backoff between payment retries.
    pub payment_max_backoff_ms: u64,
    /// Consecutive failures that open the payment circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker waits before letting one trial call through.
    pub breaker_cooldown_ms: u64,
    /// How long an order waits for its stock reservation before cancelling as `timeout`.
    pub reservation_timeout_ms: u64,
    /// Idle time after which an entity actor passivates (frees its memory; state stays on disk).
    pub entity_idle_ms: u64,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_retention_hours: u64,
    /// While writers are concurrent, a store starts a log round (one fsync) at most once per
    /// this many microseconds: longer gathers more writes per fsync (less CPU per order, more
    /// latency per step). Twice this while the machine's cores (or CPU quota) are all busy. A
    /// lone writer never waits. 0: a round as soon as the last ends.
    pub commit_interval_us: u64,

    /// Shared secret of the cluster transport; `node` refuses to start without it.
    pub cluster_cookie: Option<Secret>,
    /// On SIGTERM, how long in-flight work may take before the process exits anyway.
    pub drain_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data/dev"),
            log: "info".into(),
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_private_key_file: None,
            jwt_issuer: "ordermesh".into(),
            jwt_audience: "ordermesh".into(),
            jwt_leeway_secs: 5,
            rate_limit_per_second: 200,
            rate_limit_burst: 400,
            order_body_limit_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            max_in_flight: 2048,
            max_orders_in_flight: 2_000,
            max_orders_in_flight_when_busy: 500,
            admission_wait_ms: 100,
            payment_deadline_ms: 30_000,
            payment_call_timeout_ms: 2_000,
            payment_inline_wait_ms: 100,
            payment_max_backoff_ms: 2_000,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 1_000,
            reservation_timeout_ms: 5_000,
            entity_idle_ms: 30_000,
            idempotency_retention_hours: 24,
            commit_interval_us: 1_000,
            cluster_cookie: None,
            drain_timeout_ms: 10_000,
        }
    }
}

/// One bad setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    /// The setting's name (`http`, `jwt_secret`, ...).
    pub setting: String,
    /// Where the offending value came from (`env ORDERMESH_HTTP`, `file ./o.toml`,
    /// `flag --http`, `defaults`), when known.
    pub origin: Option<String>,
    /// Whether the setting exists at all.
    pub unknown: bool,
    /// What is wrong, or for an unknown setting, a suggestion.
    pub message: String,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unknown {
            write!(f, "unknown setting `{}`", self.setting)?;
        } else {
            write!(f, "invalid value for `{}`", self.setting)?;
        }
        if let Some(origin) = &self.origin {
            write!(f, " (from {origin})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file is missing or unreadable.
    #[error("cannot read config file {}: {reason}", path.display())]
    File {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// One or more settings are unknown or out of range.
    #[error("{}", join_lines(.0))]
    Settings(Vec<SettingError>),
    /// The JWT settings are individually valid but do not make a working key.
    #[error(transparent)]
    Jwt(#[from] AuthConfigError),
    /// Anything figment reports that is not about one setting (a TOML syntax error, say).
    #[error("invalid configuration: {0}")]
    Other(String),
}

impl ConfigError {
    /// The settings this error is about, for tests and for tools that highlight them.
    pub fn settings(&self) -> Vec<&str> {
        match self {
            ConfigError::Settings(errors) => errors.iter().map(|e| e.setting.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

fn join_lines(errors: &[SettingError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

impl Config {
    /// Loads defaults, then `config_file`, then `ORDERMESH_*`, then `flags`, and validates.
    pub fn load(config_file: Option<&Path>, flags: impl Serialize) -> Result<Config, ConfigError> {
        let figment = Self::figment(config_file, flags)?;
        let config: Config = figment.extract().map_err(|err| from_figment(&figment, err))?;
        config.check(&|setting| origin_of(&figment, setting))?;
        Ok(config)
    }

    /// The layered sources, before extraction. Public so a `config` subcommand could show
    /// where each value comes from.
    pub fn figment(config_file: Option<&Path>, flags: impl Serialize) -> Result<Figment, ConfigError> {
        let defaults = Layer::serialized(&Config::default(), Metadata::named(DEFAULTS_NAME))?;
        let env = Layer::env(&defaults.dict);
        let flags = Layer::serialized(
            &flags,
            Metadata::named(FLAGS_NAME)
                .interpolater(|_: &Profile, keys: &[&str]| format!("--{}", keys.join(".").replace('_', "-"))),
        )?;
        let mut figment = Figment::from(defaults);
        if let Some(path) = config_file {
            // figment skips a missing file silently; a file the user named must exist.
            std::fs::File::open(path)
                .map_err(|err| ConfigError::File { path: path.to_owned(), reason: err.to_string() })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        Ok(figment.merge(env).merge(flags))
    }

    /// Checks ranges, cross-field rules and key files. [`Config::load`] already calls it;
    /// call it again after changing a loaded config in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(&|_| None)
    }

    fn check(&self, origin: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut fail = |setting: &str, message: String| {
            errors.push(SettingError { setting: setting.to_owned(), origin: origin(setting), unknown: false, message });
        };

        let positive: [(&str, u64); 15] = [
            ("rate_limit_per_second", self.rate_limit_per_second.into()),
            ("rate_limit_burst", self.rate_limit_burst.into()),
            ("request_timeout_ms", self.request_timeout_ms),
            ("max_in_flight", u64::try_from(self.max_in_flight).unwrap_or(u64::MAX)),
            ("max_orders_in_flight", u64::try_from(self.max_orders_in_flight).unwrap_or(u64::MAX)),
            ("max_orders_in_flight_when_busy", u64::try_from(self.max_orders_in_flight_when_busy).unwrap_or(u64::MAX)),
            ("payment_deadline_ms", self.payment_deadline_ms),
            ("payment_call_timeout_ms", self.payment_call_timeout_ms),
            ("payment_max_backoff_ms", self.payment_max_backoff_ms),
            ("breaker_failure_threshold", self.breaker_failure_threshold.into()),
            ("breaker_cooldown_ms", self.breaker_cooldown_ms),
            ("reservation_timeout_ms", self.reservation_timeout_ms),
            ("entity_idle_ms", self.entity_idle_ms),
            ("idempotency_retention_hours", self.idempotency_retention_hours),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ];
        for (setting, value) in positive {
            if value == 0 {
                fail(setting, "must be greater than 0".into());
            }
        }
        if self.commit_interval_us > MAX_COMMIT_INTERVAL_US {
            fail(
                "commit_interval_us",
                format!("must be at most {MAX_COMMIT_INTERVAL_US} (it is {})", self.commit_interval_us),
            );
        }
        if self.admission_wait_ms > MAX_ADMISSION_WAIT_MS {
            fail(
                "admission_wait_ms",
                format!("must be at most {MAX_ADMISSION_WAIT_MS} (it is {})", self.admission_wait_ms),
            );
        }
        if self.order_body_limit_bytes < MIN_BODY_LIMIT_BYTES {
            fail(
                "order_body_limit_bytes",
                format!("must be at least {MIN_BODY_LIMIT_BYTES} (it is {})", self.order_body_limit_bytes),
            );
        }
        if self.payment_call_timeout_ms > 0 && self.payment_deadline_ms <= self.payment_call_timeout_ms {
            fail(
                "payment_deadline_ms",
                format!(
                    "must be greater than `payment_call_timeout_ms` ({} ms), or not even one payment call fits in it (it is {} ms)",
                    self.payment_call_timeout_ms, self.payment_deadline_ms
                ),
            );
        }

        if let Some(secret) = &self.jwt_secret
            && secret.expose().len() < MIN_HS256_SECRET_BYTES
        {
            fail(
                "jwt_secret",
                format!("must be at least {MIN_HS256_SECRET_BYTES} bytes long (it has {})", secret.expose().len()),
            );
        }
        if self.jwt_issuer.is_empty() {
            fail("jwt_issuer", "must not be empty".into());
        }
        if self.jwt_audience.is_empty() {
            fail("jwt_audience", "must not be empty".into());
        }
        if self.jwt_leeway_secs > MAX_LEEWAY_SECS {
            fail("jwt_leeway_secs", format!("must be at most {MAX_LEEWAY_SECS} (it is {})", self.jwt_leeway_secs));
        }
        if self.jwt_algorithm != JwtAlgorithm::HS256 && self.jwt_public_key_file.is_none() {
            fail("jwt_public_key_file", format!("must be set when `jwt_algorithm` is {}", self.jwt_algorithm));
        }
        for (setting, path) in
            [("jwt_public_key_file", &self.jwt_public_key_file), ("jwt_private_key_file", &self.jwt_private_key_file)]
        {
            if let Some(path) = path
                && let Err(reason) = check_readable_file(path)
            {
                fail(setting, reason);
            }
        }
        if self.cluster_cookie.as_ref().is_some_and(|cookie| cookie.expose().is_empty()) {
            fail("cluster_cookie", "must not be empty".into());
        }

        if errors.is_empty() { Ok(()) } else { Err(ConfigError::Settings(errors)) }
    }

    /// The JWT settings with key files read, ready for [`Authenticator::new`]. Key files are
    /// read only for RS256/EdDSA; HS256 uses `jwt_secret` alone.
    pub fn jwt_config(&self) -> Result<JwtConfig, ConfigError> {
        let asymmetric = self.jwt_algorithm != JwtAlgorithm::HS256;
        let read = |setting: &str, path: &Option<PathBuf>| -> Result<Option<String>, ConfigError> {
            match path {
                Some(path) if asymmetric => std::fs::read_to_string(path).map(Some).map_err(|err| {
                    ConfigError::Settings(vec![SettingError {
                        setting: setting.to_owned(),
                        origin: None,
                        unknown: false,
                        message: format!("cannot read {}: {err}", path.display()),
                    }])
                }),
                _ => Ok(None),
            }
        };
        Ok(JwtConfig {
            algorithm: self.jwt_algorithm,
            secret: self.jwt_secret.as_ref().map(|s| s.expose().to_owned()),
            public_key_pem: read("jwt_public_key_file", &self.jwt_public_key_file)?,
            private_key_pem: read("jwt_private_key_file", &self.jwt_private_key_file)?,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway_secs: self.jwt_leeway_secs,
        })
    }

    /// [`Config::jwt_config`] then [`Authenticator::new`]: what every command that touches
    /// tokens needs.
    pub fn authenticator(&self) -> Result<Authenticator, ConfigError> {
        Ok(Authenticator::new(&self.jwt_config()?)?)
    }

    /// `request_timeout_ms` as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `payment_deadline_ms` as a `Duration`.
    pub fn payment_deadline(&self) -> Duration {
        Duration::from_millis(self.payment_deadline_ms)
    }

    /// `payment_call_timeout_ms` as a `Duration`.
    pub fn payment_call_timeout(&self) -> Duration {
        Duration::from_millis(self.payment_call_timeout_ms)
    }

    /// `admission_wait_ms` as a `Duration`.
    pub fn admission_wait(&self) -> Duration {
        Duration::from_millis(self.admission_wait_ms)
    }

    /// `payment_inline_wait_ms` as a `Duration`.
    pub fn payment_inline_wait(&self) -> Duration {
        Duration::from_millis(self.payment_inline_wait_ms)
    }

    /// `payment_max_backoff_ms` as a `Duration`.
    pub fn payment_max_backoff(&self) -> Duration {
        Duration::from_millis(self.payment_max_backoff_ms)
    }

    /// `breaker_cooldown_ms` as a `Duration`.
    pub fn breaker_cooldown(&self) -> Duration {
        Duration::from_millis(self.breaker_cooldown_ms)
    }

    /// `reservation_timeout_ms` as a `Duration`.
    pub fn reservation_timeout(&self) -> Duration {
        Duration::from_millis(self.reservation_timeout_ms)
    }

    /// `entity_idle_ms` as a `Duration`.
    pub fn entity_idle(&self) -> Duration {
        Duration::from_millis(self.entity_idle_ms)
    }

    /// `idempotency_retention_hours` as a `Duration`.
    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(self.idempotency_retention_hours.saturating_mul(3600))
    }

    /// `commit_interval_us` as a `Duration`.
    pub fn commit_interval(&self) -> Duration {
        Duration::from_micros(self.commit_interval_us)
    }

    /// `drain_timeout_ms` as a `Duration`.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

fn check_readable_file(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|err| format!("cannot open {shown}: {err}"))?;
    let metadata = file.metadata().map_err(|err| format!("cannot stat {shown}: {err}"))?;
    if metadata.is_file() { Ok(()) } else { Err(format!("{shown} is not a regular file")) }
}

/// A figment provider with our own name for error messages, and with `None` values dropped
/// (figment would let a `None` flag override a value from the file).
struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl Layer {
    /// A struct's fields as settings. `()` and `None` mean "no settings", so a command
    /// without flags can pass `()`.
    fn serialized(value: &impl Serialize, metadata: Metadata) -> Result<Self, ConfigError> {
        let not_a_map = |found: &dyn fmt::Display| {
            ConfigError::Other(format!("{} must serialize to a map of settings, found {found}", metadata.name))
        };
        let mut dict = match Value::serialize(value).map_err(|err| not_a_map(&err))? {
            Value::Dict(_, dict) => dict,
            Value::Empty(..) => Dict::new(),
            other => return Err(not_a_map(&other.to_actual())),
        };
        dict.retain(|_, value| !matches!(value, Value::Empty(..)));
        Ok(Self { metadata, dict })
    }

    /// `ORDERMESH_*` variables. `defaults` tells which settings are numbers or booleans: only
    /// those are parsed, every other value stays the string it was.
    fn env(defaults: &Dict) -> Self {
        let mut dict = Dict::new();
        for (key, raw) in Env::prefixed(ENV_PREFIX).iter() {
            if raw.is_empty() {
                continue;
            }
            let key = key.as_str().to_owned();
            let typed = matches!(defaults.get(&key), Some(Value::Num(..) | Value::Bool(..)));
            let value = if typed {
                match raw.parse::<Value>() {
                    Ok(value) => value,
                    Err(never) => match never {},
                }
            } else {
                Value::from(raw)
            };
            dict.insert(key, value);
        }
        let metadata = Metadata::named(ENV_NAME)
            .interpolater(|_: &Profile, keys: &[&str]| format!("{ENV_PREFIX}{}", keys.join("_").to_ascii_uppercase()));
        Self { metadata, dict }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Says where the value of `setting` came from, as a user would find it again.
fn origin_of(figment: &Figment, setting: &str) -> Option<String> {
    figment.find_metadata(setting).map(|metadata| describe(metadata, setting))
}

fn describe(metadata: &Metadata, setting: &str) -> String {
    if let Some(path) = metadata.source.as_ref().and_then(|source| source.file_path()) {
        return format!("file {}", path.display());
    }
    match metadata.name.as_ref() {
        ENV_NAME => format!("env {}", metadata.interpolate(&Profile::Default, &[setting])),
        FLAGS_NAME => format!("flag {}", metadata.interpolate(&Profile::Default, &[setting])),
        other => other.to_owned(),
    }
}

fn from_figment(figment: &Figment, err: figment::Error) -> ConfigError {
    use figment::error::Kind;

    let mut errors = Vec::new();
    for err in err {
        let (setting, unknown, message) = match &err.kind {
            Kind::UnknownField(name, expected) => {
                let message =
                    closest(name, expected).map(|known| format!("did you mean `{known}`?")).unwrap_or_default();
                (name.clone(), true, message)
            }
            kind => {
                let setting = err.path.join(".");
                if setting.is_empty() {
                    // Not about one setting: a TOML syntax error, for instance.
                    return ConfigError::Other(err.to_string());
                }
                // Type errors quote the value; a mistyped secret must not reach the logs.
                let message = if SECRET_SETTINGS.contains(&setting.as_str()) {
                    "expected a string".to_owned()
                } else {
                    kind.to_string()
                };
                (setting, false, message)
            }
        };
        let origin =
            origin_of(figment, &setting).or_else(|| err.metadata.as_ref().map(|metadata| describe(metadata, &setting)));
        errors.push(SettingError { setting, origin, unknown, message });
    }
    ConfigError::Settings(errors)
}

/// The known name nearest to a misspelt one, if it is plausibly a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|candidate| (edit_distance(name, candidate), *candidate))
        // A third of the letters wrong is still a typo; more is a different word.
        .filter(|(distance, _)| *distance <= (name.chars().count() / 3).max(1))
        .min()
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    // `Jail` closures return figment's large error type; that is its API, not ours.
    #![allow(clippy::unwrap_used, clippy::result_large_err)]

    use super::*;
    use figment::Jail;

    /// What a binary's clap struct looks like: every field optional.
    #[derive(Default, Serialize)]
    struct Flags {
        http: Option<SocketAddr>,
        data_dir: Option<PathBuf>,
        log: Option<String>,
    }

    fn keys_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    fn load_err(file: Option<&Path>) -> ConfigError {
        Config::load(file, Flags::default()).unwrap_err()
    }

    #[test]
    fn defaults_load_and_validate() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = Config::load(None, Flags::default()).unwrap();
            assert_eq!(config, Config::default());
            assert_eq!(config.http, "127.0.0.1:8080".parse().unwrap());
            assert_eq!(config.order_body_limit_bytes, 65536);
            assert_eq!(config.payment_deadline(), Duration::from_secs(30));
            Ok(())
        });
    }

    #[test]
    fn each_layer_overrides_the_previous_one() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "ordermesh.toml",
                r#"
                    http = "0.0.0.0:1000"
                    data_dir = "/from/file"
                    log = "debug"
                    rate_limit_per_second = 10
                "#,
            )?;
            let file = Path::new("ordermesh.toml");

            let config = Config::load(Some(file), Flags::default()).unwrap();
            assert_eq!(config.http, "0.0.0.0:1000".parse().unwrap());
            assert_eq!(config.rate_limit_per_second, 10);
            assert_eq!(config.rate_limit_burst, 400, "untouched settings keep defaults");

            jail.set_env("ORDERMESH_HTTP", "0.0.0.0:2000");
            jail.set_env("ORDERMESH_LOG", "warn");
            jail.set_env("ORDERMESH_RATE_LIMIT_PER_SECOND", "20");
            let config = Config::load(Some(file), Flags::default()).unwrap();
            assert_eq!(config.http, "0.0.0.0:2000".parse().unwrap());
            assert_eq!(config.log, "warn");
            assert_eq!(config.rate_limit_per_second, 20);
            assert_eq!(config.data_dir, PathBuf::from("/from/file"));

            let flags = Flags { http: Some("0.0.0.0:3000".parse().unwrap()), data_dir: None, log: None };
            let config = Config::load(Some(file), flags).unwrap();
            assert_eq!(config.http, "0.0.0.0:3000".parse().unwrap());
            assert_eq!(config.log, "warn", "a None flag overrides nothing");
            assert_eq!(config.data_dir, PathBuf::from("/from/file"));
            Ok(())
        });
    }

    #[test]
    fn env_strings_are_taken_verbatim_and_secrets_are_redacted() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let digits = "12345678901234567890123456789012";
            jail.set_env("ORDERMESH_JWT_SECRET", digits);
            jail.set_env("ORDERMESH_CLUSTER_COOKIE", "[not-an-array]");
            jail.set_env("ORDERMESH_LOG", "ordermesh=debug,info");
            jail.set_env("ORDERMESH_DATA_DIR", "");
            let config = Config::load(None, Flags::default()).unwrap();
            assert_eq!(config.jwt_secret.as_ref().unwrap().expose(), digits);
            assert_eq!(config.cluster_cookie.as_ref().unwrap().expose(), "[not-an-array]");
            assert_eq!(config.log, "ordermesh=debug,info");
            assert_eq!(config.data_dir, PathBuf::from("./data/dev"), "empty vars are unset");
            let debug = format!("{config:?}");
            assert!(!debug.contains(digits) && !debug.contains("not-an-array"), "{debug}");
            let dump = serde_json::to_string(&config).unwrap();
            assert!(!dump.contains(digits) && dump.contains("<redacted>"), "{dump}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors_naming_them() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("o.toml", "jwt_secert = \"x\"\n")?;
            let err = load_err(Some(Path::new("o.toml")));
            let text = err.to_string();
            assert_eq!(err.settings(), ["jwt_secert"]);
            assert!(text.contains("unknown setting `jwt_secert`"), "{text}");
            assert!(text.contains("o.toml"), "{text}");
            assert!(text.contains("did you mean `jwt_secret`?"), "{text}");

            jail.create_file("o.toml", "")?;
            jail.set_env("ORDERMESH_NOT_A_SETTING", "1");
            let text = load_err(Some(Path::new("o.toml"))).to_string();
            assert!(text.contains("unknown setting `not_a_setting` (from env ORDERMESH_NOT_A_SETTING)"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_setting_and_the_source() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("ORDERMESH_HTTP", "not-an-address");
            let text = load_err(None).to_string();
            assert!(text.starts_with("invalid value for `http` (from env ORDERMESH_HTTP):"), "{text}");

            jail.clear_env();
            jail.create_file("o.toml", "rate_limit_per_second = \"fast\"\n")?;
            let text = load_err(Some(Path::new("o.toml"))).to_string();
            assert!(text.contains("`rate_limit_per_second` (from file"), "{text}");

            jail.set_env("ORDERMESH_JWT_ALGORITHM", "HS512");
            let err = load_err(Some(Path::new("o.toml")));
            assert!(err.settings().contains(&"jwt_algorithm"), "{err}");

            jail.clear_env();
            jail.create_file("o.toml", "jwt_secret = 12345\n")?;
            let text = load_err(Some(Path::new("o.toml"))).to_string();
            assert!(text.contains("`jwt_secret`") && !text.contains("12345"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn range_checks_name_the_setting_and_origin() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("ORDERMESH_RATE_LIMIT_PER_SECOND", "0");
            jail.set_env("ORDERMESH_ORDER_BODY_LIMIT_BYTES", "100");
            jail.set_env("ORDERMESH_JWT_SECRET", "short");
            jail.set_env("ORDERMESH_COMMIT_INTERVAL_US", "100001");
            jail.set_env("ORDERMESH_ADMISSION_WAIT_MS", "1001");
            jail.create_file(
                "o.toml",
                "payment_deadline_ms = 1000\npayment_call_timeout_ms = 2000\nrequest_timeout_ms = 0\n",
            )?;
            let err = load_err(Some(Path::new("o.toml")));
            let mut settings = err.settings();
            settings.sort_unstable();
            assert_eq!(
                settings,
                [
                    "admission_wait_ms",
                    "commit_interval_us",
                    "jwt_secret",
                    "order_body_limit_bytes",
                    "payment_deadline_ms",
                    "rate_limit_per_second",
                    "request_timeout_ms",
                ]
            );
            let text = err.to_string();
            assert!(
                text.contains("invalid value for `rate_limit_per_second` (from env ORDERMESH_RATE_LIMIT_PER_SECOND): must be greater than 0"),
                "{text}"
            );
            assert!(text.contains("`payment_deadline_ms` (from file"), "{text}");
            assert!(!text.contains("short"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn flags_are_reported_as_flags() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            #[derive(Serialize)]
            struct Bad {
                order_body_limit_bytes: Option<usize>,
            }
            let err = Config::load(None, Bad { order_body_limit_bytes: Some(10) }).unwrap_err();
            assert!(err.to_string().contains("(from flag --order-body-limit-bytes)"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load_err(Some(Path::new("nope.toml")));
            assert!(matches!(err, ConfigError::File { .. }), "{err}");
            jail.create_file("broken.toml", "http = \n")?;
            let err = load_err(Some(Path::new("broken.toml")));
            assert!(err.to_string().contains("broken.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn key_files_must_exist_and_algorithms_need_their_keys() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("ORDERMESH_JWT_ALGORITHM", "RS256");
            let err = load_err(None);
            assert_eq!(err.settings(), ["jwt_public_key_file"]);

            jail.set_env("ORDERMESH_JWT_PUBLIC_KEY_FILE", "/definitely/not/here.pem");
            let text = load_err(None).to_string();
            assert!(text.contains("`jwt_public_key_file` (from env ORDERMESH_JWT_PUBLIC_KEY_FILE)"), "{text}");

            let keys = keys_dir();
            jail.set_env("ORDERMESH_JWT_PUBLIC_KEY_FILE", keys.join("rs256-public.pem").display());
            jail.set_env("ORDERMESH_JWT_PRIVATE_KEY_FILE", keys.join("rs256-private.pem").display());
            let config = Config::load(None, Flags::default()).unwrap();
            let auth = config.authenticator().unwrap();
            let token = auth.mint("alice", crate::auth::Role::Customer, Duration::from_secs(60)).unwrap();
            assert_eq!(auth.verify(&token).unwrap().subject, "alice");
            Ok(())
        });
    }

    #[test]
    fn hs256_authenticator_from_env_secret() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let config = Config::load(None, Flags::default()).unwrap();
            let err = config.authenticator().unwrap_err();
            assert!(err.to_string().contains("jwt_secret"), "{err}");
            jail.set_env("ORDERMESH_JWT_SECRET", "a-secret-long-enough-for-hs256-signing");
            let config = Config::load(None, Flags::default()).unwrap();
            assert!(config.authenticator().unwrap().can_mint());
            Ok(())
        });
    }

    #[test]
    fn unit_flags_and_case_insensitive_algorithm() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("ORDERMESH_JWT_ALGORITHM", "eddsa");
            jail.set_env("ORDERMESH_JWT_PUBLIC_KEY_FILE", keys_dir().join("ed25519-public.pem").display());
            let config = Config::load(None, ()).unwrap();
            assert_eq!(config.jwt_algorithm, JwtAlgorithm::EdDSA);
            assert!(!config.authenticator().unwrap().can_mint());

            jail.set_env("ORDERMESH_JWT_ALGORITHM", "HS512");
            let text = Config::load(None, ()).unwrap_err().to_string();
            assert!(
                text.contains("`jwt_algorithm` (from env ORDERMESH_JWT_ALGORITHM): unknown JWT algorithm `HS512`"),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn closest_suggests_only_near_names() {
        assert_eq!(closest("jwt", &["http", "log"]), None);
        assert_eq!(closest("jwt_secert", &["jwt_secret", "log"]), Some("jwt_secret"));
        assert_eq!(closest("zzzzzzzzzz", &["jwt_secret", "log"]), None);
    }
}

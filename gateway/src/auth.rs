//! Who is calling: JWT verification and minting, and the axum extractor that gates `/v1`.
//!
//! Every `/v1` route needs `Authorization: Bearer <JWT>` carrying `sub` (the customer id),
//! `role`, `exp`, `iss` and `aud`. [`Authenticator`] is built once from a [`JwtConfig`] and
//! shared as `Arc<Authenticator>` in the router state; handlers take an [`Auth`] argument and
//! get a verified [`Principal`], or the request is answered with a 401 problem before the
//! handler runs.
//!
//! Security decisions, each closing a classic JWT hole:
//! - **One algorithm per key.** The `Validation` allows exactly the configured algorithm, so
//!   `alg: none`, and an HS256 token "signed" with our RSA public key (key confusion), are
//!   rejected before any signature check.
//! - **Required claims.** `sub`, `exp`, `iss`, `aud` are required by jsonwebtoken itself,
//!   `role` by us; a token lacking any of them is not "a customer with defaults".
//! - **Small leeway** for clock skew, from config (default 5 s, not jsonwebtoken's 60 s).
//! - **No secrets in errors.** [`AuthError`] details are fixed phrases and claim names.
//! - **Verified once per token text.** A client sends the same token with every request; the
//!   principal of a token that passed every check is kept (by the token's exact bytes, so
//!   nothing unverified can match it) and its `exp` and `nbf` are checked again on each use.
//!   Only tokens that verified enter, so garbage cannot push real ones out, and the cache holds
//!   at most 8 MiB of them (weighed by their size). The signature check
//!   and JSON parsing were 2-3% of `ordermesh dev`'s CPU under load with HS256 (an RS256
//!   verification costs several times more).
//!
//! jsonwebtoken 11 picks its crypto backend from cargo features; the workspace enables
//! exactly `aws_lc_rs` (with none or both it compiles and then panics at the first use).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::problem::Problem;

/// Subjects become keys of customer indexes and log fields; no real id is this long, and a
/// bound keeps a forged-but-signed token from planting megabyte keys.
const MAX_SUBJECT_BYTES: usize = 256;

/// Bytes of verified tokens kept (a token's text plus [`VERIFIED_ENTRY_BYTES`] each): 16,384
/// tokens of the usual few hundred bytes; fewer when they are large.
const VERIFIED_TOKENS_BYTES: u64 = 8 * 1024 * 1024;
/// What a kept token costs besides its text (its principal and the cache's bookkeeping).
const VERIFIED_ENTRY_BYTES: u64 = 128;

/// Tokens are a few hundred bytes; refuse to base64-decode anything absurd.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Minimum HS256 secret: RFC 7518 section 3.2 asks for a key at least as long as the hash.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Above this, "leeway" is no longer clock skew but a longer token lifetime.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Places and reads its own orders.
    Customer,
    /// Everything, including other customers' orders and inventory.
    Admin,
}

impl Role {
    /// The claim value (`customer`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Role::Customer),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role `{other}`, expected `customer` or `admin`")),
        }
    }
}

/// The claims of a token this server mints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The customer id (or an operator's name for admins).
    pub sub: String,
    /// What the subject may do.
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Who minted the token; must equal the configured issuer.
    pub iss: String,
    /// Who the token is for; must equal the configured audience.
    pub aud: String,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The token's `sub`: the customer id orders are filed under.
    pub subject: String,
    /// The token's `role`.
    pub role: Role,
}

impl Principal {
    /// Whether this principal is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// `Ok` for admins, a 403 problem otherwise.
    pub fn require_admin(&self) -> Result<(), Problem> {
        if self.is_admin() { Ok(()) } else { Err(Problem::forbidden("this operation needs the `admin` role")) }
    }

    /// Whether this principal may see or act on something owned by `customer_id`: its owner
    /// or an admin. Callers answer `false` with 404, not 403, so existence does not leak.
    pub fn may_access(&self, customer_id: &str) -> bool {
        self.is_admin() || self.subject == customer_id
    }
}

/// The signature algorithm, one per deployment. Written by its JOSE name (`HS256`, `RS256`,
/// `EdDSA`); parsing ignores case, since settings come from env vars typed by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret (`jwt_secret`): simplest, every verifier can also mint.
    #[default]
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256: verifiers need only the public key.
    RS256,
    /// Ed25519: like RS256 with small keys and fast signing.
    EdDSA,
}

impl TryFrom<String> for JwtAlgorithm {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<JwtAlgorithm> for &'static str {
    fn from(algorithm: JwtAlgorithm) -> Self {
        algorithm.as_str()
    }
}

impl JwtAlgorithm {
    fn jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }

    /// The JOSE name (`HS256`, `RS256`, `EdDSA`).
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JwtAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "HS256" => Ok(JwtAlgorithm::HS256),
            "RS256" => Ok(JwtAlgorithm::RS256),
            "EDDSA" => Ok(JwtAlgorithm::EdDSA),
            _ => Err(format!("unknown JWT algorithm `{s}`, expected HS256, RS256 or EdDSA")),
        }
    }
}

/// Key material and claim expectations, as read from configuration
/// (`crate::config::Config::jwt_config` reads the key files).
#[derive(Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// The one algorithm tokens must use.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret, at least [`MIN_HS256_SECRET_BYTES`].
    pub secret: Option<String>,
    /// RS256/EdDSA public key (SPKI PEM): needed to verify.
    pub public_key_pem: Option<String>,
    /// RS256/EdDSA private key (PKCS#8 PEM): needed only to mint.
    pub private_key_pem: Option<String>,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Clock skew tolerated on `exp` (and `nbf` when present), at most [`MAX_LEEWAY_SECS`].
    pub leeway_secs: u64,
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |present: bool| if present { "<redacted>" } else { "<none>" };
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("secret", &redacted(self.secret.is_some()))
            .field("public_key_pem", &self.public_key_pem.is_some())
            .field("private_key_pem", &redacted(self.private_key_pem.is_some()))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

/// Why an [`Authenticator`] could not be built. Each message names the setting to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    /// A setting the algorithm needs is absent.
    #[error("`{setting}` must be set when `jwt_algorithm` is {algorithm}")]
    Missing {
        /// The setting's name.
        setting: &'static str,
        /// The configured algorithm.
        algorithm: JwtAlgorithm,
    },
    /// The HS256 secret is too short to resist brute force.
    #[error("`jwt_secret` must be at least {MIN_HS256_SECRET_BYTES} bytes long (it has {len})")]
    WeakSecret {
        /// Its length in bytes.
        len: usize,
    },
    /// A PEM could not be parsed as a key of the configured algorithm.
    #[error("`{setting}` is not a valid {algorithm} key in PEM form: {reason}")]
    InvalidKey {
        /// The setting's name.
        setting: &'static str,
        /// The configured algorithm.
        algorithm: JwtAlgorithm,
        /// What the parser said (never key bytes).
        reason: String,
    },
    /// Tokens signed with the private key would not verify with the public key.
    #[error("`jwt_private_key_file` does not match `jwt_public_key_file`: a token it signs does not verify")]
    KeyMismatch,
    /// `jwt_issuer` or `jwt_audience` is empty.
    #[error("`{setting}` must not be empty")]
    Empty {
        /// The setting's name.
        setting: &'static str,
    },
    /// The leeway is too long to be clock skew.
    #[error("`jwt_leeway_secs` must be at most {MAX_LEEWAY_SECS} (it is {0})")]
    LeewayTooLong(u64),
}

/// Why a request's token was refused (all 401 except [`AuthError::Signing`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing bearer token: send `Authorization: Bearer <JWT>`")]
    Missing,
    /// The header or the token is not shaped like `Bearer header.claims.signature`.
    #[error("malformed bearer token")]
    Malformed,
    /// The signature does not verify with the configured key and algorithm (this includes
    /// `alg: none` and any algorithm other than the configured one).
    #[error("token signature is not valid for this server's key and algorithm")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway.
    #[error("token has expired")]
    Expired,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` is not the configured audience.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// Signed correctly but its claims are unusable; the reason names the claim.
    #[error("token is invalid: {0}")]
    Invalid(String),
    /// Minting failed (no private key, or the crypto backend refused); a server-side fault.
    #[error("cannot mint a token: {0}")]
    Signing(String),
}

impl AuthError {
    /// A stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::Invalid(_) => "invalid",
            AuthError::Signing(_) => "signing",
        }
    }

    fn from_jwt(err: &jsonwebtoken::errors::Error) -> Self {
        match err.kind() {
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => AuthError::Malformed,
            // The header or claims are not the JSON we expect; we cannot tell which here.
            ErrorKind::Json(_) => {
                AuthError::Invalid("header or claims could not be decoded (unsupported `alg`?)".into())
            }
            ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::ImmatureSignature => AuthError::Invalid("token is not valid yet (`nbf`)".into()),
            ErrorKind::MissingRequiredClaim(claim) => AuthError::Invalid(format!("missing required claim `{claim}`")),
            ErrorKind::InvalidClaimFormat(claim) => AuthError::Invalid(format!("claim `{claim}` has the wrong format")),
            // Key problems surface at startup (`Authenticator::new` probes the keys); if one
            // shows up here anyway, the caller still only learns that the token failed.
            _ => AuthError::BadSignature,
        }
    }
}

impl From<AuthError> for Problem {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Signing(_) => Problem::internal(),
            AuthError::Missing => Problem::unauthorized(err.to_string()),
            // RFC 6750 section 3: a presented but unusable token is `invalid_token`.
            _ => Problem::unauthorized(err.to_string())
                .with_www_authenticate(HeaderValue::from_static(r#"Bearer realm="ordermesh", error="invalid_token""#)),
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// The claims we read back. Optional so that a missing `sub`/`role` is reported by name
/// instead of as a generic JSON error; jsonwebtoken checks `exp`, `iss`, `aud` itself.
#[derive(Deserialize)]
struct ReceivedClaims {
    sub: Option<String>,
    role: Option<String>,
    /// Checked by jsonwebtoken; kept to check again when the token is used again.
    exp: Option<NumericDate>,
    nbf: Option<NumericDate>,
}

/// A JWT date as jsonwebtoken reads it: whole seconds, or fractional ones rounded (RFC 7519
/// allows both).
#[derive(Clone, Copy, Deserialize)]
#[serde(untagged)]
enum NumericDate {
    Seconds(u64),
    Fractional(f64),
}

impl NumericDate {
    fn seconds(self) -> Option<u64> {
        match self {
            Self::Seconds(s) => Some(s),
            // jsonwebtoken's own conversion (its validation's `visit_f64`).
            Self::Fractional(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Some(f.round() as u64),
            Self::Fractional(_) => None,
        }
    }
}

/// A token that passed every check, and the times it is valid between.
#[derive(Clone)]
struct Verified {
    principal: Principal,
    exp: u64,
    nbf: Option<u64>,
}

/// Weighs a kept token by its size, so large tokens cannot make the cache large.
#[derive(Clone)]
struct TokenBytes;

impl quick_cache::Weighter<String, Verified> for TokenBytes {
    fn weight(&self, token: &String, _: &Verified) -> u64 {
        token.len() as u64 + VERIFIED_ENTRY_BYTES
    }
}

/// Verifies (and, with a private key or secret, mints) tokens of one algorithm.
pub struct Authenticator {
    algorithm: JwtAlgorithm,
    decoding: DecodingKey,
    /// `None` when only a public key is configured: this process verifies but cannot mint.
    encoding: Option<EncodingKey>,
    validation: Validation,
    issuer: String,
    audience: String,
    /// Tokens that verified, by their text (see the module docs).
    verified: quick_cache::sync::Cache<String, Verified, TokenBytes>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .field("can_mint", &self.encoding.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Parses the keys and fixes the validation rules. Fails with the setting to fix.
    pub fn new(config: &JwtConfig) -> Result<Self, AuthConfigError> {
        if config.issuer.is_empty() {
            return Err(AuthConfigError::Empty { setting: "jwt_issuer" });
        }
        if config.audience.is_empty() {
            return Err(AuthConfigError::Empty { setting: "jwt_audience" });
        }
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthConfigError::LeewayTooLong(config.leeway_secs));
        }
        let algorithm = config.algorithm;
        let (decoding, encoding) = match algorithm {
            JwtAlgorithm::HS256 => {
                let secret =
                    config.secret.as_deref().ok_or(AuthConfigError::Missing { setting: "jwt_secret", algorithm })?;
                if secret.len() < MIN_HS256_SECRET_BYTES {
                    return Err(AuthConfigError::WeakSecret { len: secret.len() });
                }
                (DecodingKey::from_secret(secret.as_bytes()), Some(EncodingKey::from_secret(secret.as_bytes())))
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::EdDSA => {
                let public = config
                    .public_key_pem
                    .as_deref()
                    .ok_or(AuthConfigError::Missing { setting: "jwt_public_key_file", algorithm })?;
                let invalid = |setting: &'static str| {
                    move |err: jsonwebtoken::errors::Error| AuthConfigError::InvalidKey {
                        setting,
                        algorithm,
                        reason: err.to_string(),
                    }
                };
                let decoding = match algorithm {
                    JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(public.as_bytes()),
                    _ => DecodingKey::from_ed_pem(public.as_bytes()),
                }
                .map_err(invalid("jwt_public_key_file"))?;
                let encoding = config
                    .private_key_pem
                    .as_deref()
                    .map(|private| match algorithm {
                        JwtAlgorithm::RS256 => EncodingKey::from_rsa_pem(private.as_bytes()),
                        _ => EncodingKey::from_ed_pem(private.as_bytes()),
                    })
                    .transpose()
                    .map_err(invalid("jwt_private_key_file"))?;
                (decoding, encoding)
            }
        };

        let mut validation = Validation::new(algorithm.jsonwebtoken());
        validation.set_required_spec_claims(&["sub", "exp", "iss", "aud"]);
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        // Honour `nbf` when a token carries one; none of ours do.
        validation.validate_nbf = true;
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);

        let authenticator = Self {
            algorithm,
            decoding,
            encoding,
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            verified: quick_cache::sync::Cache::with_weighter(
                (VERIFIED_TOKENS_BYTES / 512) as usize,
                VERIFIED_TOKENS_BYTES,
                TokenBytes,
            ),
        };
        authenticator.probe_keys()?;
        Ok(authenticator)
    }

    /// PEM parsing only checks the envelope; the crypto backend parses the key at first use.
    /// Sign and verify once now, so a bad or mismatched key fails at startup, not per request.
    fn probe_keys(&self) -> Result<(), AuthConfigError> {
        if self.encoding.is_none() {
            return Ok(());
        }
        let token = self.mint("startup-key-probe", Role::Customer, Duration::from_secs(60)).map_err(|err| {
            AuthConfigError::InvalidKey {
                setting: "jwt_private_key_file",
                algorithm: self.algorithm,
                reason: err.to_string(),
            }
        })?;
        match self.check(&token) {
            Ok(_) => Ok(()),
            Err(_) => Err(AuthConfigError::KeyMismatch),
        }
    }

    /// The configured algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// Whether [`Authenticator::mint`] can work (a secret or a private key is configured).
    pub fn can_mint(&self) -> bool {
        self.encoding.is_some()
    }

    /// Verifies a compact JWT (without the `Bearer ` prefix) and returns who it speaks for.
    pub fn verify(&self, bearer_token: &str) -> Result<Principal, AuthError> {
        self.verify_at(bearer_token, jsonwebtoken::get_current_timestamp())
    }

    /// [`Authenticator::verify`] at `now` (seconds since the epoch) for a token seen before;
    /// jsonwebtoken reads the clock itself for one it has to check.
    fn verify_at(&self, bearer_token: &str, now: u64) -> Result<Principal, AuthError> {
        if bearer_token.is_empty() {
            return Err(AuthError::Missing);
        }
        if bearer_token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        if let Some(known) = self.verified.get(bearer_token) {
            // jsonwebtoken's own rules (`validate` in its validation.rs): expired when `exp`,
            // less the minimum remaining life, is more than the leeway in the past; not yet
            // valid when `nbf` is more than the leeway in the future (then the full check below
            // gives jsonwebtoken's own error).
            let Validation { leeway, reject_tokens_expiring_in_less_than: min_life, .. } = self.validation;
            if known.exp.saturating_sub(min_life) < now.saturating_sub(leeway) {
                self.verified.remove(bearer_token);
                return Err(AuthError::Expired);
            }
            if known.nbf.is_none_or(|nbf| nbf <= now.saturating_add(leeway)) {
                return Ok(known.principal);
            }
        }
        let (principal, verified) = self.check(bearer_token)?;
        if let Some(verified) = verified {
            self.verified.insert(bearer_token.to_owned(), verified);
        }
        Ok(principal)
    }

    /// The full check of a token: signature, registered claims, then ours; and what to keep of
    /// it (nothing if its dates are not what jsonwebtoken itself would read).
    fn check(&self, bearer_token: &str) -> Result<(Principal, Option<Verified>), AuthError> {
        let data = jsonwebtoken::decode::<ReceivedClaims>(bearer_token, &self.decoding, &self.validation)
            .map_err(|err| AuthError::from_jwt(&err))?;
        let ReceivedClaims { sub, role, exp, nbf } = data.claims;
        let subject = sub.ok_or_else(|| AuthError::Invalid("missing required claim `sub`".into()))?;
        if subject.is_empty() {
            return Err(AuthError::Invalid("claim `sub` is empty".into()));
        }
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(AuthError::Invalid(format!("claim `sub` is longer than {MAX_SUBJECT_BYTES} bytes")));
        }
        let role = role.ok_or_else(|| AuthError::Invalid("missing required claim `role`".into()))?;
        let role = role
            .parse::<Role>()
            .map_err(|_| AuthError::Invalid("claim `role` must be `customer` or `admin`".into()))?;
        let principal = Principal { subject, role };
        // `Some(None)`: no `nbf`; `None`: one that cannot be read as seconds.
        let nbf = nbf.map_or(Some(None), |nbf| nbf.seconds().map(Some));
        let verified = exp.and_then(|exp| exp.seconds()).zip(nbf);
        let verified = verified.map(|(exp, nbf)| Verified { principal: principal.clone(), exp, nbf });
        Ok((principal, verified))
    }

    /// Signs a token for `subject` with `role`, valid for `ttl` from now.
    pub fn mint(&self, subject: &str, role: Role, ttl: Duration) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            AuthError::Signing(format!("no signing key configured (set `jwt_private_key_file` for {})", self.algorithm))
        })?;
        if subject.is_empty() || subject.len() > MAX_SUBJECT_BYTES {
            return Err(AuthError::Signing(format!("subject must be 1 to {MAX_SUBJECT_BYTES} bytes long")));
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: subject.to_owned(),
            role,
            exp: now.saturating_add(ttl.as_secs()),
            iat: now,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm.jsonwebtoken()), &claims, key)
            .map_err(|err| AuthError::Signing(err.to_string()))
    }
}

/// The token in an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::Missing)?;
    // Two Authorization headers: proxies and we might disagree on which one counts.
    if values.next().is_some() {
        return Err(AuthError::Malformed);
    }
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    // RFC 9110 section 11.1: the scheme is case-insensitive.
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// A verified caller, as a handler argument: `async fn h(Auth(who): Auth) { .. }`.
///
/// If a middleware already verified the token (see [`authenticate`]) the [`Principal`] is
/// taken from the request extensions, so a token is checked once per request. Only server
/// code can insert extensions, so a client cannot forge one.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

impl<S> FromRequestParts<S> for Auth
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(Self(principal.clone()));
        }
        let authenticator = Arc::<Authenticator>::from_ref(state);
        let principal = verify_headers(&authenticator, &parts.headers)?;
        parts.extensions.insert(principal.clone());
        Ok(Self(principal))
    }
}

/// Middleware (`axum::middleware::from_fn_with_state(authenticator, authenticate)`) that
/// verifies the token before inner layers run and stores the [`Principal`] in the request
/// extensions: what a rate limiter keyed by subject needs, and what [`Auth`] then reuses.
pub async fn authenticate(
    State(authenticator): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    match verify_headers(&authenticator, request.headers()) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(err) => Problem::from(err).into_response(),
    }
}

fn verify_headers(authenticator: &Authenticator, headers: &HeaderMap) -> Result<Principal, AuthError> {
    let result = bearer_token(headers).and_then(|token| authenticator.verify(token));
    if let Err(err) = &result {
        metrics::counter!("ordermesh_auth_rejected_total", "reason" => err.kind()).increment(1);
        debug!(reason = err.kind(), %err, "bearer token rejected");
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::http::{StatusCode, header::WWW_AUTHENTICATE};
    use axum::routing::get;
    use jsonwebtoken::get_current_timestamp;
    use serde_json::json;
    use tower::ServiceExt;

    const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";
    const RS_PUBLIC: &str = include_str!("../tests/keys/rs256-public.pem");
    const RS_PRIVATE: &str = include_str!("../tests/keys/rs256-private.pem");
    const RS_OTHER_PRIVATE: &str = include_str!("../tests/keys/rs256-other-private.pem");
    const ED_PUBLIC: &str = include_str!("../tests/keys/ed25519-public.pem");
    const ED_PRIVATE: &str = include_str!("../tests/keys/ed25519-private.pem");

    fn hs256() -> JwtConfig {
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: Some(SECRET.into()),
            public_key_pem: None,
            private_key_pem: None,
            issuer: "ordermesh".into(),
            audience: "ordermesh".into(),
            leeway_secs: 5,
        }
    }

    fn asymmetric(algorithm: JwtAlgorithm, public: &str, private: Option<&str>) -> JwtConfig {
        JwtConfig {
            algorithm,
            secret: None,
            public_key_pem: Some(public.into()),
            private_key_pem: private.map(Into::into),
            ..hs256()
        }
    }

    fn claims(exp_offset: i64) -> serde_json::Value {
        let now = get_current_timestamp();
        json!({
            "sub": "alice",
            "role": "customer",
            "iat": now,
            "exp": now.saturating_add_signed(exp_offset),
            "iss": "ordermesh",
            "aud": "ordermesh",
        })
    }

    fn sign_hs256(claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        // base64url without padding, by hand, so the test does not trust the library it checks.
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    #[test]
    fn valid_hs256_token_is_accepted() {
        let auth = Authenticator::new(&hs256()).unwrap();
        let principal = auth.verify(&sign_hs256(&claims(60), SECRET.as_bytes())).unwrap();
        assert_eq!(principal, Principal { subject: "alice".into(), role: Role::Customer });
        let admin = auth.mint("root", Role::Admin, Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&admin).unwrap().role, Role::Admin);
    }

    #[test]
    fn expired_token_is_rejected_beyond_the_leeway_only() {
        let auth = Authenticator::new(&hs256()).unwrap();
        let expired = sign_hs256(&claims(-60), SECRET.as_bytes());
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let within_leeway = sign_hs256(&claims(-2), SECRET.as_bytes());
        assert!(auth.verify(&within_leeway).is_ok());
    }

    #[test]
    fn a_verified_token_is_kept_and_still_expires() {
        let auth = Authenticator::new(&hs256()).unwrap();
        let token = sign_hs256(&claims(60), SECRET.as_bytes());
        let now = get_current_timestamp();
        assert!(auth.verify_at(&token, now).is_ok());
        assert!(auth.verified.get(token.as_str()).is_some(), "a verified token is kept");
        assert_eq!(auth.verify_at(&token, now + 60).unwrap().subject, "alice");
        assert_eq!(auth.verify_at(&token, now + 3600), Err(AuthError::Expired));
        assert!(auth.verified.get(token.as_str()).is_none(), "an expired token is forgotten");

        // RFC 7519 dates may be fractional; jsonwebtoken rounds them, and so does the cache.
        let mut fractional = claims(60);
        fractional["exp"] = json!(fractional["exp"].as_u64().unwrap() as f64 + 0.4);
        let fractional = sign_hs256(&fractional, SECRET.as_bytes());
        assert!(auth.verify_at(&fractional, now).is_ok());
        assert!(auth.verified.get(fractional.as_str()).is_some());
        assert_eq!(auth.verify_at(&fractional, now + 3600), Err(AuthError::Expired));

        let forged = sign_hs256(&claims(60), b"another-secret-that-is-at-least-32-bytes-long");
        assert!(auth.verify(&forged).is_err());
        assert!(auth.verify(&forged).is_err(), "a token that failed is checked again, not kept");
        assert!(auth.verified.get(forged.as_str()).is_none());
    }

    #[test]
    fn wrong_issuer_and_audience_are_rejected() {
        let auth = Authenticator::new(&hs256()).unwrap();
        let mut wrong_iss = claims(60);
        wrong_iss["iss"] = json!("someone-else");
        assert_eq!(auth.verify(&sign_hs256(&wrong_iss, SECRET.as_bytes())), Err(AuthError::WrongIssuer));
        let mut wrong_aud = claims(60);
        wrong_aud["aud"] = json!("another-api");
        assert_eq!(auth.verify(&sign_hs256(&wrong_aud, SECRET.as_bytes())), Err(AuthError::WrongAudience));
    }

    #[test]
    fn bad_signature_is_rejected() {
        let auth = Authenticator::new(&hs256()).unwrap();
        let forged = sign_hs256(&claims(60), b"another-secret-that-is-32-bytes-or-more!");
        assert_eq!(auth.verify(&forged), Err(AuthError::BadSignature));
        // Tampered claims under the original signature.
        let token = sign_hs256(&claims(60), SECRET.as_bytes());
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut admin = claims(60);
        admin["role"] = json!("admin");
        let tampered_claims = b64(admin.to_string().as_bytes());
        parts[1] = &tampered_claims;
        assert_eq!(auth.verify(&parts.join(".")), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_is_rejected() {
        let auth = Authenticator::new(&hs256()).unwrap();
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64(claims(60).to_string().as_bytes());
        for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
            let err = auth.verify(&token).unwrap_err();
            assert!(!matches!(err, AuthError::Signing(_)), "{token}: {err:?}");
        }
    }

    #[test]
    fn missing_role_or_sub_is_rejected() {
        let auth = Authenticator::new(&hs256()).unwrap();
        for claim in ["role", "sub", "exp", "iss", "aud"] {
            let mut partial = claims(60);
            partial.as_object_mut().unwrap().remove(claim);
            let err = auth.verify(&sign_hs256(&partial, SECRET.as_bytes())).unwrap_err();
            assert!(matches!(&err, AuthError::Invalid(why) if why.contains(claim)), "{claim}: {err:?}");
        }
        let mut empty_sub = claims(60);
        empty_sub["sub"] = json!("");
        assert!(matches!(auth.verify(&sign_hs256(&empty_sub, SECRET.as_bytes())), Err(AuthError::Invalid(_))));
        let mut bad_role = claims(60);
        bad_role["role"] = json!("superuser");
        assert!(matches!(auth.verify(&sign_hs256(&bad_role, SECRET.as_bytes())), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn garbage_tokens_are_malformed_not_panics() {
        let auth = Authenticator::new(&hs256()).unwrap();
        for token in ["x", "a.b.c", "....", "Zm9v.Zm9v.Zm9v", &"a".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(auth.verify(token).is_err(), "{token}");
        }
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn hs256_token_signed_with_the_rsa_public_key_is_rejected() {
        let auth = Authenticator::new(&asymmetric(JwtAlgorithm::RS256, RS_PUBLIC, None)).unwrap();
        let confused = sign_hs256(&claims(60), RS_PUBLIC.as_bytes());
        assert_eq!(auth.verify(&confused), Err(AuthError::BadSignature));
    }

    #[test]
    fn rs256_roundtrip_and_verify_only_mode() {
        let minter = Authenticator::new(&asymmetric(JwtAlgorithm::RS256, RS_PUBLIC, Some(RS_PRIVATE))).unwrap();
        let token = minter.mint("bob", Role::Admin, Duration::from_secs(60)).unwrap();
        let verifier = Authenticator::new(&asymmetric(JwtAlgorithm::RS256, RS_PUBLIC, None)).unwrap();
        assert!(!verifier.can_mint());
        assert_eq!(verifier.verify(&token).unwrap(), Principal { subject: "bob".into(), role: Role::Admin });
        assert!(matches!(verifier.mint("bob", Role::Admin, Duration::from_secs(1)), Err(AuthError::Signing(_))));
        // Signed by a different RSA key.
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims(60),
            &EncodingKey::from_rsa_pem(RS_OTHER_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(verifier.verify(&other), Err(AuthError::BadSignature));
        // An EdDSA-only verifier refuses RS256 tokens.
        let ed = Authenticator::new(&asymmetric(JwtAlgorithm::EdDSA, ED_PUBLIC, None)).unwrap();
        assert_eq!(ed.verify(&token), Err(AuthError::BadSignature));
    }

    #[test]
    fn eddsa_roundtrip() {
        let auth = Authenticator::new(&asymmetric(JwtAlgorithm::EdDSA, ED_PUBLIC, Some(ED_PRIVATE))).unwrap();
        let token = auth.mint("carol", Role::Customer, Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token).unwrap().subject, "carol");
    }

    #[test]
    fn configuration_errors_name_the_setting() {
        let short = JwtConfig { secret: Some("short".into()), ..hs256() };
        assert!(Authenticator::new(&short).unwrap_err().to_string().contains("jwt_secret"));
        let missing = JwtConfig { secret: None, ..hs256() };
        assert!(Authenticator::new(&missing).unwrap_err().to_string().contains("jwt_secret"));
        let no_public = JwtConfig { public_key_pem: None, ..asymmetric(JwtAlgorithm::RS256, RS_PUBLIC, None) };
        assert!(Authenticator::new(&no_public).unwrap_err().to_string().contains("jwt_public_key_file"));
        let wrong_family = asymmetric(JwtAlgorithm::RS256, ED_PUBLIC, None);
        assert!(Authenticator::new(&wrong_family).unwrap_err().to_string().contains("jwt_public_key_file"));
        let mismatch = asymmetric(JwtAlgorithm::RS256, RS_PUBLIC, Some(RS_OTHER_PRIVATE));
        assert_eq!(Authenticator::new(&mismatch).unwrap_err(), AuthConfigError::KeyMismatch);
        let leeway = JwtConfig { leeway_secs: 3600, ..hs256() };
        assert_eq!(Authenticator::new(&leeway).unwrap_err(), AuthConfigError::LeewayTooLong(3600));
        // The secret never appears in errors or debug output.
        assert!(!format!("{:?}", hs256()).contains(SECRET));
        assert!(!format!("{:?}", Authenticator::new(&hs256()).unwrap()).contains(SECRET));
    }

    #[test]
    fn bearer_header_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), Err(AuthError::Missing));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer abc"));
        assert_eq!(bearer_token(&headers), Ok("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer   ", "abc"] {
            headers.insert(AUTHORIZATION, HeaderValue::from_static(bad));
            assert_eq!(bearer_token(&headers), Err(AuthError::Malformed), "{bad}");
        }
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        headers.append(AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(bearer_token(&headers), Err(AuthError::Malformed));
    }

    async fn whoami(Auth(principal): Auth) -> String {
        format!("{}:{}", principal.subject, principal.role)
    }

    async fn admin_only(Auth(principal): Auth) -> Result<&'static str, Problem> {
        principal.require_admin()?;
        Ok("ok")
    }

    fn app() -> (Router, Arc<Authenticator>) {
        let auth = Arc::new(Authenticator::new(&hs256()).unwrap());
        let router =
            Router::new().route("/whoami", get(whoami)).route("/admin", get(admin_only)).with_state(auth.clone());
        (router, auth)
    }

    async fn call(router: Router, path: &str, token: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut request = Request::get(path);
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = router.oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn extractor_accepts_valid_tokens_and_answers_401_problems() {
        let (router, auth) = app();
        let token = auth.mint("alice", Role::Customer, Duration::from_secs(60)).unwrap();
        let (status, _, body) = call(router.clone(), "/whoami", Some(&token)).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "alice:customer"));

        let (status, headers, body) = call(router.clone(), "/whoami", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers.get(WWW_AUTHENTICATE).unwrap(), r#"Bearer realm="ordermesh""#);
        assert_eq!(headers.get("content-type").unwrap(), "application/problem+json");
        let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["status"], 401);
        assert!(problem["detail"].as_str().unwrap().contains("missing bearer token"));

        let expired = sign_hs256(&claims(-60), SECRET.as_bytes());
        let (status, headers, body) = call(router, "/whoami", Some(&expired)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.get(WWW_AUTHENTICATE).unwrap().to_str().unwrap().contains("invalid_token"));
        assert!(body.contains("expired"), "{body}");
    }

    #[tokio::test]
    async fn wrong_role_is_403() {
        let (router, auth) = app();
        let customer = auth.mint("alice", Role::Customer, Duration::from_secs(60)).unwrap();
        let (status, _, body) = call(router.clone(), "/admin", Some(&customer)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("admin"), "{body}");
        let admin = auth.mint("root", Role::Admin, Duration::from_secs(60)).unwrap();
        assert_eq!(call(router, "/admin", Some(&admin)).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn middleware_verifies_once_for_inner_layers() {
        let auth = Arc::new(Authenticator::new(&hs256()).unwrap());
        let router = Router::new()
            .route("/whoami", get(whoami))
            .route_layer(axum::middleware::from_fn_with_state(auth.clone(), authenticate))
            .with_state(auth.clone());
        let token = auth.mint("dave", Role::Admin, Duration::from_secs(60)).unwrap();
        let (status, _, body) = call(router.clone(), "/whoami", Some(&token)).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "dave:admin"));
        assert_eq!(call(router, "/whoami", Some("nope")).await.0, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn principal_access_rules() {
        let alice = Principal { subject: "alice".into(), role: Role::Customer };
        assert!(alice.may_access("alice") && !alice.may_access("bob"));
        assert_eq!(alice.require_admin().unwrap_err().status(), StatusCode::FORBIDDEN);
        let root = Principal { subject: "root".into(), role: Role::Admin };
        assert!(root.may_access("bob") && root.require_admin().is_ok());
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert!("root".parse::<Role>().is_err());
    }
}

//! RFC 9457 problem details: the one shape every gateway error takes on the wire.
//!
//! The contract promises that *every* error is `application/problem+json` with at least
//! `type`, `title`, `status` and `detail`, so clients and scripts can branch on `status` and
//! `type` without parsing prose. [`Problem`] is that response; it has one constructor per
//! status the contract uses, so a handler cannot invent a status nobody documented.
//!
//! [`JsonBody`] replaces `axum::Json` as a request extractor because axum's own JSON
//! rejections are `text/plain` and use statuses that differ from the contract (axum answers
//! 422 to an unknown field, the contract says 400). Mapping, decided here once:
//!
//! | what went wrong | status |
//! | --- | --- |
//! | body is not JSON at all (syntax error, truncated) | 400 |
//! | unknown field, or a field of the wrong JSON type | 400 |
//! | valid JSON that breaks a rule serde can see: missing field, value out of the type's range, unknown enum variant | 422 |
//! | `Content-Type` missing or not JSON | 415 (RFC 9110's status for it; axum agrees) |
//! | body over the route's limit | 413 |
//! | body could not be read (client went away) | 400 |
//!
//! Service errors map to statuses here too (`impl From<ServiceError> for Problem`), once:
//! `NotFound` 404, `Invalid` and `IdempotencyMismatch` 422, `Unavailable` 503 with
//! `Retry-After`, `Storage` 500 with the cause logged, never sent.
//!
//! The 413 only becomes a problem when the limit is enforced *while the extractor reads the
//! body*: use `axum::extract::DefaultBodyLimit::max(n)` on the route. tower-http's
//! `RequestBodyLimitLayer` answers an oversized `Content-Length` on its own with a plain-text
//! 413 before any extractor runs.

use std::borrow::Cow;
use std::fmt;

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, MissingJsonContentType};
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ordermesh_actors::ServiceError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Every problem `type` is this prefix plus a slug, e.g. `https://ordermesh.dev/problems/not-found`.
pub const PROBLEM_TYPE_PREFIX: &str = "https://ordermesh.dev/problems/";

/// The media type of every error body (RFC 9457 section 3).
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Details echo client input (serde messages quote the offending value); a cap keeps a
/// hostile 60 KiB field name from being reflected back in full.
const MAX_DETAIL_CHARS: usize = 300;

/// An RFC 9457 problem, ready to be returned from a handler or an extractor.
///
/// Build it with the constructor for the status (`Problem::not_found(..)`), optionally add
/// members with [`Problem::with_extension`], and return it: it implements [`IntoResponse`].
///
/// Boxed so that `Result<T, Problem>`, the return type of most handlers, stays one pointer
/// wide on the happy path (and clippy's `result_large_err` stays quiet for every caller).
#[derive(Debug, Clone)]
pub struct Problem(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    /// The HTTP status, repeated in the body's `status` member as RFC 9457 asks.
    status: StatusCode,
    /// Stable identifier clients branch on; never changes wording the way `detail` may.
    type_uri: Cow<'static, str>,
    /// Short summary that is the same for every occurrence of this `type`.
    title: Cow<'static, str>,
    /// What went wrong this time, for humans. Never holds secrets or internal error text.
    detail: String,
    /// Seconds a client should wait (`Retry-After`), for 429 and 503.
    retry_after_secs: Option<u64>,
    /// `WWW-Authenticate` challenge, which RFC 9110 requires on every 401.
    www_authenticate: Option<HeaderValue>,
    /// Extra members (RFC 9457 section 3.2), e.g. the field that failed validation.
    extensions: serde_json::Map<String, serde_json::Value>,
}

/// The JSON body of a problem, for clients (the load generator, tests) that parse one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemBody {
    /// URI identifying the problem type.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Explanation of this occurrence.
    pub detail: String,
    /// Extension members.
    #[serde(flatten)]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    /// A problem with any status; prefer the named constructors, which keep `type` and
    /// `title` consistent across the gateway. `slug` becomes the last segment of `type`.
    pub fn new(status: StatusCode, slug: &str, title: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            status,
            type_uri: Cow::Owned(format!("{PROBLEM_TYPE_PREFIX}{slug}")),
            title: title.into(),
            detail: truncate(detail.into()),
            retry_after_secs: None,
            www_authenticate: None,
            extensions: serde_json::Map::new(),
        }))
    }

    /// 400: the request is malformed (not JSON, unknown field, over-long `Idempotency-Key`).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request", detail)
    }

    /// 401 with a bare `WWW-Authenticate: Bearer` challenge (no credentials were sent).
    /// [`crate::auth::AuthError`] converts to a 401 whose challenge also says `invalid_token`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail)
            .with_www_authenticate(HeaderValue::from_static(r#"Bearer realm="ordermesh""#))
    }

    /// 403: the token is valid but its role may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 404: no such resource, or one the caller may not know exists (another customer's order).
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409: the request conflicts with the resource's current state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    /// 413: the body is over the route's size limit.
    pub fn payload_too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large", detail)
    }

    /// 415: the body is not declared as JSON.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type", detail)
    }

    /// 422: well-formed JSON that breaks a rule (no items, quantity out of range, reused
    /// `Idempotency-Key` with another body). Name the rule in `detail`.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable-content", "Unprocessable content", detail)
    }

    /// 429 + `Retry-After`: this subject is over its rate limit.
    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-requests",
            "Too many requests",
            format!("rate limit exceeded; retry in {retry_after_secs} s"),
        )
        .with_retry_after(retry_after_secs)
    }

    /// 503 + `Retry-After`: the owning node is unreachable, the node is overloaded or draining.
    pub fn unavailable(retry_after_secs: u64, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", detail)
            .with_retry_after(retry_after_secs)
    }

    /// 500 with a fixed detail: the cause belongs in the log, never in the response.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal server error",
            "the server failed to handle the request; the error has been logged",
        )
    }

    /// 504: a call the gateway made (to the node owning the entity) did not answer in time.
    /// The outcome is unknown, so clients should retry with the same `Idempotency-Key`.
    pub fn gateway_timeout(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "Gateway timeout", detail)
    }

    /// Sets `Retry-After`. Clamped to at least 1 s: a `0` invites clients to hammer a
    /// server that just said it is saturated.
    #[must_use]
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.0.retry_after_secs = Some(secs.max(1));
        self
    }

    /// Sets the `WWW-Authenticate` challenge.
    #[must_use]
    pub fn with_www_authenticate(mut self, challenge: HeaderValue) -> Self {
        self.0.www_authenticate = Some(challenge);
        self
    }

    /// Adds an extension member. The standard members (`type`, `title`, `status`, `detail`)
    /// cannot be overwritten this way.
    #[must_use]
    pub fn with_extension(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        let key = key.into();
        if !matches!(key.as_str(), "type" | "title" | "status" | "detail") {
            self.0.extensions.insert(key, value.into());
        }
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The `type` URI.
    pub fn type_uri(&self) -> &str {
        &self.0.type_uri
    }

    /// The `title`.
    pub fn title(&self) -> &str {
        &self.0.title
    }

    /// The `detail`.
    pub fn detail(&self) -> &str {
        &self.0.detail
    }

    /// The `Retry-After` seconds, if any.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.0.retry_after_secs
    }

    /// The body as it will be serialized.
    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            type_uri: self.0.type_uri.clone().into_owned(),
            title: self.0.title.clone().into_owned(),
            status: self.0.status.as_u16(),
            detail: self.0.detail.clone(),
            extensions: self.0.extensions.clone(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.0.status.as_u16(), self.0.title, self.0.detail)
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = match serde_json::to_vec(&self.body()) {
            Ok(body) => body,
            // Only a non-string map key could fail here, and extensions are a string map;
            // still, an error path must not panic.
            Err(_) => br#"{"type":"about:blank","title":"Internal server error","status":500,"detail":"failed to encode the error"}"#.to_vec(),
        };
        let mut response = (self.0.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
        if let Some(secs) = self.0.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.0.www_authenticate {
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl From<JsonRejection> for Problem {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(err) => {
                Problem::bad_request(format!("request body is not valid JSON: {}", cause(&err)))
            }
            JsonRejection::JsonDataError(err) => {
                let message = cause(&err);
                match classify_data_error(&message) {
                    DataError::Shape => {
                        Problem::bad_request(format!("request body does not match the expected shape: {message}"))
                    }
                    DataError::Rule => Problem::unprocessable(format!("request body breaks a rule: {message}")),
                }
            }
            JsonRejection::MissingJsonContentType(_) => {
                Problem::unsupported_media_type("send the body with `Content-Type: application/json`")
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Problem::payload_too_large("request body exceeds the size limit of this route")
            }
            // Includes a client that disconnected mid-body and variants axum may add later.
            _ => Problem::bad_request("could not read the request body"),
        }
    }
}

/// Which of the contract's two statuses a serde data error deserves.
#[derive(Debug, PartialEq, Eq)]
enum DataError {
    /// 400: the document is not the documented shape (unknown field, wrong JSON type).
    Shape,
    /// 422: the shape is right but a value breaks a rule (missing field, out of range).
    Rule,
}

/// serde reports data errors only as text; its `de::Error` default messages are stable and
/// pinned by the tests below. The message is `path: kind ... at line L column C`, and only
/// the path and the quoted parts after the kind phrase carry client text, so the phrase that
/// appears first is the real kind.
fn classify_data_error(message: &str) -> DataError {
    let first = |phrase: &str| message.find(phrase).unwrap_or(usize::MAX);
    let shape = first("unknown field `").min(first("invalid type: "));
    let rule = first("missing field `")
        .min(first("invalid value: "))
        .min(first("invalid length "))
        .min(first("unknown variant `"));
    if shape < rule { DataError::Shape } else { DataError::Rule }
}

/// The serde message inside an axum rejection, without axum's capitalised prefix.
fn cause(err: &dyn std::error::Error) -> String {
    err.source().map_or_else(|| err.to_string(), ToString::to_string)
}

fn truncate(mut detail: String) -> String {
    if let Some((cut, _)) = detail.char_indices().nth(MAX_DETAIL_CHARS) {
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

/// The one mapping from a service error to a status: the contract's table, decided here so
/// no handler picks its own.
impl From<ServiceError> for Problem {
    fn from(err: ServiceError) -> Self {
        match &err {
            ServiceError::NotFound => Problem::not_found("no such resource"),
            ServiceError::Invalid(reason) => Problem::unprocessable(reason.clone()),
            ServiceError::IdempotencyMismatch => Problem::unprocessable(
                "this `Idempotency-Key` was already used with a different request body; use a new key for a new order",
            ),
            ServiceError::Unavailable { service, detail } => {
                // Debug, not warn: these come by the thousand a second exactly when a node is
                // overloaded or a peer is down; `http_requests_total{status="503"}` counts them.
                tracing::debug!(service, detail, "service unavailable");
                Problem::unavailable(
                    err.retry_after_secs().unwrap_or(1),
                    format!("the {service} service is unavailable or overloaded; retry later"),
                )
            }
            ServiceError::Storage(reason) => {
                // The cause stays in the log: it may name files and internal state.
                tracing::error!(reason, "storage failure while handling a request");
                Problem::internal()
            }
        }
    }
}

/// `axum::Json` as a request extractor, with rejections turned into [`Problem`]s (see the
/// module doc for the status of each case).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    /// What `axum::Json::from_request` does, except that a body that parses is parsed without
    /// axum's path tracking (`serde_path_to_error`, an allocation per field: 1.6% of the
    /// instructions per order); only a body that fails is parsed again by axum, for its error
    /// naming the field.
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(JsonRejection::from(MissingJsonContentType::default()).into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(JsonRejection::from)?;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Self(value)),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(value)) => Ok(Self(value)),
                Err(rejection) => Err(rejection.into()),
            },
        }
    }
}

/// axum 0.8's rule for a JSON body (its private `json_content_type`): `application/json` or
/// any `application/*+json`, parameters allowed.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    // What nearly every client sends, without parsing a MIME type per request (that parse was
    // 0.4% of `dev`'s instructions under the bench).
    if value.as_bytes().eq_ignore_ascii_case(b"application/json") {
        return true;
    }
    let Some(mime) = value.to_str().ok().and_then(|v| v.parse::<mime::Mime>().ok()) else {
        return false;
    };
    mime.type_() == "application" && (mime.subtype() == "json" || mime.suffix().is_some_and(|name| name == "json"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::extract::DefaultBodyLimit;
    use axum::routing::post;
    use serde::Deserialize;
    use tower::ServiceExt;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Line {
        sku: String,
        quantity: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    enum Colour {
        Red,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct OrderIn {
        items: Vec<Line>,
        payment_token: String,
        #[serde(default)]
        colour: Option<Colour>,
    }

    async fn place(JsonBody(order): JsonBody<OrderIn>) -> String {
        format!("{} lines", order.items.len())
    }

    fn app() -> Router {
        Router::new().route("/orders", post(place)).layer(DefaultBodyLimit::max(1024))
    }

    async fn send(content_type: Option<&str>, body: impl Into<Body>) -> Response {
        let mut request = Request::post("/orders");
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        app().oneshot(request.body(body.into()).unwrap()).await.unwrap()
    }

    async fn send_json(body: &str) -> Response {
        send(Some("application/json"), body.to_owned()).await
    }

    /// Asserts the response is a well-formed problem with this status and returns its body.
    async fn problem(response: Response, status: StatusCode) -> ProblemBody {
        assert_eq!(response.status(), status);
        assert_eq!(response.headers().get(CONTENT_TYPE).unwrap(), PROBLEM_CONTENT_TYPE);
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body: ProblemBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body.status, status.as_u16());
        assert!(body.type_uri.starts_with(PROBLEM_TYPE_PREFIX), "{body:?}");
        assert!(!body.title.is_empty() && !body.detail.is_empty(), "{body:?}");
        body
    }

    #[tokio::test]
    async fn valid_body_reaches_the_handler() {
        let response = send_json(r#"{"items":[{"sku":"a","quantity":1}],"payment_token":"tok_visa"}"#).await;
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn syntax_error_is_400() {
        let body = problem(send_json(r#"{"items":["#).await, StatusCode::BAD_REQUEST).await;
        assert!(body.detail.contains("not valid JSON"), "{}", body.detail);
        problem(send_json("not json").await, StatusCode::BAD_REQUEST).await;
        problem(send_json("").await, StatusCode::BAD_REQUEST).await;
    }

    #[tokio::test]
    async fn unknown_field_is_400_and_named() {
        let body =
            problem(send_json(r#"{"items":[],"payment_token":"t","coupon":"x"}"#).await, StatusCode::BAD_REQUEST).await;
        assert!(body.detail.contains("unknown field `coupon`"), "{}", body.detail);
    }

    #[tokio::test]
    async fn wrong_type_is_400_with_path() {
        let body = problem(
            send_json(r#"{"items":[{"sku":"a","quantity":"two"}],"payment_token":"t"}"#).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(body.detail.contains("items[0].quantity"), "{}", body.detail);
    }

    #[tokio::test]
    async fn missing_field_is_422() {
        let body =
            problem(send_json(r#"{"items":[{"sku":"a","quantity":1}]}"#).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(body.detail.contains("payment_token"), "{}", body.detail);
    }

    #[tokio::test]
    async fn out_of_range_value_and_unknown_variant_are_422() {
        problem(
            send_json(r#"{"items":[{"sku":"a","quantity":-1}],"payment_token":"t"}"#).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        problem(
            send_json(r#"{"items":[],"payment_token":"t","colour":"blue"}"#).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }

    #[tokio::test]
    async fn missing_or_wrong_content_type_is_415() {
        let body = r#"{"items":[],"payment_token":"t"}"#;
        problem(send(None, body).await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
        problem(send(Some("application/x-www-form-urlencoded"), body).await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
        // axum's rule, which `json_content_type` copies: only `application/json` and
        // `application/*+json`, with or without parameters.
        problem(send(Some("text/json"), body).await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
        problem(send(Some("application/jsonx"), body).await, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
        for json in
            ["application/json", "Application/JSON", "application/merge-patch+json", "application/json; charset=utf-8"]
        {
            assert_eq!(send(Some(json), body).await.status(), StatusCode::OK, "{json}");
        }
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let sku = "x".repeat(2048);
        let big = format!(r#"{{"items":[{{"sku":"{sku}","quantity":1}}],"payment_token":"t"}}"#);
        // Content-Length as a real client sends it; axum's limit applies either way.
        let len = big.len().to_string();
        let request = Request::post("/orders")
            .header(CONTENT_TYPE, "application/json")
            .header(axum::http::header::CONTENT_LENGTH, len)
            .body(Body::from(big))
            .unwrap();
        let response = app().oneshot(request).await.unwrap();
        let body = problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
        assert!(body.detail.contains("size limit"), "{}", body.detail);
    }

    #[tokio::test]
    async fn retry_after_and_www_authenticate_headers_are_set() {
        let limited = Problem::too_many_requests(0).into_response();
        assert_eq!(limited.headers().get(RETRY_AFTER).unwrap(), "1");
        let down = Problem::unavailable(7, "owner of shard 3 is unreachable").into_response();
        assert_eq!(down.headers().get(RETRY_AFTER).unwrap(), "7");
        let body = problem(down, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(body.type_uri, "https://ordermesh.dev/problems/unavailable");
        let unauth = Problem::unauthorized("missing bearer token").into_response();
        assert!(unauth.headers().get(WWW_AUTHENTICATE).unwrap().to_str().unwrap().starts_with("Bearer"));
    }

    #[tokio::test]
    async fn every_constructor_has_its_status() {
        let cases = [
            (Problem::bad_request("d"), 400),
            (Problem::unauthorized("d"), 401),
            (Problem::forbidden("d"), 403),
            (Problem::not_found("d"), 404),
            (Problem::conflict("d"), 409),
            (Problem::payload_too_large("d"), 413),
            (Problem::unsupported_media_type("d"), 415),
            (Problem::unprocessable("d"), 422),
            (Problem::too_many_requests(1), 429),
            (Problem::internal(), 500),
            (Problem::unavailable(1, "d"), 503),
            (Problem::gateway_timeout("d"), 504),
        ];
        for (problem_value, status) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(problem_value.status(), status);
            problem(problem_value.into_response(), status).await;
        }
    }

    #[tokio::test]
    async fn extensions_are_flattened_but_cannot_replace_standard_members() {
        let response = Problem::unprocessable("quantity must be 1..=1000")
            .with_extension("field", "items[0].quantity")
            .with_extension("status", 200)
            .into_response();
        let body = problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(body.extensions["field"], "items[0].quantity");
        assert_eq!(body.status, 422);
    }

    #[test]
    fn long_details_are_truncated() {
        let problem = Problem::bad_request("x".repeat(10_000));
        assert_eq!(problem.detail().chars().count(), MAX_DETAIL_CHARS + 1);
    }

    #[test]
    fn data_error_classification_uses_the_first_phrase() {
        use DataError::*;
        assert_eq!(classify_data_error("unknown field `a`, expected `b`"), Shape);
        assert_eq!(classify_data_error("x: invalid type: string \"1\", expected u32"), Shape);
        assert_eq!(classify_data_error("missing field `items`"), Rule);
        // Client text quoted after the kind phrase does not change the kind.
        assert_eq!(classify_data_error("q: invalid value: string \"unknown field `\", expected u32"), Rule);
        assert_eq!(classify_data_error("something custom"), Rule);
    }
}

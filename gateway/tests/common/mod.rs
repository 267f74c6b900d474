//! The one way tests start the gateway: [`spawn_app`] binds 127.0.0.1:0, starts the real
//! services on their own temporary data directory (with fast payment settings), serves the
//! real router, and hands back a client and a token minter. Logs are printed only when
//! `TEST_LOG` is set (its value is the filter, e.g. `TEST_LOG=debug`).
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::{Services, Settings};
use ordermesh_gateway::auth::{Authenticator, Role};
use ordermesh_gateway::config::{Config, Secret};
use ordermesh_gateway::{GatewayServices, Readiness, router, serve};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// HS256 secret of every test app (and of the tokens tests forge by hand).
pub const SECRET: &str = "gateway-tests-secret-that-is-long-enough";

/// The admin every test app knows.
pub const ADMIN: &str = "root";

/// A running gateway over real services. Dropping it stops nothing gracefully (the test's
/// runtime ends anyway); [`TestApp::stop`] is the graceful path.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// The bound address, for raw TCP tests.
    pub socket: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub auth: Arc<Authenticator>,
    pub provider: Arc<SimulatedProvider>,
    pub readiness: Readiness,
    /// The services behind the gateway (`None` once [`TestApp::stop_services`] ran).
    services: Option<Services>,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _data: tempfile::TempDir,
}

/// Payment settings that let every test token reach its end within a few seconds.
pub fn fast_settings() -> Settings {
    Settings {
        payment_deadline: Duration::from_secs(2),
        payment_call_timeout: Duration::from_millis(200),
        breaker_cooldown: Duration::from_millis(100),
        ..Settings::default()
    }
}

/// A gateway with test defaults: a generous rate limit (tests poll), everything else as
/// configured by default.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A gateway whose configuration `tweak` adjusts (tiny rate limit, tiny in-flight bound...).
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    init_logging();
    let mut config = Config {
        jwt_secret: Some(Secret::new(SECRET)),
        rate_limit_per_second: 100_000,
        rate_limit_burst: 100_000,
        ..Config::default()
    };
    tweak(&mut config);
    config.validate().unwrap();
    let auth = Arc::new(config.authenticator().unwrap());

    // The recorder first, as `dev` and `node` do: the services register their metrics at start.
    let _metrics = ordermesh_gateway::metrics_handle();
    let data = tempfile::tempdir().unwrap();
    let provider = Arc::new(SimulatedProvider::new());
    let services = Services::start(data.path(), fast_settings(), provider.clone()).await.unwrap();
    let readiness = Readiness::new();
    readiness.set_ready(true);
    let gateway = GatewayServices { orders: services.orders.clone(), inventory: services.inventory.clone() };
    let app = router(gateway, &config, auth.clone(), readiness.clone());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = listener.local_addr().unwrap();
    let (shutdown, stop) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, async move {
        let _ = stop.await;
    }));
    TestApp {
        address: format!("http://{socket}"),
        socket,
        client: reqwest::Client::new(),
        auth,
        provider,
        readiness,
        services: Some(services),
        config,
        shutdown: Some(shutdown),
        server: Some(server),
        _data: data,
    }
}

fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let filter = if filter.is_empty() { "debug".to_owned() } else { filter };
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .init();
        }
    });
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self { status, headers, body, text }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem+json with `status` and the RFC 9457 members; returns the body.
    pub fn assert_problem(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "expected {status}, got {}: {}", self.status, self.text);
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{}", self.text);
        let body = &self.body;
        assert_eq!(body["status"], status, "{}", self.text);
        assert!(body["type"].as_str().is_some_and(|t| t.starts_with("https://ordermesh.dev/problems/")), "{body}");
        assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
        assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
        body
    }

    /// Asserts the status and returns the JSON body.
    pub fn expect(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "expected {status}, got {}: {}", self.status, self.text);
        &self.body
    }

    pub fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// A valid token for `subject` with `role`, for an hour.
    pub fn token(&self, subject: &str, role: Role) -> String {
        self.auth.mint(subject, role, Duration::from_secs(3600)).unwrap()
    }

    pub fn customer(&self, subject: &str) -> String {
        self.token(subject, Role::Customer)
    }

    pub fn admin(&self) -> String {
        self.token(ADMIN, Role::Admin)
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        Reply::read(self.client.get(self.url(path)).bearer_auth(token).send().await.unwrap()).await
    }

    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> Reply {
        Reply::read(self.client.post(self.url(path)).bearer_auth(token).json(body).send().await.unwrap()).await
    }

    pub async fn put_json(&self, path: &str, token: &str, body: &Value) -> Reply {
        Reply::read(self.client.put(self.url(path)).bearer_auth(token).json(body).send().await.unwrap()).await
    }

    /// `POST /v1/orders` with a raw body (may be invalid JSON).
    pub async fn post_raw(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> Reply {
        let request = self.client.post(self.url(path)).bearer_auth(token).header("content-type", "application/json");
        Reply::read(request.body(body).send().await.unwrap()).await
    }

    /// Sets stock as the admin; asserts 200.
    pub async fn set_stock(&self, sku: &str, available: u64, price_cents: u64) -> Value {
        let reply = self
            .put_json(
                &format!("/v1/inventory/{sku}"),
                &self.admin(),
                &json!({"available": available, "price_cents": price_cents}),
            )
            .await;
        reply.expect(200).clone()
    }

    /// `(available, reserved)` of a sku.
    pub async fn stock(&self, sku: &str) -> (u64, u64) {
        let reply = self.get(&format!("/v1/inventory/{sku}"), &self.admin()).await;
        let body = reply.expect(200);
        (body["available"].as_u64().unwrap(), body["reserved"].as_u64().unwrap())
    }

    /// Places an order; asserts 202 and returns it.
    pub async fn place(&self, token: &str, items: &[(&str, u32)], payment_token: &str) -> Value {
        let reply = self.post_json("/v1/orders", token, &order_body(items, payment_token)).await;
        reply.expect(202).clone()
    }

    /// Polls the order until it is `confirmed` or `cancelled`.
    pub async fn wait_terminal(&self, token: &str, id: &str, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let reply = self.get(&format!("/v1/orders/{id}"), token).await;
            let order = reply.expect(200).clone();
            if matches!(order["status"].as_str(), Some("confirmed" | "cancelled")) {
                return order;
            }
            assert!(started.elapsed() < within, "order {id} still {} after {within:?}", order["status"]);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops accepting, lets in-flight requests finish, and returns what `serve` returned.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let result = self.server.take().unwrap().await.unwrap();
        if let Some(services) = self.services.take() {
            services.shutdown().await.unwrap();
        }
        result
    }

    /// The services behind the gateway, for checks the API does not offer (payments).
    pub fn services(&self) -> &Services {
        self.services.as_ref().expect("services are running")
    }

    /// Stops the services while the gateway keeps serving: what a gateway sees when the
    /// node owning an entity is gone.
    pub async fn stop_services(&mut self) {
        if let Some(services) = self.services.take() {
            services.shutdown().await.unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.server.take().unwrap()
    }

    /// Opens a raw connection and sends a request's head plus `partial_body`, announcing
    /// `content_length` bytes: the server's handler then waits for the rest, holding its
    /// in-flight slot (how overload and deadline tests occupy the gateway without sleeps).
    pub async fn stalled_request(
        &self,
        method: &str,
        path: &str,
        token: &str,
        content_length: usize,
        partial_body: &str,
    ) -> TcpStream {
        let mut stream = TcpStream::connect(self.socket).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\n\r\n{partial_body}",
            self.socket
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        stream
    }

    /// With `max_in_flight = 1`: a request stalled inside its handler (the server waits for the
    /// rest of its body), holding the only slot, as a probe answered 503 proves. If the probe
    /// held the slot when the stalled request arrived, the stalled one was shed instead (it got
    /// an answer): then it is sent again.
    pub async fn stall_the_only_slot(&self, token: &str, content_length: usize, partial_body: &str) -> TcpStream {
        let started = Instant::now();
        loop {
            let stalled = self.stalled_request("POST", "/v1/orders", token, content_length, partial_body).await;
            loop {
                assert!(started.elapsed() < Duration::from_secs(5), "the stalled request never held the slot");
                if self.get("/v1/orders", token).await.status == 503 {
                    return stalled;
                }
                let mut byte = [0u8; 1];
                if tokio::time::timeout(Duration::from_millis(20), stalled.peek(&mut byte)).await.is_ok() {
                    break; // answered (shed) or closed: send it again
                }
            }
        }
    }
}

/// A `POST /v1/orders` body.
pub fn order_body(items: &[(&str, u32)], payment_token: &str) -> Value {
    let items: Vec<Value> = items.iter().map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity})).collect();
    json!({"items": items, "payment_token": payment_token})
}

/// Reads one HTTP/1.1 response from a raw stream: status, lowercase headers, body.
pub async fn read_raw_response(stream: &mut TcpStream) -> (u16, Vec<(String, String)>, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "connection closed before a response: {}", String::from_utf8_lossy(&buffer));
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(name, _)| name == "content-length").map_or(0, |(_, value)| value.parse().unwrap());
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..read]);
    }
    (status, headers, String::from_utf8(body).unwrap())
}

/// Runs `probe` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! `ordermesh node` processes on loopback, and the HTTP calls cluster checks make.
//!
//! Shared by the cluster tests and by `examples/local_cluster.rs` (which includes this file
//! by path), so it reports failures as `anyhow` errors instead of panicking and takes the
//! path of the `ordermesh` binary instead of assuming a test build.
// Each user needs only part of this module.
#![allow(dead_code)]

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cluster cookie every node of a test cluster is given.
pub const COOKIE: &str = "cluster-test-cookie";

/// Tuning every node gets: payments that fail or time out finish within seconds, calls
/// between services give up after 2 s, and no per-subject rate limit gets in the way of load.
pub const NODE_ENV: &[(&str, &str)] = &[
    ("ORDERMESH_PAYMENT_DEADLINE_MS", "3000"),
    ("ORDERMESH_PAYMENT_CALL_TIMEOUT_MS", "300"),
    ("ORDERMESH_RESERVATION_TIMEOUT_MS", "2000"),
    ("ORDERMESH_RATE_LIMIT_PER_SECOND", "100000"),
    ("ORDERMESH_RATE_LIMIT_BURST", "100000"),
];

/// A free TCP port on loopback, below the kernel's ephemeral range and never handed out twice
/// by this process. A node binds it a moment later, and another member of the same cluster may
/// be up already: an ephemeral port (`bind :0`) can meanwhile be taken as the local end of that
/// member's outgoing connection, and then the node fails with "address in use".
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let mut given = GIVEN.lock().map_err(|_| anyhow!("port registry poisoned"))?;
    // A random start (`RandomState` is seeded at random), so test binaries run one after
    // another or side by side do not all probe the same ports.
    let start = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
    let span = u64::from(high - low);
    for step in 0..span {
        let port = low + u16::try_from((start + step) % span)?;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no free port in {low}..{high}")
}

/// Sends a signal (`KILL`, `STOP`, `CONT`, `TERM`) to a process with the `kill` command.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").args([format!("-{name}"), pid.to_string()]).status()?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// A token from `<bin> token`, signed with the shared test secret.
pub fn mint_token(bin: &Path, sub: &str, role: &str) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(["token", "--sub", sub, "--role", role, "--ttl", "1h"])
        .env("ORDERMESH_JWT_SECRET", super::SECRET)
        .output()?;
    ensure!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// One member: its stable name, ports and data dir survive restarts.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub cluster_port: u16,
    /// Its gateway's port, if it runs one.
    pub http_port: Option<u16>,
    /// `--services`: a comma list, or `none`.
    pub services: String,
    pub dir: PathBuf,
}

impl Spec {
    pub fn base(&self) -> Option<String> {
        self.http_port.map(|port| format!("http://127.0.0.1:{port}"))
    }

    /// Where the node's stderr goes: beside its data dir, which the node owns.
    pub fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }
}

/// Members named and placed as `roles` says: `(name, services, runs a gateway)`, each with
/// its data dir under `root`.
pub fn specs(root: &Path, roles: &[(&str, &str, bool)]) -> anyhow::Result<Vec<Spec>> {
    roles
        .iter()
        .map(|(name, services, http)| {
            Ok(Spec {
                name: (*name).to_owned(),
                cluster_port: free_port()?,
                http_port: if *http { Some(free_port()?) } else { None },
                services: (*services).to_owned(),
                dir: root.join(name),
            })
        })
        .collect()
}

/// A running node; killed when dropped, so a failed check leaves no process behind.
pub struct Node {
    pub child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every member of one cluster, each started or not.
pub struct Cluster {
    pub bin: PathBuf,
    pub specs: Vec<Spec>,
    pub cookie: String,
    /// Extra flags of every node started from now on.
    pub args: Vec<String>,
    /// Extra environment of every node started from now on (after [`NODE_ENV`]).
    pub env: Vec<(String, String)>,
    nodes: BTreeMap<String, Node>,
}

impl Cluster {
    /// The members of `specs`, none started yet.
    pub fn new(bin: &Path, specs: Vec<Spec>) -> Cluster {
        Cluster {
            bin: bin.to_owned(),
            specs,
            cookie: COOKIE.to_owned(),
            args: vec![],
            env: vec![],
            nodes: BTreeMap::new(),
        }
    }

    /// Starts every member of `specs` (not waiting for readiness: see [`Api::wait_ready`]).
    pub fn start(bin: &Path, specs: Vec<Spec>) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::new(bin, specs);
        for name in cluster.names() {
            cluster.start_node(&name)?;
        }
        Ok(cluster)
    }

    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    pub fn spec(&self, name: &str) -> anyhow::Result<&Spec> {
        self.specs.iter().find(|s| s.name == name).ok_or_else(|| anyhow!("no member {name}"))
    }

    /// The gateway URL of `name`.
    pub fn base(&self, name: &str) -> anyhow::Result<String> {
        self.spec(name)?.base().ok_or_else(|| anyhow!("{name} runs no gateway"))
    }

    /// Every gateway URL.
    pub fn bases(&self) -> Vec<String> {
        self.specs.iter().filter_map(Spec::base).collect()
    }

    /// The names of the members hosting `service`, as ownership sees them.
    pub fn hosting(&self, service: &str) -> Vec<String> {
        self.specs.iter().filter(|s| s.services.split(',').any(|x| x == service)).map(|s| s.name.clone()).collect()
    }

    pub fn pid(&self, name: &str) -> anyhow::Result<u32> {
        Ok(self.nodes.get(name).ok_or_else(|| anyhow!("{name} is not running"))?.child.id())
    }

    /// Starts `name` (again: same ports, same data dir) and waits for its first line.
    pub fn start_node(&mut self, name: &str) -> anyhow::Result<()> {
        let spec = self.spec(name)?.clone();
        let peers: Vec<String> = self
            .specs
            .iter()
            .filter(|s| s.name != spec.name)
            .map(|s| format!("{}@127.0.0.1:{}", s.name, s.cluster_port))
            .collect();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["node", "--name", &spec.name, "--cluster"])
            .arg(format!("127.0.0.1:{}", spec.cluster_port))
            .arg("--peers")
            .arg(peers.join(","))
            .arg("--services")
            .arg(&spec.services)
            .arg("--data-dir")
            .arg(&spec.dir)
            // `ORDERMESH_BIN` (the example's binary) and `ORDERMESH_TEST_LOG` are the harness's;
            // a node would refuse them as unknown settings.
            .env_remove("ORDERMESH_BIN")
            .env_remove("ORDERMESH_TEST_LOG")
            .env("ORDERMESH_JWT_SECRET", super::SECRET)
            .env("ORDERMESH_CLUSTER_COOKIE", &self.cookie)
            .env("ORDERMESH_LOG", std::env::var("ORDERMESH_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(NODE_ENV.iter().copied())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&self.args)
            .stdout(Stdio::piped());
        // The node's log goes to a file beside its data dir (appended across restarts), so a
        // node that dies can say why.
        let log_path = spec.log_path();
        if std::env::var_os("ORDERMESH_TEST_LOG").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            if let Some(parent) = log_path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("cannot open {}", log_path.display()))?;
            cmd.stderr(log);
        }
        if let Some(port) = spec.http_port {
            cmd.arg("--http").arg(format!("127.0.0.1:{port}"));
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot run {}", self.bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let node = Node { child };
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(line)) if line.starts_with("ordermesh node") => {}
            other => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                bail!("node {name} did not start (first line {other:?}); its log ends:\n{tail}")
            }
        }
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.nodes.insert(name.to_owned(), node);
        Ok(())
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill9(&mut self, name: &str) -> anyhow::Result<()> {
        let mut node = self.nodes.remove(name).ok_or_else(|| anyhow!("{name} is not running"))?;
        node.child.kill()?;
        node.child.wait()?;
        Ok(())
    }

    /// SIGSTOP / SIGCONT and the like, to a running member.
    pub fn signal(&self, name: &str, sig: &str) -> anyhow::Result<()> {
        signal(self.pid(name)?, sig)
    }

    /// SIGTERM to every member, then waits for each to exit 0 (stores flushed and closed).
    pub fn stop_all(&mut self) -> anyhow::Result<()> {
        for node in self.nodes.values() {
            signal(node.child.id(), "TERM")?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (name, mut node) in std::mem::take(&mut self.nodes) {
            loop {
                if let Some(status) = node.child.try_wait()? {
                    ensure!(status.success(), "{name} exited with {status} after SIGTERM");
                    break;
                }
                ensure!(Instant::now() < deadline, "{name} did not exit after SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// An HTTP client for the cluster's gateways, with an admin and a customer token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub admin: String,
    pub customer: String,
}

impl Api {
    pub fn new(admin: String, customer: String) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?;
        Ok(Api { http, admin, customer })
    }

    /// Waits until every gateway in `bases` answers `/readyz` 200 (cluster joined).
    pub async fn wait_ready(&self, bases: &[String], within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for base in bases {
            loop {
                let ready = self.http.get(format!("{base}/readyz")).send().await;
                if ready.is_ok_and(|r| r.status() == 200) {
                    break;
                }
                ensure!(Instant::now() < deadline, "{base} not ready within {within:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Sends until the answer is not a 503 (a member may still be settling or restarting).
    pub async fn send_retrying(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
        within: Duration,
    ) -> anyhow::Result<reqwest::Response> {
        let deadline = Instant::now() + within;
        loop {
            let response = make().send().await;
            let unavailable = match &response {
                Ok(r) => r.status() == 503,
                Err(e) => e.is_connect() || e.is_timeout(),
            };
            if !unavailable || Instant::now() > deadline {
                return Ok(response?);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn set_stock(&self, base: &str, sku: &str, available: u64) -> anyhow::Result<()> {
        let response = self
            .send_retrying(
                || {
                    self.http
                        .put(format!("{base}/v1/inventory/{sku}"))
                        .bearer_auth(&self.admin)
                        .json(&json!({"available": available, "price_cents": 100}))
                },
                Duration::from_secs(20),
            )
            .await?;
        ensure!(response.status() == 200, "set stock {sku}: {}", response.text().await?);
        Ok(())
    }

    /// `(available, reserved)` of `sku`.
    pub async fn stock(&self, base: &str, sku: &str) -> anyhow::Result<(u64, u64)> {
        let response = self
            .send_retrying(
                || self.http.get(format!("{base}/v1/inventory/{sku}")).bearer_auth(&self.admin),
                Duration::from_secs(20),
            )
            .await?;
        ensure!(response.status() == 200, "stock {sku}: {}", response.status());
        let body: Value = response.json().await?;
        let field = |f: &str| body[f].as_u64().ok_or_else(|| anyhow!("no {f} in {body}"));
        Ok((field("available")?, field("reserved")?))
    }

    /// Places an order (retrying 503s) and returns its id.
    pub async fn place(&self, base: &str, items: &[(&str, u32)]) -> anyhow::Result<String> {
        self.place_keyed(base, items, None).await
    }

    /// [`Self::place`] with an `Idempotency-Key`.
    pub async fn place_keyed(&self, base: &str, items: &[(&str, u32)], key: Option<&str>) -> anyhow::Result<String> {
        let body = order_body(items);
        let response = self
            .send_retrying(
                || {
                    let request = self.http.post(format!("{base}/v1/orders")).bearer_auth(&self.customer).json(&body);
                    match key {
                        Some(key) => request.header("idempotency-key", key),
                        None => request,
                    }
                },
                Duration::from_secs(20),
            )
            .await?;
        ensure!(response.status() == 202, "place: {} {}", response.status(), response.text().await?);
        let order: Value = response.json().await?;
        Ok(order["id"].as_str().ok_or_else(|| anyhow!("no id in {order}"))?.to_owned())
    }

    /// `(HTTP status, order status)` of one order, read through `base`.
    pub async fn order_status(&self, base: &str, id: &str) -> anyhow::Result<(u16, Option<String>)> {
        let response = self.http.get(format!("{base}/v1/orders/{id}")).bearer_auth(&self.admin).send().await?;
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Ok((code, body["status"].as_str().map(str::to_owned)))
    }

    /// Waits until every order of `ids` is `confirmed` or `cancelled` (retrying 503s) and
    /// returns each one's final status.
    pub async fn wait_terminal(
        &self,
        base: &str,
        ids: &[String],
        within: Duration,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let deadline = Instant::now() + within;
        let mut done = BTreeMap::new();
        for id in ids {
            loop {
                let (code, status) = self.order_status(base, id).await?;
                if code == 200 && matches!(status.as_deref(), Some("confirmed" | "cancelled")) {
                    done.insert(id.clone(), status.unwrap_or_default());
                    break;
                }
                ensure!(Instant::now() < deadline, "order {id} not finished within {within:?}: {code} {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(done)
    }

    /// Every order in the cluster (admin listing, every page, merged from every order node).
    pub async fn all_orders(&self, base: &str) -> anyhow::Result<Vec<Value>> {
        let mut orders = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{base}/v1/orders?limit=500");
            if let Some(t) = &token {
                url.push_str(&format!("&page_token={t}"));
            }
            let response =
                self.send_retrying(|| self.http.get(&url).bearer_auth(&self.admin), Duration::from_secs(30)).await?;
            ensure!(response.status() == 200, "list orders: {}", response.status());
            let page: Value = response.json().await?;
            orders.extend(page["orders"].as_array().cloned().unwrap_or_default());
            match page["next_page_token"].as_str() {
                Some(t) => token = Some(t.to_owned()),
                None => return Ok(orders),
            }
        }
    }

    /// Checks stock conservation on every sku of `initial`: initial = available + reserved +
    /// units in confirmed orders of `orders`, with nothing left reserved (every order
    /// finished). Returns the units sold per sku.
    pub async fn check_stock_conserved(
        &self,
        base: &str,
        initial: &BTreeMap<String, u64>,
        orders: &[Value],
    ) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut sold: BTreeMap<String, u64> = BTreeMap::new();
        for order in orders.iter().filter(|o| o["status"] == "confirmed") {
            for line in order["items"].as_array().into_iter().flatten() {
                let sku = line["sku"].as_str().unwrap_or_default().to_owned();
                *sold.entry(sku).or_default() += line["quantity"].as_u64().unwrap_or(0);
            }
        }
        for (sku, units) in initial {
            let (available, reserved) = self.stock(base, sku).await?;
            let units_sold = sold.get(sku).copied().unwrap_or(0);
            ensure!(reserved == 0, "{sku}: {reserved} units still reserved with every order finished");
            ensure!(
                available + reserved + units_sold == *units,
                "{sku} not conserved: {available} available + {reserved} reserved + {units_sold} sold != {units}"
            );
        }
        Ok(sold)
    }

    /// The value of the gauge `cluster_peer_up{peer="<peer>"}` on `base`'s node (`None` until
    /// the node has seen that peer at all).
    pub async fn peer_up(&self, base: &str, peer: &str) -> anyhow::Result<Option<bool>> {
        let text = self.http.get(format!("{base}/metrics")).send().await?.text().await?;
        let series = format!("cluster_peer_up{{peer=\"{peer}\"}} ");
        Ok(text.lines().find_map(|l| l.strip_prefix(&series)).map(|v| v.trim() != "0"))
    }

    /// Waits until `base`'s node sees `peer` as `up` (or down); returns how long it took.
    pub async fn wait_peer(&self, base: &str, peer: &str, up: bool, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.peer_up(base, peer).await? == Some(up) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < within, "{base} did not see {peer} {} within {within:?}", updown(up));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn updown(up: bool) -> &'static str {
    if up { "up" } else { "down" }
}

/// The JSON body of an order of `items` paid with `tok_visa`.
pub fn order_body(items: &[(&str, u32)]) -> Value {
    let items: Vec<Value> = items.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect();
    json!({"items": items, "payment_token": "tok_visa"})
}

/// The member owning `key` of `service` among `members` (the cluster's own rule).
pub fn owner(service: &str, key: &str, members: &[String]) -> String {
    use ordermesh_runtime::cluster::ownership::{DEFAULT_SHARDS, owner_of_key};
    owner_of_key(service, key, DEFAULT_SHARDS, members).unwrap_or_default().to_owned()
}

/// `count` sku names owned by `node` among the inventory `members`.
pub fn skus_owned_by(node: &str, members: &[String], count: usize) -> Vec<String> {
    (0..).map(|i| format!("sku-{i}")).filter(|sku| owner("inventory", sku, members) == node).take(count).collect()
}

/// `count` sku names owned by any member but `node`.
pub fn skus_not_owned_by(node: &str, members: &[String], count: usize) -> Vec<String> {
    (0..).map(|i| format!("sku-{i}")).filter(|sku| owner("inventory", sku, members) != node).take(count).collect()
}

/// One order placement of a [`Load`].
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    pub took: Duration,
    /// HTTP status; 0 when no answer came (connection refused, timeout).
    pub status: u16,
    pub retry_after: bool,
    /// The order id, on a 202.
    pub id: Option<String>,
    pub items: Vec<(String, u32)>,
    pub base: String,
}

/// Closed-loop order placements by a few workers, round robin over gateways, until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Placements answered 202 and otherwise so far, for progress reports.
    counts: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    workers: Vec<tokio::task::JoinHandle<Vec<Attempt>>>,
}

/// What a load worker orders: `(worker, n-th order) -> lines`.
pub type Pick = std::sync::Arc<dyn Fn(usize, u64) -> Vec<(String, u32)> + Send + Sync>;

impl Load {
    pub fn start(api: &Api, bases: Vec<String>, workers: usize, pick: Pick) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts = std::sync::Arc::new([std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0)]);
        let workers = (0..workers)
            .map(|w| {
                let (api, bases, pick, stop) = (api.clone(), bases.clone(), pick.clone(), stop.clone());
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut log = Vec::new();
                    for n in 0u64.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let base = bases[(w + n as usize) % bases.len()].clone();
                        let items = pick(w, n);
                        let lines: Vec<(&str, u32)> = items.iter().map(|(s, q)| (s.as_str(), *q)).collect();
                        let at = Instant::now();
                        // A key per attempt spreads the orders over the order nodes by the key's
                        // shard (without one, each gateway would place them on its own node).
                        let sent = api
                            .http
                            .post(format!("{base}/v1/orders"))
                            .bearer_auth(&api.customer)
                            .header("idempotency-key", format!("load-{w}-{n}"))
                            .json(&order_body(&lines))
                            .send()
                            .await;
                        let (status, retry_after, id) = match sent {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let retry_after = response.headers().contains_key("retry-after");
                                let body: Value = response.json().await.unwrap_or(Value::Null);
                                (status, retry_after, body["id"].as_str().map(str::to_owned))
                            }
                            Err(_) => (0, false, None),
                        };
                        counts[usize::from(status != 202)].fetch_add(1, Ordering::Relaxed);
                        log.push(Attempt { at, took: at.elapsed(), status, retry_after, id, items, base });
                        if status != 202 {
                            // A refused request is retried a little later, as a client would.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    log
                })
            })
            .collect();
        Load { stop, counts, workers }
    }

    /// `(accepted, refused)` placements so far.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.counts[0].load(Relaxed), self.counts[1].load(Relaxed))
    }

    /// Stops the workers and returns every attempt, in no particular order.
    pub async fn stop(self) -> anyhow::Result<Vec<Attempt>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Vec::new();
        for worker in self.workers {
            all.extend(worker.await?);
        }
        Ok(all)
    }
}

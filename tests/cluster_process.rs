//! `ordermesh node` as real processes on loopback: a cluster of nodes each owning a share of
//! the orders, stock items and payments, reachable through any gateway.
#![allow(clippy::unwrap_used)]

mod common;

use common::{SECRET, token};

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const COOKIE: &str = "cluster-test-cookie";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Spec {
    name: String,
    cluster_port: u16,
    services: String,
    http: bool,
    dir: PathBuf,
}

struct Node {
    child: Child,
    base: Option<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(spec: &Spec, all: &[Spec], cookie: &str) -> Node {
    let peers: Vec<String> = all
        .iter()
        .filter(|s| s.name != spec.name)
        .map(|s| format!("{}@127.0.0.1:{}", s.name, s.cluster_port))
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ordermesh"));
    cmd.args(["node", "--name", &spec.name, "--cluster"])
        .arg(format!("127.0.0.1:{}", spec.cluster_port))
        .arg("--peers")
        .arg(peers.join(","))
        .arg("--services")
        .arg(&spec.services)
        .arg("--data-dir")
        .arg(&spec.dir)
        .env("ORDERMESH_JWT_SECRET", SECRET)
        .env("ORDERMESH_CLUSTER_COOKIE", cookie)
        .env("ORDERMESH_PAYMENT_DEADLINE_MS", "3000")
        .env("ORDERMESH_PAYMENT_CALL_TIMEOUT_MS", "300")
        .env("ORDERMESH_RESERVATION_TIMEOUT_MS", "2000")
        .env("ORDERMESH_LOG", std::env::var("ORDERMESH_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if spec.http {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("node exited before printing").unwrap();
    let base = first.split_once("listening on ").map(|(_, url)| url.trim().to_owned());
    std::thread::spawn(move || for _ in lines {});
    Node { child, base }
}

fn specs(root: &Path, roles: &[(&str, &str, bool)]) -> Vec<Spec> {
    roles
        .iter()
        .map(|(name, services, http)| Spec {
            name: (*name).to_owned(),
            cluster_port: free_port(),
            services: (*services).to_owned(),
            http: *http,
            dir: root.join(name),
        })
        .collect()
}

async fn wait_ready(http: &reqwest::Client, bases: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for base in bases {
        loop {
            let ok = http.get(format!("{base}/readyz")).send().await.map(|r| r.status() == 200).unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "{base} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sends until the answer is not a 503 (the cluster may still be settling).
async fn send_retrying(make: impl Fn() -> reqwest::RequestBuilder) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = make().send().await.unwrap();
        if response.status() != 503 || Instant::now() > deadline {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn set_stock(http: &reqwest::Client, base: &str, admin: &str, sku: &str, available: u64) {
    let response = send_retrying(|| {
        http.put(format!("{base}/v1/inventory/{sku}"))
            .bearer_auth(admin)
            .json(&json!({"available": available, "price_cents": 100}))
    })
    .await;
    assert_eq!(response.status(), 200, "set stock {sku}: {}", response.text().await.unwrap());
}

async fn stock(http: &reqwest::Client, base: &str, admin: &str, sku: &str) -> (u64, u64) {
    let response = send_retrying(|| http.get(format!("{base}/v1/inventory/{sku}")).bearer_auth(admin)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    (body["available"].as_u64().unwrap(), body["reserved"].as_u64().unwrap())
}

async fn place(http: &reqwest::Client, base: &str, customer: &str, items: Value) -> Value {
    let response = send_retrying(|| {
        http.post(format!("{base}/v1/orders"))
            .bearer_auth(customer)
            .json(&json!({"items": items, "payment_token": "tok_visa"}))
    })
    .await;
    assert_eq!(response.status(), 202, "place: {}", response.text().await.unwrap());
    response.json().await.unwrap()
}

async fn order_status(http: &reqwest::Client, base: &str, token: &str, id: &str) -> (u16, Option<String>) {
    let response = http.get(format!("{base}/v1/orders/{id}")).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["status"].as_str().map(str::to_owned))
}

const SKUS: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];

/// Three all-in-one nodes: orders spanning skus owned by different nodes, placed through
/// every gateway, all confirm; every order is readable through every gateway; stock conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_all_in_one_nodes_confirm_orders_placed_through_any_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let all = "order,inventory,payment";
    let specs = specs(dir.path(), &[("n1", all, true), ("n2", all, true), ("n3", all, true)]);
    let nodes: Vec<Node> = specs.iter().map(|s| start(s, &specs, COOKIE)).collect();
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone().unwrap()).collect();
    let http = reqwest::Client::new();
    wait_ready(&http, &bases).await;
    let admin = token("cluster-admin", "admin");
    let customer = token("cluster-customer", "customer");

    for (i, sku) in SKUS.iter().enumerate() {
        set_stock(&http, &bases[i % 3], &admin, sku, 100).await;
    }
    let mut ids = Vec::new();
    for i in 0..12usize {
        let items = json!([
            {"sku": SKUS[i % 6], "quantity": 1},
            {"sku": SKUS[(i + 1) % 6], "quantity": 2},
            {"sku": SKUS[(i + 3) % 6], "quantity": 1},
        ]);
        let order = place(&http, &bases[i % 3], &customer, items).await;
        ids.push(order["id"].as_str().unwrap().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        loop {
            let (code, status) = order_status(&http, &bases[0], &customer, id).await;
            if code == 200 && status.as_deref() == Some("confirmed") {
                break;
            }
            assert!(status.as_deref() != Some("cancelled"), "order {id} was cancelled");
            assert!(Instant::now() < deadline, "order {id} did not confirm: {code} {status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for base in &bases {
            assert_eq!(order_status(&http, base, &customer, id).await, (200, Some("confirmed".to_owned())));
        }
    }
    // 12 orders, each sku in 3 lines... units per sku: count them from the orders we placed.
    let mut used = std::collections::HashMap::<&str, u64>::new();
    for i in 0..12usize {
        *used.entry(SKUS[i % 6]).or_default() += 1;
        *used.entry(SKUS[(i + 1) % 6]).or_default() += 2;
        *used.entry(SKUS[(i + 3) % 6]).or_default() += 1;
    }
    for sku in SKUS {
        for base in &bases {
            let (available, reserved) = stock(&http, base, &admin, sku).await;
            assert_eq!((available, reserved), (100 - used[sku], 0), "{sku} through {base}");
        }
    }
    // Listing merges every node's orders.
    let response = http.get(format!("{}/v1/orders?limit=500", bases[2])).bearer_auth(&customer).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    assert_eq!(page["orders"].as_array().unwrap().len(), ids.len());
}

/// A node refuses to start without a cookie or a JWT key; a node with the wrong cookie never
/// joins (the others do not become ready with it, and it does not with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_refuses_to_start_without_cookie_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let base_args = |cmd: &mut Command| {
        cmd.args(["node", "--name", "x", "--cluster", "127.0.0.1:0", "--data-dir"]).arg(dir.path());
    };
    let mut no_cookie = Command::new(env!("CARGO_BIN_EXE_ordermesh"));
    base_args(&mut no_cookie);
    let out = no_cookie.env("ORDERMESH_JWT_SECRET", SECRET).env_remove("ORDERMESH_CLUSTER_COOKIE").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ORDERMESH_CLUSTER_COOKIE"));
    let mut no_key = Command::new(env!("CARGO_BIN_EXE_ordermesh"));
    base_args(&mut no_key);
    let out = no_key.env("ORDERMESH_CLUSTER_COOKIE", COOKIE).env_remove("ORDERMESH_JWT_SECRET").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ORDERMESH_JWT_SECRET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cookie_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let all = "order,inventory,payment";
    let specs = specs(dir.path(), &[("a", all, true), ("b", all, true)]);
    let a = start(&specs[0], &specs, COOKIE);
    let b = start(&specs[1], &specs, "not-the-cookie");
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for node in [&a, &b] {
        let base = node.base.clone().unwrap();
        let ready = http.get(format!("{base}/readyz")).send().await.unwrap().status();
        assert_eq!(ready, 503, "{base} joined a cluster with a wrong cookie");
    }
}

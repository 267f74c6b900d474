//! `ordermesh dev` as a real process: orders acknowledged with 202 survive SIGKILL and finish
//! after a restart; SIGTERM drains and exits 0.
#![allow(clippy::unwrap_used)]

mod common;

use common::{start_dev, token};

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Short payment deadlines, so `tok_timeout` orders finish within the test.
const FAST_PAYMENTS: &[(&str, &str)] =
    &[("ORDERMESH_PAYMENT_DEADLINE_MS", "1500"), ("ORDERMESH_PAYMENT_CALL_TIMEOUT_MS", "200")];

fn signal(child: &Child, name: &str) {
    common::cluster::signal(child.id(), name).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_orders_survive_kill_nine_and_finish_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let customer = token("proc-customer", "customer");
    let admin = token("proc-admin", "admin");
    let http = reqwest::Client::new();

    let mut dev = start_dev(dir.path(), FAST_PAYMENTS);
    let mut accepted = Vec::new();
    let tokens = ["tok_visa", "tok_flaky", "tok_chargeDeclined", "tok_timeout", "tok_visa"];
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut n = 0usize;
    while Instant::now() < deadline {
        let body = serde_json::json!({
            "items": [{"sku": if n.is_multiple_of(7) { "mug" } else { "espresso" }, "quantity": 1}],
            "payment_token": tokens[n % tokens.len()],
        });
        n += 1;
        let response =
            http.post(format!("{}/v1/orders", dev.base)).bearer_auth(&customer).json(&body).send().await.unwrap();
        if response.status() == 202 {
            let order: serde_json::Value = response.json().await.unwrap();
            accepted.push(order["id"].as_str().unwrap().to_owned());
        }
    }
    dev.child.kill().unwrap(); // SIGKILL, mid-traffic: sagas are in flight
    dev.child.wait().unwrap();
    assert!(accepted.len() >= 10, "only {} orders accepted", accepted.len());

    let mut dev = start_dev(dir.path(), FAST_PAYMENTS);
    let started = Instant::now();
    for id in &accepted {
        loop {
            let response = http.get(format!("{}/v1/orders/{id}", dev.base)).bearer_auth(&admin).send().await.unwrap();
            if response.status() == 429 {
                // The per-subject rate limit: we poll hundreds of orders as one admin.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(response.status(), 200, "acknowledged order {id} is gone");
            let order: serde_json::Value = response.json().await.unwrap();
            let status = order["status"].as_str().unwrap().to_owned();
            if status == "confirmed" || status == "cancelled" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "order {id} still {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    signal(&dev.child, "TERM");
    assert!(dev.child.wait().unwrap().success());
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = start_dev(dir.path(), FAST_PAYMENTS);
    signal(&dev.child, "TERM");
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    // A restart on the same data dir finds the stores intact (and does not seed twice).
    let mut again = start_dev(dir.path(), FAST_PAYMENTS);
    signal(&again.child, "TERM");
    assert!(again.child.wait().unwrap().success());
}

#[test]
fn healthcheck_reports_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = start_dev(dir.path(), FAST_PAYMENTS);
    let addr = dev.base.trim_start_matches("http://").to_owned();
    let ok = Command::new(env!("CARGO_BIN_EXE_ordermesh")).args(["healthcheck", "--http", &addr]).status().unwrap();
    assert!(ok.success());
    signal(&dev.child, "TERM");
    dev.child.wait().unwrap();
    let down = Command::new(env!("CARGO_BIN_EXE_ordermesh")).args(["healthcheck", "--http", &addr]).status().unwrap();
    assert!(!down.success(), "healthcheck passed with the server gone");
}

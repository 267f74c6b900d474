//! Every payment test token ends as the contract says, seen through the API: the order's
//! final status and reason, the stock left, and the charges the provider made.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{TestApp, spawn_app};

/// Places 2 units of a 10-unit sku with `token`, waits for the end, checks the stock left
/// (`10 - sold`) and returns the final order.
async fn run(app: &TestApp, token: &str, within: Duration) -> serde_json::Value {
    app.set_stock("apple", 10, 150).await;
    let customer = app.customer("payer");
    let order = app.place(&customer, &[("apple", 2)], token).await;
    let done = app.wait_terminal(&customer, order["id"].as_str().unwrap(), within).await;
    assert_eq!(done["id"], order["id"]);
    let sold = if done["status"] == "confirmed" { 2 } else { 0 };
    assert_eq!(app.stock("apple").await, (10 - sold, 0), "{done}");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tok_visa_is_confirmed_with_one_charge() {
    let app = spawn_app().await;
    let order = run(&app, "tok_visa", Duration::from_secs(10)).await;
    assert_eq!((&order["status"], &order["cancel_reason"]), (&json!("confirmed"), &json!(null)));
    assert_eq!(order["total_cents"], 300);
    assert_eq!(app.provider.approved_charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tok_charge_declined_is_cancelled_as_payment_declined_and_stock_released() {
    let app = spawn_app().await;
    let order = run(&app, "tok_chargeDeclined", Duration::from_secs(10)).await;
    assert_eq!((&order["status"], &order["cancel_reason"]), (&json!("cancelled"), &json!("payment_declined")));
    assert_eq!(app.provider.approved_charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tok_flaky_is_retried_to_confirmed_with_exactly_one_charge() {
    let app = spawn_app().await;
    let order = run(&app, "tok_flaky", Duration::from_secs(10)).await;
    assert_eq!(order["status"], "confirmed");
    assert_eq!(app.provider.approved_charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tok_timeout_is_cancelled_as_payment_failed_at_the_deadline() {
    let app = spawn_app().await;
    let started = Instant::now();
    let order = run(&app, "tok_timeout", Duration::from_secs(10)).await;
    assert_eq!((&order["status"], &order["cancel_reason"]), (&json!("cancelled"), &json!("payment_failed")));
    // The deadline is 2 s in these tests: not before it, and not much after.
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(app.provider.approved_charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sku_and_too_little_stock_cancel_the_order() {
    let app = spawn_app().await;
    app.set_stock("rare", 1, 9_999).await;
    let customer = app.customer("erin");
    let unknown = app.place(&customer, &[("no-such-sku", 1)], "tok_visa").await;
    let oversold = app.place(&customer, &[("rare", 2)], "tok_visa").await;
    let unknown = app.wait_terminal(&customer, unknown["id"].as_str().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(unknown["cancel_reason"], "unknown_sku");
    let oversold = app.wait_terminal(&customer, oversold["id"].as_str().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(oversold["cancel_reason"], "out_of_stock");
    assert_eq!(app.stock("rare").await, (1, 0));
}

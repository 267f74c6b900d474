//! `/v1/inventory/{sku}`.

use serde_json::json;

use crate::common::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sets_stock_and_any_role_reads_it() {
    let app = spawn_app().await;
    let item = app.set_stock("apple-1.red_XL", 12, 250).await;
    assert_eq!(item, json!({"sku": "apple-1.red_XL", "available": 12, "reserved": 0, "price_cents": 250}));
    let read = app.get("/v1/inventory/apple-1.red_XL", &app.customer("alice")).await;
    assert_eq!(read.expect(200), &item);
    assert_eq!(read.header("content-type"), Some("application/json"));
    // Setting again replaces.
    let item = app.set_stock("apple-1.red_XL", 0, 0).await;
    assert_eq!(item["available"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_malformed_sku_is_404_on_read() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    app.get("/v1/inventory/never-stocked", &token).await.assert_problem(404);
    app.get("/v1/inventory/bad%20sku", &token).await.assert_problem(404);
    app.get(&format!("/v1/inventory/{}", "x".repeat(65)), &token).await.assert_problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stock_updates_are_422_or_400() {
    let app = spawn_app().await;
    let admin = app.admin();
    for (body, field) in [
        (json!({"available": -1, "price_cents": 100}), "available"),
        (json!({"available": 1, "price_cents": -100}), "price_cents"),
    ] {
        let reply = app.put_json("/v1/inventory/apple", &admin, &body).await;
        assert_eq!(reply.assert_problem(422)["field"], field);
    }
    let missing = app.put_json("/v1/inventory/apple", &admin, &json!({"available": 1})).await;
    assert!(missing.assert_problem(422)["detail"].as_str().unwrap().contains("price_cents"));
    let unknown =
        app.put_json("/v1/inventory/apple", &admin, &json!({"available": 1, "price_cents": 1, "reserved": 0})).await;
    assert!(unknown.assert_problem(400)["detail"].as_str().unwrap().contains("unknown field `reserved`"));
    // A malformed sku could never be created: 422 naming it.
    let reply = app.put_json("/v1/inventory/bad%20sku", &admin, &json!({"available": 1, "price_cents": 1})).await;
    assert_eq!(reply.assert_problem(422)["field"], "sku");
    // Nothing was created by the failures.
    app.get("/v1/inventory/apple", &admin).await.assert_problem(404);
}

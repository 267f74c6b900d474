//! `/v1/orders`: placing, reading, access control, cancelling, idempotency under
//! concurrency, overselling races and listing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ordermesh_actors::domain::{OrderId, PaymentStatus};
use serde_json::{Value, json};

use crate::common::{Reply, eventually, order_body, spawn_app};

const WITHIN: Duration = Duration::from_secs(15);

fn id_of(order: &Value) -> String {
    order["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn place_answers_202_with_location_and_the_order_priced_by_inventory() {
    let app = spawn_app().await;
    app.set_stock("apple", 10, 150).await;
    app.set_stock("pear", 10, 90).await;
    let token = app.customer("alice");
    let reply = app.post_json("/v1/orders", &token, &order_body(&[("apple", 3), ("pear", 2)], "tok_visa")).await;
    let order = reply.expect(202).clone();
    let id = id_of(&order);
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(reply.header("location"), Some(format!("/v1/orders/{id}").as_str()));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(order["customer_id"], "alice");
    assert_eq!(order["total_cents"], 3 * 150 + 2 * 90);
    assert_eq!(order["status"], "pending");
    assert_eq!(order["cancel_reason"], Value::Null);
    let mut items = order["items"].as_array().unwrap().clone();
    items.sort_by_key(|item| item["sku"].as_str().unwrap().to_owned());
    assert_eq!(
        items,
        vec![
            json!({"sku": "apple", "quantity": 3, "unit_price_cents": 150}),
            json!({"sku": "pear", "quantity": 2, "unit_price_cents": 90}),
        ]
    );
    for stamp in ["created_at", "updated_at"] {
        let text = order[stamp].as_str().unwrap();
        assert!(humantime::parse_rfc3339(text).is_ok() && text.ends_with('Z') && text.len() == 24, "{text}");
    }
    assert!(order["version"].as_u64().unwrap() >= 1);
    let keys: HashSet<&str> = order.as_object().unwrap().keys().map(String::as_str).collect();
    let expected =
        ["id", "customer_id", "items", "total_cents", "status", "cancel_reason", "created_at", "updated_at", "version"];
    assert_eq!(keys, expected.into_iter().collect());

    // The Location resolves to the order, which moves on to confirmed by itself.
    let done = app.wait_terminal(&token, &id, WITHIN).await;
    assert_eq!(done["status"], "confirmed");
    assert!(done["version"].as_u64() > order["version"].as_u64());
    assert_eq!(app.stock("apple").await, (7, 0));

    // Admins place orders as themselves.
    let admin_order = app.place(&app.admin(), &[("apple", 1)], "tok_visa").await;
    assert_eq!(admin_order["customer_id"], crate::common::ADMIN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_customers_order_is_404_and_never_listed_or_cancelled() {
    let app = spawn_app().await;
    app.set_stock("apple", 10, 150).await;
    let (alice, mallory) = (app.customer("alice"), app.customer("mallory"));
    let order = app.place(&alice, &[("apple", 1)], "tok_visa").await;
    let id = id_of(&order);

    let peek = app.get(&format!("/v1/orders/{id}"), &mallory).await;
    let missing = app.get("/v1/orders/0198c5a3-6f50-7c4e-9a4e-3b1f2c7d8e9f", &mallory).await;
    // Exactly the answer for an order that does not exist: nothing leaks.
    assert_eq!(peek.assert_problem(404), missing.assert_problem(404));

    let cancel = Reply::read(
        app.client.post(app.url(&format!("/v1/orders/{id}/cancel"))).bearer_auth(&mallory).send().await.unwrap(),
    )
    .await;
    cancel.assert_problem(404);
    let list = app.get("/v1/orders", &mallory).await;
    assert_eq!(list.expect(200)["orders"], json!([]));

    // The owner and admins still see it, unharmed.
    let own = app.get(&format!("/v1/orders/{id}"), &alice).await;
    assert_ne!(own.expect(200)["status"], "cancelled");
    app.get(&format!("/v1/orders/{id}"), &app.admin()).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_confirmed_order_refunds_and_returns_its_stock() {
    let app = spawn_app().await;
    app.set_stock("apple", 10, 150).await;
    let token = app.customer("fay");
    let order = app.place(&token, &[("apple", 3)], "tok_visa").await;
    let id = id_of(&order);
    app.wait_terminal(&token, &id, WITHIN).await;
    assert_eq!(app.stock("apple").await, (7, 0));

    let cancel = |token: String| {
        let request = app.client.post(app.url(&format!("/v1/orders/{id}/cancel"))).bearer_auth(token);
        async move { Reply::read(request.send().await.unwrap()).await }
    };
    let first = cancel(token.clone()).await;
    let cancelled = first.expect(202);
    assert_eq!((&cancelled["status"], &cancelled["cancel_reason"]), (&json!("cancelled"), &json!("customer_request")));
    assert_eq!(app.stock("apple").await, (10, 0));

    // Again: a no-op, 200, same order (also for an admin).
    let again = cancel(token.clone()).await;
    assert_eq!(again.expect(200)["version"], cancelled["version"]);
    cancel(app.admin()).await.expect(200);

    let order_id = OrderId::parse(&id).unwrap();
    eventually(WITHIN, "the refund", || async {
        let payment = app.services().payments.get(order_id).unwrap().unwrap();
        (payment.status == PaymentStatus::Refunded).then_some(())
    })
    .await;
    assert_eq!(app.provider.refunds(), 1);
    assert_eq!(app.provider.approved_charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_and_body_from_20_concurrent_requests_make_one_order_and_one_charge() {
    let app = Arc::new(spawn_app().await);
    app.set_stock("apple", 100, 150).await;
    let token = app.customer("gus");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (app, token) = (app.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let request = app
                .client
                .post(app.url("/v1/orders"))
                .bearer_auth(token)
                .header("idempotency-key", "checkout-7f3a")
                .json(&order_body(&[("apple", 4)], "tok_visa"));
            let reply = Reply::read(request.send().await.unwrap()).await;
            id_of(reply.expect(202))
        }));
    }
    let mut ids = HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(app.wait_terminal(&token, &id, WITHIN).await["status"], "confirmed");
    assert_eq!(app.stock("apple").await, (96, 0));
    assert_eq!(app.provider.approved_charges(), 1);
    let list = app.get("/v1/orders", &token).await;
    assert_eq!(list.expect(200)["orders"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_for_little_stock_sell_exactly_the_stock() {
    let app = Arc::new(spawn_app().await);
    const STOCK: u64 = 5;
    app.set_stock("hot", STOCK, 100).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let token = app.customer(&format!("c{i}"));
            let order = app.place(&token, &[("hot", 1)], "tok_visa").await;
            app.wait_terminal(&token, &id_of(&order), WITHIN).await
        }));
    }
    let mut confirmed = 0;
    for task in tasks {
        let order = task.await.unwrap();
        match order["status"].as_str().unwrap() {
            "confirmed" => confirmed += 1,
            _ => assert_eq!(order["cancel_reason"], "out_of_stock", "{order}"),
        }
    }
    assert_eq!(confirmed, STOCK);
    assert_eq!(app.stock("hot").await, (0, 0));
    assert_eq!(app.provider.approved_charges() as u64, STOCK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_filters_by_status_and_lets_admins_pick_a_customer() {
    let app = spawn_app().await;
    app.set_stock("apple", 100, 150).await;
    let (alice, bob) = (app.customer("alice"), app.customer("bob"));
    let mut placed = Vec::new();
    for _ in 0..5 {
        placed.push(id_of(&app.place(&alice, &[("apple", 1)], "tok_visa").await));
    }
    let declined = id_of(&app.place(&alice, &[("apple", 1)], "tok_chargeDeclined").await);
    placed.push(declined.clone());
    let bobs: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..2 {
            ids.push(id_of(&app.place(&bob, &[("apple", 1)], "tok_visa").await));
        }
        ids
    };
    for id in &placed {
        app.wait_terminal(&alice, id, WITHIN).await;
    }

    // Pages of 4 then 2, in creation order, and a null token on the last page.
    let first = app.get("/v1/orders?limit=4", &alice).await;
    let first = first.expect(200).clone();
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    let second = app.get(&format!("/v1/orders?limit=4&page_token={token}"), &alice).await;
    let second = second.expect(200).clone();
    assert_eq!(second["next_page_token"], Value::Null);
    let listed: Vec<String> =
        first["orders"].as_array().unwrap().iter().chain(second["orders"].as_array().unwrap()).map(id_of).collect();
    assert_eq!(listed, placed);
    assert!(listed.iter().all(|id| !bobs.contains(id)));

    // A page size that ends exactly on the last order.
    let exact = app.get("/v1/orders?limit=6", &alice).await;
    assert_eq!(exact.expect(200)["orders"].as_array().unwrap().len(), 6);
    assert_eq!(exact.body["next_page_token"], Value::Null);

    // Status filter.
    let cancelled = app.get("/v1/orders?status=cancelled", &alice).await;
    let cancelled: Vec<String> = cancelled.expect(200)["orders"].as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(cancelled, vec![declined.clone()]);
    let confirmed = app.get("/v1/orders?status=confirmed&limit=500", &alice).await;
    assert_eq!(confirmed.expect(200)["orders"].as_array().unwrap().len(), 5);

    // Admins see everyone's, or one customer's.
    let admin = app.admin();
    let all = app.get("/v1/orders", &admin).await;
    assert_eq!(all.expect(200)["orders"].as_array().unwrap().len(), 8);
    let only_bob = app.get("/v1/orders?customer=bob", &admin).await;
    let only_bob: Vec<String> = only_bob.expect(200)["orders"].as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(only_bob, bobs);
    let bob_cancelled = app.get("/v1/orders?customer=bob&status=cancelled", &admin).await;
    assert_eq!(bob_cancelled.expect(200)["orders"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answers_when_the_order_ends_or_when_the_wait_is_over() {
    let app = spawn_app().await;
    app.set_stock("apple", 10, 150).await;
    let alice = app.customer("alice");

    // One request sees the outcome: it waits while the saga runs.
    let id = id_of(&app.place(&alice, &[("apple", 1)], "tok_visa").await);
    let done = app.get(&format!("/v1/orders/{id}?wait_ms=10000"), &alice).await;
    assert_eq!(done.expect(200)["status"], "confirmed");

    // A payment that never answers: the wait runs out and the order comes back unfinished.
    let stuck = id_of(&app.place(&alice, &[("apple", 1)], "tok_timeout").await);
    let started = std::time::Instant::now();
    let waited = app.get(&format!("/v1/orders/{stuck}?wait_ms=300"), &alice).await;
    let elapsed = started.elapsed();
    assert!(["pending", "reserved"].contains(&waited.expect(200)["status"].as_str().unwrap()));
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3), "{elapsed:?}");

    // Someone else's order is a 404 at once, as without waiting.
    let bob = app.customer("bob");
    app.get(&format!("/v1/orders/{id}?wait_ms=5000"), &bob).await.assert_problem(404);

    // Bad waits and unknown parameters are 400s naming the parameter.
    for query in ["wait_ms=soon", "wait_ms=-1", "wait_ms=60001"] {
        let reply = app.get(&format!("/v1/orders/{id}?{query}"), &alice).await;
        assert_eq!(reply.assert_problem(400)["field"], "wait_ms", "{query}");
    }
    app.get(&format!("/v1/orders/{id}?wait=1"), &alice).await.assert_problem(400);
}

#[tokio::test]
async fn one_wait_follows_many_orders_to_their_end() {
    let app = spawn_app().await;
    app.set_stock("apple", 100, 50).await;
    let alice = app.customer("alice");
    let mut open: Vec<String> = Vec::new();
    for _ in 0..3 {
        open.push(id_of(&app.place(&alice, &[("apple", 1)], "tok_visa").await));
    }

    // Each answer carries the orders that ended; the client sends the rest again.
    let mut confirmed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !open.is_empty() {
        assert!(std::time::Instant::now() < deadline, "still open: {open:?}");
        // Named twice: still one order.
        let mut ids = open.clone();
        ids.push(open[0].clone());
        let reply = app.post_json("/v1/orders/wait", &alice, &json!({"ids": ids, "wait_ms": 5000})).await;
        let body = reply.expect(200);
        assert_eq!(body["not_found"], json!([]));
        for order in body["orders"].as_array().unwrap() {
            assert_eq!(order["status"], "confirmed", "{order}");
            let id = order["id"].as_str().unwrap().to_owned();
            open.retain(|o| *o != id);
            confirmed.push(id);
        }
    }
    assert_eq!(confirmed.len(), 3);
    assert_eq!(app.services().orders.orders_waited_on(), 0, "a finished wait leaves no registration");

    // Nothing ends within the wait (a payment that never answers; the tests' payment deadline
    // is 2 s): an empty answer once it is over.
    let stuck = id_of(&app.place(&alice, &[("apple", 1)], "tok_timeout").await);
    let started = std::time::Instant::now();
    let reply = app.post_json("/v1/orders/wait", &alice, &json!({"ids": [stuck], "wait_ms": 300})).await;
    assert_eq!(reply.expect(200), &json!({"orders": [], "not_found": []}));
    assert!(started.elapsed() >= Duration::from_millis(300) && started.elapsed() < Duration::from_secs(3));

    // Someone else's order, a missing one and a non-id are answered at once as not found,
    // alongside the caller's ended orders.
    let bob = app.customer("bob");
    let missing = "0190a000-0000-7000-8000-000000000000";
    let ids = json!([confirmed[0], missing, "not-an-id", stuck]);
    let started = std::time::Instant::now();
    let reply = app.post_json("/v1/orders/wait", &bob, &json!({"ids": ids, "wait_ms": 5000})).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let body = reply.expect(200);
    assert_eq!(body["orders"], json!([]));
    let mut not_found: Vec<&str> = body["not_found"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    not_found.sort_unstable();
    let mut expected = vec![confirmed[0].as_str(), missing, "not-an-id", stuck.as_str()];
    expected.sort_unstable();
    assert_eq!(not_found, expected);
    let admin = app.admin();
    let reply = app.post_json("/v1/orders/wait", &admin, &json!({"ids": [confirmed[1]]})).await;
    assert_eq!(reply.expect(200)["orders"][0]["id"], confirmed[1].as_str());

    // Bad requests name the field.
    let too_many: Vec<String> = (0..1001).map(|_| missing.to_owned()).collect();
    for (body, field) in [
        (json!({"ids": []}), "ids"),
        (json!({"ids": too_many}), "ids"),
        (json!({"ids": [stuck], "wait_ms": 60001}), "wait_ms"),
    ] {
        let reply = app.post_json("/v1/orders/wait", &alice, &body).await;
        assert_eq!(reply.assert_problem(422)["field"], field, "{body}");
    }
    app.post_json("/v1/orders/wait", &alice, &json!({"ids": [stuck], "wait": 1})).await.assert_problem(400);
}

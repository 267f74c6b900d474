//! The edge: body limit (413), rate limit (429), overload (503), deadline (504), unknown
//! routes and methods, request ids, and graceful shutdown. Requests that must stay in flight
//! are held half-sent on a raw socket, so no test depends on a sleep being long enough.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::{Reply, eventually, order_body, read_raw_response, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_64_kib_is_413() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    let sku = "x".repeat(70 * 1024);
    let big = json!({"items": [{"sku": sku, "quantity": 1}], "payment_token": "tok_visa"});
    let reply = app.post_json("/v1/orders", &token, &big).await;
    assert!(reply.assert_problem(413)["detail"].as_str().unwrap().contains("size limit"));

    // Without a Content-Length (chunked), the limit holds while the body is read.
    let mut stream = tokio::net::TcpStream::connect(app.socket).await.unwrap();
    let chunk = format!(r#"{{"items":[{{"sku":"{sku}","quantity":1}}],"payment_token":"tok_visa"}}"#);
    let head = format!(
        "POST /v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, headers, _) = read_raw_response(&mut stream).await;
    assert_eq!(status, 413);
    assert!(headers.contains(&("content-type".into(), "application/problem+json".into())));

    // Just under the limit is read and judged on its content (here: a too-long sku).
    let under = json!({"items": [{"sku": "x".repeat(60 * 1024), "quantity": 1}], "payment_token": "tok_visa"});
    app.post_json("/v1/orders", &token, &under).await.assert_problem(422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_from_one_subject_is_429_with_retry_after() {
    let app = spawn_app_with(|config| {
        config.rate_limit_per_second = 1;
        config.rate_limit_burst = 2;
    })
    .await;
    let alice = app.customer("alice");
    // Anonymous requests are refused before the limiter and use up nobody's quota.
    for _ in 0..5 {
        let reply = Reply::read(app.client.get(app.url("/v1/orders")).send().await.unwrap()).await;
        reply.assert_problem(401);
    }
    // The burst passes; the sustained rate (1/s) then refuses within a few requests (more
    // than one only if the machine is so slow that a second passed in between).
    app.get("/v1/orders", &alice).await.expect(200);
    app.get("/v1/orders", &alice).await.expect(200);
    let mut attempts = 0;
    let limited = loop {
        let reply = app.get("/v1/orders", &alice).await;
        if reply.status == 429 {
            break reply;
        }
        attempts += 1;
        assert!(attempts < 5, "never rate limited: {}", reply.status);
    };
    assert!(limited.assert_problem(429)["detail"].as_str().unwrap().contains("rate limit"));
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Another subject has its own quota.
    app.get("/v1/orders", &app.customer("bob")).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_503_with_retry_after_and_health_still_answers() {
    let app = spawn_app_with(|config| config.max_in_flight = 1).await;
    let token = app.customer("alice");
    // Occupies the only slot: the handler waits for a body that does not come.
    let stalled = app.stall_the_only_slot(&token, 500, r#"{"items":"#).await;
    let shed = app.get("/v1/orders", &token).await;
    assert!(shed.assert_problem(503)["detail"].as_str().unwrap().contains("in flight"));
    assert_eq!(shed.header("retry-after"), Some("1"));
    // Operations routes are outside the bound.
    assert_eq!(app.client.get(app.url("/livez")).send().await.unwrap().status(), 200);
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);

    // The slot comes back when the stalled request ends.
    drop(stalled);
    eventually(Duration::from_secs(5), "capacity to come back", || async {
        (app.get("/v1/orders", &token).await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_over_its_deadline_is_504() {
    let app = spawn_app_with(|config| config.request_timeout_ms = 300).await;
    let token = app.customer("alice");
    let mut stalled = app.stalled_request("POST", "/v1/orders", &token, 500, r#"{"items":"#).await;
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(5), read_raw_response(&mut stalled))
        .await
        .expect("the deadline answers");
    assert_eq!(status, 504, "{body}");
    assert!(headers.contains(&("content-type".into(), "application/problem+json".into())));
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], 504);
    assert!(problem["detail"].as_str().unwrap().contains("Idempotency-Key"), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_methods_and_ids_are_problems() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    let reply = app.get("/nope", &token).await;
    assert!(reply.assert_problem(404)["detail"].as_str().unwrap().contains("no route for GET /nope"));
    app.get("/v1/widgets", &token).await.assert_problem(404);

    let reply = Reply::read(app.client.delete(app.url("/v1/orders")).bearer_auth(&token).send().await.unwrap()).await;
    reply.assert_problem(405);
    let allow = reply.header("allow").unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let reply = Reply::read(app.client.post(app.url("/livez")).send().await.unwrap()).await;
    reply.assert_problem(405);

    for id in ["not-an-id", "0198c5a3-6f50-7c4e-9a4e-3b1f2c7d8e9f", "%E2%9C%93"] {
        app.get(&format!("/v1/orders/{id}"), &token).await.assert_problem(404);
        let reply = Reply::read(
            app.client.post(app.url(&format!("/v1/orders/{id}/cancel"))).bearer_auth(&token).send().await.unwrap(),
        )
        .await;
        reply.assert_problem(404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_set_and_propagated() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    let response = app.client.get(app.url("/v1/orders")).bearer_auth(&token).header("x-request-id", "trace-me-42");
    let reply = Reply::read(response.send().await.unwrap()).await;
    assert_eq!(reply.header("x-request-id"), Some("trace-me-42"));
    // Generated when absent, on errors as well.
    for reply in
        [app.get("/v1/orders", &token).await, app.get("/v1/orders", "bad").await, app.get("/nope", &token).await]
    {
        let id = reply.header("x-request-id").unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_request_in_flight_finish() {
    // One slot: a 503 for a probe proves the stalled request is inside its handler.
    let mut app = spawn_app_with(|config| config.max_in_flight = 1).await;
    app.set_stock("apple", 10, 100).await;
    let token = app.customer("alice");
    let body = order_body(&[("apple", 1)], "tok_visa").to_string();
    let (start, rest) = body.split_at(10);
    let mut stalled = app.stall_the_only_slot(&token, body.len(), start).await;
    let server = app.begin_shutdown();
    app.readiness.set_draining();
    stalled.write_all(rest.as_bytes()).await.unwrap();
    let (status, _, order) = read_raw_response(&mut stalled).await;
    assert_eq!(status, 202, "{order}");
    drop(stalled);
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(app.socket).await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_service_is_503_with_retry_after() {
    let mut app = spawn_app().await;
    app.set_stock("apple", 10, 100).await;
    let token = app.customer("alice");
    app.stop_services().await;
    let reply = app.get("/v1/inventory/apple", &token).await;
    assert!(reply.assert_problem(503)["detail"].as_str().unwrap().contains("inventory"), "{}", reply.text);
    assert_eq!(reply.header("retry-after"), Some("1"));
    let reply = app.post_json("/v1/orders", &token, &order_body(&[("apple", 1)], "tok_visa")).await;
    reply.assert_problem(503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_have_their_own_bound_and_do_not_crowd_out_work() {
    let app = spawn_app_with(|config| config.max_in_flight = 1).await;
    app.set_stock("apple", 10, 150).await;
    let token = app.customer("alice");
    let stuck = app.place(&token, &[("apple", 1)], "tok_timeout").await["id"].as_str().unwrap().to_owned();
    // A long poll on an order whose payment never answers takes the only waiting slot...
    let waiting = {
        let url = app.url(&format!("/v1/orders/{stuck}?wait_ms=4000"));
        let (client, token) = (app.client.clone(), token.clone());
        tokio::spawn(async move { client.get(url).bearer_auth(token).send().await.unwrap().status() })
    };
    eventually(Duration::from_secs(5), "the first long poll to wait", || async {
        (app.services().orders.orders_waited_on() == 1).then_some(())
    })
    .await;
    // ...so a second long poll is shed,
    let second = app.get(&format!("/v1/orders/{stuck}?wait_ms=1"), &token).await;
    assert!(second.assert_problem(503)["detail"].as_str().unwrap().contains("in flight"));
    // yet work goes on in the other bound while it waits.
    app.place(&token, &[("apple", 1)], "tok_visa").await;
    assert_eq!(app.get(&format!("/v1/orders/{stuck}"), &token).await.status, 200);
    assert!(!waiting.is_finished(), "the first long poll was still waiting during the checks");
    // A batched wait counts among the waiting too: shed while the long poll holds the slot.
    let batched = app.post_json("/v1/orders/wait", &token, &json!({"ids": [stuck], "wait_ms": 1})).await;
    assert!(batched.assert_problem(503)["detail"].as_str().unwrap().contains("in flight"));
    assert_eq!(waiting.await.unwrap(), 200);
}

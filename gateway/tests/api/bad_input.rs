//! The contract's "status codes for bad input" table, row by row (the limits rows, 413,
//! 429 and 503, are in `edge.rs`). Every answer is checked to be a problem+json.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::{SECRET, order_body, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_is_not_json_is_400() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    for body in [r#"{"items":["#, "not json", "", r#"{"items":[{"sku":"a","quantity":1}],"payment_token":"tok_visa"}}"#]
    {
        let reply = app.post_raw("/v1/orders", &token, body.to_owned()).await;
        let problem = reply.assert_problem(400);
        assert!(problem["detail"].as_str().unwrap().contains("not valid JSON"), "{body}: {problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_400_so_clients_cannot_set_server_fields() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    for field in ["status", "total_cents", "customer_id", "id", "coupon"] {
        let mut body = order_body(&[("apple", 1)], "tok_visa");
        body[field] = json!("x");
        let reply = app.post_json("/v1/orders", &token, &body).await;
        let problem = reply.assert_problem(400);
        assert!(problem["detail"].as_str().unwrap().contains(&format!("unknown field `{field}`")), "{problem}");
    }
    // Nor can a line carry its own price.
    let body = json!({"items": [{"sku": "apple", "quantity": 1, "unit_price_cents": 1}], "payment_token": "tok_visa"});
    let problem = app.post_json("/v1/orders", &token, &body).await.assert_problem(400).clone();
    assert!(problem["detail"].as_str().unwrap().contains("unit_price_cents"), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_json_type_is_400() {
    let app = spawn_app().await;
    let body = json!({"items": [{"sku": "apple", "quantity": "two"}], "payment_token": "tok_visa"});
    let reply = app.post_json("/v1/orders", &app.customer("alice"), &body).await;
    assert!(reply.assert_problem(400)["detail"].as_str().unwrap().contains("items[0].quantity"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_is_422_and_names_the_field() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    let line = |sku: &str, quantity: i64| json!({"sku": sku, "quantity": quantity});
    let with_items = |items: Vec<Value>| json!({"items": items, "payment_token": "tok_visa"});
    let cases: Vec<(&str, Value, &str, Option<&str>)> = vec![
        ("no items", with_items(vec![]), "items: must have 1 to 100 lines", Some("items")),
        (
            "quantity 0",
            with_items(vec![line("a", 0)]),
            "items[0].quantity: must be between 1 and 1000",
            Some("items[0].quantity"),
        ),
        (
            "quantity 1001 on the third line",
            with_items(vec![line("a", 1), line("b", 2), line("c", 1001)]),
            "items[2].quantity: must be between 1 and 1000",
            Some("items[2].quantity"),
        ),
        ("negative quantity", with_items(vec![line("a", -1)]), "items[0].quantity:", Some("items[0].quantity")),
        (
            "101 lines",
            with_items((0..101).map(|i| line(&format!("s{i}"), 1)).collect()),
            "items: must have 1 to 100 lines",
            Some("items"),
        ),
        ("empty sku", with_items(vec![line("", 1)]), "items[0].sku: must not be empty", Some("items[0].sku")),
        (
            "over-long sku",
            with_items(vec![line(&"x".repeat(65), 1)]),
            "items[0].sku: must be at most 64",
            Some("items[0].sku"),
        ),
        ("sku with a space", with_items(vec![line("a b", 1)]), "items[0].sku:", Some("items[0].sku")),
        (
            "malformed payment token",
            json!({"items": [line("a", 1)], "payment_token": "visa"}),
            "payment_token:",
            Some("payment_token"),
        ),
        (
            "missing payment_token",
            json!({"items": [line("a", 1)]}),
            "request body breaks a rule: missing field `payment_token`",
            None,
        ),
        (
            "missing items",
            json!({"payment_token": "tok_visa"}),
            "request body breaks a rule: missing field `items`",
            None,
        ),
    ];
    for (case, body, detail, field) in cases {
        let reply = app.post_json("/v1/orders", &token, &body).await;
        let problem = reply.assert_problem(422);
        assert!(problem["detail"].as_str().unwrap().starts_with(detail), "{case}: {problem}");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{case}");
        }
    }
    // Nothing was placed.
    let page = app.get("/v1/orders", &token).await;
    assert_eq!(page.expect(200)["orders"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_not_declared_as_json_is_415() {
    let app = spawn_app().await;
    let body = order_body(&[("apple", 1)], "tok_visa").to_string();
    let response = app
        .client
        .post(app.url("/v1/orders"))
        .bearer_auth(app.customer("alice"))
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    crate::common::Reply::read(response).await.assert_problem(415);
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims() -> Value {
    json!({"sub": "alice", "role": "customer", "iat": now(), "exp": now() + 600, "iss": "ordermesh", "aud": "ordermesh"})
}

fn sign(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// base64url without padding, by hand, to build tokens the library would refuse to build.
fn b64(bytes: &[u8]) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_token_is_401() {
    let app = spawn_app().await;
    let with = |key: &str, value: Value| {
        let mut claims = claims();
        claims[key] = value;
        sign(&claims, SECRET.as_bytes())
    };
    let alg_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims().to_string().as_bytes()));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing bearer token"),
        ("alg none", Some(format!("Bearer {alg_none}")), ""),
        ("expired", Some(format!("Bearer {}", with("exp", json!(now() - 120)))), "expired"),
        ("wrong iss", Some(format!("Bearer {}", with("iss", json!("someone-else")))), "issuer"),
        ("wrong aud", Some(format!("Bearer {}", with("aud", json!("another-api")))), "audience"),
        (
            "bad signature",
            Some(format!("Bearer {}", sign(&claims(), b"another-secret-that-is-long-enough-too"))),
            "signature",
        ),
        ("not a JWT", Some("Bearer not-a-token".to_owned()), "malformed"),
        ("not bearer", Some("Basic YWxpY2U6c2VjcmV0".to_owned()), "malformed"),
    ];
    for (case, authorization, detail) in cases {
        for (method, path) in [("GET", "/v1/orders"), ("POST", "/v1/orders"), ("GET", "/v1/inventory/apple")] {
            let mut request = app.client.request(method.parse().unwrap(), app.url(path));
            if let Some(authorization) = &authorization {
                request = request.header("authorization", authorization);
            }
            if method == "POST" {
                request = request.json(&order_body(&[("apple", 1)], "tok_visa"));
            }
            let reply = crate::common::Reply::read(request.send().await.unwrap()).await;
            let problem = reply.assert_problem(401);
            assert!(problem["detail"].as_str().unwrap().contains(detail), "{case}: {problem}");
            assert!(reply.header("www-authenticate").unwrap().starts_with("Bearer"), "{case}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_token_wrong_role_is_403_before_the_body_is_read() {
    let app = spawn_app().await;
    let customer = app.customer("alice");
    let reply = app.put_json("/v1/inventory/apple", &customer, &json!({"available": 5, "price_cents": 100})).await;
    assert!(reply.assert_problem(403)["detail"].as_str().unwrap().contains("admin"));
    // Even a broken body: the role is checked first, so a customer learns nothing more.
    let reply = app
        .client
        .put(app.url("/v1/inventory/apple"))
        .bearer_auth(&customer)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    crate::common::Reply::read(reply).await.assert_problem(403);
    // A customer asking for another customer's list.
    app.get("/v1/orders?customer=bob", &customer).await.assert_problem(403);
    // ...but naming itself is fine.
    app.get("/v1/orders?customer=alice", &customer).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_reused_with_another_body_is_422_and_same_body_replays() {
    let app = spawn_app().await;
    app.set_stock("apple", 100, 150).await;
    app.set_stock("pear", 100, 90).await;
    let alice = app.customer("alice");
    let send = |token: String, key: &'static str, body: Value| {
        let request =
            app.client.post(app.url("/v1/orders")).bearer_auth(token).header("idempotency-key", key).json(&body);
        async move { crate::common::Reply::read(request.send().await.unwrap()).await }
    };
    let first = send(alice.clone(), "key-1", order_body(&[("apple", 2)], "tok_visa")).await;
    let order = first.expect(202).clone();
    assert_eq!(first.header("idempotent-replayed"), None);

    let replay = send(alice.clone(), "key-1", order_body(&[("apple", 2)], "tok_visa")).await;
    assert_eq!(replay.expect(202)["id"], order["id"]);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("location"), first.header("location"));

    for other in [
        order_body(&[("apple", 3)], "tok_visa"),
        order_body(&[("pear", 2)], "tok_visa"),
        order_body(&[("apple", 2)], "tok_flaky"),
    ] {
        let reply = send(alice.clone(), "key-1", other).await;
        assert!(reply.assert_problem(422)["detail"].as_str().unwrap().contains("Idempotency-Key"));
    }
    // Keys belong to a customer: bob's "key-1" is a different order.
    let bob = send(app.customer("bob"), "key-1", order_body(&[("apple", 2)], "tok_visa")).await;
    assert_ne!(bob.expect(202)["id"], order["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_longer_than_255_is_400() {
    let app = spawn_app().await;
    app.set_stock("apple", 10, 150).await;
    let send = |key: String| {
        let request = app
            .client
            .post(app.url("/v1/orders"))
            .bearer_auth(app.customer("alice"))
            .header("idempotency-key", key)
            .json(&order_body(&[("apple", 1)], "tok_visa"));
        async move { crate::common::Reply::read(request.send().await.unwrap()).await }
    };
    let reply = send("k".repeat(256)).await;
    assert!(reply.assert_problem(400)["detail"].as_str().unwrap().contains("255"));
    assert_eq!(reply.body["field"], "Idempotency-Key");
    send(String::new()).await.assert_problem(400);
    send("k".repeat(255)).await.expect(202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_list_queries_are_400() {
    let app = spawn_app().await;
    let token = app.customer("alice");
    for (query, field) in [
        ("status=shipped", "status"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("page_token=garbage", "page_token"),
        ("page_token=0198c5a36f507c4e9a4e3b1f2c7d8e9", "page_token"),
    ] {
        let reply = app.get(&format!("/v1/orders?{query}"), &token).await;
        assert_eq!(reply.assert_problem(400)["field"], field, "{query}");
    }
    for query in ["stauts=paid", "limit=1&limit=2"] {
        app.get(&format!("/v1/orders?{query}"), &token).await.assert_problem(400);
    }
    app.get("/v1/orders?limit=1", &token).await.expect(200);
    app.get("/v1/orders?limit=500&status=confirmed", &token).await.expect(200);
}

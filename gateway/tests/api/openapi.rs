//! `/openapi.json` is kept true: the (method, path) pairs it documents are exactly the ones
//! the router serves, and real responses have exactly the properties of their schemas.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::common::{Reply, spawn_app};

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap_or_else(|| panic!("not an object: {value}")).keys().cloned().collect()
}

fn strings(value: &Value) -> BTreeSet<String> {
    value.as_array().map(|items| items.iter().map(|v| v.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_matches_the_router_and_the_real_responses() {
    let app = spawn_app().await;
    let admin = app.admin();
    app.set_stock("apple", 10, 150).await;
    let order = app.place(&admin, &[("apple", 1)], "tok_visa").await;
    let order_id = order["id"].as_str().unwrap().to_owned();

    let reply = Reply::read(app.client.get(app.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let doc = reply.expect(200).clone();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    let schemas = &doc["components"]["schemas"];
    let properties = |name: &str| keys(&schemas[name]["properties"]);
    let required = |name: &str| strings(&schemas[name]["required"]);

    // Real responses have exactly the documented properties, all of them always present.
    let read = app.get(&format!("/v1/orders/{order_id}"), &admin).await;
    let real_order = read.expect(200);
    assert_eq!(keys(real_order), properties("Order"));
    assert_eq!(required("Order"), properties("Order"), "every order property is always sent");
    assert_eq!(keys(&real_order["items"][0]), properties("OrderLine"));
    let page = app.get("/v1/orders", &admin).await;
    assert_eq!(keys(page.expect(200)), properties("OrderPage"));
    assert_eq!(required("OrderPage"), properties("OrderPage"));
    let item = app.get("/v1/inventory/apple", &admin).await;
    assert_eq!(keys(item.expect(200)), properties("StockItem"));
    let live = Reply::read(app.client.get(app.url("/livez")).send().await.unwrap()).await;
    assert_eq!(keys(live.expect(200)), properties("Health"));
    for problem in [
        app.get("/v1/orders/not-an-id", &admin).await,
        app.post_json("/v1/orders", &admin, &json!({"items": [], "payment_token": "tok_visa"})).await,
    ] {
        let body = keys(&problem.body);
        assert!(body.is_subset(&properties("Problem")), "{body:?}");
        assert!(required("Problem").is_subset(&body));
    }
    // Request bodies document exactly the fields the server accepts.
    assert_eq!(properties("PlaceOrder"), ["items", "payment_token"].map(String::from).into());
    assert_eq!(properties("PlaceOrderItem"), ["quantity", "sku"].map(String::from).into());
    assert_eq!(properties("SetStock"), ["available", "price_cents"].map(String::from).into());
    // Enumerations are the contract's.
    assert_eq!(
        strings(&schemas["OrderStatus"]["enum"]),
        ["pending", "reserved", "paid", "confirmed", "cancelled"].map(String::from).into()
    );
    assert_eq!(
        strings(&schemas["CancelReason"]["enum"]),
        ["out_of_stock", "unknown_sku", "payment_declined", "payment_failed", "customer_request", "timeout"]
            .map(String::from)
            .into()
    );
    let schema_of = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"].clone()
    };
    assert_eq!(schema_of("/v1/orders", "post", "202"), "#/components/schemas/Order");
    assert_eq!(schema_of("/v1/orders/{id}/cancel", "post", "200"), "#/components/schemas/Order");
    assert_eq!(schema_of("/v1/orders/{id}/cancel", "post", "202"), "#/components/schemas/Order");
    assert_eq!(schema_of("/v1/orders", "get", "200"), "#/components/schemas/OrderPage");
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    // The documented (method, path) pairs are exactly the served ones. Probe every method
    // on every documented path and on paths that must not exist; a route is served unless
    // the answer is 405 or the fallback's "no route" 404.
    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            keys(item)
                .into_iter()
                .filter(|method| METHODS.contains(&method.to_uppercase().as_str()))
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let mut candidates: BTreeSet<String> = keys(&doc["paths"]);
    candidates
        .extend(["/", "/v1", "/v1/inventory", "/v1/orders/{id}/refund", "/health", "/openapi.yaml"].map(String::from));
    let mut served = BTreeSet::new();
    // The cancel probe cancels the order: do it after everything above.
    for path in &candidates {
        let concrete = path.replace("{id}", &order_id).replace("{sku}", "apple");
        for method in METHODS {
            let request =
                app.client.request(method.parse().unwrap(), app.url(&concrete)).bearer_auth(&admin).json(&json!({}));
            let reply = Reply::read(request.send().await.unwrap()).await;
            let no_route = reply.status == 405 || (reply.status == 404 && reply.detail().starts_with("no route"));
            if !no_route {
                served.insert((method.to_owned(), path.clone()));
            }
        }
    }
    assert_eq!(served, documented);
}

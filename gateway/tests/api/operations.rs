//! `/livez`, `/readyz` and `/metrics`.

use std::time::Duration;

use crate::common::{Reply, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_and_readyz_follow_the_readiness_flags() {
    let app = spawn_app().await;
    let get = |path: &'static str| {
        let request = app.client.get(app.url(path));
        async move { Reply::read(request.send().await.unwrap()).await }
    };
    let live = get("/livez").await;
    assert_eq!(live.expect(200)["status"], "live");
    assert_eq!(get("/readyz").await.expect(200)["status"], "ready");

    app.readiness.set_ready(false);
    let starting = get("/readyz").await;
    assert!(starting.assert_problem(503)["detail"].as_str().unwrap().contains("starting"));
    assert!(starting.header("retry-after").is_some());

    app.readiness.set_ready(true);
    app.readiness.set_draining();
    let draining = get("/readyz").await;
    assert!(draining.assert_problem(503)["detail"].as_str().unwrap().contains("shutting down"));
    // Draining is final, and liveness is unaffected.
    app.readiness.set_ready(true);
    get("/readyz").await.assert_problem(503);
    get("/livez").await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_by_route_template_and_the_services_metrics() {
    let app = spawn_app().await;
    app.set_stock("metered", 10, 100).await;
    let token = app.customer("alice");
    let order = app.place(&token, &[("metered", 1)], "tok_visa").await;
    let id = order["id"].as_str().unwrap();
    app.wait_terminal(&token, id, Duration::from_secs(10)).await;
    app.get("/v1/orders/0198c5a3-6f50-7c4e-9a4e-3b1f2c7d8e9f", &token).await.assert_problem(404);
    app.get("/no/such/route", &token).await.assert_problem(404);

    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let has = |needle: &str| text.lines().any(|line| !line.starts_with('#') && line.contains(needle));
    // Requests by method, route template and status; never by raw path.
    for labels in [
        r#"method="POST",route="/v1/orders",status="202""#,
        r#"method="GET",route="/v1/orders/{id}",status="200""#,
        r#"method="GET",route="/v1/orders/{id}",status="404""#,
        r#"method="PUT",route="/v1/inventory/{sku}",status="200""#,
        r#"method="GET",route="unmatched",status="404""#,
    ] {
        assert!(has(&format!("http_requests_total{{{labels}")), "http_requests_total{{{labels}}} missing:\n{text}");
    }
    assert!(!text.contains(id), "a raw order id leaked into a label");
    assert!(!text.contains("/no/such/route"), "a raw path leaked into a label");
    // `_seconds` metrics are histograms, the gateway's and the services'.
    assert!(has(r#"http_request_duration_seconds_bucket{method="POST",route="/v1/orders",status="202",le="#), "{text}");
    assert!(text.contains("# TYPE http_request_duration_seconds histogram"), "{text}");
    assert!(text.contains("# TYPE saga_step_seconds histogram"), "{text}");
    for metric in ["orders_placed_total", "orders_completed_total{", "saga_step_seconds_bucket{", "entities_active{"] {
        assert!(has(metric), "{metric} missing:\n{text}");
    }
}

//! `ordermesh node` as real processes on loopback: a cluster of nodes each owning a share of
//! the orders, stock items and payments, reachable through any gateway.
#![allow(clippy::unwrap_used)]

mod common;

use common::cluster::{Api, COOKIE, Cluster, owner, skus_owned_by, specs};
use common::{SECRET, bin, token};

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

const SKUS: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];

fn api() -> Api {
    Api::new(token("cluster-admin", "admin"), token("cluster-customer", "customer")).unwrap()
}

/// Three all-in-one nodes: orders spanning skus owned by different nodes, placed through
/// every gateway, all confirm; every order is readable through every gateway; stock conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_all_in_one_nodes_confirm_orders_placed_through_any_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let all = "order,inventory,payment";
    let cluster =
        Cluster::start(bin(), specs(dir.path(), &[("n1", all, true), ("n2", all, true), ("n3", all, true)]).unwrap())
            .unwrap();
    let bases = cluster.bases();
    let api = api();
    api.wait_ready(&bases, Duration::from_secs(30)).await.unwrap();

    let mut initial = BTreeMap::new();
    for (i, sku) in SKUS.iter().enumerate() {
        api.set_stock(&bases[i % 3], sku, 100).await.unwrap();
        initial.insert((*sku).to_owned(), 100);
    }
    let mut ids = Vec::new();
    let members = cluster.names();
    for i in 0..12usize {
        let items = [(SKUS[i % 6], 1), (SKUS[(i + 1) % 6], 2), (SKUS[(i + 3) % 6], 1)];
        let id = api.place(&bases[i % 3], &items).await.unwrap();
        // Without an idempotency key, the gateway's node picks an id it owns itself.
        assert_eq!(owner("order", &id, &members), members[i % 3], "order {id} placed through {}", bases[i % 3]);
        ids.push(id);
    }
    let finished = api.wait_terminal(&bases[0], &ids, Duration::from_secs(30)).await.unwrap();
    assert!(finished.values().all(|s| s == "confirmed"), "not all confirmed: {finished:?}");
    for id in &ids {
        for base in &bases {
            assert_eq!(api.order_status(base, id).await.unwrap(), (200, Some("confirmed".to_owned())));
        }
    }
    // One batched wait through one gateway reaches every owner; each answer carries the ended
    // orders of the owners that answered first, and the client asks again for the rest.
    let mut open = ids.clone();
    for _ in 0..10 {
        if open.is_empty() {
            break;
        }
        let body = serde_json::json!({"ids": open, "wait_ms": 1000});
        let response = api.http.post(format!("{}/v1/orders/wait", bases[0])).bearer_auth(&api.customer).json(&body);
        let waited: serde_json::Value = response.send().await.unwrap().json().await.unwrap();
        assert_eq!(waited["not_found"], serde_json::json!([]), "{waited}");
        for order in waited["orders"].as_array().unwrap() {
            assert_eq!(order["status"], "confirmed");
            open.retain(|id| order["id"] != id.as_str());
        }
    }
    assert!(open.is_empty(), "batched waits never reported {open:?}");
    let orders = api.all_orders(&bases[2]).await.unwrap();
    assert_eq!(orders.len(), ids.len(), "listing merges every node's orders");
    for base in &bases {
        api.check_stock_conserved(base, &initial, &orders).await.unwrap();
    }
}

/// Five members split by role: one order node, two inventory nodes, one payment node and a
/// gateway-only node. Every order has lines on skus of both inventory nodes and is paid on
/// the payment node; all confirm, and each is readable through both gateways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_by_role_confirm_orders_spanning_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let roles = [
        ("orders", "order", true),
        ("stock-a", "inventory", false),
        ("stock-b", "inventory", false),
        ("pay", "payment", false),
        ("gw", "none", true),
    ];
    let cluster = Cluster::start(bin(), specs(dir.path(), &roles).unwrap()).unwrap();
    let bases = cluster.bases();
    let api = api();
    api.wait_ready(&bases, Duration::from_secs(30)).await.unwrap();

    let stock_nodes = cluster.hosting("inventory");
    let a = skus_owned_by("stock-a", &stock_nodes, 3);
    let b = skus_owned_by("stock-b", &stock_nodes, 3);
    let mut initial = BTreeMap::new();
    for sku in a.iter().chain(&b) {
        api.set_stock(&bases[1], sku, 50).await.unwrap();
        initial.insert(sku.clone(), 50);
    }
    let mut ids = Vec::new();
    for i in 0..10usize {
        let items = [(a[i % 3].as_str(), 1), (b[i % 3].as_str(), 2)];
        ids.push(api.place(&bases[i % 2], &items).await.unwrap());
    }
    let finished = api.wait_terminal(&bases[1], &ids, Duration::from_secs(30)).await.unwrap();
    assert!(finished.values().all(|s| s == "confirmed"), "not all confirmed: {finished:?}");
    for id in &ids {
        assert_eq!(owner("order", id, &cluster.hosting("order")), "orders");
        for base in &bases {
            assert_eq!(api.order_status(base, id).await.unwrap(), (200, Some("confirmed".to_owned())));
        }
    }
    let orders = api.all_orders(&bases[1]).await.unwrap();
    assert_eq!(orders.len(), ids.len());
    for base in &bases {
        api.check_stock_conserved(base, &initial, &orders).await.unwrap();
    }
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

/// Starts `a` and `b` as one two-member cluster, `b` set apart by `odd_one_out`, and checks
/// that 4 s later neither gateway is ready (neither has joined the other).
async fn assert_pair_never_joins(dir: &std::path::Path, odd_one_out: impl FnOnce(&mut Cluster), why: &str) {
    let all = "order,inventory,payment";
    let pair = specs(dir, &[("a", all, true), ("b", all, true)]).unwrap();
    let mut a = Cluster::new(bin(), pair.clone());
    a.start_node("a").unwrap();
    let mut b = Cluster::new(bin(), pair);
    odd_one_out(&mut b);
    b.start_node("b").unwrap();
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for base in a.bases() {
        let ready = http.get(format!("{base}/readyz")).send().await.unwrap().status();
        assert_eq!(ready, 503, "{base} joined a member with {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cookie_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_pair_never_joins(dir.path(), |b| b.cookie = "not-the-cookie".into(), "a wrong cookie").await;
}

/// Members with different shard counts would route one key to two owners: they refuse each
/// other (neither becomes ready) while members that agree join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_count_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shards_32 = || vec!["--shards".to_owned(), "32".to_owned()];
    assert_pair_never_joins(dir.path(), |b| b.args = shards_32(), "another shard count").await;
    // The same pair with the same count joins (so the refusal above is the count's doing).
    let all = "order,inventory,payment";
    let mut same =
        Cluster::new(bin(), specs(&dir.path().join("again"), &[("a", all, true), ("b", all, true)]).unwrap());
    same.args = shards_32();
    same.start_node("a").unwrap();
    same.start_node("b").unwrap();
    api().wait_ready(&same.bases(), Duration::from_secs(20)).await.unwrap();
}

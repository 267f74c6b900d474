//! A cluster of real `ordermesh node` processes on loopback under faults: a member killed
//! with SIGKILL under load and restarted, a member frozen with SIGSTOP, and a peer that sends
//! garbage to the cluster port.
//!
//! The tests run one at a time (they time failure detection, which an overloaded 2-core CI
//! machine running three clusters at once would blur).
#![allow(clippy::unwrap_used)]

mod common;

use common::cluster::{Api, Attempt, Cluster, Load, Pick, owner, skus_not_owned_by, skus_owned_by, specs};
use common::{bin, token};

use ordermesh_actors::domain::{OrderId, PaymentStatus};
use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::services::{Hosted, Services, Settings};
use ordermesh_runtime::cluster::wire::{WIRE_VERSION, WireError, WireMsg, WireReply, WireRequest};
use ordermesh_storage::codec;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One cluster test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ALL: &str = "order,inventory,payment";

fn api() -> Api {
    Api::new(token("faults-admin", "admin"), token("faults-customer", "customer")).unwrap()
}

fn members() -> Vec<String> {
    ["n1", "n2", "n3"].map(str::to_owned).to_vec()
}

/// Three ready all-in-one nodes; n3 is the one the tests hurt.
struct Setup {
    cluster: Cluster,
    api: Api,
    n1: String,
    n2: String,
    /// Skus n3 owns.
    victim: Vec<String>,
    /// Skus n1 or n2 own.
    safe: Vec<String>,
    initial: BTreeMap<String, u64>,
}

/// Starts the three nodes (with `env` added to each) and stocks `per_side` victim and safe
/// skus with `units` each.
async fn setup(root: &std::path::Path, env: &[(&str, &str)], per_side: usize, units: u64) -> Setup {
    let mut cluster =
        Cluster::new(bin(), specs(root, &[("n1", ALL, true), ("n2", ALL, true), ("n3", ALL, true)]).unwrap());
    cluster.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    for name in cluster.names() {
        cluster.start_node(&name).unwrap();
    }
    let api = api();
    api.wait_ready(&cluster.bases(), Duration::from_secs(30)).await.unwrap();
    let (n1, n2) = (cluster.base("n1").unwrap(), cluster.base("n2").unwrap());
    let victim = skus_owned_by("n3", &members(), per_side);
    let safe = skus_not_owned_by("n3", &members(), per_side);
    let mut initial = BTreeMap::new();
    for sku in victim.iter().chain(&safe) {
        api.set_stock(&n1, sku, units).await.unwrap();
        initial.insert(sku.clone(), units);
    }
    Setup { cluster, api, n1, n2, victim, safe, initial }
}

/// SIGKILL of one member under load: requests that need it get a fast 503 with Retry-After
/// while the others keep confirming; after it restarts on its data dir every acknowledged
/// order finishes, stock is conserved and every confirmed order was captured exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_loses_nothing_and_fails_fast_meanwhile() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let Setup { mut cluster, api, n1, n2, victim, safe, initial } = setup(dir.path(), &[], 3, 100_000).await;

    // Even workers order safe skus only; odd ones one safe and one victim sku.
    let (v, s) = (victim.clone(), safe.clone());
    let pick: Pick = Arc::new(move |w, n| {
        let i = (w + n as usize) % 3;
        if w % 2 == 0 {
            vec![(s[i].clone(), 1), (s[(i + 1) % 3].clone(), 2)]
        } else {
            vec![(s[i].clone(), 1), (v[i].clone(), 1)]
        }
    });
    let load = Load::start(&api, vec![n1.clone(), n2.clone()], 4, pick);
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.kill9("n3").unwrap();
    let killed = Instant::now();
    let detected = api.wait_peer(&n1, "n3", false, Duration::from_secs(5)).await.unwrap();
    eprintln!("n1 saw n3 down {detected:?} after kill -9");
    let outage_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outage_to = Instant::now();
    cluster.start_node("n3").unwrap();
    api.wait_ready(&[cluster.base("n3").unwrap()], Duration::from_secs(30)).await.unwrap();
    api.wait_peer(&n1, "n3", true, Duration::from_secs(10)).await.unwrap();
    eprintln!("n3 back and seen up {:?} after the kill", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = load.stop().await.unwrap();

    // While n3 was down (and known down): every answer fast, 503s with Retry-After, and the
    // orders that do not need n3 still accepted.
    let during: Vec<&Attempt> = attempts.iter().filter(|a| a.at >= outage_from && a.at < outage_to).collect();
    assert!(!during.is_empty());
    for a in &during {
        assert!(a.took < Duration::from_secs(1), "slow answer while n3 was down: {a:?}");
        assert!(a.status == 202 || a.status == 503, "unexpected answer while n3 was down: {a:?}");
        assert!(a.status != 503 || a.retry_after, "503 without Retry-After: {a:?}");
        let needs_victim = a.items.iter().any(|(sku, _)| victim.contains(sku));
        assert!(!(needs_victim && a.status == 202), "an order needing n3's stock was accepted while n3 was down");
    }
    let accepted = during.iter().filter(|a| a.status == 202).count();
    let refused = during.iter().filter(|a| a.status == 503).count();
    eprintln!("during the outage: {accepted} accepted, {refused} refused (503)");
    assert!(accepted > 0, "nothing was accepted while n3 was down");
    assert!(refused > 0, "nothing needing n3 was refused while it was down");

    // Every acknowledged order finishes; none is lost; stock conserved on every sku.
    let acknowledged: BTreeSet<String> = attempts.iter().filter_map(|a| a.id.clone()).collect();
    assert!(acknowledged.len() >= 20, "too few orders acknowledged ({}) to mean anything", acknowledged.len());
    let of_n3 = acknowledged.iter().filter(|id| owner("order", id, &members()) == "n3").count();
    assert!(of_n3 > 0, "no acknowledged order (nor its payment) lived on the killed node");
    let ids: Vec<String> = acknowledged.iter().cloned().collect();
    api.wait_terminal(&n2, &ids, Duration::from_secs(60)).await.unwrap();
    let orders = api.all_orders(&n1).await.unwrap();
    let listed: BTreeSet<String> = orders.iter().filter_map(|o| o["id"].as_str().map(str::to_owned)).collect();
    let lost: Vec<_> = acknowledged.difference(&listed).collect();
    assert!(lost.is_empty(), "acknowledged orders lost: {lost:?}");
    let unfinished: Vec<_> =
        orders.iter().filter(|o| !matches!(o["status"].as_str(), Some("confirmed" | "cancelled"))).collect();
    assert!(unfinished.is_empty(), "orders never finished: {unfinished:?}");
    api.check_stock_conserved(&n1, &initial, &orders).await.unwrap();
    let confirmed: BTreeSet<String> = orders
        .iter()
        .filter(|o| o["status"] == "confirmed")
        .filter_map(|o| o["id"].as_str().map(str::to_owned))
        .collect();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for order in orders.iter().filter(|o| o["status"] == "cancelled") {
        *reasons.entry(order["cancel_reason"].as_str().unwrap_or("none").to_owned()).or_default() += 1;
    }
    eprintln!("{} orders, {} confirmed, cancelled: {reasons:?}", orders.len(), confirmed.len());
    // Stock is ample and every sku exists: only the outage may cancel an order (a payment
    // deadline passing while n3 held it, or the saga's own deadline). `unknown_sku` or
    // `out_of_stock` would mean a request reached a node that does not own the sku.
    for reason in reasons.keys() {
        assert!(["payment_failed", "timeout"].contains(&reason.as_str()), "orders cancelled as {reason}: {reasons:?}");
    }

    // Payment compensation (a cancel's refund) travels through outboxes after the order is
    // final; give it a moment, then stop the cluster cleanly and read every payment store.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.stop_all().unwrap();
    let mut captures: BTreeMap<String, usize> = BTreeMap::new();
    for spec in &cluster.specs {
        let payments = Hosted { order: false, inventory: false, payment: true };
        let services =
            Services::start_standalone(&spec.dir, Settings::default(), Arc::new(SimulatedProvider::new()), payments)
                .await
                .unwrap();
        for id in &listed {
            let payment = services.payments.get(OrderId::parse(id).unwrap()).unwrap();
            if payment.as_ref().is_some_and(|p| p.status == PaymentStatus::Captured) {
                *captures.entry(id.clone()).or_default() += 1;
            }
        }
        services.shutdown().await.unwrap();
    }
    for id in &listed {
        let n = captures.get(id).copied().unwrap_or(0);
        let expected = usize::from(confirmed.contains(id));
        assert_eq!(
            n,
            expected,
            "order {id} ({}) captured {n} times",
            if expected == 1 { "confirmed" } else { "cancelled" }
        );
    }
}

/// What one probe asked during the freeze, and whether it needs the frozen member.
#[derive(Debug)]
struct Probe {
    #[allow(dead_code, reason = "shown by Debug in assertion messages")]
    what: &'static str,
    needs_frozen: bool,
    took: Duration,
    status: u16,
    retry_after: bool,
}

/// SIGSTOP of one member for 10 s: the others see it down within 5 s and answer every
/// request within 5 s meanwhile (503 fast for what it owns, success for the rest); after
/// SIGCONT it rejoins and orders touching its stock confirm again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_member_is_detected_and_rejoins_after_sigcont() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // The default call timeout between services (5 s; 10 s for a remote placement): calls in
    // flight to the frozen member must end when it is found down, not at their timeout.
    let env = [("ORDERMESH_RESERVATION_TIMEOUT_MS", "5000")];
    let Setup { cluster, api, n1, n2, victim, safe, initial } = setup(dir.path(), &env, 2, 1000).await;

    // Orders known before the freeze: one owned by n3, one owned elsewhere (a gateway places
    // an order without an idempotency key on its own node).
    let frozen_order = api.place(&cluster.base("n3").unwrap(), &[(safe[0].as_str(), 1)]).await.unwrap();
    let other_order = api.place(&n1, &[(safe[0].as_str(), 1)]).await.unwrap();
    assert_eq!(owner("order", &frozen_order, &members()), "n3");
    assert_eq!(owner("order", &other_order, &members()), "n1");
    api.wait_terminal(&n1, &[frozen_order.clone(), other_order.clone()], Duration::from_secs(30)).await.unwrap();

    cluster.signal("n3", "STOP").unwrap();
    let frozen_at = Instant::now();
    let detect = async {
        let one = api.wait_peer(&n1, "n3", false, Duration::from_secs(5));
        let two = api.wait_peer(&n2, "n3", false, Duration::from_secs(5));
        let (one, two) = tokio::join!(one, two);
        (one.unwrap(), two.unwrap())
    };
    // Probes every 250 ms for the 10 s of the freeze, each through a live gateway.
    let probes = async {
        let mut probes = Vec::new();
        while frozen_at.elapsed() < Duration::from_secs(10) {
            let round = [
                ("stock of n3", true, api.http.get(format!("{n1}/v1/inventory/{}", victim[0]))),
                ("stock elsewhere", false, api.http.get(format!("{n2}/v1/inventory/{}", safe[0]))),
                ("order of n3", true, api.http.get(format!("{n2}/v1/orders/{frozen_order}"))),
                ("order elsewhere", false, api.http.get(format!("{n1}/v1/orders/{other_order}"))),
                (
                    "place on n3's stock",
                    true,
                    api.http
                        .post(format!("{n2}/v1/orders"))
                        .json(&common::cluster::order_body(&[(victim[1].as_str(), 1)])),
                ),
            ];
            let sent: Vec<_> = round
                .into_iter()
                .map(|(what, needs_frozen, request)| {
                    let request =
                        request.bearer_auth(if what.starts_with("place") { &api.customer } else { &api.admin });
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let response = request.send().await;
                        let took = started.elapsed();
                        let (status, retry_after) = match response {
                            Ok(r) => (r.status().as_u16(), r.headers().contains_key("retry-after")),
                            Err(_) => (0, false),
                        };
                        Probe { what, needs_frozen, took, status, retry_after }
                    })
                })
                .collect();
            for task in sent {
                probes.push(task.await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        probes
    };
    let ((seen_by_n1, seen_by_n2), probes) = tokio::join!(detect, probes);
    eprintln!("n3 frozen: n1 saw it down after {seen_by_n1:?}, n2 after {seen_by_n2:?}");
    assert!(seen_by_n1 < Duration::from_secs(5) && seen_by_n2 < Duration::from_secs(5));
    for p in &probes {
        assert!(p.took < Duration::from_secs(5), "no answer within 5 s during the freeze: {p:?}");
        if p.needs_frozen {
            // Placing an order on n3's stock needs n3 to price it: never accepted meanwhile.
            assert_eq!((p.status, p.retry_after), (503, true), "{p:?}");
        } else {
            assert_eq!(p.status, 200, "{p:?}");
        }
    }
    let slowest = probes.iter().map(|p| p.took).max().unwrap_or_default();
    eprintln!("{} probes during the freeze, slowest {slowest:?}", probes.len());

    cluster.signal("n3", "CONT").unwrap();
    let rejoined = api.wait_peer(&n1, "n3", true, Duration::from_secs(20)).await.unwrap();
    api.wait_peer(&n2, "n3", true, Duration::from_secs(20)).await.unwrap();
    eprintln!("n3 rejoined {rejoined:?} after SIGCONT");
    let mut after = Vec::new();
    for (i, base) in [&n1, &n2, &n1, &n2].into_iter().enumerate() {
        after.push(api.place(base, &[(victim[i % 2].as_str(), 1), (safe[i % 2].as_str(), 1)]).await.unwrap());
    }
    let finished = api.wait_terminal(&n1, &after, Duration::from_secs(30)).await.unwrap();
    assert!(finished.values().all(|s| s == "confirmed"), "after rejoining: {finished:?}");
    assert_eq!(api.order_status(&n2, &frozen_order).await.unwrap().0, 200);
    let orders = api.all_orders(&n2).await.unwrap();
    api.wait_terminal(
        &n2,
        &orders.iter().filter_map(|o| o["id"].as_str().map(str::to_owned)).collect::<Vec<_>>(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let orders = api.all_orders(&n2).await.unwrap();
    api.check_stock_conserved(&n1, &initial, &orders).await.unwrap();
}

/// Garbage on the cluster port (unframed, and framed but not the protocol) is disconnected; a
/// peer that passes the cookie handshake and sends an unknown payload version or undecodable
/// bytes to a service endpoint gets an error reply; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_versions_on_the_cluster_port_do_not_hurt() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(bin(), specs(dir.path(), &[("a", ALL, true), ("b", ALL, false)]).unwrap()).unwrap();
    let api = api();
    let a = cluster.base("a").unwrap();
    api.wait_ready(std::slice::from_ref(&a), Duration::from_secs(30)).await.unwrap();
    let target = format!("127.0.0.1:{}", cluster.spec("b").unwrap().cluster_port);

    // Unframed garbage, then a frame of the right shape (8-byte big-endian length) whose
    // content is not the protocol: the node closes the connection.
    let mut framed = 64u64.to_be_bytes().to_vec();
    framed.extend([0xff; 64]);
    let unframed: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for garbage in [unframed, framed] {
        let closed = tokio::task::spawn_blocking({
            let target = target.clone();
            move || {
                let mut stream = std::net::TcpStream::connect(&target).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = stream.write_all(&garbage);
                let mut buf = [0u8; 1024];
                // Whatever the node says first (maybe its own hello), it must hang up.
                let started = Instant::now();
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => return true,
                        Ok(_) if started.elapsed() < Duration::from_secs(5) => continue,
                        Ok(_) => return false,
                        Err(e) => {
                            return e.kind() != std::io::ErrorKind::WouldBlock
                                && e.kind() != std::io::ErrorKind::TimedOut;
                        }
                    }
                }
            }
        })
        .await
        .unwrap();
        assert!(closed, "the node kept a connection that sent garbage");
    }

    // A peer with the cookie: reach b's order endpoint over the cluster transport.
    let rogue = ractor_cluster::NodeServer::new(
        0,
        common::cluster::COOKIE.into(),
        "rogue".into(),
        "127.0.0.1".into(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    );
    let (rogue, _) = ractor::Actor::spawn(None, rogue, ()).await.unwrap();
    ractor_cluster::client_connect(&rogue, target.as_str()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let endpoint: ractor::ActorRef<WireMsg> = loop {
        if let Some(cell) = ractor::pg::get_members(&"om.order@b".to_owned()).into_iter().next() {
            break cell.into();
        }
        assert!(Instant::now() < deadline, "b's order endpoint never appeared to the rogue peer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ask = |bytes: Vec<u8>| {
        let endpoint = endpoint.clone();
        async move {
            match endpoint.call(|reply| WireMsg::Call(bytes, reply), Some(Duration::from_secs(5))).await.unwrap() {
                ractor::rpc::CallResult::Success(answer) => codec::decode::<WireReply>(&answer).unwrap(),
                other => panic!("no answer from b: {other:?}"),
            }
        }
    };
    let future_version =
        codec::encode(&WireRequest { version: WIRE_VERSION + 7, service: "order".into(), body: vec![1, 2, 3] })
            .unwrap();
    assert_eq!(ask(future_version).await, WireReply::Err(WireError::UnsupportedVersion(WIRE_VERSION + 7)));
    assert!(matches!(ask(b"not a request at all".to_vec()).await, WireReply::Err(WireError::Malformed(_))));
    let bad_body =
        codec::encode(&WireRequest { version: WIRE_VERSION, service: "order".into(), body: vec![0xa5, 1, 0xff, 0xff] })
            .unwrap();
    assert!(matches!(ask(bad_body).await, WireReply::Err(WireError::Handler(_))));
    rogue.stop(None);

    // b still serves: an order with lines on both members' stock confirms.
    let ab = vec!["a".to_owned(), "b".to_owned()];
    let on_a = skus_owned_by("a", &ab, 1).remove(0);
    let on_b = skus_owned_by("b", &ab, 1).remove(0);
    for sku in [&on_a, &on_b] {
        api.set_stock(&a, sku, 10).await.unwrap();
    }
    // Until one order lives on b, so b's order endpoint runs a whole saga too (a places an
    // order without a key on itself; one with a key goes to the key's shard).
    let mut ids: Vec<String> = Vec::new();
    while !ids.iter().any(|id| owner("order", id, &ab) == "b") {
        assert!(ids.len() < 50, "no order landed on b");
        let key = format!("garbage-{}", ids.len());
        ids.push(api.place_keyed(&a, &[(on_a.as_str(), 1), (on_b.as_str(), 1)], Some(&key)).await.unwrap());
    }
    let finished = api.wait_terminal(&a, &ids, Duration::from_secs(30)).await.unwrap();
    assert!(finished.values().all(|s| s == "confirmed"), "after the garbage: {finished:?}");
}

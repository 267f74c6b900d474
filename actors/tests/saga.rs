//! The order saga end to end in one process: real stores on disk, real actors, the simulated
//! payment provider. Each case ends as the contract says.
#![allow(clippy::unwrap_used)]

use ordermesh_actors::domain::{
    CancelReason, CustomerId, Money, Order, OrderId, OrderStatus, PaymentStatus, PaymentToken, Quantity, Sku,
};
use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::services::order::{ListQuery, NewOrder, Requester};
use ordermesh_actors::services::service_dir;
use ordermesh_actors::{ServiceError, Services, Settings};
use ordermesh_storage::{Append, Store, StoreOptions, WriteBatch};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fast_settings() -> Settings {
    Settings {
        payment_deadline: Duration::from_secs(2),
        payment_call_timeout: Duration::from_millis(200),
        breaker_cooldown: Duration::from_millis(100),
        ..Settings::default()
    }
}

struct App {
    services: Services,
    provider: Arc<SimulatedProvider>,
    _dir: tempfile::TempDir,
}

async fn start() -> App {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(SimulatedProvider::new());
    let services = Services::start(dir.path(), fast_settings(), provider.clone()).await.unwrap();
    App { services, provider, _dir: dir }
}

fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

fn new_order(customer: &str, items: &[(&str, u32)], token: &str) -> NewOrder {
    NewOrder {
        customer: CustomerId::parse(customer).unwrap(),
        items: items.iter().map(|(s, q)| (sku(s), Quantity::new(*q).unwrap())).collect(),
        payment_token: PaymentToken::parse(token).unwrap(),
    }
}

async fn wait_terminal(app: &App, id: OrderId, within: Duration) -> Order {
    let started = Instant::now();
    loop {
        let order = app.services.orders.get(id, &Requester::Admin).await.unwrap().unwrap();
        if order.status.is_terminal() && order.cancel_requested.is_none_or(|_| order.status == OrderStatus::Cancelled) {
            return order;
        }
        assert!(started.elapsed() < within, "order {id} still {:?} after {within:?}", order.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stock(app: &App, s: &str) -> (u64, u64) {
    let view = app.services.inventory.get(&sku(s)).await.unwrap().unwrap();
    (view.available, view.reserved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_order_confirms_and_commits_stock() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 10, Money::from_cents(150)).await.unwrap();
    app.services.inventory.set_stock(&sku("pear"), 5, Money::from_cents(90)).await.unwrap();
    let placed =
        app.services.orders.place(new_order("alice", &[("apple", 3), ("pear", 2)], "tok_visa"), None).await.unwrap();
    assert_eq!(placed.order.status, OrderStatus::Pending);
    assert_eq!(placed.order.total, Money::from_cents(3 * 150 + 2 * 90));
    let order = wait_terminal(&app, placed.order.id, Duration::from_secs(10)).await;
    assert_eq!(order.status, OrderStatus::Confirmed);
    assert_eq!(stock(&app, "apple").await, (7, 0));
    assert_eq!(stock(&app, "pear").await, (3, 0));
    let payment = app.services.payments.get(order.id).unwrap().unwrap();
    assert_eq!(payment.status, PaymentStatus::Captured);
    assert_eq!(app.provider.approved_charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_cancels_and_releases_stock() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 10, Money::from_cents(150)).await.unwrap();
    let placed =
        app.services.orders.place(new_order("bob", &[("apple", 4)], "tok_chargeDeclined"), None).await.unwrap();
    let order = wait_terminal(&app, placed.order.id, Duration::from_secs(10)).await;
    assert_eq!((order.status, order.cancel_reason), (OrderStatus::Cancelled, Some(CancelReason::PaymentDeclined)));
    assert_eq!(stock(&app, "apple").await, (10, 0));
    assert_eq!(app.provider.approved_charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_provider_is_retried_to_exactly_one_charge() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 10, Money::from_cents(150)).await.unwrap();
    let placed = app.services.orders.place(new_order("carol", &[("apple", 1)], "tok_flaky"), None).await.unwrap();
    let order = wait_terminal(&app, placed.order.id, Duration::from_secs(10)).await;
    assert_eq!(order.status, OrderStatus::Confirmed);
    assert_eq!(app.provider.approved_charges(), 1);
    assert_eq!(stock(&app, "apple").await, (9, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_timeout_fails_the_payment_at_its_deadline() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 10, Money::from_cents(150)).await.unwrap();
    let placed = app.services.orders.place(new_order("dan", &[("apple", 2)], "tok_timeout"), None).await.unwrap();
    let order = wait_terminal(&app, placed.order.id, Duration::from_secs(15)).await;
    assert_eq!((order.status, order.cancel_reason), (OrderStatus::Cancelled, Some(CancelReason::PaymentFailed)));
    assert_eq!(stock(&app, "apple").await, (10, 0));
    assert_eq!(app.provider.approved_charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversold_and_unknown_skus_cancel_and_release_the_other_lines() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 10, Money::from_cents(150)).await.unwrap();
    app.services.inventory.set_stock(&sku("rare"), 1, Money::from_cents(9_999)).await.unwrap();
    let oversold =
        app.services.orders.place(new_order("erin", &[("apple", 2), ("rare", 2)], "tok_visa"), None).await.unwrap();
    let unknown =
        app.services.orders.place(new_order("erin", &[("apple", 2), ("nope", 1)], "tok_visa"), None).await.unwrap();
    let o = wait_terminal(&app, oversold.order.id, Duration::from_secs(10)).await;
    assert_eq!(o.cancel_reason, Some(CancelReason::OutOfStock));
    let u = wait_terminal(&app, unknown.order.id, Duration::from_secs(10)).await;
    assert_eq!(u.cancel_reason, Some(CancelReason::UnknownSku));
    assert_eq!(stock(&app, "apple").await, (10, 0));
    assert_eq!(stock(&app, "rare").await, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_never_oversell() {
    let app = Arc::new(start().await);
    app.services.inventory.set_stock(&sku("hot"), 7, Money::from_cents(100)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.services
                .orders
                .place(new_order(&format!("c{i}"), &[("hot", 1)], "tok_visa"), None)
                .await
                .unwrap()
                .order
                .id
        }));
    }
    let mut confirmed = 0;
    for t in tasks {
        let order = wait_terminal(&app, t.await.unwrap(), Duration::from_secs(20)).await;
        if order.status == OrderStatus::Confirmed {
            confirmed += 1;
        } else {
            assert_eq!(order.cancel_reason, Some(CancelReason::OutOfStock));
        }
    }
    assert_eq!(confirmed, 7);
    assert_eq!(stock(&app, "hot").await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_confirmed_order_refunds_and_returns_stock() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 10, Money::from_cents(150)).await.unwrap();
    let placed = app.services.orders.place(new_order("fay", &[("apple", 3)], "tok_visa"), None).await.unwrap();
    let id = placed.order.id;
    wait_terminal(&app, id, Duration::from_secs(10)).await;
    let fay = Requester::Customer(CustomerId::parse("fay").unwrap());
    let other = Requester::Customer(CustomerId::parse("mallory").unwrap());
    assert_eq!(app.services.orders.cancel(id, &other).await, Err(ServiceError::NotFound));
    let cancelled = app.services.orders.cancel(id, &fay).await.unwrap();
    assert!(!cancelled.already_cancelled);
    assert_eq!(cancelled.order.status, OrderStatus::Cancelled);
    assert_eq!(stock(&app, "apple").await, (10, 0));
    let again = app.services.orders.cancel(id, &fay).await.unwrap();
    assert!(again.already_cancelled);
    let started = Instant::now();
    while app.services.payments.get(id).unwrap().unwrap().status != PaymentStatus::Refunded {
        assert!(started.elapsed() < Duration::from_secs(10), "refund did not happen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.provider.refunds(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_hold_outlives_the_items_snapshots_and_a_restart() {
    settled_holds_survive_a_restart(None).await;
}

/// A store whose settled records are keyed as stock layout 2 wrote them (sku first) is
/// migrated at start, and every record still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_store_of_stock_layout_2_is_migrated() {
    settled_holds_survive_a_restart(Some(2)).await;
}

/// A migration stopped after its first commit (layout 3 recorded, records not all moved) is
/// finished at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_stock_layout_migration_is_finished_at_start() {
    settled_holds_survive_a_restart(Some(3)).await;
}

/// Rewrites the inventory store's settled records as layout 2 had them, and records `layout`.
async fn rekey_settled_records_as_layout_2(dir: &std::path::Path, layout: u32) {
    let store = Store::open(service_dir(dir, "inventory"), StoreOptions::default()).unwrap();
    let records = store.index_scan(b"settled:", None, 1000).unwrap();
    assert!(!records.is_empty());
    let mut batch = WriteBatch::default();
    for (key, value) in records {
        let (order, sku) = std::str::from_utf8(&key["settled:".len()..]).unwrap().split_once('/').unwrap();
        batch.index_put.push((format!("settled/{sku}/{order}").into_bytes(), value));
        batch.index_delete.push(key);
    }
    batch.index_put.push((b"layout/stock".to_vec(), ordermesh_storage::codec::encode(&layout).unwrap()));
    store.commit(batch).await.unwrap();
    store.close().unwrap();
}

/// `old_keys`: before the restart, the settled records are rekeyed as layout 2 had them and
/// this layout is recorded.
async fn settled_holds_survive_a_restart(old_keys: Option<u32>) {
    // A snapshot at every event: the item's state never carries a settled order, only the
    // record beside it does. After a restart, cancelling the confirmed order must still give
    // its units back, and a late reserve for it must take nothing.
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { snapshot_every: 1, ..fast_settings() };
    let provider = Arc::new(SimulatedProvider::new());
    let services = Services::start(dir.path(), settings.clone(), provider.clone()).await.unwrap();
    services.inventory.set_stock(&sku("pear"), 10, Money::from_cents(40)).await.unwrap();
    let confirmed = services.orders.place(new_order("gus", &[("pear", 3)], "tok_visa"), None).await.unwrap().order.id;
    let declined =
        services.orders.place(new_order("gus", &[("pear", 2)], "tok_chargeDeclined"), None).await.unwrap().order.id;
    let app = App { services, provider, _dir: dir };
    assert_eq!(wait_terminal(&app, confirmed, Duration::from_secs(10)).await.status, OrderStatus::Confirmed);
    assert_eq!(wait_terminal(&app, declined, Duration::from_secs(10)).await.status, OrderStatus::Cancelled);
    assert_eq!(stock(&app, "pear").await, (7, 0));
    let App { services, provider, _dir: dir } = app;
    services.shutdown().await.unwrap();
    if let Some(layout) = old_keys {
        rekey_settled_records_as_layout_2(dir.path(), layout).await;
    }

    let services = Services::start(dir.path(), settings, provider.clone()).await.unwrap();
    let app = App { services, provider, _dir: dir };
    let two = Quantity::new(2).unwrap();
    let late = app.services.inventory.reserve(&sku("pear"), declined, two).await.unwrap();
    assert!(late.is_err(), "a released order reserved again: {late:?}");
    let retried = app.services.inventory.commit(&sku("pear"), confirmed).await.unwrap();
    assert!(retried.is_ok(), "a retried commit of a committed order must change nothing: {retried:?}");
    assert_eq!(stock(&app, "pear").await, (7, 0));
    let gus = Requester::Customer(CustomerId::parse("gus").unwrap());
    app.services.orders.cancel(confirmed, &gus).await.unwrap();
    assert_eq!(stock(&app, "pear").await, (10, 0), "the confirmed order's units came back");
    let late = app.services.inventory.reserve(&sku("pear"), confirmed, two).await.unwrap();
    assert!(late.is_err(), "a cancelled order reserved again: {late:?}");
    assert_eq!(stock(&app, "pear").await, (10, 0));

    let App { services, _dir: dir, .. } = app;
    services.shutdown().await.unwrap();
    let store = Store::open(service_dir(dir.path(), "inventory"), StoreOptions::default()).unwrap();
    assert_eq!(store.index_scan(b"settled/", None, 10).unwrap(), vec![], "no record is left in the layout-2 form");
    assert_eq!(store.index_scan(b"settled:", None, 10).unwrap().len(), 2);
    let layout = store.index_get(b"layout/stock").unwrap().unwrap();
    assert_eq!(ordermesh_storage::codec::decode::<u32>(&layout).unwrap(), 3);
    store.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_store_of_the_older_stock_layout_is_refused() {
    // Stock data without the layout record: what builds before settled records wrote.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(service_dir(dir.path(), "inventory"), StoreOptions::default()).unwrap();
    let append = Append { entity: "pear".into(), expected_version: 0, events: vec![vec![1, 2, 3]] };
    store.commit(WriteBatch { appends: vec![append], ..WriteBatch::default() }).await.unwrap();
    store.close().unwrap();
    drop(store);
    let started = Services::start(dir.path(), fast_settings(), Arc::new(SimulatedProvider::new())).await;
    let err = started.err().expect("an older store must be refused").to_string();
    assert!(err.contains("older build") && err.contains("inventory"), "{err}");

    // A new store gets the record, and starts again.
    let fresh = tempfile::tempdir().unwrap();
    let services = Services::start(fresh.path(), fast_settings(), Arc::new(SimulatedProvider::new())).await.unwrap();
    services.inventory.set_stock(&sku("pear"), 1, Money::ZERO).await.unwrap();
    services.shutdown().await.unwrap();
    let services = Services::start(fresh.path(), fast_settings(), Arc::new(SimulatedProvider::new())).await.unwrap();
    assert_eq!(services.inventory.get(&sku("pear")).await.unwrap().unwrap().available, 1);
    services.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_order() {
    let app = Arc::new(start().await);
    app.services.inventory.set_stock(&sku("apple"), 100, Money::from_cents(150)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.services.orders.place(new_order("gus", &[("apple", 1)], "tok_visa"), Some("k-1".into())).await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().order.id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry got the same order");
    let different = app.services.orders.place(new_order("gus", &[("apple", 2)], "tok_visa"), Some("k-1".into())).await;
    assert_eq!(different.map(|p| p.order.id), Err(ServiceError::IdempotencyMismatch));
    // Another customer may use the same key for their own order.
    let other =
        app.services.orders.place(new_order("hal", &[("apple", 1)], "tok_visa"), Some("k-1".into())).await.unwrap();
    assert_ne!(other.order.id, ids[0]);
    wait_terminal(&app, ids[0], Duration::from_secs(10)).await;
    wait_terminal(&app, other.order.id, Duration::from_secs(10)).await;
    assert_eq!(stock(&app, "apple").await.0, 100 - 1 - other.created as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_a_customers_orders_by_status() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 100, Money::from_cents(1)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(
            app.services.orders.place(new_order("ivy", &[("apple", 1)], "tok_visa"), None).await.unwrap().order.id,
        );
    }
    app.services.orders.place(new_order("jon", &[("apple", 1)], "tok_visa"), None).await.unwrap();
    for id in &ids {
        wait_terminal(&app, *id, Duration::from_secs(10)).await;
    }
    let ivy = CustomerId::parse("ivy").unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let query = ListQuery { customer: Some(ivy.clone()), status: Some(OrderStatus::Confirmed), limit: 3, after };
        let page = app.services.orders.list(&query).await.unwrap();
        seen.extend(page.orders.iter().map(|o| o.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ids, "all of ivy's confirmed orders, in creation order, none of jon's");
    let pending = ListQuery { customer: Some(ivy), status: Some(OrderStatus::Pending), limit: 10, after: None };
    assert!(app.services.orders.list(&pending).await.unwrap().orders.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_outcomes_returns_each_at_its_end_and_leaves_no_waiter_behind() {
    let app = start().await;
    app.services.inventory.set_stock(&sku("apple"), 100, Money::from_cents(150)).await.unwrap();
    let orders = &app.services.orders;
    let mut waits = Vec::new();
    for token in ["tok_visa", "tok_chargeDeclined", "tok_visa", "tok_flaky"] {
        let id = orders.place(new_order("alice", &[("apple", 1)], token), None).await.unwrap().order.id;
        let orders = orders.clone();
        waits.push(tokio::spawn(async move {
            orders.get_when_terminal(id, &Requester::Admin, Duration::from_secs(10)).await.unwrap().unwrap()
        }));
    }
    let mut statuses = Vec::new();
    for wait in waits {
        statuses.push(wait.await.unwrap().status);
    }
    use OrderStatus::{Cancelled, Confirmed};
    assert_eq!(statuses, [Confirmed, Cancelled, Confirmed, Confirmed]);
    // A wait that runs out (the charge never answers) returns the order as it is.
    let stuck = orders.place(new_order("alice", &[("apple", 1)], "tok_timeout"), None).await.unwrap().order.id;
    let started = Instant::now();
    let order = orders.get_when_terminal(stuck, &Requester::Admin, Duration::from_millis(300)).await.unwrap().unwrap();
    assert!(!order.status.is_terminal() && started.elapsed() >= Duration::from_millis(300));
    // Another customer's order: nothing to wait for.
    let bob = Requester::Customer(CustomerId::parse("bob").unwrap());
    assert!(orders.get_when_terminal(stuck, &bob, Duration::from_secs(5)).await.unwrap().is_none());
    assert_eq!(orders.orders_waited_on(), 0);
}

/// Integration events are delivered at least once, and there is no inbox of processed ids:
/// each consumer's state must make a redelivery (or a late, contradicting event) a no-op.
/// Written into the producers' outboxes, as a crash before the relay's acknowledgement leaves
/// them, and delivered by the real relays after a restart; the state is compared only once
/// both outboxes are drained (and after one more restart, so it is what is on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_integration_events_change_nothing() {
    use ordermesh_actors::services::events::{IntegrationEvent, PaymentOutcome};
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(SimulatedProvider::new());
    let services = Services::start(dir.path(), fast_settings(), provider.clone()).await.unwrap();
    services.inventory.set_stock(&sku("fig"), 10, Money::from_cents(70)).await.unwrap();
    let place = |token| new_order("hal", &[("fig", 1)], token);
    let confirmed = services.orders.place(place("tok_visa"), None).await.unwrap().order.id;
    let declined = services.orders.place(place("tok_chargeDeclined"), None).await.unwrap().order.id;
    let refunded = services.orders.place(place("tok_visa"), None).await.unwrap().order.id;
    let app = App { services, provider, _dir: dir };
    for id in [confirmed, declined, refunded] {
        wait_terminal(&app, id, Duration::from_secs(10)).await;
    }
    let hal = Requester::Customer(CustomerId::parse("hal").unwrap());
    app.services.orders.cancel(refunded, &hal).await.unwrap();
    let started = Instant::now();
    while app.services.payments.get(refunded).unwrap().unwrap().status != PaymentStatus::Refunded {
        assert!(started.elapsed() < Duration::from_secs(10), "refund did not happen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = [confirmed, declined, refunded];
    let mut orders_before = Vec::new();
    for id in ids {
        orders_before.push(app.services.orders.get(id, &Requester::Admin).await.unwrap().unwrap());
    }
    let statuses: Vec<_> = orders_before.iter().map(|o| o.status).collect();
    assert_eq!(statuses, [OrderStatus::Confirmed, OrderStatus::Cancelled, OrderStatus::Cancelled]);
    let payments_before = ids.map(|id| app.services.payments.get(id).unwrap().unwrap());
    assert_eq!((app.provider.approved_charges(), app.provider.refunds()), (2, 1));
    let stock_before = stock(&app, "fig").await;
    let App { services, provider, _dir: dir } = app;
    services.shutdown().await.unwrap();

    let outbox = |service: &str, events: Vec<IntegrationEvent>| {
        let store = Store::open(service_dir(dir.path(), service), StoreOptions::default()).unwrap();
        let outbox = events.iter().map(|e| ordermesh_storage::codec::encode(e).unwrap()).collect();
        (store, WriteBatch { outbox, ..WriteBatch::default() })
    };
    let request = |order: &Order| IntegrationEvent::PaymentRequested {
        event_id: format!("{}/order/2", order.id),
        order: order.id,
        amount: order.total,
        token: order.payment_token.clone(),
        deadline_at: u64::MAX,
    };
    let cancel = |order| IntegrationEvent::PaymentCancelRequested { event_id: format!("{order}/order/9"), order };
    let mut to_payment: Vec<_> = orders_before.iter().map(request).collect();
    to_payment.extend([cancel(declined), cancel(refunded)]);
    let (orders, batch) = outbox("order", to_payment);
    orders.commit(batch).await.unwrap();
    orders.close().unwrap();
    let settled =
        |order, outcome| IntegrationEvent::PaymentSettled { event_id: format!("{order}/payment/2"), order, outcome };
    let (payments, batch) = outbox(
        "payment",
        vec![
            settled(confirmed, PaymentOutcome::Captured),
            settled(confirmed, PaymentOutcome::Declined),
            settled(declined, PaymentOutcome::Captured),
            settled(refunded, PaymentOutcome::Captured),
        ],
    );
    payments.commit(batch).await.unwrap();
    payments.close().unwrap();
    drop((orders, payments));

    // Deliver them: an order placed now confirms only after its own entries went through the
    // same relays, and the shutdown after it waits for deliveries in flight.
    let services = Services::start(dir.path(), fast_settings(), provider.clone()).await.unwrap();
    let app = App { services, provider, _dir: dir };
    let later = app.services.orders.place(place("tok_visa"), None).await.unwrap().order.id;
    assert_eq!(wait_terminal(&app, later, Duration::from_secs(10)).await.status, OrderStatus::Confirmed);
    let App { services, provider, _dir: dir } = app;
    services.shutdown().await.unwrap();
    // Every entry written above was delivered and acknowledged (none is failing and retried).
    for service in ["order", "payment"] {
        let store = Store::open(service_dir(dir.path(), service), StoreOptions::default()).unwrap();
        assert_eq!(store.outbox_pending(None, 16).unwrap().len(), 0, "{service} outbox not drained");
        store.close().unwrap();
    }

    let services = Services::start(dir.path(), fast_settings(), provider.clone()).await.unwrap();
    let app = App { services, provider, _dir: dir };
    for before in &orders_before {
        let after = app.services.orders.get(before.id, &Requester::Admin).await.unwrap().unwrap();
        assert_eq!(&after, before, "order {} changed", before.id);
    }
    for before in &payments_before {
        let after = app.services.payments.get(before.order).unwrap().unwrap();
        assert_eq!(&after, before, "payment of {} changed", before.order);
    }
    assert_eq!(app.provider.approved_charges(), 3, "the first two and the later order's");
    assert_eq!(app.provider.refunds(), 1);
    let (available, reserved) = stock_before;
    assert_eq!(stock(&app, "fig").await, (available - 1, reserved), "only the later order took stock");
}

/// Services whose limit of orders in flight is `limit` whether the machine is busy or not (so a
/// busy test machine changes nothing), with `apples` in stock.
async fn start_with_limit(limit: usize, apples: u64) -> App {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { max_orders_in_flight: limit, max_orders_in_flight_when_busy: limit, ..fast_settings() };
    let provider = Arc::new(SimulatedProvider::new());
    let services = Services::start(dir.path(), settings, provider.clone()).await.unwrap();
    services.inventory.set_stock(&sku("apple"), apples, Money::from_cents(150)).await.unwrap();
    App { services, provider, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_limit_of_orders_in_flight_refuses_new_ones_until_some_end() {
    let app = start_with_limit(2, 10).await;
    // Payments that never answer keep both orders in flight until the payment deadline (2 s).
    let key = Some("gus-1".to_owned());
    let first = app.services.orders.place(new_order("gus", &[("apple", 1)], "tok_timeout"), key.clone()).await.unwrap();
    let second = app.services.orders.place(new_order("hal", &[("apple", 1)], "tok_timeout"), None).await.unwrap();
    let refused = app.services.orders.place(new_order("ida", &[("apple", 1)], "tok_visa"), None).await;
    assert!(matches!(refused, Err(ServiceError::Unavailable { service: "order", .. })), "{refused:?}");
    // A retry of an order already taken is still answered: it adds nothing.
    let replay = app.services.orders.place(new_order("gus", &[("apple", 1)], "tok_timeout"), key).await.unwrap();
    assert_eq!((replay.order.id, replay.created), (first.order.id, false));

    for placed in [&first, &second] {
        let order = wait_terminal(&app, placed.order.id, Duration::from_secs(15)).await;
        assert_eq!(order.cancel_reason, Some(CancelReason::PaymentFailed));
    }
    // Ended orders leave memory as their entities passivate; then orders are taken again.
    let started = Instant::now();
    let accepted = loop {
        match app.services.orders.place(new_order("ida", &[("apple", 1)], "tok_visa"), None).await {
            Ok(placed) => break placed,
            Err(ServiceError::Unavailable { .. }) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("still refused after the stuck orders ended: {err:?}"),
        }
    };
    let order = wait_terminal(&app, accepted.order.id, Duration::from_secs(10)).await;
    assert_eq!(order.status, OrderStatus::Confirmed);
    // The stuck orders released their stock; the refused one never took any.
    assert_eq!(stock(&app, "apple").await, (9, 0));
    assert_eq!(app.provider.approved_charges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_placements_cannot_overshoot_the_limit_of_orders_in_flight_together() {
    let app = start_with_limit(4, 100).await;
    // 64 customers at once (a share of one order each), with payments that never answer: every
    // order admitted stays in flight for the test's whole length.
    let placements = (0..64).map(|i| {
        let orders = app.services.orders.clone();
        tokio::spawn(
            async move { orders.place(new_order(&format!("c{i}"), &[("apple", 1)], "tok_timeout"), None).await },
        )
    });
    let mut accepted = 0;
    for placement in futures_util::future::join_all(placements).await {
        match placement.unwrap() {
            Ok(_) => accepted += 1,
            Err(ServiceError::Unavailable { service: "order", .. }) => {}
            Err(err) => panic!("{err:?}"),
        }
    }
    assert_eq!(accepted, 4, "the limit, no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_customer_gets_a_tenth_of_the_orders_in_flight_so_others_still_order() {
    let app = start_with_limit(20, 10).await;
    let services = &app.services;
    for _ in 0..2 {
        services.orders.place(new_order("gus", &[("apple", 1)], "tok_timeout"), None).await.unwrap();
    }
    let refused = services.orders.place(new_order("gus", &[("apple", 1)], "tok_timeout"), None).await;
    assert!(matches!(refused, Err(ServiceError::Unavailable { service: "order", .. })), "{refused:?}");
    services.orders.place(new_order("hal", &[("apple", 1)], "tok_visa"), None).await.unwrap();
}

//! Full in-process order sagas (no HTTP): place orders with `tok_visa` over many skus, with a
//! bounded number in flight, and measure confirmed orders per second (placement to
//! `confirmed`, every step durable: fsync on).
//!
//! ```text
//! cargo bench -p ordermesh-actors --bench saga
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ordermesh_actors::domain::{CustomerId, Money, OrderStatus, PaymentToken, Quantity, Sku};
use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::services::order::{NewOrder, Requester};
use ordermesh_actors::{Services, Settings};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The allocator of the `ordermesh` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SKUS: usize = 512;
/// Large enough that filling and draining the in-flight window (its first and last ~100 ms)
/// does not weigh on the figure: with 2,000 it cost about a fifth.
const ORDERS_PER_SAMPLE: u64 = 10_000;

async fn run_orders(services: &Arc<Services>, count: u64, in_flight: usize) -> Duration {
    let permits = Arc::new(Semaphore::new(in_flight));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for n in 0..count {
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let services = services.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let order = NewOrder {
                customer: CustomerId::parse(format!("bench-{}", n % 1000)).expect("valid"),
                items: vec![(
                    Sku::parse(format!("sku-{}", n as usize % SKUS)).expect("valid"),
                    Quantity::new(1).expect("valid"),
                )],
                payment_token: PaymentToken::parse("tok_visa").expect("valid"),
            };
            let id = services.orders.place(order, None).await.expect("placed").order.id;
            // Waits for the outcome as an API client's long poll does (woken when the order
            // ends, no polling loop to measure).
            let wait = Duration::from_secs(30);
            let order = services.orders.get_when_terminal(id, &Requester::Admin, wait).await.expect("read");
            assert_eq!(order.expect("exists").status, OrderStatus::Confirmed);
        }));
    }
    for t in tasks {
        t.await.expect("order task");
    }
    started.elapsed()
}

fn sagas(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let services = runtime.block_on(async {
        let services =
            Services::start(dir.path(), Settings::default(), Arc::new(SimulatedProvider::new())).await.expect("start");
        for s in 0..SKUS {
            let sku = Sku::parse(format!("sku-{s}")).expect("valid");
            services.inventory.set_stock(&sku, 10_000_000, Money::from_cents(100)).await.expect("stock");
        }
        Arc::new(services)
    });
    let mut group = c.benchmark_group("order_saga");
    group.sample_size(10).measurement_time(Duration::from_secs(30)).warm_up_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(ORDERS_PER_SAMPLE));
    for in_flight in [64usize, 512] {
        group.bench_function(format!("confirmed_orders_{in_flight}_in_flight"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let services = services.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += run_orders(&services, ORDERS_PER_SAMPLE, in_flight).await;
                    }
                    total
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, sagas);
criterion_main!(benches);

//! Durable appends through group commit, with 1, 16 and 256 concurrent writers.
//!
//! Each writer appends one small event to its own entity per commit, in a loop, on a tokio
//! multi-thread runtime; every commit waits for its group's flush + fsync. Throughput is in
//! appends (elements) per second. Run with:
//!
//! ```text
//! cargo bench -p ordermesh-storage --bench group_commit
//! ```
//!
//! After each case it also prints the store's counters over the whole case, warm-up included:
//! appends per second of writing, appends per log round and per fsync.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ordermesh_storage::{Append, Store, StoreOptions, WriteBatch};

/// The allocator of the `ordermesh` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// About the size of an encoded domain event.
const EVENT: &[u8] = &[42u8; 96];

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let mut group = c.benchmark_group("group_commit");
    // `eager`: rounds back to back (`min_round_interval` zero) instead of at most one a
    // millisecond while writers are concurrent: more throughput per writer, more CPU per write.
    let eager = StoreOptions { min_round_interval: Duration::ZERO, ..StoreOptions::default() };
    let cases = [
        ("durable_appends", 1u64, StoreOptions::default()),
        ("durable_appends", 16, StoreOptions::default()),
        ("durable_appends_eager", 16, eager.clone()),
        ("durable_appends", 256, StoreOptions::default()),
        ("durable_appends_eager", 256, eager),
    ];
    for (name, writers, options) in cases {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(dir.path(), options).expect("open store");
        // Each measurement uses fresh entities, so every writer starts at version 0.
        let round = Arc::new(AtomicU64::new(0));
        // Time spent writing (µs), summed over every measurement of the case.
        let writing = Arc::new(AtomicU64::new(0));
        group.throughput(Throughput::Elements(writers));
        group.bench_with_input(BenchmarkId::new(name, writers), &writers, |b, &writers| {
            b.to_async(&runtime).iter_custom(|iters| {
                let store = store.clone();
                let round = round.fetch_add(1, Ordering::Relaxed);
                let writing = writing.clone();
                async move {
                    let took = run_writers(store, writers, iters, round).await;
                    writing.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                    took
                }
            });
        });
        let seconds = writing.load(Ordering::Relaxed) as f64 / 1e6;
        let stats = store.stats();
        eprintln!(
            "group_commit/{name}/{writers} writers: {} appends in {seconds:.2} s of writing = {:.0} appends/s; \
             {:.1} appends per log round, {:.1} per fsync",
            stats.writes,
            stats.writes as f64 / seconds.max(1e-9),
            stats.writes as f64 / stats.rounds.max(1) as f64,
            stats.writes as f64 / stats.fsyncs.max(1) as f64,
        );
        store.close().expect("close store");
    }
    group.finish();
}

/// `writers` tasks, each committing `iters` single-event appends to its own entity.
async fn run_writers(store: Store, writers: u64, iters: u64, round: u64) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let entity = format!("writer-{w}-round-{round}");
                for version in 0..iters {
                    let batch = WriteBatch {
                        appends: vec![Append {
                            entity: entity.clone(),
                            expected_version: version,
                            events: vec![EVENT.to_vec()],
                        }],
                        ..WriteBatch::default()
                    };
                    store.commit(batch).await.expect("durable append");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    start.elapsed()
}

fn config() -> Criterion {
    Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = group_commit
}
criterion_main!(benches);

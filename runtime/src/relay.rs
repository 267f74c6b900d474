//! The outbox relay: delivers a store's durable outbox entries at least once.
//!
//! Entries are written atomically with the events that caused them (see `storage`), so an
//! event is never lost between "state changed" and "others were told". The relay reads only
//! durable entries, hands each to `deliver` (which routes it to the consuming service and
//! returns once the consumer has made its effect durable), retries failures with backoff,
//! and acknowledges (deletes) delivered entries. After a crash, unacknowledged entries are
//! delivered again; each consumer's state makes a repeated event a no-op, so the effect
//! happens once.

use crate::resilience::Backoff;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use ordermesh_storage::{OutboxEntry, Store};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Store name for logs and metrics.
    pub name: &'static str,
    /// Deliveries in flight at once (bounds memory and the load put on consumers).
    pub max_in_flight: usize,
    pub backoff: Backoff,
}

/// Runs until `shutdown` turns true. `deliver` returns `Ok` once the consumer has durably
/// taken the entry; an `Err` is retried (forever: an event must not be dropped).
///
/// The deliveries in flight are futures polled by the relay's own task, not tasks of their
/// own: a task per entry (two per order) cost its spawn, its scheduling and its bookkeeping,
/// for futures that mostly wait on the consumer.
pub async fn run_relay<F, Fut, E>(store: Store, options: RelayOptions, deliver: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(OutboxEntry) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let max_in_flight = options.max_in_flight.max(1);
    let notify = store.outbox_notify();
    let mut cursor: Option<u64> = None;
    // Looked up once, not per delivery (and before `in_flight`, whose deliveries borrow it).
    let delivered = metrics::counter!("outbox_delivered_total", "relay" => options.name);
    let mut in_flight = FuturesUnordered::new();
    loop {
        // Register interest before reading, so a commit between the read and the wait is
        // not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let limit = (max_in_flight - in_flight.len()).min(256);
        let batch = if limit == 0 {
            Vec::new()
        } else {
            store.outbox_pending(cursor, limit).unwrap_or_else(|err| {
                tracing::error!(relay = options.name, error = %err, "cannot read outbox");
                Vec::new()
            })
        };
        // A full batch may have more behind it: read on. Otherwise the new deliveries start
        // in the wait below (the first poll of `in_flight`), and a commit since the read
        // wakes it.
        let more = limit > 0 && batch.len() == limit;
        for entry in batch {
            cursor = Some(entry.id);
            in_flight.push(deliver_until_taken(entry, &deliver, &store, &options, &delivered));
        }
        if more {
            continue;
        }
        let room = in_flight.len() < max_in_flight;
        tokio::select! {
            _ = &mut notified, if room => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                // Every delivery that is done, before the outbox is read again.
                while let Some(Some(())) = in_flight.next().now_or_never() {}
            }
        }
        if *shutdown.borrow() {
            break;
        }
    }
    // Dropping the deliveries in flight leaves their entries in the outbox, for the next start.
}

/// Delivers `entry` until the consumer takes it (backing off between attempts), then
/// acknowledges it.
async fn deliver_until_taken<F, Fut, E>(
    entry: OutboxEntry,
    deliver: &F,
    store: &Store,
    options: &RelayOptions,
    delivered: &metrics::Counter,
) where
    F: Fn(OutboxEntry) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let (id, name) = (entry.id, options.name);
    let mut attempt = 0u32;
    loop {
        // A panic is one delivery's failure, not the relay's: the relay polls every delivery
        // in its own task, and a panic there would stop it for good.
        match AssertUnwindSafe(async { deliver(entry.clone()).await }).catch_unwind().await {
            Ok(Ok(())) => break,
            Ok(Err(err)) => tracing::debug!(relay = name, id, attempt, error = %err, "delivery failed, will retry"),
            Err(_panic) => tracing::error!(relay = name, id, attempt, "delivery panicked, will retry"),
        }
        metrics::counter!("outbox_delivery_retries_total", "relay" => name).increment(1);
        tokio::time::sleep(options.backoff.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
    if let Err(err) = store.outbox_ack(&[id]) {
        tracing::warn!(relay = name, id, error = %err, "cannot ack outbox entry; it will be redelivered");
    }
    delivered.increment(1);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use ordermesh_storage::{StoreOptions, WriteBatch};
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every entry is delivered and acknowledged, never more than `max_in_flight` at once, and a
    /// delivery that panics is retried instead of stopping the relay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivers_everything_within_the_bound_and_survives_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        for n in 0..40u8 {
            store.commit(WriteBatch { outbox: vec![vec![n]], ..WriteBatch::default() }).await.unwrap();
        }
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let panicked = Arc::new(AtomicUsize::new(0));
        let deliver = {
            let (running, most, seen, panicked) = (running.clone(), most.clone(), seen.clone(), panicked.clone());
            move |entry: OutboxEntry| {
                let (running, most, seen, panicked) = (running.clone(), most.clone(), seen.clone(), panicked.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    if entry.bytes == [7] && panicked.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("the first delivery of entry 7 panics");
                    }
                    seen.lock().unwrap().push(entry.bytes[0]);
                    Ok::<(), String>(())
                }
            }
        };
        let options = RelayOptions {
            name: "test",
            max_in_flight: 3,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
        };
        let (stop, stopped) = watch::channel(false);
        let relay = tokio::spawn(run_relay(store.clone(), options, deliver, stopped));
        for _ in 0..500 {
            if seen.lock().unwrap().len() == 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut delivered = seen.lock().unwrap().clone();
        delivered.sort_unstable();
        assert_eq!(delivered, (0..40).collect::<Vec<u8>>(), "each entry once, 7 after its retry");
        assert_eq!(panicked.load(Ordering::SeqCst), 2, "entry 7 panicked once, then went through");
        assert!(most.load(Ordering::SeqCst) <= 3, "at most 3 at once, saw {}", most.load(Ordering::SeqCst));
        assert!(store.outbox_pending(None, 100).unwrap().is_empty(), "every entry acknowledged");
        stop.send(true).unwrap();
        relay.await.unwrap();
    }
}

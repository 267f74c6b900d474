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
    let mut in_flight = FuturesUnordered::new();
    // Looked up once, not per delivery.
    let delivered = metrics::counter!("outbox_delivered_total", "relay" => options.name);
    loop {
        // Register interest before reading, so a commit between the read and the wait is
        // not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let room = max_in_flight - in_flight.len();
        let batch = if room == 0 {
            Vec::new()
        } else {
            store.outbox_pending(cursor, room.min(256)).unwrap_or_else(|err| {
                tracing::error!(relay = options.name, error = %err, "cannot read outbox");
                Vec::new()
            })
        };
        if batch.is_empty() {
            tokio::select! {
                _ = &mut notified, if room > 0 => {}
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
            continue;
        }
        for entry in batch {
            cursor = Some(entry.id);
            in_flight.push(deliver_until_taken(entry, &deliver, &store, &options, delivered.clone()));
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
    delivered: metrics::Counter,
) where
    F: Fn(OutboxEntry) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let (id, name) = (entry.id, options.name);
    let mut attempt = 0u32;
    loop {
        match deliver(entry.clone()).await {
            Ok(()) => break,
            Err(err) => {
                metrics::counter!("outbox_delivery_retries_total", "relay" => name).increment(1);
                tracing::debug!(relay = name, id, attempt, error = %err, "delivery failed, will retry");
                tokio::time::sleep(options.backoff.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
    if let Err(err) = store.outbox_ack(&[id]) {
        tracing::warn!(relay = name, id, error = %err, "cannot ack outbox entry; it will be redelivered");
    }
    delivered.increment(1);
}

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
use ordermesh_storage::{OutboxEntry, Store};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

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
pub async fn run_relay<F, Fut, E>(store: Store, options: RelayOptions, deliver: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(OutboxEntry) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let deliver = Arc::new(deliver);
    let permits = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
    let notify = store.outbox_notify();
    let mut cursor: Option<u64> = None;
    let mut in_flight = JoinSet::new();
    // Looked up once, not per delivery.
    let delivered = metrics::counter!("outbox_delivered_total", "relay" => options.name);
    loop {
        // Register interest before reading, so a commit between the read and the wait is
        // not missed.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let batch = match store.outbox_pending(cursor, 256) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(relay = options.name, error = %err, "cannot read outbox");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            continue;
        }
        for entry in batch {
            cursor = Some(entry.id);
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let (deliver, store, backoff, name) = (deliver.clone(), store.clone(), options.backoff, options.name);
            let mut shutdown = shutdown.clone();
            let delivered = delivered.clone();
            in_flight.spawn(async move {
                let _permit = permit;
                let id = entry.id;
                let mut attempt = 0u32;
                loop {
                    match deliver(entry.clone()).await {
                        Ok(()) => break,
                        Err(err) => {
                            metrics::counter!("outbox_delivery_retries_total", "relay" => name).increment(1);
                            tracing::debug!(relay = name, id, attempt, error = %err, "delivery failed, will retry");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                                _ = shutdown.changed() => return,
                            }
                            attempt = attempt.saturating_add(1);
                        }
                    }
                }
                if let Err(err) = store.outbox_ack(&[id]) {
                    tracing::warn!(relay = name, id, error = %err, "cannot ack outbox entry; it will be redelivered");
                }
                delivered.increment(1);
            });
            while in_flight.try_join_next().is_some() {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    in_flight.shutdown().await;
}

//! Entity hosting on its own (no store, no cluster): one actor per key, activated on demand,
//! passivated right after the message that finished it, or once idle for the idle time.
#![allow(clippy::unwrap_used)]

use ordermesh_runtime::{Entity, EntityContext, HostingOptions, Router, RouterHandle};
use ractor::{ActorProcessingErr, RpcReplyPort};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Counts the messages it got since it was activated; its work is over at `finished_at`.
struct Tally {
    count: u32,
    finished_at: u32,
}

const FINISHED_AT: u32 = 3;

struct Add {
    reply: RpcReplyPort<u32>,
}

#[derive(Clone)]
struct Activations(Arc<AtomicU32>, u32);

impl Entity for Tally {
    type Msg = Add;
    type Deps = Activations;

    async fn activate(_key: &str, deps: &Activations) -> Result<Self, ActorProcessingErr> {
        deps.0.fetch_add(1, Ordering::SeqCst);
        Ok(Tally { count: 0, finished_at: deps.1 })
    }

    async fn handle(&mut self, msg: Add, _ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        self.count += 1;
        let _ = msg.reply.send(self.count);
        Ok(())
    }

    fn finished(&self) -> bool {
        self.count >= self.finished_at
    }
}

async fn start() -> (RouterHandle<Add>, Activations) {
    // Idle passivation an hour away: anything that leaves memory here left because it finished.
    start_with(Duration::from_secs(3600), FINISHED_AT).await
}

async fn start_with(idle_after: Duration, finished_at: u32) -> (RouterHandle<Add>, Activations) {
    let activations = Activations(Arc::default(), finished_at);
    let options = HostingOptions { service: "tally", idle_after };
    let router = Router::<Tally>::start(options, activations.clone()).await.unwrap();
    (RouterHandle::new(router, "tally"), activations)
}

async fn add(handle: &RouterHandle<Add>, key: &str) -> u32 {
    handle.call(key, |reply| Add { reply }, Duration::from_secs(5)).await.unwrap()
}

#[tokio::test]
async fn an_entity_stays_in_memory_until_its_work_is_over_then_leaves_at_once() {
    let (handle, activations) = start().await;
    for expected in 1..=FINISHED_AT {
        assert_eq!(add(&handle, "a").await, expected, "one actor keeps its state between messages");
    }
    assert_eq!(activations.0.load(Ordering::SeqCst), 1);

    // The passivation handshake with the router is asynchronous: wait for the next activation.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let count = add(&handle, "a").await;
        if count == 1 {
            break; // a fresh activation: the finished one was dropped
        }
        assert!(tokio::time::Instant::now() < deadline, "a finished entity stayed in memory");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(activations.0.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn an_unfinished_entity_is_kept() {
    let (handle, activations) = start().await;
    assert_eq!(add(&handle, "b").await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(add(&handle, "b").await, 2);
    // Other keys get their own actors.
    assert_eq!(add(&handle, "c").await, 1);
    assert_eq!(activations.0.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_entity_leaves_once_idle_for_the_idle_time_and_not_while_messages_keep_coming() {
    let idle_after = Duration::from_millis(150);
    let (handle, activations) = start_with(idle_after, u32::MAX).await;

    // Messages every 50 ms for three idle times: the same activation throughout.
    for expected in 1..=10 {
        assert_eq!(add(&handle, "busy").await, expected, "passivated while messages kept coming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Then silence: it leaves memory after about the idle time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handle.active_entities().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "an idle entity stayed in memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(add(&handle, "busy").await, 1, "the next message starts a fresh activation");
    assert_eq!(activations.0.load(Ordering::SeqCst), 2);
}

//! Entity hosting on its own (no store, no cluster): one actor per key, activated on demand,
//! passivated right after the message that finished it, or once idle for the idle time.
#![allow(clippy::unwrap_used)]

use ordermesh_runtime::{Entity, EntityContext, HostingOptions, Router, RouterHandle};
use ractor::{ActorProcessingErr, RpcReplyPort};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    (Router::<Tally>::start(options, activations.clone()).await.unwrap(), activations)
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
    while handle.active_entities() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "an idle entity stayed in memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(add(&handle, "busy").await, 1, "the next message starts a fresh activation");
    assert_eq!(activations.0.load(Ordering::SeqCst), 2);
}

/// An entity that is finished after every message, and notices when it handles a message after
/// a newer activation of its key has started (two activations overlapping).
struct Racer {
    generation: u64,
    key: String,
    deps: RaceDeps,
}

#[derive(Clone, Default)]
struct RaceDeps {
    /// The newest activation of each key.
    newest: Arc<Mutex<HashMap<String, u64>>>,
    activations: Arc<AtomicU64>,
    /// Messages handled by an activation older than the newest of its key.
    stale: Arc<AtomicU64>,
}

impl Entity for Racer {
    type Msg = Add;
    type Deps = RaceDeps;

    async fn activate(key: &str, deps: &RaceDeps) -> Result<Self, ActorProcessingErr> {
        let generation = deps.activations.fetch_add(1, Ordering::SeqCst);
        deps.newest.lock().unwrap().insert(key.to_owned(), generation);
        Ok(Racer { generation, key: key.to_owned(), deps: deps.clone() })
    }

    async fn handle(&mut self, msg: Add, _ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        // Slow enough that messages queue up behind this one, and a newer activation (if the
        // runtime wrongly started one) has time to begin.
        tokio::time::sleep(Duration::from_micros(200)).await;
        if self.deps.newest.lock().unwrap().get(&self.key) != Some(&self.generation) {
            self.deps.stale.fetch_add(1, Ordering::SeqCst);
        }
        let _ = msg.reply.send(0);
        Ok(())
    }

    fn finished(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_is_lost_and_activations_never_overlap_while_entities_come_and_go() {
    // Every message finishes its entity, so deliveries keep racing its passivation: a message
    // delivered to an activation on its way out (or to none) is never answered, and one left
    // queued in an activation that a newer one replaced is handled by two activations at once.
    let deps = RaceDeps::default();
    let options = HostingOptions { service: "racer", idle_after: Duration::from_secs(3600) };
    let handle = Router::<Racer>::start(options, deps.clone()).await.unwrap();
    // Each caller waits for its answer before its next message, so arrivals are spread out
    // rather than in bursts: some land while an activation still has queued messages, some
    // while it is leaving, some after.
    let callers = (0..8).map(|caller| {
        let handle = handle.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let key = ["x", "y", "z"][(caller + i) % 3];
                handle
                    .call(key, |reply| Add { reply }, Duration::from_secs(2))
                    .await
                    .expect("every message is answered");
                // Pauses now and then, so that queues also drain and entities leave.
                if (caller * 7 + i) % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    });
    let callers: Vec<_> = callers.collect(); // all running at once
    for caller in callers {
        caller.await.unwrap();
    }
    let activations = deps.activations.load(Ordering::SeqCst);
    assert!(activations > 20, "entities should have come and gone, got {activations} activations");
    assert_eq!(deps.stale.load(Ordering::SeqCst), 0, "an activation handled a message after a newer one started");
}

/// An entity that schedules a `Tick` to itself when started; `Start { finish: true }` ends its
/// work at once (so it leaves with its tick still pending), `false` waits for the tick.
struct Ticker {
    key: String,
    ticked: bool,
    finish_now: bool,
    deps: Ticks,
}

enum TickerMsg {
    Start { finish: bool, reply: RpcReplyPort<()> },
    Tick,
}

/// The keys whose entity handled a tick, in order.
#[derive(Clone, Default)]
struct Ticks(Arc<Mutex<Vec<String>>>);

impl Entity for Ticker {
    type Msg = TickerMsg;
    type Deps = Ticks;

    async fn activate(key: &str, deps: &Ticks) -> Result<Self, ActorProcessingErr> {
        Ok(Ticker { key: key.to_owned(), ticked: false, finish_now: false, deps: deps.clone() })
    }

    async fn handle(&mut self, msg: TickerMsg, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        match msg {
            TickerMsg::Start { finish, reply } => {
                self.finish_now = finish;
                // The timer's handle is dropped: the tick is sent whatever became of the entity.
                drop(ctx.send_self_after(Duration::from_millis(50), TickerMsg::Tick));
                let _ = reply.send(());
            }
            TickerMsg::Tick => {
                self.ticked = true;
                self.deps.0.lock().unwrap().push(self.key.clone());
            }
        }
        Ok(())
    }

    fn finished(&self) -> bool {
        self.finish_now || self.ticked
    }
}

#[tokio::test]
async fn a_message_an_entity_sent_itself_reaches_that_activation_only() {
    let ticks = Ticks::default();
    let options = HostingOptions { service: "ticker", idle_after: Duration::from_secs(3600) };
    let handle = Router::<Ticker>::start(options, ticks.clone()).await.unwrap();
    let start = |key: &'static str, finish: bool| {
        let handle = handle.clone();
        async move {
            handle.call(key, |reply| TickerMsg::Start { finish, reply }, Duration::from_secs(5)).await.unwrap();
        }
    };

    // "gone" leaves at once with its tick pending; its actor is idle, then hosts "next", which
    // waits for a tick of its own. "gone"'s tick must reach neither "next" nor a new "gone".
    start("gone", true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handle.active_entities() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "a finished entity stayed in memory");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start("next", false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*ticks.0.lock().unwrap(), vec!["next".to_owned()], "each tick reaches the activation that sent it");
    assert_eq!(handle.active_entities(), 0, "\"next\" finished on its tick and left");
}

//! Entity hosting: one actor per entity, activated on demand, passivated when idle.
//!
//! ```text
//!   ServiceHandle ──call/send──▶ Router<E> (one per service per node)
//!                                   │ spawns on first message for a key, links as supervisor
//!                                   ▼
//!                      EntityActor<E> (key "order-7")   EntityActor<E> (key "sku-42") ...
//! ```
//!
//! The router only maps keys to actors; it never awaits anything but a spawn, so a slow entity
//! (one replaying a long log, or awaiting a call to another service) blocks only itself. An
//! entity loads its state lazily on its first message (inside its own actor), and asks the
//! router to passivate it when it has been idle. The router agrees only if it has forwarded
//! no message the entity has not yet processed, then sends `Stop` through the entity's FIFO
//! mailbox; a message for the key after that starts a fresh activation. Two activations of one
//! key can still overlap for a moment (a `Stop` still queued behind the last messages), which
//! is why the event log checks expected versions: a stale writer gets a conflict, fails, and
//! its next activation replays the log.

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, Message, RpcReplyPort, SupervisionEvent};
use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// A kind of entity the runtime hosts (an order, a stock item, a payment).
pub trait Entity: Sized + Send + 'static {
    /// Everything the entity's handlers may receive: requests from other actors and its own
    /// scheduled messages (timers, saga continuations).
    type Msg: Send + 'static;
    /// Shared dependencies (its store, handles to other services), cloned into each actor.
    type Deps: Clone + Send + Sync + 'static;

    /// Loads the entity from its store (snapshot, then the events after it). An error stops the
    /// actor; pending callers see their reply ports dropped, and the next message tries again.
    fn activate(key: &str, deps: &Self::Deps) -> impl Future<Output = Result<Self, ActorProcessingErr>> + Send;

    /// Handles one message. An error stops this entity's actor (its state is reloaded from the
    /// store on the next message), never the router.
    fn handle(
        &mut self,
        msg: Self::Msg,
        ctx: &EntityContext<Self>,
    ) -> impl Future<Output = Result<(), ActorProcessingErr>> + Send;

    /// Called once after activation, e.g. to resume a saga or restart an in-flight charge.
    fn on_activated(&mut self, ctx: &EntityContext<Self>) {
        let _ = ctx;
    }

    /// True when the entity may be dropped from memory (nothing in flight, no timer pending).
    fn can_passivate(&self) -> bool {
        true
    }

    /// True when the entity's work is over (an order whose saga is done): it then leaves memory
    /// right after the message that finished it instead of after the idle time. Without this,
    /// every order of the last idle period (30 s at thousands per second) stayed in memory with
    /// its actor, tens of KiB each; a later message simply activates it again.
    fn finished(&self) -> bool {
        false
    }
}

/// What an entity's handler may do besides changing its own state.
pub struct EntityContext<E: Entity> {
    key: String,
    deps: E::Deps,
    myself: ActorRef<EntityMsg<E::Msg>>,
}

impl<E: Entity> EntityContext<E> {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn deps(&self) -> &E::Deps {
        &self.deps
    }

    /// Queues a message to this entity itself (after whatever is already queued).
    pub fn send_self(&self, msg: E::Msg) {
        // Fails only if the actor is stopping, when the message has no one to act on it anyway.
        let _ = self.myself.send_message(EntityMsg::FromSelf(msg));
    }

    /// Queues a message to this entity after `delay` (a timer; dropped if the actor stops).
    pub fn send_self_after(&self, delay: Duration, msg: E::Msg) -> JoinHandle<()> {
        send_after(&self.myself, delay, EntityMsg::FromSelf(msg))
    }

    /// A cheap handle that can post messages to this entity from a spawned task.
    pub fn mailbox(&self) -> Mailbox<E::Msg> {
        Mailbox(self.myself.clone())
    }
}

/// Posts messages to one entity from outside its handler (e.g. a spawned provider call).
pub struct Mailbox<M: Send + 'static>(ActorRef<EntityMsg<M>>);

impl<M: Send + 'static> Clone for Mailbox<M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<M: Send + 'static> Mailbox<M> {
    pub fn send(&self, msg: M) {
        let _ = self.0.send_message(EntityMsg::FromSelf(msg));
    }
}

/// Messages of an entity actor.
pub enum EntityMsg<M> {
    /// Forwarded by the router (counted, for safe passivation).
    FromRouter(M),
    /// Sent by the entity to itself.
    FromSelf(M),
    /// The idle timer fired: passivate if nothing arrived meanwhile (else wait out the rest).
    IdleCheck,
    /// The router agreed to passivation: stop after everything queued before this.
    Stop,
}

impl<M: Send + 'static> Message for EntityMsg<M> {}

/// Messages of a router.
pub enum RouterMsg<M> {
    /// Deliver `msg` to the entity `key`, activating it if needed.
    Deliver { key: String, msg: M },
    /// An entity that has processed `processed` router messages asks to be passivated.
    Passivate { key: String, actor: ActorId, processed: u64 },
    /// How many entities are active now (for metrics and tests).
    CountActive(RpcReplyPort<usize>),
}

impl<M: Send + 'static> Message for RouterMsg<M> {}

/// Settings of one service's entity hosting.
#[derive(Debug, Clone)]
pub struct HostingOptions {
    /// Service name, for logs and metrics ("order", "inventory", "payment").
    pub service: &'static str,
    /// An entity idle this long is passivated (if it agrees).
    pub idle_after: Duration,
}

pub struct Router<E: Entity>(std::marker::PhantomData<fn() -> E>);

impl<E: Entity> Router<E> {
    /// Starts a router; entities are spawned as its linked children.
    pub async fn start(
        options: HostingOptions,
        deps: E::Deps,
    ) -> Result<ActorRef<RouterMsg<E::Msg>>, ActorProcessingErr> {
        let (router, _join) = Actor::spawn(None, Router::<E>(std::marker::PhantomData), (options, deps)).await?;
        Ok(router)
    }
}

struct Slot<M: Send + 'static> {
    actor: ActorRef<EntityMsg<M>>,
    /// Messages forwarded to this activation, compared with what it reports as processed.
    forwarded: u64,
}

pub struct RouterState<E: Entity> {
    options: HostingOptions,
    deps: E::Deps,
    slots: HashMap<String, Slot<E::Msg>>,
    keys_by_actor: HashMap<ActorId, String>,
}

impl<E: Entity> Actor for Router<E> {
    type Msg = RouterMsg<E::Msg>;
    type State = RouterState<E>;
    type Arguments = (HostingOptions, E::Deps);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (options, deps): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RouterState { options, deps, slots: HashMap::new(), keys_by_actor: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Deliver { key, msg } => {
                let slot = match state.slots.get_mut(&key) {
                    Some(slot) => slot,
                    None => {
                        let args = EntityArgs::<E> {
                            key: key.clone(),
                            deps: state.deps.clone(),
                            router: myself.clone(),
                            idle_after: state.options.idle_after,
                        };
                        let (actor, _) = Actor::spawn_linked(
                            None,
                            EntityActor::<E>(std::marker::PhantomData),
                            args,
                            myself.get_cell(),
                        )
                        .await?;
                        metrics::gauge!("entities_active", "service" => state.options.service).increment(1.0);
                        state.keys_by_actor.insert(actor.get_id(), key.clone());
                        state.slots.entry(key).or_insert(Slot { actor, forwarded: 0 })
                    }
                };
                slot.forwarded += 1;
                if slot.actor.send_message(EntityMsg::FromRouter(msg)).is_err() {
                    // The actor is stopping; its supervision event will clear the slot. The
                    // message is lost like any message to a dead actor: callers time out and
                    // retry, and every handler is idempotent.
                    tracing::debug!(service = state.options.service, "entity stopping, message dropped");
                }
            }
            RouterMsg::Passivate { key, actor, processed } => {
                if let Some(slot) = state.slots.get(&key)
                    && slot.actor.get_id() == actor
                    && slot.forwarded == processed
                {
                    let _ = slot.actor.send_message(EntityMsg::Stop);
                    state.slots.remove(&key);
                }
            }
            RouterMsg::CountActive(reply) => {
                let _ = reply.send(state.slots.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // An entity stopped (passivated) or failed: forget it, but only if the slot still
        // holds that activation (a newer one may have replaced it).
        let (cell, failure) = match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err)),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if let Some(key) = state.keys_by_actor.remove(&id) {
            metrics::gauge!("entities_active", "service" => state.options.service).decrement(1.0);
            if let Some(err) = failure {
                tracing::warn!(service = state.options.service, key, error = %err, "entity failed; it reloads on its next message");
            }
            if state.slots.get(&key).is_some_and(|slot| slot.actor.get_id() == id) {
                state.slots.remove(&key);
            }
        }
        Ok(())
    }
}

struct EntityActor<E: Entity>(std::marker::PhantomData<fn() -> E>);

struct EntityArgs<E: Entity> {
    key: String,
    deps: E::Deps,
    router: ActorRef<RouterMsg<E::Msg>>,
    idle_after: Duration,
}

struct EntityState<E: Entity> {
    ctx: EntityContext<E>,
    router: ActorRef<RouterMsg<E::Msg>>,
    /// `None` until the first message loads it.
    entity: Option<E>,
    processed_from_router: u64,
    last_activity: Instant,
    idle_after: Duration,
    /// Armed only while the entity could passivate: an entity busy with a saga cannot, and one
    /// whose work is over passivates at once, so most never need a timer (it was a task spawned
    /// and aborted per order).
    idle_timer: Option<JoinHandle<()>>,
}

impl<E: Entity> Actor for EntityActor<E> {
    type Msg = EntityMsg<E::Msg>;
    type State = EntityState<E>;
    type Arguments = EntityArgs<E>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EntityArgs<E>,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Nothing slow here: the router awaits this. Loading happens on the first message.
        Ok(EntityState {
            ctx: EntityContext { key: args.key, deps: args.deps, myself },
            router: args.router,
            entity: None,
            processed_from_router: 0,
            last_activity: Instant::now(),
            idle_after: args.idle_after,
            idle_timer: None,
        })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(timer) = state.idle_timer.take() {
            timer.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let msg = match msg {
            EntityMsg::FromRouter(msg) => {
                state.processed_from_router += 1;
                msg
            }
            EntityMsg::FromSelf(msg) => msg,
            EntityMsg::Stop => {
                myself.stop(Some("passivated".into()));
                return Ok(());
            }
            EntityMsg::IdleCheck => {
                state.idle_timer = None;
                if state.entity.as_ref().is_none_or(E::can_passivate) {
                    let idle_for = state.last_activity.elapsed();
                    if idle_for >= state.idle_after {
                        ask_to_passivate(&myself, state);
                    } else {
                        arm_idle_timer(&myself, state, state.idle_after - idle_for);
                    }
                }
                return Ok(());
            }
        };
        state.last_activity = Instant::now();
        let entity = match &mut state.entity {
            Some(entity) => entity,
            None => {
                let mut loaded = E::activate(&state.ctx.key, &state.ctx.deps).await?;
                loaded.on_activated(&state.ctx);
                state.entity.insert(loaded)
            }
        };
        entity.handle(msg, &state.ctx).await?;
        match (entity.can_passivate(), entity.finished()) {
            // The router agrees only if nothing it forwarded is still queued here; if it does
            // not, the handling of what is queued asks again.
            (true, true) => ask_to_passivate(&myself, state),
            (true, false) if state.idle_timer.is_none() => arm_idle_timer(&myself, state, state.idle_after),
            // Busy (a saga or a charge in flight): the message that ends it re-checks.
            _ => {}
        }
        Ok(())
    }
}

fn arm_idle_timer<E: Entity>(myself: &ActorRef<EntityMsg<E::Msg>>, state: &mut EntityState<E>, after: Duration) {
    state.idle_timer = Some(send_after(myself, after, EntityMsg::IdleCheck));
}

/// Sends `msg` to `actor` after `delay` (a timer task; abort the handle to cancel it). Not
/// ractor's `send_after`, whose handle carries the send's result, which nobody here reads.
fn send_after<M: Send + 'static>(actor: &ActorRef<EntityMsg<M>>, delay: Duration, msg: EntityMsg<M>) -> JoinHandle<()> {
    let actor = actor.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = actor.send_message(msg);
    })
}

fn ask_to_passivate<E: Entity>(myself: &ActorRef<EntityMsg<E::Msg>>, state: &EntityState<E>) {
    let _ = state.router.send_message(RouterMsg::Passivate {
        key: state.ctx.key.clone(),
        actor: myself.get_id(),
        processed: state.processed_from_router,
    });
}

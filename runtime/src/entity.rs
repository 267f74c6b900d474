//! Entity hosting: one actor per entity, activated on demand, passivated when idle.
//!
//! ```text
//!   RouterHandle ──key active?──yes──▶ EntityActor<E> (key "order-7")   EntityActor<E> (key "sku-42") ...
//!        │ no                               ▲ spawned and linked (supervised) by the router
//!        └──────────▶ Router<E> (one per service per node) ──┘
//! ```
//!
//! The active entities of a service are listed in its `Directory` (key -> actor, and how many
//! messages were delivered to it), shared by the callers, the router and the entities. A
//! caller delivers to an active entity straight into its mailbox; only a message for a key
//! with no active entity goes through the router actor, which spawns one and delivers it. (Every
//! message went through the router before: its hop, a task wake and a mailbox more, was about a
//! tenth of the CPU of an order under load.) A message for a key being activated may overtake
//! an earlier one from the same sender still queued at the router (the later one finds the new
//! entity directly); every handler is idempotent and the services send one-way only their own
//! `Continue`/`Resume` nudges, so nothing relies on that order. The router never awaits anything but a spawn, so
//! a slow entity (one replaying a long log, or awaiting a call to another service) blocks only
//! itself. An entity loads its state lazily on its first message (inside its own actor).
//!
//! An entity passivates (when idle, or at once when its work is over) by removing itself from
//! the directory, which it may do only if it has processed every message delivered to it:
//! delivery and removal take the same lock, so no message can be delivered to it after that. It
//! then sends itself `Stop` through its FIFO mailbox; a message for the key after the removal
//! goes to the router and starts a fresh activation. Two activations of one key can still
//! overlap for a moment (a `Stop` still queued behind the entity's own messages), which is why
//! the event log checks expected versions: a stale writer gets a conflict, fails, and its next
//! activation replays the log.

use crate::handle::RouterHandle;
use dashmap::DashMap;
use foldhash::HashMap;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, Message, MessagingErr, SupervisionEvent};
use std::future::Future;
use std::sync::Arc;
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
    /// Delivered through the directory (counted, for safe passivation).
    Delivered(M),
    /// Sent by the entity to itself.
    FromSelf(M),
    /// The idle timer fired: passivate if nothing arrived meanwhile (else wait out the rest).
    IdleCheck,
    /// The entity left the directory: stop after everything queued before this.
    Stop,
}

impl<M: Send + 'static> Message for EntityMsg<M> {}

/// Messages of a router.
pub enum RouterMsg<M> {
    /// Deliver `msg` to the entity `key`, activating it if needed.
    Deliver { key: String, msg: M },
}

impl<M: Send + 'static> Message for RouterMsg<M> {}

/// The active entities of one service on this node.
pub struct Directory<M: Send + 'static> {
    /// Keyed by entity names, some chosen by clients (the skus of an order's lines activate
    /// stock entities before anyone knows they exist): std's hasher, seeded against HashDoS.
    slots: DashMap<String, Slot<M>>,
}

impl<M: Send + 'static> Directory<M> {
    /// Delivers `msg` to the active entity `key`, or hands it back if there is none (the router
    /// must activate one).
    pub(crate) fn deliver(&self, key: &str, msg: M) -> Result<(), M> {
        let (id, msg) = {
            let Some(mut slot) = self.slots.get_mut(key) else {
                return Err(msg);
            };
            match slot.actor.send_message(EntityMsg::Delivered(msg)) {
                Ok(()) => {
                    slot.delivered += 1;
                    return Ok(());
                }
                Err(MessagingErr::SendErr(EntityMsg::Delivered(msg))) => (slot.actor.get_id(), msg),
                // Not a local mailbox (cannot happen: entities are local actors).
                Err(_) => return Ok(()),
            }
        };
        // The activation stopped (it failed) before the router handled its supervision event:
        // forget it now (the slot's lock is released), so that the router starts a fresh one.
        self.forget(key, id);
        Err(msg)
    }

    /// Makes `actor`, just spawned by the router for `key`, the key's active entity, with `msg`
    /// in its mailbox before any caller can see it (so it stays the first).
    fn activate(&self, key: String, actor: ActorRef<EntityMsg<M>>, msg: M, service: &'static str) {
        // Only the router adds slots, and it found none for the key before it spawned.
        let mut slot = self.slots.entry(key).or_insert(Slot { actor, delivered: 0 });
        slot.delivered += 1;
        if slot.actor.send_message(EntityMsg::Delivered(msg)).is_err() {
            // It failed already; its supervision event clears the slot. The message is lost like
            // any message to a dead actor: callers time out and retry, and every handler is
            // idempotent.
            tracing::debug!(service, "entity stopped at once, message dropped");
        }
    }

    /// Removes the activation `id` of `key` if every message delivered to it was processed
    /// (delivery takes the same lock, so none can arrive after). True if it was removed.
    fn leave_if_drained(&self, key: &str, id: ActorId, processed: u64) -> bool {
        self.slots.remove_if(key, |_, slot| slot.actor.get_id() == id && slot.delivered == processed).is_some()
    }

    /// Forgets the activation `id` of `key` (not a newer one that replaced it).
    fn forget(&self, key: &str, id: ActorId) {
        self.slots.remove_if(key, |_, slot| slot.actor.get_id() == id);
    }

    /// How many entities are active.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

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
    pub async fn start(options: HostingOptions, deps: E::Deps) -> Result<RouterHandle<E::Msg>, ActorProcessingErr> {
        let service = options.service;
        let directory = Arc::new(Directory { slots: DashMap::default() });
        let args = (options, deps, directory.clone());
        let (router, _join) = Actor::spawn(None, Router::<E>(std::marker::PhantomData), args).await?;
        Ok(RouterHandle::new(router, directory, service))
    }
}

struct Slot<M: Send + 'static> {
    actor: ActorRef<EntityMsg<M>>,
    /// Messages delivered to this activation, compared with what it has processed.
    delivered: u64,
}

pub struct RouterState<E: Entity> {
    options: HostingOptions,
    deps: E::Deps,
    directory: Arc<Directory<E::Msg>>,
    keys_by_actor: HashMap<ActorId, String>,
    /// `entities_active{service}`, looked up once: two changes per entity.
    active: metrics::Gauge,
}

impl<E: Entity> Actor for Router<E> {
    type Msg = RouterMsg<E::Msg>;
    type State = RouterState<E>;
    type Arguments = (HostingOptions, E::Deps, Arc<Directory<E::Msg>>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (options, deps, directory): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let active = metrics::gauge!("entities_active", "service" => options.service);
        Ok(RouterState { options, deps, directory, keys_by_actor: HashMap::default(), active })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RouterMsg::Deliver { key, msg } = msg;
        let service = state.options.service;
        // Activated meanwhile (by an earlier message for the key queued here): deliver to it.
        let Err(msg) = state.directory.deliver(&key, msg) else {
            return Ok(());
        };
        let args = EntityArgs::<E> {
            key: key.clone(),
            deps: state.deps.clone(),
            directory: state.directory.clone(),
            idle_after: state.options.idle_after,
        };
        let (actor, _) =
            Actor::spawn_linked(None, EntityActor::<E>(std::marker::PhantomData), args, myself.get_cell()).await?;
        state.active.increment(1.0);
        state.keys_by_actor.insert(actor.get_id(), key.clone());
        state.directory.activate(key, actor, msg, service);
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Its entities stop with it (linked children): none is active any more.
        state.directory.slots.clear();
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
            state.active.decrement(1.0);
            if let Some(err) = failure {
                tracing::warn!(service = state.options.service, key, error = %err, "entity failed; it reloads on its next message");
            }
            state.directory.forget(&key, id);
        }
        Ok(())
    }
}

struct EntityActor<E: Entity>(std::marker::PhantomData<fn() -> E>);

struct EntityArgs<E: Entity> {
    key: String,
    deps: E::Deps,
    directory: Arc<Directory<E::Msg>>,
    idle_after: Duration,
}

struct EntityState<E: Entity> {
    ctx: EntityContext<E>,
    directory: Arc<Directory<E::Msg>>,
    /// `None` until the first message loads it.
    entity: Option<E>,
    /// Messages delivered through the directory and processed.
    processed: u64,
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
            directory: args.directory,
            entity: None,
            processed: 0,
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
            EntityMsg::Delivered(msg) => {
                state.processed += 1;
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
                        passivate_if_drained(&myself, state);
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
                let mut loaded = Box::pin(E::activate(&state.ctx.key, &state.ctx.deps)).await?;
                loaded.on_activated(&state.ctx);
                state.entity.insert(loaded)
            }
        };
        // Boxed: a saga step's future is kilobytes, and inline in this one it was copied
        // whole into ractor's message loop at every message (memcpy, ~1% of `dev`'s CPU).
        Box::pin(entity.handle(msg, &state.ctx)).await?;
        match (entity.can_passivate(), entity.finished()) {
            // Only if nothing delivered is still queued here; if something is, its handling
            // tries again.
            (true, true) => passivate_if_drained(&myself, state),
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

/// Leaves the directory and stops, if every message delivered to this activation has been
/// processed.
fn passivate_if_drained<E: Entity>(myself: &ActorRef<EntityMsg<E::Msg>>, state: &EntityState<E>) {
    if state.directory.leave_if_drained(&state.ctx.key, myself.get_id(), state.processed) {
        let _ = myself.send_message(EntityMsg::Stop);
    }
}

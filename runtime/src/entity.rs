//! Entity hosting: one actor per active entity, activated on demand, passivated when idle.
//!
//! ```text
//!   RouterHandle ──key active?──yes──▶ EntityActor<E> (key "order-7")   EntityActor<E> (key "sku-42") ...
//!        │ no: an idle actor? ──yes──▶ EntityActor<E> (now key "order-8")
//!        │ no                               ▲ spawned and linked (supervised) by the router
//!        └──────────▶ Router<E> (one per service per node) ──┘
//! ```
//!
//! The active entities of a service are listed in its `Directory` (key -> actor, and how many
//! messages were delivered to it), shared by the callers, the router and the entities. A
//! caller delivers to an active entity straight into its mailbox. For a key with no active
//! entity it takes an idle actor from the directory and activates the key there; only when
//! none is idle does the message go through the router actor, which spawns one. (Every message
//! went through the router once: its hop, a task wake and a mailbox more, was about a tenth of
//! the CPU of an order under load. Then every activation spawned an actor and every passivation
//! stopped it: a task, four channels, ractor's registry and supervision events, 11% of an
//! order's instructions, for orders and payments that live for one saga.) A message for a key
//! being activated may overtake an earlier one from the same sender still queued at the router
//! (the later one finds the new entity directly); every handler is idempotent and the services
//! send one-way only their own `Continue`/`Resume` nudges, so nothing relies on that order. The
//! router never awaits anything but a spawn, so a slow entity (one replaying a long log, or
//! awaiting a call to another service) blocks only itself. An entity loads its state lazily on
//! its first message (inside its own actor).
//!
//! An entity passivates (when idle, or at once when its work is over) by removing itself from
//! the directory, which it may do only if it has processed every message delivered to it:
//! delivery and removal take the same lock, so no message can be delivered to it after that. Its
//! actor then drops it and waits idle for another key (or stops, if enough actors are idle); a
//! message for the key after the removal starts a fresh activation. What the entity sent itself
//! (a timer that fired as it left, a provider's answer) carries the number of its activation,
//! and a later activation on the same actor drops it. The event log still checks expected
//! versions, so a stale writer on this node's store (an activation whose write was still on its
//! way when it failed, say) gets a conflict, fails, and its next activation replays the log.

use crate::handle::RouterHandle;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, Message, MessagingErr, SupervisionEvent};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// Which activation of this actor is current (an actor hosts one key after another):
    /// messages an entity sends itself carry it, and those of an earlier one are dropped.
    activation: u64,
}

impl<E: Entity> EntityContext<E> {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn deps(&self) -> &E::Deps {
        &self.deps
    }

    /// Queues a message to this entity itself (after whatever is already queued). Dropped if
    /// this activation leaves first: one sent while handling the message after which the entity
    /// is [`Entity::finished`] never arrives.
    pub fn send_self(&self, msg: E::Msg) {
        // Fails only if the actor is stopping, when the message has no one to act on it anyway.
        let _ = self.myself.send_message(EntityMsg::FromSelf { activation: self.activation, msg });
    }

    /// Queues a message to this entity after `delay` (a timer; dropped once this activation has
    /// left).
    pub fn send_self_after(&self, delay: Duration, msg: E::Msg) -> JoinHandle<()> {
        send_after(&self.myself, delay, EntityMsg::FromSelf { activation: self.activation, msg })
    }

    /// A cheap handle that can post messages to this entity from a spawned task.
    pub fn mailbox(&self) -> Mailbox<E::Msg> {
        Mailbox { actor: self.myself.clone(), activation: self.activation }
    }
}

/// Posts messages to one entity from outside its handler (e.g. a spawned provider call).
pub struct Mailbox<M: Send + 'static> {
    actor: ActorRef<EntityMsg<M>>,
    activation: u64,
}

impl<M: Send + 'static> Clone for Mailbox<M> {
    fn clone(&self) -> Self {
        Self { actor: self.actor.clone(), activation: self.activation }
    }
}

impl<M: Send + 'static> Mailbox<M> {
    pub fn send(&self, msg: M) {
        let _ = self.actor.send_message(EntityMsg::FromSelf { activation: self.activation, msg });
    }
}

/// Messages of an entity actor.
pub enum EntityMsg<M> {
    /// The first message of an activation of `key` (the actor was just spawned for it, or taken
    /// from the directory's idle actors). Counted as delivered.
    Activate { key: String, msg: M },
    /// Delivered through the directory (counted, for safe passivation).
    Delivered(M),
    /// Sent by the entity to itself, during its activation `activation`.
    FromSelf { activation: u64, msg: M },
    /// The idle timer of activation `activation` fired: passivate if nothing arrived meanwhile
    /// (else wait out the rest).
    IdleCheck { activation: u64 },
}

impl<M: Send + 'static> Message for EntityMsg<M> {}

/// Messages of a router.
pub enum RouterMsg<M> {
    /// Deliver `msg` to the entity `key`, activating it if needed.
    Deliver { key: String, msg: M },
}

impl<M: Send + 'static> Message for RouterMsg<M> {}

/// The active entities of one service on this node, and its idle entity actors.
pub struct Directory<M: Send + 'static> {
    /// Keyed by entity names, some chosen by clients (the skus of an order's lines activate
    /// stock entities before anyone knows they exist): std's hasher, seeded against HashDoS.
    slots: DashMap<String, Slot<M>>,
    /// Actors whose entity passivated, waiting to host the next key: spawning an actor and
    /// stopping it again (its task, four channels, ractor's registry and supervision events)
    /// cost more than an order's saga steps, and most entities (orders, payments) live for
    /// one saga only.
    idle: Mutex<Vec<ActorRef<EntityMsg<M>>>>,
    /// `entities_active{service}`: the slots' count.
    active: metrics::Gauge,
}

/// At most this many idle actors are kept per service (a few KiB each); beyond, a passivating
/// actor stops. Under load a node holds a few hundred entities at a time.
const IDLE_ACTORS_KEPT: usize = 512;

impl<M: Send + 'static> Directory<M> {
    fn new(service: &'static str) -> Self {
        Self {
            slots: DashMap::default(),
            idle: Mutex::default(),
            active: metrics::gauge!("entities_active", "service" => service),
        }
    }

    /// Delivers `msg` to the active entity `key`, or activates it on an idle actor; hands the
    /// message back if neither is possible (the router must spawn an actor).
    pub(crate) fn deliver(&self, key: &str, msg: M) -> Result<(), M> {
        let msg = match self.slots.get_mut(key) {
            Some(mut slot) => match self.deliver_to(&mut slot, msg) {
                Ok(()) => return Ok(()),
                Err((id, msg)) => {
                    drop(slot);
                    self.forget(key, id);
                    msg
                }
            },
            None => msg,
        };
        let Some(actor) = self.take_idle() else {
            return Err(msg);
        };
        self.activate(key, actor, msg)
    }

    /// Sends `msg` to the slot's actor. `Err`: the activation stopped (it failed) before the
    /// router handled its supervision event; the caller forgets it (once the slot's lock is
    /// released), so that a fresh one starts.
    fn deliver_to(&self, slot: &mut Slot<M>, msg: M) -> Result<(), (ActorId, M)> {
        match slot.actor.send_message(EntityMsg::Delivered(msg)) {
            Ok(()) => {
                slot.delivered += 1;
                Ok(())
            }
            Err(MessagingErr::SendErr(EntityMsg::Delivered(msg))) => Err((slot.actor.get_id(), msg)),
            // Not a local mailbox (cannot happen: entities are local actors).
            Err(_) => Ok(()),
        }
    }

    /// Makes `actor` (idle, or just spawned by the router) the active entity of `key`, with
    /// `msg` as its first message; if another caller activated the key meanwhile, delivers there
    /// and keeps `actor` idle. `Err`: `actor` is dead (its router stopped).
    fn activate(&self, key: &str, actor: ActorRef<EntityMsg<M>>, msg: M) -> Result<(), M> {
        match self.slots.entry(key.to_owned()) {
            Entry::Occupied(mut slot) => {
                if !self.park(actor.clone()) {
                    actor.stop(None);
                }
                match self.deliver_to(slot.get_mut(), msg) {
                    Ok(()) => Ok(()),
                    Err((id, msg)) => {
                        drop(slot);
                        self.forget(key, id);
                        Err(msg)
                    }
                }
            }
            Entry::Vacant(vacant) => match actor.send_message(EntityMsg::Activate { key: key.to_owned(), msg }) {
                Ok(()) => {
                    vacant.insert(Slot { actor, delivered: 1 });
                    self.active.increment(1.0);
                    Ok(())
                }
                Err(MessagingErr::SendErr(EntityMsg::Activate { msg, .. })) => Err(msg),
                Err(_) => Ok(()),
            },
        }
    }

    fn take_idle(&self) -> Option<ActorRef<EntityMsg<M>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }

    /// Keeps `actor` (whose entity left) for the next activation. False if enough are kept.
    fn park(&self, actor: ActorRef<EntityMsg<M>>) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= IDLE_ACTORS_KEPT {
            return false;
        }
        idle.push(actor);
        true
    }

    /// Removes the activation `id` of `key` if every message delivered to it was processed
    /// (delivery takes the same lock, so none can arrive after). True if it was removed.
    fn leave_if_drained(&self, key: &str, id: ActorId, processed: u64) -> bool {
        let left =
            self.slots.remove_if(key, |_, slot| slot.actor.get_id() == id && slot.delivered == processed).is_some();
        if left {
            self.active.decrement(1.0);
        }
        left
    }

    /// Forgets the activation `id` of `key` (not a newer one that replaced it).
    fn forget(&self, key: &str, id: ActorId) {
        if self.slots.remove_if(key, |_, slot| slot.actor.get_id() == id).is_some() {
            self.active.decrement(1.0);
        }
    }

    /// Forgets the actor `id`, which failed, and returns the key it hosted. A scan of the slots,
    /// but an actor fails only on a storage error or a bug.
    fn forget_failed(&self, id: ActorId) -> Option<String> {
        let mut hosted = None;
        self.slots.retain(|key, slot| {
            let its = slot.actor.get_id() == id;
            if its {
                hosted = Some(key.clone());
            }
            !its
        });
        if hosted.is_some() {
            self.active.decrement(1.0);
        }
        hosted
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
        let directory = Arc::new(Directory::new(service));
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
        Ok(RouterState { options, deps, directory })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RouterMsg::Deliver { key, msg } = msg;
        // Activated meanwhile (by an earlier message for the key queued here), or an actor
        // became idle: no spawn.
        let Err(msg) = state.directory.deliver(&key, msg) else {
            return Ok(());
        };
        let args = EntityArgs::<E> {
            deps: state.deps.clone(),
            directory: state.directory.clone(),
            idle_after: state.options.idle_after,
        };
        let (actor, _) =
            Actor::spawn_linked(None, EntityActor::<E>(std::marker::PhantomData), args, myself.get_cell()).await?;
        if state.directory.activate(&key, actor, msg).is_err() {
            // It failed already (it cannot: it has not run anything yet). The message is lost
            // like any message to a dead actor: callers time out and retry, and every handler
            // is idempotent.
            tracing::debug!(service = state.options.service, "entity stopped at once, message dropped");
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Its entities stop with it (linked children): none is active any more.
        state.directory.active.decrement(state.directory.slots.len() as f64);
        state.directory.slots.clear();
        state.directory.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // An entity actor that failed is forgotten. (One that stopped had left the directory
        // first: enough were idle. Nothing else stops them but the router's own stop.)
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let key = state.directory.forget_failed(cell.get_id());
            tracing::warn!(service = state.options.service, ?key, error = %err, "entity failed; it reloads on its next message");
        }
        Ok(())
    }
}

struct EntityActor<E: Entity>(std::marker::PhantomData<fn() -> E>);

struct EntityArgs<E: Entity> {
    deps: E::Deps,
    directory: Arc<Directory<E::Msg>>,
    idle_after: Duration,
}

struct EntityState<E: Entity> {
    /// Its key is that of the current activation (empty while idle).
    ctx: EntityContext<E>,
    directory: Arc<Directory<E::Msg>>,
    /// `None` until the first message of an activation loads it.
    entity: Option<E>,
    /// Messages of this activation delivered through the directory and processed.
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
            ctx: EntityContext { key: String::new(), deps: args.deps, myself, activation: 0 },
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
            EntityMsg::Activate { key, msg } => {
                state.ctx.key = key;
                state.processed = 1;
                msg
            }
            EntityMsg::Delivered(msg) => {
                state.processed += 1;
                msg
            }
            EntityMsg::FromSelf { activation, msg } if activation == state.ctx.activation => msg,
            // Sent by an earlier activation of this actor (a timer that fired as it left).
            EntityMsg::FromSelf { .. } => return Ok(()),
            EntityMsg::IdleCheck { activation } => {
                if activation == state.ctx.activation {
                    state.idle_timer = None;
                    if state.entity.as_ref().is_none_or(E::can_passivate) {
                        let idle_for = state.last_activity.elapsed();
                        if idle_for >= state.idle_after {
                            passivate_if_drained(&myself, state);
                        } else {
                            arm_idle_timer(&myself, state, state.idle_after - idle_for);
                        }
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
    let check = EntityMsg::IdleCheck { activation: state.ctx.activation };
    state.idle_timer = Some(send_after(myself, after, check));
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

/// Leaves the directory, if every message delivered to this activation has been processed, and
/// waits idle for the next key (or stops, if enough actors are idle).
fn passivate_if_drained<E: Entity>(myself: &ActorRef<EntityMsg<E::Msg>>, state: &mut EntityState<E>) {
    if !state.directory.leave_if_drained(&state.ctx.key, myself.get_id(), state.processed) {
        return;
    }
    // Dropped now, not when the actor stops: an entity's `Drop` may let go of things (timers,
    // the order service's view of live orders).
    state.entity = None;
    if let Some(timer) = state.idle_timer.take() {
        timer.abort();
    }
    state.processed = 0;
    state.ctx.key.clear();
    // Whatever this activation sent itself and is still queued or on its way is now stale.
    state.ctx.activation += 1;
    if !state.directory.park(myself.clone()) {
        myself.stop(Some("passivated".into()));
    }
}

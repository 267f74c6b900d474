//! The inventory service: one entity per sku hosting a [`StockItem`].
//!
//! Other services call it request/response (the order saga needs the answer now): reserve,
//! release, commit; a quote reads the item's published view ([`StockViews`]). Every command is
//! idempotent per order (see the domain), so a call that timed out and ran anyway, or a retry
//! after a crash, changes nothing twice.

use super::Settings;
use super::remote::{InventoryRequest, Placement, call, locate};
use crate::domain::{
    Money, OrderId, Quantity, Settled, Sku, StockCommand, StockEvent, StockItem, StockRejection, StockView,
};
use crate::error::ServiceError;
use dashmap::DashMap;
use futures_util::FutureExt;
use ordermesh_runtime::{Entity, EntityContext, RouterHandle};
use ordermesh_storage::{Append, KeyValue, Snapshot, Store, WriteBatch, codec};
use ractor::{ActorProcessingErr, RpcReplyPort};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub enum InventoryMsg {
    /// Runs one stock command; replies with the item after it, once that is durable.
    Execute { command: StockCommand, reply: RpcReplyPort<StockAnswer> },
    /// Reads the item as of its last durable write (`None`: unknown sku). Only for an item with
    /// no published view (not in memory, being activated, or unknown): the others are read from
    /// [`StockViews`].
    Get { reply: RpcReplyPort<Option<StockView>> },
    /// Sent by the entity to itself: the write it started last is durable (or failed, or
    /// panicked).
    Written(Result<(), ActorProcessingErr>),
}

#[derive(Clone)]
pub struct InventoryDeps {
    pub store: Store,
    pub settings: Arc<Settings>,
    pub views: StockViews,
}

/// The last durable view of every stock item in memory on this node, published by the item
/// itself, so that a read (a placement's price quote, `GET /v1/inventory/{sku}`) needs no message
/// to the item: the quote was one call per sku on the placement path of every order. An item
/// publishes when it activates and after each write is durable (before answering its callers,
/// so an answer is never newer than what a read sees) and withdraws its view when it leaves
/// memory, which keeps this as small as the items in memory. A sku not here is read through its
/// entity, which activates it.
#[derive(Clone, Default)]
pub struct StockViews(Arc<DashMap<Sku, Published>>);

/// A view and the activation that published it: an activation that leaves withdraws only its
/// own view, never one that a later activation of the same sku has published meanwhile.
struct Published {
    activation: u64,
    view: StockView,
}

impl StockViews {
    pub(crate) fn get(&self, sku: &Sku) -> Option<StockView> {
        self.0.get(sku).map(|published| published.view.clone())
    }

    fn publish(&self, activation: u64, view: &Option<StockView>) {
        if let Some(view) = view {
            self.0.insert(view.sku.clone(), Published { activation, view: view.clone() });
        }
    }

    fn withdraw(&self, sku: &Sku, activation: u64) {
        self.0.remove_if(sku, |_, published| published.activation == activation);
    }
}

/// Numbers the activations of stock items (for [`Published`]).
static ACTIVATIONS: AtomicU64 = AtomicU64::new(0);

/// The snapshot format of a stock item: its state and the seq it covers.
#[derive(serde::Serialize, serde::Deserialize)]
struct StockSnapshot {
    item: StockItem,
}

/// A stock item decides its commands one at a time but writes them in groups: every command
/// that arrives while a write is on its way to disk is decided at once (on the item as those
/// decisions leave it) and waits for the next write, which carries them all. Each command's
/// answer goes out only when everything decided before it is durable, so nobody acts on a
/// reservation or release that a crash could still undo. Why: with one write per command a
/// sku took at most one command per fsync round (about 1-2 ms under load), and every order
/// asks it twice (reserve, commit) plus a price quote that queued behind them: a closed loop
/// of 64 did 1,718 orders/s on one sku and 3,888 on ten, against 8,258 on a thousand.
pub struct StockEntity {
    sku: Sku,
    /// This activation's number, and where it publishes its durable view.
    activation: u64,
    views: StockViews,
    /// The item after every command decided so far, written or not: new commands are decided
    /// on it.
    item: StockItem,
    /// The item's version in the store (as of its last durable write).
    durable_version: u64,
    /// What `Get` answers and [`StockViews`] holds: the item as of its last durable write.
    durable_view: Option<StockView>,
    events_since_snapshot: u64,
    /// Decided since the write in flight started, waiting for the next one.
    queued: Decided,
    /// The write on its way to disk, if any.
    writing: Option<Writing>,
}

/// Commands decided but not yet durable: their events (already applied to the item) and the
/// answers their callers wait for, in order.
#[derive(Default)]
struct Decided {
    events: Vec<StockEvent>,
    answers: Vec<(RpcReplyPort<StockAnswer>, StockAnswer)>,
}

/// What a stock command answers: the item after it, or why it was refused.
type StockAnswer = Result<StockView, StockRejection>;

struct Writing {
    decided: Decided,
    /// The item's version and view once this write is durable.
    version: u64,
    view: Option<StockView>,
}

impl Decided {
    fn answer_all(self) {
        for (reply, answer) in self.answers {
            let _ = reply.send(answer);
        }
    }

    /// How `order`'s hold ended, if one of these events settles it (the last one that does).
    fn settled(&self, order: OrderId) -> Option<Settled> {
        self.events.iter().rev().filter_map(StockEvent::settles).find(|(o, _)| *o == order).map(|(_, s)| s)
    }
}

impl Entity for StockEntity {
    type Msg = InventoryMsg;
    type Deps = InventoryDeps;

    async fn activate(key: &str, deps: &InventoryDeps) -> Result<Self, ActorProcessingErr> {
        let sku = Sku::parse(key)?;
        let (mut item, mut version) = match deps.store.load_snapshot(key)? {
            Some(snapshot) => (codec::decode::<StockSnapshot>(&snapshot.bytes)?.item, snapshot.seq),
            None => (StockItem::default(), 0),
        };
        let events = deps.store.read_events(key, version)?;
        let replayed = events.len() as u64;
        for stored in events {
            item.apply(&codec::decode::<StockEvent>(&stored.bytes)?);
            version = stored.seq;
        }
        // A write of an earlier activation that failed on something else may still be on its
        // way (its task outlives the actor) and be among what was just read: once it is durable
        // too, nothing this activation answers from can be undone by a crash. (An empty write is
        // a barrier: its round syncs every write before it.) An item with nothing in the store
        // read nothing to undo; so an order naming an unknown sku writes nothing.
        if version > 0 {
            deps.store.commit(WriteBatch::default()).await?;
        }
        let durable_view = item.known.then(|| item.sku_view(&sku));
        let activation = ACTIVATIONS.fetch_add(1, Ordering::Relaxed);
        deps.views.publish(activation, &durable_view);
        Ok(Self {
            sku,
            activation,
            views: deps.views.clone(),
            item,
            durable_version: version,
            durable_view,
            events_since_snapshot: replayed,
            queued: Decided::default(),
            writing: None,
        })
    }

    async fn handle(&mut self, msg: InventoryMsg, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        match msg {
            InventoryMsg::Get { reply } => {
                let _ = reply.send(self.durable_view.clone());
            }
            InventoryMsg::Execute { command, reply } => {
                let store = &ctx.deps().store;
                // An order the item holds nothing for may have been settled by a command not yet
                // durable: those are looked at before the store.
                let decided = self.item.decide(&command, |order| {
                    match self.queued.settled(order).or_else(|| self.writing.as_ref()?.decided.settled(order)) {
                        Some(settled) => Ok(Some(settled)),
                        None => read_settled(store, &self.sku, order),
                    }
                })?;
                let answer = match decided {
                    Ok(events) => {
                        events.iter().for_each(|e| self.item.apply(e));
                        self.queued.events.extend(events);
                        Ok(self.item.sku_view(&self.sku))
                    }
                    Err(rejection) => Err(rejection),
                };
                self.queued.answers.push((reply, answer));
                if self.writing.is_none() {
                    self.write_queued(ctx)?;
                }
            }
            InventoryMsg::Written(result) => {
                result?;
                if let Some(written) = self.writing.take() {
                    self.durable_version = written.version;
                    self.durable_view = written.view;
                    self.views.publish(self.activation, &self.durable_view);
                    written.decided.answer_all();
                }
                self.write_queued(ctx)?;
            }
        }
        Ok(())
    }

    /// Not while a write is on its way: its answers and its `Written` belong to this activation.
    fn can_passivate(&self) -> bool {
        self.writing.is_none() && self.queued.answers.is_empty()
    }
}

/// Leaving memory (passivated, or its actor stopped): its view goes with it.
impl Drop for StockEntity {
    fn drop(&mut self) {
        self.views.withdraw(&self.sku, self.activation);
    }
}

impl StockEntity {
    /// Starts the write of every command queued (its answers go out when it is durable); with
    /// no events among them, answers them at once (nothing is in flight before them).
    fn write_queued(&mut self, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        let decided = std::mem::take(&mut self.queued);
        if decided.events.is_empty() {
            decided.answer_all();
            return Ok(());
        }
        let deps = ctx.deps();
        let encoded = decided.events.iter().map(codec::encode).collect::<Result<Vec<_>, _>>()?;
        let version = self.durable_version + decided.events.len() as u64;
        let index_put = decided
            .events
            .iter()
            .filter_map(StockEvent::settles)
            .map(|(order, settled)| Ok((settled_key(&self.sku, order), codec::encode(&settled)?)))
            .collect::<Result<Vec<KeyValue>, ActorProcessingErr>>()?;
        let mut batch = WriteBatch {
            appends: vec![Append {
                entity: self.sku.to_string(),
                expected_version: self.durable_version,
                events: encoded,
            }],
            index_put,
            ..WriteBatch::default()
        };
        // The item holds exactly what this write makes durable (nothing is queued after it yet).
        let since = self.events_since_snapshot + decided.events.len() as u64;
        if since >= deps.settings.snapshot_every {
            let bytes = codec::encode(&StockSnapshot { item: self.item.clone() })?;
            batch.snapshots.push(Snapshot { entity: self.sku.to_string(), seq: version, bytes });
            self.events_since_snapshot = 0;
        } else {
            self.events_since_snapshot = since;
        }
        let view = self.item.known.then(|| self.item.sku_view(&self.sku));
        self.writing = Some(Writing { decided, version, view });
        // A task of its own, so that the commands arriving meanwhile are decided and queued for
        // the next write. A failed write stops the actor (at `Written`): its callers see their
        // reply ports dropped and retry, and the next activation replays what is on disk.
        // A panic is turned into a failed write: without a `Written`, the item would wait for it
        // forever.
        let store = deps.store.clone();
        let mailbox = ctx.mailbox();
        tokio::spawn(async move {
            let result = match AssertUnwindSafe(store.commit(batch)).catch_unwind().await {
                Ok(result) => result.map(drop).map_err(ActorProcessingErr::from),
                Err(_panic) => Err("the stock item's write panicked".into()),
            };
            mailbox.send(InventoryMsg::Written(result));
        });
        Ok(())
    }
}

/// The index key recording the layout of this store's stock data.
const LAYOUT_KEY: &[u8] = b"layout/stock";

/// 3: items hold only their orders in flight, settled holds are records beside them keyed
/// order first (`settled:<order>/<sku>`).
/// (2: the same records keyed `settled/<sku>/<order>`, migrated at start. 1, never recorded:
/// every hold inside the item and its snapshots.)
const LAYOUT: u32 = 3;

/// Settled records of layout 2, rewritten at start.
const LAYOUT_2_SETTLED_PREFIX: &[u8] = b"settled/";

/// At start: records the layout in a new store, migrates one of layout 2, refuses one of
/// layout 1. Layout 1's items hold their settled orders inside them and no records beside
/// them: read with this build, a confirmed order cancelled later would not give its units
/// back, and no migration exists (no store of that layout was ever deployed).
pub(crate) async fn check_layout(store: &Store) -> Result<(), String> {
    let found = store.index_get(LAYOUT_KEY).map_err(|e| e.to_string())?;
    match found {
        Some(bytes) => match codec::decode::<u32>(&bytes) {
            Ok(layout @ (2 | LAYOUT)) => migrate_settled_keys(store, layout).await,
            Ok(other) => Err(format!("its stock layout is {other}; this build reads layout {LAYOUT}")),
            Err(e) => Err(format!("its stock layout record is unreadable: {e}")),
        },
        None if store.entities_after(None, 1).map_err(|e| e.to_string())?.is_empty() => record_layout(store).await,
        None => Err(format!(
            "{} was written by an older build (stock layout 1: every order's hold inside its item); \
             this build reads layout {LAYOUT} and cannot migrate it: start with an empty data directory",
            store.path().display()
        )),
    }
}

async fn record_layout(store: &Store) -> Result<(), String> {
    let value = codec::encode(&LAYOUT).map_err(|e| e.to_string())?;
    let batch = WriteBatch { index_put: vec![(LAYOUT_KEY.to_vec(), value)], ..WriteBatch::default() };
    store.commit(batch).await.map(drop).map_err(|e| e.to_string())
}

/// Layout 2 to 3: every settled record under its order-first key, a page per commit. The first
/// commit records layout 3 as well, so a build of layout 2 never starts on a store with some
/// records moved (it would miss them); this build moves whatever is left at every start (at
/// layout 3, one empty scan), so a crash in the middle only leaves work for the next start.
async fn migrate_settled_keys(store: &Store, recorded: u32) -> Result<(), String> {
    const PAGE: usize = 1024;
    let layout = codec::encode(&LAYOUT).map_err(|e| e.to_string())?;
    let mut after: Option<Vec<u8>> = None;
    let mut moved = 0usize;
    loop {
        let page = store.index_scan(LAYOUT_2_SETTLED_PREFIX, after.as_deref(), PAGE).map_err(|e| e.to_string())?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut batch = WriteBatch { index_put: vec![(LAYOUT_KEY.to_vec(), layout.clone())], ..WriteBatch::default() };
        for (old, value) in page {
            let parsed = std::str::from_utf8(&old[LAYOUT_2_SETTLED_PREFIX.len()..])
                .ok()
                .and_then(|rest| rest.rsplit_once('/'))
                .and_then(|(sku, order)| Some((Sku::parse(sku).ok()?, OrderId::parse(order).ok()?)));
            let Some((sku, order)) = parsed else {
                return Err(format!("settled record {} is not `settled/<sku>/<order>`", String::from_utf8_lossy(&old)));
            };
            batch.index_put.push((settled_key(&sku, order), value));
            batch.index_delete.push(old);
        }
        moved += batch.index_delete.len();
        store.commit(batch).await.map_err(|e| e.to_string())?;
        tracing::info!(store = %store.path().display(), moved, "stock layout 2 to 3: settled records moved");
    }
    if recorded != LAYOUT && moved == 0 {
        record_layout(store).await?;
    }
    Ok(())
}

/// The index key of how `order`'s hold on `sku` ended (see [`Settled`]): written with the event
/// that settles it, read when a command names an order the item holds nothing for. Order first:
/// order ids are time-ordered, so the key of a new order's (absent) record usually lies above
/// every key the store's sled holds, and the store answers the lookup without a walk down sled's tree
/// (2.3% of `dev`'s CPU under load while keyed sku first).
fn settled_key(sku: &Sku, order: OrderId) -> Vec<u8> {
    format!("settled:{order}/{sku}").into_bytes()
}

fn read_settled(store: &Store, sku: &Sku, order: OrderId) -> Result<Option<Settled>, ActorProcessingErr> {
    match store.index_get(&settled_key(sku, order))? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// Typed handle to the inventory service: what the gateway and the order saga call. In a
/// cluster it sends each request to the router of the node owning the sku.
#[derive(Clone)]
pub struct InventoryService {
    /// This node's router and its items' views (`None` on a node that does not host inventory).
    local: Option<(RouterHandle<InventoryMsg>, StockViews)>,
    settings: Arc<Settings>,
    placement: Placement,
}

impl InventoryService {
    pub(crate) fn new(
        local: Option<(RouterHandle<InventoryMsg>, StockViews)>,
        settings: Arc<Settings>,
        placement: Placement,
    ) -> Self {
        Self { local, settings, placement }
    }

    fn local(&self) -> Result<&(RouterHandle<InventoryMsg>, StockViews), ServiceError> {
        self.local.as_ref().ok_or(ServiceError::Unavailable {
            service: "inventory",
            detail: "this node does not host inventory".into(),
        })
    }

    async fn execute(
        &self,
        sku: &Sku,
        command: StockCommand,
    ) -> Result<Result<StockView, StockRejection>, ServiceError> {
        match locate(&self.placement, "inventory", sku.as_str())? {
            None => self.execute_local(sku, command).await,
            Some(remote) => {
                let request = InventoryRequest::Execute { sku: sku.clone(), command };
                call(&remote, "inventory", &request, self.settings.call_timeout).await
            }
        }
    }

    pub(crate) async fn execute_local(
        &self,
        sku: &Sku,
        command: StockCommand,
    ) -> Result<Result<StockView, StockRejection>, ServiceError> {
        let timeout = self.settings.call_timeout;
        let (router, _) = self.local()?;
        Ok(router.call(sku.as_str(), |reply| InventoryMsg::Execute { command, reply }, timeout).await?)
    }

    /// Admin: sets the units available for new orders and the unit price.
    pub async fn set_stock(&self, sku: &Sku, available: u64, price: Money) -> Result<StockView, ServiceError> {
        self.execute(sku, StockCommand::SetStock { available, price })
            .await?
            .map_err(|rejection| ServiceError::Invalid(rejection.to_string()))
    }

    pub async fn get(&self, sku: &Sku) -> Result<Option<StockView>, ServiceError> {
        match locate(&self.placement, "inventory", sku.as_str())? {
            None => self.get_local(sku).await,
            Some(remote) => {
                call(&remote, "inventory", &InventoryRequest::Get { sku: sku.clone() }, self.settings.call_timeout)
                    .await
            }
        }
    }

    pub(crate) async fn get_local(&self, sku: &Sku) -> Result<Option<StockView>, ServiceError> {
        let (router, views) = self.local()?;
        if let Some(view) = views.get(sku) {
            return Ok(Some(view));
        }
        let timeout = self.settings.call_timeout;
        Ok(router.call(sku.as_str(), |reply| InventoryMsg::Get { reply }, timeout).await?)
    }

    pub async fn reserve(
        &self,
        sku: &Sku,
        order: OrderId,
        quantity: Quantity,
    ) -> Result<Result<StockView, StockRejection>, ServiceError> {
        self.execute(sku, StockCommand::Reserve { order, quantity }).await
    }

    pub async fn release(&self, sku: &Sku, order: OrderId) -> Result<Result<StockView, StockRejection>, ServiceError> {
        self.execute(sku, StockCommand::Release { order }).await
    }

    pub async fn commit(&self, sku: &Sku, order: OrderId) -> Result<Result<StockView, StockRejection>, ServiceError> {
        self.execute(sku, StockCommand::Commit { order }).await
    }

    pub(crate) fn stop(&self) {
        if let Some((router, _)) = &self.local {
            router.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::Quantity;
    use ordermesh_runtime::{HostingOptions, Router};
    use ordermesh_storage::StoreOptions;
    use std::time::{Duration, Instant};

    async fn start(store: &Store) -> InventoryService {
        start_idle_after(store, Duration::from_secs(30)).await.0
    }

    /// The service, with the views its items publish, items leaving memory after `idle_after`.
    async fn start_idle_after(store: &Store, idle_after: Duration) -> (InventoryService, StockViews) {
        let settings = Arc::new(Settings::default());
        let views = StockViews::default();
        let deps = InventoryDeps { store: store.clone(), settings: settings.clone(), views: views.clone() };
        let options = HostingOptions { service: "inventory", idle_after };
        let router = Router::<StockEntity>::start(options, deps).await.unwrap();
        (InventoryService::new(Some((router, views.clone())), settings, None), views)
    }

    /// A store in a new directory and its inventory service (items leaving memory after
    /// `idle_after`), with the views its items publish.
    async fn start_new(idle_after: Duration) -> (tempfile::TempDir, Store, InventoryService, StockViews) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let (inventory, views) = start_idle_after(&store, idle_after).await;
        (dir, store, inventory, views)
    }

    /// A store in a new directory, its inventory service, and the sku `hot` with `units` in stock.
    async fn start_with_hot(units: u64) -> (tempfile::TempDir, Store, InventoryService, Sku) {
        let (dir, store, inventory, _) = start_new(Duration::from_secs(30)).await;
        let hot = Sku::parse("hot").unwrap();
        inventory.set_stock(&hot, units, Money::from_cents(100)).await.unwrap();
        (dir, store, inventory, hot)
    }

    fn view(available: u64, reserved: u64) -> StockView {
        StockView { sku: Sku::parse("hot").unwrap(), available, reserved, price: Money::from_cents(100) }
    }

    /// Commands that arrive while a write is on its way are decided at once and written together,
    /// never beyond the stock; a command on an order settled by a write not yet durable sees it;
    /// and what a restart replays is what the answers said.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_arriving_during_a_write_share_the_next_one_and_never_oversell() {
        let (dir, store, inventory, hot) = start_with_hot(150).await;

        let writes_before = store.stats().writes;
        let one = Quantity::new(1).unwrap();
        let reserves = (0..200u128).map(|i| {
            let inventory = inventory.clone();
            let hot = hot.clone();
            tokio::spawn(async move { inventory.reserve(&hot, OrderId::from_u128(i + 1), one).await.unwrap() })
        });
        let mut reserved = Vec::new();
        for (i, reserve) in (0..200u128).zip(reserves.collect::<Vec<_>>()) {
            match reserve.await.unwrap() {
                Ok(_) => reserved.push(OrderId::from_u128(i + 1)),
                Err(rejection) => {
                    assert!(matches!(rejection, StockRejection::OutOfStock { available: 0 }), "{rejection:?}")
                }
            }
        }
        assert_eq!(reserved.len(), 150);
        // One write per reservation before (150); the commands queued behind a write share the next.
        let writes = store.stats().writes - writes_before;
        assert!(writes < 150, "{writes} writes for 150 reservations");
        assert_eq!(inventory.get(&hot).await.unwrap(), Some(view(0, 150)));

        // Sent in this order without waiting: the release sees the commit queued before it, and
        // the second release the first (no tombstone, no second give-back). (The spawned
        // reserves ran in any order: which 150 got stock is theirs to say.)
        let order = reserved[0];
        let (commit, release, again) =
            tokio::join!(inventory.commit(&hot, order), inventory.release(&hot, order), inventory.release(&hot, order));
        assert_eq!(commit.unwrap(), Ok(view(0, 149)));
        assert_eq!(release.unwrap(), Ok(view(1, 149)));
        assert_eq!(again.unwrap(), Ok(view(1, 149)));
        let late = inventory.reserve(&hot, order, one).await.unwrap();
        assert_eq!(late, Err(StockRejection::AlreadyReleased));

        inventory.stop();
        store.close().unwrap();
        drop(store);
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let inventory = start(&store).await;
        assert_eq!(inventory.get(&hot).await.unwrap(), Some(view(1, 149)));
        assert_eq!(inventory.reserve(&hot, order, one).await.unwrap(), Err(StockRejection::AlreadyReleased));
    }

    /// A write that fails (here a conflict: another writer appended to the item's log behind its
    /// back) stops the item: the callers waiting for that write get an error, and the next
    /// command activates the item again from what the log holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_fails_its_callers_and_the_next_command_replays_the_log() {
        let (_dir, store, inventory, hot) = start_with_hot(10).await;
        let event = codec::encode(&StockEvent::StockSet { available: 5, price: Money::from_cents(100) }).unwrap();
        let behind = Append { entity: "hot".into(), expected_version: 1, events: vec![event] };
        store.commit(WriteBatch { appends: vec![behind], ..WriteBatch::default() }).await.unwrap();

        let one = Quantity::new(1).unwrap();
        let failed = inventory.reserve(&hot, OrderId::from_u128(1), one).await;
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(inventory.reserve(&hot, OrderId::from_u128(1), one).await.unwrap(), Ok(view(4, 1)));
        assert_eq!(inventory.get(&hot).await.unwrap(), Some(view(4, 1)));
    }

    /// An item in memory is read from the view it publishes, as of its last durable write (and
    /// published before it answers, so a caller's next read is never older than its answer); the
    /// view leaves memory with the item, and a read of an item not in memory activates it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_item_in_memory_is_read_from_the_view_it_publishes_which_leaves_with_it() {
        // Long enough that the item stays in memory between the steps on a loaded machine.
        let (_dir, _store, inventory, views) = start_new(Duration::from_millis(500)).await;
        let hot = Sku::parse("hot").unwrap();
        assert_eq!(inventory.get(&hot).await.unwrap(), None);
        assert_eq!(views.get(&hot), None, "an unknown sku publishes nothing");

        inventory.set_stock(&hot, 5, Money::from_cents(100)).await.unwrap();
        assert_eq!(views.get(&hot), Some(view(5, 0)));
        inventory.reserve(&hot, OrderId::from_u128(1), Quantity::new(2).unwrap()).await.unwrap().unwrap();
        assert_eq!(views.get(&hot), Some(view(3, 2)));
        assert_eq!(inventory.get(&hot).await.unwrap(), Some(view(3, 2)));

        let deadline = Instant::now() + Duration::from_secs(5);
        while views.get(&hot).is_some() {
            assert!(Instant::now() < deadline, "the idle item's view is still published");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(inventory.get(&hot).await.unwrap(), Some(view(3, 2)));
        assert_eq!(views.get(&hot), Some(view(3, 2)), "the read activated the item, which published its view");
    }

    /// Reads of a sku with a published view are answered from it, without asking the item; an
    /// activation withdraws only the view it published itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_published_view_answers_reads_and_only_its_publisher_withdraws_it() {
        let (_dir, _store, inventory, views) = start_new(Duration::from_secs(30)).await;
        let hot = Sku::parse("hot").unwrap();
        // Not in the store: only the map can answer this.
        views.publish(u64::MAX, &Some(view(7, 0)));
        assert_eq!(inventory.get(&hot).await.unwrap(), Some(view(7, 0)));
        views.withdraw(&hot, u64::MAX - 1);
        assert_eq!(views.get(&hot), Some(view(7, 0)), "another activation's withdrawal");
        views.withdraw(&hot, u64::MAX);
        assert_eq!(views.get(&hot), None);
        assert_eq!(inventory.get(&hot).await.unwrap(), None, "asked the item: an unknown sku");
    }
}

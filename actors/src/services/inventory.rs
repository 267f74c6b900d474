//! The inventory service: one entity per sku hosting a [`StockItem`].
//!
//! Other services call it request/response (the order saga needs the answer now): quote,
//! reserve, release, commit. Every command is idempotent per order (see the domain), so a
//! call that timed out and ran anyway, or a retry after a crash, changes nothing twice.

use super::Settings;
use super::remote::{InventoryRequest, Placement, call, locate};
use crate::domain::{
    Money, OrderId, Quantity, Settled, Sku, StockCommand, StockEvent, StockItem, StockRejection, StockView,
};
use crate::error::ServiceError;
use ordermesh_runtime::{Entity, EntityContext, RouterHandle};
use ordermesh_storage::{Append, KeyValue, Snapshot, Store, WriteBatch, codec};
use ractor::{ActorProcessingErr, RpcReplyPort};
use std::sync::Arc;

pub enum InventoryMsg {
    /// Runs one stock command; replies with the item after it.
    Execute { command: StockCommand, reply: RpcReplyPort<Result<StockView, StockRejection>> },
    /// Reads the item (`None`: unknown sku).
    Get { reply: RpcReplyPort<Option<StockView>> },
}

#[derive(Clone)]
pub struct InventoryDeps {
    pub store: Store,
    pub settings: Arc<Settings>,
}

/// The snapshot format of a stock item: its state and the seq it covers.
#[derive(serde::Serialize, serde::Deserialize)]
struct StockSnapshot {
    item: StockItem,
}

pub struct StockEntity {
    sku: Sku,
    item: StockItem,
    version: u64,
    events_since_snapshot: u64,
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
        Ok(Self { sku, item, version, events_since_snapshot: replayed })
    }

    async fn handle(&mut self, msg: InventoryMsg, ctx: &EntityContext<Self>) -> Result<(), ActorProcessingErr> {
        match msg {
            InventoryMsg::Get { reply } => {
                let _ = reply.send(self.item.known.then(|| self.item.sku_view(&self.sku)));
            }
            InventoryMsg::Execute { command, reply } => {
                let store = &ctx.deps().store;
                let decided = self.item.decide(&command, |order| read_settled(store, &self.sku, order))?;
                let events = match decided {
                    Ok(events) => events,
                    Err(rejection) => {
                        let _ = reply.send(Err(rejection));
                        return Ok(());
                    }
                };
                if !events.is_empty() {
                    // A storage error stops this actor; the caller sees its reply port dropped
                    // and retries, and the next activation replays what is really on disk.
                    self.persist(ctx.deps(), &events).await?;
                }
                let _ = reply.send(Ok(self.item.sku_view(&self.sku)));
            }
        }
        Ok(())
    }
}

impl StockEntity {
    async fn persist(&mut self, deps: &InventoryDeps, events: &[StockEvent]) -> Result<(), ActorProcessingErr> {
        let encoded = events.iter().map(codec::encode).collect::<Result<Vec<_>, _>>()?;
        let new_version = self.version + events.len() as u64;
        let index_put = events
            .iter()
            .filter_map(StockEvent::settles)
            .map(|(order, settled)| Ok((settled_key(&self.sku, order), codec::encode(&settled)?)))
            .collect::<Result<Vec<KeyValue>, ActorProcessingErr>>()?;
        let mut batch = WriteBatch {
            appends: vec![Append { entity: self.sku.to_string(), expected_version: self.version, events: encoded }],
            index_put,
            ..WriteBatch::default()
        };
        let since = self.events_since_snapshot + events.len() as u64;
        let snapshot_due = since >= deps.settings.snapshot_every;
        if snapshot_due {
            // Only here the next state is needed before the commit: no clone per command.
            let mut next = self.item.clone();
            events.iter().for_each(|e| next.apply(e));
            let bytes = codec::encode(&StockSnapshot { item: next })?;
            batch.snapshots.push(Snapshot { entity: self.sku.to_string(), seq: new_version, bytes });
        }
        deps.store.commit(batch).await?;
        // Durable: now the state may change.
        events.iter().for_each(|e| self.item.apply(e));
        self.version = new_version;
        self.events_since_snapshot = if snapshot_due { 0 } else { since };
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
    /// This node's router (`None` on a node that does not host inventory).
    router: Option<RouterHandle<InventoryMsg>>,
    settings: Arc<Settings>,
    placement: Placement,
}

impl InventoryService {
    pub(crate) fn new(
        router: Option<RouterHandle<InventoryMsg>>,
        settings: Arc<Settings>,
        placement: Placement,
    ) -> Self {
        Self { router, settings, placement }
    }

    fn local(&self) -> Result<&RouterHandle<InventoryMsg>, ServiceError> {
        self.router.as_ref().ok_or(ServiceError::Unavailable {
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
        Ok(self.local()?.call(sku.as_str(), |reply| InventoryMsg::Execute { command, reply }, timeout).await?)
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
        let timeout = self.settings.call_timeout;
        Ok(self.local()?.call(sku.as_str(), |reply| InventoryMsg::Get { reply }, timeout).await?)
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
        if let Some(router) = &self.router {
            router.stop();
        }
    }
}

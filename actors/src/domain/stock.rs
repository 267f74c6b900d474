//! A stock item (one per sku) as a pure state machine.
//!
//! `available` is what can still be reserved; `reserved` is held for orders in flight; units of
//! confirmed orders are "committed" (they left the warehouse). Conservation, checked by the
//! property tests below: `available + reserved + committed` only changes through `SetStock`.
//! Every hold is keyed by order id, so reserve, release and commit are idempotent, and a
//! release leaves a tombstone so that a late, duplicated reserve cannot take stock for an order
//! that was already compensated.
//!
//! Only the holds of orders in flight live in the item. How a hold ended ([`Settled`]) is kept
//! beside the item, one record per order (the service keeps them in its store's index), and
//! handed to [`StockItem::decide`] when a command names an order the item holds nothing for.
//! Why: an item serves every order that ever bought it; with all their holds in its state, its
//! memory and every snapshot grew with its whole history (100,000 orders of one sku: megabytes
//! re-encoded every thousand events).

use super::types::{Money, OrderId, Quantity, Sku};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What an order holds of this item, as `decide` sees it: its reservation in the item, else
/// its settled record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Reserved(Quantity),
    Committed(Quantity),
    /// Released (or cancelled before it was ever reserved): refuses any later reserve.
    Released,
}

/// How an order's hold on an item ended: the record kept outside the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settled {
    Committed(Quantity),
    Released,
}

impl From<Settled> for Hold {
    fn from(settled: Settled) -> Hold {
        match settled {
            Settled::Committed(quantity) => Hold::Committed(quantity),
            Settled::Released => Hold::Released,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockItem {
    /// False until an admin first sets stock: orders for it end `unknown_sku`.
    pub known: bool,
    pub price: Money,
    pub available: u64,
    pub reserved: u64,
    /// Units sold to orders that are (still) confirmed.
    pub committed: u64,
    /// The reservations of orders in flight; they sum to `reserved`.
    pub reservations: BTreeMap<OrderId, Quantity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StockCommand {
    /// Admin: sets the units available for new reservations and the unit price.
    SetStock {
        available: u64,
        price: Money,
    },
    Reserve {
        order: OrderId,
        quantity: Quantity,
    },
    /// Gives back whatever the order holds (reserved or committed units).
    Release {
        order: OrderId,
    },
    /// Turns the order's reservation into sold units (the order is being confirmed).
    Commit {
        order: OrderId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StockEvent {
    StockSet {
        available: u64,
        price: Money,
    },
    Reserved {
        order: OrderId,
        quantity: Quantity,
    },
    Released {
        order: OrderId,
        quantity: Quantity,
        was_committed: bool,
    },
    /// A release for an order that held nothing: remembered so a late reserve is refused.
    Tombstoned {
        order: OrderId,
    },
    Committed {
        order: OrderId,
        quantity: Quantity,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StockRejection {
    #[error("unknown sku")]
    UnknownSku,
    #[error("out of stock: {available} available")]
    OutOfStock { available: u64 },
    #[error("the order's hold on this sku was already released")]
    AlreadyReleased,
    #[error("the order holds no reservation on this sku")]
    NotReserved,
}

impl StockCommand {
    /// The order the command is about, if any.
    fn order(&self) -> Option<OrderId> {
        match *self {
            StockCommand::SetStock { .. } => None,
            StockCommand::Reserve { order, .. } | StockCommand::Release { order } | StockCommand::Commit { order } => {
                Some(order)
            }
        }
    }
}

impl StockEvent {
    /// The record of how an order's hold ended, which this event writes beside the item.
    pub fn settles(&self) -> Option<(OrderId, Settled)> {
        match *self {
            StockEvent::Committed { order, quantity } => Some((order, Settled::Committed(quantity))),
            StockEvent::Released { order, .. } | StockEvent::Tombstoned { order } => Some((order, Settled::Released)),
            StockEvent::StockSet { .. } | StockEvent::Reserved { .. } => None,
        }
    }
}

impl StockItem {
    /// Decides a command. `settled` looks up how an order's hold ended, from outside the item;
    /// it is asked only for an order the item holds no reservation for (on a known item).
    /// Its error, if any, is returned as it is; the inner result is the decision.
    pub fn decide<E>(
        &self,
        command: &StockCommand,
        settled: impl FnOnce(OrderId) -> Result<Option<Settled>, E>,
    ) -> Result<Result<Vec<StockEvent>, StockRejection>, E> {
        let hold = match command.order() {
            None => None,
            Some(order) => match self.reservations.get(&order) {
                Some(quantity) => Some(Hold::Reserved(*quantity)),
                None if self.known => settled(order)?.map(Hold::from),
                None => None,
            },
        };
        Ok(self.decide_with(command, hold))
    }

    /// The decision, given what the command's order holds of this item.
    fn decide_with(&self, command: &StockCommand, hold: Option<Hold>) -> Result<Vec<StockEvent>, StockRejection> {
        use StockCommand::*;
        Ok(match *command {
            SetStock { available, price } => vec![StockEvent::StockSet { available, price }],
            Reserve { order, quantity } => {
                if !self.known {
                    return Err(StockRejection::UnknownSku);
                }
                match hold {
                    Some(Hold::Reserved(_) | Hold::Committed(_)) => vec![],
                    Some(Hold::Released) => return Err(StockRejection::AlreadyReleased),
                    None if self.available < u64::from(quantity.get()) => {
                        return Err(StockRejection::OutOfStock { available: self.available });
                    }
                    None => vec![StockEvent::Reserved { order, quantity }],
                }
            }
            // Nothing can be held on an unknown sku; no tombstone either, so ordering random
            // skus cannot make the store grow.
            Release { .. } if !self.known => vec![],
            Release { order } => match hold {
                Some(Hold::Reserved(quantity)) => {
                    vec![StockEvent::Released { order, quantity, was_committed: false }]
                }
                Some(Hold::Committed(quantity)) => {
                    vec![StockEvent::Released { order, quantity, was_committed: true }]
                }
                Some(Hold::Released) => vec![],
                None => vec![StockEvent::Tombstoned { order }],
            },
            Commit { order } => match hold {
                Some(Hold::Reserved(quantity)) => vec![StockEvent::Committed { order, quantity }],
                Some(Hold::Committed(_)) => vec![],
                Some(Hold::Released) => return Err(StockRejection::AlreadyReleased),
                None => return Err(StockRejection::NotReserved),
            },
        })
    }

    /// Applies an event `decide` produced. Saturating arithmetic only guards against events
    /// that `decide` would never produce; it keeps replay of a damaged log from panicking.
    pub fn apply(&mut self, event: &StockEvent) {
        match *event {
            StockEvent::StockSet { available, price } => {
                self.known = true;
                self.available = available;
                self.price = price;
            }
            StockEvent::Reserved { order, quantity } => {
                let units = u64::from(quantity.get());
                self.available = self.available.saturating_sub(units);
                self.reserved += units;
                self.reservations.insert(order, quantity);
            }
            StockEvent::Released { order, quantity, was_committed } => {
                let units = u64::from(quantity.get());
                if was_committed {
                    self.committed = self.committed.saturating_sub(units);
                } else {
                    self.reserved = self.reserved.saturating_sub(units);
                }
                self.available += units;
                self.reservations.remove(&order);
            }
            StockEvent::Tombstoned { .. } => {}
            StockEvent::Committed { order, quantity } => {
                let units = u64::from(quantity.get());
                self.reserved = self.reserved.saturating_sub(units);
                self.committed += units;
                self.reservations.remove(&order);
            }
        }
    }

    pub fn sku_view(&self, sku: &Sku) -> StockView {
        StockView { sku: sku.clone(), available: self.available, reserved: self.reserved, price: self.price }
    }
}

/// What the API shows of a stock item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockView {
    pub sku: Sku,
    pub available: u64,
    pub reserved: u64,
    pub price: Money,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::convert::Infallible;

    /// An item with its settled records beside it, as the service keeps them.
    #[derive(Debug, Clone, Default, PartialEq)]
    struct Kept {
        item: StockItem,
        settled: BTreeMap<OrderId, Settled>,
    }

    impl Kept {
        fn decide(&self, command: &StockCommand) -> Result<Vec<StockEvent>, StockRejection> {
            let settled = |order| Ok::<_, Infallible>(self.settled.get(&order).copied());
            self.item.decide(command, settled).unwrap_or_else(|never| match never {})
        }

        fn apply(&mut self, event: &StockEvent) {
            self.item.apply(event);
            if let Some((order, settled)) = event.settles() {
                self.settled.insert(order, settled);
            }
        }

        fn run(&mut self, command: &StockCommand) -> Result<Vec<StockEvent>, StockRejection> {
            let events = self.decide(command)?;
            for e in &events {
                self.apply(e);
            }
            Ok(events)
        }

        fn set_stock(available: u64) -> Kept {
            let mut kept = Kept::default();
            kept.run(&StockCommand::SetStock { available, price: Money::from_cents(100) }).expect("set stock");
            kept
        }
    }

    fn command() -> impl Strategy<Value = StockCommand> {
        let order = (0u128..8).prop_map(OrderId::from_u128);
        let qty = (1u32..=20).prop_map(|q| Quantity::new(q).expect("in range"));
        prop_oneof![
            4 => (order.clone(), qty).prop_map(|(order, quantity)| StockCommand::Reserve { order, quantity }),
            2 => order.clone().prop_map(|order| StockCommand::Release { order }),
            2 => order.prop_map(|order| StockCommand::Commit { order }),
        ]
    }

    proptest! {
        /// Stock is conserved and never negative, no unit is reserved twice, the item holds only
        /// the orders in flight, and replaying the events gives the same state.
        #[test]
        fn conserved_never_negative_and_replayable(
            initial in 0u64..100,
            commands in proptest::collection::vec(command(), 0..60),
        ) {
            let mut kept = Kept::set_stock(initial);
            let mut log = Vec::new();
            for c in &commands {
                if let Ok(events) = kept.run(c) {
                    log.extend(events);
                }
                let item = &kept.item;
                prop_assert_eq!(item.available + item.reserved + item.committed, initial);
                let held: u64 = item.reservations.values().map(|q| u64::from(q.get())).sum();
                prop_assert_eq!(held, item.reserved, "every reserved unit belongs to exactly one order");
                let sold: u64 = kept.settled.values().map(|s| match s {
                    Settled::Committed(q) => u64::from(q.get()),
                    Settled::Released => 0,
                }).sum();
                prop_assert_eq!(sold, item.committed, "committed units are those of the committed records");
                prop_assert!(item.reservations.keys().all(|o| !kept.settled.contains_key(o)),
                    "an order is either in flight or settled");
            }
            let mut replayed = Kept::set_stock(initial);
            for e in &log {
                replayed.apply(e);
            }
            prop_assert_eq!(replayed, kept);
        }

        /// Repeating any command right after it changes nothing (idempotency).
        #[test]
        fn commands_are_idempotent(commands in proptest::collection::vec(command(), 0..40)) {
            let mut kept = Kept::set_stock(50);
            for c in &commands {
                if kept.run(c).is_ok() {
                    let before = kept.clone();
                    let again = kept.run(c);
                    prop_assert!(matches!(again, Ok(ref e) if e.is_empty()), "second {:?} gave {:?}", c, again);
                    prop_assert_eq!(&before, &kept);
                }
            }
        }
    }

    #[test]
    fn unknown_sku_and_out_of_stock() {
        let order = OrderId::from_u128(1);
        let two = Quantity::new(2).expect("valid");
        let unknown = Kept::default();
        assert_eq!(unknown.decide(&StockCommand::Reserve { order, quantity: two }), Err(StockRejection::UnknownSku));
        let kept = Kept::set_stock(1);
        assert_eq!(
            kept.decide(&StockCommand::Reserve { order, quantity: two }),
            Err(StockRejection::OutOfStock { available: 1 })
        );
    }

    #[test]
    fn release_before_reserve_blocks_a_late_reserve() {
        let mut kept = Kept::set_stock(5);
        let order = OrderId::from_u128(1);
        kept.run(&StockCommand::Release { order }).expect("release");
        let one = Quantity::new(1).expect("valid");
        assert_eq!(kept.decide(&StockCommand::Reserve { order, quantity: one }), Err(StockRejection::AlreadyReleased));
        assert_eq!(kept.item.available, 5);
    }

    #[test]
    fn releasing_a_committed_hold_returns_the_units() {
        let mut kept = Kept::set_stock(5);
        let order = OrderId::from_u128(1);
        let three = Quantity::new(3).expect("valid");
        kept.run(&StockCommand::Reserve { order, quantity: three }).expect("reserve");
        kept.run(&StockCommand::Commit { order }).expect("commit");
        let item = &kept.item;
        assert_eq!((item.available, item.reserved, item.committed), (2, 0, 3));
        kept.run(&StockCommand::Release { order }).expect("release");
        let item = &kept.item;
        assert_eq!((item.available, item.reserved, item.committed), (5, 0, 0));
    }

    #[test]
    fn the_item_forgets_settled_orders() {
        let mut kept = Kept::set_stock(1_000);
        let one = Quantity::new(1).expect("valid");
        for n in 0..500 {
            let order = OrderId::from_u128(n);
            kept.run(&StockCommand::Reserve { order, quantity: one }).expect("reserve");
            let end = if n % 2 == 0 { StockCommand::Commit { order } } else { StockCommand::Release { order } };
            kept.run(&end).expect("settle");
        }
        assert!(kept.item.reservations.is_empty(), "only orders in flight stay in the item");
        assert_eq!(kept.settled.len(), 500);
        // Without its record, a settled order would look new: the record is what refuses it.
        let released = OrderId::from_u128(1);
        let reserve = StockCommand::Reserve { order: released, quantity: one };
        let mut asked = None;
        let without = kept.item.decide(&reserve, |order| {
            asked = Some(order);
            Ok::<_, Infallible>(None)
        });
        assert_eq!(asked, Some(released));
        assert_eq!(without, Ok(Ok(vec![StockEvent::Reserved { order: released, quantity: one }])));
        assert_eq!(kept.decide(&reserve), Err(StockRejection::AlreadyReleased));
        // An order in flight is answered from the item: no lookup.
        let in_flight = OrderId::from_u128(1_000);
        kept.run(&StockCommand::Reserve { order: in_flight, quantity: one }).expect("reserve");
        let decided = kept.item.decide(&StockCommand::Commit { order: in_flight }, |_| Err("looked up"));
        assert_eq!(decided, Ok(Ok(vec![StockEvent::Committed { order: in_flight, quantity: one }])));
    }
}

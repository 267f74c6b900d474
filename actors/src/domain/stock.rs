//! A stock item (one per sku) as a pure state machine.
//!
//! `available` is what can still be reserved; `reserved` is held for orders in flight; units of
//! confirmed orders are "committed" (they left the warehouse). Conservation, checked by the
//! property tests below: `available + reserved + committed` only changes through `SetStock`.
//! Every hold is keyed by order id, so reserve, release and commit are idempotent, and a
//! release leaves a tombstone so that a late, duplicated reserve cannot take stock for an order
//! that was already compensated.

use super::types::{Money, OrderId, Quantity, Sku};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What an order holds of this item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    Reserved(Quantity),
    Committed(Quantity),
    /// Released (or cancelled before it was ever reserved): refuses any later reserve.
    Released,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockItem {
    /// False until an admin first sets stock: orders for it end `unknown_sku`.
    pub known: bool,
    pub price: Money,
    pub available: u64,
    pub reserved: u64,
    pub holds: BTreeMap<OrderId, Hold>,
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

impl StockItem {
    pub fn decide(&self, command: &StockCommand) -> Result<Vec<StockEvent>, StockRejection> {
        use StockCommand::*;
        Ok(match *command {
            SetStock { available, price } => vec![StockEvent::StockSet { available, price }],
            Reserve { order, quantity } => {
                if !self.known {
                    return Err(StockRejection::UnknownSku);
                }
                match self.holds.get(&order) {
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
            Release { order } => match self.holds.get(&order) {
                Some(Hold::Reserved(quantity)) => {
                    vec![StockEvent::Released { order, quantity: *quantity, was_committed: false }]
                }
                Some(Hold::Committed(quantity)) => {
                    vec![StockEvent::Released { order, quantity: *quantity, was_committed: true }]
                }
                Some(Hold::Released) => vec![],
                None => vec![StockEvent::Tombstoned { order }],
            },
            Commit { order } => match self.holds.get(&order) {
                Some(Hold::Reserved(quantity)) => vec![StockEvent::Committed { order, quantity: *quantity }],
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
                self.holds.insert(order, Hold::Reserved(quantity));
            }
            StockEvent::Released { order, quantity, was_committed } => {
                let units = u64::from(quantity.get());
                if !was_committed {
                    self.reserved = self.reserved.saturating_sub(units);
                }
                self.available += units;
                self.holds.insert(order, Hold::Released);
            }
            StockEvent::Tombstoned { order } => {
                self.holds.insert(order, Hold::Released);
            }
            StockEvent::Committed { order, quantity } => {
                self.reserved = self.reserved.saturating_sub(u64::from(quantity.get()));
                self.holds.insert(order, Hold::Committed(quantity));
            }
        }
    }

    /// Units sold to orders that are (still) confirmed.
    pub fn committed(&self) -> u64 {
        self.holds
            .values()
            .map(|h| match h {
                Hold::Committed(q) => u64::from(q.get()),
                _ => 0,
            })
            .sum()
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

    fn run(item: &mut StockItem, command: &StockCommand) -> Result<Vec<StockEvent>, StockRejection> {
        let events = item.decide(command)?;
        for e in &events {
            item.apply(e);
        }
        Ok(events)
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
        /// Stock is conserved and never negative, no unit is reserved twice, and replaying the
        /// events gives the same state.
        #[test]
        fn conserved_never_negative_and_replayable(
            initial in 0u64..100,
            commands in proptest::collection::vec(command(), 0..60),
        ) {
            let mut item = StockItem::default();
            let mut log = Vec::new();
            log.extend(run(&mut item, &StockCommand::SetStock { available: initial, price: Money::from_cents(100) })
                .expect("set stock always succeeds"));
            for c in &commands {
                if let Ok(events) = run(&mut item, c) {
                    log.extend(events);
                }
                prop_assert_eq!(item.available + item.reserved + item.committed(), initial);
                let held: u64 = item.holds.values().map(|h| match h {
                    Hold::Reserved(q) => u64::from(q.get()),
                    _ => 0,
                }).sum();
                prop_assert_eq!(held, item.reserved, "every reserved unit belongs to exactly one order");
            }
            let mut replayed = StockItem::default();
            for e in &log {
                replayed.apply(e);
            }
            prop_assert_eq!(replayed, item);
        }

        /// Repeating any command right after it changes nothing (idempotency).
        #[test]
        fn commands_are_idempotent(commands in proptest::collection::vec(command(), 0..40)) {
            let mut item = StockItem::default();
            run(&mut item, &StockCommand::SetStock { available: 50, price: Money::ZERO }).expect("set");
            for c in &commands {
                if run(&mut item, c).is_ok() {
                    let before = item.clone();
                    let again = item.decide(c);
                    prop_assert!(matches!(again, Ok(ref e) if e.is_empty()), "second {:?} gave {:?}", c, again);
                    prop_assert_eq!(before, item.clone());
                }
            }
        }
    }

    #[test]
    fn unknown_sku_and_out_of_stock() {
        let mut item = StockItem::default();
        let order = OrderId::from_u128(1);
        let two = Quantity::new(2).expect("valid");
        assert_eq!(item.decide(&StockCommand::Reserve { order, quantity: two }), Err(StockRejection::UnknownSku));
        run(&mut item, &StockCommand::SetStock { available: 1, price: Money::from_cents(5) }).expect("set");
        assert_eq!(
            item.decide(&StockCommand::Reserve { order, quantity: two }),
            Err(StockRejection::OutOfStock { available: 1 })
        );
    }

    #[test]
    fn release_before_reserve_blocks_a_late_reserve() {
        let mut item = StockItem::default();
        let order = OrderId::from_u128(1);
        run(&mut item, &StockCommand::SetStock { available: 5, price: Money::ZERO }).expect("set");
        run(&mut item, &StockCommand::Release { order }).expect("release");
        let one = Quantity::new(1).expect("valid");
        assert_eq!(item.decide(&StockCommand::Reserve { order, quantity: one }), Err(StockRejection::AlreadyReleased));
        assert_eq!(item.available, 5);
    }

    #[test]
    fn releasing_a_committed_hold_returns_the_units() {
        let mut item = StockItem::default();
        let order = OrderId::from_u128(1);
        let three = Quantity::new(3).expect("valid");
        run(&mut item, &StockCommand::SetStock { available: 5, price: Money::ZERO }).expect("set");
        run(&mut item, &StockCommand::Reserve { order, quantity: three }).expect("reserve");
        run(&mut item, &StockCommand::Commit { order }).expect("commit");
        assert_eq!((item.available, item.reserved, item.committed()), (2, 0, 3));
        run(&mut item, &StockCommand::Release { order }).expect("release");
        assert_eq!((item.available, item.reserved, item.committed()), (5, 0, 0));
    }
}

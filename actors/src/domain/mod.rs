//! The domain: order, stock item and payment as pure state machines.
//!
//! Each machine has `decide(state, command) -> Result<events, rejection>` and
//! `apply(state, event) -> state`, knows nothing of actors, disks or clocks (time comes in
//! commands), and is tested exhaustively with property tests. The actors in
//! [`crate::services`] host them; the saga is driven by [`order::SagaStep`] and
//! [`payment::PaymentStep`], which are derived from state alone so a restart resumes exactly.

pub mod order;
pub mod payment;
pub mod stock;
pub mod types;

pub use order::{CancelReason, Order, OrderCommand, OrderEvent, OrderLine, OrderRejection, OrderStatus, SagaStep};
pub use payment::{Payment, PaymentCommand, PaymentEvent, PaymentRejection, PaymentStatus, PaymentStep};
pub use stock::{Settled, StockCommand, StockEvent, StockItem, StockRejection, StockView};
pub use types::{CustomerId, InvalidValue, Money, OrderId, PaymentToken, Quantity, Sku, UnixMillis};

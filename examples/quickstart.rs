//! Runs the three services embedded in one process (no HTTP), seeds a few skus, places a
//! dozen orders covering every payment test token and an oversold sku, and prints each
//! order's final status.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use ordermesh_actors::domain::{CustomerId, Money, Order, OrderId, PaymentToken, Quantity, Sku};
use ordermesh_actors::provider::SimulatedProvider;
use ordermesh_actors::services::order::{NewOrder, Requester};
use ordermesh_actors::{Services, Settings};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // A short payment deadline so the `tok_timeout` order finishes in seconds, not 30.
    let settings = Settings { payment_deadline: Duration::from_secs(3), ..Settings::default() };
    let services = Services::start(data.path(), settings, Arc::new(SimulatedProvider::new())).await?;
    println!("services started on {}", data.path().display());

    let catalogue = [("espresso", 100, 250), ("croissant", 50, 320), ("last-bagel", 1, 180)];
    for (sku, available, cents) in catalogue {
        let view = services.inventory.set_stock(&Sku::parse(sku)?, available, Money::from_cents(cents)).await?;
        println!("stocked {:<12} available {:>4}  price {:>4} cents", sku, view.available, view.price.cents());
    }

    // (customer, items, payment token, what to expect)
    type Line = (&'static str, u32);
    let orders: &[(&str, &[Line], &str, &str)] = &[
        ("alice", &[("espresso", 2)], "tok_visa", "approved"),
        ("alice", &[("espresso", 1), ("croissant", 2)], "tok_mastercard", "approved (any other tok_)"),
        ("bob", &[("croissant", 1)], "tok_chargeDeclined", "declined"),
        ("bob", &[("espresso", 3)], "tok_flaky", "fails twice, then approved"),
        ("carol", &[("espresso", 1)], "tok_timeout", "provider never answers"),
        ("carol", &[("last-bagel", 1)], "tok_visa", "takes the last bagel"),
        ("dave", &[("last-bagel", 1)], "tok_visa", "oversold: the bagel is gone"),
        ("dave", &[("espresso", 1), ("last-bagel", 1)], "tok_visa", "oversold line releases the other"),
        ("erin", &[("unicorn", 1)], "tok_visa", "unknown sku"),
        ("erin", &[("croissant", 5)], "tok_flaky", "flaky, bigger order"),
        ("frank", &[("espresso", 1)], "tok_visa", "cancelled by the customer"),
        ("grace", &[("croissant", 1), ("espresso", 1)], "tok_amex", "approved"),
    ];
    let mut placed: Vec<(OrderId, &str, &str)> = Vec::new();
    for (customer, items, token, note) in orders {
        let new = NewOrder {
            customer: CustomerId::parse(*customer)?,
            items: items
                .iter()
                .map(|(s, q)| Ok((Sku::parse(*s)?, Quantity::new(*q)?)))
                .collect::<anyhow::Result<_>>()?,
            payment_token: PaymentToken::parse(*token)?,
        };
        let outcome = services.orders.place(new, None).await?;
        placed.push((outcome.order.id, *token, *note));
        if *note == "cancelled by the customer" {
            let who = Requester::Customer(CustomerId::parse(*customer)?);
            services.orders.cancel(outcome.order.id, &who).await?;
        }
    }

    println!("\nplaced {} orders; waiting for every saga to finish...", placed.len());
    let started = Instant::now();
    let finished = loop {
        let mut all: Vec<Order> = Vec::new();
        for (id, _, _) in &placed {
            if let Some(order) = services.orders.get(*id, &Requester::Admin).await? {
                all.push(order);
            }
        }
        if all.iter().all(|o| o.status.is_terminal()) || started.elapsed() > Duration::from_secs(60) {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    println!("\n{:<38} {:<20} {:<10} {:<18} {:>7}  note", "order", "token", "status", "cancel reason", "total");
    for (order, (_, token, note)) in finished.iter().zip(&placed) {
        println!(
            "{:<38} {:<20} {:<10} {:<18} {:>7}  {}",
            order.id.to_string(),
            token,
            order.status.as_str(),
            order.cancel_reason.map_or("-", |r| r.as_str()),
            order.total.cents(),
            note
        );
    }
    println!();
    for (sku, initial, _) in catalogue {
        let view = services.inventory.get(&Sku::parse(sku)?).await?.ok_or_else(|| anyhow::anyhow!("{sku} vanished"))?;
        println!(
            "{:<12} available {:>4}  reserved {:>2}  (started with {initial})",
            sku, view.available, view.reserved
        );
    }
    println!("finished in {:.1?}", started.elapsed());
    services.shutdown().await?;
    Ok(())
}

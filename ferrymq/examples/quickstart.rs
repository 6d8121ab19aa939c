//! Quickstart: send JSON orders, consume them, ack each — on any backend.
//!
//! Guarantee shown: every message sent is delivered and, once acked, gone; a message
//! nacked by the handler comes back with its attempt count raised.
//!
//! ```text
//! cargo run --example quickstart                       # in-process queue
//! FERRYMQ_URL=redis://127.0.0.1:6399/orders cargo run --example quickstart --features redis
//! ```

use std::time::Duration;

use ferrymq::{Consumer, Message, Producer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    amount_cents: u64,
}

#[tokio::main]
async fn main() -> ferrymq::Result<()> {
    let url = std::env::var("FERRYMQ_URL").unwrap_or_else(|_| "memory://orders".into());
    let (producer, consumer) = ferrymq::connect(&url).await?;
    println!("connected to {} backend", producer.capabilities().backend);

    for id in 1..=5 {
        let order = Order {
            id,
            amount_cents: 1_000 * u64::from(id),
        };
        let message = Message::json(&order)?.key(format!("customer-{}", id % 2));
        producer.send(message).await?;
    }
    println!("sent 5 orders");

    let mut handled = 0;
    while handled < 5 {
        for delivery in consumer.receive(10, Duration::from_secs(2)).await? {
            let order: Order = delivery.json()?;
            // Order 3 fails once to show redelivery: nack puts it back at once.
            if order.id == 3 && delivery.attempt() == 1 {
                println!("order {} failed on attempt 1, nacking", order.id);
                delivery.nack(None).await?;
                continue;
            }
            println!(
                "handled order {} ({} cents) on attempt {}",
                order.id,
                order.amount_cents,
                delivery.attempt()
            );
            delivery.ack().await?;
            handled += 1;
        }
    }
    let depth = consumer.depth().await?;
    println!("done; queue depth now {depth:?}");
    Ok(())
}

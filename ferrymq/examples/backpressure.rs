//! Backpressure: a producer that refuses — or waits — once its queue holds a bound.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - `Overflow::Reject`: once the queue holds `BOUND` messages, further sends fail at
//!   once with `ErrorKind::QueueFull`, and a refused send enqueues nothing (the depth
//!   stays at the bound);
//! - `Overflow::Wait { max_wait: Some(..) }` with nobody consuming: the send waits that
//!   long, then gives up with `QueueFull`, again enqueuing nothing;
//! - `Overflow::Wait`: a send past the bound blocks until a consumer makes room, then
//!   succeeds — it returns only after the consumer's acks.
//!
//! ```text
//! cargo run -p ferrymq --example backpressure
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-orders?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example backpressure
//! ```

mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferrymq::middleware::{BackpressureLayer, Overflow};
use ferrymq::{Consumer, ErrorKind, Message, Producer};
use support::Checks;
use tokio::time::Instant;
use tower::Layer;

const BOUND: u64 = 5;
/// How long a depth reading is trusted.
const REFRESH: Duration = Duration::from_millis(50);

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-orders?visibility=1s")?;
    let queue = support::queue(&base, &format!("bp-{}", support::run_id()))?;
    let (producer, consumer) = queue.connect().await?;
    let producer: Arc<dyn Producer> = Arc::from(producer);
    let consumer: Arc<dyn Consumer> = Arc::from(consumer);
    println!(
        "backpressure example on {} (queue {}, bound {BOUND} messages)\n",
        producer.capabilities().backend,
        producer.queue()
    );
    let mut checks = Checks::new();

    println!("1. Overflow::Reject, nobody consuming: send 8");
    let strict = BackpressureLayer::new(BOUND)
        .refresh(REFRESH)
        .overflow(Overflow::Reject)
        .layer(producer.clone());
    let mut accepted = 0;
    let mut refused = 0;
    for i in 1..=8 {
        let started = Instant::now();
        match strict.send(Message::new(format!("job {i}"))).await {
            Ok(_) => {
                accepted += 1;
                println!("  job {i}: accepted");
            }
            Err(e) if e.kind() == ErrorKind::QueueFull => {
                refused += 1;
                println!("  job {i}: refused after {:.0?}: {e}", started.elapsed());
            }
            Err(e) => return Err(e),
        }
    }
    let depth = producer.depth().await?.total();
    checks.check(
        accepted == BOUND && refused == 8 - BOUND,
        format!("{BOUND} accepted, the other {refused} refused with QueueFull"),
    );
    checks.check(
        depth == BOUND,
        format!("refused sends enqueued nothing (depth {depth})"),
    );

    println!("\n2. Overflow::Wait with max_wait 300ms, nobody consuming: send 1");
    let patient = BackpressureLayer::new(BOUND)
        .refresh(REFRESH)
        .overflow(Overflow::Wait {
            max_wait: Some(Duration::from_millis(300)),
        })
        .layer(producer.clone());
    let started = Instant::now();
    let result = patient.send(Message::new("job 9")).await;
    let waited = started.elapsed();
    match &result {
        Ok(_) => println!("  job 9: accepted after {waited:.0?}"),
        Err(e) => println!("  job 9: gave up after {waited:.0?}: {e}"),
    }
    let depth = producer.depth().await?.total();
    checks.check(
        matches!(&result, Err(e) if e.kind() == ErrorKind::QueueFull)
            && waited >= Duration::from_millis(250)
            && depth == BOUND,
        format!("waited its 300ms, then QueueFull; nothing enqueued (depth {depth})"),
    );

    println!("\n3. Overflow::Wait without a limit; a consumer acks 3 messages after 400ms");
    let blocking = BackpressureLayer::new(BOUND)
        .refresh(REFRESH)
        .overflow(Overflow::Wait { max_wait: None })
        .layer(producer.clone());
    let drain = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut acked = 0;
            // When the first ack was sent: the queue stays full until then. (The send
            // may go through before the last `ack()` returned: the broker applies a
            // delete before its answer reaches us.)
            let mut acks_began = None;
            while acked < 3 {
                for d in consumer.receive(3 - acked, Duration::from_secs(5)).await? {
                    acks_began.get_or_insert_with(Instant::now);
                    d.ack().await?;
                    acked += 1;
                }
            }
            println!("  consumer: acked 3");
            Ok::<Instant, ferrymq::Error>(acks_began.unwrap_or_else(Instant::now))
        })
    };
    let started = Instant::now();
    let sent = tokio::time::timeout(
        support::patience(Duration::ZERO),
        blocking.send(Message::new("job 10")),
    )
    .await;
    let sent_at = Instant::now();
    let acked_at = match drain.await {
        Ok(r) => r?,
        Err(e) => {
            return Err(ferrymq::Error::new(
                ErrorKind::Backend,
                format!("consumer task failed: {e}"),
            ))
        }
    };
    let ok = matches!(sent, Ok(Ok(_)));
    println!(
        "  job 10: {} after {:.0?}",
        if ok { "accepted" } else { "NOT accepted" },
        sent_at - started
    );
    let depth = producer.depth().await?.total();
    checks.check(
        ok && sent_at >= acked_at,
        "the send waited for the consumer's acks, then succeeded",
    );
    checks.check(
        depth == BOUND - 3 + 1,
        format!("depth is now {depth} (5 - 3 acked + 1)"),
    );

    // Leave nothing behind.
    let mut left = depth;
    while left > 0 {
        let got = consumer.receive(10, Duration::from_secs(2)).await?;
        if got.is_empty() {
            break;
        }
        for d in got {
            d.ack().await?;
            left -= 1;
        }
    }
    producer.close().await?;
    consumer.close().await?;
    support::delete_queues(&[&queue]).await;
    Ok(checks.exit_code())
}

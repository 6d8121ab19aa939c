//! Exactly-once consume-transform-produce: orders in, priced orders out, each
//! batch's outputs and its input offsets committed in one Kafka transaction.
//!
//! **The guarantee**: a consumer of the output topic reading `read_committed`
//! (librdkafka's default, so any ferrymq consumer) sees exactly one priced order
//! per order — also when the processor crashes at any point and is restarted
//! (`tests/eos.rs` kills it with SIGKILL at random points to prove it). What it
//! does *not* cover: side effects outside Kafka (a database write in the handler
//! runs again for an input whose transaction did not commit), and readers with
//! `read_uncommitted` (they also see the outputs of aborted transactions).
//!
//! ```text
//! scripts/kafka.sh start 9330
//! KAFKA_BROKERS=127.0.0.1:9330 cargo run -p ferrymq-kafka --example exactly_once
//! ```
//!
//! Env: `KAFKA_BROKERS` (or `FERRYMQ_TEST_KAFKA_BROKERS`; one is required), `N`
//! (orders, default 2,000). Exits non-zero when an order's output is missing or
//! duplicated.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferrymq_core::admin::Admin;
use ferrymq_core::{BoxError, Consumer, Delivery, Message, Producer};
use ferrymq_kafka::KafkaConfig;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exactly_once: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS")
        .or_else(|_| std::env::var("FERRYMQ_TEST_KAFKA_BROKERS"))
        .map_err(|_| "set KAFKA_BROKERS=host:port (scripts/kafka.sh start 9330)")?;
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let run_id = format!(
        "{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() % 0xff_ffff
    );
    let orders = KafkaConfig::from_url(&format!(
        "kafka://{brokers}/eos-example-orders-{run_id}?partitions=3&group=pricing-{run_id}"
    ))?;
    let priced_topic = format!("eos-example-priced-{run_id}");

    // The inputs.
    let producer = orders.producer().await?;
    let sent = producer
        .send_batch(
            (0..n)
                .map(|i| Message::new(format!("order-{i}")).key(format!("customer-{}", i % 50)))
                .collect(),
        )
        .await?;
    for r in sent {
        r?;
    }
    producer.close().await?;

    // The processor: the handler returns its outputs; the processor produces them
    // and commits the input offsets in one transaction per batch (up to 200
    // orders). `pricing-0` names this process: stable across its restarts.
    let processor = orders
        .exactly_once(&priced_topic, "pricing-0")?
        .max_batch(200);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let t0 = Instant::now();
    let task = tokio::spawn(processor.run_until(
        |d: Delivery| async move {
            let order = String::from_utf8_lossy(d.payload()).into_owned();
            let priced = Message::new(format!("{order}: 42.00 EUR"));
            Ok::<_, BoxError>(vec![match d.key() {
                Some(k) => priced.key(k),
                None => priced,
            }])
        },
        async {
            let _ = stopped.await;
        },
    ));
    // Done when the group has committed every order (through the transactions).
    let admin = orders.admin()?;
    loop {
        let lag = admin.lag(None).await?;
        if !lag.is_empty()
            && lag
                .iter()
                .all(|l| l.lag == 0 && (l.committed.is_some() || l.end == 0))
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("not every order was committed within 60 s: {lag:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    let summary = task.await??;
    let took = t0.elapsed();

    // A downstream reader: a ferrymq consumer of the output topic (read_committed).
    let mut priced = orders.for_topic(&priced_topic)?;
    priced.group = Some(format!("priced-reader-{run_id}"));
    let reader = priced.consumer().await?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) && Instant::now() < deadline {
        let got = reader.receive(500, Duration::from_millis(200)).await?;
        if !got.is_empty() {
            quiet_since = Instant::now();
        }
        for d in got {
            *counts
                .entry(String::from_utf8_lossy(d.payload()).into_owned())
                .or_default() += 1;
            d.ack().await?;
        }
    }
    reader.close().await?;
    let missing = (0..n)
        .filter(|i| !counts.contains_key(&format!("order-{i}: 42.00 EUR")))
        .count();
    let duplicated: usize = counts.values().map(|c| c - 1).sum();
    println!(
        "exactly_once: {n} orders priced in {took:?} ({} transactions, {} aborted); the \
         output read read_committed: {} records, {missing} missing, {duplicated} duplicated",
        summary.transactions,
        summary.aborted,
        counts.values().sum::<usize>()
    );
    let _ = admin.delete().await;
    let _ = priced.admin()?.delete().await;
    if missing > 0 || duplicated > 0 || summary.inputs != n as u64 {
        return Err(format!(
            "not exactly once: {missing} missing, {duplicated} duplicated, {} inputs committed",
            summary.inputs
        )
        .into());
    }
    Ok(())
}

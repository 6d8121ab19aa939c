//! Batching: many `send` calls, few round trips — by size, by linger time, on close.
//!
//! `BatchingLayer` wraps a producer: each `send` joins the current batch and waits;
//! the batch goes out with one `send_batch` call when it is full (`max_size`), when its
//! first message has waited `linger`, or on `flush` / `close`. A counting wrapper
//! around the real producer shows each batch that reaches it.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - no batch is larger than `max_size`, and 25 concurrent sends take a handful of
//!   round trips (full batches go out at once, without waiting for the linger time);
//! - a lone send goes out by itself once it has waited `linger` — never stuck waiting
//!   for company;
//! - `close` sends what is collected right away, long before its linger time;
//! - every caller gets its own message's result, and every message arrives exactly
//!   once.
//!
//! ```text
//! cargo run -p ferrymq --example batching
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-orders?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example batching
//! ```

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferrymq::middleware::BatchingLayer;
use ferrymq::{Capabilities, Consumer, Depth, Message, Producer, Result, SendReceipt};
use support::Checks;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::Layer;

const MAX_SIZE: usize = 10;
const LINGER: Duration = Duration::from_millis(50);

/// Forwards to the real producer, recording the size of every batch it is handed.
struct Counting {
    inner: Box<dyn Producer>,
    batches: Arc<Mutex<Vec<usize>>>,
    /// When the first full batch was handed to the backend: "went out at once" is
    /// about when the batch left, not how long the broker took to answer it.
    first_full: Arc<Mutex<Option<Instant>>>,
}

#[async_trait]
impl Producer for Counting {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(1);
        self.inner.send(message).await
    }
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(messages.len());
        if messages.len() >= MAX_SIZE {
            let mut first = self.first_full.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(Instant::now);
        }
        self.inner.send_batch(messages).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    async fn depth(&self) -> Result<Depth> {
        self.inner.depth().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
}

fn taken(batches: &Mutex<Vec<usize>>) -> Vec<usize> {
    std::mem::take(&mut *batches.lock().unwrap_or_else(|e| e.into_inner()))
}

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-orders?visibility=1s")?;
    let queue = support::queue(&base, &format!("batch-{}", support::run_id()))?;
    let batches: Arc<Mutex<Vec<usize>>> = Arc::default();
    let first_full: Arc<Mutex<Option<Instant>>> = Arc::default();
    let counting = Counting {
        inner: queue.producer().await?,
        batches: batches.clone(),
        first_full: first_full.clone(),
    };
    let backend = counting.capabilities().backend;
    let producer = Arc::new(
        BatchingLayer::new()
            .max_size(MAX_SIZE)
            .linger(LINGER)
            .layer(counting),
    );
    let max = producer.max_size();
    println!(
        "batching example on {backend} (queue {}): batches of at most {max}, linger {LINGER:?}\n",
        producer.queue()
    );
    let mut checks = Checks::new();
    let mut sent_ids: HashMap<String, usize> = HashMap::new();

    println!("1. 25 concurrent sends");
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 1..=25 {
        let producer = producer.clone();
        tasks.spawn(async move {
            let result = producer.send(Message::new(format!("burst {i}"))).await;
            (i, result, Instant::now())
        });
    }
    let mut own_results = 0;
    let mut first_back = None::<Duration>;
    while let Some(joined) = tasks.join_next().await {
        if let Ok((_, Ok(receipt), at)) = joined {
            own_results += 1;
            *sent_ids.entry(receipt.into_id()).or_default() += 1;
            let t = at - started;
            first_back = Some(first_back.map_or(t, |f| f.min(t)));
        }
    }
    let burst = taken(&batches);
    println!(
        "  {own_results} sends resolved in {:.0?}, in {} round trips of sizes {burst:?}; \
         the first returned after {:.0?}",
        started.elapsed(),
        burst.len(),
        first_back.unwrap_or_default()
    );
    checks.check(
        own_results == 25 && burst.iter().sum::<usize>() == 25,
        "each of the 25 callers got its own result",
    );
    checks.check(
        burst.iter().all(|&n| n <= max) && burst.len() <= 25 / 2,
        format!(
            "no batch above {max}; {} round trips instead of 25",
            burst.len()
        ),
    );
    checks.check(
        burst.contains(&max)
            && first_full
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at - started < LINGER),
        format!("a full batch went out at once, before the {LINGER:?} linger"),
    );

    println!("\n2. one lone send");
    let started = Instant::now();
    let receipt = producer.send(Message::new("lone")).await?;
    let waited = started.elapsed();
    *sent_ids.entry(receipt.into_id()).or_default() += 1;
    let lone = taken(&batches);
    println!("  went out after {waited:.0?} in a batch of sizes {lone:?}");
    checks.check(
        lone == [1] && waited >= LINGER.mul_f64(0.9) && waited < LINGER * 20,
        format!("sent alone after about the {LINGER:?} linger"),
    );

    println!("\n3. three sends with a 10s linger, then close()");
    let slow_batches: Arc<Mutex<Vec<usize>>> = Arc::default();
    let slow = Arc::new(
        BatchingLayer::new()
            .max_size(MAX_SIZE)
            .linger(Duration::from_secs(10))
            .layer(Counting {
                inner: queue.producer().await?,
                batches: slow_batches.clone(),
                first_full: Arc::default(),
            }),
    );
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 1..=3 {
        let slow = slow.clone();
        tasks.spawn(async move { slow.send(Message::new(format!("late {i}"))).await });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    slow.close().await?;
    let mut late_ok = 0;
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Ok(receipt)) = joined {
            late_ok += 1;
            *sent_ids.entry(receipt.into_id()).or_default() += 1;
        }
    }
    let closed_in = started.elapsed();
    let late = taken(&slow_batches);
    println!("  {late_ok} sends resolved after {closed_in:.0?}, batch sizes {late:?}");
    checks.check(
        late_ok == 3 && late == [3] && closed_in < Duration::from_secs(5),
        "close() sent the collected batch at once",
    );
    producer.close().await?;

    println!("\n4. consume everything");
    let consumer = queue.consumer().await?;
    let mut received: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + support::patience(Duration::ZERO);
    while received.values().sum::<usize>() < 29 && Instant::now() < deadline {
        for d in consumer.receive(100, Duration::from_secs(1)).await? {
            *received
                .entry(String::from_utf8_lossy(d.payload()).into_owned())
                .or_default() += 1;
            d.ack().await?;
        }
    }
    // Anything more would be a duplicate.
    for d in consumer.receive(100, Duration::from_millis(300)).await? {
        *received
            .entry(String::from_utf8_lossy(d.payload()).into_owned())
            .or_default() += 1;
        d.ack().await?;
    }
    consumer.close().await?;
    support::delete_queues(&[&queue]).await;
    let once = received.len() == 29 && received.values().all(|&n| n == 1);
    println!(
        "  received {} messages, {} distinct",
        received.values().sum::<usize>(),
        received.len()
    );
    checks.check(
        once && sent_ids.len() == 29,
        "all 29 messages arrived exactly once",
    );
    Ok(checks.exit_code())
}

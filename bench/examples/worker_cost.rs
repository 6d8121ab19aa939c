//! Drives N deliveries through the in-memory backend, for instruction counts under
//! callgrind (repeatable on a noisy machine, unlike wall time).
//!
//! ```text
//! cargo build --release -p ferrymq-bench --example worker_cost
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*worker_cost::measured*' \
//!     target/release/examples/worker_cost worker 20000
//! ```
//!
//! Modes (what runs inside `measured`, the only function counted with the flags
//! above; the queue is filled before it):
//! - `traits`: `receive(100)` then `Delivery::ack` of each, on one task (the bench's
//!   `ferrymq-memory` driver at c=1);
//! - `bare`: the `Worker` (concurrency 1, defaults) with the bench handler alone;
//! - `worker`: the `Worker` with the default stack the bench runs (ExtendVisibility +
//!   RetryToDlq + CatchPanic + Timeout);
//! - `worker-events`: the same with a `subscribe`d event receiver, as the bench
//!   counts its deliveries;
//! - `keyed`: the `Worker` with `ordered_by_key`, the bare handler, concurrency 8 and
//!   `--prefetch P` (default 5000), over a read-ahead consumer that hands out
//!   everything it holds, like a Kafka partition (the memory backend withholds a
//!   key's later messages while one is in flight, so the worker never sees them):
//!   N deliveries over 8 keys, so every pick has up to P waiting behind busy keys.
//!
//! Per-delivery cost: run twice (N and 2N) and divide the difference by N, which
//! cancels the fixed costs (runtime, worker start and shutdown). `--concurrency C`
//! sets the Worker's concurrency (default 1; `keyed`: 8).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::memory::MemoryConfig;
use ferrymq_core::middleware::{
    handler_fn, CatchPanicLayer, ExtendVisibilityLayer, Outcome, RetryToDlqLayer,
};
use ferrymq_core::worker::Worker;
use ferrymq_core::{
    Ack, AckHandle, BoxError, Capabilities, Consumer, Delivery, DeliveryMeta, Depth, Message,
    Producer,
};
use tower::util::BoxService;
use tower::ServiceBuilder;

fn payload(size: usize, i: u64) -> bytes::Bytes {
    let mut v = vec![b'x'; size.max(8)];
    v[..8].copy_from_slice(&i.to_le_bytes());
    bytes::Bytes::from(v)
}

fn handle(p: &[u8]) -> u64 {
    std::hint::black_box(p.iter().fold(0u64, |a, &b| a.wrapping_add(u64::from(b))))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "worker".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let mut concurrency = if mode == "keyed" { 8 } else { 1 };
    let mut prefetch = 5000;
    while let Some(a) = args.next() {
        if a == "--concurrency" {
            concurrency = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
        } else if a == "--prefetch" {
            prefetch = args.next().and_then(|s| s.parse().ok()).unwrap_or(5000);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queue = format!("cost-{mode}");
    let (producer, consumer) = MemoryConfig::new(&queue)
        .capacity(50_000_000)
        .connect()
        .unwrap();
    let dlq = MemoryConfig::new(format!("{queue}-dlq"))
        .producer()
        .unwrap();
    if mode == "keyed" {
        let consumer = ReadAhead::new(n, 8);
        let handled = measured_keyed(&rt, n, concurrency, prefetch, consumer);
        assert_eq!(handled, n, "handled");
        eprintln!("{mode}: {n} deliveries handled");
        return;
    }
    rt.block_on(async {
        let mut sent = 0;
        while sent < n {
            let k = 100.min(n - sent);
            let batch = (0..k)
                .map(|i| Message::new(payload(100, sent + i)))
                .collect();
            producer.send_batch(batch).await.unwrap();
            sent += k;
        }
    });
    let handled = measured(&rt, &mode, n, concurrency, consumer, dlq);
    assert_eq!(handled, n, "handled");
    eprintln!("{mode}: {n} deliveries handled");
}

#[inline(never)]
fn measured(
    rt: &tokio::runtime::Runtime,
    mode: &str,
    n: u64,
    concurrency: usize,
    consumer: ferrymq_core::memory::MemoryConsumer,
    dlq: ferrymq_core::memory::MemoryProducer,
) -> u64 {
    rt.block_on(async move {
        match mode {
            "traits" => {
                let mut done = 0;
                while done < n {
                    let batch = consumer
                        .receive(100, Duration::from_millis(100))
                        .await
                        .unwrap();
                    for d in &batch {
                        handle(d.payload());
                        d.ack().await.unwrap();
                    }
                    done += batch.len() as u64;
                }
                done
            }
            "bare" | "worker" | "worker-events" => {
                let count = Arc::new(AtomicU64::new(0));
                let done = Arc::new(tokio::sync::Notify::new());
                let (c2, d2) = (count.clone(), done.clone());
                let handler = handler_fn(move |d: Delivery| {
                    let (count, done) = (c2.clone(), d2.clone());
                    async move {
                        handle(d.payload());
                        if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                            done.notify_one();
                        }
                        Ok::<_, BoxError>(())
                    }
                });
                let caps = consumer.capabilities().clone();
                let worker = Worker::new(consumer)
                    .concurrency(concurrency)
                    .depth_interval(None);
                let events = (mode == "worker-events").then(|| worker.subscribe());
                let counter = events.map(|mut rx| {
                    tokio::spawn(async move {
                        let mut ok = 0u64;
                        while let Ok(e) = rx.recv().await {
                            if e.outcome == Outcome::Succeeded {
                                ok += 1;
                            }
                        }
                        ok
                    })
                });
                let shutdown = async move { done.notified().await };
                let summary = if mode == "bare" {
                    worker.run_until(handler, shutdown).await.unwrap()
                } else {
                    let service: BoxService<Delivery, (), BoxError> = ServiceBuilder::new()
                        .boxed()
                        .layer(ExtendVisibilityLayer::from_capabilities(&caps))
                        .layer(RetryToDlqLayer::new(dlq).max_attempts(5))
                        .layer(CatchPanicLayer::new())
                        .timeout(Duration::from_secs(30))
                        .service(handler);
                    worker.run_until(service, shutdown).await.unwrap()
                };
                if let Some(c) = counter {
                    let _ = c.await;
                }
                assert_eq!(summary.failed, 0);
                count.load(Ordering::Relaxed)
            }
            other => panic!("unknown mode {other:?} (traits, bare, worker, worker-events)"),
        }
    })
}

/// A consumer that hands out whatever it holds, keys or not (a Kafka partition read
/// ahead), so that per-key order is the worker's job alone.
#[derive(Debug)]
struct ReadAhead {
    ready: std::sync::Mutex<std::collections::VecDeque<Delivery>>,
    caps: Capabilities,
}

#[derive(Debug)]
struct NoopAck;

#[async_trait::async_trait]
impl Ack for NoopAck {
    async fn ack(&self) -> ferrymq_core::Result<()> {
        Ok(())
    }
    async fn nack(&self, _: Option<Duration>) -> ferrymq_core::Result<()> {
        Ok(())
    }
    async fn extend(&self, _: Duration) -> ferrymq_core::Result<()> {
        Ok(())
    }
}

impl ReadAhead {
    fn new(n: u64, keys: u64) -> Self {
        let queue: Arc<str> = "read-ahead".into();
        let ready = (0..n)
            .map(|i| {
                let message = Message::new(payload(100, i)).key(format!("k{}", i % keys));
                let meta = DeliveryMeta::new(
                    i.to_string(),
                    1,
                    std::time::SystemTime::now(),
                    queue.clone(),
                );
                Delivery::new(message, meta, AckHandle::new(NoopAck))
            })
            .collect();
        let mut caps = Capabilities::minimal("read-ahead");
        caps.max_batch = 1000;
        ReadAhead {
            ready: std::sync::Mutex::new(ready),
            caps,
        }
    }
}

#[async_trait::async_trait]
impl Consumer for ReadAhead {
    async fn receive(&self, max: usize, wait: Duration) -> ferrymq_core::Result<Vec<Delivery>> {
        let batch: Vec<Delivery> = {
            let mut ready = self.ready.lock().unwrap();
            let n = max.min(ready.len());
            ready.drain(..n).collect()
        };
        if batch.is_empty() {
            tokio::time::sleep(wait).await;
        }
        Ok(batch)
    }
    async fn depth(&self) -> ferrymq_core::Result<Depth> {
        Err(ferrymq_core::Error::new(
            ferrymq_core::ErrorKind::Unsupported,
            "no depth",
        ))
    }
    async fn close(&self) -> ferrymq_core::Result<()> {
        Ok(())
    }
    fn queue(&self) -> &str {
        "read-ahead"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
}

#[inline(never)]
fn measured_keyed(
    rt: &tokio::runtime::Runtime,
    n: u64,
    concurrency: usize,
    prefetch: usize,
    consumer: ReadAhead,
) -> u64 {
    rt.block_on(async move {
        let count = Arc::new(AtomicU64::new(0));
        let done = Arc::new(tokio::sync::Notify::new());
        let (c2, d2) = (count.clone(), done.clone());
        let handler = handler_fn(move |d: Delivery| {
            let (count, done) = (c2.clone(), d2.clone());
            async move {
                handle(d.payload());
                if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    done.notify_one();
                }
                Ok::<_, BoxError>(())
            }
        });
        let summary = Worker::new(consumer)
            .concurrency(concurrency)
            .prefetch(prefetch)
            .ordered_by_key(true)
            .depth_interval(None)
            .run_until(handler, async move { done.notified().await })
            .await
            .unwrap();
        assert_eq!(summary.failed, 0);
        count.load(Ordering::Relaxed)
    })
}

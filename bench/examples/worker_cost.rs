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
//!   counts its deliveries.
//!
//! Per-delivery cost: run twice (N and 2N) and divide the difference by N, which
//! cancels the fixed costs (runtime, worker start and shutdown). `--concurrency C`
//! sets the Worker's concurrency (default 1).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::memory::MemoryConfig;
use ferrymq_core::middleware::{
    handler_fn, CatchPanicLayer, ExtendVisibilityLayer, Outcome, RetryToDlqLayer,
};
use ferrymq_core::worker::Worker;
use ferrymq_core::{BoxError, Consumer, Delivery, Message, Producer};
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
    let mut concurrency = 1;
    while let Some(a) = args.next() {
        if a == "--concurrency" {
            concurrency = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
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

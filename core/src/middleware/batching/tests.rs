use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tower::Layer;

use super::*;
use crate::middleware::testing::queue;
use crate::{Capabilities, Consumer, Depth, ErrorKind, Message, Producer, Result, SendReceipt};

/// A memory producer that counts the batches it is handed.
#[derive(Debug)]
struct CountingBatches {
    inner: crate::memory::MemoryProducer,
    batches: Arc<AtomicUsize>,
}

#[async_trait]
impl Producer for CountingBatches {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.inner.send(message).await
    }
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.inner.send_batch(messages).await
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

fn setup(
    name: &str,
    layer: BatchingLayer,
) -> (
    Arc<Batching<CountingBatches>>,
    crate::memory::MemoryConsumer,
    Arc<AtomicUsize>,
) {
    let (p, c) = queue(name).max_message_size(64).connect().unwrap();
    let batches = Arc::new(AtomicUsize::new(0));
    let b = layer.layer(CountingBatches {
        inner: p,
        batches: batches.clone(),
    });
    (Arc::new(b), c, batches)
}

fn spawn_sends(
    b: &Arc<Batching<CountingBatches>>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(Result<SendReceipt>, Duration)>> {
    (0..n)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = b.send(Message::new(format!("m{i}"))).await;
                (r, start.elapsed())
            })
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn flushes_on_size() {
    let (b, c, batches) = setup(
        "batch-size",
        BatchingLayer::new()
            .max_size(3)
            .linger(Duration::from_secs(3600)),
    );
    let mut ids = Vec::new();
    for h in spawn_sends(&b, 6) {
        let (r, waited) = h.await.unwrap();
        assert_eq!(
            waited,
            Duration::ZERO,
            "full batches go out without lingering"
        );
        ids.push(r.unwrap().into_id());
    }
    assert_eq!(batches.load(Ordering::SeqCst), 2);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "each caller got its own receipt");
    assert_eq!(c.depth().await.unwrap().waiting, 6);
}

#[tokio::test(start_paused = true)]
async fn flushes_on_linger() {
    let (b, c, batches) = setup(
        "batch-linger",
        BatchingLayer::new()
            .max_size(100)
            .linger(Duration::from_millis(50)),
    );
    for h in spawn_sends(&b, 2) {
        let (r, waited) = h.await.unwrap();
        r.unwrap();
        assert_eq!(waited, Duration::from_millis(50));
    }
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    assert_eq!(c.depth().await.unwrap().waiting, 2);
}

#[tokio::test(start_paused = true)]
async fn flushes_on_close_and_then_refuses() {
    let (b, c, batches) = setup(
        "batch-close",
        BatchingLayer::new()
            .max_size(100)
            .linger(Duration::from_secs(3600)),
    );
    let pending = spawn_sends(&b, 3);
    tokio::task::yield_now().await;
    b.close().await.unwrap();
    for h in pending {
        let (r, waited) = h.await.unwrap();
        r.unwrap();
        assert_eq!(waited, Duration::ZERO);
    }
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    assert_eq!(c.depth().await.unwrap().waiting, 3);
    assert_eq!(
        b.send(Message::new("late")).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test(start_paused = true)]
async fn flush_sends_the_current_batch() {
    let (b, c, _) = setup(
        "batch-flush",
        BatchingLayer::new().linger(Duration::from_secs(3600)),
    );
    let pending = spawn_sends(&b, 2);
    tokio::task::yield_now().await;
    b.flush().await.unwrap();
    for h in pending {
        h.await.unwrap().0.unwrap();
    }
    assert_eq!(c.depth().await.unwrap().waiting, 2);
}

#[tokio::test(start_paused = true)]
async fn per_message_results_reach_each_caller() {
    let (b, c, batches) = setup(
        "batch-results",
        BatchingLayer::new()
            .max_size(3)
            .linger(Duration::from_secs(1)),
    );
    let results = b
        .send_batch(vec![
            Message::new("ok-1"),
            Message::new(vec![b'x'; 65]),
            Message::new("ok-2"),
        ])
        .await
        .unwrap();
    assert!(results[0].is_ok() && results[2].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().kind(), ErrorKind::TooLarge);
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    assert_eq!(c.depth().await.unwrap().waiting, 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_producer_ships_what_is_left() {
    let (p, c) = queue("batch-drop").connect().unwrap();
    let b = BatchingLayer::new()
        .linger(Duration::from_secs(3600))
        .layer(p);
    // A caller that gave up waiting: its message is already in the batch.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(1), b.send(Message::new("last words"))).await;
    assert!(gave_up.is_err());
    drop(b);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        c.depth().await.unwrap().waiting,
        1,
        "shipped on drop, not after the linger"
    );
}

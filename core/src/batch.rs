//! One batching helper for backends whose per-item calls have a cheaper batch form
//! (Redis: one ACK script per batch instead of one per ack; SQS: `DeleteMessageBatch`
//! of up to 10 receipts instead of ten `DeleteMessage` calls).
//!
//! A [`Batcher`] owns a task. Callers [`submit`](Batcher::submit) one item each and
//! wait for **their own** result; the task gathers items into batches and runs the
//! flush function once per batch:
//!
//! - A batch opens with the first item that arrives and closes when it holds
//!   [`max`](BatchConfig::new) items or [`linger`](BatchConfig::linger) has passed
//!   since it opened, whichever comes first. With a zero linger the task only yields
//!   once — so a caller settling several items concurrently gets them into one call —
//!   and takes whatever is already queued.
//! - At most [`in_flight`](BatchConfig::in_flight) batches are being flushed at once.
//!   While all are busy, new items queue up, so under load batches fill up to `max`
//!   by themselves: the linger only costs latency when the system is idle.
//! - `submit` returns once the flush of its batch returned, with the result the
//!   flush gave for that item: an `ack()` that returned `Ok` was applied on the
//!   server, not merely queued.
//!
//! **Cancellation.** Dropping a `submit` future before its first poll submits
//! nothing. Dropping it later never disturbs the other items, the batch, or the
//! task: the item is still flushed (like a request already on the wire) and its
//! result is discarded, so the caller must treat its outcome as unknown. Dropping the
//! last `Batcher` handle ends the task after everything already submitted was
//! flushed.
//!
//! ```
//! use std::time::Duration;
//! use ferrymq_core::batch::{BatchConfig, Batcher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Items are numbers; the "server" applies a batch and answers per item.
//! let doubler = Batcher::spawn(
//!     "doubler",
//!     BatchConfig::new(10).linger(Duration::from_millis(5)),
//!     |items: Vec<u32>| async move { items.into_iter().map(|i| Ok(i * 2)).collect() },
//! );
//! let (a, b) = tokio::join!(doubler.submit(1), doubler.submit(2));
//! assert_eq!((a.unwrap(), b.unwrap()), (2, 4));
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{Error, ErrorKind, Result};

/// How a [`Batcher`] forms batches. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    max: usize,
    linger: Duration,
    in_flight: usize,
}

impl BatchConfig {
    /// Batches of at most `max` items (at least 1), no linger, 4 batches in flight.
    pub fn new(max: usize) -> Self {
        BatchConfig {
            max: max.max(1),
            linger: Duration::ZERO,
            in_flight: 4,
        }
    }

    /// Keep a batch open up to `linger` after its first item to gather more.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Flush at most `n` batches at once (at least 1). A few keep the connection busy
    /// while one batch is on the wire; few enough that items still pile up into
    /// large batches under load.
    pub fn in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self
    }

    /// The largest batch.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The longest a batch stays open.
    pub fn linger_for(&self) -> Duration {
        self.linger
    }

    /// Batches flushed at once, at most.
    pub fn in_flight_max(&self) -> usize {
        self.in_flight
    }
}

struct Item<T, R> {
    item: T,
    reply: oneshot::Sender<Result<R>>,
}

/// Submits items to one batching task; cheap to clone (all clones feed the same
/// task). See the [module docs](self).
pub struct Batcher<T, R = ()> {
    tx: mpsc::UnboundedSender<Item<T, R>>,
    name: &'static str,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            name: self.name,
        }
    }
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Start the batching task on the current tokio runtime.
    ///
    /// `name` says what the batches are (`"DeleteMessageBatch"`) in errors. `flush`
    /// applies one batch (1 to `max` items, in submission order) and returns one
    /// result per item, in the same order; an item it returns no result for gets a
    /// `Backend` error. An error that concerns the whole batch (the connection
    /// dropped) must be given to every item.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn spawn<F, Fut>(name: &'static str, config: BatchConfig, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, config, Arc::new(flush), name));
        Batcher { tx, name }
    }

    /// Submit `item` and wait until its batch was flushed; returns the flush's result
    /// for this item. `Closed` when the task is gone (the runtime shuts down, or the
    /// flush panicked).
    pub async fn submit(&self, item: T) -> Result<R> {
        let (reply, rx) = oneshot::channel();
        let stopped = || {
            Error::new(
                ErrorKind::Closed,
                format!(
                    "the {} batching task stopped before answering (runtime shutting down, or \
                     its flush panicked): the outcome is unknown",
                    self.name
                ),
            )
        };
        self.tx.send(Item { item, reply }).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run<T, R, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Item<T, R>>,
    config: BatchConfig,
    flush: Arc<F>,
    name: &'static str,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<R>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(config.in_flight));
    loop {
        // A slot first: while every slot is busy, items keep queueing and the next
        // batch fills up by itself.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = Vec::with_capacity(config.max.min(64));
        batch.push(first);
        drain(&mut rx, &mut batch, config.max);
        if batch.len() < config.max {
            if config.linger.is_zero() {
                // Let the task that submitted this finish submitting its siblings.
                tokio::task::yield_now().await;
            } else {
                let until = crate::time::deadline_in(config.linger);
                while batch.len() < config.max {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            drain(&mut rx, &mut batch, config.max);
        }
        let flush = flush.clone();
        tokio::spawn(async move {
            let (items, replies): (Vec<T>, Vec<_>) =
                batch.into_iter().map(|i| (i.item, i.reply)).unzip();
            let n = items.len();
            let results = flush(items).await;
            let got = results.len();
            let mut results = results.into_iter();
            for reply in replies {
                let result = results.next().unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Backend,
                        format!("{name}: the flush returned {got} results for {n} items"),
                    ))
                });
                // The caller may have stopped waiting (cancelled): nothing to tell.
                let _ = reply.send(result);
            }
            drop(slot);
        });
    }
}

/// Take what is already queued, up to `max` in the batch.
fn drain<T, R>(
    rx: &mut mpsc::UnboundedReceiver<Item<T, R>>,
    batch: &mut Vec<Item<T, R>>,
    max: usize,
) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// Every batch the flush saw (its items) and when, relative to `start`.
    type Seen = Arc<Mutex<Vec<(Duration, Vec<u32>)>>>;

    /// A batcher whose flush records each batch, waits `work`, and answers `Ok(i)`
    /// for even items and `LeaseExpired` for odd ones.
    fn recording(config: BatchConfig, work: Duration) -> (Batcher<u32, u32>, Seen) {
        let seen: Seen = Arc::default();
        let start = Instant::now();
        let s = seen.clone();
        let batcher = Batcher::spawn("test", config, move |items: Vec<u32>| {
            s.lock().unwrap().push((start.elapsed(), items.clone()));
            async move {
                tokio::time::sleep(work).await;
                items
                    .into_iter()
                    .map(|i| {
                        if i % 2 == 0 {
                            Ok(i)
                        } else {
                            Err(Error::new(ErrorKind::LeaseExpired, format!("odd {i}")))
                        }
                    })
                    .collect()
            }
        });
        (batcher, seen)
    }

    async fn submit_all(b: &Batcher<u32, u32>, items: std::ops::Range<u32>) -> Vec<Result<u32>> {
        futures::future::join_all(items.map(|i| b.submit(i))).await
    }

    fn sizes(seen: &Seen) -> Vec<usize> {
        seen.lock().unwrap().iter().map(|(_, b)| b.len()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_caller_gets_its_own_result() {
        let (b, _) = recording(BatchConfig::new(10), Duration::from_millis(1));
        let results = submit_all(&b, 0..25).await;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => assert_eq!(v as usize, i),
                Err(e) => {
                    assert_eq!(i % 2, 1, "{i}: {e}");
                    assert_eq!(e.kind(), ErrorKind::LeaseExpired);
                    assert_eq!(e.message(), format!("odd {i}"));
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_max_items_without_waiting_out_the_linger() {
        let (b, seen) = recording(
            BatchConfig::new(10).linger(Duration::from_secs(60)),
            Duration::ZERO,
        );
        let start = Instant::now();
        let results = submit_all(&b, 0..20).await;
        assert_eq!(results.len(), 20);
        assert_eq!(sizes(&seen), vec![10, 10]);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_after_linger_with_what_arrived_meanwhile() {
        let linger = Duration::from_millis(50);
        let (b, seen) = recording(BatchConfig::new(10).linger(linger), Duration::ZERO);
        let early = {
            let b = b.clone();
            tokio::spawn(async move {
                let first = b.submit(0);
                let later = async {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    b.submit(2).await
                };
                tokio::join!(first, later)
            })
        };
        // After the first batch closed: a batch of its own.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let late = b.submit(4).await.unwrap();
        let (first, later) = early.await.unwrap();
        assert_eq!((first.unwrap(), later.unwrap(), late), (0, 2, 4));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].1, vec![0, 2]);
        assert_eq!(seen[0].0, linger, "flushed when the linger ran out");
        assert_eq!(seen[1].1, vec![4]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_linger_joins_items_submitted_together() {
        let (b, seen) = recording(BatchConfig::new(100), Duration::from_millis(1));
        let start = Instant::now();
        submit_all(&b, 0..7).await;
        assert_eq!(sizes(&seen), vec![7]);
        assert_eq!(seen.lock().unwrap()[0].0, Duration::ZERO, "no waiting");
        assert_eq!(start.elapsed(), Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn batches_in_flight_are_bounded_and_queued_items_fill_the_next() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let b = {
            let (running, peak, sizes) = (running.clone(), peak.clone(), sizes.clone());
            Batcher::spawn(
                "test",
                BatchConfig::new(10).in_flight(2),
                move |items: Vec<u32>| {
                    let (running, peak) = (running.clone(), peak.clone());
                    sizes.lock().unwrap().push(items.len());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        items.into_iter().map(|_| Ok(())).collect::<Vec<_>>()
                    }
                },
            )
        };
        // One at a time at first (each its own batch, as the task is idle), then a
        // burst while both slots are busy.
        let first = b.submit(0);
        let second = async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            b.submit(1).await
        };
        let burst = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            futures::future::join_all((2..27).map(|i| b.submit(i))).await
        };
        let (a, c, rest) = tokio::join!(first, second, burst);
        a.unwrap();
        c.unwrap();
        assert!(rest.into_iter().all(|r| r.is_ok()));
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 27);
        // The burst waited for a slot and went out in full batches.
        assert_eq!(&sizes[sizes.len() - 3..], &[10, 10, 5], "{sizes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn missing_results_are_backend_errors() {
        let b = Batcher::spawn(
            "short",
            BatchConfig::new(10),
            |items: Vec<u32>| async move { items.into_iter().take(1).map(Ok).collect::<Vec<_>>() },
        );
        let (a, c) = tokio::join!(b.submit(7), b.submit(8));
        assert_eq!(a.unwrap(), 7);
        let e = c.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.message().contains("short"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_submit_is_still_flushed_and_disturbs_no_one() {
        let (b, seen) = recording(
            BatchConfig::new(10).linger(Duration::from_millis(20)),
            Duration::from_millis(5),
        );
        // Polled once (so it was submitted), then dropped mid-wait.
        let cancelled = tokio::time::timeout(Duration::from_millis(1), b.submit(0)).await;
        assert!(cancelled.is_err(), "still waiting when dropped");
        let (x, y) = tokio::join!(b.submit(2), b.submit(3));
        assert_eq!(x.unwrap(), 2);
        assert_eq!(y.unwrap_err().kind(), ErrorKind::LeaseExpired);
        let all: Vec<u32> = seen
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, b)| b.clone())
            .collect();
        assert_eq!(all, vec![0, 2, 3]);
        // Never polled: never submitted.
        drop(b.submit(9));
        b.submit(4).await.unwrap();
        assert!(!seen.lock().unwrap().iter().any(|(_, b)| b.contains(&9)));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_last_handle_flushes_what_was_submitted() {
        let (b, seen) = recording(
            BatchConfig::new(10).linger(Duration::from_secs(5)),
            Duration::ZERO,
        );
        let start = Instant::now();
        // Submitted (polled once), then its caller stops waiting and the last handle
        // goes: the batch closes at once instead of lingering, and is flushed.
        let _ = tokio::time::timeout(Duration::from_millis(1), b.submit(6)).await;
        drop(b);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].1, vec![6]);
        assert!(
            seen[0].0 < Duration::from_secs(1),
            "flushed after {:?}",
            seen[0].0
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_flush_answers_closed_not_never() {
        let b = Batcher::spawn("boom", BatchConfig::new(10), |items: Vec<u32>| async move {
            if items.contains(&13) {
                panic!("flush failed");
            }
            items.into_iter().map(Ok).collect::<Vec<_>>()
        });
        let e = b.submit(13).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed);
        assert!(e.message().contains("boom"), "{e}");
        // The task is still there for the next batch.
        assert_eq!(b.submit(1).await.unwrap(), 1);
    }
}

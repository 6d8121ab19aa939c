//! One batching helper for the per-message calls that have a batch form
//! (`DeleteMessage` → `DeleteMessageBatch`, `ChangeMessageVisibility` →
//! `ChangeMessageVisibilityBatch`): callers submit one entry and wait for its own
//! result; a task gathers what arrives within `linger` of the first entry (and
//! whatever queued up meanwhile) into calls of at most 10, a few calls in flight at
//! once. A caller's future returns only once its batch was applied, so an `ack()`
//! that returned `Ok` means the message is deleted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::{Error, ErrorKind, Result};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::client::MAX_BATCH;

/// Batches in flight at once: keeps the connection busy while one is on the wire,
/// and lets entries pile up into full batches under load.
const IN_FLIGHT: usize = 4;

struct Request<T> {
    entry: T,
    reply: oneshot::Sender<Result<()>>,
}

/// Submits entries of type `T` to a flushing task.
pub(crate) struct Batcher<T> {
    tx: mpsc::UnboundedSender<Request<T>>,
    what: &'static str,
}

impl<T> std::fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("what", &self.what).finish()
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Start the task. `flush` sends one batch (≤ 10 entries) and returns one result
    /// per entry, in order. The task ends when the last `Batcher` handle is dropped,
    /// after flushing what was submitted.
    pub(crate) fn spawn<F, Fut>(what: &'static str, linger: Duration, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<()>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, linger, Arc::new(flush), what));
        Batcher { tx, what }
    }

    /// Submit `entry` and wait until its batch was applied.
    pub(crate) async fn submit(&self, entry: T) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let stopped = || {
            Error::new(
                ErrorKind::Closed,
                format!("the {} task of this consumer stopped", self.what),
            )
        };
        self.tx
            .send(Request { entry, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run<T, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Request<T>>,
    linger: Duration,
    flush: Arc<F>,
    what: &'static str,
) where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<()>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        if linger.is_zero() {
            // Let the task that submitted this finish submitting its siblings.
            tokio::task::yield_now().await;
        } else {
            let until = ferrymq_core::time::deadline_in(linger);
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(req)) => batch.push(req),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let flush = flush.clone();
        tokio::spawn(async move {
            let (entries, replies): (Vec<T>, Vec<_>) =
                batch.into_iter().map(|r| (r.entry, r.reply)).unzip();
            let n = entries.len();
            let results = flush(entries).await;
            let got = results.len();
            let mut results = results.into_iter();
            for reply in replies {
                let result = results.next().unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Backend,
                        format!("{what}: {got} results for {n} entries"),
                    ))
                });
                let _ = reply.send(result);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_submits_share_calls_and_get_their_own_results() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let batcher = Arc::new(Batcher::spawn(
            "test",
            Duration::from_millis(20),
            move |entries: Vec<u32>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    entries
                        .into_iter()
                        .map(|e| {
                            if e % 2 == 0 {
                                Ok(())
                            } else {
                                Err(Error::new(ErrorKind::LeaseExpired, "odd"))
                            }
                        })
                        .collect()
                }
            },
        ));
        let mut tasks = Vec::new();
        for i in 0..25u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { (i, b.submit(i).await) }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(r.is_ok(), i % 2 == 0, "{i}");
        }
        let n = calls.load(Ordering::SeqCst);
        assert!((3..=6).contains(&n), "{n} calls for 25 entries");
    }
}

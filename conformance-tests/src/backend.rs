//! The factory a backend hands to the suite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::middleware::{DedupStore, MemoryDedupStore};
use ferrymq_core::{Capabilities, Consumer, Error, ErrorKind, Producer, Result};

/// Opens producers and consumers on fresh queues of one backend, configured for
/// testing.
///
/// The suite never matches on backend names: what a case checks is decided by
/// [`capabilities`](Backend::capabilities), and what the factory chooses (a short
/// visibility timeout, a server address) is read back from there.
///
/// Contract the cases rely on:
///
/// - Queue names come from [`queue_name`](Backend::queue_name) and are never reused,
///   so a queue starts empty. The factory creates the queue on first use.
/// - Every [`consumer`](Backend::consumer) call returns a new, independent consumer
///   of the queue; consumers of one queue *compete* (one consumer group). A consumer
///   receives messages sent before it was created.
/// - [`capabilities`](Backend::capabilities) equals what the producers and consumers
///   it opens report. Choose a short visibility timeout (about 1–2 s): cases wait for
///   it to pass, and every case must finish in seconds.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for reports, such as `memory` or `redis`.
    fn name(&self) -> &str;

    /// Where and how the suite is running, printed once before the run (for example
    /// the server URL with credentials redacted, and the server version).
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// What queues opened by this factory can do. Decides which cases apply.
    fn capabilities(&self) -> Capabilities;

    /// A new producer on `queue`.
    async fn producer(&self, queue: &str) -> Result<Box<dyn Producer>>;

    /// A new consumer on `queue`, competing with every other consumer of it.
    async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>>;

    /// A producer and a consumer on `queue`.
    async fn open(&self, queue: &str) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        Ok((self.producer(queue).await?, self.consumer(queue).await?))
    }

    /// A producer and a consumer on `queue`, configured to hold at most `capacity`
    /// un-acked messages. Only called when [`Capabilities::bounded`] is claimed; the
    /// default answers `Unsupported`, which fails that case.
    async fn open_bounded(
        &self,
        queue: &str,
        capacity: usize,
    ) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        let _ = (queue, capacity);
        Err(Error::new(
            ErrorKind::Unsupported,
            "the capabilities claim `bounded`, but this factory does not implement \
             Backend::open_bounded",
        ))
    }

    /// Delete `queue` and everything in it; called after each case for every queue
    /// the case named. The default keeps the queue.
    async fn cleanup(&self, queue: &str) -> Result<()> {
        let _ = queue;
        Ok(())
    }

    /// The dedup store the Dedup middleware cases use for `queue`: the backend's own
    /// shared store where it has one (Redis), so the cases prove that store; the
    /// default is the in-process [`MemoryDedupStore`].
    async fn dedup_store(&self, queue: &str) -> Result<Arc<dyn DedupStore>> {
        let _ = queue;
        Ok(Arc::new(MemoryDedupStore::new(Duration::from_secs(600))))
    }

    /// How late this backend's timers may fire: visibility timeouts, delays and nack
    /// delays are allowed to come due up to this much after their time (never before).
    fn timer_slack(&self) -> Duration {
        Duration::from_millis(500)
    }

    /// A fresh queue name for a case called `label`. Override to add what the backend
    /// needs, such as SQS FIFO's `.fifo` suffix.
    fn queue_name(&self, label: &str) -> String {
        unique_queue_name(label)
    }
}

/// A queue name no other run, process or case uses:
/// `fmq-<label>-<pid>-<counter>-<random>`.
///
/// Only ASCII letters, digits, `-` and `_`, at most 64 bytes, so it is valid as an
/// SQS queue name (with room for `.fifo`), a Kafka topic, and a Redis key part. The
/// label is truncated to 32 bytes and anything outside that set becomes `_`.
///
/// ```
/// let a = ferrymq_conformance::unique_queue_name("round_trip");
/// let b = ferrymq_conformance::unique_queue_name("round_trip");
/// assert_ne!(a, b);
/// assert!(a.starts_with("fmq-round_trip-"));
/// ```
pub fn unique_queue_name(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let label: String = label
        .chars()
        .take(32)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "fmq-{label}-{}-{n}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_portable() {
        let names: std::collections::HashSet<String> = (0..1000)
            .map(|_| unique_queue_name("a very long label: with spaces/and.dots and more"))
            .collect();
        assert_eq!(names.len(), 1000);
        for name in names {
            assert!(name.len() <= 64, "{name}");
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}

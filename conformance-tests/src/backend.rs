//! The factory a backend hands to the suite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::admin::Admin;
use ferrymq_core::middleware::{DedupStore, MemoryDedupStore};
use ferrymq_core::{Capabilities, Consumer, Error, ErrorKind, Producer, Result};

use crate::registry::Case;

/// Opens producers and consumers on fresh queues of one backend, configured for
/// testing.
///
/// The suite never matches on backend names: what a case checks is decided by
/// [`capabilities`](Backend::capabilities) (and by what the harness probes, see
/// [`Claims`](crate::Claims)), and what the factory chooses (a short visibility
/// timeout, a server address) is read back from there.
///
/// Contract the cases rely on:
///
/// - Queue names come from [`queue_name`](Backend::queue_name) and are never reused,
///   so a queue starts empty. The factory creates the queue on first use.
/// - **The queue exists when [`consumer`](Backend::consumer) returns**, and the
///   consumer is ready to be handed messages: a message sent after `consumer()`
///   returned is delivered to it (cases send right after opening). For a backend
///   with consumer groups this means the consumer has **joined its group and holds
///   its assignment** before it is returned (Kafka: the first rebalance finished and
///   partitions are assigned, with the group's start offset at the beginning of the
///   fresh topic), so no case races a rebalance that would deliver nothing, or
///   deliver a message twice, in its first seconds.
/// - Every [`consumer`](Backend::consumer) call returns a new, independent consumer
///   of the queue; consumers of one queue *compete* (one consumer group). A consumer
///   receives messages sent before it was created.
/// - [`capabilities`](Backend::capabilities) equals what the producers and consumers
///   it opens report. Choose a short visibility timeout (about 1–2 s): cases wait for
///   it to pass, and every case must finish in seconds.
/// - [`admin`](Backend::admin) answers for the queue it names; the harness asks it
///   at setup which operations it supports, and the admin cases apply only to those
///   (reported by name as not applicable otherwise).
/// - A case the backend's **server** is known to fail can be listed in
///   [`known_defects`](Backend::known_defects) with the evidence; it is then
///   reported as `ignored (server defect: <evidence>)` — never passed — and still
///   runs with `--ignored` / `--include-ignored`, to see whether the server was
///   fixed.
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

    /// A new consumer on `queue`, competing with every other consumer of it. The
    /// queue exists when it returns, and a consumer of a group has joined the group
    /// and holds its assignment (see the contract above).
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

    /// The administration of `queue`. The default answers `Unsupported`: the admin
    /// cases are then reported as not applicable. The harness probes which
    /// operations the admin answers (see [`AdminOps::probe`](crate::AdminOps::probe)),
    /// so an admin that gains an operation makes its case apply with no other change.
    async fn admin(&self, queue: &str) -> Result<Box<dyn Admin>> {
        let _ = queue;
        Err(Error::unsupported(format!(
            "the {} conformance factory offers no Admin",
            self.name()
        )))
    }

    /// Cases of this backend alone, run and listed with the shared ones (a Redis case
    /// about its key layout, a Kafka case about rebalances). Their names must differ
    /// from every shared case's. They get the same [`Context`](crate::Context), and
    /// reach the concrete factory through [`Context::backend_as`](crate::Context::backend_as).
    fn extra_cases(&self) -> Vec<Case> {
        Vec::new()
    }

    /// Cases this backend's server is known to fail, each with the evidence (the
    /// server's issue, version, the observed behaviour): `(case name, evidence)`.
    ///
    /// Such a case is reported as `ignored (server defect: <evidence>)`, never as a
    /// pass, and runs anyway under `--ignored` / `--include-ignored`. Only for
    /// defects of the server that ferrymq cannot work around; a defect of the
    /// backend's own code fails its case until fixed. A name that is not a case of
    /// the run, or empty evidence, fails the whole run.
    fn known_defects(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    /// How long an approximate depth ([`Accuracy::Approximate`]) may take to show a
    /// change; the bound of the eventually-true depth checks. Unused when depth is
    /// exact.
    ///
    /// [`Accuracy::Approximate`]: ferrymq_core::Accuracy::Approximate
    fn approximate_depth_lag(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// The factory as `Any`, for backend-specific cases that need the concrete type
    /// ([`Context::backend_as`](crate::Context::backend_as)). Implement it as
    /// `Some(self)`; the default is `None`.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
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

//! The in-memory backend with one promise broken on purpose: each new case must pass
//! on the healthy backend and fail on the one that breaks what it checks, which shows
//! the case can fail (and keeps showing it).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::admin::{Admin, Peeked, QueueInfo};
use ferrymq_core::memory::{
    delete_queue, MemoryAdmin, MemoryConfig, MemoryConsumer, MemoryProducer,
};
use ferrymq_core::{
    Ack, AckHandle, Capabilities, Consumer, Delivery, Depth, ErrorKind, Message, Producer, Result,
    SendReceipt,
};
use tokio::time::Instant;

use crate::backend::Backend;
use crate::claims::Claims;
use crate::harness;
use crate::registry::case;

const VISIBILITY: Duration = Duration::from_secs(1);

/// The promise broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flaw {
    /// Nothing: the memory backend as it is.
    Healthy,
    /// `release` is a nack: it counts an attempt.
    ReleaseCounts,
    /// `release` answers `Ok` and gives nothing back: the lease runs out.
    ReleaseLapses,
    /// A delay past `max_delay` is dropped, the message sent at once.
    DelayUnchecked,
    /// `extend` adds the extension to `Instant::now()` (panics on `Duration::MAX`).
    ExtendOverflows,
    /// A nack delay past `max_nack_delay` is accepted — by acking (message lost).
    HugeNackAccepted,
    /// A settle through a stale handle answers `Ok` instead of `LeaseExpired`.
    StaleSettleSucceeds,
    /// Deliveries report a lease deadline one visibility timeout too late.
    LeaseDeadlineLate,
    /// `peek` receives the messages (leasing them, spending an attempt).
    PeekLeases,
    /// `purge` removes nothing and says so.
    PurgeNothing,
}

pub(crate) struct Broken {
    flaw: Flaw,
    caps: Capabilities,
}

impl Broken {
    pub(crate) fn new(flaw: Flaw) -> Self {
        let probe = crate::unique_queue_name("broken-probe");
        let caps = config(&probe)
            .producer()
            .map(|p| p.capabilities().clone())
            .unwrap_or_else(|_| Capabilities::minimal("memory"));
        delete_queue(&probe);
        Broken { flaw, caps }
    }
}

fn config(queue: &str) -> MemoryConfig {
    MemoryConfig::new(queue).visibility_timeout(VISIBILITY)
}

#[async_trait]
impl Backend for Broken {
    fn name(&self) -> &str {
        "broken-memory"
    }
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }
    async fn producer(&self, queue: &str) -> Result<Box<dyn Producer>> {
        Ok(Box::new(BrokenProducer {
            inner: config(queue).producer()?,
            flaw: self.flaw,
        }))
    }
    async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(BrokenConsumer {
            inner: config(queue).consumer()?,
            flaw: self.flaw,
            caps: Arc::new(self.caps.clone()),
        }))
    }
    async fn admin(&self, queue: &str) -> Result<Box<dyn Admin>> {
        Ok(Box::new(BrokenAdmin {
            inner: config(queue).admin(),
            queue: queue.to_string(),
            flaw: self.flaw,
        }))
    }
    async fn cleanup(&self, queue: &str) -> Result<()> {
        delete_queue(queue);
        Ok(())
    }
    fn timer_slack(&self) -> Duration {
        Duration::from_millis(250)
    }
}

#[derive(Debug)]
struct BrokenProducer {
    inner: MemoryProducer,
    flaw: Flaw,
}

impl BrokenProducer {
    fn bend(&self, mut m: Message) -> Message {
        if self.flaw == Flaw::DelayUnchecked
            && self
                .inner
                .capabilities()
                .check_delay(m.get_delay())
                .is_err()
        {
            m.clear_delay();
        }
        m
    }
}

#[async_trait]
impl Producer for BrokenProducer {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.inner.send(self.bend(message)).await
    }
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        let messages = messages.into_iter().map(|m| self.bend(m)).collect();
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

#[derive(Debug)]
struct BrokenConsumer {
    inner: MemoryConsumer,
    flaw: Flaw,
    caps: Arc<Capabilities>,
}

#[async_trait]
impl Consumer for BrokenConsumer {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let ds = self.inner.receive(max, wait).await?;
        Ok(ds
            .into_iter()
            .map(|d| {
                let (message, meta, inner) = d.into_parts();
                let deadline = inner.lease_deadline();
                let ack = BrokenAck {
                    inner,
                    flaw: self.flaw,
                    caps: self.caps.clone(),
                };
                let handle = match deadline {
                    Some(at) if self.flaw == Flaw::LeaseDeadlineLate => {
                        AckHandle::with_lease(ack, at + VISIBILITY)
                    }
                    Some(at) => AckHandle::with_lease(ack, at),
                    None => AckHandle::new(ack),
                };
                Delivery::new(message, meta, handle).with_capabilities(self.caps.clone())
            })
            .collect())
    }
    async fn depth(&self) -> Result<Depth> {
        self.inner.depth().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
}

#[derive(Debug)]
struct BrokenAck {
    inner: AckHandle,
    flaw: Flaw,
    caps: Arc<Capabilities>,
}

impl BrokenAck {
    fn stale_ok(&self, r: Result<()>) -> Result<()> {
        match r {
            Err(e)
                if e.kind() == ErrorKind::LeaseExpired
                    && self.flaw == Flaw::StaleSettleSucceeds =>
            {
                Ok(())
            }
            other => other,
        }
    }
}

#[async_trait]
impl Ack for BrokenAck {
    async fn ack(&self) -> Result<()> {
        let r = self.inner.ack().await;
        self.stale_ok(r)
    }
    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        if self.flaw == Flaw::HugeNackAccepted
            && self.caps.check_nack_delay(redeliver_after).is_err()
        {
            return self.inner.ack().await;
        }
        let r = self.inner.nack(redeliver_after).await;
        self.stale_ok(r)
    }
    async fn extend(&self, by: Duration) -> Result<()> {
        if self.flaw == Flaw::ExtendOverflows {
            #[allow(clippy::arithmetic_side_effects)]
            let until = Instant::now() + by;
            let _ = until;
        }
        self.inner.extend(by).await
    }
    async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        let r = match self.flaw {
            Flaw::ReleaseCounts => self.inner.nack(redeliver_after).await,
            Flaw::ReleaseLapses => Ok(()),
            _ => self.inner.release(redeliver_after).await,
        };
        self.stale_ok(r)
    }
    fn is_live(&self) -> bool {
        // The inner handle is settled whenever the outer one is; only its clock and
        // its backend matter here.
        true
    }
}

struct BrokenAdmin {
    inner: MemoryAdmin,
    queue: String,
    flaw: Flaw,
}

#[async_trait]
impl Admin for BrokenAdmin {
    fn backend(&self) -> &'static str {
        "broken-memory"
    }
    fn queue(&self) -> &str {
        &self.queue
    }
    async fn describe(&self) -> Result<QueueInfo> {
        self.inner.describe().await
    }
    async fn purge(&self) -> Result<u64> {
        if self.flaw == Flaw::PurgeNothing {
            return Ok(0);
        }
        self.inner.purge().await
    }
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        if self.flaw == Flaw::PeekLeases {
            let ds = config(&self.queue)
                .consumer()?
                .receive(max, Duration::ZERO)
                .await?;
            return Ok(ds
                .into_iter()
                .map(|d| Peeked::new(d.id().to_string(), None, d.message().clone()))
                .collect());
        }
        self.inner.peek(max).await
    }
}

fn runtime() -> Arc<tokio::runtime::Runtime> {
    Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime"),
    )
}

/// Run `name` on the healthy backend (must pass) and on one with `flaw` (must fail);
/// the failure message.
pub(crate) fn passes_then_fails(name: &'static str, flaw: Flaw) -> String {
    let rt = runtime();
    let c = *case(name).unwrap_or_else(|| panic!("no case {name}"));
    let run = |flaw: Flaw| {
        let backend: Arc<dyn Backend> = Arc::new(Broken::new(flaw));
        let claims = rt
            .block_on(Claims::probe(&*backend))
            .unwrap_or_else(|e| panic!("probe: {e}"));
        assert_eq!(c.applies(&claims), Ok(()), "{name} must apply to memory");
        harness::run_case(&rt, backend, claims, c)
            .map_err(|e| e.message().unwrap_or("failed").to_string())
    };
    if let Err(e) = run(Flaw::Healthy) {
        panic!("{name} fails on the healthy memory backend: {e}");
    }
    match run(flaw) {
        Ok(()) => panic!("{name} passed on a backend with {flaw:?}: it cannot catch that"),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, flaw: Flaw, expect: &str) {
        let e = passes_then_fails(name, flaw);
        eprintln!("{name} on {flaw:?}: {e}");
        assert!(
            e.contains(expect),
            "{name} on {flaw:?} failed, but not as expected: {e}"
        );
    }

    #[test]
    fn release_does_not_count_an_attempt_catches_a_counting_release() {
        check(
            "release_does_not_count_an_attempt",
            Flaw::ReleaseCounts,
            "must not count",
        );
    }

    #[test]
    fn release_is_prompt_catches_a_release_that_lets_the_lease_run_out() {
        check(
            "release_is_prompt",
            Flaw::ReleaseLapses,
            "must come back at once",
        );
    }

    #[test]
    fn delay_beyond_max_delay_catches_an_unchecked_delay() {
        check(
            "delay_beyond_max_delay_is_unsupported",
            Flaw::DelayUnchecked,
            "expected a Unsupported error",
        );
    }

    #[test]
    fn huge_durations_catch_an_overflowing_extend_and_a_lost_message() {
        check(
            "huge_durations_never_panic",
            Flaw::ExtendOverflows,
            "case panicked",
        );
        check(
            "huge_durations_never_panic",
            Flaw::HugeNackAccepted,
            "accepted, though the capabilities set a limit",
        );
    }

    #[test]
    fn stale_handle_catches_a_settle_through_a_stale_handle() {
        check(
            "stale_handle_after_lease_gone_is_lease_expired",
            Flaw::StaleSettleSucceeds,
            "expected a LeaseExpired error",
        );
    }

    #[test]
    fn lease_deadline_catches_a_deadline_past_the_lease() {
        check(
            "lease_deadline_is_known",
            Flaw::LeaseDeadlineLate,
            "later than the visibility timeout",
        );
    }

    #[test]
    fn admin_peek_catches_a_peek_that_leases() {
        check(
            "admin_peek_has_no_side_effects",
            Flaw::PeekLeases,
            "a second peek saw other messages",
        );
    }

    #[test]
    fn admin_purge_catches_a_purge_that_removes_nothing() {
        check(
            "admin_purge_removes_waiting",
            Flaw::PurgeNothing,
            "purge reported 0 removed",
        );
    }
}

//! The in-memory backend: a faithful queue, not a channel.
//!
//! It is the zero-setup default (`memory://NAME`) and the reference the conformance
//! suite holds every other backend to, so it implements the full contract:
//!
//! - **visibility timeout**: an un-acked delivery comes back after the timeout, also
//!   when the [`Delivery`] is dropped; [`extend`](crate::Delivery::extend) pushes the
//!   deadline; [`nack`](crate::Delivery::nack) with a delay is not redelivered early;
//! - **per-message delay** and **priority** (higher first among ready messages);
//! - **per-key ordering**: while a message of key K is in flight, no later message of
//!   K is delivered (SQS FIFO message-group semantics);
//! - **dedup window** on [`Message::dedup_id`](crate::Message::dedup_id);
//! - **attempt counting**, **max message size** (`TooLarge`), **bounded capacity**
//!   (`QueueFull`), and **depth** counts.
//!
//! Queues are named and shared by every connection in the process. All timing uses
//! tokio's clock, so tests can run with a paused clock.

mod admin;
mod config;
mod queue;
mod registry;

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

pub use admin::{MemoryAdmin, MemoryDriver};
pub use config::MemoryConfig;
pub use registry::delete_queue;

use crate::capabilities::{Accuracy, Attempts, Capabilities, Ordering, Priority};
use crate::delivery::{Ack, Delivery, DeliveryMeta, Settle};
use crate::depth::Depth;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::producer::{Producer, SendReceipt};
use crate::Consumer;
use crate::MessageId;
use queue::{Enqueued, Queue};

/// Longest delay, nack delay and lease the in-memory queue schedules: a year. Longer
/// ones are refused with `Unsupported` (a process is not a place to keep a message
/// for longer).
pub const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn capabilities(config: &MemoryConfig) -> Capabilities {
    let mut caps = Capabilities::minimal("memory");
    caps.ordering = Ordering::PerKey;
    caps.max_delay = Some(MAX_DELAY);
    caps.dedup_window = Some(config.dedup_window);
    caps.visibility_timeout = Some(config.visibility_timeout);
    caps.max_visibility = Some(MAX_DELAY);
    caps.extend_visibility = true;
    caps.max_nack_delay = Some(MAX_DELAY);
    caps.release_keeps_attempt = true;
    caps.priority = Priority::Exact;
    caps.max_message_size = config.max_message_size;
    caps.max_batch = 10_000;
    caps.attempts = Attempts::Exact;
    caps.depth = Accuracy::Exact;
    caps.bounded = true;
    caps
}

/// Sends to a named in-memory queue.
#[derive(Clone)]
pub struct MemoryProducer {
    queue: Arc<Queue>,
    capabilities: Arc<Capabilities>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for MemoryProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryProducer")
            .field("queue", &self.queue.name)
            .finish_non_exhaustive()
    }
}

impl MemoryProducer {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        MemoryProducer {
            capabilities: queue.capabilities.clone(),
            queue,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::closed("producer"));
        }
        Ok(())
    }
}

fn receipt(enqueued: Enqueued) -> SendReceipt {
    match enqueued {
        Enqueued::New(seq) => SendReceipt::new(seq_id(seq)),
        Enqueued::Duplicate(seq) => SendReceipt::duplicate(seq_id(seq)),
    }
}

/// The decimal id of a sequence number, in one exact allocation (`to_string` goes
/// through the formatting machinery, several times the cost, twice per message).
fn seq_id(seq: u64) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = seq;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8.
    String::from(std::str::from_utf8(&digits[at..]).unwrap_or_default())
}

#[async_trait]
impl Producer for MemoryProducer {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.check_open()?;
        self.capabilities.check_delay(message.get_delay())?;
        let enqueued = {
            let mut state = self.queue.lock();
            let now = Instant::now();
            state.tick(now);
            state.enqueue(message, &self.queue.config, now, SystemTime::now())?
        };
        self.queue.ready_signal.notify_waiters();
        Ok(receipt(enqueued))
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.check_open()?;
        let results = {
            // One clock read per batch: its messages are enqueued at the same instant.
            let wall = SystemTime::now();
            let mut state = self.queue.lock();
            let now = Instant::now();
            state.tick(now);
            messages
                .into_iter()
                .map(|m| {
                    self.capabilities.check_delay(m.get_delay())?;
                    state.enqueue(m, &self.queue.config, now, wall).map(receipt)
                })
                .collect()
        };
        self.queue.ready_signal.notify_waiters();
        Ok(results)
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, AtomicOrdering::Release);
        Ok(())
    }

    async fn depth(&self) -> Result<Depth> {
        Ok(depth(&self.queue))
    }

    fn queue(&self) -> &str {
        &self.queue.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }
}

fn depth(queue: &Queue) -> Depth {
    let mut state = queue.lock();
    state.tick(Instant::now());
    state.depth()
}

/// Receives from a named in-memory queue.
#[derive(Clone)]
pub struct MemoryConsumer {
    queue: Arc<Queue>,
    capabilities: Arc<Capabilities>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("queue", &self.queue.name)
            .finish_non_exhaustive()
    }
}

impl MemoryConsumer {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        MemoryConsumer {
            capabilities: queue.capabilities.clone(),
            queue,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn delivery(&self, l: queue::Leased) -> Delivery {
        let meta = DeliveryMeta::new(
            MessageId::from(l.seq),
            l.attempt,
            l.enqueued_at,
            self.queue.name.clone(),
        );
        let ack = MemoryAck {
            queue: Arc::downgrade(&self.queue),
            seq: l.seq,
            slot: l.slot,
            receipt: l.receipt,
        };
        Delivery::leased(l.message, meta, self.capabilities.clone(), ack, l.deadline)
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = crate::time::deadline_in(wait);
        let max = max.max(1);
        loop {
            if self.closed.load(AtomicOrdering::Acquire) {
                return Err(Error::closed("consumer"));
            }
            // Register for the wake-up before looking, so a send between the look and
            // the wait is not missed.
            let signal = self.queue.ready_signal.notified();
            tokio::pin!(signal);
            signal.as_mut().enable();
            let now = Instant::now();
            let (leased, next_event) = {
                let mut state = self.queue.lock();
                state.tick(now);
                let leased = state.take(max, now, self.queue.config.visibility_timeout, |l| {
                    self.delivery(l)
                });
                (leased, state.next_event())
            };
            if !leased.is_empty() {
                return Ok(leased);
            }
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake_at = next_event.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                _ = &mut signal => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn depth(&self) -> Result<Depth> {
        Ok(depth(&self.queue))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, AtomicOrdering::Release);
        self.queue.ready_signal.notify_waiters();
        Ok(())
    }

    fn queue(&self) -> &str {
        &self.queue.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }
}

struct MemoryAck {
    /// Weak: the queue's entry holds this handle while the message is out (see
    /// `queue::Body`); a queue deleted and dropped by everyone leaves nothing to settle.
    queue: Weak<Queue>,
    seq: u64,
    /// Where the message sits in the queue's slab (the lease's receipt tells whether
    /// it is still this one).
    slot: usize,
    receipt: u64,
}

impl std::fmt::Debug for MemoryAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryAck")
            .field("queue", &self.queue.upgrade().map(|q| q.name.clone()))
            .field("seq", &self.seq)
            .finish()
    }
}

impl MemoryAck {
    fn queue(&self) -> Result<Arc<Queue>> {
        self.queue.upgrade().ok_or_else(|| {
            Error::new(
                ErrorKind::LeaseExpired,
                "the in-memory queue was deleted and no producer or consumer holds it any more",
            )
        })
    }

    fn ack_now(&self) -> Result<()> {
        let queue = self.queue()?;
        let woke = {
            let mut state = queue.lock();
            state.tick(Instant::now());
            state.ack(self.slot, self.receipt)?
        };
        // Acking the head of a key can make the next message of that key ready.
        if woke {
            queue.ready_signal.notify_waiters();
        }
        Ok(())
    }

    fn nack_now(&self, redeliver_after: Option<Duration>) -> Result<()> {
        let queue = self.queue()?;
        queue.capabilities.check_nack_delay(redeliver_after)?;
        {
            let mut state = queue.lock();
            let now = Instant::now();
            state.tick(now);
            state.nack(self.slot, self.receipt, now, redeliver_after)?;
        }
        queue.ready_signal.notify_waiters();
        Ok(())
    }

    fn extend_now(&self, by: Duration) -> Result<()> {
        if by > MAX_DELAY {
            return Err(Error::unsupported(format!(
                "an extension of {by:?} is longer than the in-memory queue's longest lease ({MAX_DELAY:?}); the lease is unchanged"
            )));
        }
        let queue = self.queue()?;
        let mut state = queue.lock();
        let now = Instant::now();
        state.tick(now);
        state.extend(self.slot, self.receipt, now, by)
    }

    fn release_now(&self, redeliver_after: Option<Duration>) -> Result<()> {
        let queue = self.queue()?;
        queue.capabilities.check_nack_delay(redeliver_after)?;
        {
            let mut state = queue.lock();
            let now = Instant::now();
            state.tick(now);
            state.release(self.slot, self.receipt, now, redeliver_after)?;
        }
        queue.ready_signal.notify_waiters();
        Ok(())
    }
}

/// Every settle is a few operations under the queue's lock, so [`Ack::settle_now`]
/// does them all; the async methods are there for callers of the trait itself.
#[async_trait]
impl Ack for MemoryAck {
    async fn ack(&self) -> Result<()> {
        self.ack_now()
    }

    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.nack_now(redeliver_after)
    }

    async fn extend(&self, by: Duration) -> Result<()> {
        self.extend_now(by)
    }

    async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.release_now(redeliver_after)
    }

    fn settle_now(&self, op: Settle) -> Option<Result<()>> {
        Some(match op {
            Settle::Ack => self.ack_now(),
            Settle::Nack(after) => self.nack_now(after),
            Settle::Release(after) => self.release_now(after),
            Settle::Extend(by) => self.extend_now(by),
            // A settle this queue does not know (added later): the async path says.
            #[allow(unreachable_patterns)]
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests;

//! What a backend can do. Middleware and the conformance suite read these instead of
//! matching on backend names, so a new backend is judged by what it claims.
//!
//! Every field is a promise the conformance suite checks: a backend claims only what
//! a passing case proves, and a case whose requirement is not claimed is reported by
//! name as not applicable.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Delivery-order guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ordering {
    /// No order is promised.
    None,
    /// Messages with the same key are delivered in send order, and no later message of
    /// a key is delivered while an earlier one is in flight — SQS FIFO message-group
    /// semantics, also across nacks: a nacked message is delivered again before any
    /// later message of its key.
    ///
    /// Raw SQS FIFO hands out several messages of one group in one receive; a backend
    /// claims `PerKey` only if it hands out one head per key at a time (the SQS
    /// backend keeps the rest of a group's run leased in a buffer of its own).
    PerKey,
    /// Messages with the same key are delivered in send order, but the next one is
    /// handed out while an earlier one is still in flight (Kafka: a partition is read
    /// sequentially, and several records of a key can be in a consumer's hands).
    ///
    /// A retry does **not** keep the order: a nacked message is redelivered after
    /// later messages of its key (Kafka retry topics). Handle one key at a time with
    /// [`Worker::ordered_by_key`](crate::Worker::ordered_by_key) to get per-key order
    /// with concurrency across keys.
    PerKeyPipelined,
}

impl Ordering {
    /// Whether a key's messages are handed out in send order (either per-key variant).
    pub fn keeps_key_order(self) -> bool {
        matches!(self, Ordering::PerKey | Ordering::PerKeyPipelined)
    }
}

/// How priority is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Priority {
    /// Priority is ignored.
    None,
    /// Among ready messages, a higher priority is always delivered first.
    Exact,
    /// Priorities are bucketed into this many levels; within a level order is FIFO.
    Levels(u8),
}

/// How [`Delivery::attempt`](crate::Delivery::attempt) is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attempts {
    /// Not counted: every delivery says 1.
    Untracked,
    /// Every delivery counts: nacks, expired leases, dropped deliveries.
    Exact,
    /// Counted by the broker, which may over-count (SQS `ApproximateReceiveCount`
    /// also counts receives whose response was lost).
    Approximate,
    /// Only nacks count (Kafka: a header counter on the retry copy); a delivery
    /// replayed after a crash or a rebalance says the same attempt again.
    NacksOnly,
}

impl Attempts {
    /// Whether a redelivery after a nack has a higher attempt than the delivery before.
    pub fn counts_nacks(self) -> bool {
        !matches!(self, Attempts::Untracked)
    }

    /// Whether a redelivery after an expired lease has a higher attempt.
    pub fn counts_expiry(self) -> bool {
        matches!(self, Attempts::Exact | Attempts::Approximate)
    }
}

/// How exact a count is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Accuracy {
    /// Not available: reported as zero.
    Unavailable,
    /// Exact at the moment it was read.
    Exact,
    /// Approximate or eventually consistent (SQS attributes, Kafka consumer lag).
    Approximate,
}

impl Accuracy {
    /// Whether the count is reported at all.
    pub fn is_available(self) -> bool {
        !matches!(self, Accuracy::Unavailable)
    }
}

/// The capabilities of one backend (possibly depending on the queue's config, such as
/// an SQS FIFO queue versus a standard one).
///
/// Built by backends from [`Capabilities::minimal`] and then refined field by field;
/// `#[non_exhaustive]`, so a new field is not a breaking change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Name of the backend, for reports (`memory`, `redis`, ...).
    pub backend: &'static str,
    /// Delivery-order guarantee.
    pub ordering: Ordering,
    /// Longest per-message delay honoured natively; `None` when delay is unsupported.
    /// A send with a longer delay (any delay, when `None`) is refused with
    /// [`ErrorKind::Unsupported`] and nothing is enqueued.
    pub max_delay: Option<Duration>,
    /// Broker-side dedup window for [`Message::dedup_id`](crate::Message::dedup_id);
    /// `None` when the broker does not deduplicate (use the Dedup middleware).
    pub dedup_window: Option<Duration>,
    /// Un-acked deliveries come back after this visibility timeout (also when the
    /// `Delivery` is dropped); `None` for backends without leases.
    pub visibility_timeout: Option<Duration>,
    /// Longest total time one delivery's lease can be extended to, counted from the
    /// receive (SQS: 12 h); `None` when unbounded. An extend past it is
    /// `Unsupported`.
    pub max_visibility: Option<Duration>,
    /// [`Ack::extend`](crate::Ack::extend) pushes the redelivery deadline.
    pub extend_visibility: bool,
    /// Longest delay [`Ack::nack`](crate::Ack::nack) honours (not redelivered early);
    /// `None` when a nack cannot delay (it redelivers at once). A longer nack delay
    /// is `Unsupported` and leaves the lease as it was.
    pub max_nack_delay: Option<Duration>,
    /// A nack with a delay holds back other messages until it is due (Kafka's
    /// pause + seek blocks its partition); middleware prefer short delays then.
    pub nack_delay_blocks: bool,
    /// [`Ack::release`](crate::Ack::release) gives a message back without counting
    /// a delivery attempt. When false, release is a `nack(None)` and counts.
    pub release_keeps_attempt: bool,
    /// How priority is honoured.
    pub priority: Priority,
    /// Largest message accepted, counted by [`Message::encoded_len`](crate::Message::encoded_len).
    pub max_message_size: usize,
    /// Largest native batch per call (send, receive, delete).
    pub max_batch: usize,
    /// How [`Delivery::attempt`](crate::Delivery::attempt) counts redeliveries.
    pub attempts: Attempts,
    /// How exact [`Consumer::depth`](crate::Consumer::depth) is.
    pub depth: Accuracy,
    /// The queue has a bound and refuses with `QueueFull` past it.
    pub bounded: bool,
    /// The broker dead-letters by itself after this many deliveries (SQS
    /// `maxReceiveCount`, Redis `max_deliveries`). RetryToDlq must decide before
    /// then, or the broker moves the message without the middleware's headers.
    pub native_dead_letter_after: Option<u32>,
}

impl Capabilities {
    /// A minimal capability set: nothing promised beyond send, receive and ack.
    pub fn minimal(backend: &'static str) -> Self {
        Capabilities {
            backend,
            ordering: Ordering::None,
            max_delay: None,
            dedup_window: None,
            visibility_timeout: None,
            max_visibility: None,
            extend_visibility: false,
            max_nack_delay: None,
            nack_delay_blocks: false,
            release_keeps_attempt: false,
            priority: Priority::None,
            max_message_size: 256 * 1024,
            max_batch: 1,
            attempts: Attempts::Untracked,
            depth: Accuracy::Unavailable,
            bounded: false,
            native_dead_letter_after: None,
        }
    }

    /// Whether a delay of `d` can be honoured natively.
    pub fn supports_delay(&self, d: Duration) -> bool {
        self.max_delay.is_some_and(|max| d <= max)
    }

    /// Whether a nack can delay redelivery by `d`.
    pub fn supports_nack_delay(&self, d: Duration) -> bool {
        self.max_nack_delay.is_some_and(|max| d <= max)
    }

    /// `Ok` when a message with this delay may be sent; `Unsupported` naming the
    /// limit otherwise. A zero delay (or none) is always fine. Backends call this
    /// before enqueueing anything.
    pub fn check_delay(&self, delay: Option<Duration>) -> Result<()> {
        match delay {
            None => Ok(()),
            Some(d) if d.is_zero() || self.supports_delay(d) => Ok(()),
            Some(d) => Err(Error::new(
                ErrorKind::Unsupported,
                match self.max_delay {
                    Some(max) => format!(
                        "a delay of {d:?} is longer than {} supports ({max:?}); nothing was enqueued",
                        self.backend
                    ),
                    None => format!(
                        "{} does not support delayed messages; nothing was enqueued",
                        self.backend
                    ),
                },
            )),
        }
    }

    /// `Ok` when a nack may delay redelivery by `delay`; `Unsupported` otherwise.
    pub fn check_nack_delay(&self, delay: Option<Duration>) -> Result<()> {
        match delay {
            None => Ok(()),
            Some(d) if d.is_zero() || self.supports_nack_delay(d) => Ok(()),
            Some(d) => Err(Error::new(
                ErrorKind::Unsupported,
                match self.max_nack_delay {
                    Some(max) => format!(
                        "a nack delay of {d:?} is longer than {} supports ({max:?}); the lease is unchanged",
                        self.backend
                    ),
                    None => format!(
                        "{} cannot delay a redelivery; nack without a delay, or release",
                        self.backend
                    ),
                },
            )),
        }
    }

    /// The longest nack delay the middleware should ask for: `wanted`, capped at
    /// [`max_nack_delay`](Self::max_nack_delay); `None` when the backend cannot
    /// delay a nack at all.
    pub fn clamp_nack_delay(&self, wanted: Duration) -> Option<Duration> {
        self.max_nack_delay.map(|max| wanted.min(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_limits_are_typed_errors() {
        let mut caps = Capabilities::minimal("test");
        assert!(caps.check_delay(None).is_ok());
        assert!(caps.check_delay(Some(Duration::ZERO)).is_ok());
        let e = caps.check_delay(Some(Duration::from_secs(1))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        caps.max_delay = Some(Duration::from_secs(60));
        assert!(caps.check_delay(Some(Duration::from_secs(60))).is_ok());
        let e = caps.check_delay(Some(Duration::MAX)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("nothing was enqueued"), "{e}");
    }

    #[test]
    fn nack_delay_is_clamped_or_refused() {
        let mut caps = Capabilities::minimal("test");
        assert_eq!(caps.clamp_nack_delay(Duration::from_secs(5)), None);
        assert!(caps.check_nack_delay(Some(Duration::from_secs(1))).is_err());
        caps.max_nack_delay = Some(Duration::from_secs(2));
        assert_eq!(
            caps.clamp_nack_delay(Duration::from_secs(5)),
            Some(Duration::from_secs(2))
        );
        assert!(caps.check_nack_delay(Some(Duration::MAX)).is_err());
    }
}

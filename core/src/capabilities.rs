//! What a backend can do. Middleware and the conformance suite read these instead of
//! matching on backend names, so a new backend is judged by what it claims.

use std::time::Duration;

/// Delivery-order guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ordering {
    /// No order is promised.
    None,
    /// Messages with the same key are delivered in send order, and no later message of
    /// a key is delivered while an earlier one is in flight (SQS FIFO group semantics).
    PerKey,
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

/// The capabilities of one backend (possibly depending on the queue's config, such as
/// an SQS FIFO queue versus a standard one).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Name of the backend, for reports (`memory`, `redis`, ...).
    pub backend: &'static str,
    /// Delivery-order guarantee.
    pub ordering: Ordering,
    /// Longest per-message delay honoured natively; `None` when delay is unsupported.
    pub max_delay: Option<Duration>,
    /// Broker-side dedup window for [`Message::dedup_id`](crate::Message::dedup_id);
    /// `None` when the broker does not deduplicate (use the Dedup middleware).
    pub dedup_window: Option<Duration>,
    /// Un-acked deliveries come back after this visibility timeout (also when the
    /// `Delivery` is dropped); `None` for backends without leases.
    pub visibility_timeout: Option<Duration>,
    /// [`Ack::extend`](crate::Ack::extend) pushes the redelivery deadline.
    pub extend_visibility: bool,
    /// [`Ack::nack`](crate::Ack::nack) with a delay is honoured: not redelivered early.
    pub nack_delay: bool,
    /// How priority is honoured.
    pub priority: Priority,
    /// Largest message accepted, counted by [`Message::encoded_len`](crate::Message::encoded_len).
    pub max_message_size: usize,
    /// Largest native batch per call (send, receive, delete).
    pub max_batch: usize,
    /// [`Delivery::attempt`](crate::Delivery::attempt) counts redeliveries.
    pub attempts: bool,
    /// Depth counts are reported by [`Consumer::depth`](crate::Consumer::depth).
    pub depth: bool,
    /// The queue has a bound and refuses with `QueueFull` past it.
    pub bounded: bool,
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
            extend_visibility: false,
            nack_delay: false,
            priority: Priority::None,
            max_message_size: 256 * 1024,
            max_batch: 1,
            attempts: false,
            depth: false,
            bounded: false,
        }
    }

    /// Whether a delay of `d` can be honoured natively.
    pub fn supports_delay(&self, d: Duration) -> bool {
        self.max_delay.is_some_and(|max| d <= max)
    }
}

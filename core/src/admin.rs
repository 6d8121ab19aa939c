//! Operations a team otherwise runs by hand against the broker: create, describe,
//! purge, peek, redrive, lag, offset reset.
//!
//! One object-safe trait for every backend. Each method answers
//! [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) unless the backend implements it, so a tool built on
//! [`Admin`] (the `ferry queue …` commands) works everywhere and says plainly what a
//! broker cannot do. An `Admin` is bound to one queue, the one its URL names, like a
//! producer or a consumer.
//!
//! ```
//! use ferrymq_core::admin::{Admin, QueueSpec};
//! use ferrymq_core::memory::MemoryConfig;
//! use ferrymq_core::{Message, Producer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let config = MemoryConfig::new("admin-doc");
//! let admin = config.admin();
//! admin.ensure(&QueueSpec::default()).await?;
//! config.producer()?.send(Message::new("look, don't touch")).await?;
//! let peeked = admin.peek(10).await?;
//! assert_eq!(peeked[0].message.payload().as_ref(), b"look, don't touch");
//! assert_eq!(admin.describe().await?.depth.waiting, 1, "peek has no side effects");
//! assert_eq!(admin.purge().await?, 1);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::depth::Depth;
use crate::error::{Error, Result};
use crate::message::Message;

/// How a queue should be created. Fields a backend has no use for are ignored;
/// `None` means the backend's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSpec {
    /// Kafka: partitions of the topic.
    pub partitions: Option<u32>,
    /// Kafka: replication factor.
    pub replication: Option<u16>,
    /// SQS: a FIFO queue (the name must end in `.fifo`).
    pub fifo: Option<bool>,
    /// SQS: the queue's default visibility timeout.
    pub visibility_timeout: Option<Duration>,
    /// SQS: how long messages are kept.
    pub retention: Option<Duration>,
    /// A native dead-letter queue and after how many receives the broker moves a
    /// message there (SQS `RedrivePolicy`).
    pub dead_letter: Option<DeadLetterPolicy>,
    /// Redis: priority levels.
    pub priority_levels: Option<u8>,
}

impl QueueSpec {
    /// A spec with every field at the backend's default.
    pub fn new() -> Self {
        QueueSpec::default()
    }

    /// Kafka partitions.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = Some(n);
        self
    }

    /// Kafka replication factor.
    pub fn replication(mut self, n: u16) -> Self {
        self.replication = Some(n);
        self
    }

    /// SQS FIFO.
    pub fn fifo(mut self, fifo: bool) -> Self {
        self.fifo = Some(fifo);
        self
    }

    /// Default visibility timeout.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = Some(d);
        self
    }

    /// Retention.
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = Some(d);
        self
    }

    /// Native dead-letter policy.
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = Some(policy);
        self
    }

    /// Redis priority levels.
    pub fn priority_levels(mut self, n: u8) -> Self {
        self.priority_levels = Some(n);
        self
    }
}

/// Where the broker itself moves a message that keeps failing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterPolicy {
    /// The dead-letter queue (name or URL, as the backend takes it).
    pub queue: String,
    /// Moved after this many receives.
    pub max_receives: u32,
}

impl DeadLetterPolicy {
    /// Move to `queue` after `max_receives` receives.
    pub fn new(queue: impl Into<String>, max_receives: u32) -> Self {
        DeadLetterPolicy {
            queue: queue.into(),
            max_receives,
        }
    }
}

/// What a queue is, as the broker and the backend see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Counts at the time of the call ([`Capabilities::depth`] says how exact).
    pub depth: Depth,
    /// What producers and consumers of the queue can do.
    pub capabilities: Capabilities,
    /// Backend-specific settings worth showing a person (`priority_levels`,
    /// `dlq_max_len`, partitions, redrive policy ...), in display order.
    pub settings: Vec<(String, String)>,
    /// Problems an operator should know of (a dead-letter stream that trims, an
    /// evicting memory policy ...).
    pub warnings: Vec<String>,
}

impl QueueInfo {
    /// Info with no settings and no warnings.
    pub fn new(name: impl Into<String>, depth: Depth, capabilities: Capabilities) -> Self {
        QueueInfo {
            name: name.into(),
            depth,
            capabilities,
            settings: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Add a setting to show.
    pub fn setting(mut self, name: impl Into<String>, value: impl fmt::Display) -> Self {
        self.settings.push((name.into(), value.to_string()));
        self
    }

    /// Add a warning.
    pub fn warning(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }
}

/// A message looked at without being received: no lease, no receive count, no
/// attempt spent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Peeked {
    /// The backend's id of the message.
    pub id: String,
    /// When it was enqueued (or dead-lettered, for a dead letter), where known.
    pub enqueued_at: Option<SystemTime>,
    /// The message, headers included.
    pub message: Message,
}

impl Peeked {
    /// A peeked message.
    pub fn new(id: impl Into<String>, enqueued_at: Option<SystemTime>, message: Message) -> Self {
        Peeked {
            id: id.into(),
            enqueued_at,
            message,
        }
    }
}

/// How far a redrive got; passed to the progress callback after each step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveProgress {
    /// Moved so far.
    pub moved: u64,
    /// What the redrive set out to move: the dead-letter count when it started (a
    /// snapshot, so messages that fail again and come back are not redriven twice in
    /// one run). `None` when the broker does not say.
    pub total: Option<u64>,
}

/// Receives redrive progress; called from the redriving task.
pub type ProgressFn<'a> = &'a (dyn Fn(RedriveProgress) + Send + Sync);

/// Where a group's offsets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OffsetReset {
    /// The oldest retained record.
    Earliest,
    /// After the newest record: skip everything there now.
    Latest,
    /// The first record at or after this time.
    Timestamp(SystemTime),
}

/// Consumer lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// Partition number (0 for backends without partitions).
    pub partition: i32,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// The partition's end offset.
    pub end: i64,
    /// `end - committed` (everything, when nothing was committed).
    pub lag: u64,
}

impl PartitionLag {
    /// Lag of one partition.
    pub fn new(partition: i32, committed: Option<i64>, end: i64, lag: u64) -> Self {
        PartitionLag {
            partition,
            committed,
            end,
            lag,
        }
    }
}

fn unsupported(backend: &str, what: &str) -> Error {
    Error::unsupported(format!("{backend} does not support {what}"))
}

/// Administration of one queue. Every method answers `Unsupported` by default.
#[async_trait]
pub trait Admin: Send + Sync {
    /// The backend's name, for messages.
    fn backend(&self) -> &'static str;

    /// The queue this admin manages.
    fn queue(&self) -> &str;

    /// Create the queue; `InvalidConfig` if it exists with other settings.
    async fn create(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let _ = spec;
        Err(unsupported(self.backend(), "creating queues"))
    }

    /// Create the queue unless it exists; describe it either way.
    async fn ensure(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let _ = spec;
        Err(unsupported(self.backend(), "creating queues"))
    }

    /// Delete the queue and everything in it. Returns whether it existed.
    async fn delete(&self) -> Result<bool> {
        Err(unsupported(self.backend(), "deleting queues"))
    }

    /// Depth, capabilities and settings of the queue.
    async fn describe(&self) -> Result<QueueInfo> {
        Err(unsupported(self.backend(), "describing queues"))
    }

    /// Remove every message that is not in flight. Returns how many went, where the
    /// backend knows.
    async fn purge(&self) -> Result<u64> {
        Err(unsupported(self.backend(), "purging queues"))
    }

    /// Up to `max` of the oldest waiting messages, without side effects: nothing
    /// leased, no receive count or attempt spent.
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        let _ = max;
        Err(unsupported(self.backend(), "peeking"))
    }

    /// Up to `max` of the oldest messages in the backend's own dead-letter store,
    /// without side effects.
    async fn peek_dead_letters(&self, max: usize) -> Result<Vec<Peeked>> {
        let _ = max;
        Err(unsupported(self.backend(), "a native dead-letter store"))
    }

    /// Move messages from the backend's own dead-letter store back into the queue:
    /// at most `limit` (all of the snapshot when `None`), counted from a snapshot of
    /// the store's size at the start, so a message that fails again is not redriven
    /// twice in one run. Reports progress after each step; returns how many moved.
    async fn redrive_dead_letters(
        &self,
        limit: Option<u64>,
        progress: ProgressFn<'_>,
    ) -> Result<u64> {
        let _ = (limit, progress);
        Err(unsupported(self.backend(), "native redrive"))
    }

    /// Consumer lag per partition of `group` (the configured group when `None`).
    async fn lag(&self, group: Option<&str>) -> Result<Vec<PartitionLag>> {
        let _ = group;
        Err(unsupported(self.backend(), "consumer lag"))
    }

    /// Move `group`'s committed offsets. The group must have no active members.
    async fn reset_offsets(&self, group: &str, to: OffsetReset) -> Result<()> {
        let _ = (group, to);
        Err(unsupported(self.backend(), "offset resets"))
    }
}

/// `Box<dyn Admin>` and `Arc<dyn Admin>` are admins too.
macro_rules! forward_admin {
    ($($wrapper:ident)::+) => {
        #[async_trait]
        impl<A: Admin + ?Sized> Admin for $($wrapper)::+<A> {
            fn backend(&self) -> &'static str {
                (**self).backend()
            }
            fn queue(&self) -> &str {
                (**self).queue()
            }
            async fn create(&self, spec: &QueueSpec) -> Result<QueueInfo> {
                (**self).create(spec).await
            }
            async fn ensure(&self, spec: &QueueSpec) -> Result<QueueInfo> {
                (**self).ensure(spec).await
            }
            async fn delete(&self) -> Result<bool> {
                (**self).delete().await
            }
            async fn describe(&self) -> Result<QueueInfo> {
                (**self).describe().await
            }
            async fn purge(&self) -> Result<u64> {
                (**self).purge().await
            }
            async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
                (**self).peek(max).await
            }
            async fn peek_dead_letters(&self, max: usize) -> Result<Vec<Peeked>> {
                (**self).peek_dead_letters(max).await
            }
            async fn redrive_dead_letters(
                &self,
                limit: Option<u64>,
                progress: ProgressFn<'_>,
            ) -> Result<u64> {
                (**self).redrive_dead_letters(limit, progress).await
            }
            async fn lag(&self, group: Option<&str>) -> Result<Vec<PartitionLag>> {
                (**self).lag(group).await
            }
            async fn reset_offsets(&self, group: &str, to: OffsetReset) -> Result<()> {
                (**self).reset_offsets(group, to).await
            }
        }
    };
}

forward_admin!(Box);
forward_admin!(std::sync::Arc);

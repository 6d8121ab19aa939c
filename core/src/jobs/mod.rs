//! Jobs: what happened to each message, its progress and its result, readable by id
//! and streamed as lifecycle events — BullMQ's job side over ferrymq's traits.
//!
//! A message handled through the [`TrackJobs`] layer is a *job*: a [`JobStore`]
//! records its [`JobState`] (waiting, active, completed, failed, dead-lettered), its
//! attempts, its result, the reason it failed and when each step happened, and emits
//! a [`JobEvent`] for each step (plus the handler's [`progress`] reports). Any
//! process holding a store of the same queue can read a job by id
//! ([`JobStore::get`]), count jobs per state ([`JobStore::counts`], with
//! [`JobCounts`] adding the queue's own [`Depth`](crate::Depth)) and follow the events
//! ([`JobStore::subscribe`], like BullMQ's `QueueEvents`).
//!
//! Stores: [`MemoryJobStore`] (in-process, for `memory://` and tests; events by
//! broadcast) and `ferrymq_redis::RedisJobStore` (hashes, a sorted set per state and
//! a bounded event stream, every step one Lua script). A store is independent of the
//! queue's backend: an SQS or Kafka worker may record its jobs in Redis.
//!
//! # Retention
//!
//! Nothing is kept by default: a job's record lives while it is waiting or active
//! and goes when it completes or fails. [`Keep`] says otherwise — `none`, the newest
//! `N`, or for an age — per queue ([`TrackJobsLayer::keep_completed`],
//! [`TrackJobsLayer::keep_failed`]) and per message ([`JobMessage::keep_completed`], a
//! header). Retention is always bounded: every store caps each state at
//! [`DEFAULT_MAX_PER_STATE`] records (the oldest go first), whatever the policies
//! say, so neither a long age nor records of crashed workers can grow memory without
//! limit. Failed and dead-lettered jobs share the `failed` policy (the dead-letter
//! queue is where a failed message itself lives).
//!
//! # What a state means
//!
//! | state | set when |
//! |---|---|
//! | `waiting` | sent through [`send`] (only if nothing is recorded yet), or given back for another attempt (retried, deferred): `failure` holds the last attempt's error |
//! | `active` | a handler started it (`attempts` = the delivery's attempt, `started_at`) |
//! | `completed` | the handler returned `Ok` and the message was acked; `result` holds what it returned |
//! | `failed` | the handler failed and nothing retried or dead-lettered it (the worker nacks it: it comes back after its nack delay) |
//! | `dead_lettered` | the retry middleware (or the broker) dead-lettered it: final |
//!
//! `completed` is recorded after the ack succeeded, so a completed job is never
//! delivered again — but a process killed between the ack and the record leaves the
//! job `active` (until the per-state cap trims it). A job's id is its
//! [`reserved::JOB_ID`](crate::reserved::JOB_ID) header, else its dedup id, else the
//! backend's message id (stable across redeliveries; the `id` of the send's
//! [`SendReceipt`]).
//!
//! ```
//! use std::time::Duration;
//! use ferrymq_core::jobs::{self, json_job_handler, JobMessage, JobState, Keep, MemoryJobStore, TrackJobsLayer};
//! use ferrymq_core::memory::MemoryConfig;
//! use ferrymq_core::{BoxError, Delivery, Message, Worker};
//! use tower::ServiceBuilder;
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//! #[derive(serde::Serialize)]
//! struct Invoice { order: u64, total: u64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (producer, consumer) = MemoryConfig::new("jobs-doc").connect()?;
//! let store = MemoryJobStore::new("jobs-doc");
//! jobs::send(&producer, &store, Message::json(&serde_json::json!({"id": 7}))?.job_id("order-7")).await?;
//!
//! let service = ServiceBuilder::new()
//!     .layer(TrackJobsLayer::new(store.clone()).keep_completed(Keep::Count(100)))
//!     .service(json_job_handler(|order: Order, _d: Delivery| async move {
//!         jobs::progress(50).await;
//!         Ok::<_, BoxError>(Invoice { order: order.id, total: 42 })
//!     }));
//! Worker::new(consumer).run_until(service, tokio::time::sleep(Duration::from_millis(50))).await?;
//!
//! let job = jobs::JobStore::get(&store, "order-7").await?.expect("kept");
//! assert_eq!(job.state, JobState::Completed);
//! assert_eq!(job.result, Some(serde_json::json!({"order": 7, "total": 42})));
//! # Ok(())
//! # }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod context;
pub mod flow;
mod memory;
mod track;
mod types;

#[cfg(test)]
mod tests;

pub use context::{current, progress, set_result, JobContext};
pub use flow::{
    children, ChildAcked, ChildOutcome, Flow, FlowChildren, FlowParent, FlowRecord, OnChildFailure,
    Release,
};
pub use memory::MemoryJobStore;
pub use track::{json_job_handler, JobJson, JobJsonFn, TrackJobs, TrackJobsLayer};
pub use types::{
    job_id_of, JobCounts, JobEvent, JobEventKind, JobMessage, JobRecord, JobState, JobUpdate, Keep,
    StoredCounts, DEFAULT_MAX_PER_STATE, MAX_VALUE_BYTES,
};

use std::fmt;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

use crate::delivery::Delivery;
use crate::error::Result;
use crate::message::Message;
use crate::producer::{Producer, SendReceipt};

/// A stream of lifecycle events from the moment of [`JobStore::subscribe`]. An
/// `Err` item says events were missed (a slow subscriber, a lost connection) or the
/// store failed; the stream goes on after it.
pub type JobEvents = Pin<Box<dyn Stream<Item = Result<JobEvent>> + Send + 'static>>;

/// Where job records of one queue live, and where their events are published.
///
/// [`record`](JobStore::record) applies one step atomically: the state change, the
/// retention (trimming, expiry, the per-state cap) and the event. Every method is
/// cheap enough to call per delivery.
#[async_trait]
pub trait JobStore: Send + Sync + fmt::Debug {
    /// The queue whose jobs this store holds.
    fn queue(&self) -> &str;

    /// Apply one step of a job's life (see [`JobUpdate`]) and emit its event.
    async fn record(&self, update: JobUpdate) -> Result<()>;

    /// Store `value` as the job's progress and emit a progress event of its
    /// `attempt`. A job with no record (never tracked, or already trimmed) gets the
    /// event only.
    async fn progress(&self, id: &str, attempt: u32, value: serde_json::Value) -> Result<()>;

    /// The job's record, if kept.
    async fn get(&self, id: &str) -> Result<Option<JobRecord>>;

    /// Up to `max` records in `state`, most recently updated first.
    async fn list(&self, state: JobState, max: usize) -> Result<Vec<JobRecord>>;

    /// How many records the store holds per state.
    async fn counts(&self) -> Result<StoredCounts>;

    /// Events from now on.
    async fn subscribe(&self) -> Result<JobEvents>;

    /// Record a [`Flow`]: its parent (not sent) and its children. A flow already
    /// recorded under the same parent id is left as it is.
    async fn create_flow(&self, flow: FlowRecord) -> Result<()> {
        Err(no_flows(self.queue(), &flow.parent))
    }

    /// Record how child `child` of flow `parent` ended, and say whether the parent
    /// is to be sent now (see [`Release`]) — one atomic step. Recording the same
    /// child again replaces its outcome; while the parent is released but not
    /// marked [sent](JobStore::parent_sent), the step that completes the flow
    /// answers `Send` again (the caller may have died before sending).
    async fn child_done(
        &self,
        parent: &str,
        child: &str,
        outcome: ChildOutcome,
    ) -> Result<Release> {
        let _ = (child, outcome);
        Err(no_flows(self.queue(), parent))
    }

    /// The parent of flow `parent` was sent: forget the flow, so no later step
    /// sends it again.
    async fn parent_sent(&self, parent: &str) -> Result<()> {
        Err(no_flows(self.queue(), parent))
    }

    /// Child `child` of flow `parent` completed with `result`: record it, send the
    /// parent through one of `parents` if this was the last missing result, and
    /// ack `delivery` — **all in one atomic step**, where this store and the
    /// delivery's backend can (Redis: the child's queue, this store and the parent's
    /// queue on one server — see the [flow module](flow)).
    ///
    /// `Ok(None)`: not here (another backend, another server, a producer of another
    /// kind); nothing was done, and the caller goes step by step
    /// ([`child_done`](Self::child_done), the send, [`parent_sent`](Self::parent_sent),
    /// then the ack). `Err`: the ack failed (the lease is gone, the server did not
    /// answer) and so did the step — both or neither. The default is `Ok(None)`.
    async fn ack_child_completed(
        &self,
        delivery: &Delivery,
        parent: &str,
        child: &str,
        result: Option<serde_json::Value>,
        parents: &[FlowParent],
    ) -> Result<Option<ChildAcked>> {
        let _ = (delivery, parent, child, result, parents);
        Ok(None)
    }
}

fn no_flows(queue: &str, parent: &str) -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::Unsupported,
        format!("the job store of {queue} keeps no flows (flow {parent:?})"),
    )
}

/// `Arc<dyn JobStore>` and `Box<dyn JobStore>` are stores too, so layers and tools
/// take either (as `Producer` does).
macro_rules! forward_job_store {
    ($($wrapper:ident)::+) => {
        #[async_trait]
        impl<T: JobStore + ?Sized> JobStore for $($wrapper)::+<T> {
            fn queue(&self) -> &str {
                (**self).queue()
            }
            async fn record(&self, update: JobUpdate) -> Result<()> {
                (**self).record(update).await
            }
            async fn progress(&self, id: &str, attempt: u32, value: serde_json::Value) -> Result<()> {
                (**self).progress(id, attempt, value).await
            }
            async fn get(&self, id: &str) -> Result<Option<JobRecord>> {
                (**self).get(id).await
            }
            async fn list(&self, state: JobState, max: usize) -> Result<Vec<JobRecord>> {
                (**self).list(state, max).await
            }
            async fn counts(&self) -> Result<StoredCounts> {
                (**self).counts().await
            }
            async fn subscribe(&self) -> Result<JobEvents> {
                (**self).subscribe().await
            }
            async fn create_flow(&self, flow: FlowRecord) -> Result<()> {
                (**self).create_flow(flow).await
            }
            async fn child_done(
                &self,
                parent: &str,
                child: &str,
                outcome: ChildOutcome,
            ) -> Result<Release> {
                (**self).child_done(parent, child, outcome).await
            }
            async fn parent_sent(&self, parent: &str) -> Result<()> {
                (**self).parent_sent(parent).await
            }
            async fn ack_child_completed(
                &self,
                delivery: &Delivery,
                parent: &str,
                child: &str,
                result: Option<serde_json::Value>,
                parents: &[FlowParent],
            ) -> Result<Option<ChildAcked>> {
                (**self)
                    .ack_child_completed(delivery, parent, child, result, parents)
                    .await
            }
        }
    };
}

forward_job_store!(std::sync::Arc);
forward_job_store!(Box);

/// Send `message` and record its job as `waiting` (unless a worker got to it
/// first). Returns the send's receipt; the job id is the message's
/// [`JOB_ID`](crate::reserved::JOB_ID) header, else its dedup id, else the
/// receipt's id.
///
/// A duplicate (dropped by the broker's dedup) records nothing. A record that fails
/// after the send succeeded is logged, not returned: the message is on its way, and
/// the worker records it `active` when it starts.
pub async fn send<P, S>(producer: &P, store: &S, message: Message) -> Result<SendReceipt>
where
    P: Producer + ?Sized,
    S: JobStore + ?Sized,
{
    let id = job_id_of(&message, None).map(str::to_string);
    let receipt = producer.send(message).await?;
    if receipt.is_duplicate() {
        return Ok(receipt);
    }
    let id = id.unwrap_or_else(|| receipt.id().to_string());
    if id.is_empty() {
        return Ok(receipt);
    }
    let update = JobUpdate::new(id.clone(), JobState::Waiting, 0).only_if_new();
    if let Err(e) = store.record(update).await {
        tracing::warn!(queue = store.queue(), job = %id, error = %e, "sent, but recording the job as waiting failed");
    }
    Ok(receipt)
}

//! Flows: a parent job that runs only after its children completed, with their
//! results (BullMQ's `FlowProducer`).
//!
//! [`Flow::add`] records the flow — the parent message, not sent yet, and its
//! children's ids — in a [`JobStore`], then sends each child with a
//! [`FLOW_PARENT`](reserved::FLOW_PARENT) header. The children's workers run
//! [`TrackJobs`](super::TrackJobs) with [`flows`](super::TrackJobsLayer::flows):
//! when a child completes, the layer records its result under the flow; the step
//! that records the last missing result releases the parent, which goes to its
//! queue with every child's result in its [`FLOW_CHILDREN`](reserved::FLOW_CHILDREN)
//! header. The parent's handler reads the results with [`children`].
//!
//! # What is guaranteed, and how
//!
//! - **The parent never runs before every child completed** (or failed, under
//!   [`OnChildFailure::Ignore`] / [`Continue`](OnChildFailure::Continue)): it is not
//!   on any queue before that.
//! - **No step is lost under a kill -9, and none is duplicated where the parent's
//!   queue deduplicates** — how depends on where the child, the store and the
//!   parent's queue live:
//!
//! | child's queue, flow store, parent's queue | a completed child's step | after a kill -9 |
//! |---|---|---|
//! | all on one Redis (`RedisJobStore`, `RedisProducer` in [`flows`](super::TrackJobsLayer::flows); on Redis Cluster: keys in one slot) | **one atomic step with the child's ack** ([`JobStore::ack_child_completed`]): lease checked, result recorded, the last child's parent enqueued with its dedup id, flow forgotten, child acked (`XACK`/`XDEL`; an ordered queue's key handed on) — one Lua script | before the script: nothing happened, the child is redelivered; after it: nothing is left to do, the child is **not** run again |
//! | anything else (memory, SQS, Kafka, or Redis across servers) | step by step: result recorded and parent released (one atomic store step), parent sent, flow marked sent, **then** the child acked | the child is un-acked until the end: it is delivered again, its rerun finds its result recorded and sends the parent if that was still missing. The rare second send (a kill between the send and the mark) is dropped by the parent queue's dedup — memory, Redis, SQS FIFO (5 min) — as the parent carries its flow id as dedup id (unless it has one of its own); on a queue without broker dedup (Kafka, SQS standard) guard the parent's handler with the [`Dedup`](crate::middleware::Dedup) middleware |
//!
//! - **Every store step is atomic**: the memory store under one lock, Redis in one
//!   Lua script. A child's own handler is at-least-once, as every handler (a kill
//!   mid-handler reruns it): its rerun's result replaces the first.
//! - A dead-lettered child (retries spent) tells its flow after the dead-lettering,
//!   best effort: the move to the dead-letter queue is the backend's own step.
//!
//! Results travel in a header of the parent message, so they must fit the parent
//! queue's message size limit (small values; store large ones elsewhere and return
//! a reference).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::types::{job_id_of, JobMessage};
use super::JobStore;
use crate::delivery::Delivery;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{reserved, Headers, Message};
use crate::producer::Producer;

/// What a child's dead-lettering does to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnChildFailure {
    /// The parent is never sent; its flow is marked failed (BullMQ's
    /// `failParentOnFailure`). The default.
    #[default]
    FailParent,
    /// The child counts as done without a result; the parent runs once the others
    /// are done (`ignoreDependencyOnFailure`).
    Ignore,
    /// The parent is released at once, with the results so far
    /// (`continueParentOnFailure`).
    Continue,
}

impl OnChildFailure {
    /// The name (`fail_parent`, `ignore`, `continue`), as stores write it.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnChildFailure::FailParent => "fail_parent",
            OnChildFailure::Ignore => "ignore",
            OnChildFailure::Continue => "continue",
        }
    }

    /// The policy named `s` (see [`as_str`](Self::as_str)).
    pub fn parse(s: &str) -> Option<Self> {
        [
            OnChildFailure::FailParent,
            OnChildFailure::Ignore,
            OnChildFailure::Continue,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// How a child ended, for [`JobStore::child_done`].
#[derive(Debug, Clone, PartialEq)]
pub enum ChildOutcome {
    /// Completed, with its result.
    Completed(Option<serde_json::Value>),
    /// Dead-lettered, with the reason.
    Failed(String),
}

/// What [`JobStore::child_done`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Nothing to do yet (children missing, the parent already released, or no
    /// such flow).
    Wait,
    /// Send this parent message to `queue`, then call
    /// [`JobStore::parent_sent`].
    Send {
        /// The parent's queue.
        queue: String,
        /// The parent message, its [`FLOW_CHILDREN`](reserved::FLOW_CHILDREN)
        /// header set.
        message: Message,
    },
    /// The flow failed (a child failed under [`OnChildFailure::FailParent`]): the
    /// parent is never sent.
    Failed {
        /// The child's failure.
        reason: String,
    },
}

/// A producer of flow parents, as [`TrackJobsLayer::flows`](super::TrackJobsLayer::flows)
/// was given it: through [`Producer`], and as its own type, so that a store whose
/// backend can send the parent inside its own atomic step
/// ([`JobStore::ack_child_completed`]) recognises a producer of that backend.
#[derive(Clone)]
pub struct FlowParent {
    producer: Arc<dyn Producer>,
    concrete: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for FlowParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowParent")
            .field("queue", &self.producer.queue())
            .finish()
    }
}

impl FlowParent {
    /// Wrap `producer`.
    pub fn new<P: Producer + 'static>(producer: P) -> Self {
        let producer = Arc::new(producer);
        FlowParent {
            producer: producer.clone(),
            concrete: producer,
        }
    }

    /// The producer.
    pub fn producer(&self) -> &dyn Producer {
        &*self.producer
    }

    /// Its queue.
    pub fn queue(&self) -> &str {
        self.producer.queue()
    }

    /// The producer as type `T`, when it is one (a backend's own producer type).
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.concrete.downcast_ref::<T>()
    }
}

/// What [`JobStore::ack_child_completed`] did, besides acking the child.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChildAcked {
    /// The child's result is recorded; the flow waits for others (or the child
    /// belongs to no pending flow: a finished or unknown one).
    Wait,
    /// It was the last: the parent was put on `queue` (`duplicate`: the parent
    /// queue's dedup already held it — a send of an earlier, interrupted step) and
    /// the flow forgotten.
    Sent {
        /// The parent's queue.
        queue: String,
        /// Dropped as a duplicate by the parent queue's dedup.
        duplicate: bool,
    },
}

/// The children's outcomes, as the parent sees them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FlowChildren {
    /// Completed children: id → result (`null` for none).
    pub results: BTreeMap<String, serde_json::Value>,
    /// Failed children (under `Ignore` / `Continue`): id → reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed: BTreeMap<String, String>,
}

impl FlowChildren {
    /// The result of child `id`, decoded into `T`.
    pub fn get<T: serde::de::DeserializeOwned>(&self, id: &str) -> Result<T> {
        let value = self.results.get(id).ok_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("flow child {id:?} has no result"),
            )
        })?;
        serde_json::from_value(value.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("flow child {id:?}'s result does not decode: {e}"),
            )
        })
    }
}

/// The children's results of a parent delivery (its
/// [`FLOW_CHILDREN`](reserved::FLOW_CHILDREN) header); empty for a message that is
/// not a flow's parent. A header that does not decode is
/// [`ErrorKind::Decode`].
pub fn children(delivery: &Delivery) -> Result<FlowChildren> {
    match delivery.headers().get(reserved::FLOW_CHILDREN) {
        None => Ok(FlowChildren::default()),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("header {}: {e}", reserved::FLOW_CHILDREN),
            )
        }),
    }
}

/// A flow's record in a store: the parent, not yet sent, and its children.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FlowRecord {
    /// The parent's job id (the flow id).
    pub parent: String,
    /// The queue the parent goes to.
    pub parent_queue: String,
    /// The parent message.
    pub message: Message,
    /// The children's job ids.
    pub children: Vec<String>,
    /// What a child's failure does.
    pub on_child_failure: OnChildFailure,
}

/// A parent job and its children, added together (BullMQ's `FlowProducer.add`).
///
/// ```
/// use ferrymq_core::jobs::{Flow, JobMessage, MemoryJobStore};
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::Message;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ferrymq_core::Result<()> {
/// let invoices = MemoryConfig::new("flow-doc-invoices").producer()?;
/// let store = MemoryJobStore::named("flow-doc-invoices");
/// Flow::new("email-7", "flow-doc-emails", Message::new("send the invoice"))
///     .child(&invoices, Message::new("invoice order 7").job_id("invoice-7"))
///     .add(&store)
///     .await?;
/// # Ok(())
/// # }
/// ```
pub struct Flow<'a> {
    record: FlowRecord,
    sends: Vec<(&'a dyn Producer, Message)>,
}

impl fmt::Debug for Flow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("record", &self.record)
            .finish()
    }
}

impl<'a> Flow<'a> {
    /// A flow whose parent, job `parent`, is `message` on `parent_queue`.
    pub fn new(
        parent: impl Into<String>,
        parent_queue: impl Into<String>,
        message: Message,
    ) -> Self {
        let parent = parent.into();
        Flow {
            record: FlowRecord {
                message: message.job_id(parent.clone()),
                parent,
                parent_queue: parent_queue.into(),
                children: Vec::new(),
                on_child_failure: OnChildFailure::default(),
            },
            sends: Vec::new(),
        }
    }

    /// A child: `message` sent through `producer`. Its job id is its
    /// [`JOB_ID`](reserved::JOB_ID) header or dedup id, else `<parent>/<n>`.
    pub fn child(mut self, producer: &'a dyn Producer, message: Message) -> Self {
        let id = job_id_of(&message, None)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/{}", self.record.parent, self.sends.len() + 1));
        let message = message
            .job_id(id.clone())
            .header(reserved::FLOW_PARENT, self.record.parent.clone());
        self.record.children.push(id);
        self.sends.push((producer, message));
        self
    }

    /// What a child's dead-lettering does (default: fail the parent).
    pub fn on_child_failure(mut self, policy: OnChildFailure) -> Self {
        self.record.on_child_failure = policy;
        self
    }

    /// Record the flow in `store`, then send the children. The children's workers
    /// must record their jobs with [`TrackJobsLayer::flows`](super::TrackJobsLayer::flows)
    /// over this same store (a store of their queue's name, or one shared).
    ///
    /// A flow without children is refused (`InvalidMessage`): send its parent
    /// directly. Adding a flow whose id is already recorded changes nothing and
    /// sends the children again (a retried `add`); a send that fails returns its
    /// error, and the children sent so far stay sent.
    pub async fn add<S: JobStore + ?Sized>(self, store: &S) -> Result<()> {
        if self.record.children.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidMessage,
                format!(
                    "flow {:?} has no children: send its parent directly",
                    self.record.parent
                ),
            ));
        }
        store.create_flow(self.record).await?;
        for (producer, message) in self.sends {
            producer.send(message).await?;
        }
        Ok(())
    }
}

/// Hex of `bytes`, for storing a payload as text.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [h, l] => Some(digit(*h)? << 4 | digit(*l)?),
            _ => None,
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct Stored {
    p: String,
    h: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<i32>,
}

/// The parent message as text, for a store (its delay is not kept: a parent runs
/// when released).
pub fn encode_message(message: &Message) -> String {
    let stored = Stored {
        p: hex(message.payload()),
        h: message
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        k: message.get_key().map(str::to_string),
        d: message.get_dedup_id().map(str::to_string),
        r: message.get_priority(),
    };
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string(&stored).unwrap_or_default()
}

/// A message from [`encode_message`]'s text.
pub fn decode_message(text: &str) -> Result<Message> {
    let bad = |what: &str| Error::new(ErrorKind::Decode, format!("stored flow parent: {what}"));
    let stored: Stored = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let payload = unhex(&stored.p).ok_or_else(|| bad("payload is not hex"))?;
    let mut headers = Headers::new();
    for (n, v) in stored.h {
        headers.insert(n, v);
    }
    let mut message = Message::new(payload).with_headers(headers);
    if let Some(k) = stored.k {
        message = message.key(k);
    }
    if let Some(d) = stored.d {
        message = message.dedup_id(d);
    }
    if let Some(r) = stored.r {
        message = message.priority(r);
    }
    Ok(message)
}

/// The parent message to send once released: the children's outcomes in its
/// header, its flow id as dedup id unless it has its own.
pub fn release_message(mut message: Message, parent: &str, children: &FlowChildren) -> Message {
    let text = serde_json::to_string(children).unwrap_or_default();
    message.headers_mut().insert(reserved::FLOW_CHILDREN, text);
    if message.get_dedup_id().is_none() {
        message = message.dedup_id(format!("flow:{parent}"));
    }
    message
}

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::delivery::{Delivery, DeliveryMeta};
use crate::message::Message;
use crate::middleware::Outcome;

/// One finished delivery, broadcast to every receiver from
/// [`Worker::subscribe`](super::Worker::subscribe).
///
/// The event shares the delivery the worker handled (two reference counts, no copy
/// of its metadata or message) and shows it through [`meta`](WorkerEvent::meta) and
/// [`message`](WorkerEvent::message), never its ack handle: listeners observe, they
/// do not settle. Because it shares the delivery, an event keeps it (payload and
/// backend handle) alive until every receiver has seen it; the delivery was settled,
/// or its settle given up, before the event was sent.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::middleware::{handler_fn, Outcome};
/// use ferrymq_core::worker::Worker;
/// use ferrymq_core::{BoxError, Delivery, Message, Producer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ferrymq_core::Result<()> {
/// let (producer, consumer) = MemoryConfig::new("worker-event-doc").connect()?;
/// producer.send(Message::new("hello")).await?;
/// let worker = Worker::new(consumer);
/// let mut events = worker.subscribe();
/// worker
///     .run_until(
///         handler_fn(|_: Delivery| async { Ok::<_, BoxError>(()) }),
///         tokio::time::sleep(Duration::from_millis(100)),
///     )
///     .await?;
/// let event = events.recv().await.expect("one event");
/// assert_eq!(event.outcome, Outcome::Succeeded);
/// assert_eq!(event.meta().attempt, 1);
/// assert_eq!(&event.payload()[..], b"hello");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerEvent {
    /// What happened.
    pub outcome: Outcome,
    /// The handler's error, for failed, retried and dead-lettered deliveries.
    pub error: Option<Arc<str>>,
    /// Time spent in the handler stack (zero for released deliveries).
    pub elapsed: Duration,
    delivery: Delivery,
}

impl WorkerEvent {
    pub(super) fn new(
        outcome: Outcome,
        delivery: Delivery,
        error: Option<Arc<str>>,
        elapsed: Duration,
    ) -> Self {
        WorkerEvent {
            outcome,
            error,
            elapsed,
            delivery,
        }
    }

    /// Id, attempt, queue, enqueue time of the delivery.
    pub fn meta(&self) -> &DeliveryMeta {
        self.delivery.meta()
    }

    /// The message as received.
    pub fn message(&self) -> &Message {
        self.delivery.message()
    }

    /// The message's payload.
    pub fn payload(&self) -> &Bytes {
        self.delivery.message().payload()
    }

    /// The delivery attempt (1 on first delivery).
    pub fn attempt(&self) -> u32 {
        self.delivery.attempt()
    }
}

use std::sync::Arc;
use std::time::Duration;

use crate::delivery::DeliveryMeta;
use crate::message::Message;
use crate::middleware::Outcome;

/// One finished delivery, broadcast to every receiver from
/// [`Worker::subscribe`](super::Worker::subscribe).
///
/// Carries the message (cheap: the payload is shared `Bytes`) but not the ack handle:
/// listeners observe, they do not settle.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerEvent {
    /// What happened.
    pub outcome: Outcome,
    /// Id, attempt, queue, enqueue time of the delivery.
    pub meta: DeliveryMeta,
    /// The message.
    pub message: Message,
    /// The handler's error, for failed, retried and dead-lettered deliveries.
    pub error: Option<Arc<str>>,
    /// Time spent in the handler stack (zero for released deliveries).
    pub elapsed: Duration,
}

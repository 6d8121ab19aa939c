//! The sending side.

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::depth::Depth;
use crate::error::Result;
use crate::message::Message;
use crate::position::Position;

/// What the backend said about one accepted message.
///
/// The id is the backend's name for the message, the same one its consumer's
/// [`Delivery::id`](crate::Delivery::id) gives. A backend whose ids are positions in a
/// log (Kafka's partition and offset) makes receipts with
/// [`SendReceipt::at_position`]: the id is only formatted when [`id`](Self::id) is
/// first called, so a producer that ignores its receipts pays neither the formatting
/// nor an allocation per message.
///
/// ```
/// use ferrymq_core::SendReceipt;
///
/// let r = SendReceipt::at_position(2, 1_041);
/// assert_eq!(r.id(), "2/1041");
/// assert_eq!(r, SendReceipt::new("2/1041"));
/// assert!(!r.is_duplicate());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// Text as the backend gave it, or a partition and offset formatted on first
    /// use: the lazy formatting [`Position`] has.
    id: Position,
    duplicate: bool,
}

impl SendReceipt {
    /// A receipt for a newly enqueued message.
    pub fn new(id: impl Into<String>) -> Self {
        SendReceipt {
            id: Position::from(id.into()),
            duplicate: false,
        }
    }

    /// A receipt for a message dropped as a duplicate.
    pub fn duplicate(id: impl Into<String>) -> Self {
        SendReceipt {
            id: Position::from(id.into()),
            duplicate: true,
        }
    }

    /// A receipt for a message written at `offset` of `partition`; its id is
    /// `partition/offset`.
    pub fn at_position(partition: i32, offset: i64) -> Self {
        SendReceipt {
            id: Position::in_partition(partition, offset),
            duplicate: false,
        }
    }

    /// The backend's id for the message (empty where the backend assigns none).
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The id, owned.
    pub fn into_id(self) -> String {
        String::from(self.id)
    }

    /// Whether the message had a dedup id already seen in the dedup window, so it
    /// was accepted and dropped (only reported by backends that know; others say
    /// `false`).
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
}

/// Sends messages to one queue (or topic).
///
/// Object safe: configuration yields `Box<dyn Producer>`; code that knows its backend
/// can use the concrete type instead.
#[async_trait]
pub trait Producer: Send + Sync {
    /// Send one message.
    ///
    /// On error nothing was enqueued — bad input gets `TooLarge` / `InvalidMessage`,
    /// a delay the backend cannot honour `Unsupported`, a full queue `QueueFull`, a
    /// throttling broker `Throttled` — with one exception:
    /// [`ErrorKind::OutcomeUnknown`](crate::ErrorKind::OutcomeUnknown) says the
    /// request left and no answer came back, so the message may be on the broker.
    async fn send(&self, message: Message) -> Result<SendReceipt>;

    /// Send several messages, one result per entry in input order. The outer error is
    /// for failures of the whole call (closed producer, lost connection); a bad entry
    /// fails alone. Backends with native batches send `max_batch` per round trip.
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(self.send(message).await);
        }
        Ok(results)
    }

    /// Wait until everything sent so far is on the broker.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Flush, then refuse further sends with `Closed`.
    async fn close(&self) -> Result<()>;

    /// Message counts of the target queue (used by backpressure).
    async fn depth(&self) -> Result<Depth>;

    /// The queue this producer sends to.
    fn queue(&self) -> &str;

    /// What the backend can do.
    fn capabilities(&self) -> &Capabilities;
}

/// `Box<dyn Producer>` and `Arc<dyn Producer>` are producers too, so middleware and
/// the worker take either.
macro_rules! forward_producer {
    ($($wrapper:ident)::+) => {
        #[async_trait]
        impl<P: Producer + ?Sized> Producer for $($wrapper)::+<P> {
            async fn send(&self, message: Message) -> Result<SendReceipt> {
                (**self).send(message).await
            }
            async fn send_batch(
                &self,
                messages: Vec<Message>,
            ) -> Result<Vec<Result<SendReceipt>>> {
                (**self).send_batch(messages).await
            }
            async fn flush(&self) -> Result<()> {
                (**self).flush().await
            }
            async fn close(&self) -> Result<()> {
                (**self).close().await
            }
            async fn depth(&self) -> Result<Depth> {
                (**self).depth().await
            }
            fn queue(&self) -> &str {
                (**self).queue()
            }
            fn capabilities(&self) -> &Capabilities {
                (**self).capabilities()
            }
        }
    };
}

forward_producer!(Box);
forward_producer!(std::sync::Arc);

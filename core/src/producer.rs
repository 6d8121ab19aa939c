//! The sending side.

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::depth::Depth;
use crate::error::Result;
use crate::message::Message;

/// What the backend said about one accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReceipt {
    /// The backend's id for the message (empty where the backend assigns none).
    pub id: String,
    /// The message had a dedup id already seen in the dedup window: it was accepted
    /// and dropped (only reported by backends that know; others say `false`).
    pub duplicate: bool,
}

impl SendReceipt {
    /// A receipt for a newly enqueued message.
    pub fn new(id: impl Into<String>) -> Self {
        SendReceipt {
            id: id.into(),
            duplicate: false,
        }
    }

    /// A receipt for a message dropped as a duplicate.
    pub fn duplicate(id: impl Into<String>) -> Self {
        SendReceipt {
            id: id.into(),
            duplicate: true,
        }
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

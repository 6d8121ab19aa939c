//! The receiving side.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, Stream};

use crate::capabilities::Capabilities;
use crate::delivery::Delivery;
use crate::depth::Depth;
use crate::error::{ErrorKind, Result};

/// Receives messages from one queue (or topic, for a consumer group).
///
/// Object safe: configuration yields `Box<dyn Consumer>`.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Receive up to `max` deliveries, waiting at most `wait` for the first one.
    /// Returns as soon as at least one is available (long polling); an empty vector
    /// means `wait` passed with nothing to deliver.
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// Message counts of the queue.
    async fn depth(&self) -> Result<Depth>;

    /// Stop receiving; further `receive` calls return `Closed`. Deliveries already
    /// handed out can still be settled.
    async fn close(&self) -> Result<()>;

    /// The queue this consumer reads.
    fn queue(&self) -> &str;

    /// What the backend can do.
    fn capabilities(&self) -> &Capabilities;
}

/// `Box<dyn Consumer>` and `Arc<dyn Consumer>` are consumers too.
macro_rules! forward_consumer {
    ($($wrapper:ident)::+) => {
        #[async_trait]
        impl<C: Consumer + ?Sized> Consumer for $($wrapper)::+<C> {
            async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
                (**self).receive(max, wait).await
            }
            async fn depth(&self) -> Result<Depth> {
                (**self).depth().await
            }
            async fn close(&self) -> Result<()> {
                (**self).close().await
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

forward_consumer!(Box);
forward_consumer!(std::sync::Arc);

/// Turn a consumer into a stream of deliveries, polling `batch` at a time with long
/// polls of `wait`. The stream ends when the consumer is closed; other errors are
/// yielded and the stream continues.
///
/// At most `batch` deliveries are buffered: the next receive happens only once the
/// previous batch has been taken from the stream.
pub fn into_stream<C: Consumer + 'static>(
    consumer: C,
    batch: usize,
    wait: Duration,
) -> impl Stream<Item = Result<Delivery>> + Send {
    stream::unfold(
        (consumer, std::collections::VecDeque::new(), false),
        move |(consumer, mut buffered, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(d) = buffered.pop_front() {
                    return Some((Ok(d), (consumer, buffered, false)));
                }
                match consumer.receive(batch, wait).await {
                    Ok(ds) => buffered.extend(ds),
                    Err(e) if e.kind() == ErrorKind::Closed => return None,
                    Err(e) => return Some((Err(e), (consumer, buffered, false))),
                }
            }
        },
    )
}

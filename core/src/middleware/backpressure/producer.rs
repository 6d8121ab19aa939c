use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::layer::{Config, Overflow};
use crate::capabilities::Capabilities;
use crate::depth::Depth;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::producer::{Producer, SendReceipt};

#[derive(Debug, Default)]
struct Cache {
    /// Last reading and when it was taken.
    reading: Option<(u64, Instant)>,
    /// Messages accepted since that reading.
    sent_since: u64,
}

/// A producer that refuses or waits when its queue is past a bound; see the
/// [module docs](super). Build it with [`BackpressureLayer`](super::BackpressureLayer).
///
/// On a backend that reports no depth (`capabilities().depth == false`) or whose depth
/// call fails, sends pass through: backpressure is a safety valve, and failing closed
/// would turn a monitoring hiccup into an outage. The failure is logged.
#[derive(Debug)]
pub struct Backpressure<P> {
    inner: P,
    config: Config,
    cache: Mutex<Cache>,
}

impl<P> Backpressure<P> {
    pub(super) fn from_config(inner: P, config: Config) -> Self {
        Backpressure {
            inner,
            config,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The wrapped producer.
    pub fn get_ref(&self) -> &P {
        &self.inner
    }
}

impl<P: Producer> Backpressure<P> {
    /// Room for up to `wanted` messages: how many may be sent now (0 when full).
    /// Refreshes the cached depth when stale (or when `force`).
    async fn room(&self, wanted: u64, force: bool) -> u64 {
        if !self.inner.capabilities().depth.is_available() {
            return wanted;
        }
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        let stale = cache.reading.map_or(true, |(_, at)| {
            force || now.duration_since(at) >= self.config.refresh
        });
        if stale {
            match self.inner.depth().await {
                Ok(depth) => {
                    cache.reading = Some((depth.total(), Instant::now()));
                    cache.sent_since = 0;
                }
                Err(e) => {
                    tracing::warn!(queue = %self.inner.queue(), error = %e, "backpressure: depth unavailable; letting the send through");
                    return wanted;
                }
            }
        }
        let (depth, _) = cache.reading.unwrap_or((0, now));
        let estimate = depth.saturating_add(cache.sent_since);
        let room = self.config.max_depth.saturating_sub(estimate).min(wanted);
        cache.sent_since += room;
        room
    }

    /// Wait (per the overflow policy) until at least one message fits; returns how many.
    async fn admit(&self, wanted: u64) -> Result<u64> {
        let started = Instant::now();
        let mut force = false;
        loop {
            let room = self.room(wanted, force).await;
            if room > 0 {
                return Ok(room);
            }
            match self.config.overflow {
                Overflow::Reject => return Err(self.full()),
                Overflow::Wait { max_wait } => {
                    let mut pause = self.config.refresh;
                    if let Some(max) = max_wait {
                        let left = max.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            return Err(self.full());
                        }
                        pause = pause.min(left);
                    }
                    tokio::time::sleep(pause).await;
                    force = true;
                }
            }
        }
    }

    fn full(&self) -> Error {
        Error::new(
            ErrorKind::QueueFull,
            format!(
                "queue {} holds {} or more messages (backpressure bound)",
                self.inner.queue(),
                self.config.max_depth
            ),
        )
    }

    /// Undo the reservation of messages that were not enqueued after all.
    async fn unreserve(&self, n: u64) {
        if n > 0 {
            let mut cache = self.cache.lock().await;
            cache.sent_since = cache.sent_since.saturating_sub(n);
        }
    }
}

#[async_trait]
impl<P: Producer> Producer for Backpressure<P> {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.admit(1).await?;
        let result = self.inner.send(message).await;
        if result.is_err() {
            self.unreserve(1).await;
        }
        result
    }

    /// Admits as many entries as fit; the rest fail alone with `QueueFull`.
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let total = messages.len();
        let room = usize::try_from(self.admit(total as u64).await?).unwrap_or(total);
        let mut messages = messages;
        let refused = messages.split_off(room.min(total));
        let mut results = match self.inner.send_batch(messages).await {
            Ok(results) => results,
            Err(e) => {
                self.unreserve(room as u64).await;
                return Err(e);
            }
        };
        let failed = results.iter().filter(|r| r.is_err()).count();
        self.unreserve(failed as u64).await;
        results.extend(refused.into_iter().map(|_| Err(self.full())));
        Ok(results)
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    async fn depth(&self) -> Result<Depth> {
        self.inner.depth().await
    }

    fn queue(&self) -> &str {
        self.inner.queue()
    }

    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::layer::Config;
use super::task::{self, Command};
use crate::capabilities::Capabilities;
use crate::depth::Depth;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::producer::{Producer, SendReceipt};

/// A producer that sends in batches; see the [module docs](super). Build it with
/// [`BatchingLayer`](super::BatchingLayer).
pub struct Batching<P> {
    inner: Arc<P>,
    commands: mpsc::Sender<Command>,
    closed: AtomicBool,
    max_size: usize,
}

impl<P> std::fmt::Debug for Batching<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batching")
            .field("max_size", &self.max_size)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<P: Producer + 'static> Batching<P> {
    pub(super) fn from_config(inner: P, config: Config) -> Self {
        let native = inner.capabilities().max_batch.max(1);
        let max_size = config.max_size.unwrap_or(native).min(native);
        let inner = Arc::new(inner);
        // Room for two full batches of callers; more wait in `send`.
        let (commands, receiver) = mpsc::channel(max_size.saturating_mul(2).max(1));
        tokio::spawn(task::run(inner.clone(), receiver, max_size, config.linger));
        Batching {
            inner,
            commands,
            closed: AtomicBool::new(false),
            max_size,
        }
    }

    /// The largest batch this producer sends.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("batching producer"));
        }
        Ok(())
    }

    async fn command<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| Error::closed("batching producer"))?;
        answer
            .await
            .map_err(|_| Error::closed("batching producer (its task ended)"))
    }
}

#[async_trait]
impl<P: Producer + 'static> Producer for Batching<P> {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.check_open()?;
        self.command(|reply| Command::Send(message, reply)).await?
    }

    /// Every message joins the current batch; results come back in input order.
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.check_open()?;
        let mut answers = Vec::with_capacity(messages.len());
        for message in messages {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Command::Send(message, reply))
                .await
                .map_err(|_| Error::closed("batching producer"))?;
            answers.push(answer);
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(
                answer
                    .await
                    .unwrap_or_else(|_| Err(Error::closed("batching producer (its task ended)"))),
            );
        }
        Ok(results)
    }

    /// Send the current batch now, then flush the inner producer.
    async fn flush(&self) -> Result<()> {
        self.command(Command::Flush).await?
    }

    /// Refuse new sends, send what is collected, close the inner producer.
    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        let flushed = self.command(Command::Flush).await;
        let closed = self.inner.close().await;
        flushed??;
        closed
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

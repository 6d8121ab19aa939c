//! The task that owns the current batch.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use crate::error::{Error, Result};
use crate::message::Message;
use crate::producer::{Producer, SendReceipt};

pub(super) enum Command {
    Send(Message, oneshot::Sender<Result<SendReceipt>>),
    Flush(oneshot::Sender<Result<()>>),
}

struct Batch {
    messages: Vec<Message>,
    replies: Vec<oneshot::Sender<Result<SendReceipt>>>,
    due: Instant,
}

pub(super) async fn run<P: Producer>(
    inner: Arc<P>,
    mut commands: mpsc::Receiver<Command>,
    max_size: usize,
    linger: Duration,
) {
    let mut batch = Batch {
        messages: Vec::with_capacity(max_size),
        replies: Vec::with_capacity(max_size),
        due: Instant::now(),
    };
    loop {
        let command = if batch.messages.is_empty() {
            commands.recv().await
        } else {
            tokio::select! {
                c = commands.recv() => c,
                _ = sleep_until(batch.due) => {
                    ship(&*inner, &mut batch).await;
                    continue;
                }
            }
        };
        match command {
            Some(Command::Send(message, reply)) => {
                if batch.messages.is_empty() {
                    batch.due = crate::time::deadline_in(linger);
                }
                batch.messages.push(message);
                batch.replies.push(reply);
                if batch.messages.len() >= max_size {
                    ship(&*inner, &mut batch).await;
                }
            }
            Some(Command::Flush(reply)) => {
                ship(&*inner, &mut batch).await;
                let _ = reply.send(inner.flush().await);
            }
            None => {
                // Every handle is gone: send what is left, then stop.
                ship(&*inner, &mut batch).await;
                return;
            }
        }
    }
}

async fn ship<P: Producer + ?Sized>(inner: &P, batch: &mut Batch) {
    if batch.messages.is_empty() {
        return;
    }
    let messages = std::mem::take(&mut batch.messages);
    let replies = std::mem::take(&mut batch.replies);
    let sent = messages.len();
    metrics::histogram!("ferrymq_batch_size").record(sent as f64);
    match inner.send_batch(messages).await {
        Ok(results) => {
            let got = results.len();
            let mut results = results.into_iter();
            for reply in replies {
                let result = results.next().unwrap_or_else(|| {
                    Err(Error::new(
                        crate::ErrorKind::Backend,
                        format!("send_batch returned {got} results for {sent} messages"),
                    ))
                });
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(Error::new(e.kind(), e.to_string())));
            }
        }
    }
}

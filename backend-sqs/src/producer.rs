//! Sending: `SendMessage`, and `SendMessageBatch` chunked by count and bytes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use ferrymq_core::{Capabilities, Depth, Error, ErrorKind, Message, Producer, Result, SendReceipt};
use futures::stream::{self, StreamExt};

use crate::client::{Queue, MAX_BATCH, MAX_BATCH_BYTES};
use crate::codec::{encode, Encoded};
use crate::error::{batch_entry_kind, map_sdk, Call};

/// Standard-queue batches sent at once by one `send_batch` (FIFO batches go one
/// after another, to keep each group's order).
const CONCURRENT_BATCHES: usize = 5;

/// Sends to one SQS queue.
///
/// `send` is one `SendMessage`; `send_batch` validates and encodes every entry, then
/// sends the good ones in `SendMessageBatch` calls of at most 10 entries and at most
/// the batch byte limit, with one result per entry. Wrap it in the `Batching`
/// middleware to turn many single sends into batch calls.
#[derive(Debug)]
pub struct SqsProducer {
    queue: Arc<Queue>,
    closed: AtomicBool,
}

impl SqsProducer {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        SqsProducer {
            queue,
            closed: AtomicBool::new(false),
        }
    }

    /// The queue URL.
    pub fn queue_url(&self) -> &str {
        self.queue.url()
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("SQS producer"))
        } else {
            Ok(())
        }
    }

    /// Validate and encode one message; every refusal happens here, before
    /// anything is sent.
    fn prepare(&self, message: &Message) -> Result<Encoded> {
        let caps = &self.queue.caps;
        message.validate(caps.max_message_size)?;
        caps.check_delay(message.get_delay())?;
        let encoded = encode(message, self.queue.fifo())?;
        let max = self.queue.profile.max_size;
        if encoded.size > max {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "message is {} bytes as SQS counts it once encoded (body and \
                     attributes), the queue's MaximumMessageSize is {max}; nothing was sent",
                    encoded.size
                ),
            ));
        }
        Ok(encoded)
    }

    async fn send_chunk(&self, chunk: Vec<(usize, Encoded)>) -> Vec<(usize, Result<SendReceipt>)> {
        let mut entries = Vec::with_capacity(chunk.len());
        for (i, (_, enc)) in chunk.iter().enumerate() {
            let entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(enc.body.clone())
                .set_message_attributes(
                    (!enc.attributes.is_empty()).then(|| enc.attributes.clone()),
                )
                .set_message_group_id(enc.group_id.clone())
                .set_message_deduplication_id(enc.dedup_id.clone())
                .set_delay_seconds(enc.delay_seconds)
                .build();
            match entry {
                Ok(e) => entries.push(e),
                Err(e) => {
                    let err = Error::backend("building a SendMessageBatch entry", e);
                    return chunk
                        .into_iter()
                        .map(|(index, _)| (index, Err(Error::new(err.kind(), err.to_string()))))
                        .collect();
                }
            }
        }
        let result = self
            .queue
            .client
            .send_message_batch()
            .queue_url(self.queue.url())
            .set_entries(Some(entries))
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let err = map_sdk(&self.queue.what("SendMessageBatch"), Call::Send, e);
                return chunk
                    .into_iter()
                    .map(|(index, _)| (index, Err(Error::new(err.kind(), err.message()))))
                    .collect();
            }
        };
        let mut results: Vec<Option<Result<SendReceipt>>> =
            (0..chunk.len()).map(|_| None).collect();
        for ok in out.successful {
            if let Some(slot) = ok.id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
                *slot = Some(Ok(SendReceipt::new(ok.message_id)));
            }
        }
        for failed in out.failed {
            if let Some(slot) = failed
                .id
                .parse::<usize>()
                .ok()
                .and_then(|i| results.get_mut(i))
            {
                let kind = batch_entry_kind(
                    &failed.code,
                    failed.message.as_deref(),
                    failed.sender_fault,
                    Call::Send,
                );
                *slot = Some(Err(Error::new(
                    kind,
                    format!(
                        "SQS SendMessageBatch entry on queue {}: {} ({})",
                        self.queue.name,
                        failed.message.unwrap_or_default(),
                        failed.code
                    ),
                )));
            }
        }
        chunk
            .into_iter()
            .zip(results)
            .map(|((index, _), r)| {
                (
                    index,
                    r.unwrap_or_else(|| {
                        Err(Error::new(
                            ErrorKind::OutcomeUnknown,
                            format!(
                                "SQS SendMessageBatch on queue {} did not report this entry",
                                self.queue.name
                            ),
                        ))
                    }),
                )
            })
            .collect()
    }
}

/// Split `entries` into batches of at most 10 entries and `max_bytes`, keeping order.
pub(crate) fn chunk_by_size<T>(
    entries: Vec<(usize, T)>,
    size: impl Fn(&T) -> usize,
    max_bytes: usize,
) -> Vec<Vec<(usize, T)>> {
    let mut chunks: Vec<Vec<(usize, T)>> = Vec::new();
    let mut current: Vec<(usize, T)> = Vec::new();
    let mut bytes = 0usize;
    for (index, entry) in entries {
        let n = size(&entry);
        if !current.is_empty() && (current.len() >= MAX_BATCH || bytes + n > max_bytes) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += n;
        current.push((index, entry));
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[async_trait]
impl Producer for SqsProducer {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.check_open()?;
        let enc = self.prepare(&message)?;
        let out = self
            .queue
            .client
            .send_message()
            .queue_url(self.queue.url())
            .message_body(enc.body)
            .set_message_attributes((!enc.attributes.is_empty()).then_some(enc.attributes))
            .set_message_group_id(enc.group_id)
            .set_message_deduplication_id(enc.dedup_id)
            .set_delay_seconds(enc.delay_seconds)
            .send()
            .await
            .map_err(|e| map_sdk(&self.queue.what("SendMessage"), Call::Send, e))?;
        Ok(SendReceipt::new(out.message_id.unwrap_or_default()))
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.check_open()?;
        let n = messages.len();
        let mut results: Vec<Option<Result<SendReceipt>>> = (0..n).map(|_| None).collect();
        let mut good = Vec::with_capacity(n);
        for (i, message) in messages.iter().enumerate() {
            match self.prepare(message) {
                Ok(enc) => good.push((i, enc)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let max_bytes = self.queue.profile.max_size.min(MAX_BATCH_BYTES);
        let chunks = chunk_by_size(good, |e: &Encoded| e.size, max_bytes);
        let concurrency = if self.queue.fifo() {
            1
        } else {
            CONCURRENT_BATCHES
        };
        let sent: Vec<Vec<(usize, Result<SendReceipt>)>> = stream::iter(chunks)
            .map(|chunk| self.send_chunk(chunk))
            .buffered(concurrency)
            .collect()
            .await;
        let mut any_ok = false;
        let mut transport_error: Option<Error> = None;
        let mut all_same_transport = true;
        for (index, result) in sent.into_iter().flatten() {
            match &result {
                Ok(_) => any_ok = true,
                Err(e) if e.kind().is_transient() => {
                    transport_error.get_or_insert_with(|| Error::new(e.kind(), e.message()));
                }
                Err(_) => all_same_transport = false,
            }
            results[index] = Some(result);
        }
        // Nothing went out at all, for one transport reason (and no entry was bad):
        // a failure of the whole call.
        if let Some(e) = transport_error {
            if !any_ok && all_same_transport && results.iter().all(Option::is_some) {
                let bad_input = results
                    .iter()
                    .flatten()
                    .any(|r| r.as_ref().err().is_some_and(|e| !e.kind().is_transient()));
                if !bad_input {
                    return Err(e);
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Backend,
                        "send_batch lost track of an entry",
                    ))
                })
            })
            .collect())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    async fn depth(&self) -> Result<Depth> {
        self.queue.depth().await
    }

    fn queue(&self) -> &str {
        &self.queue.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.queue.caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_count_and_bytes() {
        let entries: Vec<(usize, usize)> = (0..25).map(|i| (i, 100)).collect();
        let chunks = chunk_by_size(entries, |s| *s, 1_000_000);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        let entries: Vec<(usize, usize)> = (0..5).map(|i| (i, 400)).collect();
        let chunks = chunk_by_size(entries, |s| *s, 1000);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        let order: Vec<usize> = chunks.into_iter().flatten().map(|(i, _)| i).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
        // An entry larger than the limit alone still goes (SQS judges it).
        let chunks = chunk_by_size(vec![(0, 2000usize)], |s| *s, 1000);
        assert_eq!(chunks.len(), 1);
    }
}

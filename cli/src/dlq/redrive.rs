//! Move dead-lettered messages back to a queue where they can be handled again.
//!
//! For each message: send a copy to the target, and only once the target accepted it,
//! ack it in the DLQ. That makes a redrive **at-least-once**: a crash (or a failed ack)
//! between the two steps leaves the message in both queues, never in neither — the
//! same rule [`RetryToDlq`](ferrymq::middleware::RetryToDlq) follows on the way in.
//!
//! The copy keeps the payload, the headers — including ferrymq's reserved dead-letter
//! headers (`ferrymq-failure-reason`, `ferrymq-origin-queue`, ...), which may be sent,
//! so the history travels with the message and a second dead-lettering keeps the first
//! failure time — the ordering key, the priority and, unless told otherwise, the dedup
//! id. Two things are dropped: the backend's attempt counter header
//! (`ferrymq-attempt`), so attempts count afresh in the target, and any delay.
//!
//! A target that deduplicates on the dedup id (SQS FIFO, the memory and Redis
//! backends, within their dedup window) drops a copy whose id it still remembers from
//! the original send. Such a message is **not** acked in the DLQ: it is held back and
//! released at the end, and reported, so nothing is lost silently. Redrive it after
//! the window, or with `drop_dedup_id`.

use std::collections::HashSet;
use std::time::Duration;

use ferrymq::{reserved, Consumer, Delivery, Error, Message, Producer, SendReceipt};

/// At most this many messages leased per receive call.
const BATCH: usize = 10;

/// How a redrive runs.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// Move at most this many (`None`: until the DLQ is empty).
    pub max: Option<usize>,
    /// How long to wait for the first message.
    pub wait: Duration,
    /// Send without the message's dedup id, so the target cannot drop the copy as a
    /// duplicate of the original send.
    pub drop_dedup_id: bool,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        RedriveOptions {
            max: None,
            wait: Duration::from_secs(2),
            drop_dedup_id: false,
        }
    }
}

/// One step of a redrive, for progress output.
#[derive(Debug)]
pub enum Step<'a> {
    /// Sent to the target and acked in the DLQ.
    Moved {
        /// The DLQ delivery.
        from: &'a Delivery,
        /// The target's receipt.
        receipt: &'a SendReceipt,
    },
    /// The target dropped the copy as a duplicate of its dedup id: kept in the DLQ.
    HeldBack {
        /// The DLQ delivery.
        from: &'a Delivery,
    },
}

/// What a redrive did.
#[derive(Debug, Default)]
pub struct RedriveReport {
    /// Sent to the target and acked in the DLQ.
    pub moved: usize,
    /// Dropped by the target as duplicates; still in the DLQ.
    pub held_back: usize,
    /// Why the redrive stopped early, if it did. Everything not counted in `moved` is
    /// still in the DLQ (released); a failed ack after a successful send says so in
    /// its message: that one is in both queues.
    pub error: Option<Error>,
}

/// The copy of a dead-lettered delivery that goes back to a work queue.
pub fn redrive_message(delivery: &Delivery, drop_dedup_id: bool) -> Message {
    let original = delivery.message();
    let mut headers = original.headers().clone();
    headers.remove(reserved::ATTEMPT);
    let mut message = Message::new(original.payload().clone()).with_headers(headers);
    if let Some(key) = original.get_key() {
        message = message.key(key);
    }
    if let (Some(id), false) = (original.get_dedup_id(), drop_dedup_id) {
        message = message.dedup_id(id);
    }
    if let Some(priority) = original.get_priority() {
        message = message.priority(priority);
    }
    message
}

/// Move messages from `dlq` to `target`; see the [module docs](self). Stops when the
/// DLQ has nothing more to deliver, at `options.max`, or at the first failure (a
/// failed send or ack), releasing whatever it still holds.
pub async fn redrive(
    dlq: &dyn Consumer,
    target: &dyn Producer,
    options: &RedriveOptions,
    mut progress: impl FnMut(Step<'_>),
) -> RedriveReport {
    let mut report = RedriveReport::default();
    // Held-back deliveries keep their lease until the end, so they are not received
    // again; their ids, in case a lease runs out and one comes back anyway.
    let mut held: Vec<Delivery> = Vec::new();
    let mut held_ids: HashSet<String> = HashSet::new();
    let mut unsent: Vec<Delivery> = Vec::new();
    let mut first = true;
    'receiving: loop {
        let done = report.moved + report.held_back;
        let want = match options.max {
            Some(max) if done >= max => break,
            Some(max) => (max - done).min(BATCH),
            None => BATCH,
        };
        let wait = if first { options.wait } else { Duration::ZERO };
        first = false;
        let batch = match dlq.receive(want, wait).await {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => batch,
            Err(e) => {
                report.error = Some(e);
                break;
            }
        };
        let mut batch = batch.into_iter();
        while let Some(d) = batch.next() {
            if held_ids.contains(d.id()) {
                held.push(d);
                continue;
            }
            match target
                .send(redrive_message(&d, options.drop_dedup_id))
                .await
            {
                Err(e) => {
                    report.error = Some(Error::new(
                        e.kind(),
                        format!(
                            "sending {} to {} failed; it stays in the DLQ: {}",
                            d.id(),
                            target.queue(),
                            e.message()
                        ),
                    ));
                    unsent.push(d);
                    unsent.extend(batch);
                    break 'receiving;
                }
                Ok(receipt) if receipt.duplicate => {
                    progress(Step::HeldBack { from: &d });
                    report.held_back += 1;
                    held_ids.insert(d.id().to_string());
                    held.push(d);
                }
                Ok(receipt) => match d.ack().await {
                    Ok(()) => {
                        report.moved += 1;
                        progress(Step::Moved {
                            from: &d,
                            receipt: &receipt,
                        });
                    }
                    Err(e) => {
                        report.error = Some(Error::new(
                            e.kind(),
                            format!(
                                "{} was sent to {} (as {}) but acking it in the DLQ failed, \
                                 so it is now in both queues: {}",
                                d.id(),
                                target.queue(),
                                receipt.id,
                                e.message()
                            ),
                        ));
                        unsent.extend(batch);
                        break 'receiving;
                    }
                },
            }
        }
    }
    for d in unsent.into_iter().chain(held) {
        // A failed release loses nothing: the lease runs out and it comes back.
        if let Err(e) = d.nack(None).await {
            tracing::warn!(id = %d.id(), error = %e, "releasing a DLQ message failed");
        }
    }
    report
}

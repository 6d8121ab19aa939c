//! Move dead-lettered messages back to a queue where they can be handled again.
//!
//! **A redrive moves a snapshot**: the messages waiting in the DLQ when it starts
//! (or fewer, with `max`), never "until the DLQ is empty". Redriving into a queue
//! whose handler still fails puts the copies straight back into the DLQ; a redrive
//! that ran until empty would cycle them forever. Copies that come back during the
//! run (their `ferrymq-origin-message-id` is a copy this run sent) are left in the
//! DLQ and counted, not redriven again. A backend that cannot count a queue
//! (`depth: Unavailable`) needs `max` (the CLI counts by peeking when it can).
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

use ferrymq::{reserved, Consumer, Delivery, Error, Message, Producer, Result, SendReceipt};

/// At most this many messages leased per receive call.
const BATCH: usize = 10;

/// How a redrive runs.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// Move at most this many. Never more than the DLQ held at the start; required
    /// when the DLQ's backend cannot count it.
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
    /// The snapshot was taken: at most `total` messages will be moved.
    Started {
        /// Messages waiting in the DLQ at the start, capped at `max`.
        total: usize,
    },
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
    /// A copy this run sent failed again and was dead-lettered back: left in the DLQ.
    CameBack {
        /// The DLQ delivery.
        from: &'a Delivery,
    },
}

/// What a redrive did.
#[derive(Debug, Default)]
pub struct RedriveReport {
    /// The snapshot: how many it set out to move.
    pub total: usize,
    /// Sent to the target and acked in the DLQ.
    pub moved: usize,
    /// Dropped by the target as duplicates; still in the DLQ.
    pub held_back: usize,
    /// Copies sent by this run that failed again and came back; still in the DLQ.
    pub came_back: usize,
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
    // RetryToDlq sends the DLQ copy without its dedup id (so the DLQ's own window
    // cannot drop a second dead-lettering) and keeps it in a reserved header.
    let origin_dedup_id = headers.remove(reserved::ORIGIN_DEDUP_ID);
    let mut message = Message::new(original.payload().clone()).with_headers(headers);
    if let Some(key) = original.get_key() {
        message = message.key(key);
    }
    let dedup_id = original
        .get_dedup_id()
        .map(str::to_owned)
        .or(origin_dedup_id);
    if let (Some(id), false) = (dedup_id, drop_dedup_id) {
        message = message.dedup_id(id);
    }
    if let Some(priority) = original.get_priority() {
        message = message.priority(priority);
    }
    message
}

/// How many messages a redrive of `dlq` sets out to move: those waiting now, capped
/// at `max`; `max` itself when the backend cannot count.
pub async fn snapshot(dlq: &dyn Consumer, max: Option<usize>) -> Result<usize> {
    if !dlq.capabilities().depth.is_available() {
        return max.ok_or_else(|| {
            Error::invalid_config(
                "max",
                format!(
                    "{} cannot count the messages in {}, so a redrive has no snapshot to stop                      at; give the number to move",
                    dlq.capabilities().backend,
                    dlq.queue()
                ),
            )
        });
    }
    let waiting = usize::try_from(dlq.depth().await?.waiting).unwrap_or(usize::MAX);
    Ok(max.map_or(waiting, |max| max.min(waiting)))
}

/// Move messages from `dlq` to `target`; see the [module docs](self). Stops once the
/// snapshot is moved (or held back), when the DLQ has nothing more to deliver, or at
/// the first failure (a failed send or ack), releasing whatever it still holds.
pub async fn redrive(
    dlq: &dyn Consumer,
    target: &dyn Producer,
    options: &RedriveOptions,
    mut progress: impl FnMut(Step<'_>),
) -> RedriveReport {
    let mut report = RedriveReport::default();
    report.total = match snapshot(dlq, options.max).await {
        Ok(total) => total,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    progress(Step::Started {
        total: report.total,
    });
    // Ids of the copies this run sent: a dead letter naming one as its origin came
    // back during the run.
    let mut sent: HashSet<String> = HashSet::new();
    // Held-back deliveries keep their lease until the end, so they are not received
    // again; their ids, in case a lease runs out and one comes back anyway.
    let mut held: Vec<Delivery> = Vec::new();
    let mut held_ids: HashSet<String> = HashSet::new();
    let mut unsent: Vec<Delivery> = Vec::new();
    let mut first = true;
    'receiving: loop {
        let done = report.moved + report.held_back;
        if done >= report.total {
            break;
        }
        let want = (report.total - done).min(BATCH);
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
            let came_back = d
                .headers()
                .get(reserved::ORIGIN_MESSAGE_ID)
                .is_some_and(|origin| sent.contains(origin));
            if came_back {
                progress(Step::CameBack { from: &d });
                report.came_back += 1;
                held_ids.insert(d.id().to_string());
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
                Ok(receipt) if receipt.is_duplicate() => {
                    progress(Step::HeldBack { from: &d });
                    report.held_back += 1;
                    held_ids.insert(d.id().to_string());
                    held.push(d);
                }
                Ok(receipt) => match d.ack().await {
                    Ok(()) => {
                        sent.insert(receipt.id().to_string());
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
                                receipt.id(),
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

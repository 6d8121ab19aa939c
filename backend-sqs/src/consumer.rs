//! Receiving: long polls, the per-consumer buffer, and FIFO runs.
//!
//! ## Long polls and cancellation
//!
//! Each `ReceiveMessage` call runs in a task of its own: its result lands in the
//! consumer's buffer, never in a future that may have been dropped. A FIFO consumer
//! has at most one call in flight (its runs are placed in receive order); a
//! standard one has one per waiting `receive`, up to four, so tasks sharing a
//! consumer do not queue behind one poll, and a lone `Worker` still polls once. `receive(max, wait)` hands out what the buffer holds, else starts
//! a poll (`WaitTimeSeconds` = the wait left, rounded **up** to whole seconds, at
//! most the `wait` setting ≤ 20 s; polled again until the wait is over) and waits
//! for it. A `receive` future dropped mid-call therefore leaves nothing leased to
//! nobody: what its poll brings is served by the next `receive`. Every receive sends
//! the configured `VisibilityTimeout`, so the capabilities and the queue never
//! disagree, and asks for at most `min(max, 10, buffer room)` messages.
//!
//! ## FIFO: one head per group
//!
//! SQS FIFO hands out several messages of one group in one receive, and holds back
//! a group's later messages while an earlier one is in flight. ferrymq's
//! `Ordering::PerKey` promises one message of a key in flight at a time, so a
//! receive hands out only the first message of each group (the *head*) and keeps the
//! rest of the group's *run* leased in the consumer's buffer, in order:
//!
//! - the head **acked** (its delete applied): the next message of the run becomes
//!   the head and is handed out by the next `receive` (a waiting one wakes);
//! - the head **nacked or released** with delay `d`: one
//!   `ChangeMessageVisibilityBatch` gives back the whole run — tails first, the head
//!   last, all with the same timeout, at least 1 s when the run has tails — so SQS
//!   redelivers head and run together, in order, to any consumer;
//! - the head **lost** (its lease ran out, a settle found it gone): the run is
//!   forgotten, not released. Its tails' leases never run past the head's (below),
//!   so they come back with the head or before it, and SQS does not hand out a
//!   group's later message while an earlier one is invisible;
//! - while buffered, tails are **extended**: behind a head that is out, up to the
//!   head's deadline (rounded down to whole seconds), following the head's extends;
//!   behind a head still in the buffer, to the visibility timeout, with the head.
//!   Losing any tail of a run leaves the run without tails: a later message must
//!   never go out before an earlier one.
//!
//! Why no tail is ever made visible at once ("released with visibility 0") while
//! its head is in flight: SQS would hold it back, but LocalStack 4.13.1 hands it
//! out (localstack#12457: a message made visible by `ChangeMessageVisibility`
//! unblocks its group). Moving a run back as one batch, never letting tails outlive
//! their head, is correct on both; its only cost is that `nack(None)` of a head
//! with a buffered run redelivers after 1 s instead of at once.
//!
//! The buffer is bounded by `fifo_buffer`: polls ask for no more than the room
//! left. A run given back counts a receive for every message in it
//! (`ApproximateReceiveCount`), so with a native `maxReceiveCount` a group whose
//! head keeps failing moves its later messages toward the DLQ too — as raw SQS FIFO
//! consumers that receive batches do.
//!
//! Buffered messages not handed out within twice the visibility timeout (at least
//! 30 s) are given back, and so is everything buffered when the consumer is closed
//! or dropped (the tails of heads that are out are forgotten, as above).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName,
};
use ferrymq_core::batch::{BatchConfig, Batcher};
use ferrymq_core::time::{deadline_after, deadline_in};
use ferrymq_core::{
    AckHandle, Capabilities, Consumer, Delivery, DeliveryMeta, Depth, Error, ErrorKind, Message,
    Result,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::ack::{Lease, SqsAck};
use crate::client::{timeouts, Queue, MAX_BATCH};

/// Most `ReceiveMessage` calls one standard-queue consumer has in flight.
const MAX_POLLS: usize = 4;
use crate::codec;
use crate::config::{whole_seconds, MAX_VISIBILITY};
use crate::error::{batch_entry_kind, map_sdk, Call};

/// A received message in the consumer's hands, not (yet) handed out.
struct Entry {
    message: Message,
    meta: DeliveryMeta,
    receipt: String,
    lease: Arc<Lease>,
    group: Option<String>,
    held_since: Instant,
}

/// A FIFO group whose head is out (or waiting in `ready`), with the rest of its
/// run buffered behind it.
struct Run {
    head: Arc<Lease>,
    head_receipt: String,
    /// The head was handed out (else it waits in `ready`, leased by us).
    head_out: bool,
    tails: VecDeque<Entry>,
}

#[derive(Default)]
struct Held {
    /// Ready to hand out: standard-queue messages, and FIFO heads.
    ready: VecDeque<Entry>,
    /// FIFO: group → its run.
    runs: HashMap<String, Run>,
    /// Messages in all runs' tails.
    tails: usize,
    /// Polls in flight: at most one on a FIFO queue; on a standard queue at most one
    /// per waiting receive, or as many as a receive's `max` needs while the queue has
    /// a backlog, up to [`MAX_POLLS`].
    polling: usize,
    /// The last poll came back full: more is waiting on the queue.
    backlog: bool,
    /// Polls completed so far.
    polls_done: u64,
    /// The last poll failed; handed to the next waiting receive.
    error: Option<Error>,
    /// Receives waiting for a poll.
    waiters: usize,
}

/// Visibility changes to make: `(receipt handle, seconds)`, in order.
type Changes = Vec<(String, i32)>;

impl Held {
    fn buffered(&self) -> usize {
        self.ready.len() + self.tails
    }

    /// Remove the run of `group` if `head` is its head; its tails.
    fn take_run(&mut self, group: &str, head: &Arc<Lease>) -> Vec<Entry> {
        match self.runs.get(group) {
            Some(run) if Arc::ptr_eq(&run.head, head) => {}
            _ => return Vec::new(),
        }
        let Some(run) = self.runs.remove(group) else {
            return Vec::new();
        };
        self.tails -= run.tails.len();
        run.tails.into()
    }

    /// Give back everything not handed out; forget the tails of heads that are out
    /// (they run out no later than their head, see [`run_back`]).
    fn take_all(&mut self) -> Changes {
        let ready: Vec<Entry> = self.ready.drain(..).collect();
        let mut changes = Changes::new();
        for e in ready {
            let tails = match &e.group {
                Some(group) => self.take_run(group, &e.lease),
                None => Vec::new(),
            };
            changes.extend(run_back(e.receipt, tails, 0));
        }
        self.runs.clear();
        self.tails = 0;
        changes
    }
}

/// The visibility changes that give a FIFO run back: its tails, then its head, all
/// with the same timeout — at least 1 s when there are tails.
///
/// SQS returns a group's visible messages up to its first invisible one, so any
/// order of changes is safe there. LocalStack (4.13.1, localstack#12457) hands out
/// a message made visible by `ChangeMessageVisibility` even while an earlier
/// message of its group is in flight; a run whose head and tails come back in one
/// requeue pass of its (once a second) timer cannot be split that way. So the whole
/// run goes back together after ≥ 1 s, the tails' deadlines no later than the
/// head's (tails first in the batch), and nothing is made visible at once while a
/// later message of its group is still in flight.
fn run_back(head: String, tails: Vec<Entry>, secs: i32) -> Changes {
    let secs = if tails.is_empty() { secs } else { secs.max(1) };
    let mut changes: Changes = tails.into_iter().map(|t| (t.receipt, secs)).collect();
    changes.push((head, secs));
    changes
}

/// What consumers, their acks and their tasks share.
pub(crate) struct Shared {
    pub queue: Arc<Queue>,
    held: Mutex<Held>,
    notify: Notify,
    closed: AtomicBool,
    pub deleter: Batcher<String>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queue", &self.queue.name)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The head of `group` was acked: its next message becomes the head.
    pub(crate) fn promote(&self, group: &str, head: &Arc<Lease>) {
        {
            let mut held = self.held();
            let Some(run) = held.runs.get_mut(group) else {
                return;
            };
            if !Arc::ptr_eq(&run.head, head) {
                return;
            }
            match run.tails.pop_front() {
                Some(next) => {
                    run.head = next.lease.clone();
                    run.head_receipt = next.receipt.clone();
                    run.head_out = false;
                    held.tails -= 1;
                    held.ready.push_back(next);
                }
                None => {
                    held.runs.remove(group);
                }
            }
        }
        self.notify.notify_waiters();
    }

    /// The head of `group` is being nacked or released: the changes that give back
    /// its whole run with it, the head's change last (see [`run_back`]).
    pub(crate) fn give_back_run(
        &self,
        group: &str,
        head: &Arc<Lease>,
        head_receipt: &str,
        secs: i32,
    ) -> Changes {
        let tails = self.held().take_run(group, head);
        run_back(head_receipt.to_string(), tails, secs)
    }

    /// The head of `group` is gone (lease ran out, or SQS said so): forget its run.
    /// The tails are not released: they were kept no longer than the head's lease,
    /// so SQS returns them with or after it, in order.
    pub(crate) fn forget_run(&self, group: &str, head: &Arc<Lease>) {
        let _ = self.held().take_run(group, head);
    }

    /// Make `changes` in the background; best effort — what is not changed comes
    /// back when its lease runs out.
    fn spawn_changes(self: &Arc<Self>, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let _ = change_visibility_batch(&queue, &changes).await;
        });
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Close: no more receives; give back everything buffered.
    fn close(self: &Arc<Self>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let changes = self.held().take_all();
        if tokio::runtime::Handle::try_current().is_ok() {
            self.spawn_changes(changes);
        }
        self.notify.notify_waiters();
    }

    fn delivery(self: &Arc<Self>, entry: Entry) -> Delivery {
        let deadline = entry.lease.deadline();
        let ack = SqsAck {
            shared: self.clone(),
            receipt: entry.receipt,
            lease: entry.lease,
            group: entry.group,
            message_id: entry.meta.id.to_string(),
        };
        Delivery::new(
            entry.message,
            entry.meta,
            AckHandle::with_lease(ack, deadline),
        )
        .with_capabilities(self.queue.caps.clone())
    }

    /// Whether another poll may start for a receive of up to `max` messages.
    ///
    /// One round trip brings at most 10 messages. Several receives sharing one
    /// consumer (tasks, or a worker and a tool) would otherwise all wait on one
    /// `ReceiveMessage`: four tasks gained +24 % over one where raw clients with a
    /// poll each gained +46 % (issue 9's bench). Likewise one receive asking for
    /// more than 10 (a `Worker` filling its prefetch) gets a poll per 10 while the
    /// last poll came back full; an idle queue's empty answers bring it back to one
    /// poll, so waiting costs no extra `ReceiveMessage` calls. A FIFO queue keeps one
    /// poll, so its group runs are placed in receive order.
    fn may_poll(&self, held: &Held, max: usize) -> bool {
        let limit = if self.queue.fifo() {
            1
        } else {
            let wanted = if held.backlog {
                max.div_ceil(MAX_BATCH)
            } else {
                1
            };
            held.waiters.max(wanted).clamp(1, MAX_POLLS)
        };
        held.polling < limit
    }

    /// Start a poll for up to `max` messages waiting up to `wait`, unless as many
    /// run as may (see [`may_poll`](Self::may_poll)).
    fn start_poll(self: &Arc<Self>, held: &mut Held, max: usize, wait: Duration) -> bool {
        if !self.may_poll(held, max) {
            return false;
        }
        // Room counts what the polls in flight may still bring.
        let room = self
            .queue
            .config
            .fifo_buffer
            .saturating_sub(held.buffered() + held.polling * MAX_BATCH);
        let n = max.min(MAX_BATCH).min(room);
        if n == 0 {
            return false;
        }
        held.polling += 1;
        let wait_secs = whole_seconds(wait.min(self.queue.config.wait));
        tokio::spawn(poll(self.clone(), n, wait_secs));
        true
    }

    /// Place freshly received entries: standard → ready; FIFO → a new run's head
    /// in ready, or behind its group's run.
    fn place(&self, held: &mut Held, entries: Vec<Entry>) {
        for entry in entries {
            match &entry.group {
                Some(group) => match held.runs.get_mut(group) {
                    Some(run) => {
                        run.tails.push_back(entry);
                        held.tails += 1;
                    }
                    None => {
                        held.runs.insert(
                            group.clone(),
                            Run {
                                head: entry.lease.clone(),
                                head_receipt: entry.receipt.clone(),
                                head_out: false,
                                tails: VecDeque::new(),
                            },
                        );
                        held.ready.push_back(entry);
                    }
                },
                None => held.ready.push_back(entry),
            }
        }
    }

    /// Hand out up to `max` ready entries.
    fn take_ready(self: &Arc<Self>, held: &mut Held, max: usize) -> Vec<Entry> {
        let n = max.min(held.ready.len());
        let entries: Vec<Entry> = held.ready.drain(..n).collect();
        for e in &entries {
            if let Some(run) = e.group.as_ref().and_then(|g| held.runs.get_mut(g)) {
                if Arc::ptr_eq(&run.head, &e.lease) {
                    run.head_out = true;
                }
            }
        }
        entries
    }

    /// Keep buffered leases alive, give back what is stale, forget what is lost.
    ///
    /// Leases we hold ourselves (ready entries, the tails of heads in `ready`) are
    /// extended to the visibility timeout once less than half of it is left. The
    /// tails of a head that is out follow the head's deadline instead, rounded down
    /// to whole seconds, never past it: should the head's lease run out (dropped,
    /// crashed), its tails come back with it or before it — and SQS does not hand
    /// out a later message of a group while an earlier one is in flight.
    async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let vis = self.queue.visibility();
        let vis_secs = self.queue.visibility_secs();
        let hold_limit = (vis * 2).max(Duration::from_secs(30));
        let mut back = Changes::new();
        let mut extend: Vec<(String, i32, Arc<Lease>)> = Vec::new();
        {
            let mut held = self.held();
            // Runs whose head is out and gone: forget them.
            let gone: Vec<(String, Arc<Lease>)> = held
                .runs
                .iter()
                .filter(|(_, run)| run.head_out && run.head.is_gone(now))
                .map(|(g, run)| (g.clone(), run.head.clone()))
                .collect();
            for (group, head) in gone {
                let _ = held.take_run(&group, &head);
            }
            // Ready entries waiting too long, near the 12 h cap, or lost: back, with
            // their runs.
            let (stale, keep): (Vec<Entry>, Vec<Entry>) = held.ready.drain(..).partition(|e| {
                now.saturating_duration_since(e.held_since) > hold_limit
                    || e.lease.held_for(now).saturating_add(vis) > MAX_VISIBILITY
                    || e.lease.is_gone(now)
            });
            held.ready = keep.into();
            for e in stale {
                let tails = match &e.group {
                    Some(group) => held.take_run(group, &e.lease),
                    None => Vec::new(),
                };
                if !e.lease.is_gone(now) {
                    back.extend(run_back(e.receipt, tails, 0));
                }
            }
            let due = |lease: &Lease| lease.deadline().saturating_duration_since(now) < vis / 2;
            for run in held.runs.values() {
                if run.head_out {
                    let left = run.head.deadline().saturating_duration_since(now);
                    let secs = i32::try_from(left.as_secs()).unwrap_or(i32::MAX);
                    let target = Duration::from_secs(left.as_secs());
                    for e in &run.tails {
                        let remaining = e.lease.deadline().saturating_duration_since(now);
                        if due(&e.lease)
                            && secs >= 1
                            && target > remaining + Duration::from_millis(250)
                        {
                            extend.push((e.receipt.clone(), secs, e.lease.clone()));
                        }
                    }
                } else if due(&run.head) || run.tails.iter().any(|e| due(&e.lease)) {
                    // The head waits in `ready`: the whole run is ours. Tails first,
                    // so the head's deadline is never earlier than its tails'.
                    for e in &run.tails {
                        extend.push((e.receipt.clone(), vis_secs, e.lease.clone()));
                    }
                    extend.push((run.head_receipt.clone(), vis_secs, run.head.clone()));
                }
            }
            for e in &held.ready {
                let in_a_run = e
                    .group
                    .as_ref()
                    .and_then(|g| held.runs.get(g))
                    .is_some_and(|run| Arc::ptr_eq(&run.head, &e.lease));
                if !in_a_run && due(&e.lease) {
                    extend.push((e.receipt.clone(), vis_secs, e.lease.clone()));
                }
            }
        }
        if !back.is_empty() {
            let _ = change_visibility_batch(&self.queue, &back).await;
        }
        if extend.is_empty() {
            return;
        }
        let asked_at = Instant::now();
        let changes: Changes = extend.iter().map(|(r, s, _)| (r.clone(), *s)).collect();
        let results = change_visibility_batch(&self.queue, &changes).await;
        let mut lost_any = false;
        for ((_, secs, lease), ok) in extend.iter().zip(results) {
            match ok {
                Ok(()) => lease.set_deadline(deadline_after(
                    asked_at,
                    Duration::from_secs(u64::try_from(*secs).unwrap_or(0)),
                )),
                Err(e) if e.kind() == ErrorKind::LeaseExpired => {
                    lease.lose();
                    lost_any = true;
                }
                // Transient: tried again next tick; the entry is dropped once its
                // lease runs out.
                Err(_) => {}
            }
        }
        if lost_any || extend.iter().any(|(_, _, l)| l.is_gone(Instant::now())) {
            self.drop_lost().await;
        }
    }

    /// Drop buffered entries whose lease is gone. A run missing a message cannot
    /// keep its order: its other tails are forgotten (they come back no later than
    /// their head), and it stays as a run without tails so that acking its head
    /// promotes nothing.
    async fn drop_lost(self: &Arc<Self>) {
        let now = Instant::now();
        let mut back = Changes::new();
        {
            let mut held = self.held();
            let (lost, keep): (Vec<Entry>, Vec<Entry>) =
                held.ready.drain(..).partition(|e| e.lease.is_gone(now));
            held.ready = keep.into();
            for e in lost {
                if let Some(group) = &e.group {
                    // A lost head in ready: its tails go back with at least 1 s.
                    let tails = held.take_run(group, &e.lease);
                    let changes: Changes = tails.into_iter().map(|t| (t.receipt, 1)).collect();
                    back.extend(changes);
                }
            }
            let broken: Vec<String> = held
                .runs
                .iter()
                .filter(|(_, run)| run.tails.iter().any(|e| e.lease.is_gone(now)))
                .map(|(g, _)| g.clone())
                .collect();
            for group in broken {
                if let Some(run) = held.runs.get_mut(&group) {
                    let n = run.tails.len();
                    run.tails.clear();
                    held.tails -= n;
                }
            }
        }
        if !back.is_empty() {
            let _ = change_visibility_batch(&self.queue, &back).await;
        }
    }
}

/// `ChangeMessageVisibilityBatch` over `changes` (chunks of 10, in order), one
/// result each.
pub(crate) async fn change_visibility_batch(
    queue: &Queue,
    changes: &[(String, i32)],
) -> Vec<Result<()>> {
    let mut results = Vec::with_capacity(changes.len());
    for chunk in changes.chunks(MAX_BATCH) {
        let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, (r, secs))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(*secs)
                    .build()
                    .ok()
            })
            .collect();
        let out = queue
            .client
            .change_message_visibility_batch()
            .queue_url(queue.url())
            .set_entries(Some(entries))
            .send()
            .await;
        let mut chunk_results: Vec<Result<()>> = (0..chunk.len()).map(|_| Ok(())).collect();
        match out {
            Ok(out) => {
                for failed in out.failed {
                    if let Some(slot) = failed
                        .id
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| chunk_results.get_mut(i))
                    {
                        *slot = Err(Error::new(
                            batch_entry_kind(
                                &failed.code,
                                failed.message.as_deref(),
                                failed.sender_fault,
                                Call::Other,
                            ),
                            format!(
                                "SQS ChangeMessageVisibilityBatch entry on queue {}: {} ({})",
                                queue.name,
                                failed.message.unwrap_or_default(),
                                failed.code
                            ),
                        ));
                    }
                }
            }
            Err(e) => {
                let e = map_sdk(&queue.what("ChangeMessageVisibilityBatch"), Call::Other, e);
                tracing::debug!(error = %e, "ferrymq-sqs: visibility change failed");
                for slot in &mut chunk_results {
                    *slot = Err(Error::new(e.kind(), e.message()));
                }
            }
        }
        results.extend(chunk_results);
    }
    results
}

/// `DeleteMessageBatch` over up to 10 receipts, one result each.
pub(crate) async fn delete_batch(queue: &Queue, receipts: Vec<String>) -> Vec<Result<()>> {
    let entries: Vec<DeleteMessageBatchRequestEntry> = receipts
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .build()
                .ok()
        })
        .collect();
    let out = queue
        .client
        .delete_message_batch()
        .queue_url(queue.url())
        .set_entries(Some(entries))
        .send()
        .await;
    let mut results: Vec<Result<()>> = (0..receipts.len()).map(|_| Ok(())).collect();
    match out {
        Ok(out) => {
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
                        Call::Other,
                    );
                    *slot = Err(Error::new(
                        kind,
                        format!(
                            "SQS DeleteMessageBatch entry on queue {}: {} ({})",
                            queue.name,
                            failed.message.unwrap_or_default(),
                            failed.code
                        ),
                    ));
                }
            }
        }
        Err(e) => {
            let e = map_sdk(&queue.what("DeleteMessageBatch"), Call::Other, e);
            for slot in &mut results {
                *slot = Err(Error::new(e.kind(), e.message()));
            }
        }
    }
    results
}

fn system_attributes() -> Vec<MessageSystemAttributeName> {
    vec![
        MessageSystemAttributeName::ApproximateReceiveCount,
        MessageSystemAttributeName::SentTimestamp,
        MessageSystemAttributeName::MessageGroupId,
        MessageSystemAttributeName::MessageDeduplicationId,
        MessageSystemAttributeName::SequenceNumber,
    ]
}

/// One `ReceiveMessage`; its messages go into the buffer.
async fn poll(shared: Arc<Shared>, max: usize, wait_secs: i32) {
    let queue = &shared.queue;
    let sent_at = Instant::now();
    let fifo = queue.fifo();
    let wait = Duration::from_secs(u64::try_from(wait_secs).unwrap_or(0));
    let result = queue
        .client
        .receive_message()
        .queue_url(queue.url())
        .max_number_of_messages(i32::try_from(max).unwrap_or(10))
        .wait_time_seconds(wait_secs)
        .visibility_timeout(queue.visibility_secs())
        .set_message_system_attribute_names(Some(system_attributes()))
        .message_attribute_names("All")
        // FIFO: an SDK retry of a receive whose answer was lost gets the same messages
        // back instead of leaving them (and their groups) locked.
        .set_receive_request_attempt_id(fifo.then(|| format!("{:032x}", rand::random::<u128>())))
        .customize()
        .config_override(
            aws_sdk_sqs::config::Builder::default().timeout_config(timeouts(&queue.config, wait)),
        )
        .send()
        .await;
    let now = Instant::now();
    let result = match result {
        Ok(out) => {
            let entries: Vec<Entry> = out
                .messages
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| entry(queue, m, sent_at, now))
                .collect();
            reanchor(queue, &entries, now.saturating_duration_since(sent_at)).await;
            Ok(entries)
        }
        Err(e) => Err(e),
    };
    let mut release = Vec::new();
    {
        let mut held = shared.held();
        held.polling = held.polling.saturating_sub(1);
        held.polls_done += 1;
        match result {
            Ok(entries) => {
                held.backlog = entries.len() >= max;
                if shared.is_closed() {
                    release.extend(entries.into_iter().map(|e| e.receipt));
                } else {
                    shared.place(&mut held, entries);
                }
            }
            Err(e) => {
                held.backlog = false;
                let e = map_sdk(&queue.what("ReceiveMessage"), Call::Other, e);
                if held.waiters > 0 {
                    held.error = Some(e);
                } else {
                    tracing::warn!(error = %e, "ferrymq-sqs: a background receive failed");
                }
            }
        }
    }
    shared.notify.notify_waiters();
    if !release.is_empty() {
        let changes: Changes = release.into_iter().map(|r| (r, 0)).collect();
        let _ = change_visibility_batch(queue, &changes).await;
    }
}

/// A long poll that waited before its messages came: SQS started their visibility
/// timeout when it handed them out, somewhere between the request and the answer,
/// and the local lease clock must not run later than SQS's. It starts at the
/// request (early by up to the wait); when that cost more than a tenth of the
/// visibility timeout, one `ChangeMessageVisibilityBatch` restarts the leases at a
/// known time, so deliveries of an idle queue do not arrive with their lease half
/// gone. A busy queue's polls answer at once and never pay for this.
async fn reanchor(queue: &Queue, entries: &[Entry], waited: Duration) {
    let threshold = (queue.visibility() / 10).max(Duration::from_millis(100));
    if entries.is_empty() || waited <= threshold {
        return;
    }
    let mut changes: Changes = entries
        .iter()
        .map(|e| (e.receipt.clone(), queue.visibility_secs()))
        .collect();
    // FIFO: later messages first, so no head's deadline is earlier than its tails'.
    if queue.fifo() {
        changes.reverse();
    }
    let asked_at = Instant::now();
    let results = change_visibility_batch(queue, &changes).await;
    let mut results = results;
    if queue.fifo() {
        results.reverse();
    }
    for (entry, result) in entries.iter().zip(results) {
        match result {
            Ok(()) => entry
                .lease
                .set_deadline(deadline_after(asked_at, queue.visibility())),
            Err(e) if e.kind() == ErrorKind::LeaseExpired => entry.lease.lose(),
            Err(_) => {}
        }
    }
}

/// A received SQS message as a buffered entry.
fn entry(
    queue: &Queue,
    m: aws_sdk_sqs::types::Message,
    sent_at: Instant,
    now: Instant,
) -> Option<Entry> {
    let receipt = m.receipt_handle?;
    let system = m.attributes;
    let get = |name: MessageSystemAttributeName| system.as_ref().and_then(|s| s.get(&name));
    let fifo = queue.fifo();
    let message = match codec::decode(
        m.body.as_deref(),
        m.message_attributes.as_ref(),
        system.as_ref(),
        fifo,
    ) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(queue = %queue.name, error = %e, "ferrymq-sqs: a message could not be decoded; delivering its raw body");
            Message::new(m.body.unwrap_or_default())
        }
    };
    let attempt = get(MessageSystemAttributeName::ApproximateReceiveCount)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let enqueued_at = get(MessageSystemAttributeName::SentTimestamp)
        .and_then(|v| v.parse::<u64>().ok())
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .unwrap_or_else(SystemTime::now);
    let mut meta = DeliveryMeta::new(
        m.message_id.unwrap_or_default(),
        attempt,
        enqueued_at,
        queue.name.clone(),
    );
    if let Some(seq) = get(MessageSystemAttributeName::SequenceNumber) {
        meta = meta.with_position(seq.clone());
    }
    let group = if fifo {
        get(MessageSystemAttributeName::MessageGroupId).cloned()
    } else {
        None
    };
    Some(Entry {
        message,
        meta,
        receipt,
        lease: Arc::new(Lease::new(sent_at, queue.visibility())),
        group,
        held_since: now,
    })
}

/// Receives from one SQS queue.
///
/// See the [module docs](self) for long polls, cancellation and FIFO runs.
/// Dropping the consumer closes it: buffered messages are released.
#[derive(Debug)]
pub struct SqsConsumer {
    shared: Arc<Shared>,
    maintenance: tokio::task::AbortHandle,
}

impl SqsConsumer {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        let deleter = {
            let queue = queue.clone();
            Batcher::spawn(
                "DeleteMessageBatch",
                BatchConfig::new(MAX_BATCH).linger(queue.config.ack_linger),
                move |receipts: Vec<String>| {
                    let queue = queue.clone();
                    async move { delete_batch(&queue, receipts).await }
                },
            )
        };
        let shared = Arc::new(Shared {
            queue,
            held: Mutex::new(Held::default()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            deleter,
        });
        let maintenance = tokio::spawn(maintain_loop(Arc::downgrade(&shared))).abort_handle();
        SqsConsumer {
            shared,
            maintenance,
        }
    }

    /// The queue URL.
    pub fn queue_url(&self) -> &str {
        self.shared.queue.url()
    }

    /// Messages this consumer holds without having handed them out (FIFO runs behind
    /// their heads, and what a cancelled receive brought).
    pub fn buffered(&self) -> usize {
        self.shared.held().buffered()
    }
}

async fn maintain_loop(weak: Weak<Shared>) {
    let tick = {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        (shared.queue.visibility() / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        if shared.is_closed() {
            return;
        }
        shared.maintain().await;
    }
}

impl Drop for SqsConsumer {
    fn drop(&mut self) {
        self.maintenance.abort();
        self.shared.close();
    }
}

#[async_trait]
impl Consumer for SqsConsumer {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let shared = &self.shared;
        if shared.is_closed() {
            return Err(Error::closed("SQS consumer"));
        }
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = deadline_in(wait);
        // With no wait, one short poll of our own is still made and waited for.
        let mut must_see: Option<u64> = None;
        let mut waiting = WaiterGuard {
            shared,
            counted: false,
        };
        loop {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = shared.held();
                if !held.ready.is_empty() {
                    let entries = shared.take_ready(&mut held, max);
                    drop(held);
                    return Ok(entries.into_iter().map(|e| shared.delivery(e)).collect());
                }
                if let Some(e) = held.error.take() {
                    return Err(e);
                }
                if shared.is_closed() {
                    return Err(Error::closed("SQS consumer"));
                }
                let now = Instant::now();
                let ours_done = must_see.is_none_or(|gen| held.polls_done > gen);
                if now >= deadline && ours_done {
                    return Ok(Vec::new());
                }
                // Counted first: the number of waiting receives bounds the polls.
                if !waiting.counted {
                    held.waiters += 1;
                    waiting.counted = true;
                }
                let gen = held.polls_done;
                while shared.start_poll(&mut held, max, deadline.saturating_duration_since(now)) {
                    if wait.is_zero() && must_see.is_none() {
                        must_see = Some(gen);
                    }
                }
            }
            if must_see.is_some() {
                notified.await;
            } else {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
    }

    async fn depth(&self) -> Result<Depth> {
        self.shared.queue.depth().await
    }

    async fn close(&self) -> Result<()> {
        self.shared.close();
        Ok(())
    }

    fn queue(&self) -> &str {
        &self.shared.queue.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.queue.caps
    }
}

/// Counts a waiting receive (so a failed background poll reports to it) until the
/// receive returns or is dropped.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    counted: bool,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if self.counted {
            let mut held = self.shared.held();
            held.waiters = held.waiters.saturating_sub(1);
        }
    }
}

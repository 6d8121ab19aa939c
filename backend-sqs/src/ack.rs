//! Settling one delivery: ack (batched delete), nack / release / extend
//! (`ChangeMessageVisibility`), with a client-side lease clock.
//!
//! SQS and its emulators accept a stale receipt handle: deleting through a handle
//! whose visibility timeout passed may delete a message another consumer is working
//! on now. So every delivery keeps its lease on the local clock — the time the
//! receive was *sent* plus the visibility timeout, moved by each successful extend,
//! so it errs on the early side — and past that deadline every settle answers
//! `LeaseExpired` without calling SQS. The worst case is a duplicate delivery,
//! never an unsafe delete.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::time::deadline_after;
use ferrymq_core::{Ack, Error, ErrorKind, Result};
use tokio::time::Instant;

use crate::config::{whole_seconds, MAX_VISIBILITY};
use crate::consumer::{change_visibility_batch, Shared};
use crate::error::{map_sdk, Call};

const LIVE: u8 = 0;
const SETTLED: u8 = 1;
const LOST: u8 = 2;

/// One received message's lease, shared by its delivery and the consumer's buffer.
#[derive(Debug)]
pub(crate) struct Lease {
    /// When the receive that leased it was sent (the 12 h cap counts from here).
    pub received: Instant,
    deadline: Mutex<Instant>,
    state: AtomicU8,
}

impl Lease {
    pub(crate) fn new(received: Instant, visibility: Duration) -> Self {
        Lease {
            received,
            deadline: Mutex::new(deadline_after(received, visibility)),
            state: AtomicU8::new(LIVE),
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_deadline(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
    }

    /// Settled through its delivery (acked, nacked, released).
    pub(crate) fn settle(&self) {
        let _ = self
            .state
            .compare_exchange(LIVE, SETTLED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Known to be no longer ours.
    pub(crate) fn lose(&self) {
        let _ = self
            .state
            .compare_exchange(LIVE, LOST, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(crate) fn is_settled(&self) -> bool {
        self.state.load(Ordering::Acquire) == SETTLED
    }

    /// Past its deadline or lost (and not settled): nobody may settle through it.
    pub(crate) fn is_gone(&self, now: Instant) -> bool {
        match self.state.load(Ordering::Acquire) {
            LIVE => now >= self.deadline(),
            LOST => true,
            _ => false,
        }
    }

    /// How long it has been leased, from the receive.
    pub(crate) fn held_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.received)
    }
}

fn lease_expired(queue: &str) -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        format!(
            "the lease of this delivery from SQS queue {queue} ran out (receive time plus the \
             visibility timeout, moved by extends): SQS may have handed the message to \
             another consumer, so it was not settled through this handle"
        ),
    )
}

/// One delivery's settle handle.
pub(crate) struct SqsAck {
    pub shared: Arc<Shared>,
    pub receipt: String,
    pub lease: Arc<Lease>,
    /// FIFO: the message group, whose buffered run follows this head.
    pub group: Option<String>,
    pub message_id: String,
}

impl std::fmt::Debug for SqsAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsAck")
            .field("queue", &self.shared.queue.name)
            .field("message_id", &self.message_id)
            .field("group", &self.group)
            .field("lease_deadline", &self.lease.deadline())
            .finish()
    }
}

impl SqsAck {
    fn check_lease(&self) -> Result<()> {
        if self.lease.is_gone(Instant::now()) {
            self.lease.lose();
            self.after_lost();
            return Err(lease_expired(&self.shared.queue.name));
        }
        Ok(())
    }

    /// The head of a FIFO run is gone: forget its run (its tails run out no later
    /// than it did).
    fn after_lost(&self) {
        if let Some(group) = &self.group {
            self.shared.forget_run(group, &self.lease);
        }
    }

    /// Refuse a visibility that would end more than 12 h after the receive.
    fn check_cap(&self, what: &str, by: Duration) -> Result<()> {
        let held = self.lease.held_for(Instant::now());
        if held.saturating_add(by) > MAX_VISIBILITY {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{what} of {by:?} would keep the message invisible past 12 h from its \
                     receive ({held:?} ago), SQS's cap (Capabilities::max_visibility); the lease \
                     is unchanged"
                ),
            ));
        }
        Ok(())
    }

    async fn change_visibility(&self, op: &str, secs: i32) -> Result<()> {
        let queue = &self.shared.queue;
        let result = queue
            .client
            .change_message_visibility()
            .queue_url(queue.url())
            .receipt_handle(&self.receipt)
            .visibility_timeout(secs)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = map_sdk(&queue.what(op), Call::Other, e);
                if e.kind() == ErrorKind::LeaseExpired {
                    self.lease.lose();
                    self.after_lost();
                }
                Err(e)
            }
        }
    }

    async fn give_back(&self, op: &str, redeliver_after: Option<Duration>) -> Result<()> {
        let delay = redeliver_after.unwrap_or_default();
        self.shared.queue.caps.check_nack_delay(Some(delay))?;
        self.check_cap(op, delay)?;
        self.check_lease()?;
        let secs = whole_seconds(delay);
        let changes = match &self.group {
            Some(group) => self
                .shared
                .give_back_run(group, &self.lease, &self.receipt, secs),
            None => Vec::new(),
        };
        if changes.len() > 1 {
            // A FIFO head with its run: all in one call, the head last.
            let results = change_visibility_batch(&self.shared.queue, &changes).await;
            match results.into_iter().last() {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    if e.kind() == ErrorKind::LeaseExpired {
                        self.lease.lose();
                    }
                    return Err(e);
                }
                None => {}
            }
        } else {
            self.change_visibility(op, secs).await?;
        }
        self.lease.settle();
        Ok(())
    }
}

#[async_trait]
impl Ack for SqsAck {
    async fn ack(&self) -> Result<()> {
        self.check_lease()?;
        match self.shared.deleter.submit(self.receipt.clone()).await {
            Ok(()) => {
                self.lease.settle();
                if let Some(group) = &self.group {
                    self.shared.promote(group, &self.lease);
                }
                Ok(())
            }
            Err(e) => {
                if e.kind() == ErrorKind::LeaseExpired {
                    self.lease.lose();
                    self.after_lost();
                }
                Err(e)
            }
        }
    }

    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.give_back("ChangeMessageVisibility (nack)", redeliver_after)
            .await
    }

    async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        // SQS counts every receive: a release is a nack with the same effect.
        self.give_back("ChangeMessageVisibility (release)", redeliver_after)
            .await
    }

    async fn extend(&self, by: Duration) -> Result<()> {
        self.check_cap("an extend", by)?;
        self.check_lease()?;
        let asked_at = Instant::now();
        self.change_visibility("ChangeMessageVisibility (extend)", whole_seconds(by))
            .await?;
        self.lease.set_deadline(deadline_after(asked_at, by));
        Ok(())
    }

    fn is_live(&self) -> bool {
        !self.lease.is_gone(Instant::now()) && !self.lease.is_settled()
    }
}

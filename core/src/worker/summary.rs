use std::fmt;
use std::time::Duration;

use crate::middleware::Outcome;

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerSummary {
    /// Deliveries received.
    pub received: u64,
    /// Handled and acked.
    pub succeeded: u64,
    /// Failed and nacked with a delay for another attempt.
    pub retried: u64,
    /// Published to the DLQ and acked.
    pub dead_lettered: u64,
    /// Acked as duplicates without calling the handler.
    pub deduplicated: u64,
    /// Deferred because another consumer held the dedup claim.
    pub deferred: u64,
    /// Failed and nacked by the worker (or settling failed).
    pub failed: u64,
    /// Received but not started: released at shutdown, or because its lease had too
    /// little time left to start it (see `expired`).
    pub released: u64,
    /// Of `released`: given back unstarted because the lease was gone or about to
    /// go, so that its redelivery is the only run.
    pub expired: u64,
    /// Still running at the shutdown deadline: cancelled and released.
    pub abandoned: u64,
    /// Deliveries the worker gave back (released or nacked) whose give-back failed,
    /// or did not finish before the shutdown deadline: they are counted in their
    /// outcome too (`released`, `abandoned`, `failed`), and come back only after
    /// their visibility timeout.
    pub release_failed: u64,
    /// Handler panics caught (also counted in their outcome).
    pub panics: u64,
    /// How long the worker ran.
    pub elapsed: Duration,
}

impl WorkerSummary {
    pub(super) fn count(&mut self, outcome: Outcome) {
        let slot = match outcome {
            Outcome::Succeeded => &mut self.succeeded,
            Outcome::Retried { .. } => &mut self.retried,
            Outcome::DeadLettered => &mut self.dead_lettered,
            Outcome::Deduplicated => &mut self.deduplicated,
            Outcome::Deferred => &mut self.deferred,
            Outcome::Failed => &mut self.failed,
            Outcome::Released => &mut self.released,
            Outcome::Abandoned => &mut self.abandoned,
        };
        *slot += 1;
    }

    /// Deliveries whose outcome is known: everything received, once the worker stopped.
    pub fn settled(&self) -> u64 {
        self.succeeded
            + self.retried
            + self.dead_lettered
            + self.deduplicated
            + self.deferred
            + self.failed
            + self.released
            + self.abandoned
    }
}

impl fmt::Display for WorkerSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, succeeded {}, retried {}, dead-lettered {}, deduplicated {}, \
             deferred {}, failed {}, released {}, abandoned {}, give-backs failed {} in {:.2?}",
            self.received,
            self.succeeded,
            self.retried,
            self.dead_lettered,
            self.deduplicated,
            self.deferred,
            self.failed,
            self.released,
            self.abandoned,
            self.release_failed,
            self.elapsed
        )
    }
}

//! What happened to a delivery, reported by the middleware to whoever drives them.
//!
//! A handler stack returns `Result<(), BoxError>`, which cannot tell "retried later"
//! from "dead-lettered" from "skipped as a duplicate". Rather than widen every
//! middleware's response type, each layer calls [`record`] with what it did; the
//! [`Worker`](crate::worker::Worker) runs the stack inside [`scope`] and reads the last
//! recorded outcome. Outside a scope, [`record`] is a no-op, so the middleware work
//! unchanged without a worker. Custom middleware may record outcomes too.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

/// The fate of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Handled and acked.
    Succeeded,
    /// Failed and nacked for a later attempt, after this delay.
    Retried {
        /// The redelivery delay asked of the broker.
        after: Duration,
    },
    /// Published to the dead-letter queue and acked in the source queue.
    DeadLettered,
    /// Recognised as already handled: acked without calling the handler.
    Deduplicated,
    /// Another consumer is handling the same key right now: nacked for later.
    Deferred,
    /// Failed and left unhandled (nacked by the worker, or settling failed).
    Failed,
    /// Received but not started before shutdown: released (nack without delay).
    Released,
    /// Still running at the shutdown deadline: cancelled and released.
    Abandoned,
}

impl Outcome {
    /// A short lowercase name, used in spans, metrics labels and events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried { .. } => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Deduplicated => "deduplicated",
            Outcome::Deferred => "deferred",
            Outcome::Failed => "failed",
            Outcome::Released => "released",
            Outcome::Abandoned => "abandoned",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

tokio::task_local! {
    static OUTCOME: Cell<Option<Outcome>>;
}

/// Record what happened to the delivery being handled. The last record wins.
/// A no-op outside [`scope`].
pub fn record(outcome: Outcome) {
    let _ = OUTCOME.try_with(|cell| cell.set(Some(outcome)));
}

/// The outcome recorded so far in this handler scope, if any (`None` outside one).
pub fn current() -> Option<Outcome> {
    OUTCOME.try_with(Cell::get).ok().flatten()
}

/// Run `f` (one poll of a handler) in a scope that starts with `recorded` (what
/// the handler's earlier polls recorded), and return its result with what is
/// recorded at its end: [`scope`] one poll at a time, for a future that is
/// polled by hand (the worker's) rather than wrapped.
pub(crate) fn poll_scoped<R>(
    recorded: Option<Outcome>,
    f: impl FnOnce() -> R,
) -> (R, Option<Outcome>) {
    OUTCOME.sync_scope(Cell::new(recorded), || {
        let output = f();
        (output, OUTCOME.try_with(Cell::get).ok().flatten())
    })
}

/// Run `future` and return its output together with the outcome recorded inside it.
pub async fn scope<F: Future>(future: F) -> (F::Output, Option<Outcome>) {
    OUTCOME
        .scope(Cell::new(None), async move {
            let output = future.await;
            let outcome = OUTCOME.try_with(Cell::get).ok().flatten();
            (output, outcome)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn last_record_wins_and_outside_scope_is_noop() {
        record(Outcome::Failed);
        let ((), got) = scope(async {
            record(Outcome::Retried {
                after: Duration::from_secs(1),
            });
            tokio::task::yield_now().await;
            record(Outcome::DeadLettered);
        })
        .await;
        assert_eq!(got, Some(Outcome::DeadLettered));
        let ((), none) = scope(async {}).await;
        assert_eq!(none, None);
    }
}

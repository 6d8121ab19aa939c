use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::Service;

use super::dead_letter::{dead_letter_message, parse_rfc3339};
use super::failures::Seen;
use super::layer::RetryConfig;
use crate::delivery::Delivery;
use crate::error::{BoxError, Error, ErrorKind};
use crate::message::reserved;
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::{is_permanent, BoxFuture};

/// Retries failed deliveries with backoff, then dead-letters them; see the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct RetryToDlq<S> {
    inner: S,
    config: Arc<RetryConfig>,
}

impl<S> RetryToDlq<S> {
    pub(super) fn from_parts(inner: S, config: Arc<RetryConfig>) -> Self {
        RetryToDlq { inner, config }
    }
}

impl<S> Service<Delivery> for RetryToDlq<S>
where
    S: Service<Delivery, Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = RetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let handling = self.inner.call(delivery.clone());
        RetryFuture {
            state: RetryState::Handling {
                handling,
                delivery: Some(delivery),
                config: self.config.clone(),
            },
        }
    }
}

pin_project! {
    /// Future of [`RetryToDlq`]. The success path is the inner future and nothing
    /// else (no allocation); only a failure boxes the retry-or-dead-letter work.
    pub struct RetryFuture<F> {
        #[pin]
        state: RetryState<F>,
    }
}

pin_project! {
    #[project = RetryStateProj]
    enum RetryState<F> {
        Handling {
            #[pin]
            handling: F,
            delivery: Option<Delivery>,
            config: Arc<RetryConfig>,
        },
        Failing {
            failing: BoxFuture<Result<(), BoxError>>,
        },
        Done,
    }
}

impl<F> std::fmt::Debug for RetryFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for RetryFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                RetryStateProj::Handling {
                    handling,
                    delivery,
                    config,
                } => {
                    let result = match handling.poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(result) => result.map_err(Into::into),
                    };
                    let Some(delivery) = delivery.take() else {
                        state.set(RetryState::Done);
                        return Poll::Ready(
                            Err("RetryToDlq future polled after completion".into()),
                        );
                    };
                    match result {
                        Ok(()) => {
                            if !config.failures.is_empty() {
                                if let Some(key) = failure_key(&delivery) {
                                    config.failures.forget(&key);
                                }
                            }
                            state.set(RetryState::Done);
                            return Poll::Ready(Ok(()));
                        }
                        Err(error) => {
                            let config = config.clone();
                            state.set(RetryState::Failing {
                                failing: Box::pin(async move {
                                    config.on_failure(&delivery, error).await
                                }),
                            });
                        }
                    }
                }
                RetryStateProj::Failing { failing } => {
                    let output = std::task::ready!(failing.as_mut().poll(cx));
                    state.set(RetryState::Done);
                    return Poll::Ready(output);
                }
                RetryStateProj::Done => {
                    return Poll::Ready(Err("RetryToDlq future polled after completion".into()))
                }
            }
        }
    }
}

/// Identifies "the same message" across redeliveries in the failure table: the queue
/// and the message's dedup id (the producer said those are one message), else the
/// backend's message id, which is stable across redeliveries (SQS MessageId, the
/// Redis stable id, the memory sequence number). Never the content: two different
/// orders with byte-identical payloads must not share a failure count. `None` when
/// the backend gave no id at all: then only its own attempt count is used.
fn failure_key(delivery: &Delivery) -> Option<String> {
    let queue = &delivery.meta().queue;
    match delivery.message().get_dedup_id() {
        Some(id) => Some(format!("{queue}/id:{id}")),
        None if delivery.id().is_empty() => None,
        None => Some(format!("{queue}/msg:{}", delivery.id())),
    }
}

impl RetryConfig {
    /// The attempt at which a message is dead-lettered on this delivery's backend:
    /// `max_attempts`, but no more than the broker's own dead-letter threshold — past
    /// it the broker would move the message itself, without the middleware's headers
    /// and without the handler's error.
    fn max_attempts_for(&self, delivery: &Delivery) -> u32 {
        let native = delivery
            .capabilities()
            .and_then(|c| c.native_dead_letter_after)
            .map(|n| n.max(1));
        match native {
            Some(n) if n < self.max_attempts => {
                if !self.warned_native_limit.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        queue = %delivery.meta().queue,
                        max_attempts = self.max_attempts,
                        native_dead_letter_after = n,
                        "RetryToDlq max_attempts is above the broker's own dead-letter threshold; dead-lettering after {n} attempts instead"
                    );
                }
                n
            }
            _ => self.max_attempts,
        }
    }

    /// The redelivery delay to ask for after failed attempt `attempt`: the backoff,
    /// capped at the backend's longest nack delay. `None` (redeliver at once) when the
    /// backend cannot delay a nack: asking anyway would be refused, and the message
    /// would wait for its visibility timeout — or, without leases, never come back.
    /// A plain nack rather than a release: the attempt failed and must count, or
    /// `max_attempts` could never be reached on the backend's own count.
    fn retry_delay(&self, delivery: &Delivery, attempt: u32) -> Option<Duration> {
        let wanted = self.backoff.delay(attempt);
        match delivery.capabilities() {
            Some(caps) => caps.clamp_nack_delay(wanted),
            // Not said: assume full support.
            None => Some(wanted),
        }
        .filter(|d| !d.is_zero())
    }

    async fn on_failure(&self, delivery: &Delivery, error: BoxError) -> Result<(), BoxError> {
        if delivery.acker().is_settled() {
            // The handler settled it itself; nothing left to decide.
            return Err(error);
        }
        let key = failure_key(delivery);
        let now = (self.now)();
        let seen = match &key {
            Some(key) => self.failures.record(key, now),
            None => Seen {
                first_at: now,
                failures: 1,
                new: true,
            },
        };
        // The local count bounds the attempts on a backend that does not count them
        // (every delivery says 1) and cannot delay a redelivery either.
        let attempt = delivery.attempt().max(seen.failures);
        let max_attempts = self.max_attempts_for(delivery);
        let permanent = is_permanent(&*error);
        let meta = delivery.meta();

        if !permanent && attempt < max_attempts {
            let after = self.retry_delay(delivery, attempt);
            match delivery.nack(after).await {
                // A backend that dead-letters natively on this nack (Redis
                // `max_deliveries`) records that itself: it is not a retry.
                Ok(()) if outcome::current() == Some(Outcome::DeadLettered) => {
                    tracing::warn!(queue = %meta.queue, id = %meta.id, attempt, %error, "handler failed; the backend dead-lettered the message on its nack");
                }
                Ok(()) => {
                    tracing::info!(queue = %meta.queue, id = %meta.id, attempt, retry_in = ?after, %error, "handler failed; retrying later");
                    outcome::record(Outcome::Retried {
                        after: after.unwrap_or_default(),
                    });
                }
                Err(e) => {
                    tracing::warn!(queue = %meta.queue, id = %meta.id, attempt, %error, nack_error = %e, "handler failed and the nack failed; the message returns after its visibility timeout");
                    outcome::record(Outcome::Failed);
                }
            }
            return Err(error);
        }

        let first_failure_at = delivery
            .headers()
            .get(reserved::FIRST_FAILURE_AT)
            .and_then(parse_rfc3339)
            .unwrap_or(if !seen.new || attempt <= 1 {
                seen.first_at
            } else {
                meta.enqueued_at.min(now)
            });
        let reason = error.to_string();
        let message = dead_letter_message(delivery, &reason, attempt, first_failure_at, now);
        let published = match self.dlq.send(message).await {
            // The DLQ said it dropped the copy: acking now would leave the message in
            // neither queue. `dead_letter_message` sends no dedup id, so this takes a
            // DLQ deduplicating on something else; it is a failed publish all the same.
            Ok(receipt) if receipt.is_duplicate() => Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "the DLQ answered that it dropped the copy as a duplicate (receipt {:?})",
                    receipt.id()
                ),
            )),
            other => other,
        };
        match published {
            Ok(_) => {
                if let Some(key) = &key {
                    self.failures.forget(key);
                }
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(queue = %meta.queue, id = %meta.id, error = %e, "dead-lettered, but the ack failed: the message may be dead-lettered twice");
                }
                tracing::warn!(queue = %meta.queue, id = %meta.id, attempt, permanent, dlq = %self.dlq.queue(), %reason, "message dead-lettered");
                outcome::record(Outcome::DeadLettered);
                Err(error)
            }
            Err(e) => {
                let after = self.retry_delay(delivery, attempt);
                tracing::error!(queue = %meta.queue, id = %meta.id, dlq = %self.dlq.queue(), error = %e, "publishing to the DLQ failed; nothing acked");
                if let Err(nack) = delivery.nack(after).await {
                    tracing::warn!(id = %meta.id, error = %nack, "nack after a failed DLQ publish failed");
                }
                outcome::record(Outcome::Failed);
                Err(Box::new(
                    Error::new(
                        e.kind(),
                        format!(
                            "dead-lettering to {} failed, message left in {} (handler error: {reason})",
                            self.dlq.queue(),
                            meta.queue
                        ),
                    )
                    .with_source(e),
                ))
            }
        }
    }
}

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::dead_letter::{dead_letter_message, parse_rfc3339};
use super::layer::RetryConfig;
use crate::delivery::Delivery;
use crate::error::{BoxError, Error};
use crate::message::reserved;
use crate::middleware::dedup::dedup_key;
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
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let handling = self.inner.call(delivery.clone());
        let config = self.config.clone();
        Box::pin(async move {
            match handling.await.map_err(Into::into) {
                Ok(()) => {
                    if !config.failures.is_empty() {
                        config.failures.forget(&failure_key(&delivery));
                    }
                    Ok(())
                }
                Err(error) => config.on_failure(&delivery, error).await,
            }
        })
    }
}

/// Identifies "the same message" across redeliveries, also on backends that
/// re-produce a message under a new id on nack.
fn failure_key(delivery: &Delivery) -> String {
    dedup_key(&delivery.meta().queue, delivery)
}

impl RetryConfig {
    async fn on_failure(&self, delivery: &Delivery, error: BoxError) -> Result<(), BoxError> {
        if delivery.acker().is_settled() {
            // The handler settled it itself; nothing left to decide.
            return Err(error);
        }
        let key = failure_key(delivery);
        let now = (self.now)();
        let seen = self.failures.record(&key, now);
        let attempt = delivery.attempt().max(seen.failures);
        let permanent = is_permanent(&*error);
        let meta = delivery.meta();

        if !permanent && attempt < self.max_attempts {
            let after = self.backoff.delay(attempt);
            match delivery.nack(Some(after)).await {
                Ok(()) => {
                    tracing::info!(queue = %meta.queue, id = %meta.id, attempt, retry_in = ?after, %error, "handler failed; retrying later");
                    outcome::record(Outcome::Retried { after });
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
        match self.dlq.send(message).await {
            Ok(_) => {
                self.failures.forget(&key);
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(queue = %meta.queue, id = %meta.id, error = %e, "dead-lettered, but the ack failed: the message may be dead-lettered twice");
                }
                tracing::warn!(queue = %meta.queue, id = %meta.id, attempt, permanent, dlq = %self.dlq.queue(), %reason, "message dead-lettered");
                outcome::record(Outcome::DeadLettered);
                Err(error)
            }
            Err(e) => {
                let after = self.backoff.delay(attempt);
                tracing::error!(queue = %meta.queue, id = %meta.id, dlq = %self.dlq.queue(), error = %e, "publishing to the DLQ failed; nothing acked");
                if let Err(nack) = delivery.nack(Some(after)).await {
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

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

use super::layer::DedupConfig;
use super::{dedup_key, Claim, ClaimToken, DedupStore};
use crate::delivery::Delivery;
use crate::error::BoxError;
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::BoxFuture;

/// Skips deliveries already handled; see the [module docs](super).
///
/// The inner service must be `Clone` (the tower convention for middleware that call
/// their inner service from inside a future): the claim is awaited before the
/// handler is called.
#[derive(Debug, Clone)]
pub struct Dedup<S> {
    inner: S,
    config: Arc<DedupConfig>,
}

impl<S> Dedup<S> {
    pub(super) fn from_parts(inner: S, config: Arc<DedupConfig>) -> Self {
        Dedup { inner, config }
    }
}

/// Releases the claim if the handler future is dropped before finishing (shutdown
/// deadline, or an uncaught panic unwinding through it), so the redelivery is not
/// held back as "in progress" for the whole claim TTL.
struct ReleaseOnDrop {
    store: Option<Arc<dyn DedupStore>>,
    key: String,
    token: ClaimToken,
}

impl ReleaseOnDrop {
    fn disarm(&mut self) {
        self.store = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let (Some(store), Ok(rt)) = (self.store.take(), tokio::runtime::Handle::try_current()) {
            let key = std::mem::take(&mut self.key);
            let token = self.token;
            rt.spawn(async move {
                if let Err(e) = store.release_owned(&key, token).await {
                    tracing::warn!(%key, error = %e, "dedup: releasing an abandoned claim failed");
                }
            });
        }
    }
}

/// Longest doubling of the in-progress pause (2^16 pauses: far past any claim TTL).
const MAX_DOUBLINGS: u32 = 16;

/// How long to give a delivery back for, whose key another consumer holds.
///
/// Where a release keeps the attempt count, always `pause`: the message comes back
/// soon and is acked as a duplicate once the holder is done (a delivery without
/// capabilities is taken to support everything). Where it does not, each deferral
/// spends a delivery attempt — and a broker with a native dead-letter threshold
/// counts them — so the pause doubles with the attempt, capped at the claim TTL: a
/// claim left by a crashed consumer then costs about log2(ttl / pause) attempts until
/// it expires, not ttl / pause.
fn defer_pause(delivery: &Delivery, pause: Duration, claim_ttl: Duration) -> Duration {
    if delivery
        .capabilities()
        .map_or(true, |c| c.release_keeps_attempt)
    {
        return pause;
    }
    let doublings = delivery.attempt().saturating_sub(1).min(MAX_DOUBLINGS);
    pause
        .saturating_mul(1 << doublings)
        .min(claim_ttl.max(pause))
}

/// Give the delivery back for later without spending an attempt where the backend
/// can: the handler never ran. The pause is capped at the backend's longest nack
/// delay (none where it has no delay: then it comes back at once).
async fn defer(delivery: &Delivery, config: &DedupConfig) -> crate::Result<()> {
    let pause = defer_pause(delivery, config.retry_in_progress_after, config.claim_ttl);
    let after = match delivery.capabilities() {
        Some(caps) => caps.clamp_nack_delay(pause),
        None => Some(pause),
    };
    delivery.release(after).await
}

impl<S> Service<Delivery> for Dedup<S>
where
    S: Service<Delivery, Response = ()> + Clone + Send + 'static,
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
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move {
            let namespace = config
                .namespace
                .as_deref()
                .unwrap_or(&delivery.meta().queue);
            let Some(key) = dedup_key(namespace, &delivery, config.key_strategy) else {
                // Nothing names this message (no dedup id, and the strategy or the
                // backend gives no other key): handle it, undeduplicated.
                return inner.call(delivery).await.map_err(Into::into);
            };
            let store = &config.store;
            match store.claim_owned(&key, config.claim_ttl).await {
                Err(e) => {
                    // Without the store we cannot tell; do not handle blind.
                    tracing::warn!(%key, error = %e, "dedup: claim failed; deferring");
                    outcome::record(Outcome::Deferred);
                    defer(&delivery, &config).await?;
                    Err(e.into())
                }
                Ok((Claim::Duplicate, _)) => {
                    tracing::debug!(%key, "dedup: duplicate acked without handling");
                    delivery.ack().await?;
                    outcome::record(Outcome::Deduplicated);
                    Ok(())
                }
                Ok((Claim::InProgress, _)) => {
                    tracing::debug!(%key, "dedup: key in progress elsewhere; deferring");
                    defer(&delivery, &config).await?;
                    outcome::record(Outcome::Deferred);
                    Ok(())
                }
                Ok((Claim::Claimed, token)) => {
                    let mut guard = ReleaseOnDrop {
                        store: Some(store.clone()),
                        key: key.clone(),
                        token,
                    };
                    let result = inner.call(delivery).await.map_err(Into::into);
                    guard.disarm();
                    match &result {
                        Ok(()) => {
                            if let Err(e) = store.complete_owned(&key, token).await {
                                // Handled all the same; a redelivery may run twice.
                                tracing::warn!(%key, error = %e, "dedup: marking done failed");
                            }
                        }
                        Err(_) => {
                            if let Err(e) = store.release_owned(&key, token).await {
                                tracing::warn!(%key, error = %e, "dedup: release failed; the retry waits for the claim TTL");
                            }
                        }
                    }
                    result
                }
            }
        })
    }
}

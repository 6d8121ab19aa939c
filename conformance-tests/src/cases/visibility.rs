//! Leases: when an un-acked delivery comes back, and what extending and stale
//! handles do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::{ErrorKind, Message};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::{
    expect_kind, expect_none, expect_none_until, receive_one, send, take_or_receive_one, text,
};
use crate::{CaseResult, Context, Failure};

/// How much earlier than its due time a timer may be observed to fire, for clock
/// granularity (servers keep milliseconds).
pub const EARLY_TOLERANCE: Duration = Duration::from_millis(100);

fn visibility(ctx: &Context) -> CaseResult<Duration> {
    ctx.visibility()
        .ok_or_else(|| Failure::new("this case needs a visibility timeout"))
}

/// `nack(Some(2s))`: the message is not redelivered before 2 s, is redelivered soon
/// after, and other messages keep flowing meanwhile.
pub async fn nack_with_delay_not_redelivered_early(ctx: &Context) -> CaseResult {
    let delay = Duration::from_secs(2);
    let (_, p, c) = ctx.fresh().await?;
    // Distinct keys, so per-key backends do not hold one behind the other.
    send(&*p, Message::new("delayed retry").key("k-delayed")).await?;
    let d = receive_one(&*c, ctx.prompt()).await?;
    let t0 = Instant::now();
    d.nack(Some(delay)).await?;

    send(&*p, Message::new("other").key("k-other")).await?;
    let other = receive_one(&*c, ctx.prompt()).await?;
    assert_eq!(
        text(&other),
        "other",
        "a message sent during the nack delay must be delivered meanwhile"
    );
    other.ack().await?;

    let early =
        expect_none_until(&*c, t0 + delay - EARLY_TOLERANCE, "nacked with a 2 s delay").await?;
    let deadline = t0 + delay + ctx.slack() + ctx.prompt();
    let again = take_or_receive_one(
        &*c,
        early,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await?;
    let after = t0.elapsed();
    assert_eq!(text(&again), "delayed retry");
    assert!(
        after + EARLY_TOLERANCE >= delay,
        "redelivered after {after:?}, before the 2 s nack delay"
    );
    if ctx.caps().attempts.counts_nacks() {
        assert_eq!(again.attempt(), 2);
    }
    again.ack().await?;
    expect_none(&*c, ctx.quiet(), "everything was acked").await
}

/// A delivery dropped without ack or nack is not lost: it stays invisible until the
/// visibility timeout, then comes back (as attempt 2 where attempts are counted).
pub async fn dropped_delivery_comes_back_after_visibility(ctx: &Context) -> CaseResult {
    let vis = visibility(ctx)?;
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("dropped")).await?;
    let t0 = Instant::now();
    let d = receive_one(&*c, ctx.prompt()).await?;
    drop(d);

    let early = expect_none_until(
        &*c,
        t0 + vis - EARLY_TOLERANCE.min(vis / 2),
        "a dropped delivery stays invisible until the visibility timeout",
    )
    .await?;
    let deadline = t0 + vis + ctx.slack() + ctx.prompt();
    let again = take_or_receive_one(
        &*c,
        early,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await?;
    let after = t0.elapsed();
    assert_eq!(text(&again), "dropped");
    assert!(
        after + EARLY_TOLERANCE >= vis,
        "came back after {after:?}, before the visibility timeout of {vis:?}"
    );
    if ctx.caps().attempts.counts_expiry() {
        assert_eq!(
            again.attempt(),
            2,
            "a redelivery after the timeout is attempt 2"
        );
    }
    again.ack().await?;
    expect_none(&*c, vis + ctx.slack(), "the redelivery was acked").await
}

/// Once a delivery's lease expired and the message was redelivered, the old handle
/// can neither extend nor ack (`LeaseExpired`), and the new holder's ack still works.
pub async fn stale_ack_after_redelivery_is_lease_expired(ctx: &Context) -> CaseResult {
    let vis = visibility(ctx)?;
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("contested")).await?;
    let old = receive_one(&*c, ctx.prompt()).await?;
    let new = receive_one(&*c, ctx.redelivery_bound()).await?;
    assert_eq!(text(&new), "contested");

    expect_kind(
        "extend through the expired lease",
        old.extend(vis).await,
        ErrorKind::LeaseExpired,
    )?;
    expect_kind(
        "ack through the expired lease",
        old.ack().await,
        ErrorKind::LeaseExpired,
    )?;
    new.ack()
        .await
        .map_err(|e| Failure::new(format!("ack through the current lease failed: {e}")))?;
    expect_none(&*c, vis + ctx.slack(), "acked through the current lease").await
}

/// A heartbeat extending the lease (every third of the timeout, from a clone of the
/// handle, as the ExtendVisibility middleware does) keeps the message from being
/// redelivered for twice the timeout; the ack afterwards succeeds.
pub async fn extend_prevents_redelivery(ctx: &Context) -> CaseResult {
    let vis = visibility(ctx)?;
    let (q, p, c) = ctx.fresh().await?;
    let watcher = ctx.consumer(&q).await?;
    send(&*p, Message::new("long job")).await?;
    let t0 = Instant::now();
    let d = receive_one(&*c, ctx.prompt()).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut heartbeat = JoinSet::new();
    {
        let acker = d.acker().clone();
        let stop = stop.clone();
        heartbeat.spawn(async move {
            let mut extends = 0u32;
            while !stop.load(Ordering::Acquire) {
                tokio::time::sleep(vis / 3).await;
                if stop.load(Ordering::Acquire) {
                    break;
                }
                acker.extend(vis).await?;
                extends += 1;
            }
            Ok::<u32, ferrymq_core::Error>(extends)
        });
    }

    let watch = (vis * 2).max(vis + ctx.slack() + Duration::from_millis(200));
    let watched = expect_none_until(&*watcher, t0 + watch, "the lease is being extended").await;
    stop.store(true, Ordering::Release);
    let extends = match heartbeat.join_next().await {
        Some(Ok(Ok(n))) => n,
        Some(Ok(Err(e))) => return Err(Failure::new(format!("extend failed: {e}"))),
        Some(Err(e)) => return Err(Failure::new(format!("heartbeat task: {e}"))),
        None => 0,
    };
    let late = watched?;
    assert!(
        late.is_empty(),
        "redelivered while the lease was being extended: {:?}",
        crate::support::texts(&late)
    );
    assert!(extends >= 3, "only {extends} extends happened");
    d.ack()
        .await
        .map_err(|e| Failure::new(format!("ack after extending failed: {e}")))?;
    expect_none(&*watcher, ctx.quiet(), "the message was acked").await
}

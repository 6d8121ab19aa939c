//! Leases: when an un-acked delivery comes back, and what extending and stale
//! handles do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::{Delivery, ErrorKind, Message};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::registry::requires::CASE_DELAY;
use crate::support::{
    expect_attempt, expect_kind, expect_none, expect_none_until, receive_n, receive_one, send,
    send_all, sorted_texts, take_or_receive_one, text,
};
use crate::{ensure, CaseResult, Context, Failure};

/// How much earlier than its due time a timer may be observed to fire, for clock
/// granularity (servers keep milliseconds).
pub const EARLY_TOLERANCE: Duration = Duration::from_millis(100);

fn visibility(ctx: &Context) -> CaseResult<Duration> {
    ctx.visibility()
        .ok_or_else(|| Failure::new("this case needs a visibility timeout"))
}

/// `nack(Some(2s))`: the message is not redelivered before 2 s, is redelivered soon
/// after, and — unless the backend says a nack delay blocks (`nack_delay_blocks`,
/// Kafka's pause and seek) — other messages keep flowing meanwhile.
pub async fn nack_with_delay_not_redelivered_early(ctx: &Context) -> CaseResult {
    let delay = CASE_DELAY;
    let (_, p, c) = ctx.fresh().await?;
    // Distinct keys, so per-key backends do not hold one behind the other.
    send(&*p, Message::new("delayed retry").key("k-delayed")).await?;
    let d = receive_one(&*c, ctx.prompt()).await?;
    let t0 = Instant::now();
    d.nack(Some(delay)).await?;

    if !ctx.caps().nack_delay_blocks {
        send(&*p, Message::new("other").key("k-other")).await?;
        let other = receive_one(&*c, ctx.prompt()).await?;
        assert_eq!(
            text(&other),
            "other",
            "a message sent during the nack delay must be delivered meanwhile"
        );
        other.ack().await?;
    }

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
        "redelivered after {after:?}, before the {delay:?} nack delay"
    );
    expect_attempt(
        &again,
        2,
        ctx.caps().attempts,
        "the redelivery after a nack",
    )?;
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
    // A lease expiry counts only where `attempts.counts_expiry()`.
    let want = if ctx.caps().attempts.counts_expiry() {
        2
    } else {
        1
    };
    expect_attempt(
        &again,
        want,
        ctx.caps().attempts,
        "the redelivery after the visibility timeout",
    )?;
    again.ack().await?;
    expect_none(&*c, vis + ctx.slack(), "the redelivery was acked").await
}

/// Once a delivery's lease ran out and a second consumer received the message, the
/// first handle is stale: its `extend`, `ack`, `nack` and `release` answer
/// `LeaseExpired` (never `Ok`: an ack through a stale handle would remove a message
/// someone else is handling), it reads as not live (`is_live()` false — also before
/// any settle, from its own clock, where deliveries carry a lease deadline) and not
/// acked; the second consumer's acks work and nothing comes back.
pub async fn stale_handle_after_lease_gone_is_lease_expired(ctx: &Context) -> CaseResult {
    let vis = visibility(ctx)?;
    let (q, p, first) = ctx.fresh().await?;
    let second = ctx.consumer(&q).await?;
    send_all(
        &*p,
        ["stale-ack", "stale-nack", "stale-release"]
            .iter()
            .map(|t| Message::new(*t))
            .collect(),
    )
    .await?;
    let old = receive_n(&*first, 3, ctx.prompt()).await?;
    let new = receive_n(&*second, 3, ctx.redelivery_bound() + ctx.slack()).await?;
    assert_eq!(
        sorted_texts(&new),
        ["stale-ack", "stale-nack", "stale-release"],
        "the second consumer must get all three once the leases ran out"
    );
    if ctx.caps().attempts.counts_expiry() {
        for d in &new {
            expect_attempt(
                d,
                2,
                ctx.caps().attempts,
                "a redelivery after the lease ran out",
            )?;
        }
    }
    for d in &old {
        if let Some(deadline) = d.lease_deadline() {
            ensure!(
                !d.is_live(),
                "{}: is_live() is true although its lease deadline {:?} ago passed",
                text(d),
                Instant::now().saturating_duration_since(deadline)
            );
        }
    }
    let find = |t: &str| -> CaseResult<&Delivery> {
        old.iter()
            .find(|d| text(d) == t)
            .ok_or_else(|| Failure::new(format!("{t} missing from the first receive")))
    };

    let stale = find("stale-ack")?;
    expect_kind(
        "extend through the expired lease",
        stale.extend(vis).await,
        ErrorKind::LeaseExpired,
    )?;
    expect_kind(
        "ack through the expired lease",
        stale.ack().await,
        ErrorKind::LeaseExpired,
    )?;
    let stale_nack = find("stale-nack")?;
    expect_kind(
        "nack through the expired lease",
        stale_nack.nack(None).await,
        ErrorKind::LeaseExpired,
    )?;
    let stale_release = find("stale-release")?;
    expect_kind(
        "release through the expired lease",
        stale_release.release(None).await,
        ErrorKind::LeaseExpired,
    )?;
    for d in &old {
        ensure!(
            !d.is_live(),
            "{}: is_live() is true after a settle answered LeaseExpired",
            text(d)
        );
        ensure!(
            !d.acker().is_acked(),
            "{}: reads as acked though its ack failed",
            text(d)
        );
    }

    for d in &new {
        d.ack().await.map_err(|e| {
            Failure::new(format!(
                "ack of {} through the current lease failed: {e}",
                text(d)
            ))
        })?;
    }
    expect_none(
        &*first,
        vis + ctx.slack(),
        "all three were acked through their current leases",
    )
    .await
}

/// A fresh delivery knows its lease deadline: about the visibility timeout after the
/// receive — not later than the receive's return plus the timeout (and the timer
/// slack), where the broker may already hand it to someone else — and it is live.
/// An `extend(d)` moves the deadline to about `d` from the extend, and the
/// delivery stays live past the original deadline; once acked it is not live.
///
/// The worker decides from this deadline whether a prefetched delivery may still
/// start: a deadline later than the real lease would start handlers on messages
/// that are already someone else's.
pub async fn lease_deadline_is_known(ctx: &Context) -> CaseResult {
    let vis = visibility(ctx)?;
    let slack = ctx.slack();
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("timed")).await?;
    let before = Instant::now();
    let d = receive_one(&*c, ctx.prompt()).await?;
    let after = Instant::now();
    let deadline = d.lease_deadline().ok_or_else(|| {
        Failure::new("a delivery with a visibility timeout has no lease deadline")
    })?;
    ensure!(
        deadline <= after + vis + slack,
        "the lease deadline is {:?} after the receive returned, later than the visibility \
         timeout {vis:?} (+ slack {slack:?})",
        deadline.saturating_duration_since(after)
    );
    ensure!(
        deadline + slack >= before + vis,
        "the lease deadline is only {:?} after the receive started, much earlier than the \
         visibility timeout {vis:?}",
        deadline.saturating_duration_since(before)
    );
    ensure!(d.is_live(), "a fresh delivery is not live");
    let remaining = d
        .lease_remaining()
        .ok_or_else(|| Failure::new("lease_remaining() is None though lease_deadline() is not"))?;
    ensure!(
        !remaining.is_zero() && remaining <= vis + slack,
        "lease_remaining() of a fresh delivery is {remaining:?} (visibility {vis:?})"
    );

    if ctx.caps().extend_visibility {
        let by = vis.saturating_mul(3);
        let asked = Instant::now();
        d.extend(by).await?;
        let answered = Instant::now();
        let moved = d
            .lease_deadline()
            .ok_or_else(|| Failure::new("the lease deadline is gone after an extend"))?;
        ensure!(
            moved > deadline,
            "extend({by:?}) did not move the lease deadline"
        );
        ensure!(
            moved <= answered + by + slack && moved + slack >= asked + by,
            "after extend({by:?}) the deadline is {:?} after the extend returned, expected \
             about {by:?}",
            moved.saturating_duration_since(answered)
        );
        tokio::time::sleep_until(deadline + slack).await;
        ensure!(
            d.is_live(),
            "an extended delivery is not live past its original deadline"
        );
    }
    d.ack().await?;
    ensure!(!d.is_live(), "an acked delivery is still live");
    expect_none(&*c, ctx.quiet(), "the message was acked").await
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

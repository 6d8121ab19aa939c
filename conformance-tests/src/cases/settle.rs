//! Ack, nack and the once-only rule.

use std::time::Duration;

use ferrymq_core::{ErrorKind, Message};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::{
    ack_all, expect_attempt, expect_depth, expect_kind, expect_none, receive_n, receive_one, send,
    send_all, text,
};
use crate::{ensure, CaseResult, Context, Failure};

/// An acked message is gone for good: not redelivered after the visibility timeout
/// passes, not to a new consumer, and not counted in depth.
pub async fn ack_removes(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    send_all(&*p, vec![Message::new("a"), Message::new("b")]).await?;
    let ds = receive_n(&*c, 2, ctx.prompt()).await?;
    ack_all(&ds).await?;
    let watch = ctx.visibility().unwrap_or_default() + ctx.slack() + ctx.quiet();
    expect_none(&*c, watch, "both messages were acked").await?;
    let fresh = ctx.consumer(&q).await?;
    expect_none(&*fresh, ctx.quiet(), "both messages were acked").await?;
    if ctx.caps().depth.is_available() {
        expect_depth(
            "after acking everything",
            crate::support::depth(0, 0, 0),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }
    Ok(())
}

/// Settling twice is a typed `AlreadyAcked` error, never a panic: ack then
/// ack/nack/extend, through the delivery or a clone; nack then ack. A nacked
/// delivery comes back as a new delivery that can be acked.
pub async fn second_ack_is_typed_error(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("acked")).await?;
    let d = receive_one(&*c, ctx.prompt()).await?;
    let clone = d.clone();
    d.ack().await?;
    assert!(clone.acker().is_acked(), "a clone does not see the ack");
    expect_kind("second ack", d.ack().await, ErrorKind::AlreadyAcked)?;
    expect_kind(
        "ack through a clone",
        clone.ack().await,
        ErrorKind::AlreadyAcked,
    )?;
    expect_kind(
        "nack after ack",
        d.nack(None).await,
        ErrorKind::AlreadyAcked,
    )?;
    expect_kind(
        "extend after ack",
        d.extend(Duration::from_secs(1)).await,
        ErrorKind::AlreadyAcked,
    )?;

    send(&*p, Message::new("nacked")).await?;
    let d = receive_one(&*c, ctx.prompt()).await?;
    assert_eq!(text(&d), "nacked");
    d.nack(None).await?;
    expect_kind("ack after nack", d.ack().await, ErrorKind::AlreadyAcked)?;
    expect_kind("second nack", d.nack(None).await, ErrorKind::AlreadyAcked)?;
    let again = receive_one(&*c, ctx.prompt()).await?;
    assert_eq!(text(&again), "nacked");
    again.ack().await?;
    expect_none(&*c, ctx.quiet(), "everything was acked").await
}

/// Eight tasks ack clones of one delivery at once: exactly one succeeds, the others
/// get `AlreadyAcked`, and the message is gone.
pub async fn concurrent_acks_exactly_one_wins(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("contended")).await?;
    let d = receive_one(&*c, ctx.prompt()).await?;
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let d = d.clone();
        tasks.spawn(async move { d.ack().await.map_err(|e| e.kind()) });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| crate::Failure::new(format!("ack task: {e}")))? {
            Ok(()) => ok += 1,
            Err(ErrorKind::AlreadyAcked) => {}
            Err(other) => panic!("concurrent ack failed with {other:?}"),
        }
    }
    assert_eq!(ok, 1, "{ok} of 8 concurrent acks succeeded");
    let watch = ctx.visibility().unwrap_or_default() + ctx.slack();
    expect_none(&*c, watch, "the message was acked").await
}

/// `nack(None)` makes the message deliverable again at once — well before the
/// visibility timeout — with the same payload, headers and key.
pub async fn nack_redelivers(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("retry me").header("h", "v").key("k")).await?;
    let first = receive_one(&*c, ctx.prompt()).await?;
    first.nack(None).await?;
    // Must beat the visibility timeout, or it is indistinguishable from a lease expiry.
    let again = receive_one(&*c, ctx.before_lease_expiry()).await?;
    assert_eq!(text(&again), "retry me");
    assert_eq!(again.headers().get("h"), Some("v"));
    assert_eq!(again.key(), Some("k"));
    expect_attempt(
        &again,
        2,
        ctx.caps().attempts,
        "the redelivery after a nack",
    )?;
    again.ack().await?;
    expect_none(&*c, ctx.quiet(), "the redelivery was acked").await
}

/// Where nacks count (`attempts.counts_nacks()`), each redelivery after a nack
/// increments `attempt`: 1, 2, 3, 4 (at least that, where counts are approximate).
pub async fn attempt_increments_on_redelivery(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("counted")).await?;
    for expected in 1..=4u32 {
        let d = receive_one(&*c, ctx.prompt()).await?;
        expect_attempt(&d, expected, ctx.caps().attempts, "delivery after nacks")?;
        assert_eq!(d.meta().attempt, d.attempt());
        if expected < 4 {
            d.nack(None).await?;
        } else {
            d.ack().await?;
        }
    }
    expect_none(&*c, ctx.quiet(), "the message was acked").await
}

/// `release(None)` gives a delivery back at once: it comes back well before the
/// visibility timeout (a release that only let the lease run out would take the whole
/// timeout), with its payload, headers and key, and the released handle is settled.
/// Its attempt follows the capabilities: unchanged where `release_keeps_attempt`,
/// counted like a nack otherwise.
pub async fn release_is_prompt(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("given back").header("h", "v").key("k")).await?;
    let first = receive_one(&*c, ctx.prompt()).await?;
    let t0 = Instant::now();
    first
        .release(None)
        .await
        .map_err(|e| Failure::new(format!("release(None) failed: {e}")))?;
    ensure!(
        first.acker().is_settled() && !first.acker().is_acked(),
        "a released handle must read as settled and not acked"
    );
    expect_kind(
        "ack after release",
        first.ack().await,
        ErrorKind::AlreadyAcked,
    )?;
    let bound = ctx.before_lease_expiry();
    let again = receive_one(&*c, bound).await.map_err(|f| {
        Failure::new(format!(
            "a released message must come back at once, well before the visibility \
             timeout of {:?}: {}",
            ctx.visibility(),
            f.message()
        ))
    })?;
    let took = t0.elapsed();
    assert_eq!(text(&again), "given back");
    assert_eq!(again.headers().get("h"), Some("v"));
    assert_eq!(again.key(), Some("k"));
    let caps = ctx.caps();
    let want = if caps.release_keeps_attempt { 1 } else { 2 };
    expect_attempt(
        &again,
        want,
        caps.attempts,
        &format!(
            "the redelivery after a release (release_keeps_attempt = {}, came back after {took:?})",
            caps.release_keeps_attempt
        ),
    )?;
    again.ack().await?;
    expect_none(&*c, ctx.quiet(), "the redelivery was acked").await
}

/// Where `release_keeps_attempt` is claimed: a released delivery comes back promptly
/// with the same attempt (1, also after a second release), and a nack after that
/// counts (attempt 2). The worker releases what it prefetched but never started, so
/// a release that counted would dead-letter messages that were never handled.
pub async fn release_does_not_count_an_attempt(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("kept")).await?;
    let attempts = ctx.caps().attempts;
    let mut d = receive_one(&*c, ctx.prompt()).await?;
    expect_attempt(&d, 1, attempts, "the first delivery")?;
    for round in 1..=2 {
        d.release(None).await?;
        d = receive_one(&*c, ctx.before_lease_expiry())
            .await
            .map_err(|f| {
                Failure::new(format!(
                    "release #{round}: the message must come back well before the \
                     visibility timeout: {}",
                    f.message()
                ))
            })?;
        ensure!(
            d.attempt() == 1,
            "after release #{round} the delivery says attempt {}: a release must not count \
             an attempt (release_keeps_attempt is claimed)",
            d.attempt()
        );
    }
    d.nack(None).await?;
    let after_nack = receive_one(&*c, ctx.before_lease_expiry()).await?;
    expect_attempt(&after_nack, 2, attempts, "the redelivery after a nack")?;
    after_nack.ack().await?;
    expect_none(&*c, ctx.quiet(), "the message was acked").await
}

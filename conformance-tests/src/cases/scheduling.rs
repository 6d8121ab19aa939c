//! Delayed sends and broker-side deduplication.

use ferrymq_core::Message;
use tokio::time::Instant;

use crate::cases::visibility::EARLY_TOLERANCE;
use crate::context::bounded;
use crate::registry::requires::CASE_DELAY;
use crate::support::{
    ack_all, drain, expect_none, expect_none_until, receive_one, send, sorted_texts,
    take_or_receive_one, text,
};
use crate::{CaseResult, Context};

/// A message sent with a 2 s delay is not delivered before 2 s, arrives soon after,
/// with its delay cleared; an undelayed message sent after it is delivered at once.
pub async fn delayed_send_not_visible_early(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let t0 = Instant::now();
    send(&*p, Message::new("later").delay(CASE_DELAY).key("later")).await?;
    send(&*p, Message::new("now").key("now")).await?;

    let now = receive_one(&*c, ctx.prompt()).await?;
    assert_eq!(text(&now), "now", "the undelayed message must come first");
    now.ack().await?;
    let early = expect_none_until(
        &*c,
        t0 + CASE_DELAY - EARLY_TOLERANCE,
        "the other message is delayed by 2 s",
    )
    .await?;
    let deadline = t0 + CASE_DELAY + ctx.slack() + ctx.prompt();
    let later = take_or_receive_one(
        &*c,
        early,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await?;
    let after = t0.elapsed();
    assert_eq!(text(&later), "later");
    assert!(
        after + EARLY_TOLERANCE >= CASE_DELAY,
        "delivered after {after:?}, before its delay"
    );
    assert_eq!(
        later.message().get_delay(),
        None,
        "a delivery has no delay left"
    );
    assert_eq!(
        later.attempt(),
        1,
        "waiting out a delay is not a redelivery"
    );
    later.ack().await?;
    expect_none(&*c, ctx.quiet(), "everything was acked").await
}

/// Sends repeating a dedup id inside the window are accepted (`Ok`) and dropped:
/// one delivery per id, the first payload wins, also within one batch and also after
/// the first was acked. A fresh id is not reported as a duplicate.
pub async fn duplicate_dedup_id_delivered_once(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let first = send(&*p, Message::new("first").dedup_id("order-1")).await?;
    assert!(
        !first.is_duplicate(),
        "a first send reported as a duplicate"
    );
    send(&*p, Message::new("second").dedup_id("order-1")).await?;
    send(&*p, Message::new("other").dedup_id("order-2")).await?;
    let batch = bounded(
        "send_batch",
        p.send_batch(vec![
            Message::new("batch-a").dedup_id("order-3"),
            Message::new("batch-b").dedup_id("order-3"),
        ]),
    )
    .await?;
    assert_eq!(batch.len(), 2);
    for (i, r) in batch.iter().enumerate() {
        assert!(
            r.is_ok(),
            "batch entry {i} with a repeated dedup id failed: {r:?}"
        );
    }

    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    assert_eq!(sorted_texts(&got), ["batch-a", "first", "other"]);
    ack_all(&got).await?;

    send(&*p, Message::new("after ack").dedup_id("order-1")).await?;
    expect_none(
        &*c,
        ctx.quiet(),
        "order-1 was seen within the dedup window, even though it was acked",
    )
    .await
}

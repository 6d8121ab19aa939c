//! Depth counts and bounded queues.

use std::time::Duration;

use ferrymq_core::{ErrorKind, Message};

use crate::context::bounded;
use crate::support::{
    depth, drain, expect_depth, expect_kind, receive_one, send, sorted_texts, try_send,
};
use crate::{CaseResult, Context, Failure};

/// Where depth is exact: depth follows the queue — waiting, in flight (received, not
/// acked), delayed (delayed sends and nacks with a delay), as seen by producer and
/// consumer alike; an ack leaves in flight, an expired lease goes back to waiting.
pub async fn depth_counts(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let within = ctx.prompt();
    let long = Duration::from_secs(60);
    // Check the consumer's and the producer's view of the same counts.
    macro_rules! expect {
        ($what:expr, $waiting:expr, $in_flight:expr, $delayed:expr) => {
            let want = depth($waiting, $in_flight, $delayed);
            expect_depth(concat!("consumer: ", $what), want, within, || c.depth()).await?;
            expect_depth(concat!("producer: ", $what), want, within, || p.depth()).await?;
        };
    }

    expect!("a fresh queue", 0, 0, 0);
    for i in 0..4 {
        send(&*p, Message::new(format!("r{i}"))).await?;
    }
    let delayed = if ctx.caps().supports_delay(long) {
        for i in 0..2 {
            send(&*p, Message::new(format!("later{i}")).delay(long)).await?;
        }
        2
    } else {
        0
    };
    expect!("4 sent, some delayed", 4, 0, delayed);

    let d1 = receive_one(&*c, ctx.prompt()).await?;
    expect!("one received", 3, 1, delayed);

    let mut delayed_now = delayed;
    let mut waiting = 3;
    if ctx.caps().supports_nack_delay(long) {
        let d2 = receive_one(&*c, ctx.prompt()).await?;
        d2.nack(Some(long)).await?;
        delayed_now += 1;
        waiting -= 1;
        expect!("one nacked with a delay", waiting, 1, delayed_now);
    }

    d1.ack().await?;
    expect!("the received one acked", waiting, 0, delayed_now);

    if let Some(vis) = ctx.visibility() {
        let d3 = receive_one(&*c, ctx.prompt()).await?;
        expect!("another received", waiting - 1, 1, delayed_now);
        drop(d3);
        let want = depth(waiting, 0, delayed_now);
        expect_depth(
            "consumer: an abandoned lease expired",
            want,
            vis + ctx.slack() + within,
            || c.depth(),
        )
        .await?;
    }
    Ok(())
}

/// A queue bounded to 5 un-acked messages refuses the 6th with `QueueFull`
/// (transient, nothing enqueued), in `send` and in `send_batch`; acking one makes
/// room for exactly one more.
pub async fn queue_full_when_bounded(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let (p, c) = bounded(
        "open_bounded(capacity 5)",
        ctx.backend().open_bounded(&q, 5),
    )
    .await?;
    for i in 0..5 {
        send(&*p, Message::new(format!("m{i}"))).await?;
    }
    let r = try_send(&*p, Message::new("sixth")).await?;
    if let Err(e) = &r {
        assert!(e.kind().is_transient(), "QueueFull must be transient");
    }
    expect_kind("send past the bound", r, ErrorKind::QueueFull)?;

    let batch = bounded("send_batch past the bound", async {
        Ok(p.send_batch(vec![Message::new("b0"), Message::new("b1")])
            .await)
    })
    .await?;
    match batch {
        Err(e) if e.kind() == ErrorKind::QueueFull => {}
        Ok(results) if results.len() == 2 => {
            for r in results {
                expect_kind("send_batch entry past the bound", r, ErrorKind::QueueFull)?;
            }
        }
        other => {
            return Err(Failure::new(format!(
                "send_batch past the bound: expected QueueFull, got {other:?}"
            )))
        }
    }

    let d = receive_one(&*c, ctx.prompt()).await?;
    d.ack().await?;
    send(&*p, Message::new("after-ack")).await?;
    expect_kind(
        "send past the bound again",
        try_send(&*p, Message::new("seventh")).await?,
        ErrorKind::QueueFull,
    )?;

    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    let mut expected: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    expected.retain(|m| *m != crate::support::text(&d));
    expected.push("after-ack".into());
    expected.sort();
    assert_eq!(sorted_texts(&got), expected);
    crate::support::ack_all(&got).await
}

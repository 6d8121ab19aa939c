//! Closing producers and consumers.

use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::{into_stream, Consumer, ErrorKind, Message};
use futures::StreamExt;

use crate::context::CALL_TIMEOUT;
use crate::support::{
    drain, expect_kind, expect_none, receive_one, send, send_all, sorted_texts, text, try_send,
};
use crate::{CaseResult, Context, Failure};

/// After `close`, `send` and `send_batch` fail with `Closed` and enqueue nothing;
/// what was sent before the close is delivered (close flushes), and another producer
/// on the queue keeps working.
pub async fn send_after_close_is_closed(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    send_all(
        &*p,
        (0..3)
            .map(|i| Message::new(format!("before-{i}")))
            .collect(),
    )
    .await?;
    p.close().await?;
    expect_kind(
        "send after close",
        try_send(&*p, Message::new("after")).await?,
        ErrorKind::Closed,
    )?;
    let batch = tokio::time::timeout(
        CALL_TIMEOUT,
        p.send_batch(vec![Message::new("after-batch")]),
    )
    .await
    .map_err(|_| Failure::new("send_batch after close hung"))?;
    expect_kind("send_batch after close", batch, ErrorKind::Closed)?;

    let other = ctx.producer(&q).await?;
    send(&*other, Message::new("other producer")).await?;

    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    assert_eq!(
        sorted_texts(&got),
        ["before-0", "before-1", "before-2", "other producer"]
    );
    crate::support::ack_all(&got).await
}

/// After `close`, `receive` fails with `Closed`, but a delivery handed out before can
/// still be acked, and that ack holds: the message is not redelivered to anyone.
pub async fn receive_after_close_is_closed(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    send_all(&*p, vec![Message::new("held"), Message::new("left")]).await?;
    let held = receive_one(&*c, ctx.prompt()).await?;
    c.close().await?;
    let r = tokio::time::timeout(CALL_TIMEOUT, c.receive(1, Duration::from_millis(100)))
        .await
        .map_err(|_| Failure::new("receive after close hung"))?;
    expect_kind("receive after close", r, ErrorKind::Closed)?;
    let r = tokio::time::timeout(CALL_TIMEOUT, c.receive(1, Duration::ZERO))
        .await
        .map_err(|_| Failure::new("receive after close hung"))?;
    expect_kind("receive(wait 0) after close", r, ErrorKind::Closed)?;
    held.ack()
        .await
        .map_err(|e| Failure::new(format!("ack after the consumer closed failed: {e}")))?;

    let c2 = ctx.consumer(&q).await?;
    let rest = receive_one(&*c2, ctx.prompt()).await?;
    let held_text = text(&held);
    assert_ne!(text(&rest), held_text, "the acked delivery came back");
    rest.ack().await?;
    let watch = ctx.visibility().unwrap_or_default() + ctx.slack();
    expect_none(&*c2, watch, "both were acked").await
}

/// `into_stream` over a consumer yields what is sent and ends (returns `None`) once
/// the consumer is closed.
pub async fn stream_ends_after_close(ctx: &Context) -> CaseResult {
    let (q, p, _) = ctx.fresh().await?;
    let c: Arc<dyn Consumer> = Arc::from(ctx.consumer(&q).await?);
    let wait = Duration::from_millis(300);
    let mut stream = Box::pin(into_stream(c.clone(), 10, wait));
    send_all(&*p, (0..5).map(|i| Message::new(format!("s{i}"))).collect()).await?;
    let mut got = Vec::new();
    while got.len() < 5 {
        let item = tokio::time::timeout(ctx.prompt(), stream.next())
            .await
            .map_err(|_| Failure::new(format!("stream yielded only {} of 5", got.len())))?;
        match item {
            Some(Ok(d)) => {
                d.ack().await?;
                got.push(text(&d));
            }
            Some(Err(e)) => return Err(Failure::new(format!("stream error: {e}"))),
            None => return Err(Failure::new("stream ended before the consumer closed")),
        }
    }
    got.sort();
    assert_eq!(got, ["s0", "s1", "s2", "s3", "s4"]);
    c.close().await?;
    let end = tokio::time::timeout(wait + CALL_TIMEOUT, stream.next())
        .await
        .map_err(|_| Failure::new("the stream did not end after close"))?;
    assert!(
        end.is_none(),
        "expected the stream to end after close, got {:?}",
        end.map(|r| r.map(|d| text(&d)))
    );
    let c2 = ctx.consumer(&q).await?;
    expect_none(&*c2, ctx.quiet(), "all 5 were acked").await
}

//! Bad input is refused with a typed error and nothing of it is enqueued; batches
//! report per entry.

use std::collections::HashSet;

use ferrymq_core::{ErrorKind, Message};

use crate::context::bounded;
use crate::support::{
    ack_all, depth, drain, expect_depth, expect_kind, receive_n, send, send_all, sorted_texts,
    try_send,
};
use crate::{CaseResult, Context};

fn invalid_messages() -> Vec<(&'static str, Message)> {
    vec![
        (
            "a space in a header name",
            Message::new("bad-1").header("has space", "v"),
        ),
        (
            "an empty header name",
            Message::new("bad-2").header("", "v"),
        ),
        (
            "a non-ASCII header name",
            Message::new("bad-3").header("naïve", "v"),
        ),
        (
            "an unknown reserved ferrymq- header",
            Message::new("bad-4").header("ferrymq-custom", "v"),
        ),
        (
            "the aws. prefix",
            Message::new("bad-5").header("aws.trace", "v"),
        ),
        (
            "a NUL in a header value",
            Message::new("bad-6").header("ok", "a\u{0}b"),
        ),
        (
            "an ESC in a header value",
            Message::new("bad-7").header("ok", "\u{1b}[31m"),
        ),
    ]
}

/// Each kind of invalid header fails the send with `InvalidMessage`, and none of
/// those messages is enqueued; the producer keeps working afterwards.
pub async fn invalid_header_rejected_nothing_sent(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    for (what, message) in invalid_messages() {
        let result = try_send(&*p, message).await?;
        expect_kind(
            &format!("send with {what}"),
            result,
            ErrorKind::InvalidMessage,
        )?;
    }
    if ctx.caps().depth.is_available() {
        expect_depth(
            "after rejected sends",
            depth(0, 0, 0),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }
    send(&*p, Message::new("valid").header("ok", "fine")).await?;
    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    assert_eq!(
        sorted_texts(&got),
        ["valid"],
        "only the valid message may be enqueued"
    );
    ack_all(&got).await
}

/// A message one byte over `max_message_size` (payload alone, or payload plus
/// headers) fails with `TooLarge` and is not enqueued, also inside a batch; a message
/// of exactly the maximum is accepted and delivered intact.
pub async fn oversize_rejected_too_large(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let max = ctx.caps().max_message_size;

    let over = Message::new(vec![b'x'; max + 1]);
    let r = try_send(&*p, over).await?;
    expect_kind("payload of max_message_size + 1", r, ErrorKind::TooLarge)?;

    // Headers count: payload max - 10 plus a header of 1 + 10 bytes is one over.
    let with_header = Message::new(vec![b'y'; max - 10]).header("h", "0123456789");
    let r = try_send(&*p, with_header).await?;
    expect_kind(
        "payload + headers of max_message_size + 1",
        r,
        ErrorKind::TooLarge,
    )?;

    let batch = vec![Message::new("small"), Message::new(vec![b'z'; max + 1])];
    let results = bounded("send_batch", p.send_batch(batch)).await?;
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok(), "small entry failed: {:?}", results[0]);
    assert_eq!(
        results[1].as_ref().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::TooLarge),
        "oversize batch entry"
    );

    let exact: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
    send(&*p, Message::new(exact.clone())).await?;

    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    assert_eq!(
        got.len(),
        2,
        "expected the small and the exact-size message only"
    );
    assert!(
        got.iter().any(|d| d.payload().as_ref() == b"small"),
        "small message missing"
    );
    assert!(
        got.iter().any(|d| d.payload().as_ref() == exact.as_slice()),
        "the message of exactly max_message_size ({max} bytes) was not delivered intact"
    );
    ack_all(&got).await
}

/// A batch with bad entries: the good ones are enqueued, each bad one carries its own
/// typed error, in input order; an empty batch is fine.
pub async fn batch_send_per_entry_results(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let max = ctx.caps().max_message_size;
    let batch = vec![
        Message::new("ok-0"),
        Message::new("ok-1").header("n", "1"),
        Message::new("bad-header").header("bad name", "v"),
        Message::new("ok-3"),
        Message::new(vec![b'x'; max + 1]),
        Message::new("ok-5"),
    ];
    let results = bounded("send_batch", p.send_batch(batch)).await?;
    let kinds: Vec<Result<(), ErrorKind>> = results
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            Ok(()),
            Ok(()),
            Err(ErrorKind::InvalidMessage),
            Ok(()),
            Err(ErrorKind::TooLarge),
            Ok(()),
        ],
        "per-entry results"
    );
    let empty = bounded("empty send_batch", p.send_batch(Vec::new())).await?;
    assert!(
        empty.is_empty(),
        "an empty batch returned {} results",
        empty.len()
    );

    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    assert_eq!(sorted_texts(&got), ["ok-0", "ok-1", "ok-3", "ok-5"]);
    ack_all(&got).await
}

/// A batch larger than the backend's native batch (`max_batch`) is split for the
/// caller: every entry succeeds and is delivered once.
pub async fn batch_larger_than_max_batch(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let n = (ctx.caps().max_batch.saturating_mul(2) + 3).min(250);
    send_all(&*p, (0..n).map(|i| Message::new(format!("m{i}"))).collect()).await?;
    let got = receive_n(&*c, n, ctx.prompt() * 2).await?;
    let distinct: HashSet<Vec<u8>> = got.iter().map(|d| d.payload().to_vec()).collect();
    assert_eq!(distinct.len(), n, "duplicates among {n} deliveries");
    ack_all(&got).await?;
    let extra = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    assert!(extra.is_empty(), "{} extra deliveries", extra.len());
    Ok(())
}

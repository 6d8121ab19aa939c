//! Admin operations ([`ferrymq_core::Admin`]) on a live queue: they do what they say
//! and nothing else. Each applies only when the harness found the backend's admin to
//! answer the operation (probed at setup).

use std::time::Duration;

use tokio::time::Instant;

use ferrymq_core::{Accuracy, Message};

use crate::context::bounded;
use crate::support::{
    ack_all, depth, expect_depth, expect_none, receive_n, receive_one, send, send_all,
    sorted_texts, text,
};
use crate::{ensure, CaseResult, Context, Failure};

/// `peek` shows the waiting messages without touching them: two peeks return the
/// same messages (ids, payloads, headers), `max` is honoured, depth does not move,
/// and a receive right after gets every message at once as attempt 1 — a peek that
/// leased would hide them until the visibility timeout, one that counted would make
/// them attempt 2. Once received and acked they are no longer shown.
pub async fn admin_peek_has_no_side_effects(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    let admin = ctx.admin(&q).await?;
    send_all(
        &*p,
        (0..3)
            .map(|i| Message::new(format!("m{i}")).header("n", i.to_string()))
            .collect(),
    )
    .await?;
    let exact = ctx.caps().depth == Accuracy::Exact;
    if ctx.caps().depth.is_available() {
        expect_depth(
            "before the peeks",
            depth(3, 0, 0),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }

    let first = bounded("peek(10)", admin.peek(10)).await?;
    let second = bounded("peek(10) again", admin.peek(10)).await?;
    let texts = |ps: &[ferrymq_core::admin::Peeked]| {
        let mut v: Vec<String> = ps
            .iter()
            .map(|p| String::from_utf8_lossy(p.message.payload()).into_owned())
            .collect();
        v.sort();
        v
    };
    ensure!(
        texts(&first) == ["m0", "m1", "m2"],
        "peek(10) of 3 waiting messages returned {:?}",
        texts(&first)
    );
    let ids =
        |ps: &[ferrymq_core::admin::Peeked]| ps.iter().map(|p| p.id.clone()).collect::<Vec<_>>();
    ensure!(
        ids(&first) == ids(&second) && texts(&first) == texts(&second),
        "a second peek saw other messages: {:?} then {:?}",
        ids(&first),
        ids(&second)
    );
    for peeked in &first {
        let payload = String::from_utf8_lossy(peeked.message.payload()).into_owned();
        let n = payload.trim_start_matches('m');
        ensure!(
            peeked.message.headers().get("n") == Some(n),
            "the peeked {payload} lost its header: {:?}",
            peeked.message.headers()
        );
        ensure!(!peeked.id.is_empty(), "a peeked message has no id");
    }
    let one = bounded("peek(1)", admin.peek(1)).await?;
    ensure!(one.len() == 1, "peek(1) returned {} messages", one.len());

    if ctx.caps().depth.is_available() {
        expect_depth(
            "after the peeks (a peek leases nothing)",
            depth(3, 0, 0),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }
    if exact && ctx.claims().admin.describe {
        let info = bounded("describe", admin.describe()).await?;
        ensure!(
            (info.depth.waiting, info.depth.in_flight) == (3, 0),
            "describe after the peeks: waiting {} in flight {}, expected 3 and 0",
            info.depth.waiting,
            info.depth.in_flight
        );
    }

    let ds = receive_n(&*c, 3, ctx.before_lease_expiry())
        .await
        .map_err(|f| {
            Failure::new(format!(
                "the peeked messages must be receivable at once (a peek leases nothing): {}",
                f.message()
            ))
        })?;
    for d in &ds {
        ensure!(
            d.attempt() == 1,
            "{} was peeked twice and is now attempt {}: a peek must not count",
            text(d),
            d.attempt()
        );
    }
    ack_all(&ds).await?;
    // Where depth is approximate (Kafka commits acks on an interval, SQS counts
    // eventually), the acks show up within the backend's depth lag, not at once.
    let until = Instant::now() + ctx.depth_bound();
    loop {
        let after = bounded("peek after acking everything", admin.peek(10)).await?;
        if after.is_empty() {
            return Ok(());
        }
        ensure!(
            !exact && Instant::now() < until,
            "peek still shows {:?} after every message was received and acked",
            texts(&after)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `purge` removes every message that is not in flight — waiting ones, and delayed
/// ones where the backend delays — and says how many went (exactly, where depth is
/// exact); a message in flight during the purge survives it and can still be acked;
/// the queue takes new messages afterwards.
pub async fn admin_purge_removes_waiting(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    let admin = ctx.admin(&q).await?;
    send_all(&*p, (0..5).map(|i| Message::new(format!("w{i}"))).collect()).await?;
    let held = receive_one(&*c, ctx.prompt()).await?;
    let waiting = 4u64;
    let long = Duration::from_secs(60);
    let delayed = u64::from(ctx.caps().supports_delay(long));
    if delayed == 1 {
        send(&*p, Message::new("delayed").delay(long)).await?;
    }
    if ctx.caps().depth == Accuracy::Exact {
        expect_depth(
            "before the purge",
            depth(waiting, 1, delayed),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }

    let gone = bounded("purge", admin.purge()).await?;
    if ctx.caps().depth == Accuracy::Exact {
        ensure!(
            gone == waiting + delayed,
            "purge reported {gone} removed; {waiting} were waiting and {delayed} delayed"
        );
    } else {
        ensure!(
            gone <= waiting + delayed,
            "purge reported {gone} removed; only {} were not in flight",
            waiting + delayed
        );
    }
    expect_none(&*c, ctx.quiet(), "every waiting message was purged").await?;
    if ctx.caps().depth.is_available() {
        expect_depth(
            "after the purge (the one in flight stays)",
            depth(0, 1, 0),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }
    held.ack().await.map_err(|e| {
        Failure::new(format!(
            "the message in flight during the purge ({}) could not be acked: {e}",
            text(&held)
        ))
    })?;

    send(&*p, Message::new("after purge")).await?;
    let got = receive_n(&*c, 1, ctx.prompt()).await?;
    ensure!(
        sorted_texts(&got) == ["after purge"],
        "after the purge: {:?}",
        sorted_texts(&got)
    );
    ack_all(&got).await?;
    let watch = ctx.visibility().unwrap_or_default() + ctx.slack();
    expect_none(&*c, watch, "everything left was acked").await
}

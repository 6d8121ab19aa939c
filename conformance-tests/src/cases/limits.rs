//! What a backend cannot do is refused with a typed error and changes nothing; no
//! duration a user passes makes it panic or lose a message.

use std::time::Duration;

use ferrymq_core::{Capabilities, Delivery, ErrorKind, Message, Result};

use crate::context::bounded;
use crate::support::{
    ack_all, depth, drain, expect_depth, expect_kind, expect_none, receive_one, send, sorted_texts,
    text, try_send,
};
use crate::{ensure, CaseResult, Context, Failure};

/// The delays a backend must refuse: just over `max_delay` and `Duration::MAX`; any
/// delay (1 s) and `Duration::MAX` when it has no delay at all.
fn refused_delays(caps: &Capabilities) -> Vec<(String, Duration)> {
    let mut delays = Vec::new();
    match caps.max_delay {
        Some(max) => {
            if let Some(over) = max.checked_add(Duration::from_secs(1)) {
                delays.push((format!("max_delay + 1 s ({over:?})"), over));
            }
        }
        None => delays.push((
            "1 s (max_delay is None)".to_string(),
            Duration::from_secs(1),
        )),
    }
    delays.push(("Duration::MAX".to_string(), Duration::MAX));
    delays
}

/// A send with a delay the backend cannot honour — `max_delay + 1 s`, or any delay
/// when `max_delay` is `None`, and `Duration::MAX` — fails with `Unsupported` and
/// enqueues nothing (not even undelayed: nothing is received, depth counts only what
/// was accepted); inside `send_batch` it fails that entry alone. A delay of exactly
/// `max_delay` is accepted.
pub async fn delay_beyond_max_delay_is_unsupported(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let caps = ctx.caps().clone();
    let refused = refused_delays(&caps);
    for (what, delay) in &refused {
        let r = try_send(&*p, Message::new(format!("single, {what}")).delay(*delay)).await?;
        expect_kind(
            &format!("send with a delay of {what}"),
            r,
            ErrorKind::Unsupported,
        )?;
    }

    let mut batch = vec![Message::new("batch-ok-first")];
    for (what, delay) in &refused {
        batch.push(Message::new(format!("batch, {what}")).delay(*delay));
    }
    batch.push(Message::new("batch-ok-last"));
    let n = batch.len();
    let results = bounded("send_batch with refused delays", p.send_batch(batch)).await?;
    ensure!(
        results.len() == n,
        "send_batch of {n} returned {} results",
        results.len()
    );
    ensure!(
        results[0].is_ok() && results[n - 1].is_ok(),
        "the entries without a delay must be enqueued: {:?} / {:?}",
        results[0],
        results[n - 1]
    );
    for (i, (what, _)) in refused.iter().enumerate() {
        let r = results[i + 1].as_ref().map(|_| ()).map_err(|e| e.kind());
        ensure!(
            r == Err(ErrorKind::Unsupported),
            "send_batch entry with a delay of {what}: expected Unsupported, got {:?}",
            results[i + 1]
        );
    }

    // The boundary itself is fine.
    let mut delayed = 0;
    if let Some(max) = caps.max_delay.filter(|m| !m.is_zero()) {
        send(&*p, Message::new("at max_delay").delay(max))
            .await
            .map_err(|f| {
                Failure::new(format!(
                    "a delay of exactly max_delay ({max:?}) must be accepted: {}",
                    f.message()
                ))
            })?;
        delayed = 1;
    }
    if caps.depth.is_available() {
        expect_depth(
            "only the accepted messages are counted",
            depth(2, 0, delayed),
            ctx.depth_bound(),
            || c.depth(),
        )
        .await?;
    }
    let got = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    ensure!(
        sorted_texts(&got) == ["batch-ok-first", "batch-ok-last"],
        "only the two undelayed batch entries may be delivered (a refused message was \
         enqueued, or the accepted ones lost): got {:?}",
        sorted_texts(&got)
    );
    ack_all(&got).await
}

/// The answer to an operation given `Duration::MAX`: `Ok`, or a typed error; where
/// the capabilities put a limit below it, the contract's `Unsupported`.
fn judge<T: std::fmt::Debug>(what: &str, result: Result<T>, limited: bool) -> CaseResult<bool> {
    match result {
        Ok(_) if limited => Err(Failure::new(format!(
            "{what}: accepted, though the capabilities set a limit below it (expected \
             Unsupported, nothing changed)"
        ))),
        Ok(_) => Ok(true),
        Err(e) if limited && e.kind() != ErrorKind::Unsupported => Err(Failure::new(format!(
            "{what}: expected Unsupported (the capabilities set a limit below it), got {:?}: {e}",
            e.kind()
        ))),
        Err(_) => Ok(false),
    }
}

/// `Duration::MAX` as a receive wait, an extension, a nack delay and a release delay:
/// each call returns (a receive with a message ready returns it at once; on an empty
/// queue it waits) with `Ok` or a typed error — `Unsupported`, leaving the lease as it
/// was, where the capabilities put a limit below it (`max_visibility`,
/// `max_nack_delay`) — and never panics. Afterwards the message is still
/// deliverable: nothing was lost to an overflowed deadline.
pub async fn huge_durations_never_panic(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let caps = ctx.caps().clone();
    send(&*p, Message::new("huge")).await?;

    // A message is ready: a receive waiting "forever" returns it at once.
    let d: Delivery = match tokio::time::timeout(ctx.prompt(), c.receive(1, Duration::MAX)).await {
        Ok(Ok(mut ds)) if ds.len() == 1 => ds.pop().ok_or_else(|| Failure::new("no delivery"))?,
        Ok(Ok(ds)) => {
            return Err(Failure::new(format!(
                "receive(1, Duration::MAX) with one message ready returned {} deliveries",
                ds.len()
            )))
        }
        // A typed refusal of the wait is fine; the message must still arrive.
        Ok(Err(_)) => receive_one(&*c, ctx.prompt()).await?,
        Err(_) => {
            return Err(Failure::new(format!(
                "receive(1, Duration::MAX) did not return within {:?} though a message \
                     was ready",
                ctx.prompt()
            )))
        }
    };

    let extend_limited = caps.max_visibility.is_some_and(|m| m < Duration::MAX);
    judge(
        "extend(Duration::MAX)",
        bounded("extend(Duration::MAX)", async {
            Ok(d.extend(Duration::MAX).await)
        })
        .await?,
        extend_limited,
    )?;
    ensure!(!d.acker().is_settled(), "an extend settled the delivery");

    let nack_limited = !caps.supports_nack_delay(Duration::MAX);
    let nacked = judge(
        "nack(Some(Duration::MAX))",
        bounded("nack(Some(Duration::MAX))", async {
            Ok(d.nack(Some(Duration::MAX)).await)
        })
        .await?,
        nack_limited,
    )?;
    if nacked {
        // Only a backend claiming max_nack_delay = Duration::MAX gets here: the
        // message waits out its delay, which this case cannot.
        return Ok(());
    }
    ensure!(
        !d.acker().is_settled(),
        "a refused nack settled the delivery (the lease must be left as it was)"
    );
    let released = judge(
        "release(Some(Duration::MAX))",
        bounded("release(Some(Duration::MAX))", async {
            Ok(d.release(Some(Duration::MAX)).await)
        })
        .await?,
        nack_limited,
    )?;
    if released {
        return Ok(());
    }
    ensure!(
        !d.acker().is_settled(),
        "a refused release settled the delivery (the lease must be left as it was)"
    );

    // Still deliverable: give it back and get it again.
    d.nack(None).await.map_err(|e| {
        Failure::new(format!(
            "nack(None) after the refused huge durations failed: {e}"
        ))
    })?;
    let again = receive_one(&*c, ctx.redelivery_bound())
        .await
        .map_err(|f| {
            Failure::new(format!(
                "the message was lost after the huge durations: {}",
                f.message()
            ))
        })?;
    ensure!(text(&again) == "huge", "got {:?}", text(&again));
    again.ack().await?;

    // An empty queue: a receive waiting "forever" waits (cut short here) or answers
    // with nothing; done last, so a receive left pending on the server has nothing
    // to take.
    match tokio::time::timeout(ctx.quiet(), c.receive(1, Duration::MAX)).await {
        Err(_) => {}
        Ok(Ok(ds)) => ensure!(
            ds.is_empty(),
            "an empty queue delivered {:?}",
            crate::support::texts(&ds)
        ),
        Ok(Err(_)) => {}
    }
    expect_none(&*c, ctx.quiet(), "the message was acked").await
}

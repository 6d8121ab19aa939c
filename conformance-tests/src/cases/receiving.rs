//! `receive(max, wait)`: long polling that returns early, waits fully when empty, and
//! never hands out more than `max`.

use std::collections::HashSet;
use std::time::Duration;

use ferrymq_core::Message;
use tokio::time::Instant;

use crate::cases::visibility::EARLY_TOLERANCE;
use crate::support::{ack_all, expect_none, receive, send, send_all, text, texts};
use crate::{CaseResult, Context};

/// A receive waiting up to 10 s returns promptly once a message is sent during the
/// wait — long polling, not sleeping out the wait.
pub async fn receive_returns_as_soon_as_message_arrives(ctx: &Context) -> CaseResult {
    let wait = Duration::from_secs(10);
    let (_, p, c) = ctx.fresh().await?;
    let receiving = async {
        let ds = receive(&*c, 10, wait).await;
        (ds, Instant::now())
    };
    let sending = async {
        // Let the receive start waiting first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at = Instant::now();
        send(&*p, Message::new("wake up")).await.map(|_| at)
    };
    let ((ds, returned), sent) = tokio::join!(receiving, sending);
    let sent_at = sent?;
    let ds = ds?;
    assert_eq!(
        texts(&ds),
        ["wake up"],
        "the waiting receive must return the message"
    );
    let latency = returned.saturating_duration_since(sent_at);
    let bound = Duration::from_secs(2).max(ctx.slack() * 2);
    assert!(
        latency < bound,
        "receive returned {latency:?} after the send (bound {bound:?}, wait {wait:?})"
    );
    ack_all(&ds).await
}

/// On an empty queue `receive(_, 0)` returns at once and `receive(_, 1 s)` returns an
/// empty vector only after the full second.
pub async fn receive_waits_then_returns_empty(ctx: &Context) -> CaseResult {
    let (_, _p, c) = ctx.fresh().await?;
    let t = Instant::now();
    let ds = receive(&*c, 5, Duration::ZERO).await?;
    let took = t.elapsed();
    assert!(ds.is_empty(), "an empty queue delivered {:?}", texts(&ds));
    assert!(
        took < Duration::from_secs(1) + ctx.slack(),
        "receive with wait 0 took {took:?}"
    );

    let wait = Duration::from_secs(1);
    let t = Instant::now();
    let ds = receive(&*c, 5, wait).await?;
    let took = t.elapsed();
    assert!(ds.is_empty(), "an empty queue delivered {:?}", texts(&ds));
    assert!(
        took + EARLY_TOLERANCE >= wait,
        "an empty receive returned after {took:?}, before its wait of {wait:?}"
    );
    assert!(
        took <= wait + ctx.slack() + Duration::from_secs(2),
        "an empty receive with wait {wait:?} took {took:?}"
    );
    Ok(())
}

/// `receive(3, _)` with 10 messages ready returns between 1 and 3 deliveries per
/// call, and successive calls hand out all 10 once.
pub async fn receive_respects_max(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send_all(
        &*p,
        (0..10).map(|i| Message::new(format!("m{i}"))).collect(),
    )
    .await?;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + ctx.prompt();
    while seen.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of 10 received in time",
            seen.len()
        );
        let ds = receive(&*c, 3, left).await?;
        assert!(ds.len() <= 3, "receive(3) returned {}", ds.len());
        for d in &ds {
            assert!(seen.insert(text(d)), "{} delivered twice", text(d));
        }
        ack_all(&ds).await?;
    }
    let one = receive(&*c, 1, Duration::ZERO).await?;
    assert!(one.is_empty(), "more than 10 delivered: {:?}", texts(&one));
    expect_none(&*c, ctx.quiet(), "all 10 were acked").await
}

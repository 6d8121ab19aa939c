//! Per-key order and priority.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::{Consumer, Message, Priority};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cases::visibility::EARLY_TOLERANCE;
use crate::support::{
    ack_all, drain, expect_none, expect_none_until, receive, receive_batch, receive_one, send,
    send_all, take_or_receive_one, text, texts,
};
use crate::{CaseResult, Context, Failure};

const KEYS: usize = 16;
const MESSAGES: usize = 1000;
const CONSUMERS: usize = 4;

#[derive(Default)]
struct KeyLog {
    /// Per key: how many messages were handled (acked), which is the sequence number
    /// the next delivery of that key must carry.
    next: HashMap<String, u32>,
    handled: usize,
    nacked: usize,
    violations: Vec<String>,
}

/// 1000 messages over 16 keys, consumed by 4 competing consumers at once, about one
/// in 20 nacked once: every key's messages are delivered strictly in send order — a
/// later message of a key is never delivered before the earlier one is acked — and
/// each is handled exactly once.
pub async fn per_key_order(ctx: &Context) -> CaseResult {
    let (q, p, idle) = ctx.fresh().await?;
    // Only the competing consumers below may be members: on a partitioned backend
    // (Kafka) an idle member would own partitions whose records nobody handles.
    idle.close().await?;
    drop(idle);
    let log = Arc::new(Mutex::new(KeyLog::default()));
    let deadline = Instant::now() + Duration::from_secs(45);

    let mut consumers = JoinSet::new();
    for _ in 0..CONSUMERS {
        let c = ctx.consumer(&q).await?;
        let log = log.clone();
        consumers.spawn(async move { consume_in_order(c, log, deadline).await });
    }

    // Interleave keys, so every batch holds many keys.
    let messages: Vec<Message> = (0..MESSAGES)
        .map(|i| {
            let key = format!("key-{:02}", i % KEYS);
            let seq = (i / KEYS) as u32;
            Message::new(format!("{key}/{seq}"))
                .key(key)
                .header("seq", seq.to_string())
        })
        .collect();
    let chunk = ctx.caps().max_batch.clamp(1, 100);
    for batch in messages.chunks(chunk) {
        send_all(&*p, batch.to_vec()).await?;
    }

    while let Some(r) = consumers.join_next().await {
        r.map_err(|e| Failure::new(format!("consumer task: {e}")))??;
    }
    let log = log.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        log.violations.is_empty(),
        "per-key order violated {} times, first: {:?}",
        log.violations.len(),
        &log.violations[..log.violations.len().min(5)]
    );
    assert_eq!(log.handled, MESSAGES, "not every message was handled");
    for k in 0..KEYS {
        let key = format!("key-{k:02}");
        let expected = MESSAGES / KEYS + usize::from(k < MESSAGES % KEYS);
        assert_eq!(
            log.next.get(&key).copied().unwrap_or(0) as usize,
            expected,
            "{key}"
        );
    }
    assert!(log.nacked > 0, "no nacks were exercised");
    Ok(())
}

async fn consume_in_order(
    c: Box<dyn Consumer>,
    log: Arc<Mutex<KeyLog>>,
    deadline: Instant,
) -> CaseResult {
    let mut nacked_once: std::collections::HashSet<String> = Default::default();
    loop {
        {
            let log = log.lock().unwrap_or_else(|e| e.into_inner());
            if log.handled >= MESSAGES || !log.violations.is_empty() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            let handled = log.lock().unwrap_or_else(|e| e.into_inner()).handled;
            return Err(Failure::new(format!(
                "only {handled} of {MESSAGES} messages handled in time"
            )));
        }
        let ds = receive(&*c, receive_batch(&*c), Duration::from_millis(200)).await?;
        for d in ds {
            let key = d.key().unwrap_or("").to_string();
            let seq: u32 = d
                .headers()
                .get("seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(u32::MAX);
            let id = text(&d);
            // Nack about one in 20, once each, to check a nacked head still blocks
            // its key.
            let nack = (seq as usize * 7 + key.len() * 13 + id.len()) % 20 == 0
                && nacked_once.insert(id.clone());
            {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                let next = log.next.entry(key.clone()).or_insert(0);
                if seq != *next {
                    let expected = *next;
                    log.violations.push(format!(
                        "{key}: delivered seq {seq} while {expected} was the next unacked"
                    ));
                    return Ok(());
                }
                if nack {
                    log.nacked += 1;
                } else {
                    // Count it before acking: the next of this key may be delivered
                    // to another consumer the moment the ack lands.
                    *next += 1;
                    log.handled += 1;
                }
            }
            if nack {
                d.nack(None).await?;
            } else {
                d.ack().await?;
            }
        }
    }
}

/// While the first message of a key is unsettled, the second of that key is not
/// delivered, though other keys are; a nack with a delay keeps the key blocked too.
/// Once the first is acked, the second arrives.
pub async fn per_key_next_waits_for_head(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    send_all(
        &*p,
        vec![
            Message::new("k1").key("k"),
            Message::new("k2").key("k"),
            Message::new("l1").key("l"),
        ],
    )
    .await?;
    let first = drain(&*c, ctx.quiet(), ctx.prompt()).await?;
    let mut got = texts(&first);
    got.sort();
    assert_eq!(
        got,
        ["k1", "l1"],
        "with k1 unsettled, k2 must wait and l1 must flow"
    );
    let k1 = first
        .iter()
        .find(|d| text(d) == "k1")
        .ok_or_else(|| Failure::new("k1 missing"))?;
    for d in &first {
        if text(d) == "l1" {
            d.ack().await?;
        }
    }

    let delay = Duration::from_secs(1);
    if ctx.caps().supports_nack_delay(delay) {
        let t0 = Instant::now();
        k1.nack(Some(delay)).await?;
        let early = expect_none_until(
            &*c,
            t0 + delay - EARLY_TOLERANCE,
            "k1 waits out its nack delay and k2 must not overtake it",
        )
        .await?;
        let again = take_or_receive_one(&*c, early, delay + ctx.slack() + ctx.prompt()).await?;
        assert_eq!(text(&again), "k1", "k1 must come back before k2");
        expect_none(&*c, ctx.quiet(), "k1 is unsettled again").await?;
        again.ack().await?;
    } else {
        k1.ack().await?;
    }
    let k2 = receive_one(&*c, ctx.prompt()).await?;
    assert_eq!(text(&k2), "k2");
    ack_all(&[k2]).await?;
    expect_none(&*c, ctx.quiet(), "everything was acked").await
}

/// Among ready messages a higher priority is delivered first, and equal priorities
/// in send order. With `Priority::Levels`, `i32::MAX` is assumed to be in the top
/// level and the default priority below it.
pub async fn priority_order(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let (sent, expected): (Vec<Message>, Vec<&str>) = match ctx.caps().priority {
        Priority::Exact => (
            vec![
                Message::new("p1-a").priority(1),
                Message::new("p5-a").priority(5),
                Message::new("default"),
                Message::new("p-2").priority(-2),
                Message::new("p10").priority(10),
                Message::new("p5-b").priority(5),
                Message::new("p1-b").priority(1),
            ],
            vec!["p10", "p5-a", "p5-b", "p1-a", "p1-b", "default", "p-2"],
        ),
        _ => (
            vec![
                Message::new("low-a"),
                Message::new("high-a").priority(i32::MAX),
                Message::new("low-b"),
                Message::new("high-b").priority(i32::MAX),
            ],
            vec!["high-a", "high-b", "low-a", "low-b"],
        ),
    };
    for m in sent {
        send(&*p, m).await?;
    }
    let mut order = Vec::new();
    for _ in 0..expected.len() {
        let d = receive_one(&*c, ctx.prompt()).await?;
        order.push(text(&d));
        d.ack().await?;
    }
    assert_eq!(order, expected, "delivery order by priority");
    expect_none(&*c, ctx.quiet(), "everything was acked").await
}

//! Many consumers, many settles, restarts: nothing lost, nothing doubled.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::{Consumer, Delivery, Message};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::{drain, expect_none, receive, receive_batch, receive_n, send_all, text};
use crate::{CaseResult, Context, Failure};

/// What a consumer task does with each delivery.
#[derive(Clone, Copy)]
enum Verdict {
    Ack,
    Nack,
}

#[derive(Default)]
struct Tally {
    /// Deliveries per payload.
    delivered: HashMap<String, u32>,
    /// Acks per payload.
    acked: HashMap<String, u32>,
    /// Deliveries per consumer.
    per_consumer: Vec<usize>,
}

/// Run `consumers` competing consumers until `done` says the tally is complete or the
/// deadline passes; `decide` picks ack or nack from the delivery and its count.
async fn consume_all(
    consumers: Vec<Box<dyn Consumer>>,
    deadline: Instant,
    decide: fn(&Delivery, u32) -> Verdict,
    done: impl Fn(&Tally) -> bool + Send + Sync + 'static,
) -> CaseResult<Tally> {
    let tally = Arc::new(Mutex::new(Tally {
        per_consumer: vec![0; consumers.len()],
        ..Tally::default()
    }));
    let done = Arc::new(done);
    let mut tasks = JoinSet::new();
    for (i, c) in consumers.into_iter().enumerate() {
        let tally = tally.clone();
        let done = done.clone();
        tasks.spawn(async move {
            loop {
                if done(&tally.lock().unwrap_or_else(|e| e.into_inner())) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(Failure::new("not every message was settled in time"));
                }
                let ds = receive(&*c, receive_batch(&*c), Duration::from_millis(200)).await?;
                for d in ds {
                    let verdict = {
                        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                        t.per_consumer[i] += 1;
                        let n = t.delivered.entry(text(&d)).or_insert(0);
                        *n += 1;
                        let verdict = decide(&d, *n);
                        if let Verdict::Ack = verdict {
                            *t.acked.entry(text(&d)).or_insert(0) += 1;
                        }
                        verdict
                    };
                    match verdict {
                        Verdict::Ack => d.ack().await?,
                        Verdict::Nack => d.nack(None).await?,
                    }
                }
            }
        });
    }
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        let r = r
            .map_err(|e| Failure::new(format!("consumer task: {e}")))
            .and_then(|r| r);
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    match first_error {
        Some(e) => Err(Failure::new(format!(
            "{e}; acked {} distinct, delivered {} distinct",
            tally.acked.len(),
            tally.delivered.len()
        ))),
        None => Ok(tally),
    }
}

/// 4 consumers compete for 400 messages sent while they poll: every message is
/// delivered and acked exactly once (all acks land well within the visibility
/// timeout, so no duplicate is allowed), and nothing is left.
pub async fn competing_consumers(ctx: &Context) -> CaseResult {
    const N: usize = 400;
    let (q, p, _) = ctx.fresh().await?;
    let mut consumers = Vec::new();
    for _ in 0..4 {
        consumers.push(ctx.consumer(&q).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    // Send while the consumers already poll.
    let sending = async {
        for chunk in (0..N).collect::<Vec<_>>().chunks(50) {
            send_all(
                &*p,
                chunk
                    .iter()
                    .map(|i| Message::new(format!("m{i}")))
                    .collect(),
            )
            .await?;
        }
        CaseResult::Ok(())
    };
    let consuming = consume_all(
        consumers,
        deadline,
        |_, _| Verdict::Ack,
        |t| t.acked.len() >= N,
    );
    let (sent, tally) = tokio::join!(sending, consuming);
    sent?;
    let tally = tally?;

    let missing: Vec<usize> = (0..N)
        .filter(|i| !tally.acked.contains_key(&format!("m{i}")))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let dupes: Vec<(&String, &u32)> = tally.delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dupes.is_empty(),
        "{} messages delivered more than once (per consumer {:?}): {:?}",
        dupes.len(),
        tally.per_consumer,
        &dupes[..dupes.len().min(5)]
    );
    assert_eq!(tally.delivered.len(), N, "unexpected payloads delivered");
    let last = ctx.consumer(&q).await?;
    expect_none(&*last, ctx.quiet(), "all 400 were acked").await
}

/// 60 messages, each nacked on its first two deliveries and acked on the third, by 3
/// consumers: every message is delivered exactly 3 times and acked once.
pub async fn many_nacks_lose_nothing(ctx: &Context) -> CaseResult {
    const N: usize = 60;
    let (q, p, _) = ctx.fresh().await?;
    send_all(&*p, (0..N).map(|i| Message::new(format!("m{i}"))).collect()).await?;
    let mut consumers = Vec::new();
    for _ in 0..3 {
        consumers.push(ctx.consumer(&q).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let tally = consume_all(
        consumers,
        deadline,
        |_, n| if n <= 2 { Verdict::Nack } else { Verdict::Ack },
        |t| t.acked.len() >= N,
    )
    .await?;
    for i in 0..N {
        let m = format!("m{i}");
        assert_eq!(tally.acked.get(&m), Some(&1), "{m} acks");
        assert_eq!(tally.delivered.get(&m), Some(&3), "{m} deliveries");
    }
    let last = ctx.consumer(&q).await?;
    expect_none(&*last, ctx.quiet(), "all were acked").await
}

/// A consumer takes 10 of 30 messages, acks 5 and goes away without settling the
/// other 5. A new consumer gets the 25 not acked — the 5 abandoned ones once their
/// lease runs out — each exactly once, and never one of the 5 acked.
pub async fn no_loss_across_consumer_restarts(ctx: &Context) -> CaseResult {
    let (q, p, c1) = ctx.fresh().await?;
    send_all(
        &*p,
        (0..30).map(|i| Message::new(format!("m{i:02}"))).collect(),
    )
    .await?;
    let taken = receive_n(&*c1, 10, ctx.prompt()).await?;
    let mut acked = HashSet::new();
    for d in &taken[..5] {
        d.ack().await?;
        acked.insert(text(d));
    }
    // A crash: deliveries and consumer dropped, nothing settled or closed.
    drop(taken);
    drop(c1);

    let c2 = ctx.consumer(&q).await?;
    let within = ctx.redelivery_bound() + Duration::from_secs(5);
    let got = receive_n(&*c2, 25, within).await?;
    let mut seen = HashSet::new();
    for d in &got {
        let t = text(d);
        assert!(
            !acked.contains(&t),
            "{t} was acked before the restart but came back"
        );
        assert!(
            seen.insert(t.clone()),
            "{t} delivered twice to the new consumer"
        );
        d.ack().await?;
    }
    let extra = drain(&*c2, ctx.quiet(), ctx.prompt()).await?;
    assert!(
        extra.is_empty(),
        "unexpected extra deliveries: {:?}",
        crate::support::texts(&extra)
    );
    Ok(())
}

//! What goes in comes out: payloads, headers, keys and metadata, per queue.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use ferrymq_core::message::RESERVED_HEADER_PREFIX;
use ferrymq_core::{reserved, ErrorKind, Message};
use serde::{Deserialize, Serialize};

use crate::support::{
    ack_all, expect_none, receive_n, receive_one, send, send_all, sorted_texts, text,
};
use crate::{CaseResult, Context};

/// A message sent is received once with its payload, headers and key; the delivery
/// is a first attempt; after an ack the queue is empty. Producer and consumer report
/// the queue and the factory's capabilities.
pub async fn round_trip(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    assert_eq!(p.queue(), q, "producer reports another queue");
    assert_eq!(c.queue(), q, "consumer reports another queue");
    assert_eq!(
        p.capabilities(),
        ctx.caps(),
        "the producer's capabilities differ from the factory's"
    );
    assert_eq!(
        c.capabilities(),
        ctx.caps(),
        "the consumer's capabilities differ from the factory's"
    );

    send(
        &*p,
        Message::new("hello ferrymq")
            .header("event-type", "greeting")
            .key("customer-7"),
    )
    .await?;
    p.flush().await?;

    let d = receive_one(&*c, ctx.prompt()).await?;
    assert_eq!(d.payload().as_ref(), b"hello ferrymq");
    assert_eq!(d.headers().get("event-type"), Some("greeting"));
    assert_eq!(d.key(), Some("customer-7"), "the key was not carried");
    assert_eq!(
        d.message().get_delay(),
        None,
        "a delivery has no delay left"
    );
    assert_eq!(d.attempt(), 1, "a first delivery is attempt 1");
    d.ack().await?;
    expect_none(&*c, ctx.quiet(), "the only message was acked").await
}

/// Delivery metadata: a non-empty id distinct per message, the queue name, attempt
/// 1, and an enqueue time between just before the send and just after the receive.
pub async fn delivery_metadata(ctx: &Context) -> CaseResult {
    let (q, p, c) = ctx.fresh().await?;
    // Clocks of a remote server may be a little off ours.
    let skew = Duration::from_secs(5);
    let before = SystemTime::now() - skew;
    send_all(&*p, (0..5).map(|i| Message::new(format!("m{i}"))).collect()).await?;
    let ds = receive_n(&*c, 5, ctx.prompt()).await?;
    let after = SystemTime::now() + skew;

    let ids: HashSet<&str> = ds.iter().map(|d| d.id()).collect();
    assert_eq!(ids.len(), 5, "delivery ids are not distinct: {ids:?}");
    for d in &ds {
        let meta = d.meta();
        assert!(!meta.id.is_empty(), "empty delivery id for {}", text(d));
        assert_eq!(&*meta.queue, q, "meta.queue is not the queue received from");
        assert_eq!(meta.attempt, 1);
        assert!(
            meta.enqueued_at >= before && meta.enqueued_at <= after,
            "enqueued_at {:?} is not between the send and the receive",
            meta.enqueued_at
        );
    }
    ack_all(&ds).await
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    note: String,
    total_cents: i64,
    lines: Vec<(String, u32)>,
    gift: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct NotAnOrder {
    sku: String,
}

/// Payload bytes come back identical: every byte value 0..=255, an empty payload, a
/// larger pseudo-random one, and JSON through `Message::json` / `Delivery::json`
/// (which sets `content-type` and reports a mismatched type as `Decode`).
pub async fn binary_and_json_bodies_byte_identical(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let all_bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let random_len = (ctx.caps().max_message_size / 2).min(64 * 1024);
    let mut x: u32 = 0x9e37_79b9;
    let random: Vec<u8> = (0..random_len)
        .map(|_| {
            // xorshift: deterministic noise, so a failure reproduces.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let order = Order {
        id: 42,
        customer: "Zoë \"quoted\" O'Brien — 東京".into(),
        note: "line one\nline two\ttabbed \\ backslash \u{0} nul".into(),
        total_cents: -1_999,
        lines: vec![("sku-1".into(), 2), ("ŝku-2".into(), 1)],
        gift: None,
    };

    send(&*p, Message::new(all_bytes.clone()).header("body", "bytes")).await?;
    send(&*p, Message::new(Vec::new()).header("body", "empty")).await?;
    send(&*p, Message::new(random.clone()).header("body", "random")).await?;
    send(&*p, Message::json(&order)?.header("body", "json")).await?;

    let ds = receive_n(&*c, 4, ctx.prompt()).await?;
    let mut seen = HashSet::new();
    for d in &ds {
        let kind = d.headers().get("body").unwrap_or("?");
        seen.insert(kind.to_string());
        match kind {
            "bytes" => assert!(
                d.payload().as_ref() == all_bytes.as_slice(),
                "all-bytes payload changed"
            ),
            "empty" => assert!(
                d.payload().is_empty(),
                "empty payload came back as {} bytes",
                d.payload().len()
            ),
            "random" => assert!(
                d.payload().as_ref() == random.as_slice(),
                "random {random_len}-byte payload changed"
            ),
            "json" => {
                assert_eq!(d.headers().get("content-type"), Some("application/json"));
                assert_eq!(
                    d.payload().as_ref(),
                    serde_json::to_vec(&order)
                        .map_err(ferrymq_core::Error::from)?
                        .as_slice()
                );
                assert_eq!(d.json::<Order>()?, order);
                let wrong = d.json::<NotAnOrder>();
                assert_eq!(
                    wrong.map(|_| ()).map_err(|e| e.kind()),
                    Err(ErrorKind::Decode)
                );
            }
            other => panic!("unexpected delivery with body header {other:?}"),
        }
    }
    assert_eq!(
        seen.len(),
        4,
        "some bodies arrived twice, others not: {seen:?}"
    );
    ack_all(&ds).await
}

/// Headers come back with the same names (case-sensitive), values (Unicode,
/// whitespace, empty, long) and order; a message without headers gets none.
/// Reserved `ferrymq-` headers a backend adds itself are allowed on top.
pub async fn header_fidelity(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    let long = "0123456789abcdef".repeat(64);
    let sent: Vec<(String, String)> = [
        ("trace-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("Trace-Id", "a twin differing only in case"),
        ("unicode", "ünïcødé ✓ 日本語 עברית العربية"),
        ("emoji", "🚀 👩‍👩‍👧‍👦 🏳️‍🌈"),
        ("combining", "e\u{301} a\u{308}"),
        ("empty", ""),
        ("spaces", "  leading and trailing  "),
        ("punctuation", "a=b; c,d \"q\" 'single' <x/> &amp; \\ / : ?"),
        ("whitespace", "tab\there\r\nand a new line"),
        ("dotted.name", "dots"),
        ("under_score", "underscores"),
        ("digits-123", "42"),
        ("long", long.as_str()),
        (reserved::FAILURE_REASON, "handler said no"),
        (reserved::ORIGIN_QUEUE, "orders"),
        ("z-last", "last, after the reserved ones"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();

    let mut with = Message::new("with headers");
    for (n, v) in &sent {
        with = with.header(n.clone(), v.clone());
    }
    send(&*p, with).await?;
    send(&*p, Message::new("without headers")).await?;

    let ds = receive_n(&*c, 2, ctx.prompt()).await?;
    for d in &ds {
        let sent_names: HashSet<&str> = sent.iter().map(|(n, _)| n.as_str()).collect();
        // Backends may add their own reserved bookkeeping headers; nothing else.
        let got: Vec<(String, String)> = d
            .headers()
            .iter()
            .filter(|(n, _)| !n.starts_with(RESERVED_HEADER_PREFIX) || sent_names.contains(n))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        match d.payload().as_ref() {
            b"with headers" => assert_eq!(got, sent, "headers changed (names, values or order)"),
            b"without headers" => assert!(got.is_empty(), "headers appeared: {got:?}"),
            _ => panic!("unexpected delivery {}", text(d)),
        }
    }
    ack_all(&ds).await
}

/// Messages stay in their queue: consumers of two queues each get exactly their own,
/// and a third queue stays empty.
pub async fn queue_isolation(ctx: &Context) -> CaseResult {
    let (_, pa, ca) = ctx.fresh().await?;
    let (_, pb, cb) = ctx.fresh().await?;
    let (_, _pc, cc) = ctx.fresh().await?;
    send_all(
        &*pa,
        (0..3).map(|i| Message::new(format!("a{i}"))).collect(),
    )
    .await?;
    send_all(
        &*pb,
        (0..2).map(|i| Message::new(format!("b{i}"))).collect(),
    )
    .await?;

    let b = receive_n(&*cb, 2, ctx.prompt()).await?;
    assert_eq!(sorted_texts(&b), ["b0", "b1"]);
    let a = receive_n(&*ca, 3, ctx.prompt()).await?;
    assert_eq!(sorted_texts(&a), ["a0", "a1", "a2"]);
    ack_all(&a).await?;
    ack_all(&b).await?;
    expect_none(&*ca, ctx.quiet(), "queue a held 3 messages, all received").await?;
    expect_none(&*cb, ctx.quiet(), "queue b held 2 messages, all received").await?;
    expect_none(&*cc, ctx.quiet(), "nothing was sent to queue c").await
}

//! SQS backend behaviour against a real SQS server (LocalStack in the test script):
//! the encoding as other SQS clients see it, FIFO runs, dedup, native dead letters
//! and redrive, size after encoding, cancel-safe receives, typed failures.
//!
//! ```text
//! scripts/sqs.sh start 4571
//! FERRYMQ_TEST_SQS_ENDPOINT=http://127.0.0.1:4571 cargo test -p ferrymq-sqs --test queue
//! ```
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use common::{cleanup, config, connect, receive_n};
use ferrymq_core::admin::{Admin, RedriveProgress};
use ferrymq_core::{Consumer, ErrorKind, Headers, Message, Producer};
use ferrymq_sqs::SqsConfig;
use tokio::time::Instant;

/// The messages whose encoding the tests check: every awkward case.
fn awkward_messages() -> Vec<(&'static str, Message)> {
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let sixteen: Headers = (0..16)
        .rev()
        .map(|i| (format!("h-{i:02}"), format!("ünï {i} ✓\r\n")))
        .collect();
    vec![
        ("empty", Message::new(Vec::new())),
        ("all-bytes", Message::new(all_bytes)),
        ("sixteen-headers", Message::new("x").with_headers(sixteen)),
        (
            "empty-header",
            Message::new("y").header("a", "").header("b", "1"),
        ),
        (
            "unsorted-plain",
            Message::new("z").header("zeta", "1").header("alpha", "2"),
        ),
        ("nul-body", Message::new("a\0b")),
        (
            "awkward-key",
            Message::new("k")
                .key("schlüssel with spaces")
                .dedup_id("d ü"),
        ),
    ]
}

async fn raw_receive(cfg: &SqsConfig, url: &str, n: usize) -> Vec<aws_sdk_sqs::types::Message> {
    let client = cfg.sdk_client().await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n && Instant::now() < deadline {
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        got.extend(out.messages.unwrap_or_default());
    }
    got
}

/// Every awkward message round-trips exactly through a real server, on both queue
/// types; and a simple message is, for a plain SDK client, a plain body with plain
/// String attributes and nothing else.
#[tokio::test]
async fn encoding_round_trips_and_simple_messages_stay_plain() {
    for fifo in [false, true] {
        let (p, c, cfg) = connect("enc", fifo, "").await;
        for (label, m) in awkward_messages() {
            p.send(m.clone().header("label", label)).await.unwrap();
        }
        let want: HashMap<&str, Message> = awkward_messages()
            .into_iter()
            .map(|(l, m)| (l, m.header("label", l)))
            .collect();
        let got = receive_n(&c, want.len(), Duration::from_secs(15)).await;
        assert_eq!(got.len(), want.len(), "fifo={fifo}");
        for d in &got {
            let label = d.headers().get("label").unwrap().to_string();
            assert_eq!(d.message(), &want[label.as_str()], "{label} (fifo={fifo})");
            d.ack().await.unwrap();
        }

        // What another SQS client sees of a simple message.
        let simple = Message::new("plain text ✓")
            .header("content-type", "text/plain")
            .header("event", "greeting");
        p.send(simple).await.unwrap();
        let raw = raw_receive(&cfg, p.queue_url(), 1).await;
        assert_eq!(raw.len(), 1);
        let m = &raw[0];
        assert_eq!(m.body(), Some("plain text ✓"));
        let attrs = m.message_attributes().unwrap();
        assert_eq!(
            attrs.keys().map(String::as_str).collect::<HashSet<_>>(),
            HashSet::from(["content-type", "event"]),
            "only the headers, as attributes"
        );
        assert_eq!(attrs["event"].data_type(), "String");
        assert_eq!(attrs["event"].string_value(), Some("greeting"));
        cleanup(&cfg).await;
    }
}

/// A message from another SQS client (plain body, String, Number and Binary
/// attributes) reads naturally: body as payload, attributes as headers by name.
#[tokio::test]
async fn foreign_messages_read_as_plain() {
    let (p, c, cfg) = connect("foreign", false, "").await;
    let client = cfg.sdk_client().await.unwrap();
    use aws_sdk_sqs::primitives::Blob;
    use aws_sdk_sqs::types::MessageAttributeValue;
    let attr = |t: &str, s: Option<&str>, b: Option<&[u8]>| {
        let mut v = MessageAttributeValue::builder().data_type(t);
        if let Some(s) = s {
            v = v.string_value(s);
        }
        if let Some(b) = b {
            v = v.binary_value(Blob::new(b.to_vec()));
        }
        v.build().unwrap()
    };
    client
        .send_message()
        .queue_url(p.queue_url())
        .message_body("{\"from\":\"elsewhere\"}")
        .message_attributes("trace", attr("String", Some("abc"), None))
        .message_attributes("count", attr("Number", Some("42"), None))
        .message_attributes("blob", attr("Binary", None, Some(&[0xff, 0x00])))
        .send()
        .await
        .unwrap();
    let d = receive_n(&c, 1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(d.payload().as_ref(), b"{\"from\":\"elsewhere\"}");
    assert_eq!(
        d.headers().iter().collect::<Vec<_>>(),
        vec![("blob", "/wA="), ("count", "42"), ("trace", "abc")]
    );
    assert_eq!(d.key(), None);
    d.ack().await.unwrap();
    cleanup(&cfg).await;
}

/// Size is checked after encoding: a payload within `max_message_size` plus a key
/// the queue carries as an attribute is refused with `TooLarge` when the encoded
/// message exceeds the queue's `MaximumMessageSize` — nothing is sent — while the
/// same payload without the key goes.
#[tokio::test]
async fn size_is_checked_after_encoding() {
    let (p, c, cfg) = connect("size", false, "").await;
    let max = p.capabilities().max_message_size;
    let payload = vec![b'x'; max];
    let key = "k".repeat(2000);
    let e = p
        .send(Message::new(payload.clone()).key(key.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    assert!(e.to_string().contains("once encoded"), "{e}");
    let r = p
        .send_batch(vec![
            Message::new(payload.clone()).key(key),
            Message::new("small"),
        ])
        .await
        .unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().kind(), ErrorKind::TooLarge);
    assert!(r[1].is_ok());
    p.send(Message::new(payload.clone())).await.unwrap();
    let got = receive_n(&c, 2, Duration::from_secs(10)).await;
    let mut sizes: Vec<usize> = got.iter().map(|d| d.payload().len()).collect();
    sizes.sort();
    assert_eq!(
        sizes,
        [5, max],
        "only the small and the keyless message went"
    );
    for d in got {
        d.ack().await.unwrap();
    }
    cleanup(&cfg).await;
}

/// On FIFO, keyless messages get groups of their own: ten of them come out of one
/// receive together, not one at a time behind a shared default group; keyed ones
/// come out one head per key.
#[tokio::test]
async fn fifo_keyless_messages_do_not_serialise() {
    let (p, c, cfg) = connect("keyless", true, "").await;
    p.send_batch((0..10).map(|i| Message::new(format!("m{i}"))).collect())
        .await
        .unwrap()
        .into_iter()
        .for_each(|r| assert!(r.is_ok()));
    let got = c.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 10, "keyless messages must not share a group");
    for d in &got {
        d.ack().await.unwrap();
    }
    p.send_batch(
        (0..5)
            .map(|i| Message::new(format!("k{i}")).key("same"))
            .collect(),
    )
    .await
    .unwrap();
    let first = c.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 1, "one head per key");
    assert_eq!(c.buffered(), 4, "the rest of the run waits in the buffer");
    assert_eq!(first[0].payload().as_ref(), b"k0");
    cleanup(&cfg).await;
}

/// FIFO: a duplicate dedup id within the window is dropped even after the first
/// message was acked (deleted); a dedup id SQS would refuse (too long, other
/// characters) is hashed and deduplicates the same way, and reads back unchanged.
#[tokio::test]
async fn fifo_dedup_holds_after_delete() {
    let (p, c, cfg) = connect("dedup", true, "").await;
    let long = format!("order/{}/ü", "9".repeat(200));
    for id in ["order-1", long.as_str()] {
        p.send(Message::new("first").dedup_id(id)).await.unwrap();
        let d = receive_n(&c, 1, Duration::from_secs(10)).await.remove(0);
        assert_eq!(d.message().get_dedup_id(), Some(id));
        d.ack().await.unwrap();
        p.send(Message::new("again, after the delete").dedup_id(id))
            .await
            .unwrap();
        let late = c.receive(10, Duration::from_secs(2)).await.unwrap();
        assert!(
            late.is_empty(),
            "{id}: a duplicate within 5 minutes was delivered"
        );
    }
    cleanup(&cfg).await;
}

/// A FIFO queue with 1000 messages over 16 keys and 4 consumers, with about 5 % of
/// deliveries nacked (now, or with a 1 s delay) or released: each key's messages are
/// handled in send order, each exactly once, and no later message of a key is
/// delivered while an earlier one is unsettled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_order_under_nacks_and_competing_consumers() {
    const N: usize = 1000;
    const KEYS: usize = 16;
    let cfg = config("order", true, "");
    let p = cfg.producer().await.unwrap();
    #[derive(Default)]
    struct Log {
        next: HashMap<String, usize>,
        out: HashSet<String>,
        handled: usize,
        settles: usize,
        violations: Vec<String>,
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let messages: Vec<Message> = (0..N)
        .map(|i| {
            let key = format!("key-{:02}", i % KEYS);
            Message::new(format!("{}", i / KEYS)).key(key)
        })
        .collect();
    for chunk in messages.chunks(10) {
        for r in p.send_batch(chunk.to_vec()).await.unwrap() {
            r.unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = cfg.consumer().await.unwrap();
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            while log.lock().unwrap().handled < N && Instant::now() < deadline {
                for d in c.receive(10, Duration::from_millis(500)).await.unwrap() {
                    let key = d.key().unwrap().to_string();
                    let seq: usize = std::str::from_utf8(d.payload()).unwrap().parse().unwrap();
                    let verdict = {
                        let mut log = log.lock().unwrap();
                        if !log.out.insert(key.clone()) {
                            log.violations
                                .push(format!("{key}: two messages out at once ({seq})"));
                        }
                        let next = log.next.get(&key).copied().unwrap_or(0);
                        if seq != next {
                            log.violations
                                .push(format!("{key}: got {seq}, expected {next}"));
                        }
                        log.settles += 1;
                        rand::random::<u32>() % 20
                    };
                    let give_back = match verdict {
                        0 => Some(None),
                        1 if seq.is_multiple_of(3) => Some(Some(Duration::from_secs(1))),
                        2 if seq.is_multiple_of(5) => Some(Some(Duration::ZERO)),
                        _ => None,
                    };
                    match give_back {
                        Some(delay) => {
                            // Marked back first: the next delivery of the key can only
                            // exist once this call landed.
                            log.lock().unwrap().out.remove(&key);
                            if delay == Some(Duration::ZERO) {
                                d.release(None).await.unwrap();
                            } else {
                                d.nack(delay).await.unwrap();
                            }
                        }
                        None => {
                            {
                                let mut log = log.lock().unwrap();
                                *log.next.entry(key.clone()).or_insert(0) += 1;
                                log.handled += 1;
                                log.out.remove(&key);
                            }
                            d.ack().await.unwrap();
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    {
        let log = log.lock().unwrap();
        assert!(
            log.violations.is_empty(),
            "{} violations, first: {:?}",
            log.violations.len(),
            &log.violations[..log.violations.len().min(5)]
        );
        assert_eq!(log.handled, N, "not all handled in time");
        assert!(
            log.settles > N + N / 50,
            "too few nacks exercised: {}",
            log.settles
        );
        for k in 0..KEYS {
            assert_eq!(
                log.next[&format!("key-{k:02}")],
                N / KEYS + usize::from(k < N % KEYS)
            );
        }
    }
    cleanup(&cfg).await;
}

/// A queue created with `max_receives=2`: its capabilities report the native
/// threshold; a message nacked twice moves to the DLQ (created with the queue) on
/// its third receive; describe counts it; `Admin::redrive_dead_letters` brings it
/// back with `StartMessageMoveTask`, reporting progress, nothing lost.
#[tokio::test]
async fn native_dlq_after_n_receives_then_redrive() {
    for fifo in [false, true] {
        let cfg = config("dlq", fifo, "max_receives=2");
        let (p, c) = cfg.connect().await.unwrap();
        assert_eq!(p.capabilities().native_dead_letter_after, Some(2));
        let admin = cfg.admin().await.unwrap();
        let sent: Vec<String> = (0..3).map(|i| format!("poison-{i}")).collect();
        for s in &sent {
            p.send(Message::new(s.clone()).key(s.clone()))
                .await
                .unwrap();
        }
        // Two receives each, nacked; the third receive finds them gone.
        let mut receives: HashMap<String, u32> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while receives.values().filter(|&&n| n >= 2).count() < 3 && Instant::now() < deadline {
            for d in c.receive(10, Duration::from_secs(1)).await.unwrap() {
                let n = receives
                    .entry(String::from_utf8_lossy(d.payload()).into())
                    .or_insert(0);
                *n += 1;
                assert_eq!(d.attempt(), *n, "attempt from ApproximateReceiveCount");
                d.nack(None).await.unwrap();
            }
        }
        let extra = c.receive(10, Duration::from_secs(3)).await.unwrap();
        assert!(
            extra.is_empty(),
            "a third receive must move them to the DLQ (fifo={fifo})"
        );
        let info = admin.describe().await.unwrap();
        assert_eq!(info.depth.dead_lettered, 3, "fifo={fifo}: {info:?}");
        assert!(info.settings.iter().any(|(k, _)| k == "redrive_policy"));

        let seen: Arc<Mutex<Vec<RedriveProgress>>> = Arc::default();
        let sink = seen.clone();
        let progress = move |p: RedriveProgress| sink.lock().unwrap().push(p);
        let moved = admin.redrive_dead_letters(None, &progress).await.unwrap();
        assert_eq!(moved, 3, "fifo={fifo}");
        {
            let seen = seen.lock().unwrap();
            assert!(!seen.is_empty(), "no progress reported");
            assert_eq!(seen.last().unwrap().moved, 3);
        }
        let back = receive_n(&c, 3, Duration::from_secs(15)).await;
        let mut texts: Vec<String> = back
            .iter()
            .map(|d| String::from_utf8_lossy(d.payload()).into_owned())
            .collect();
        texts.sort();
        assert_eq!(texts, sent, "fifo={fifo}");
        for d in &back {
            assert_eq!(d.key(), Some(std::str::from_utf8(d.payload()).unwrap()));
            d.ack().await.unwrap();
        }
        assert_eq!(admin.describe().await.unwrap().depth.dead_lettered, 0);
        cleanup(&cfg).await;
    }
}

/// A receive future dropped mid-poll does not strand what its poll brings: the
/// next receive gets the message at once, as a first attempt.
#[tokio::test]
async fn a_cancelled_receive_strands_nothing() {
    let (p, c, cfg) = connect("cancel", false, "").await;
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        c.receive(10, Duration::from_secs(10)),
    )
    .await;
    assert!(cut.is_err(), "the receive should still have been waiting");
    p.send(Message::new("after the cancel")).await.unwrap();
    let t = Instant::now();
    let got = c.receive(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(got[0].attempt(), 1);
    got[0].ack().await.unwrap();
    cleanup(&cfg).await;
}

/// Lease limits: an extend that would end past 12 h from the receive is
/// `Unsupported` and leaves the lease alone; past the local deadline every settle
/// answers `LeaseExpired` without SQS (the message comes back to another
/// consumer, whose ack works).
#[tokio::test]
async fn lease_limits_are_typed() {
    let (p, c, cfg) = connect("lease", false, "").await;
    p.send(Message::new("m")).await.unwrap();
    let d = receive_n(&c, 1, Duration::from_secs(10)).await.remove(0);
    let before = d.lease_deadline().unwrap();
    let e = d.extend(Duration::from_secs(12 * 3600)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert_eq!(
        d.lease_deadline(),
        Some(before),
        "a refused extend moves nothing"
    );
    d.extend(Duration::from_secs(4)).await.unwrap();
    assert!(d.lease_deadline().unwrap() > before);
    tokio::time::sleep_until(d.lease_deadline().unwrap()).await;
    assert!(!d.is_live());
    assert_eq!(d.ack().await.unwrap_err().kind(), ErrorKind::LeaseExpired);
    let again = receive_n(&c, 1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
    cleanup(&cfg).await;
}

/// Standard queue attributes ferrymq creates with, and depth from attributes.
#[tokio::test]
async fn created_queue_has_the_configured_attributes() {
    let cfg = config("attrs", false, "visibility=7s");
    let p = cfg.producer().await.unwrap();
    assert_eq!(
        p.capabilities().visibility_timeout,
        Some(Duration::from_secs(7))
    );
    let client = cfg.sdk_client().await.unwrap();
    let attrs = client
        .get_queue_attributes()
        .queue_url(p.queue_url())
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap();
    assert_eq!(attrs[&QueueAttributeName::VisibilityTimeout], "7");
    p.send(Message::new("counted")).await.unwrap();
    let depth = p.depth().await.unwrap();
    assert_eq!(depth.waiting, 1);
    let admin = cfg.admin().await.unwrap();
    let info = admin.describe().await.unwrap();
    assert!(info.warnings.iter().any(|w| w.contains("approximate")));
    assert_eq!(
        admin.peek(1).await.unwrap_err().kind(),
        ErrorKind::Unsupported,
        "SQS has no side-effect-free peek"
    );
    assert_eq!(
        admin.purge().await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(admin.purge_all().await.unwrap(), 1);
    assert!(admin.delete().await.unwrap());
    assert!(
        !admin.delete().await.unwrap(),
        "a second delete finds nothing"
    );
}

/// Without a server: opening is a `Connection` error naming the queue, quickly;
/// a missing queue without `create` is `NotFound`.
#[tokio::test]
async fn failures_are_typed() {
    let cfg = SqsConfig::from_url(
        "sqs://nowhere?endpoint=http://127.0.0.1:1&region=us-east-1&access_key_id=a&secret_access_key=b&max_attempts=1",
    )
    .unwrap();
    let t = Instant::now();
    let e = cfg.producer().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert!(e.to_string().contains("nowhere"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let missing = SqsConfig::from_url(&common::url(
        &common::unique("missing", false),
        "create=false",
    ))
    .unwrap();
    assert_eq!(
        missing.producer().await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

//! Per-key order (`ordered=true`) and the queue-wide rate limit (`rate_limit=N/PERIOD`)
//! against a real redis-server, beyond what the conformance suite's `redis-ordered`
//! setup checks: a consumer process killed by SIGKILL while it holds a key's head,
//! many keys handed out in parallel, the settings recorded with the queue, and a rate
//! limit that holds across two consumers.
//!
//! ```text
//! scripts/redis.sh start 6399
//! FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399 cargo test -p ferrymq-redis --test ordered
//! ```
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::{Consumer, ErrorKind, Message, Ordering, Producer};
use ferrymq_redis::RedisConfig;
use tokio::time::Instant;

use common::{base_url, unique};

/// Set in the environment of this binary re-executed as the consumer to kill.
const CHILD_ENV: &str = "FERRYMQ_ORDERED_CHILD_URL";

/// The consumer process the kill test kills: takes one delivery, says which, and
/// holds it (never settles) until it is killed.
#[test]
fn ordered_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let consumer = RedisConfig::from_url(&url)
            .unwrap()
            .consumer()
            .await
            .unwrap();
        loop {
            let ds = consumer.receive(1, Duration::from_secs(1)).await.unwrap();
            if let Some(d) = ds.into_iter().next() {
                println!("holding {}", String::from_utf8_lossy(d.payload()));
                // Mid-handler, forever: the parent kills this process.
                tokio::time::sleep(Duration::from_secs(120)).await;
                std::process::exit(3);
            }
        }
    });
}

fn texts(ds: &[ferrymq_core::Delivery]) -> Vec<String> {
    let mut v: Vec<String> = ds
        .iter()
        .map(|d| String::from_utf8_lossy(d.payload()).into_owned())
        .collect();
    v.sort();
    v
}

/// A consumer process killed by SIGKILL while it holds the head of key `k`: the
/// key stays blocked (the next message of `k` is not handed out, other keys are)
/// until the head's lease runs out; then the head is redelivered first, as
/// attempt 2, and only after its ack does the next message of `k` come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_key_unblocks_after_its_lease_and_head_comes_first() {
    let url = format!(
        "{}/{}?visibility=1s&ordered=true",
        base_url(),
        unique("ordered-kill")
    );
    let (p, c) = RedisConfig::from_url(&url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(c.capabilities().ordering, Ordering::PerKey);
    p.send(Message::new("k1").key("k")).await.unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ordered_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        // libtest prints `test ordered_child ... ` first, on the same line.
        lines.find_map(|l| {
            l.ok()
                .and_then(|l| l.find("holding ").map(|at| l[at..].to_string()))
        })
    })
    .await
    .unwrap();
    assert_eq!(
        line.as_deref(),
        Some("holding k1"),
        "the child took the head"
    );
    let killed_at = Instant::now();
    child.kill().unwrap(); // SIGKILL: no release, no close, nothing sent.
    child.wait().unwrap();

    p.send(Message::new("k2").key("k")).await.unwrap();
    p.send(Message::new("l1").key("l")).await.unwrap();
    let first = c.receive(10, Duration::from_millis(300)).await.unwrap();
    assert_eq!(
        texts(&first),
        ["l1"],
        "k is blocked by the dead consumer's head"
    );
    first[0].ack().await.unwrap();

    // Within the lease nothing of k; after it, k1 first.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.is_empty() && Instant::now() < deadline {
        got = c.receive(10, Duration::from_millis(200)).await.unwrap();
    }
    assert!(
        killed_at.elapsed() >= Duration::from_millis(700),
        "redelivered {:?} after the kill, before the lease ran out",
        killed_at.elapsed()
    );
    assert_eq!(texts(&got), ["k1"], "the head comes back first, alone");
    assert_eq!(got[0].attempt(), 2, "the killed delivery counts");
    let more = c.receive(10, Duration::from_millis(300)).await.unwrap();
    assert!(more.is_empty(), "k2 waits for k1: got {:?}", texts(&more));
    got[0].ack().await.unwrap();
    let next = c.receive(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(texts(&next), ["k2"]);
    next[0].ack().await.unwrap();
    RedisConfig::from_url(&url)
        .unwrap()
        .delete_queue()
        .await
        .unwrap();
}

/// 1 000 keys with 3 messages each: one receive hands out one head of every key
/// (all keys in parallel, no key twice); acking them hands out the second of each.
#[tokio::test]
async fn every_key_has_one_head_out_and_keys_run_in_parallel() {
    let cfg = common::config("ordered-keys", "ordered=true");
    let (p, c) = cfg.connect().await.unwrap();
    let mut batch = Vec::new();
    for seq in 0..3 {
        for k in 0..1000 {
            batch.push(Message::new(format!("{seq}")).key(format!("key-{k}")));
        }
    }
    for r in p.send_batch(batch).await.unwrap() {
        r.unwrap();
    }
    for round in 0..3 {
        let mut seen = std::collections::HashMap::new();
        let mut all = Vec::new();
        loop {
            let ds = c.receive(1000, Duration::from_millis(300)).await.unwrap();
            if ds.is_empty() {
                break;
            }
            for d in &ds {
                let prev = seen.insert(d.key().unwrap().to_string(), ());
                assert!(prev.is_none(), "round {round}: key {:?} twice", d.key());
                assert_eq!(
                    String::from_utf8_lossy(d.payload()),
                    round.to_string(),
                    "round {round}, key {:?}",
                    d.key()
                );
            }
            all.extend(ds);
        }
        assert_eq!(all.len(), 1000, "round {round}: one head per key");
        for d in &all {
            d.ack().await.unwrap();
        }
    }
    assert!(c
        .receive(10, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    cfg.delete_queue().await.unwrap();
}

/// `ordered` is a setting of the queue: a producer or consumer that disagrees is
/// refused naming it; an ordered queue has one priority level.
#[tokio::test]
async fn clients_that_disagree_on_ordered_are_refused() {
    let queue = unique("ordered-settings");
    let url = |q: &str| format!("{}/{queue}?{q}", base_url());
    let (_p, _c) = RedisConfig::from_url(&url("ordered=true"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for query in ["priority_levels=1", "ordered=false&priority_levels=1"] {
        let e = RedisConfig::from_url(&url(query))
            .unwrap()
            .producer()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{query}");
        assert!(e.to_string().contains("`ordered`"), "{query}: {e}");
        assert!(e.to_string().contains("ordered=true"), "{query}: {e}");
        let e = RedisConfig::from_url(&url(query))
            .unwrap()
            .consumer()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("`ordered`"), "{query}: {e}");
    }
    // Agreeing clients connect.
    RedisConfig::from_url(&url("ordered=true"))
        .unwrap()
        .producer()
        .await
        .unwrap();
    let e = RedisConfig::from_url(&url("ordered=true&priority_levels=4")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("priority_levels"), "{e}");
    let e = RedisConfig::from_url(&url("rate_limit=0/1s")).unwrap_err();
    assert!(e.to_string().contains("rate_limit"), "{e}");
    RedisConfig::from_url(&url("ordered=true"))
        .unwrap()
        .delete_queue()
        .await
        .unwrap();
}

/// `rate_limit=10/500ms` with two consumers (separate connections) draining one
/// queue as fast as they can: in every window of 500 ms at most 10 deliveries in
/// all — the limit is the queue's, not each consumer's (with a limit per consumer
/// the two, both asking all along, would take 20) — and the limit lets work
/// through: at least 10 per window on average. Which consumer gets a window's
/// budget is not promised (whoever asks first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_across_two_consumers() {
    const JOBS: usize = 10;
    const PER: Duration = Duration::from_millis(500);
    const RUN: Duration = Duration::from_millis(2600);
    let queue = unique("rate-limit");
    let url = format!("{}/{queue}?rate_limit={JOBS}/500ms", base_url());
    let cfg = RedisConfig::from_url(&url).unwrap();
    let p = cfg.producer().await.unwrap();
    let msgs: Vec<Message> = (0..200).map(|i| Message::new(format!("{i}"))).collect();
    for r in p.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    let log: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let asks: Arc<Mutex<[usize; 2]>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for who in 0..2 {
        let c = cfg.consumer().await.unwrap();
        let (log, asks) = (log.clone(), asks.clone());
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < RUN {
                asks.lock().unwrap()[who] += 1;
                let ds = c.receive(100, Duration::from_millis(100)).await.unwrap();
                let at = Instant::now();
                for d in ds {
                    log.lock().unwrap().push((at, who));
                    d.ack().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut log = log.lock().unwrap().clone();
    log.sort_by_key(|(at, _)| *at);
    // The local receive time is after the server counted the delivery: a window on
    // the local clock may see a window's deliveries late, never early. Allow a 50 ms
    // margin for the replies' travel; still far below two consumers' 2 x 10.
    let margin = Duration::from_millis(50);
    for (i, (at, _)) in log.iter().enumerate() {
        let window = log[i..]
            .iter()
            .take_while(|(t, _)| *t < *at + PER - margin)
            .count();
        assert!(
            window <= JOBS,
            "{window} deliveries within {:?} of {:?}: the limit is {JOBS} per {PER:?}",
            PER - margin,
            *at - start
        );
    }
    let windows = (RUN.as_millis() / PER.as_millis()) as usize;
    assert!(
        log.len() >= JOBS * windows,
        "only {} deliveries in {RUN:?}: the limit let fewer than {JOBS} per {PER:?} through",
        log.len()
    );
    assert!(
        log.len() <= JOBS * (windows + 1),
        "{} deliveries in {RUN:?}",
        log.len()
    );
    // Both consumers kept asking (a receive returns within its 100 ms wait, or
    // when the window reopens), so the limit was tested across two.
    let asks = *asks.lock().unwrap();
    assert!(
        asks.iter().all(|&n| n >= 5),
        "receive calls per consumer: {asks:?}"
    );
    // A consumer with another limit is refused, naming it.
    let e = RedisConfig::from_url(&format!("{}/{queue}?rate_limit=20/500ms", base_url()))
        .unwrap()
        .consumer()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("`rate_limit`"), "{e}");
    assert!(e.to_string().contains("rate_limit=10/500ms"), "{e}");
    cfg.delete_queue().await.unwrap();
}

/// A queue recorded before `ordered` existed (its meta hash has no `ordered`
/// field): a client with `ordered=true` is refused (the queue has 4 priority
/// levels), and leaves nothing behind — the queue's own clients still connect.
#[tokio::test]
async fn a_refused_client_records_nothing() {
    let queue = unique("ordered-refused");
    let url = |q: &str| format!("{}/{queue}{q}", base_url());
    let (_p, _c) = RedisConfig::from_url(&url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let meta = format!("ferrymq:{{{queue}}}:meta");
    let mut raw = common::raw().await;
    let _: () = redis::cmd("HDEL")
        .arg(&meta)
        .arg("ordered")
        .arg("rate_limit")
        .query_async(&mut raw)
        .await
        .unwrap();
    let e = RedisConfig::from_url(&url("?ordered=true"))
        .unwrap()
        .consumer()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("priority_levels"), "{e}");
    let e = RedisConfig::from_url(&url("?rate_limit=5/1s&visibility=5s"))
        .unwrap()
        .consumer()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`visibility`"), "{e}");
    let recorded: Option<String> = redis::cmd("HGET")
        .arg(&meta)
        .arg("ordered")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(recorded, None, "the refused client recorded ordered");
    // The queue's own clients (unordered, unlimited) still connect.
    RedisConfig::from_url(&url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    RedisConfig::from_url(&url(""))
        .unwrap()
        .delete_queue()
        .await
        .unwrap();
}

/// Admin on an ordered queue: `peek` shows held entries (read behind their key's
/// unsettled head) as waiting, and depth counts them as waiting; `purge` removes
/// them and leaves the head in flight, and the key goes on after the head's ack.
#[tokio::test]
async fn admin_sees_and_purges_held_entries() {
    use ferrymq_core::admin::Admin;
    let cfg = common::config("ordered-admin", "ordered=true");
    let (p, c) = cfg.connect().await.unwrap();
    let admin = cfg.admin().await.unwrap();
    for m in ["k1", "k2", "k3"] {
        p.send(Message::new(m).key("k")).await.unwrap();
    }
    p.send(Message::new("l1").key("l")).await.unwrap();
    let first = c.receive(10, Duration::from_millis(300)).await.unwrap();
    assert_eq!(texts(&first), ["k1", "l1"]);
    let peeked: Vec<String> = admin
        .peek(10)
        .await
        .unwrap()
        .iter()
        .map(|p| String::from_utf8_lossy(p.message.payload()).into_owned())
        .collect();
    assert_eq!(peeked, ["k2", "k3"], "held entries are waiting messages");
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (2, 2), "{depth:?}");
    assert_eq!(admin.purge().await.unwrap(), 2);
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (0, 2), "{depth:?}");
    for d in &first {
        d.ack().await.unwrap();
    }
    assert!(c
        .receive(10, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    p.send(Message::new("k4").key("k")).await.unwrap();
    let next = c.receive(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(texts(&next), ["k4"], "the key goes on after the purge");
    next[0].ack().await.unwrap();
    cfg.delete_queue().await.unwrap();
}

/// The locks hash (a key's head) stays in Redis's hashtable encoding however few
/// keys are in flight: as a listpack — what Redis makes of a small hash — every
/// head lookup of a receive and an ack scans the whole hash, which made most of an
/// ordered queue's time with a few hundred keys in flight. And a key of the odd
/// byte the pin uses cannot exist: keys are UTF-8, so order is unchanged for all.
#[tokio::test]
async fn the_locks_hash_stays_a_hashtable_with_few_keys_in_flight() {
    let queue = unique("ordered-pin");
    let cfg = RedisConfig::from_url(&format!("{}/{queue}?ordered=true", base_url())).unwrap();
    let (producer, consumer) = cfg.connect().await.unwrap();
    for i in 0..20 {
        producer
            .send(Message::new(format!("{i}")).key(format!("k{}", i % 5)))
            .await
            .unwrap();
    }
    let client = redis::Client::open(base_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let locks = format!("ferrymq:{{{queue}}}:locks");
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 20 {
        let batch = consumer.receive(10, Duration::from_secs(1)).await.unwrap();
        assert!(!batch.is_empty(), "stalled after {seen:?}");
        assert!(batch.len() <= 5, "one head per key: {}", batch.len());
        let encoding: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(&locks)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(encoding, "hashtable", "with {} keys in flight", batch.len());
        for d in &batch {
            seen.push(String::from_utf8_lossy(d.payload()).into_owned());
            d.ack().await.unwrap();
        }
    }
    // Per key in send order.
    for k in 0..5 {
        let of_key: Vec<u32> = seen
            .iter()
            .map(|s| s.parse::<u32>().unwrap())
            .filter(|i| i % 5 == k)
            .collect();
        let mut sorted = of_key.clone();
        sorted.sort();
        assert_eq!(of_key, sorted, "key k{k}");
    }
    cfg.delete_queue().await.unwrap();
}

/// A consumer of a version before ordered queues checks no `ordered` setting, but
/// it does compare the recorded visibility with its own: an ordered queue records
/// it marked (`<ms>;ordered`), so such a consumer disagrees and is refused instead
/// of reading past the per-key gate. A queue recorded before the mark is marked by
/// the next ordered client, which connects as before; plain queues are unmarked.
#[tokio::test]
async fn an_older_consumer_that_ignores_ordered_is_refused() {
    let client = redis::Client::open(base_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let recorded = |queue: &str| format!("ferrymq:{{{queue}}}:meta");

    let queue = unique("ordered-old-client");
    let url = format!("{}/{queue}?visibility=2s", base_url());
    let ordered = RedisConfig::from_url(&format!("{url}&ordered=true")).unwrap();
    let consumer = ordered.consumer().await.unwrap();
    // What an older consumer of `url` (no `ordered` parameter) records and compares.
    let older: [(&str, &str); 5] = [
        ("priority_levels", "1"),
        ("group", "ferrymq"),
        ("visibility_ms", "2000"),
        ("max_deliveries", "0"),
        ("dlq_max_len", "10000"),
    ];
    let mut disagree = Vec::new();
    for (field, value) in older {
        let theirs: Option<String> = redis::cmd("HGET")
            .arg(recorded(&queue))
            .arg(field)
            .query_async(&mut conn)
            .await
            .unwrap();
        if theirs.as_deref().is_some_and(|t| t != value) {
            disagree.push((field, theirs));
        }
    }
    assert!(
        disagree.iter().any(|(f, _)| *f == "visibility_ms"),
        "an older consumer would find nothing to disagree with on an ordered queue: {disagree:?}"
    );
    // This version's clients still agree.
    RedisConfig::from_url(&format!("{url}&ordered=true"))
        .unwrap()
        .consumer()
        .await
        .unwrap();
    let e = RedisConfig::from_url(&url)
        .unwrap()
        .consumer()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    drop(consumer);
    ordered.delete_queue().await.unwrap();

    // An ordered queue recorded before the mark: connects, and is marked.
    let queue = unique("ordered-unmarked");
    let _: () = redis::cmd("HSET")
        .arg(recorded(&queue))
        .arg("ordered")
        .arg("1")
        .arg("priority_levels")
        .arg("1")
        .arg("visibility_ms")
        .arg("2000")
        .query_async(&mut conn)
        .await
        .unwrap();
    let cfg = RedisConfig::from_url(&format!(
        "{}/{queue}?visibility=2s&ordered=true",
        base_url()
    ))
    .unwrap();
    cfg.consumer().await.unwrap();
    let now: String = redis::cmd("HGET")
        .arg(recorded(&queue))
        .arg("visibility_ms")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(now, "2000;ordered");
    cfg.delete_queue().await.unwrap();

    // A plain queue: unmarked.
    let queue = unique("plain-unmarked");
    let cfg = RedisConfig::from_url(&format!("{}/{queue}?visibility=2s", base_url())).unwrap();
    cfg.consumer().await.unwrap();
    let plain: String = redis::cmd("HGET")
        .arg(recorded(&queue))
        .arg("visibility_ms")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(plain, "2000");
    cfg.delete_queue().await.unwrap();
}

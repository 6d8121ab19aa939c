//! Consumer-group behaviour against a real broker: partitions split between
//! members, revokes, stale handles.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cleanup, config, receive_n, WAIT};
use ferrymq_core::{Consumer, ErrorKind, Message, Producer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_members_split_the_partitions_and_each_message_is_processed_once() {
    let cfg = config("split", "partitions=4");
    let p = cfg.producer().await.unwrap();
    let a = Arc::new(cfg.consumer().await.unwrap());
    let b = Arc::new(cfg.consumer().await.unwrap());
    // Wait for the cooperative rebalance to settle: both members hold partitions.
    let deadline = Instant::now() + WAIT;
    loop {
        let (pa, pb) = (main(&a.assignment()), main(&b.assignment()));
        if pa.len() + pb.len() == 4 && !pa.is_empty() && !pb.is_empty() {
            assert!(pa.is_disjoint(&pb));
            break;
        }
        assert!(Instant::now() < deadline, "no split: {pa:?} {pb:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = 400;
    for i in 0..n {
        p.send(Message::new(format!("{i}")).key(format!("key-{i}")))
            .await
            .unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let per_member = Arc::new(Mutex::new([0usize; 2]));
    let mut tasks = Vec::new();
    for (idx, c) in [a.clone(), b.clone()].into_iter().enumerate() {
        let seen = seen.clone();
        let per_member = per_member.clone();
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end && seen.lock().unwrap().len() < n {
                for d in c.receive(50, Duration::from_millis(200)).await.unwrap() {
                    seen.lock().unwrap().push(d.payload().clone());
                    per_member.lock().unwrap()[idx] += 1;
                    d.ack().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), n, "each message exactly once");
    assert_eq!(unique.len(), n);
    let per = *per_member.lock().unwrap();
    assert!(per[0] > 0 && per[1] > 0, "both members worked: {per:?}");
    a.close().await.unwrap();
    b.close().await.unwrap();
    cleanup(&cfg).await;
}

fn main(assignment: &[(String, i32)]) -> HashSet<i32> {
    assignment
        .iter()
        .filter(|(t, _)| !t.contains(".retry-"))
        .map(|(_, p)| *p)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ack_after_revoke_is_lease_expired_and_the_record_goes_to_the_new_owner() {
    let cfg = config("revoke", "partitions=2&revoke_grace=500ms");
    let p = cfg.producer().await.unwrap();
    let a = cfg.consumer().await.unwrap();
    for i in 0..20 {
        p.send(Message::new(format!("{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    // a holds every record, unsettled.
    let held = receive_n(&a, 20, WAIT).await;
    let partitions: HashSet<&str> = held
        .iter()
        .map(|d| d.id().split('/').next().unwrap())
        .collect();
    assert_eq!(partitions.len(), 2, "records on both partitions");
    assert!(held.iter().all(|d| d.is_live()));
    // b joins: the cooperative assignor moves one partition from a to b. a's
    // deliveries of it go stale after revoke_grace.
    let b = cfg.consumer().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while held.iter().all(|d| d.is_live()) {
        assert!(Instant::now() < deadline, "nothing was revoked from a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stale, live): (Vec<_>, Vec<_>) = held.into_iter().partition(|d| !d.is_live());
    assert!(!live.is_empty(), "a kept one partition");
    for d in &stale {
        assert_eq!(d.ack().await.unwrap_err().kind(), ErrorKind::LeaseExpired);
        assert!(!d.acker().is_acked());
    }
    for d in &live {
        d.ack().await.unwrap();
    }
    // b gets exactly the stale ones.
    let again = receive_n(&b, stale.len(), WAIT).await;
    let want: HashSet<String> = stale.iter().map(|d| d.id().to_string()).collect();
    let got: HashSet<String> = again.iter().map(|d| d.id().to_string()).collect();
    assert_eq!(got, want);
    for d in &again {
        d.ack().await.unwrap();
    }
    assert!(b
        .receive(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    assert!(a
        .receive(1, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    a.close().await.unwrap();
    b.close().await.unwrap();
    cleanup(&cfg).await;
}

/// Acks that race a revoke: each either counted in the revoke's commit (never
/// delivered to the new owner) or answered `LeaseExpired` (delivered to it), and
/// every record is processed somewhere. What an ack's fast path must keep: it does
/// not take the state lock (see `Inbox` in the consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acks_racing_a_revoke_are_either_committed_or_lease_expired_and_nothing_is_lost() {
    let cfg = config("revoke-race", "partitions=2&revoke_grace=300ms");
    let n = 2000;
    common::produce_backlog(&cfg, n).await;
    let a = Arc::new(cfg.consumer().await.unwrap());
    let held = receive_n(&*a, n, WAIT).await;
    // Ack one by one, a little at a time, while b joins and takes a partition.
    let acker = tokio::spawn(async move {
        let (mut ok, mut expired) = (HashSet::new(), HashSet::new());
        for d in held {
            let id = d.id().to_string();
            match d.ack().await {
                Ok(()) => ok.insert(id),
                Err(e) if e.kind() == ErrorKind::LeaseExpired => expired.insert(id),
                Err(e) => panic!("ack: {e}"),
            };
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (ok, expired)
    });
    let b = cfg.consumer().await.unwrap();
    let (ok, expired) = acker.await.unwrap();
    assert_eq!(ok.len() + expired.len(), n);
    // Everything b gets, until it has been quiet for a second.
    let mut got = HashSet::new();
    loop {
        let batch = b.receive(100, Duration::from_secs(1)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for d in batch {
            assert!(got.insert(d.id().to_string()), "b got {} twice", d.id());
            d.ack().await.unwrap();
        }
    }
    let replayed: Vec<_> = got.intersection(&ok).collect();
    assert!(
        replayed.is_empty(),
        "acked before the revoke, replayed to b: {replayed:?}"
    );
    assert_eq!(
        got, expired,
        "b gets exactly what a's acks were too late for"
    );
    assert!(
        !expired.is_empty(),
        "no ack was late for the revoke: the race was not run"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
    cleanup(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_keeps_membership_until_handed_out_deliveries_settle() {
    let cfg = config("close", "partitions=1&close_timeout=10s");
    let p = cfg.producer().await.unwrap();
    let a = cfg.consumer().await.unwrap();
    for i in 0..3 {
        p.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let held = receive_n(&a, 3, WAIT).await;
    let started = Instant::now();
    a.close().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "close returns at once"
    );
    assert_eq!(
        a.receive(1, Duration::ZERO).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    // Still ours: settle two, release the last (left uncommitted for the next session).
    held[0].ack().await.unwrap();
    held[1].ack().await.unwrap();
    held[2].release(None).await.unwrap();
    // The last settle waited for the commit and the leave.
    a.closed().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "did not wait for close_timeout"
    );
    let b = cfg.consumer().await.unwrap();
    let d = receive_n(&b, 1, WAIT).await.remove(0);
    assert_eq!(d.payload().as_ref(), b"2");
    d.ack().await.unwrap();
    b.close().await.unwrap();
    cleanup(&cfg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_never_exceeds_max_poll_interval() {
    // librdkafka leaves the group when poll is not called within
    // max.poll.interval.ms; the poll thread calls it however long a delivery is held.
    let cfg = config(
        "slow",
        "partitions=1&rdkafka.session.timeout.ms=6000&rdkafka.max.poll.interval.ms=6000",
    );
    let p = cfg.producer().await.unwrap();
    let c = cfg.consumer().await.unwrap();
    p.send(Message::new("slow")).await.unwrap();
    let d = receive_n(&c, 1, WAIT).await.remove(0);
    let rebalances = c.rebalances();
    // No receive for longer than max.poll.interval.ms.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        d.is_live(),
        "the partition was taken away while the handler ran"
    );
    d.ack().await.unwrap();
    assert_eq!(c.rebalances(), rebalances, "the member was rebalanced");
    p.send(Message::new("next")).await.unwrap();
    let d = receive_n(&c, 1, WAIT).await.remove(0);
    assert_eq!(d.payload().as_ref(), b"next");
    d.ack().await.unwrap();
    c.close().await.unwrap();
    cleanup(&cfg).await;
}

/// A partition handed to another member and back is read again, through a queue
/// of its own once more. A partition of the queue's topic gets a librdkafka queue
/// of its own on assignment, and librdkafka never forwards it to the shared queue
/// again: a member that dropped that queue on revoke and did not split it anew on
/// the next assignment would never see the partition's records again (and the
/// group would not move it elsewhere either).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_revoked_and_assigned_back_is_read_again() {
    let cfg = config("back", "partitions=4");
    let p = cfg.producer().await.unwrap();
    let a = cfg.consumer().await.unwrap();
    assert_eq!(main(&a.assignment()).len(), 4);
    let b = cfg.consumer().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while main(&a.assignment()).len() == 4 || main(&b.assignment()).is_empty() {
        assert!(Instant::now() < deadline, "b never got a partition");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Records on every partition while b holds some of them.
    let send = |from: usize| {
        let p = &p;
        async move {
            for i in from..from + 200 {
                p.send(Message::new(format!("{i}")).key(format!("key-{i}")))
                    .await
                    .unwrap();
            }
        }
    };
    send(0).await;
    let on_a = count_on(&a, 200).await.len();
    let got_b = receive_n(&b, 200 - on_a, WAIT).await;
    assert!(!got_b.is_empty(), "b read its partitions");
    for d in &got_b {
        d.ack().await.unwrap();
    }
    b.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while main(&a.assignment()).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the partitions never came back to a"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every partition, the returned ones too, is read by a again.
    send(200).await;
    let again = receive_n(&a, 200, WAIT).await;
    let payloads: HashSet<String> = again
        .iter()
        .map(|d| String::from_utf8_lossy(d.payload()).into_owned())
        .collect();
    let want: HashSet<String> = (200..400).map(|i| i.to_string()).collect();
    assert_eq!(payloads, want);
    let partitions: HashSet<&str> = again
        .iter()
        .map(|d| d.id().split('/').next().unwrap())
        .collect();
    assert_eq!(partitions.len(), 4, "records of all four partitions");
    for d in &again {
        d.ack().await.unwrap();
    }
    a.close().await.unwrap();
    cleanup(&cfg).await;
}

/// Receive and ack what `c` has of the first `n` records (until it has nothing
/// for a second).
async fn count_on(c: &ferrymq_kafka::KafkaConsumer, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let ds = c.receive(n, Duration::from_secs(1)).await.unwrap();
        if ds.is_empty() {
            break;
        }
        for d in ds {
            got.push(String::from_utf8_lossy(d.payload()).into_owned());
            d.ack().await.unwrap();
        }
    }
    got
}

/// Two members of one group with different settings (a tiny buffer and a fast
/// commit against the defaults), both busy when one of them leaves mid-stream:
/// every record is processed, and none twice — the leaver's acked records were
/// committed on revoke, and what it held unsettled it had acked before closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_with_different_settings_share_a_group_and_a_leave_loses_nothing() {
    let small = config(
        "mixed",
        "partitions=6&buffer=10&commit_interval=50ms&revoke_grace=2s",
    );
    let mut large = small.clone();
    large.buffer = 5000;
    large.commit_interval = Duration::from_secs(2);
    let n = 6000;
    common::produce_backlog(&small, n).await;
    let a = Arc::new(small.consumer().await.unwrap());
    let b = Arc::new(large.consumer().await.unwrap());
    let seen = Arc::new(Mutex::new(vec![0u32; n]));
    let record = |seen: &Arc<Mutex<Vec<u32>>>, d: &ferrymq_core::Delivery| {
        let text = String::from_utf8_lossy(d.payload());
        let i: usize = text.trim().parse().unwrap();
        seen.lock().unwrap()[i] += 1;
    };
    // a works slowly until it has handled 500 records, then closes (after acking
    // everything it was handed); b goes on until every record is seen.
    let a_task = {
        let (a, seen) = (a.clone(), seen.clone());
        tokio::spawn(async move {
            let mut handled = 0;
            while handled < 500 {
                for d in a.receive(20, Duration::from_millis(200)).await.unwrap() {
                    record(&seen, &d);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    d.ack().await.unwrap();
                    handled += 1;
                }
            }
            a.close().await.unwrap();
            a.closed().await.unwrap();
            handled
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = seen.lock().unwrap().iter().all(|&c| c > 0);
        if done && a_task.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "not every record was processed");
        for d in b.receive(100, Duration::from_millis(200)).await.unwrap() {
            record(&seen, &d);
            d.ack().await.unwrap();
        }
    }
    let handled_by_a = a_task.await.unwrap();
    // Nothing more comes to b once all is done.
    assert!(b
        .receive(1, Duration::from_millis(1000))
        .await
        .unwrap()
        .is_empty());
    let twice: Vec<usize> = {
        let seen = seen.lock().unwrap();
        (0..n).filter(|&i| seen[i] > 1).collect()
    };
    assert!(
        twice.is_empty(),
        "{} records processed twice (a handled {handled_by_a}): first {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    b.close().await.unwrap();
    cleanup(&small).await;
}

use std::time::Duration;

use tower::Layer;

use super::*;
use crate::middleware::testing::queue;
use crate::{Consumer, ErrorKind, Message, Producer};

const NOW: Duration = Duration::ZERO;

#[tokio::test(start_paused = true)]
async fn refuses_at_the_bound_until_the_depth_drops() {
    let (p, c) = queue("bp-reject").connect().unwrap();
    let bp = BackpressureLayer::new(3)
        .refresh(Duration::from_secs(1))
        .layer(p);
    for i in 0..3 {
        bp.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let err = bp.send(Message::new("4")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::QueueFull);
    assert_eq!(
        bp.depth().await.unwrap().total(),
        3,
        "nothing past the bound enqueued"
    );

    // The consumer catches up; the cached depth still says full until refreshed.
    for d in c.receive(2, NOW).await.unwrap() {
        d.ack().await.unwrap();
    }
    assert_eq!(
        bp.send(Message::new("5")).await.unwrap_err().kind(),
        ErrorKind::QueueFull
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    bp.send(Message::new("6")).await.unwrap();
    bp.send(Message::new("7")).await.unwrap();
    assert_eq!(
        bp.send(Message::new("8")).await.unwrap_err().kind(),
        ErrorKind::QueueFull
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_between_refreshes_cannot_overshoot() {
    let (p, _c) = queue("bp-burst").connect().unwrap();
    let bp = BackpressureLayer::new(10)
        .refresh(Duration::from_secs(3600))
        .layer(p);
    let results = bp
        .send_batch((0..15).map(|i| Message::new(format!("{i}"))).collect())
        .await
        .unwrap();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 10);
    assert!(results[10..]
        .iter()
        .all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::QueueFull));
    assert_eq!(bp.depth().await.unwrap().total(), 10);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_sends_once_there_is_room() {
    let (p, c) = queue("bp-wait").connect().unwrap();
    let bp = BackpressureLayer::new(1)
        .refresh(Duration::from_millis(100))
        .overflow(Overflow::Wait { max_wait: None })
        .layer(p);
    bp.send(Message::new("first")).await.unwrap();
    let consumer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(450)).await;
        c.receive(1, NOW).await.unwrap()[0].ack().await.unwrap();
        c
    });
    let start = tokio::time::Instant::now();
    bp.send(Message::new("second")).await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited <= Duration::from_millis(550),
        "{waited:?}"
    );
    consumer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn wait_mode_gives_up_after_max_wait() {
    let (p, _c) = queue("bp-wait-max").connect().unwrap();
    let bp = BackpressureLayer::new(1)
        .refresh(Duration::from_millis(100))
        .overflow(Overflow::Wait {
            max_wait: Some(Duration::from_secs(1)),
        })
        .layer(p);
    bp.send(Message::new("first")).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = bp.send(Message::new("second")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::QueueFull);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_rejected_send_does_not_use_up_room() {
    let (p, _c) = queue("bp-invalid").max_message_size(4).connect().unwrap();
    let bp = BackpressureLayer::new(1)
        .refresh(Duration::from_secs(3600))
        .layer(p);
    assert_eq!(
        bp.send(Message::new("too large")).await.unwrap_err().kind(),
        ErrorKind::TooLarge
    );
    bp.send(Message::new("ok")).await.unwrap();
}

//! A send that was written but not answered is `OutcomeUnknown`, not "nothing
//! enqueued" (FERRYMQ_TEST_REDIS_URL). Its own test binary: `CLIENT PAUSE` holds
//! every client's writes on the server, so nothing else may run alongside.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, raw};
use ferrymq_core::{ErrorKind, Message, Producer};
use redis::AsyncCommands;

#[tokio::test]
async fn a_send_without_an_answer_is_outcome_unknown_and_may_have_landed() {
    let cfg = config("unknown", "command_timeout=300ms");
    let p = cfg.producer().await.unwrap();
    let mut r = raw().await;
    // The server takes the requests but answers no write for 1.5 s.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut r)
        .await
        .unwrap();
    let plain = p.send(Message::new("plain")).await.unwrap_err();
    assert_eq!(plain.kind(), ErrorKind::OutcomeUnknown, "{plain}");
    let scripted = p
        .send(Message::new("scripted").dedup_id("once"))
        .await
        .unwrap_err();
    assert_eq!(scripted.kind(), ErrorKind::OutcomeUnknown, "{scripted}");
    // A batch says so per entry.
    let results = p
        .send_batch(vec![Message::new("b1"), Message::new("b2")])
        .await
        .unwrap();
    let kinds: Vec<ErrorKind> = results
        .iter()
        .map(|r| r.as_ref().map_or_else(|e| e.kind(), |_| ErrorKind::Backend))
        .collect();
    assert_eq!(kinds, [ErrorKind::OutcomeUnknown; 2]);
    // And indeed they landed once the server went on.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let len: u64 = r
        .xlen(format!("ferrymq:{{{}}}:ready:0", cfg.queue))
        .await
        .unwrap();
    assert_eq!(len, 4, "every 'unknown' send was in fact enqueued");
    cfg.delete_queue().await.unwrap();
}

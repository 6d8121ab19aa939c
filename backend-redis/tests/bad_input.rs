//! Bad input and bad environments: typed errors or faithful round trips.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{base_url, config, connect, raw, unique, WAIT};
use ferrymq_core::{Consumer, ErrorKind, Message, Producer};
use ferrymq_redis::RedisConfig;
use redis::AsyncCommands;

#[tokio::test]
async fn oversize_message_is_too_large_and_nothing_is_enqueued() {
    let (p, _c, _) = connect("big", "max_message_size=1000").await;
    assert_eq!(p.capabilities().max_message_size, 1000);
    let err = p.send(Message::new(vec![7u8; 1001])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    // Headers count towards the size.
    let err = p
        .send(Message::new(vec![7u8; 990]).header("abcdef", "ghijk"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    // Delayed and dedup paths check before the script too.
    let err = p
        .send(
            Message::new(vec![7u8; 1001])
                .delay(Duration::from_secs(1))
                .dedup_id("z"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    assert_eq!(p.depth().await.unwrap().total(), 0);
    // Exactly the maximum is fine.
    p.send(Message::new(vec![7u8; 1000])).await.unwrap();
    assert_eq!(p.depth().await.unwrap().waiting, 1);
    // The dedup id of a refused message was not claimed.
    let r = p.send(Message::new("ok").dedup_id("z")).await.unwrap();
    assert!(!r.is_duplicate());
}

#[tokio::test]
async fn binary_payloads_and_awkward_headers_round_trip() {
    let (p, c, _) = connect("binary", "").await;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, b'\r', b'\n', 0xff]).collect();
    let headers = [
        ("content-type", "application/octet-stream"),
        ("colons", "a:b::c:"),
        ("digits-first", "12:fake5:entry"),
        ("newlines", "line1\nline2\r\nline3\ttab"),
        ("unicode", "héllo wörld ✓ 😀 \u{202e}"),
        ("empty", ""),
        ("quotes", "\"'`\\$%{}[]|=&?#"),
        ("x.y_z-1", "dots and underscores in the name"),
        (
            ferrymq_core::reserved::FAILURE_REASON,
            "reserved names pass",
        ),
    ];
    let mut msg = Message::new(payload.clone())
        .key("key with spaces:and:colons\n")
        .dedup_id("dé:dup\n");
    for (n, v) in headers {
        msg = msg.header(n, v);
    }
    let long_value = "v".repeat(100_000);
    msg = msg.header("long", long_value.clone());
    p.send(msg.clone()).await.unwrap();
    // And the scripted path (delay) keeps them as well.
    p.send(
        msg.clone()
            .dedup_id("other")
            .delay(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(c.receive(10, WAIT).await.unwrap());
    }
    for d in got {
        assert_eq!(d.payload().as_ref(), payload.as_slice());
        let names: Vec<&str> = d.headers().iter().map(|(n, _)| n).collect();
        let mut expected: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
        expected.push("long");
        assert_eq!(names, expected, "header order kept");
        for (n, v) in headers {
            assert_eq!(d.headers().get(n), Some(v), "header {n}");
        }
        assert_eq!(d.headers().get("long"), Some(long_value.as_str()));
        assert_eq!(d.key(), Some("key with spaces:and:colons\n"));
        d.ack().await.unwrap();
    }
    // Empty payload, no headers.
    p.send(Message::new(Vec::new())).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert!(d.payload().is_empty() && d.headers().is_empty());
    d.ack().await.unwrap();
}

#[tokio::test]
async fn invalid_headers_are_refused() {
    let (p, _c, _) = connect("badheader", "").await;
    for msg in [
        Message::new("x").header("bad name", "v"),
        Message::new("x").header("nul", "a\0b"),
        Message::new("x").header("ferrymq-made-up", "v"),
    ] {
        assert_eq!(
            p.send(msg).await.unwrap_err().kind(),
            ErrorKind::InvalidMessage
        );
    }
    assert_eq!(p.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn wrong_type_key_at_startup_is_a_backend_error() {
    let cfg = config("wrongtype", "");
    let mut r = raw().await;
    let key = format!("ferrymq:{{{}}}:ready:0", cfg.queue);
    let _: () = r.set(&key, "not a stream").await.unwrap();
    let err = cfg.connect().await.unwrap_err();
    eprintln!("wrong type at startup: {err}");
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert!(err.to_string().contains(&key), "{err}");
    assert!(err.to_string().contains("string"), "{err}");
    let _: () = r.del(&key).await.unwrap();
    cfg.connect().await.unwrap();
}

#[tokio::test]
async fn wrong_type_key_at_run_time_is_a_backend_error() {
    let (p, c, cfg) = connect("wrongtype2", "").await;
    let mut r = raw().await;
    let delayed = format!("ferrymq:{{{}}}:delayed", cfg.queue);
    let _: () = r.set(&delayed, "oops").await.unwrap();
    let err = p
        .send(Message::new("x").delay(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    assert!(err.to_string().contains("wrong type"), "{err}");
    let err = c.receive(1, Duration::ZERO).await.unwrap_err();
    eprintln!("wrong type at run time: {err}");
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    let err = c.depth().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    let _: () = r.del(&delayed).await.unwrap();
    c.receive(1, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn unreachable_server_is_a_connection_error_within_the_timeout() {
    // Port 1 on loopback: nothing listens.
    let cfg = RedisConfig::from_url("redis://127.0.0.1:1/q?connect_timeout=1s").unwrap();
    let t0 = Instant::now();
    let err = cfg.connect().await.unwrap_err();
    eprintln!("unreachable: {err}");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_and_never_printed() {
    // A throwaway ACL user on the test server.
    let user = unique("user");
    let mut r = raw().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">right-password")
        .arg("~*")
        .arg("+@all")
        .query_async(&mut r)
        .await
        .unwrap();
    let base = base_url();
    let hostport = base.trim_start_matches("redis://");
    let wrong = format!("redis://{user}:s3cr3t-wr0ng@{hostport}/q");
    let err = RedisConfig::from_url(&wrong)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    eprintln!("auth: {err}");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cr3t-wr0ng"), "password leaked: {shown}");
    let cfg = RedisConfig::from_url(&format!(
        "redis://{user}:right-password@{hostport}/{}",
        unique("auth")
    ))
    .unwrap();
    assert!(!format!("{cfg} {cfg:?}").contains("right-password"));
    let (p, c) = cfg.connect().await.unwrap();
    assert!(!format!("{p:?} {c:?}").contains("right-password"));
    p.send(Message::new("authed")).await.unwrap();
    c.receive(1, WAIT).await.unwrap()[0].ack().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut r)
        .await
        .unwrap();
}

//! Backend selection and config errors through the facade.

use std::time::Duration;

use ferrymq::{Config, ErrorKind, Message};

#[tokio::test]
async fn memory_url_connects_and_round_trips() {
    let (p, c) = ferrymq::connect("memory://facade-round-trip?visibility=5s")
        .await
        .unwrap();
    assert_eq!(p.capabilities().backend, "memory");
    assert_eq!(
        c.capabilities().visibility_timeout,
        Some(Duration::from_secs(5))
    );
    p.send(Message::new("hi")).await.unwrap();
    let got = c.receive(1, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got[0].payload().as_ref(), b"hi");
    got[0].ack().await.unwrap();
}

#[tokio::test]
async fn bad_urls_are_invalid_config_naming_the_parameter() {
    for (url, param) in [
        ("", "url"),
        ("::nope", "url"),
        ("nats://host/q", "scheme"),
        ("kafka://127.0.0.1:9092/orders", "scheme"),
        ("memory://", "queue"),
        ("memory://q?visibility=later", "visibility"),
        ("memory://q?unknown=1", "unknown"),
    ] {
        let err = match ferrymq::connect(url).await {
            Ok(_) => panic!("{url:?} should be rejected"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url:?}: {err}");
        assert!(
            err.to_string().contains(&format!("`{param}`")),
            "{url:?}: {err}"
        );
    }
}

#[test]
fn serde_accepts_url_string_url_table_and_tagged_table() {
    #[derive(serde::Deserialize)]
    struct App {
        a: Config,
        b: Config,
        c: Config,
    }
    let app: App = toml::from_str(
        r#"
        a = "memory://a?capacity=5"
        b = { url = "memory://b" }
        [c]
        backend = "memory"
        queue = "c"
        visibility_timeout = "2s"
        dedup_window = "1m"
        "#,
    )
    .unwrap();
    let Config::Memory(a) = app.a else { panic!() };
    assert_eq!((a.queue.as_str(), a.capacity), ("a", 5));
    assert_eq!(app.b.backend(), "memory");
    let Config::Memory(c) = app.c else { panic!() };
    assert_eq!(c.visibility_timeout, Duration::from_secs(2));
    assert_eq!(c.dedup_window, Duration::from_secs(60));

    let json: Config = serde_json::from_str(r#"{"backend":"memory","queue":"j"}"#).unwrap();
    assert_eq!(json.backend(), "memory");
    assert!(serde_json::from_str::<Config>(r#""nats://x""#).is_err());
}

#[test]
fn from_env_reads_ferrymq_url_and_names_the_variable() {
    std::env::set_var("FERRYMQ_TEST_FACADE_URL", "memory://from-env");
    let cfg = Config::from_env_var("FERRYMQ_TEST_FACADE_URL").unwrap();
    assert!(matches!(cfg, Config::Memory(ref m) if m.queue == "from-env"));
    let err = Config::from_env_var("FERRYMQ_TEST_UNSET_VARIABLE").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("FERRYMQ_TEST_UNSET_VARIABLE"));
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;

    #[test]
    fn redis_url_selects_redis_and_never_shows_the_password() {
        let url = "redis://app:hunter2@127.0.0.1:6399/2/orders?group=invoicers&visibility=15s";
        let cfg = Config::from_url(url).unwrap();
        assert_eq!(cfg.backend(), "redis");
        let Config::Redis(ref r) = cfg else { panic!() };
        assert_eq!((r.queue.as_str(), r.db, r.port), ("orders", 2, 6399));
        assert_eq!(r.password.as_ref().map(|p| p.expose()), Some("hunter2"));
        for shown in [
            format!("{cfg:?}"),
            format!("{r:?}"),
            serde_json::to_string(&cfg).unwrap(),
        ] {
            assert!(!shown.contains("hunter2"), "password leaked: {shown}");
        }
        let err =
            Config::from_url("redis://app:hunter2@127.0.0.1:6399/orders?visibility=x").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("`visibility`"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_server_is_a_connection_error_within_the_timeout() {
        let started = std::time::Instant::now();
        // Port 1 on loopback: nothing listens there.
        let err = match ferrymq::connect("redis://127.0.0.1:1/orders?connect_timeout=1s").await {
            Ok(_) => panic!("connected to nothing"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

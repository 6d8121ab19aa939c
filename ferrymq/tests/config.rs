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
    let mut cases = vec![
        ("", "url"),
        ("::nope", "url"),
        ("nats://host/q", "scheme"),
        ("memory://", "queue"),
        ("memory://q?visibility=later", "visibility"),
        ("memory://q?unknown=1", "unknown"),
    ];
    if !cfg!(feature = "kafka") {
        cases.push(("kafka://127.0.0.1:9092/orders", "scheme"));
        cases.push(("kafka://h1:9092,h2:9092/orders", "scheme"));
    }
    for (url, param) in cases {
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
    let a = app.a.to_value(false);
    assert_eq!(
        (app.a.queue(), &a["capacity"]),
        ("a", &serde_json::json!(5))
    );
    assert_eq!(app.b.backend(), "memory");
    let c = app.c.to_value(false);
    assert_eq!((app.c.backend(), app.c.queue()), ("memory", "c"));
    assert_eq!(c["visibility_timeout"], "2s");
    assert_eq!(c["dedup_window"], "1m");

    let json: Config = serde_json::from_str(r#"{"backend":"memory","queue":"j"}"#).unwrap();
    assert_eq!(json.backend(), "memory");
    assert!(serde_json::from_str::<Config>(r#""nats://x""#).is_err());
}

#[test]
fn from_env_reads_ferrymq_url_and_names_the_variable() {
    std::env::set_var("FERRYMQ_TEST_FACADE_URL", "memory://from-env");
    let cfg = Config::from_env_var("FERRYMQ_TEST_FACADE_URL").unwrap();
    assert_eq!((cfg.backend(), cfg.queue()), ("memory", "from-env"));
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
        let r = cfg.to_value(false);
        assert_eq!(cfg.queue(), "orders");
        assert_eq!(
            (&r["db"], &r["port"]),
            (&serde_json::json!(2), &serde_json::json!(6399))
        );
        assert_eq!(cfg.to_value(true)["password"], "hunter2");
        for shown in [
            format!("{cfg:?}"),
            format!("{cfg}"),
            r.to_string(),
            serde_json::to_string(&cfg).unwrap(),
            toml::to_string(&cfg).unwrap(),
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

// ---- one place per backend: dispatch, with_queue, identity, admin ---------------

#[test]
fn the_scheme_is_dispatched_before_the_url_is_parsed() {
    // Several brokers in one URL is not a valid URL to a generic parser ("invalid
    // port number"); what matters is that the kafka backend is missing.
    let kafka = Config::from_url("kafka://h1:9092,h2:9092/orders");
    if cfg!(feature = "kafka") {
        let config = kafka.expect("the kafka driver reads a broker list");
        assert_eq!((config.backend(), config.queue()), ("kafka", "orders"));
    } else {
        let err = kafka.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("cargo feature `kafka`"), "{err}");
    }
    // An SQS queue URL is https://: without the sqs backend, it says so.
    let sqs = Config::from_url("https://sqs.us-east-1.amazonaws.com/123456789012/orders");
    if cfg!(feature = "sqs") {
        let config = sqs.expect("the sqs driver reads a queue URL");
        assert_eq!((config.backend(), config.queue()), ("sqs", "orders"));
    } else {
        let err = sqs.unwrap_err();
        assert!(err.to_string().contains("cargo feature `sqs`"), "{err}");
    }
    let err = Config::from_url("nats://h/q").unwrap_err();
    assert!(err.to_string().contains("unknown scheme nats://"), "{err}");
    // The driver list is the build's.
    let names: Vec<&str> = ferrymq::drivers().iter().map(|d| d.name()).collect();
    assert!(names.contains(&"memory"), "{names:?}");
    assert_eq!(
        names.contains(&"redis"),
        cfg!(feature = "redis"),
        "{names:?}"
    );
}

#[test]
fn tagged_tables_name_a_missing_or_unknown_backend() {
    let mut cases = vec![
        (
            r#"{"backend":"nats","queue":"q"}"#,
            "unknown backend \"nats\"",
        ),
        (r#"{"queue":"q"}"#, "`backend`"),
        (r#"{"url":"memory://q","capacity":5}"#, "`capacity`"),
        (r#"{"backend":"memory","queue":"q","capcity":5}"#, "capcity"),
        ("42", "`backend`"),
    ];
    if !cfg!(feature = "kafka") {
        cases.push((
            r#"{"backend":"kafka","queue":"q"}"#,
            "cargo feature `kafka`",
        ));
    }
    for (table, expect) in cases {
        let err = serde_json::from_str::<Config>(table)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{table}: {err}");
    }
}

#[tokio::test]
async fn with_queue_names_another_queue_with_the_same_settings() {
    let orders = Config::from_url("memory://facade-wq-orders?visibility=7s&capacity=3").unwrap();
    let dlq = orders.with_queue("facade-wq-orders-dlq").unwrap();
    assert_eq!(
        (dlq.backend(), dlq.queue()),
        ("memory", "facade-wq-orders-dlq")
    );
    let (o, d) = (orders.to_value(false), dlq.to_value(false));
    assert_eq!(d["visibility_timeout"], o["visibility_timeout"]);
    assert_eq!(d["capacity"], 3);
    assert!(!orders.same_queue(&dlq));
    assert!(orders.same_queue(&Config::from_url("memory://facade-wq-orders").unwrap()));
    // A name that could not be written in a URL of the backend is refused.
    let err = orders.with_queue("").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    // It connects to the other queue.
    let p = dlq.producer().await.unwrap();
    assert_eq!(p.queue(), "facade-wq-orders-dlq");
}

#[tokio::test]
async fn connect_admin_manages_the_queue_of_the_url() {
    let url = "memory://facade-admin?visibility=3s";
    let admin = ferrymq::connect_admin(url).await.unwrap();
    assert_eq!((admin.backend(), admin.queue()), ("memory", "facade-admin"));
    let info = admin
        .ensure(&ferrymq::admin::QueueSpec::new())
        .await
        .unwrap();
    assert_eq!(
        info.capabilities.visibility_timeout,
        Some(Duration::from_secs(3))
    );
    ferrymq::connect_producer(url)
        .await
        .unwrap()
        .send(Message::new("look"))
        .await
        .unwrap();
    let peeked = admin.peek(5).await.unwrap();
    assert_eq!(peeked.len(), 1);
    assert_eq!(admin.describe().await.unwrap().depth.waiting, 1);
    assert_eq!(
        Config::from_url(url)
            .unwrap()
            .admin()
            .await
            .unwrap()
            .purge()
            .await
            .unwrap(),
        1
    );
}

// ---- secrets (audit #14) --------------------------------------------------------

#[test]
fn a_config_written_out_for_reuse_keeps_working() {
    let cfg = Config::from_url("memory://facade-toml?visibility=4s").unwrap();
    let text = cfg.to_toml_exposing_secrets().unwrap();
    assert!(text.contains("backend = \"memory\""), "{text}");
    let back: Config = ferrymq::from_toml(&text).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn from_toml_errors_locate_the_problem_without_the_password() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct App {
        orders: Config,
    }
    for (source, toml_quotes_it) in [
        (
            "# app\norders = \"memory://q?token=hunter2-token&visibility=soon\"\n",
            true,
        ),
        (
            "orders = { url = \"memory://q?token=hunter2-token\", password = \"hunter2-token\" }\n",
            true,
        ),
        (
            "[orders]\nbackend = \"memory\"\nqueue = \"q\"\npassword = \"hunter2-token\"\n",
            false,
        ),
        (
            "[orders]\nbackend = \"memory\"\nqueue = \"q\"\napi_key = 987654\nbogus = 1\n",
            false,
        ),
    ] {
        // The premise: the TOML parser's own error quotes the source line.
        let raw = toml::from_str::<App>(source).unwrap_err().to_string();
        assert_eq!(raw.contains("hunter2-token"), toml_quotes_it, "{raw}");
        let err = ferrymq::from_toml::<App>(source).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let shown = err.to_string();
        for secret in ["hunter2-token", "987654"] {
            assert!(
                !shown.contains(secret),
                "{source}\n{shown}\n(toml said: {raw})"
            );
        }
        assert!(shown.contains("line "), "{shown}");
    }
    let err =
        ferrymq::from_toml::<App>("orders = \"memory://q?token=hunter2-token&visibility=soon\"")
            .unwrap_err();
    assert!(
        err.to_string().contains("`token`") || err.to_string().contains("`visibility`"),
        "{err}"
    );
}

#[cfg(feature = "redis")]
mod redis_config {
    use super::*;

    #[test]
    fn a_password_survives_to_toml_exposing_secrets_and_nothing_else() {
        let cfg = Config::from_url("redis://app:hunter2@127.0.0.1:6399/2/orders?group=g").unwrap();
        // Serialize redacts: a config written this way no longer authenticates.
        let redacted = toml::to_string(&cfg).unwrap();
        assert!(!redacted.contains("hunter2"), "{redacted}");
        let reread: Config = ferrymq::from_toml(&redacted).unwrap();
        assert_eq!(reread.to_value(true)["password"], "***");
        // Written for reuse, it does.
        let text = cfg.to_toml_exposing_secrets().unwrap();
        let back: Config = ferrymq::from_toml(&text).unwrap();
        assert_eq!(back.to_value(true)["password"], "hunter2");
        assert_eq!(back, cfg);
        assert_eq!(back.identity(), cfg.identity());
    }

    #[test]
    fn spellings_of_one_queue_have_one_identity() {
        let a = Config::from_url("redis://127.0.0.1/orders").unwrap();
        let b = Config::from_url("redis://u:pw@127.0.0.1:6379/0/orders?group=x").unwrap();
        assert!(a.same_queue(&b), "{} vs {}", a.identity(), b.identity());
        assert!(!b.identity().contains("pw"), "{}", b.identity());
        let other_db = Config::from_url("redis://127.0.0.1:6379/1/orders").unwrap();
        assert!(!a.same_queue(&other_db));
        let dlq = b.with_queue("orders-dlq").unwrap();
        assert_eq!(dlq.queue(), "orders-dlq");
        assert_eq!(dlq.to_value(true)["password"], "pw");
        assert!(dlq.with_queue("bad{name").is_err());
    }

    #[test]
    fn from_toml_hides_a_redis_password() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct App {
            orders: Config,
        }
        for source in [
            "orders = \"redis://app:hunter2@127.0.0.1:6399/orders?visibility=x\"",
            "orders = \"redis://app:hunter2@127.0.0.1:99999/orders\"",
            "orders = { backend = \"redis\", queue = \"q\", password = \"hunter2\", port = \"x\" }",
            "orders = { backend = \"redis\", queue = \"q\", password = 1234, port = 1 }",
        ] {
            let err = ferrymq::from_toml::<App>(source).unwrap_err().to_string();
            assert!(
                !err.contains("hunter2") && !err.contains("1234"),
                "{source}: {err}"
            );
        }
    }
}

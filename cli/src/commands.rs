//! `ferry send`, `ferry receive`, `ferry depth`.

use std::io::Read;
use std::time::Duration;

use ferrymq::{Config, Consumer, Delivery, Error, Message, Producer, Result};

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Queue URL, e.g. redis://127.0.0.1:6379/orders.
    #[arg(long, env = "FERRYMQ_URL")]
    url: String,
    /// Payloads, one message each; none: read one payload from standard input.
    payloads: Vec<String>,
    /// Ordering key.
    #[arg(long)]
    key: Option<String>,
    /// Header NAME=VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Deduplication id.
    #[arg(long)]
    dedup_id: Option<String>,
    /// Deliver no sooner than this (e.g. 5s, 2m).
    #[arg(long)]
    delay: Option<humantime::Duration>,
    /// Priority (higher first, where the backend supports it).
    #[arg(long)]
    priority: Option<i32>,
}

#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// Queue URL.
    #[arg(long, env = "FERRYMQ_URL")]
    url: String,
    /// At most this many messages.
    #[arg(long, default_value_t = 10)]
    max: usize,
    /// Wait this long for the first message.
    #[arg(long, default_value = "5s")]
    wait: humantime::Duration,
    /// Release the messages instead of acking them: deliverable again at once, without
    /// counting an attempt where the backend can (capability `release_keeps_attempt`).
    #[arg(long)]
    release: bool,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DepthArgs {
    /// Queue URL.
    #[arg(long, env = "FERRYMQ_URL")]
    url: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Job counts instead: waiting, active, delayed, and the job store's completed,
    /// failed and dead-lettered (`ferry jobs counts`).
    #[arg(long)]
    jobs: bool,
}

pub(crate) fn parse_header(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// Parse `url`, saying so when it names an in-process queue.
pub fn open(url: &str) -> Result<Config> {
    let config = Config::from_url(url)?;
    warn_if_memory(&config);
    Ok(config)
}

pub fn warn_if_memory(config: &Config) {
    if config.backend() == "memory" {
        eprintln!(
            "note: memory:// queues live inside one process; this command sees only its own queue"
        );
    }
}

pub async fn send(args: SendArgs) -> Result<()> {
    let producer = open(&args.url)?.producer().await?;
    let payloads = if args.payloads.is_empty() {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| {
            Error::new(ferrymq::ErrorKind::InvalidMessage, "reading standard input").with_source(e)
        })?;
        vec![buf]
    } else {
        args.payloads.into_iter().map(String::into_bytes).collect()
    };
    for payload in payloads {
        let mut message = Message::new(payload);
        for (name, value) in &args.headers {
            message = message.header(name.clone(), value.clone());
        }
        if let Some(key) = &args.key {
            message = message.key(key.clone());
        }
        if let Some(id) = &args.dedup_id {
            message = message.dedup_id(id.clone());
        }
        if let Some(delay) = args.delay {
            message = message.delay(delay.into());
        }
        if let Some(p) = args.priority {
            message = message.priority(p);
        }
        let receipt = producer.send(message).await?;
        if receipt.is_duplicate() {
            println!(
                "duplicate of {} (dropped by the broker's dedup window)",
                receipt.id()
            );
        } else {
            println!("sent {}", receipt.id());
        }
    }
    producer.close().await
}

pub async fn receive(args: ReceiveArgs) -> Result<()> {
    let consumer = open(&args.url)?.consumer().await?;
    let wait: Duration = args.wait.into();
    let mut got = 0;
    while got < args.max {
        let deliveries = consumer
            .receive(args.max - got, if got == 0 { wait } else { Duration::ZERO })
            .await?;
        if deliveries.is_empty() {
            break;
        }
        for d in deliveries {
            got += 1;
            if args.json {
                println!("{}", delivery_json(&d));
            } else {
                print_delivery(&d);
            }
            if args.release {
                d.release(None).await?;
            } else {
                d.ack().await?;
            }
        }
        if args.release {
            // Released messages are deliverable again at once: stop, or we would loop.
            break;
        }
    }
    if got == 0 {
        eprintln!("no message within {}", args.wait);
    }
    consumer.close().await
}

fn print_delivery(d: &Delivery) {
    let meta = d.meta();
    println!(
        "--- id {}  attempt {}  key {}  enqueued {}",
        meta.id,
        meta.attempt,
        d.key().unwrap_or("-"),
        humantime::format_rfc3339_millis(meta.enqueued_at)
    );
    for (name, value) in d.headers().iter() {
        println!("{name}: {value}");
    }
    println!("{}", String::from_utf8_lossy(d.payload()));
}

fn delivery_json(d: &Delivery) -> serde_json::Value {
    let meta = d.meta();
    let headers: serde_json::Map<String, serde_json::Value> = d
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), serde_json::Value::from(v)))
        .collect();
    serde_json::json!({
        "id": meta.id,
        "attempt": meta.attempt,
        "queue": &*meta.queue,
        "key": d.key(),
        "enqueued_at": humantime::format_rfc3339_millis(meta.enqueued_at).to_string(),
        "headers": headers,
        "payload": String::from_utf8_lossy(d.payload()),
    })
}

pub async fn depth(args: DepthArgs) -> Result<()> {
    if args.jobs {
        let (queue, counts) = crate::jobs::counts(&args.url).await?;
        if args.json {
            println!("{}", serde_json::to_string(&counts)?);
        } else {
            println!("{queue}: {counts}");
        }
        return Ok(());
    }
    let consumer = open(&args.url)?.consumer().await?;
    let depth = consumer.depth().await?;
    if args.json {
        println!("{}", serde_json::to_string(&depth)?);
    } else {
        println!(
            "{}: waiting {}  in flight {}  delayed {}  dead-lettered {}",
            consumer.queue(),
            depth.waiting,
            depth.in_flight,
            depth.delayed,
            depth.dead_lettered
        );
    }
    consumer.close().await
}

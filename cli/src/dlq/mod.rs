//! `ferry dlq peek` and `ferry dlq redrive`: look into a dead-letter queue, and move
//! its messages back once the cause is fixed.
//!
//! A dead-letter queue is an ordinary queue that
//! [`RetryToDlq`](ferrymq::middleware::RetryToDlq) publishes to, so both commands take
//! its URL like any other:
//!
//! ```text
//! ferry dlq peek 'redis://127.0.0.1:6379/orders-dlq' --max 20
//! ferry dlq redrive 'redis://127.0.0.1:6379/orders-dlq' --to 'redis://127.0.0.1:6379/orders'
//! ```

pub mod peek;
pub mod redrive;

use ferrymq::{reserved, Consumer, Delivery, Error, Producer, Result};
use url::Url;

use self::redrive::{RedriveOptions, Step};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show dead-lettered messages with their failure reason, origin queue, attempts,
    /// first-failure and dead-letter times, without removing them.
    ///
    /// Peek leases the messages (receives them) and then releases them (nack without
    /// delay): they stay in the DLQ. While peek holds them, other consumers do not see
    /// them; backends that count deliveries count the peek as one; on backends with
    /// per-key ordering only the first message of each key is visible at a time.
    Peek(PeekArgs),
    /// Move dead-lettered messages back to a queue (at-least-once).
    ///
    /// Each message is sent to the target first and acked in the DLQ only after the
    /// send succeeded, so a failure in between leaves it in both queues, never in
    /// neither. The copy keeps payload, key, priority, dedup id and headers, including
    /// ferrymq's reserved dead-letter headers (reason, origin queue, attempts, ...); the
    /// backend's attempt counter restarts. A copy the target drops as a duplicate of its
    /// dedup id stays in the DLQ and is reported (see --drop-dedup-id).
    Redrive(RedriveArgs),
}

#[derive(Debug, clap::Args)]
struct PeekArgs {
    /// The dead-letter queue's URL, e.g. redis://127.0.0.1:6379/orders-dlq.
    url: String,
    /// Show at most this many messages.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max: u32,
    /// Wait this long for the first message.
    #[arg(long, default_value = "2s")]
    wait: humantime::Duration,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RedriveArgs {
    /// The dead-letter queue's URL.
    url: String,
    /// The queue to move the messages to, usually the one they were dead-lettered from
    /// (each message's ferrymq-origin-queue header names it).
    #[arg(long, value_name = "TARGET_URL")]
    to: String,
    /// Move at most this many (default: until the DLQ is empty).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max: Option<u32>,
    /// Wait this long for the first message.
    #[arg(long, default_value = "2s")]
    wait: humantime::Duration,
    /// Send the copies without their dedup id, for targets whose dedup window still
    /// remembers the original send.
    #[arg(long)]
    drop_dedup_id: bool,
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Peek(args) => peek_command(args).await,
        Command::Redrive(args) => redrive_command(args).await,
    }
}

fn warn_if_memory(url: &str) {
    if url.starts_with("memory:") {
        eprintln!(
            "note: memory:// queues live inside one process; this command sees only its own (empty) queue"
        );
    }
}

/// The reserved dead-letter headers, labelled, in the order `peek` prints them.
const DEAD_LETTER_HEADERS: [(&str, &str); 6] = [
    ("reason", reserved::FAILURE_REASON),
    ("origin queue", reserved::ORIGIN_QUEUE),
    ("attempts", reserved::ATTEMPTS),
    ("first failure", reserved::FIRST_FAILURE_AT),
    ("dead-lettered", reserved::DEAD_LETTERED_AT),
    ("origin id", reserved::ORIGIN_MESSAGE_ID),
];

fn print_dead_letter(n: usize, d: &Delivery) {
    let meta = d.meta();
    println!(
        "--- #{n}  id {}  key {}  enqueued {}",
        meta.id,
        d.key().unwrap_or("-"),
        humantime::format_rfc3339_millis(meta.enqueued_at)
    );
    for (label, name) in DEAD_LETTER_HEADERS {
        println!("{label:<15} {}", d.headers().get(name).unwrap_or("-"));
    }
    for (name, value) in d.headers().iter() {
        if !reserved::ALL.contains(&name) {
            println!("header          {name}: {value}");
        }
    }
    println!("payload         {}", String::from_utf8_lossy(d.payload()));
}

fn dead_letter_json(d: &Delivery) -> serde_json::Value {
    let meta = d.meta();
    let h = d.headers();
    let headers: serde_json::Map<String, serde_json::Value> = h
        .iter()
        .filter(|(n, _)| !reserved::ALL.contains(n))
        .map(|(n, v)| (n.to_string(), serde_json::Value::from(v)))
        .collect();
    serde_json::json!({
        "id": meta.id,
        "key": d.key(),
        "enqueued_at": humantime::format_rfc3339_millis(meta.enqueued_at).to_string(),
        "reason": h.get(reserved::FAILURE_REASON),
        "origin_queue": h.get(reserved::ORIGIN_QUEUE),
        "attempts": h.get(reserved::ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
        "first_failure_at": h.get(reserved::FIRST_FAILURE_AT),
        "dead_lettered_at": h.get(reserved::DEAD_LETTERED_AT),
        "origin_message_id": h.get(reserved::ORIGIN_MESSAGE_ID),
        "headers": headers,
        "payload": String::from_utf8_lossy(d.payload()),
    })
}

async fn peek_command(args: PeekArgs) -> Result<()> {
    warn_if_memory(&args.url);
    let dlq = ferrymq::connect_consumer(&args.url).await?;
    let json = args.json;
    let peeked = peek::peek(&*dlq, args.max as usize, args.wait.into(), |n, d| {
        if json {
            println!("{}", dead_letter_json(d));
        } else {
            print_dead_letter(n, d);
        }
    })
    .await;
    let closed = dlq.close().await;
    let peeked = peeked?;
    closed?;
    if peeked.shown == 0 {
        eprintln!(
            "{}: no dead-lettered message within {}",
            dlq.queue(),
            args.wait
        );
    } else {
        eprintln!(
            "{}: {} message(s) shown and released; they stay in the queue",
            dlq.queue(),
            peeked.shown
        );
    }
    if peeked.not_shown > 0 {
        eprintln!(
            "{} more waiting, not shown (over --max, or behind a shown message of the same key)",
            peeked.not_shown
        );
    }
    Ok(())
}

/// Whether two URLs name the same queue on the same server (scheme, host, port and
/// path; the query and credentials are ignored).
pub fn same_queue(a: &str, b: &str) -> bool {
    match (Url::parse(a), Url::parse(b)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
                && a.path().trim_end_matches('/') == b.path().trim_end_matches('/')
        }
        _ => a == b,
    }
}

async fn redrive_command(args: RedriveArgs) -> Result<()> {
    warn_if_memory(&args.url);
    if same_queue(&args.url, &args.to) {
        return Err(Error::invalid_config(
            "to",
            "the target is the dead-letter queue itself; redrive to the queue the messages came from",
        ));
    }
    let dlq = ferrymq::connect_consumer(&args.url).await?;
    let target = ferrymq::connect_producer(&args.to).await?;
    let options = RedriveOptions {
        max: args.max.map(|m| m as usize),
        wait: args.wait.into(),
        drop_dedup_id: args.drop_dedup_id,
    };
    let report = redrive::redrive(&*dlq, &*target, &options, |step| match step {
        Step::Moved { from, receipt } => println!(
            "moved {} -> {} as {}  (reason: {})",
            from.id(),
            target.queue(),
            receipt.id,
            from.headers().get(reserved::FAILURE_REASON).unwrap_or("-")
        ),
        Step::HeldBack { from } => println!(
            "kept  {}: {} dropped it as a duplicate of dedup id {:?} (its dedup window still \
             remembers the original); it stays in the DLQ",
            from.id(),
            target.queue(),
            from.message().get_dedup_id().unwrap_or("")
        ),
    })
    .await;
    let flushed = target.close().await;
    let closed = dlq.close().await;
    println!(
        "redrive {} -> {}: {} moved, {} kept in the DLQ",
        dlq.queue(),
        target.queue(),
        report.moved,
        report.held_back
    );
    if let Some(e) = report.error {
        return Err(e);
    }
    flushed?;
    closed?;
    if report.held_back > 0 {
        return Err(Error::new(
            ferrymq::ErrorKind::InvalidMessage,
            format!(
                "{} message(s) not moved: the target dropped them as duplicates; \
                 retry later or with --drop-dedup-id",
                report.held_back
            ),
        ));
    }
    if report.moved == 0 {
        eprintln!("{}: nothing to redrive within {}", dlq.queue(), args.wait);
    }
    Ok(())
}

#[cfg(test)]
mod tests;

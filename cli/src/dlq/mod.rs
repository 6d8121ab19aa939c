//! `ferry dlq peek` and `ferry dlq redrive`: look into a dead-letter queue, and move
//! its messages back once the cause is fixed.
//!
//! A dead-letter queue is an ordinary queue that
//! [`RetryToDlq`](ferrymq::middleware::RetryToDlq) publishes to, so both commands take
//! its URL like any other. With `--native` they work on a backend's own dead-letter
//! store instead (Redis `max_deliveries`), through the work queue's URL:
//!
//! ```text
//! ferry dlq peek    'redis://127.0.0.1:6379/orders-dlq' --max 20
//! ferry dlq redrive 'redis://127.0.0.1:6379/orders-dlq' --to 'redis://127.0.0.1:6379/orders'
//! ferry dlq peek    'redis://127.0.0.1:6379/orders' --native
//! ferry dlq redrive 'redis://127.0.0.1:6379/orders' --native
//! ```

pub mod peek;
pub mod redrive;

use std::sync::OnceLock;

use ferrymq::admin::RedriveProgress;
use ferrymq::{reserved, Config, Error, ErrorKind, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use self::redrive::{RedriveOptions, Step};
use crate::commands::open;
use crate::show;

/// Redrives of at least this many messages get a progress bar (on a terminal).
const PROGRESS_FROM: u64 = 100;

/// When the DLQ's backend cannot count it, the redrive counts by peeking, up to this.
const COUNT_BY_PEEK_MAX: usize = 10_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Show dead-lettered messages with their failure reason, origin queue, attempts,
    /// first-failure and dead-letter times, without side effects.
    ///
    /// Peek reads the messages without receiving them (the backend's native peek): no
    /// lease is taken, no receive count or attempt is spent, other consumers are not
    /// held up; they stay in the DLQ. A backend that cannot read without receiving
    /// (SQS) refuses, unless --lease: then peek leases the messages and releases them
    /// (each peek counts as a receive there).
    Peek(PeekArgs),
    /// Move dead-lettered messages back to a queue (at-least-once), from a snapshot.
    ///
    /// Moves the messages that are in the DLQ when it starts (at most --max), never
    /// "until empty": a copy whose handler fails again and comes back is left in the
    /// DLQ, not redriven again. Each message is sent to the target first and acked in
    /// the DLQ only after the send succeeded, so a failure in between leaves it in
    /// both queues, never in neither. The copy keeps payload, key, priority, dedup id
    /// and headers, including ferrymq's reserved dead-letter headers (reason, origin
    /// queue, attempts, ...); the backend's attempt counter restarts. A copy the
    /// target drops as a duplicate of its dedup id stays in the DLQ and is reported
    /// (see --drop-dedup-id). With --native, the backend moves its own dead letters
    /// back into the queue of URL itself.
    Redrive(RedriveArgs),
}

#[derive(Debug, clap::Args)]
struct PeekArgs {
    /// The dead-letter queue's URL, e.g. redis://127.0.0.1:6379/orders-dlq (with
    /// --native: the work queue's).
    url: String,
    /// Show at most this many messages.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max: u32,
    /// URL is a work queue: show the backend's own dead-letter store of it (Redis:
    /// what max_deliveries moved aside).
    #[arg(long, conflicts_with = "lease")]
    native: bool,
    /// For backends that cannot peek: receive the messages and release them (other
    /// consumers do not see them meanwhile; counts as a receive where counted).
    #[arg(long)]
    lease: bool,
    /// With --lease: wait this long for the first message.
    #[arg(long, default_value = "2s")]
    wait: humantime::Duration,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RedriveArgs {
    /// The dead-letter queue's URL (with --native: the work queue's).
    url: String,
    /// The queue to move the messages to, usually the one they were dead-lettered from
    /// (each message's ferrymq-origin-queue header names it).
    #[arg(
        long,
        value_name = "TARGET_URL",
        required_unless_present = "native",
        conflicts_with = "native"
    )]
    to: Option<String>,
    /// URL is a work queue: have the backend move its own dead letters back into it
    /// (Redis: what max_deliveries moved aside), natively.
    #[arg(long)]
    native: bool,
    /// Move at most this many (default: the DLQ's size when the redrive starts).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max: Option<u32>,
    /// Wait this long for the first message.
    #[arg(long, default_value = "2s")]
    wait: humantime::Duration,
    /// Send the copies without their dedup id, for targets whose dedup window still
    /// remembers the original send.
    #[arg(long, conflicts_with = "native")]
    drop_dedup_id: bool,
    /// Print only the summary, not a line per message.
    #[arg(long, short)]
    quiet: bool,
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Peek(args) => peek_command(args).await,
        Command::Redrive(args) => match args.to.clone() {
            Some(to) if !args.native => redrive_command(args, &to).await,
            _ => native_redrive_command(args).await,
        },
    }
}

async fn peek_command(args: PeekArgs) -> Result<()> {
    let config = open(&args.url)?;
    let max = args.max as usize;
    if args.lease {
        return lease_peek_command(&config, &args).await;
    }
    let admin = config.admin().await?;
    let (peeked, more) = match crate::queue::peek_messages(&*admin, max, args.native).await {
        Ok(found) => found,
        Err(e) if e.kind() == ErrorKind::Unsupported && !args.native => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}; peek with --lease to receive and release the messages instead \
                     (it counts as a receive where the backend counts them)",
                    e.message()
                ),
            ))
        }
        Err(e) => return Err(e),
    };
    for (i, p) in peeked.iter().enumerate() {
        if args.json {
            println!("{}", show::message_json(p.into(), true));
        } else {
            show::print_message(i + 1, p.into(), true);
        }
    }
    if peeked.is_empty() {
        eprintln!("{}: no dead-lettered message", admin.queue());
    } else {
        eprintln!(
            "{}: {} message(s) shown; peek leaves them in the {} untouched",
            admin.queue(),
            peeked.len(),
            if args.native {
                "dead-letter store"
            } else {
                "DLQ"
            }
        );
    }
    if let Some(n) = more.filter(|n| *n > 0) {
        eprintln!("{n} more waiting, not shown (over --max)");
    }
    Ok(())
}

async fn lease_peek_command(config: &Config, args: &PeekArgs) -> Result<()> {
    let dlq = config.consumer().await?;
    let json = args.json;
    let peeked = peek::peek(&*dlq, args.max as usize, args.wait.into(), |n, d| {
        if json {
            println!("{}", show::message_json(d.into(), true));
        } else {
            show::print_message(n, d.into(), true);
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

/// A progress bar on standard error for a redrive of `total`, when it is long
/// enough to want one; hidden when standard error is not a terminal.
fn progress_bar(total: u64) -> Option<ProgressBar> {
    if total < PROGRESS_FROM {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("redrive [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// Print a line without tearing the progress bar.
fn line(bar: Option<&ProgressBar>, text: String) {
    match bar {
        Some(bar) => bar.suspend(|| println!("{text}")),
        None => println!("{text}"),
    }
}

async fn redrive_command(args: RedriveArgs, to: &str) -> Result<()> {
    let dlq_config = open(&args.url)?;
    let target_config = Config::from_url(to)?;
    // The same queue however the URLs are spelled: compare what they resolve to.
    if dlq_config.same_queue(&target_config) {
        return Err(Error::invalid_config(
            "to",
            "the target is the dead-letter queue itself; redrive to the queue the messages came from",
        ));
    }
    let dlq = dlq_config.consumer().await?;
    let target = target_config.producer().await?;
    let mut max = args.max.map(|m| m as usize);
    if max.is_none() && !dlq.capabilities().depth.is_available() {
        // No depth to take a snapshot from: count what a peek sees.
        let admin = dlq_config.admin().await?;
        let seen = admin
            .peek(COUNT_BY_PEEK_MAX)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::Unsupported => Error::invalid_config(
                    "max",
                    format!(
                        "{} can neither count nor peek {}, so a redrive has no snapshot to stop \
                     at; give --max N",
                        dlq_config.backend(),
                        dlq.queue()
                    ),
                ),
                _ => e,
            })?;
        if seen.len() == COUNT_BY_PEEK_MAX {
            eprintln!(
                "note: {} cannot count its messages; redriving the first {COUNT_BY_PEEK_MAX} \
                 seen (run again for more, or give --max)",
                dlq.queue()
            );
        }
        max = Some(seen.len());
    }
    let options = RedriveOptions {
        max,
        wait: args.wait.into(),
        drop_dedup_id: args.drop_dedup_id,
    };
    let quiet = args.quiet;
    let mut bar: Option<ProgressBar> = None;
    let report = redrive::redrive(&*dlq, &*target, &options, |step| match step {
        Step::Started { total } => bar = progress_bar(total as u64),
        Step::Moved { from, receipt } => {
            if let Some(bar) = &bar {
                bar.inc(1);
            }
            if !quiet {
                line(
                    bar.as_ref(),
                    format!(
                        "moved {} -> {} as {}  (reason: {})",
                        from.id(),
                        target.queue(),
                        receipt.id(),
                        from.headers().get(reserved::FAILURE_REASON).unwrap_or("-")
                    ),
                );
            }
        }
        Step::HeldBack { from } => {
            if let Some(bar) = &bar {
                bar.inc(1);
            }
            line(
                bar.as_ref(),
                format!(
                    "kept  {}: {} dropped it as a duplicate of dedup id {:?} (its dedup window \
                     still remembers the original); it stays in the DLQ",
                    from.id(),
                    target.queue(),
                    from.message().get_dedup_id().unwrap_or("")
                ),
            );
        }
        Step::CameBack { from } => {
            if !quiet {
                line(
                    bar.as_ref(),
                    format!(
                        "left  {}: a copy this redrive sent failed again and came back; it \
                         stays in the DLQ",
                        from.id()
                    ),
                );
            }
        }
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let flushed = target.close().await;
    let closed = dlq.close().await;
    let mut summary = format!(
        "redrive {} -> {}: {} moved, {} kept in the DLQ",
        dlq.queue(),
        target.queue(),
        report.moved,
        report.held_back
    );
    if report.came_back > 0 {
        summary += &format!(
            ", {} came back during the redrive (still failing?)",
            report.came_back
        );
    }
    println!("{summary}");
    if let Some(e) = report.error {
        return Err(e);
    }
    flushed?;
    closed?;
    if report.held_back > 0 {
        return Err(Error::new(
            ErrorKind::InvalidMessage,
            format!(
                "{} message(s) not moved: the target dropped them as duplicates; \
                 retry later or with --drop-dedup-id",
                report.held_back
            ),
        ));
    }
    if report.total == 0 {
        eprintln!("{}: nothing to redrive (the DLQ was empty)", dlq.queue());
    } else if report.moved == 0 {
        eprintln!("{}: nothing to redrive within {}", dlq.queue(), args.wait);
    }
    Ok(())
}

async fn native_redrive_command(args: RedriveArgs) -> Result<()> {
    let config = open(&args.url)?;
    let admin = config.admin().await?;
    let bar: OnceLock<Option<ProgressBar>> = OnceLock::new();
    let progress = |p: RedriveProgress| {
        let bar = bar.get_or_init(|| p.total.and_then(progress_bar));
        if let Some(bar) = bar {
            bar.set_position(p.moved);
        }
    };
    let moved = admin
        .redrive_dead_letters(args.max.map(u64::from), &progress)
        .await;
    if let Some(Some(bar)) = bar.get() {
        bar.finish_and_clear();
    }
    let moved = moved.map_err(|e| match e.kind() {
        ErrorKind::Unsupported => Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}; for a dead-letter queue of RetryToDlq, redrive it with --to TARGET_URL",
                e.message()
            ),
        ),
        _ => e,
    })?;
    println!(
        "redrive {} (dead-letter store) -> {}: {moved} moved",
        admin.queue(),
        admin.queue()
    );
    if moved == 0 {
        eprintln!("{}: nothing to redrive", admin.queue());
    }
    Ok(())
}

#[cfg(test)]
mod tests;

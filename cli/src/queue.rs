//! `ferry queue create|ensure|delete|purge|describe|peek URL`: a queue's
//! administration, over [`Admin`], the same on every backend. What a
//! backend cannot do is refused as `unsupported`, by name.
//!
//! ```text
//! ferry queue ensure   redis://127.0.0.1:6379/orders --priority-levels 8
//! ferry queue describe redis://127.0.0.1:6379/orders
//! ferry queue peek     redis://127.0.0.1:6379/orders -n 5
//! ferry queue purge    redis://127.0.0.1:6379/orders --yes
//! ferry queue delete   redis://127.0.0.1:6379/orders --yes
//! ```

use ferrymq::admin::{Admin, DeadLetterPolicy, Peeked, QueueInfo, QueueSpec};
use ferrymq::{Config, Error, ErrorKind, Result};

use crate::show;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create the queue; fails if it exists already. Prints what `describe` prints.
    Create(CreateArgs),
    /// Create the queue unless it exists; describe it either way.
    Ensure(CreateArgs),
    /// Delete the queue and every message in it (needs --yes).
    Delete(ConfirmArgs),
    /// Remove every waiting and delayed message; deliveries in flight stay (needs --yes).
    Purge(ConfirmArgs),
    /// Depth, capabilities, settings and warnings of the queue.
    Describe(DescribeArgs),
    /// Show the oldest waiting messages without receiving them: no lease is taken,
    /// no attempt or receive count spent; other consumers are not held up.
    Peek(PeekArgs),
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Queue URL, e.g. redis://127.0.0.1:6379/orders.
    url: String,
    #[command(flatten)]
    spec: SpecArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `QueueSpec` fields; each backend refuses (by name) the ones it has no use for.
#[derive(Debug, clap::Args)]
struct SpecArgs {
    /// Kafka: partitions of the topic.
    #[arg(long)]
    partitions: Option<u32>,
    /// Kafka: replication factor.
    #[arg(long)]
    replication: Option<u16>,
    /// SQS: a FIFO queue (its name ends in .fifo).
    #[arg(long)]
    fifo: bool,
    /// The queue's default visibility timeout (e.g. 30s).
    #[arg(long)]
    visibility_timeout: Option<humantime::Duration>,
    /// SQS: how long messages are kept (e.g. 4d).
    #[arg(long)]
    retention: Option<humantime::Duration>,
    /// A native dead-letter queue the broker moves a message to after
    /// --max-receives receives (SQS redrive policy).
    #[arg(long, requires = "max_receives")]
    dead_letter_queue: Option<String>,
    /// With --dead-letter-queue: after this many receives.
    #[arg(long, requires = "dead_letter_queue", value_parser = clap::value_parser!(u32).range(1..))]
    max_receives: Option<u32>,
    /// Redis: priority levels.
    #[arg(long)]
    priority_levels: Option<u8>,
}

impl SpecArgs {
    fn spec(&self) -> QueueSpec {
        let mut spec = QueueSpec::new();
        if let Some(n) = self.partitions {
            spec = spec.partitions(n);
        }
        if let Some(n) = self.replication {
            spec = spec.replication(n);
        }
        if self.fifo {
            spec = spec.fifo(true);
        }
        if let Some(d) = self.visibility_timeout {
            spec = spec.visibility_timeout(d.into());
        }
        if let Some(d) = self.retention {
            spec = spec.retention(d.into());
        }
        if let (Some(queue), Some(n)) = (&self.dead_letter_queue, self.max_receives) {
            spec = spec.dead_letter(DeadLetterPolicy::new(queue.clone(), n));
        }
        if let Some(n) = self.priority_levels {
            spec = spec.priority_levels(n);
        }
        spec
    }
}

#[derive(Debug, clap::Args)]
struct ConfirmArgs {
    /// Queue URL.
    url: String,
    /// Yes, really: this removes messages for good.
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, clap::Args)]
struct DescribeArgs {
    /// Queue URL.
    url: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct PeekArgs {
    /// Queue URL.
    url: String,
    /// Show at most this many messages.
    #[arg(short = 'n', long = "max", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max: u32,
    /// Look into the backend's own dead-letter store of the queue instead (Redis:
    /// what `max_deliveries` moved aside).
    #[arg(long)]
    dead_letters: bool,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Create(a) => create(a, false).await,
        Command::Ensure(a) => create(a, true).await,
        Command::Delete(a) => delete(a).await,
        Command::Purge(a) => purge(a).await,
        Command::Describe(a) => describe(a).await,
        Command::Peek(a) => peek(a).await,
    }
}

/// The config and admin of `url`, with the memory note.
pub async fn open(url: &str) -> Result<(Config, Box<dyn Admin>)> {
    let config = Config::from_url(url)?;
    crate::commands::warn_if_memory(&config);
    let admin = config.admin().await?;
    Ok((config, admin))
}

fn print_info(info: &QueueInfo, config: &Config, json: bool) {
    if json {
        println!("{}", show::info_json(info, &config.identity()));
    } else {
        show::print_info(info, &config.identity());
    }
}

async fn create(args: CreateArgs, ensure: bool) -> Result<()> {
    let (config, admin) = open(&args.url).await?;
    let spec = args.spec.spec();
    let info = if ensure {
        admin.ensure(&spec).await?
    } else {
        admin.create(&spec).await?
    };
    if !args.json {
        eprintln!(
            "{}: {}",
            admin.queue(),
            if ensure { "ensured" } else { "created" }
        );
    }
    print_info(&info, &config, args.json);
    Ok(())
}

fn confirm(args: &ConfirmArgs, what: &str, queue: &str) -> Result<()> {
    if args.yes {
        return Ok(());
    }
    Err(Error::invalid_config(
        "yes",
        format!("{what} {queue} removes its messages for good; pass --yes to go ahead"),
    ))
}

async fn delete(args: ConfirmArgs) -> Result<()> {
    let config = Config::from_url(&args.url)?;
    confirm(&args, "deleting", config.queue())?;
    let (_, admin) = open(&args.url).await?;
    if admin.delete().await? {
        println!("{}: deleted", admin.queue());
    } else {
        println!("{}: did not exist", admin.queue());
    }
    Ok(())
}

async fn purge(args: ConfirmArgs) -> Result<()> {
    let config = Config::from_url(&args.url)?;
    confirm(&args, "purging", config.queue())?;
    let (_, admin) = open(&args.url).await?;
    let removed = admin.purge().await?;
    println!("{}: purged {removed} message(s)", admin.queue());
    Ok(())
}

async fn describe(args: DescribeArgs) -> Result<()> {
    let (config, admin) = open(&args.url).await?;
    let info = admin.describe().await?;
    print_info(&info, &config, args.json);
    Ok(())
}

/// Up to `max` messages of the queue (or of its native dead-letter store), without
/// side effects; and how many more are waiting, where the backend counts them.
pub async fn peek_messages(
    admin: &dyn Admin,
    max: usize,
    dead_letters: bool,
) -> Result<(Vec<Peeked>, Option<u64>)> {
    let peeked = if dead_letters {
        admin.peek_dead_letters(max).await?
    } else {
        admin.peek(max).await?
    };
    let more = match admin.describe().await {
        Ok(info) if info.capabilities.depth.is_available() => {
            let d = info.depth;
            let there = if dead_letters {
                d.dead_lettered
            } else {
                d.waiting + d.delayed
            };
            Some(there.saturating_sub(peeked.len() as u64))
        }
        _ => None,
    };
    Ok((peeked, more))
}

async fn peek(args: PeekArgs) -> Result<()> {
    let (_, admin) = open(&args.url).await?;
    let (peeked, more) = peek_messages(&*admin, args.max as usize, args.dead_letters)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::Unsupported => Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{} (it cannot show messages without receiving them)",
                    e.message()
                ),
            ),
            _ => e,
        })?;
    for (i, p) in peeked.iter().enumerate() {
        if args.json {
            println!("{}", show::message_json(p.into(), args.dead_letters));
        } else {
            show::print_message(i + 1, p.into(), args.dead_letters);
        }
    }
    let store = if args.dead_letters {
        "dead-letter store"
    } else {
        "queue"
    };
    if peeked.is_empty() {
        eprintln!("{}: nothing in the {store}", admin.queue());
    } else {
        eprintln!(
            "{}: {} message(s) shown; peeking leaves them in the {store} untouched",
            admin.queue(),
            peeked.len()
        );
    }
    if let Some(n) = more.filter(|n| *n > 0) {
        eprintln!("{n} more waiting, not shown (over --max)");
    }
    Ok(())
}

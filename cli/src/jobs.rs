//! `ferry jobs` (a queue's job records and counts) and `ferry events` (its lifecycle
//! events, tailed like BullMQ's `QueueEvents`).

use std::time::Duration;

use ferrymq::jobs::{JobCounts, JobEvent, JobEventKind, JobRecord, JobState, JobStore};
use ferrymq::{Consumer, Result};
use futures::StreamExt;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Queue URL (its job store: redis:// on the same server, memory:// in process).
    #[arg(long, env = "FERRYMQ_URL", global = true)]
    url: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Jobs per state: waiting, active and delayed from the queue, completed, failed
    /// and dead-lettered from the job store.
    Counts,
    /// One job's record: state, attempts, progress, result, failure, times.
    Get {
        /// The job id.
        id: String,
    },
    /// The newest records in a state (waiting, active, completed, failed, dead_lettered).
    List {
        /// The state.
        state: String,
        /// At most this many.
        #[arg(short = 'n', long, default_value_t = 20)]
        max: usize,
    },
}

fn url(url: Option<String>) -> Result<String> {
    url.ok_or_else(|| ferrymq::Error::invalid_config("url", "give --url or set FERRYMQ_URL"))
}

/// BullMQ's `getJobCounts`, for `ferry jobs counts` and `ferry depth --jobs`.
pub async fn counts(url: &str) -> Result<(String, JobCounts)> {
    let consumer = ferrymq::connect_consumer(url).await?;
    let depth = consumer.depth().await?;
    let queue = consumer.queue().to_string();
    consumer.close().await?;
    let stored = ferrymq::connect_jobs(url).await?.counts().await?;
    Ok((queue, JobCounts::new(depth, stored)))
}

pub async fn run(args: Args) -> Result<()> {
    let url = url(args.url)?;
    match args.command {
        Command::Counts => {
            let (queue, counts) = counts(&url).await?;
            if args.json {
                println!("{}", serde_json::to_string(&counts)?);
            } else {
                println!("{queue}: {counts}");
            }
        }
        Command::Get { id } => {
            let store = ferrymq::connect_jobs(&url).await?;
            match store.get(&id).await? {
                Some(record) if args.json => println!("{}", serde_json::to_string(&record)?),
                Some(record) => print_record(&record),
                None => {
                    return Err(ferrymq::Error::new(
                        ferrymq::ErrorKind::InvalidConfig,
                        format!(
                            "job {id:?}: no record in {} (never tracked, or not kept)",
                            store.queue()
                        ),
                    ))
                }
            }
        }
        Command::List { state, max } => {
            let state: JobState = state.parse()?;
            let store = ferrymq::connect_jobs(&url).await?;
            for record in store.list(state, max).await? {
                if args.json {
                    println!("{}", serde_json::to_string(&record)?);
                } else {
                    print_record(&record);
                }
            }
        }
    }
    Ok(())
}

fn time(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn print_record(r: &JobRecord) {
    println!("{}  {}  attempts {}", r.id, r.state, r.attempts);
    println!("  created   {}", time(r.created_at));
    if let Some(t) = r.started_at {
        println!("  started   {}", time(t));
    }
    if let Some(t) = r.finished_at {
        println!("  finished  {}", time(t));
    }
    if let Some(p) = &r.progress {
        println!("  progress  {p}");
    }
    if let Some(v) = &r.result {
        println!("  result    {v}");
    }
    if let Some(f) = &r.failure {
        println!("  failure   {f}");
    }
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Queue URL (its job store: redis:// on the same server, memory:// in process).
    #[arg(long, env = "FERRYMQ_URL")]
    url: String,
    /// One JSON object per event.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    max: Option<usize>,
    /// Stop after this long (e.g. 30s); default: until interrupted.
    #[arg(long = "for")]
    duration: Option<humantime::Duration>,
}

pub async fn events(args: EventsArgs) -> Result<()> {
    let store = ferrymq::connect_jobs(&args.url).await?;
    let mut events = store.subscribe().await?;
    let until = args.duration.map(|d| ferrymq::time::deadline_in(d.into()));
    let mut seen = 0usize;
    loop {
        if args.max.is_some_and(|max| seen >= max) {
            return Ok(());
        }
        let next = async {
            match until {
                Some(at) => tokio::time::timeout_at(at, events.next()).await.ok(),
                None => Some(events.next().await),
            }
        };
        let next = tokio::select! {
            next = next => next,
            _ = tokio::signal::ctrl_c() => None,
        };
        match next {
            None | Some(None) => return Ok(()),
            Some(Some(Ok(event))) => {
                seen += 1;
                if args.json {
                    println!("{}", serde_json::to_string(&event)?);
                } else {
                    println!("{}", line(&event));
                }
            }
            Some(Some(Err(e))) => {
                eprintln!("ferry events: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn line(e: &JobEvent) -> String {
    let head = format!("{}  {}  {}  {}", time(e.at), e.queue, e.id, e.kind.name());
    let attempt = if e.attempt > 0 {
        format!("  attempt {}", e.attempt)
    } else {
        String::new()
    };
    let detail = match &e.kind {
        JobEventKind::Progress { value } => format!("  {value}"),
        JobEventKind::Completed { result: Some(v) } => format!("  result {v}"),
        JobEventKind::Retried { reason, after_ms } => format!("  in {after_ms} ms: {reason}"),
        JobEventKind::Failed { reason } | JobEventKind::DeadLettered { reason } => {
            format!("  {reason}")
        }
        _ => String::new(),
    };
    format!("{head}{attempt}{detail}")
}

//! `ferry schedule list|add|remove|run URL`: the queue's schedules, in the store
//! its backend keeps them in (Redis: beside the queue; memory: in process).
//!
//! ```text
//! ferry schedule add    redis://127.0.0.1:6379/reports nightly --cron '0 2 * * *' --tz Europe/Berlin --payload '{"report":"nightly"}'
//! ferry schedule add    redis://127.0.0.1:6379/reports heartbeat --every 30s --catch-up skip
//! ferry schedule list   redis://127.0.0.1:6379/reports            # timing, catch-up, next run, last enqueued, claims
//! ferry schedule remove redis://127.0.0.1:6379/reports nightly
//! ferry schedule run    redis://127.0.0.1:6379/reports --for 1h    # a scheduler process (any number may run)
//! ```
//!
//! `add` upserts by id: adding the same schedule again changes nothing; a new
//! payload keeps its progress; a new timing starts it over from now.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use ferrymq::schedule::{
    CatchUp, Clock, Every, ScheduleDef, ScheduleEntry, ScheduleStore, Scheduler, Upserted,
};
use ferrymq::{Error, ErrorKind, Result};

use crate::commands::open;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List the queue's schedules: timing, catch-up, next run, last run enqueued.
    List(ListArgs),
    /// Add a schedule, or replace the one with this id (upsert).
    Add(AddArgs),
    /// Remove a schedule.
    Remove(RemoveArgs),
    /// Run a scheduler: enqueue the due runs of the queue's schedules until Ctrl-C
    /// (or --for). Any number of schedulers may run at once; each run is enqueued once.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Queue URL, e.g. redis://127.0.0.1:6379/orders.
    url: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct AddArgs {
    /// Queue URL.
    url: String,
    /// The schedule's id (ASCII letters, digits, - _ . : /).
    id: String,
    /// A cron expression: 5 fields, or 6 with seconds first (e.g. '0 9 * * MON-FRI').
    #[arg(long, conflicts_with = "every", required_unless_present = "every")]
    cron: Option<String>,
    /// The cron's IANA time zone (e.g. Europe/Berlin).
    #[arg(long, default_value = "UTC", requires = "cron")]
    tz: String,
    /// A fixed interval instead (e.g. 30s, 5m), counted from now.
    #[arg(long)]
    every: Option<humantime::Duration>,
    /// After downtime: skip, skip:GRACE, once (the latest missed run) or all:MAX.
    #[arg(long, default_value = "once")]
    catch_up: String,
    /// The payload of each run.
    #[arg(long, default_value = "")]
    payload: String,
    /// Header NAME=VALUE on each run (repeatable).
    #[arg(short = 'H', long = "header", value_parser = crate::commands::parse_header)]
    headers: Vec<(String, String)>,
    /// Ordering key of each run.
    #[arg(long)]
    key: Option<String>,
    /// Priority of each run.
    #[arg(long)]
    priority: Option<i32>,
}

#[derive(Debug, clap::Args)]
struct RemoveArgs {
    /// Queue URL.
    url: String,
    /// The schedule's id.
    id: String,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Queue URL.
    url: String,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long = "for")]
    run_for: Option<humantime::Duration>,
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::List(a) => list(a).await,
        Command::Add(a) => add(a).await,
        Command::Remove(a) => remove(a).await,
        Command::Run(a) => run_scheduler(a).await,
    }
}

async fn store_of(url: &str) -> Result<Box<dyn ScheduleStore>> {
    open(url)?.schedule_store().await
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

fn definition(args: &AddArgs) -> Result<ScheduleDef> {
    let every = match (&args.cron, args.every) {
        (Some(expr), None) => Every::cron_in(expr, &args.tz)?,
        (None, Some(d)) => Every::interval(d.into())?,
        _ => return Err(Error::invalid_config("cron", "give --cron or --every")),
    };
    let catch_up: CatchUp = args.catch_up.parse()?;
    let mut def = ScheduleDef::new(&args.id, every)
        .catch_up(catch_up)
        .payload(args.payload.clone());
    for (n, v) in &args.headers {
        def = def.header(n.clone(), v.clone());
    }
    if let Some(k) = &args.key {
        def = def.key(k.clone());
    }
    if let Some(p) = args.priority {
        def = def.priority(p);
    }
    def.validate()?;
    Ok(def)
}

async fn add(args: AddArgs) -> Result<()> {
    let def = definition(&args)?;
    let store = store_of(&args.url).await?;
    let now = Clock::system().now();
    let (outcome, entry) = store.upsert(&def, now).await?;
    let what = match outcome {
        Upserted::Created => "created",
        Upserted::Unchanged => "unchanged",
        Upserted::Updated => "updated (progress kept)",
        Upserted::Rescheduled => "rescheduled (new timing, starts over from now)",
    };
    println!(
        "schedule {}: {what}; next run {}",
        def.id(),
        time(entry.next_run(now))
    );
    Ok(())
}

async fn remove(args: RemoveArgs) -> Result<()> {
    let store = store_of(&args.url).await?;
    if store.remove(&args.id).await? {
        println!("schedule {}: removed", args.id);
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::NotFound,
            format!("no schedule {:?} on this queue", args.id),
        ))
    }
}

fn entry_json(e: &ScheduleEntry, now: DateTime<Utc>) -> serde_json::Value {
    let def = serde_json::from_str::<serde_json::Value>(&e.def.to_json()).unwrap_or_default();
    serde_json::json!({
        "id": e.def.id(),
        "timing": e.def.every().to_string(),
        "catch_up": e.def.get_catch_up().to_string(),
        "next_run": e.next_run(now).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        "last_enqueued": e.state.last_enqueued.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        "cursor": e.state.cursor.to_rfc3339_opts(SecondsFormat::Millis, true),
        "revision": e.state.revision,
        "claim": e.state.pending.as_ref().map(|p| serde_json::json!({
            "run": p.run.to_rfc3339_opts(SecondsFormat::Millis, true),
            "owner": p.owner,
            "until": p.until.to_rfc3339_opts(SecondsFormat::Millis, true),
        })),
        "definition": def,
    })
}

async fn list(args: ListArgs) -> Result<()> {
    let store = store_of(&args.url).await?;
    let entries = store.list().await?;
    let now = Clock::system().now();
    if args.json {
        let all: Vec<_> = entries.iter().map(|e| entry_json(e, now)).collect();
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return Ok(());
    }
    if entries.is_empty() {
        println!("no schedules");
        return Ok(());
    }
    for e in &entries {
        println!("{}", e.def.id());
        println!("  timing         {}", e.def.every());
        println!("  catch-up       {}", e.def.get_catch_up());
        println!("  next run       {}", time(e.next_run(now)));
        println!("  last enqueued  {}", time(e.state.last_enqueued));
        let payload = String::from_utf8_lossy(e.def.template().payload());
        println!("  payload        {payload}");
        if let Some(p) = &e.state.pending {
            println!(
                "  claim          run {} by {} until {}",
                time(Some(p.run)),
                p.owner,
                time(Some(p.until))
            );
        }
    }
    Ok(())
}

async fn run_scheduler(args: RunArgs) -> Result<()> {
    let config = open(&args.url)?;
    let scheduler =
        Scheduler::new(config.producer().await?, config.schedule_store().await?).name("ferry");
    let stop = async {
        match args.run_for {
            Some(d) => {
                tokio::time::sleep_until(ferrymq::time::deadline_in(Duration::from(d))).await
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let summary = scheduler.run_until(stop).await?;
    println!(
        "scheduler {}: {} runs enqueued, {} re-sends deduplicated, {} skipped, {} errors",
        scheduler.owner(),
        summary.enqueued,
        summary.duplicates,
        summary.skipped,
        summary.errors
    );
    Ok(())
}

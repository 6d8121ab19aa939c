//! `ferry`: send, receive and inspect ferrymq queues, administer them, and run the
//! order-pipeline demo.
//!
//! ```text
//! ferry demo                                   # the order pipeline, in process
//! ferry demo --url 'redis://127.0.0.1:6379/{queue}?group=demo'
//! ferry send --url redis://127.0.0.1:6379/orders '{"order": 42}' --key customer-7
//! ferry receive --url redis://127.0.0.1:6379/orders --max 10
//! ferry depth --url redis://127.0.0.1:6379/orders
//! ferry queue describe redis://127.0.0.1:6379/orders
//! ferry queue peek redis://127.0.0.1:6379/orders -n 5
//! ferry dlq peek redis://127.0.0.1:6379/orders-dlq
//! ferry schedule add redis://127.0.0.1:6379/reports nightly --cron '0 2 * * *' --tz Europe/Berlin
//! ferry schedule list redis://127.0.0.1:6379/reports
//! ferry dlq redrive redis://127.0.0.1:6379/orders-dlq --to redis://127.0.0.1:6379/orders
//! ferry jobs counts --url redis://127.0.0.1:6379/orders
//! ferry jobs get order-42 --url redis://127.0.0.1:6379/orders
//! ferry events --url redis://127.0.0.1:6379/orders
//! ```
//!
//! `--url` defaults to `$FERRYMQ_URL`. Nothing `ferry` prints — output, errors,
//! logs at any level — shows a password or token from the URLs it was given.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod commands;
mod demo;
mod dlq;
mod jobs;
mod queue;
mod schedule;
mod scrub;
mod show;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Send, receive, inspect and administer ferrymq queues; run the order-pipeline demo"
)]
struct Cli {
    /// More logging (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the order pipeline end to end: orders -> invoice worker -> invoices -> email worker,
    /// with transient failures, a poison message and a duplicate send.
    Demo(demo::Args),
    /// Send messages to a queue.
    Send(commands::SendArgs),
    /// Receive messages from a queue, print them, and ack (or release) them.
    Receive(commands::ReceiveArgs),
    /// Print a queue's depth.
    Depth(commands::DepthArgs),
    /// Create, ensure, describe, peek, purge or delete a queue.
    Queue(queue::Args),
    /// Inspect a dead-letter queue (peek) and move its messages back (redrive).
    Dlq(dlq::Args),
    /// List, add (upsert by id) or remove a queue's schedules; run a scheduler.
    Schedule(schedule::Args),
    /// A queue's jobs: counts per state, one job's record, the newest of a state.
    Jobs(jobs::Args),
    /// Tail a queue's job lifecycle events (completed, failed, retried, dead-lettered,
    /// progress) from any process.
    Events(jobs::EventsArgs),
}

fn init_tracing(verbose: u8, secrets: &scrub::Scrubbed) {
    let default = match verbose {
        0 => "error",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(secrets.clone())
        .try_init();
}

#[tokio::main]
async fn main() -> ExitCode {
    // Whatever secrets the URLs on the command line (or in FERRYMQ_URL) hold, scrubbed
    // from everything printed on standard error: errors, usage errors and logs.
    let secrets = scrub::Scrubbed::from_command_line();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return secrets.clap_exit(&e),
    };
    init_tracing(cli.verbose, &secrets);
    let result = match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Send(args) => commands::send(args).await,
        Command::Receive(args) => commands::receive(args).await,
        Command::Depth(args) => commands::depth(args).await,
        Command::Queue(args) => queue::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Schedule(args) => schedule::run(args).await,
        Command::Jobs(args) => jobs::run(args).await,
        Command::Events(args) => jobs::events(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {}", secrets.scrub(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

//! Schedules: repeatable jobs by cron expression (in a time zone) or fixed interval,
//! upserted by a scheduler id, enqueued through any [`Producer`](crate::Producer).
//!
//! ```
//! use std::time::Duration;
//! use ferrymq_core::memory::MemoryConfig;
//! use ferrymq_core::schedule::{CatchUp, Every, MemoryScheduleStore, ScheduleDef, Scheduler};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (producer, _consumer) = MemoryConfig::new("doc-reports").connect()?;
//! let scheduler = Scheduler::new(producer, MemoryScheduleStore::named("doc-reports"));
//! // Every start of the service says this; the second time it changes nothing.
//! scheduler
//!     .upsert(
//!         ScheduleDef::new("daily-report", Every::cron_in("0 9 * * MON-FRI", "Europe/Berlin")?)
//!             .catch_up(CatchUp::Once)
//!             .payload(r#"{"report":"daily"}"#)
//!             .header("content-type", "application/json"),
//!     )
//!     .await?;
//! // In the service: scheduler.run_until(shutdown).await?;
//! let report = scheduler.tick().await?; // one pass, as run_until does each time
//! assert!(report.enqueued.is_empty()); // not due yet
//! # Ok(())
//! # }
//! ```
//!
//! ## What is promised
//!
//! - **One schedule per id.** [`Scheduler::upsert`] (and [`ScheduleStore::upsert`])
//!   insert or replace by id — never by a hash of the options, the cause of
//!   BullMQ's duplicated repeatable jobs after a restart with changed options
//!   (bull #1003, bullmq #2889). An upsert with the same timing keeps the
//!   schedule's progress, so a restart neither re-runs nor skips anything; a
//!   changed timing starts over from the upsert (no run of the old timing is
//!   claimed after it; one whose send was already under way still arrives).
//! - **Each run enqueued once, by any number of schedulers.** The schedule's
//!   state (its *cursor*: every run at or before it is dealt with) lives in the
//!   store. A scheduler enqueues a run in three steps: it **claims** the run
//!   (a compare-and-set on the cursor, with a lease: one atomic Lua script on
//!   Redis), **sends** it with the dedup id `ferrymq-schedule:<id>:<run ms>`, and
//!   **completes** it (the cursor moves to the run). A second scheduler's claim of
//!   the same run fails, so N schedulers enqueue it once.
//! - **No run lost to a crash.** A scheduler that dies between claim and complete
//!   leaves its claim behind; when the lease runs out, another scheduler (or the
//!   same one restarted) takes the claim over and sends the *same* run again with
//!   the *same* dedup id. Where the backend deduplicates
//!   ([`Capabilities::dedup_window`](crate::Capabilities::dedup_window) is set and
//!   longer than the lease — memory, Redis, SQS FIFO) the message is enqueued
//!   exactly once; elsewhere (Kafka, SQS standard) a run can be duplicated only in
//!   that crash window, never lost. A send that is merely slow is no such window:
//!   while it is under way the scheduler renews its claim every third of the
//!   lease, so nobody takes a live scheduler's run over. This is the gap of BullMQ's older scheduler
//!   (bull #871: the next run recorded, then the job created in a second step —
//!   a crash between them stopped the schedule for good).
//! - **Catch-up is bounded and chosen per schedule** ([`CatchUp`]): after downtime
//!   `Skip` drops missed runs, `Once` (default) enqueues the latest one, `All`
//!   enqueues at most `max` (≤ 1000) of the latest.
//! - **Typed errors, no panics**: a zero, sub-millisecond or huge interval, a bad
//!   cron expression or time zone, an out-of-range catch-up bound, a bad id or
//!   template header is `InvalidConfig` naming the parameter.
//!
//! Each enqueued run carries the headers [`SCHEDULE_ID`] and [`SCHEDULED_FOR`]
//! (the run's own time in RFC 3339, not the time it was sent) besides the
//! template's.
//!
//! Time: a scheduler reads the wall clock through [`Clock`] (tests use
//! [`Clock::tokio_at`], which follows tokio's paused clock). Schedulers on machines
//! whose clocks differ enqueue a run when the *first* of them thinks it is due;
//! Redis leases are counted on the server's clock.

mod clock;
mod memory;
mod scheduler;
mod spec;
mod store;
#[cfg(test)]
mod tests;

pub use clock::Clock;
pub use memory::MemoryScheduleStore;
pub use scheduler::{Run, Scheduler, SchedulerSummary, TickReport};
pub use spec::{CatchUp, Every, MAX_CATCH_UP, MAX_GRACE, MAX_INTERVAL, MIN_INTERVAL};
pub use store::{
    ClaimOutcome, ClaimRequest, PendingRun, ScheduleDef, ScheduleEntry, ScheduleState,
    ScheduleStore, Template, Upserted,
};

/// Header on every enqueued run: the schedule's id.
pub const SCHEDULE_ID: &str = "ferrymq-schedule-id";
/// Header on every enqueued run: the time the run was scheduled for (RFC 3339, ms).
pub const SCHEDULED_FOR: &str = "ferrymq-scheduled-for";

/// The reserved headers schedules write (allowed on send despite the prefix).
pub const RESERVED_HEADERS: &[&str] = &[SCHEDULE_ID, SCHEDULED_FOR];

/// The dedup id of a schedule's run: the same for every scheduler that sends it.
pub fn dedup_id(schedule_id: &str, run: chrono::DateTime<chrono::Utc>) -> String {
    format!("ferrymq-schedule:{schedule_id}:{}", run.timestamp_millis())
}

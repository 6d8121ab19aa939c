//! The scheduler: enqueues each due run of the store's schedules through a
//! producer, claim → send → complete (see the [module docs](super)).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::clock::Clock;
use super::spec::{plan, Step, MAX_CATCH_UP};
use super::store::{
    ClaimOutcome, ClaimRequest, ScheduleDef, ScheduleEntry, ScheduleStore, Upserted,
};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::producer::{Producer, SendReceipt};

/// Longest lease a scheduler takes on a run: an hour.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Longest poll interval: an hour.
pub const MAX_POLL: Duration = Duration::from_secs(3600);

/// One run of one schedule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Run {
    /// The schedule's id.
    pub schedule: String,
    /// The time the run was scheduled for.
    pub at: DateTime<Utc>,
}

/// What one [`Scheduler::tick`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct TickReport {
    /// Runs sent and accepted as new messages.
    pub enqueued: Vec<Run>,
    /// Runs sent again after taking over a claim, which the backend dropped as
    /// duplicates: the crashed claimer had sent them already.
    pub duplicates: Vec<Run>,
    /// Runs dropped by the catch-up policy.
    pub skipped: Vec<Run>,
    /// Schedules another scheduler held a live claim on.
    pub busy: Vec<String>,
    /// Failures, by schedule id (store or producer errors; retried next tick).
    pub errors: Vec<(String, Error)>,
    /// The earliest next run seen (the scheduler sleeps until then, at most its poll
    /// interval).
    pub next_due: Option<DateTime<Utc>>,
}

impl TickReport {
    fn note_next(&mut self, next: Option<DateTime<Utc>>) {
        if let Some(n) = next {
            self.next_due = Some(self.next_due.map_or(n, |m| m.min(n)));
        }
    }
}

/// Totals of a [`Scheduler::run_until`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerSummary {
    /// Passes over the schedules.
    pub ticks: u64,
    /// Runs enqueued.
    pub enqueued: u64,
    /// Runs re-sent after a takeover and dropped by the backend's dedup.
    pub duplicates: u64,
    /// Runs dropped by catch-up policies.
    pub skipped: u64,
    /// Errors (each logged).
    pub errors: u64,
}

/// Enqueues the runs of every schedule in a [`ScheduleStore`] through a
/// [`Producer`]. Run as many as you like (one per service instance): each run is
/// enqueued once.
///
/// Defaults: lease 30 s (how long a claimed run is held before another scheduler
/// may take it over — keep it well under the backend's dedup window), poll 1 s (how
/// often the store is re-read for schedules added elsewhere), the system clock.
pub struct Scheduler {
    producer: Arc<dyn Producer>,
    store: Arc<dyn ScheduleStore>,
    clock: Clock,
    owner: String,
    lease: Duration,
    poll: Duration,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("queue", &self.producer.queue())
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler sending through `producer`, with schedules from `store`.
    pub fn new(producer: impl Producer + 'static, store: impl ScheduleStore + 'static) -> Self {
        Scheduler {
            producer: Arc::new(producer),
            store: Arc::new(store),
            clock: Clock::system(),
            owner: format!("scheduler-{:016x}", rand::random::<u64>()),
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(1),
        }
    }

    /// Read time from `clock` (tests: [`Clock::tokio_at`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Name this scheduler in claims (`ferry schedule list` shows who holds one); a
    /// random suffix keeps two schedulers of one name apart.
    pub fn name(mut self, name: &str) -> Self {
        self.owner = format!("{name}-{:016x}", rand::random::<u64>());
        self
    }

    /// How long a claim on a run holds (1 ms ..= 1 h).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often the store is re-read at most (1 ms ..= 1 h).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The id this scheduler claims runs under.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The clock it reads.
    pub fn get_clock(&self) -> &Clock {
        &self.clock
    }

    fn check(&self) -> Result<()> {
        if self.lease.is_zero() || self.lease > MAX_LEASE {
            return Err(Error::invalid_config(
                "lease",
                format!("{:?} is not in 1ms..=1h", self.lease),
            ));
        }
        if self.poll.is_zero() || self.poll > MAX_POLL {
            return Err(Error::invalid_config(
                "poll_interval",
                format!("{:?} is not in 1ms..=1h", self.poll),
            ));
        }
        Ok(())
    }

    /// Insert or replace a schedule by its id (validated first).
    pub async fn upsert(&self, def: ScheduleDef) -> Result<Upserted> {
        def.validate()?;
        Ok(self.store.upsert(&def, self.clock.now()).await?.0)
    }

    /// Remove a schedule; whether it existed.
    pub async fn remove(&self, id: &str) -> Result<bool> {
        self.store.remove(id).await
    }

    /// Every schedule with its state.
    pub async fn list(&self) -> Result<Vec<ScheduleEntry>> {
        self.store.list().await
    }

    /// One pass: enqueue every due run of every schedule (following each one's
    /// catch-up policy), and say when the next is due. Errors of one schedule are
    /// reported in [`TickReport::errors`] and do not stop the others; only a failing
    /// list of the store fails the tick.
    pub async fn tick(&self) -> Result<TickReport> {
        self.check()?;
        let mut report = TickReport::default();
        for entry in self.store.list().await? {
            self.drive(entry, &mut report).await;
        }
        Ok(report)
    }

    /// Tick until `shutdown` resolves, sleeping until the next run is due (at most
    /// the poll interval) in between. A tick in progress is finished before it
    /// returns; errors are logged and retried, never fatal.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<SchedulerSummary> {
        self.check()?;
        let caps = self.producer.capabilities();
        match caps.dedup_window {
            None => tracing::info!(
                queue = self.producer.queue(),
                "scheduler: the backend does not deduplicate; a run re-sent after a scheduler \
                 crashed between send and complete can be enqueued twice"
            ),
            Some(w) if w <= self.lease => tracing::warn!(
                queue = self.producer.queue(),
                "scheduler: lease {:?} is not shorter than the dedup window {:?}; a run re-sent \
                 after a crash may not be deduplicated",
                self.lease,
                w
            ),
            Some(_) => {}
        }
        tokio::pin!(shutdown);
        let mut summary = SchedulerSummary::default();
        loop {
            let next = match self.tick().await {
                Ok(report) => {
                    summary.ticks += 1;
                    summary.enqueued += report.enqueued.len() as u64;
                    summary.duplicates += report.duplicates.len() as u64;
                    summary.skipped += report.skipped.len() as u64;
                    summary.errors += report.errors.len() as u64;
                    for (id, e) in &report.errors {
                        tracing::warn!(schedule = %id, error = %e, "scheduler: run not enqueued yet");
                    }
                    report.next_due
                }
                Err(e) => {
                    summary.errors += 1;
                    tracing::warn!(error = %e, "scheduler: could not read the schedules");
                    None
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = self.clock.sleep_until(next, self.poll) => {}
            }
        }
        Ok(summary)
    }

    /// Send one claimed run, renewing the claim every third of the lease while the
    /// send is under way. A send slower than the lease (a broker that is slow to
    /// answer, a producer's first send waiting for metadata) is not a crash: without
    /// the renewal another scheduler would take the claim over and send the run
    /// again, which a backend without dedup enqueues twice — and with every send
    /// slower than the lease, the schedulers would hand one run round for ever.
    /// A claim lost all the same (the store did not answer within the lease) is
    /// logged; the send is still awaited, and `complete` then finds the claim gone.
    async fn send_holding_claim(
        &self,
        id: &str,
        request: &ClaimRequest,
        run: DateTime<Utc>,
        message: Message,
    ) -> Result<SendReceipt> {
        let send = self.producer.send(message);
        tokio::pin!(send);
        let every = (self.lease / 3).max(Duration::from_millis(1));
        let mut renewal = request.clone();
        let mut holding = true;
        loop {
            tokio::select! {
                biased;
                sent = &mut send => return sent,
                () = tokio::time::sleep(every), if holding => {
                    renewal.now = self.clock.now();
                    // A claim of the caller's own is renewed by claiming it again.
                    match self.store.claim(id, &renewal).await {
                        Ok(ClaimOutcome::Won(p)) if p.run == run && p.owner == self.owner => {}
                        other => {
                            holding = false;
                            tracing::warn!(
                                schedule = %id,
                                answer = ?other,
                                "scheduler: the claim could not be renewed during a slow send; \
                                 another scheduler may send this run again"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Deal with every due run of one schedule.
    async fn drive(&self, mut entry: ScheduleEntry, report: &mut TickReport) {
        let id = entry.def.id().to_string();
        // Bounded: a catch-up enqueues at most MAX_CATCH_UP runs, and each Moved
        // answer means another scheduler made progress.
        for _ in 0..(2 * MAX_CATCH_UP + 16) {
            let now = self.clock.now();
            // A claim left behind (ours after an unanswered send, or a crashed
            // scheduler's) is finished first: its run may be on the queue already.
            let (run, enqueue) = match &entry.state.pending {
                Some(p) => (p.run, p.enqueue),
                None => match plan(
                    entry.def.every(),
                    entry.def.get_catch_up(),
                    entry.state.anchor,
                    entry.state.cursor,
                    now,
                ) {
                    Step::Idle { next } => {
                        report.note_next(next);
                        return;
                    }
                    Step::Enqueue(run) => (run, true),
                    Step::Skip(run) => (run, false),
                },
            };
            let request = ClaimRequest {
                revision: entry.state.revision,
                cursor: entry.state.cursor,
                run,
                enqueue,
                owner: self.owner.clone(),
                lease: self.lease,
                now,
            };
            let claim = match self.store.claim(&id, &request).await {
                Ok(ClaimOutcome::Won(claim)) => claim,
                Ok(ClaimOutcome::Moved(fresh)) => {
                    entry = *fresh;
                    continue;
                }
                Ok(ClaimOutcome::Busy(_)) => {
                    report.busy.push(id);
                    return;
                }
                Ok(ClaimOutcome::Gone) => return,
                Err(e) => {
                    report.errors.push((id, e));
                    return;
                }
            };
            let done = Run {
                schedule: id.clone(),
                at: claim.run,
            };
            if claim.enqueue {
                match self
                    .send_holding_claim(&id, &request, claim.run, entry.def.message_for(claim.run))
                    .await
                {
                    Ok(receipt) if receipt.is_duplicate() => report.duplicates.push(done),
                    Ok(_) => report.enqueued.push(done),
                    Err(e) if e.kind() == ErrorKind::OutcomeUnknown => {
                        // May be on the queue: keep the claim, and send the same run
                        // (same dedup id) again next tick.
                        report.errors.push((id, e));
                        return;
                    }
                    Err(e) => {
                        // Nothing enqueued: give the run back for the next tick.
                        let _ = self.store.abandon(&id, &self.owner, claim.run).await;
                        report.errors.push((id, e));
                        return;
                    }
                }
            } else {
                report.skipped.push(done);
            }
            match self.store.complete(&id, &self.owner, claim.run).await {
                Ok(Some(fresh)) => entry = fresh,
                // The lease ran out during the send and another scheduler took the
                // claim over: it re-sends the same run (deduplicated) and completes.
                Ok(None) => match self.store.get(&id).await {
                    Ok(Some(fresh)) => entry = fresh,
                    Ok(None) => return,
                    Err(e) => {
                        report.errors.push((id, e));
                        return;
                    }
                },
                Err(e) => {
                    report.errors.push((id, e));
                    return;
                }
            }
        }
    }
}

//! The job model: states, retention, records, updates, counts and events.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::depth::Depth;
use crate::error::{Error, Result};
use crate::message::{reserved, Message};

/// Records a store keeps per state at most, whatever the retention says: the bound
/// that keeps memory finite (a long age, records of crashed workers).
pub const DEFAULT_MAX_PER_STATE: u64 = 10_000;

/// Largest progress value or result a store is handed, as JSON text: they are
/// small values (BullMQ's `progress(50)`, an invoice number), and the cap keeps
/// [`DEFAULT_MAX_PER_STATE`] records within a bounded size.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// `value`'s JSON size when it is over [`MAX_VALUE_BYTES`].
pub(crate) fn oversized(value: &serde_json::Value) -> Option<usize> {
    let len = value.to_string().len();
    (len > MAX_VALUE_BYTES).then_some(len)
}

/// Where a job is in its life (see the [module docs](super) for when each is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Sent, or given back for another attempt.
    Waiting,
    /// A handler is running it.
    Active,
    /// Handled and acked.
    Completed,
    /// The last attempt failed and nothing retried or dead-lettered it.
    Failed,
    /// Dead-lettered: final.
    DeadLettered,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 5] = [
        JobState::Waiting,
        JobState::Active,
        JobState::Completed,
        JobState::Failed,
        JobState::DeadLettered,
    ];

    /// The lowercase name (`waiting`, `active`, `completed`, `failed`,
    /// `dead_lettered`), also the key suffix in Redis.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Active => "active",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::DeadLettered => "dead_lettered",
        }
    }

    /// Whether the job's life ended here as far as the store can tell (completed,
    /// failed, dead-lettered): the states retention applies to.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::DeadLettered
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s || (s == "dead-lettered" && *state == JobState::DeadLettered))
            .ok_or_else(|| {
                Error::invalid_config(
                    "state",
                    format!("{s:?} is not a job state (waiting, active, completed, failed, dead_lettered)"),
                )
            })
    }
}

/// How long a finished job's record is kept (BullMQ's `removeOnComplete` /
/// `removeOnFail`). Every store also caps each state at its
/// [`max_per_state`](DEFAULT_MAX_PER_STATE), so no policy is unbounded.
///
/// Written `none`, a count (`100`: the newest 100 records of that state are kept,
/// older ones go when this job finishes) or an age (`1h`, `30m`: the record goes
/// that long after the job finished).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    /// Drop the record when the job finishes (the default).
    #[default]
    None,
    /// Keep the newest `N` records of the state (0 is `None`).
    Count(u64),
    /// Keep the record for this long after the job finished.
    Age(Duration),
}

impl Keep {
    /// Whether the record is dropped at once.
    pub fn keeps_nothing(&self) -> bool {
        match self {
            Keep::None | Keep::Count(0) => true,
            Keep::Age(d) => d.is_zero(),
            Keep::Count(_) => false,
        }
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::None => f.write_str("none"),
            Keep::Count(n) => write!(f, "{n}"),
            Keep::Age(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl FromStr for Keep {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("none") || s.is_empty() {
            return Ok(Keep::None);
        }
        if let Ok(n) = s.parse::<u64>() {
            return Ok(if n == 0 { Keep::None } else { Keep::Count(n) });
        }
        humantime::parse_duration(s).map(Keep::Age).map_err(|e| {
            Error::invalid_config(
                "keep",
                format!("{s:?} is neither `none`, a count nor an age like `1h`: {e}"),
            )
        })
    }
}

impl Serialize for Keep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch (0 before it), for records and scripts.
pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the epoch, saturating.
pub(crate) fn from_epoch_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// Serde for `SystemTime` as milliseconds since the epoch.
mod ms {
    use super::*;
    pub fn serialize<S: serde::Serializer>(
        t: &SystemTime,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(epoch_ms(*t))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_epoch_ms)
    }
}

/// Serde for `Option<SystemTime>` as milliseconds since the epoch.
mod opt_ms {
    use super::*;
    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&epoch_ms(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<SystemTime>, D::Error> {
        Option::<u64>::deserialize(d).map(|o| o.map(from_epoch_ms))
    }
}

/// What a store knows of one job. Times are milliseconds since the epoch in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobRecord {
    /// The job id.
    pub id: String,
    /// Where it is.
    pub state: JobState,
    /// Deliveries so far (the attempt of the latest; 0 while only sent).
    pub attempts: u32,
    /// The last progress the handler reported.
    pub progress: Option<serde_json::Value>,
    /// What the handler returned, once completed.
    pub result: Option<serde_json::Value>,
    /// The error of the last failed attempt.
    pub failure: Option<String>,
    /// When the job was first recorded (its message's enqueue time when known).
    #[serde(with = "ms")]
    pub created_at: SystemTime,
    /// When the latest attempt started.
    #[serde(with = "opt_ms", default)]
    pub started_at: Option<SystemTime>,
    /// When it completed, failed or was dead-lettered.
    #[serde(with = "opt_ms", default)]
    pub finished_at: Option<SystemTime>,
    /// When the record last changed.
    #[serde(with = "ms")]
    pub updated_at: SystemTime,
}

impl JobRecord {
    /// A new record of `id` in `state` at `at`.
    pub fn new(id: impl Into<String>, state: JobState, at: SystemTime) -> Self {
        JobRecord {
            id: id.into(),
            state,
            attempts: 0,
            progress: None,
            result: None,
            failure: None,
            created_at: at,
            started_at: None,
            finished_at: None,
            updated_at: at,
        }
    }

    /// Apply `update` to this record (the fields it sets; the others stay).
    pub fn apply(&mut self, update: &JobUpdate) {
        self.state = update.state;
        if update.attempt > 0 {
            self.attempts = update.attempt;
        }
        if let Some(created) = update.created_at {
            self.created_at = self.created_at.min(created);
        }
        match update.state {
            JobState::Active => {
                self.started_at = Some(update.at);
                self.finished_at = None;
            }
            JobState::Completed | JobState::Failed | JobState::DeadLettered => {
                self.finished_at = Some(update.at);
            }
            JobState::Waiting => {}
        }
        if update.result.is_some() {
            self.result = update.result.clone();
        }
        if update.failure.is_some() {
            self.failure = update.failure.clone();
        }
        self.updated_at = update.at;
    }
}

/// One step of a job's life, applied by [`JobStore::record`](super::JobStore::record).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct JobUpdate {
    /// The job id.
    pub id: String,
    /// The state it moves to.
    pub state: JobState,
    /// The delivery's attempt (0: unchanged).
    pub attempt: u32,
    /// When it happened.
    pub at: SystemTime,
    /// The message's enqueue time, for a record created by this update.
    pub created_at: Option<SystemTime>,
    /// The handler's result (completed).
    pub result: Option<serde_json::Value>,
    /// The attempt's error (retried, failed, dead-lettered).
    pub failure: Option<String>,
    /// The redelivery delay of a retry.
    pub retry_after: Option<Duration>,
    /// How long to keep the record in a finished state (ignored for waiting and
    /// active, which are kept, under the per-state cap).
    pub keep: Keep,
    /// Only create the record; change nothing if one exists (a send racing the
    /// worker must not turn an active job back into waiting).
    pub only_if_new: bool,
}

impl JobUpdate {
    /// Move `id` to `state` at its `attempt`, now.
    pub fn new(id: impl Into<String>, state: JobState, attempt: u32) -> Self {
        JobUpdate {
            id: id.into(),
            state,
            attempt,
            at: SystemTime::now(),
            created_at: None,
            result: None,
            failure: None,
            retry_after: None,
            keep: Keep::None,
            only_if_new: false,
        }
    }

    /// Set the result.
    pub fn result(mut self, result: Option<serde_json::Value>) -> Self {
        self.result = result;
        self
    }

    /// Set the failure reason.
    pub fn failure(mut self, reason: impl Into<String>) -> Self {
        self.failure = Some(reason.into());
        self
    }

    /// Set the retry delay.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Set the retention of a finished state.
    pub fn keep(mut self, keep: Keep) -> Self {
        self.keep = keep;
        self
    }

    /// Set the creation time of a new record.
    pub fn created_at(mut self, at: SystemTime) -> Self {
        self.created_at = Some(at);
        self
    }

    /// Set when it happened.
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at = at;
        self
    }

    /// Only create the record (see the field).
    pub fn only_if_new(mut self) -> Self {
        self.only_if_new = true;
        self
    }

    /// Whether this update is about an earlier attempt than the record's
    /// `attempts`: the message was given back and a newer delivery already started
    /// (on another worker), so the update must not change the record.
    pub fn is_stale(&self, recorded_attempts: u32) -> bool {
        self.attempt > 0 && recorded_attempts > self.attempt
    }

    /// Whether the record is dropped rather than kept after this update.
    pub fn drops_record(&self) -> bool {
        self.state.is_finished() && self.keep.keeps_nothing()
    }

    /// The event this update emits.
    pub fn event(&self, queue: &str) -> JobEvent {
        let reason = || self.failure.clone().unwrap_or_default();
        let kind = match self.state {
            JobState::Waiting if self.failure.is_some() => JobEventKind::Retried {
                reason: reason(),
                after_ms: self
                    .retry_after
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            },
            JobState::Waiting => JobEventKind::Waiting,
            JobState::Active => JobEventKind::Active,
            JobState::Completed => JobEventKind::Completed {
                result: self.result.clone(),
            },
            JobState::Failed => JobEventKind::Failed { reason: reason() },
            JobState::DeadLettered => JobEventKind::DeadLettered { reason: reason() },
        };
        JobEvent {
            queue: queue.to_string(),
            id: self.id.clone(),
            attempt: self.attempt,
            at: self.at,
            kind,
        }
    }
}

/// One lifecycle event of a job (BullMQ's `QueueEvents`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobEvent {
    /// The queue.
    pub queue: String,
    /// The job id.
    pub id: String,
    /// The delivery's attempt (0 when there is none yet: sent).
    pub attempt: u32,
    /// When it happened (ms since the epoch in JSON).
    #[serde(with = "ms")]
    pub at: SystemTime,
    /// What happened.
    #[serde(flatten)]
    pub kind: JobEventKind,
}

impl JobEvent {
    /// An event of job `id` (for stores decoding what they stored).
    pub fn new(queue: &str, id: &str, attempt: u32, at: SystemTime, kind: JobEventKind) -> Self {
        JobEvent {
            queue: queue.to_string(),
            id: id.to_string(),
            attempt,
            at,
            kind,
        }
    }

    /// A progress event of `attempt`, now.
    pub fn progress(queue: &str, id: &str, attempt: u32, value: serde_json::Value) -> Self {
        JobEvent {
            queue: queue.to_string(),
            id: id.to_string(),
            attempt,
            at: SystemTime::now(),
            kind: JobEventKind::Progress { value },
        }
    }
}

/// What a [`JobEvent`] reports. Serialized with an `event` tag (`completed`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobEventKind {
    /// Sent.
    Waiting,
    /// A handler started it.
    Active,
    /// The handler reported progress.
    Progress {
        /// The value reported.
        value: serde_json::Value,
    },
    /// Handled and acked, with the handler's result.
    Completed {
        /// What the handler returned (`None` for `()`).
        result: Option<serde_json::Value>,
    },
    /// An attempt failed; it is delivered again after `after_ms`.
    Retried {
        /// The attempt's error.
        reason: String,
        /// The redelivery delay, in milliseconds.
        after_ms: u64,
    },
    /// An attempt failed and was left to the worker's nack.
    Failed {
        /// The attempt's error.
        reason: String,
    },
    /// Dead-lettered.
    DeadLettered {
        /// Why.
        reason: String,
    },
}

impl JobEventKind {
    /// The event's name, as in its `event` tag.
    pub fn name(&self) -> &'static str {
        match self {
            JobEventKind::Waiting => "waiting",
            JobEventKind::Active => "active",
            JobEventKind::Progress { .. } => "progress",
            JobEventKind::Completed { .. } => "completed",
            JobEventKind::Retried { .. } => "retried",
            JobEventKind::Failed { .. } => "failed",
            JobEventKind::DeadLettered { .. } => "dead_lettered",
        }
    }
}

/// How many records a store holds per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredCounts {
    /// Recorded waiting (sent through `jobs::send`, or given back).
    pub waiting: u64,
    /// Recorded active.
    pub active: u64,
    /// Kept completed.
    pub completed: u64,
    /// Kept failed.
    pub failed: u64,
    /// Kept dead-lettered.
    pub dead_lettered: u64,
}

impl StoredCounts {
    /// The count of `state`.
    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Waiting => self.waiting,
            JobState::Active => self.active,
            JobState::Completed => self.completed,
            JobState::Failed => self.failed,
            JobState::DeadLettered => self.dead_lettered,
        }
    }

    /// Set the count of `state`.
    pub fn set(&mut self, state: JobState, n: u64) {
        match state {
            JobState::Waiting => self.waiting = n,
            JobState::Active => self.active = n,
            JobState::Completed => self.completed = n,
            JobState::Failed => self.failed = n,
            JobState::DeadLettered => self.dead_lettered = n,
        }
    }
}

/// BullMQ's `getJobCounts`: the queue's own depth (waiting, active = in flight,
/// delayed: what the broker holds, exact or approximate as its capabilities say)
/// and the store's kept completed, failed and dead-lettered jobs. Dead letters are
/// the larger of the store's dead-lettered records and the broker's own
/// dead-letter store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobCounts {
    /// Ready to be delivered.
    pub waiting: u64,
    /// Delivered and not yet settled.
    pub active: u64,
    /// Due later.
    pub delayed: u64,
    /// Kept completed jobs.
    pub completed: u64,
    /// Kept failed jobs.
    pub failed: u64,
    /// Dead-lettered jobs.
    pub dead_lettered: u64,
}

impl JobCounts {
    /// Combine a queue's depth with a store's counts.
    pub fn new(depth: Depth, stored: StoredCounts) -> Self {
        JobCounts {
            waiting: depth.waiting,
            active: depth.in_flight,
            delayed: depth.delayed,
            completed: stored.completed,
            failed: stored.failed,
            dead_lettered: stored.dead_lettered.max(depth.dead_lettered),
        }
    }
}

impl fmt::Display for JobCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waiting {}  active {}  delayed {}  completed {}  failed {}  dead-lettered {}",
            self.waiting,
            self.active,
            self.delayed,
            self.completed,
            self.failed,
            self.dead_lettered
        )
    }
}

/// The job id of `message`: its [`JOB_ID`](reserved::JOB_ID) header, else its dedup
/// id, else `message_id` (the backend's id, when known).
pub fn job_id_of<'a>(message: &'a Message, message_id: Option<&'a str>) -> Option<&'a str> {
    message
        .headers()
        .get(reserved::JOB_ID)
        .or(message.get_dedup_id())
        .or(message_id)
        .filter(|id| !id.is_empty())
}

/// Job settings on a [`Message`]: its id and its own retention, carried in
/// reserved headers so they travel with the message to any worker.
pub trait JobMessage: Sized {
    /// The id the job is recorded under (else the dedup id, else the backend's id).
    fn job_id(self, id: impl Into<String>) -> Self;
    /// How long to keep this job once completed, overriding the queue's policy.
    fn keep_completed(self, keep: Keep) -> Self;
    /// How long to keep this job once failed or dead-lettered.
    fn keep_failed(self, keep: Keep) -> Self;
}

impl JobMessage for Message {
    fn job_id(self, id: impl Into<String>) -> Self {
        self.header(reserved::JOB_ID, id)
    }
    fn keep_completed(self, keep: Keep) -> Self {
        self.header(reserved::KEEP_COMPLETED, keep.to_string())
    }
    fn keep_failed(self, keep: Keep) -> Self {
        self.header(reserved::KEEP_FAILED, keep.to_string())
    }
}

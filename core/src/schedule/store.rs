//! A schedule's definition, its state in a store, and the [`ScheduleStore`] trait.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::spec::{plan, CatchUp, Every, Step};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Headers, Message};

/// Longest schedule id, in bytes.
pub const MAX_ID_LEN: usize = 200;

/// What each run of a schedule enqueues: payload, headers, key, priority.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TemplateRepr", into = "TemplateRepr")]
pub struct Template {
    payload: Bytes,
    headers: Headers,
    key: Option<String>,
    priority: Option<i32>,
}

/// Stored form: a UTF-8 payload as text (readable in `ferry schedule list`), any
/// other as hex.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<i32>,
}

impl From<Template> for TemplateRepr {
    fn from(t: Template) -> TemplateRepr {
        let (payload, payload_hex) = match std::str::from_utf8(&t.payload) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(t.payload.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        TemplateRepr {
            payload,
            payload_hex,
            headers: t
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            key: t.key,
            priority: t.priority,
        }
    }
}

impl TryFrom<TemplateRepr> for Template {
    type Error = Error;
    fn try_from(r: TemplateRepr) -> Result<Template> {
        let payload = match (r.payload, r.payload_hex) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid_config(
                    "template",
                    "give payload or payload_hex, not both",
                ))
            }
            (Some(s), None) => Bytes::from(s),
            (None, Some(hex)) => Bytes::from(decode_hex(&hex)?),
            (None, None) => Bytes::new(),
        };
        Ok(Template {
            payload,
            headers: r.headers.into_iter().collect(),
            key: r.key,
            priority: r.priority,
        })
    }
}

fn decode_hex(s: &str) -> Result<Vec<u8>> {
    let bad = || Error::invalid_config("template.payload_hex", "not an even-length hex string");
    if s.len() % 2 != 0 {
        return Err(bad());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

impl Template {
    /// The payload of each run.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// The headers of each run (before the schedule's own).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// The ordering key of each run.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
    /// The priority of each run.
    pub fn priority(&self) -> Option<i32> {
        self.priority
    }
}

/// A schedule: its id, when it fires, what it does after downtime, what it sends.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::schedule::{CatchUp, Every, ScheduleDef};
///
/// let def = ScheduleDef::new("cleanup", Every::interval(Duration::from_secs(300))?)
///     .catch_up(CatchUp::All { max: 10 })
///     .payload("cleanup")
///     .key("maintenance");
/// def.validate()?;
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    id: String,
    every: Every,
    #[serde(default)]
    catch_up: CatchUp,
    #[serde(default)]
    template: Template,
}

impl ScheduleDef {
    /// A schedule named `id` (ASCII letters, digits, `-`, `_`, `.`, `:`, `/`; at
    /// most 200 bytes) firing `every`, with catch-up [`CatchUp::Once`] and an empty
    /// payload.
    pub fn new(id: impl Into<String>, every: Every) -> Self {
        ScheduleDef {
            id: id.into(),
            every,
            catch_up: CatchUp::default(),
            template: Template::default(),
        }
    }

    /// What to do with runs missed during downtime.
    pub fn catch_up(mut self, policy: CatchUp) -> Self {
        self.catch_up = policy;
        self
    }

    /// The payload of each run.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.template.payload = payload.into();
        self
    }

    /// Add a header to each run.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.template.headers.insert(name, value);
        self
    }

    /// The ordering key of each run.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.template.key = Some(key.into());
        self
    }

    /// The priority of each run.
    pub fn priority(mut self, priority: i32) -> Self {
        self.template.priority = Some(priority);
        self
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// When it fires.
    pub fn every(&self) -> &Every {
        &self.every
    }
    /// The catch-up policy.
    pub fn get_catch_up(&self) -> CatchUp {
        self.catch_up
    }
    /// What each run sends.
    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Check the id, the catch-up bounds and the template's headers.
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id)?;
        self.catch_up.validate()?;
        self.template
            .headers
            .validate()
            .map_err(|e| Error::invalid_config("template.headers", e.message()))?;
        if let Some((name, _)) = self
            .template
            .headers
            .iter()
            .find(|(n, _)| n.starts_with(crate::message::RESERVED_HEADER_PREFIX))
        {
            return Err(Error::invalid_config(
                "template.headers",
                format!("{name:?}: the `ferrymq-` prefix is reserved"),
            ));
        }
        Ok(())
    }

    /// The message of the run at `run`: the template, the schedule's headers and
    /// the run's dedup id.
    pub fn message_for(&self, run: DateTime<Utc>) -> Message {
        let mut m = Message::new(self.template.payload.clone())
            .with_headers(self.template.headers.clone())
            .header(super::SCHEDULE_ID, self.id.clone())
            .header(
                super::SCHEDULED_FOR,
                run.to_rfc3339_opts(SecondsFormat::Millis, true),
            )
            .dedup_id(super::dedup_id(&self.id, run));
        if let Some(key) = &self.template.key {
            m = m.key(key.clone());
        }
        if let Some(p) = self.template.priority {
            m = m.priority(p);
        }
        m
    }

    /// The definition as stored (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Read a stored definition, validating it.
    pub fn from_json(json: &str) -> Result<ScheduleDef> {
        let def: ScheduleDef = serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("stored schedule definition is not valid: {e}"),
            )
        })?;
        def.validate()?;
        Ok(def)
    }
}

/// Check a schedule id.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::invalid_config(
            "id",
            format!("a schedule id is 1..={MAX_ID_LEN} bytes long"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
    {
        return Err(Error::invalid_config(
            "id",
            format!("{id:?}: only ASCII letters, digits, '-', '_', '.', ':' and '/' are allowed"),
        ));
    }
    Ok(())
}

/// A claim on one run: who holds it, until when, and whether it enqueues (or only
/// moves the cursor past a dropped run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRun {
    /// The run's time.
    pub run: DateTime<Utc>,
    /// The scheduler holding the claim.
    pub owner: String,
    /// When the claim runs out and another scheduler may take it over.
    pub until: DateTime<Utc>,
    /// Whether the run is to be enqueued (false: it is being skipped).
    pub enqueue: bool,
}

/// A schedule's progress, kept by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleState {
    /// Bumped when the timing changes.
    pub revision: u64,
    /// Interval runs count from here: the creation, or the last timing change.
    pub anchor: DateTime<Utc>,
    /// Every run at or before this is dealt with (enqueued, or dropped by the
    /// catch-up policy).
    pub cursor: DateTime<Utc>,
    /// The latest run enqueued (its scheduled time).
    pub last_enqueued: Option<DateTime<Utc>>,
    /// A claim in progress.
    pub pending: Option<PendingRun>,
}

impl ScheduleState {
    /// The state of a schedule created (or rescheduled) at `now`.
    pub fn new(revision: u64, now: DateTime<Utc>) -> Self {
        ScheduleState {
            revision,
            anchor: now,
            cursor: now,
            last_enqueued: None,
            pending: None,
        }
    }
}

/// A schedule and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleEntry {
    /// The definition.
    pub def: ScheduleDef,
    /// The progress.
    pub state: ScheduleState,
}

impl ScheduleEntry {
    /// The next run to be enqueued as seen at `now` (it may be due already).
    pub fn next_run(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if let Some(p) = self.state.pending.as_ref().filter(|p| p.enqueue) {
            return Some(p.run);
        }
        match plan(
            &self.def.every,
            self.def.catch_up,
            self.state.anchor,
            self.state.cursor,
            now,
        ) {
            Step::Enqueue(run) => Some(run),
            Step::Skip(_) => self.def.every.next_after(self.state.anchor, now),
            Step::Idle { next } => next,
        }
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// A new schedule.
    Created,
    /// The same definition was there: nothing changed.
    Unchanged,
    /// The payload, headers or catch-up policy changed; progress kept.
    Updated,
    /// The timing changed: the schedule starts over from now (new revision).
    Rescheduled,
}

/// A claim of one run: the caller's view of the schedule (revision and cursor) and
/// the run it wants to deal with.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The revision the caller planned with.
    pub revision: u64,
    /// The cursor the caller planned with.
    pub cursor: DateTime<Utc>,
    /// The run to claim (after `cursor`).
    pub run: DateTime<Utc>,
    /// Enqueue it (true) or skip it (false).
    pub enqueue: bool,
    /// Who claims.
    pub owner: String,
    /// How long the claim holds before another scheduler may take it over.
    pub lease: Duration,
    /// The caller's clock (stores with a clock of their own, like Redis, use theirs).
    pub now: DateTime<Utc>,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The caller holds this claim now. It may be another run than asked for: a
    /// claim whose holder's lease ran out is taken over as it was (same run, same
    /// `enqueue`), and must be finished first — its run may already be on the
    /// queue, which the dedup id takes care of.
    Won(PendingRun),
    /// Another scheduler holds a live claim.
    Busy(PendingRun),
    /// The schedule's state is not what the caller planned with: plan again.
    Moved(Box<ScheduleEntry>),
    /// The schedule was removed.
    Gone,
}

/// Where schedules and their progress live: shared by every scheduler of a queue.
///
/// Implementations make [`claim`](ScheduleStore::claim),
/// [`complete`](ScheduleStore::complete) and [`upsert`](ScheduleStore::upsert)
/// atomic (a mutex in memory, a Lua script on Redis). The contract, checked by
/// the tests of each store:
///
/// - `upsert` of a new id creates it with cursor = anchor = `now`; of an existing id
///   with the same timing ([`Every::timing_key`]) keeps the state; with another
///   timing bumps the revision, sets anchor = `now`, cursor = max(cursor, `now`) and
///   drops any claim.
/// - `claim` answers `Gone` for an unknown id; `Busy` while another owner's claim is
///   live; `Won(that claim)` when a claim exists that is the caller's or whose lease
///   ran out (taken over, lease renewed); `Moved` when revision or cursor differ
///   from the request or `run` ≤ cursor; otherwise records the claim and `Won`.
/// - `complete` applies the caller's claim of `run` (cursor = max(cursor, run);
///   `last_enqueued` = run when it enqueued) and returns the new entry, or `None`
///   when the caller no longer holds that claim.
/// - `abandon` drops the caller's claim of `run` (a send that definitely failed).
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Insert or replace the schedule `def.id()` (validated by the caller).
    async fn upsert(
        &self,
        def: &ScheduleDef,
        now: DateTime<Utc>,
    ) -> Result<(Upserted, ScheduleEntry)>;

    /// Remove a schedule; whether it existed. A claim in flight is dropped with it.
    async fn remove(&self, id: &str) -> Result<bool>;

    /// One schedule.
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>>;

    /// Every schedule, by id.
    async fn list(&self) -> Result<Vec<ScheduleEntry>>;

    /// Claim a run (see the trait docs).
    async fn claim(&self, id: &str, request: &ClaimRequest) -> Result<ClaimOutcome>;

    /// Finish the caller's claim of `run`.
    async fn complete(
        &self,
        id: &str,
        owner: &str,
        run: DateTime<Utc>,
    ) -> Result<Option<ScheduleEntry>>;

    /// Drop the caller's claim of `run` without moving the cursor.
    async fn abandon(&self, id: &str, owner: &str, run: DateTime<Utc>) -> Result<()>;
}

macro_rules! forward_store {
    ($($wrapper:ident)::+) => {
        #[async_trait]
        impl<S: ScheduleStore + ?Sized> ScheduleStore for $($wrapper)::+<S> {
            async fn upsert(&self, def: &ScheduleDef, now: DateTime<Utc>)
                -> Result<(Upserted, ScheduleEntry)> {
                (**self).upsert(def, now).await
            }
            async fn remove(&self, id: &str) -> Result<bool> {
                (**self).remove(id).await
            }
            async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>> {
                (**self).get(id).await
            }
            async fn list(&self) -> Result<Vec<ScheduleEntry>> {
                (**self).list().await
            }
            async fn claim(&self, id: &str, request: &ClaimRequest) -> Result<ClaimOutcome> {
                (**self).claim(id, request).await
            }
            async fn complete(&self, id: &str, owner: &str, run: DateTime<Utc>)
                -> Result<Option<ScheduleEntry>> {
                (**self).complete(id, owner, run).await
            }
            async fn abandon(&self, id: &str, owner: &str, run: DateTime<Utc>) -> Result<()> {
                (**self).abandon(id, owner, run).await
            }
        }
    };
}

forward_store!(Box);
forward_store!(std::sync::Arc);

/// The reference semantics of a claim over an in-memory entry, shared by the
/// memory store (and documenting what the Redis script does).
pub(crate) fn claim_in(
    entry: &mut ScheduleEntry,
    req: &ClaimRequest,
    now: DateTime<Utc>,
) -> ClaimOutcome {
    let until = chrono::TimeDelta::from_std(req.lease)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if let Some(p) = &mut entry.state.pending {
        if p.owner != req.owner && p.until > now {
            return ClaimOutcome::Busy(p.clone());
        }
        p.owner.clone_from(&req.owner);
        p.until = until;
        return ClaimOutcome::Won(p.clone());
    }
    if entry.state.revision != req.revision
        || entry.state.cursor != req.cursor
        || req.run <= entry.state.cursor
    {
        return ClaimOutcome::Moved(Box::new(entry.clone()));
    }
    let p = PendingRun {
        run: req.run,
        owner: req.owner.clone(),
        until,
        enqueue: req.enqueue,
    };
    entry.state.pending = Some(p.clone());
    ClaimOutcome::Won(p)
}

/// The reference semantics of complete.
pub(crate) fn complete_in(entry: &mut ScheduleEntry, owner: &str, run: DateTime<Utc>) -> bool {
    match &entry.state.pending {
        Some(p) if p.owner == owner && p.run == run => {
            if p.enqueue {
                entry.state.last_enqueued = Some(run);
            }
            entry.state.cursor = entry.state.cursor.max(run);
            entry.state.pending = None;
            true
        }
        _ => false,
    }
}

/// The reference semantics of upsert over an existing entry.
pub(crate) fn upsert_in(
    existing: Option<&mut ScheduleEntry>,
    def: &ScheduleDef,
    now: DateTime<Utc>,
) -> (Upserted, Option<ScheduleEntry>) {
    let now = super::clock::truncate_ms(now);
    match existing {
        None => (
            Upserted::Created,
            Some(ScheduleEntry {
                def: def.clone(),
                state: ScheduleState::new(1, now),
            }),
        ),
        Some(e) if e.def == *def => (Upserted::Unchanged, None),
        Some(e) if e.def.every.timing_key() == def.every.timing_key() => {
            e.def = def.clone();
            (Upserted::Updated, None)
        }
        Some(e) => {
            e.def = def.clone();
            let cursor = e.state.cursor.max(now);
            e.state = ScheduleState {
                cursor,
                last_enqueued: e.state.last_enqueued,
                ..ScheduleState::new(e.state.revision.saturating_add(1), now)
            };
            (Upserted::Rescheduled, None)
        }
    }
}

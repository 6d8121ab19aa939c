//! [`MemoryJobStore`]: job records and events in this process.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::flow::{
    release_message, ChildOutcome, FlowChildren, FlowRecord, OnChildFailure, Release,
};
use super::types::{JobEvent, JobRecord, JobState, JobUpdate, Keep, StoredCounts};
use super::{JobEvents, JobStore, DEFAULT_MAX_PER_STATE};
use crate::error::{Error, ErrorKind, Result};

/// Events a slow subscriber may fall behind by before it misses some.
const EVENT_CAPACITY: usize = 1024;

/// Job records and lifecycle events of one queue, in this process: for
/// `memory://` queues, tests, and any backend when only this process needs them.
///
/// Cheap to clone (clones share the records). [`named`](MemoryJobStore::named)
/// gives every caller in the process the same store for a queue name, as
/// `memory://NAME` does for queues. Events go out by broadcast; a subscriber more
/// than 1024 events behind gets an `Err` saying how many it missed, then the newer
/// ones. Age retention runs on tokio's clock (so a paused test clock drives it);
/// record times are the system clock.
#[derive(Clone, Debug)]
pub struct MemoryJobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    queue: String,
    max_per_state: u64,
    state: Mutex<State>,
    events: broadcast::Sender<JobEvent>,
}

#[derive(Debug, Default)]
struct State {
    jobs: HashMap<String, Entry>,
    /// Per state (index of `JobState::ALL`): (update sequence, id), oldest first.
    by_state: [BTreeSet<(u64, String)>; 5],
    /// (expiry, id) of records kept for an age.
    expiries: BTreeSet<(Instant, String)>,
    seq: u64,
    /// Flows not yet released, by parent id; `flow_order` (creation sequence, id)
    /// bounds them like a state.
    flows: HashMap<String, FlowData>,
    flow_order: BTreeSet<(u64, String)>,
}

#[derive(Debug)]
struct FlowData {
    record: FlowRecord,
    seq: u64,
    outcomes: FlowChildren,
    released: bool,
}

impl FlowData {
    /// Record `child`'s outcome and decide about the parent.
    fn child_done(&mut self, child: &str, outcome: ChildOutcome) -> Release {
        if !self.record.children.iter().any(|c| c == child) {
            return Release::Wait;
        }
        let policy = self.record.on_child_failure;
        let failed_now = match outcome {
            ChildOutcome::Completed(result) => {
                self.outcomes.failed.remove(child);
                self.outcomes
                    .results
                    .insert(child.to_string(), result.unwrap_or_default());
                None
            }
            ChildOutcome::Failed(reason) => {
                if self.outcomes.results.contains_key(child) {
                    // It completed once: a later failure of a rerun does not undo that.
                    None
                } else {
                    self.outcomes
                        .failed
                        .insert(child.to_string(), reason.clone());
                    Some(reason)
                }
            }
        };
        if let (Some(reason), OnChildFailure::FailParent) = (&failed_now, policy) {
            return Release::Failed {
                reason: format!("child {child} failed: {reason}"),
            };
        }
        let done = self.record.children.iter().all(|c| {
            self.outcomes.results.contains_key(c)
                || (policy != OnChildFailure::FailParent && self.outcomes.failed.contains_key(c))
        });
        let continue_now = failed_now.is_some() && policy == OnChildFailure::Continue;
        if done || continue_now {
            self.released = true;
            return Release::Send {
                queue: self.record.parent_queue.clone(),
                message: release_message(
                    self.record.message.clone(),
                    &self.record.parent,
                    &self.outcomes,
                ),
            };
        }
        Release::Wait
    }
}

#[derive(Debug)]
struct Entry {
    record: JobRecord,
    seq: u64,
    expires: Option<Instant>,
}

fn index(state: JobState) -> usize {
    match state {
        JobState::Waiting => 0,
        JobState::Active => 1,
        JobState::Completed => 2,
        JobState::Failed => 3,
        JobState::DeadLettered => 4,
    }
}

impl State {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.jobs.remove(id)?;
        self.by_state[index(entry.record.state)].remove(&(entry.seq, id.to_string()));
        if let Some(at) = entry.expires {
            self.expiries.remove(&(at, id.to_string()));
        }
        Some(entry)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, id)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            self.remove(&id);
        }
    }

    /// Drop the oldest records of `state` beyond `max`.
    fn trim(&mut self, state: JobState, max: u64) {
        let set = &self.by_state[index(state)];
        let over = (set.len() as u64).saturating_sub(max);
        let oldest: Vec<String> = set
            .iter()
            .take(usize::try_from(over).unwrap_or(usize::MAX))
            .map(|(_, id)| id.clone())
            .collect();
        for id in oldest {
            self.remove(&id);
        }
    }
}

fn registry() -> &'static Mutex<HashMap<String, MemoryJobStore>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, MemoryJobStore>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

impl MemoryJobStore {
    /// A new, empty store for `queue`, capping each state at
    /// [`DEFAULT_MAX_PER_STATE`] records.
    pub fn new(queue: impl Into<String>) -> Self {
        Self::with_max_per_state(queue, DEFAULT_MAX_PER_STATE)
    }

    /// A new store keeping at most `max` records per state (at least 1).
    pub fn with_max_per_state(queue: impl Into<String>, max: u64) -> Self {
        MemoryJobStore {
            inner: Arc::new(Inner {
                queue: queue.into(),
                max_per_state: max.max(1),
                state: Mutex::default(),
                events: broadcast::channel(EVENT_CAPACITY).0,
            }),
        }
    }

    /// The process-wide store of `queue`: the same records and events for every
    /// caller (what `ferrymq::connect_jobs("memory://NAME")` returns).
    pub fn named(queue: &str) -> Self {
        let mut registry = registry().lock().unwrap_or_else(|e| e.into_inner());
        registry
            .entry(queue.to_string())
            .or_insert_with(|| MemoryJobStore::new(queue))
            .clone()
    }

    /// The per-state cap.
    pub fn max_per_state(&self) -> u64 {
        self.inner.max_per_state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: JobEvent) {
        // No subscriber is not an error.
        let _ = self.inner.events.send(event);
    }
}

#[async_trait]
impl JobStore for MemoryJobStore {
    fn queue(&self) -> &str {
        &self.inner.queue
    }

    async fn record(&self, update: JobUpdate) -> Result<()> {
        let now = Instant::now();
        {
            let mut state = self.lock();
            state.expire(now);
            if let Some(entry) = state.jobs.get(&update.id) {
                if update.only_if_new || update.is_stale(entry.record.attempts) {
                    return Ok(());
                }
            }
            let old = state.remove(&update.id);
            if !update.drops_record() {
                let mut record = match old {
                    Some(entry) => entry.record,
                    None => JobRecord::new(
                        &update.id,
                        update.state,
                        update.created_at.unwrap_or(update.at),
                    ),
                };
                record.apply(&update);
                state.seq += 1;
                let seq = state.seq;
                let expires = match update.keep {
                    Keep::Age(age) if update.state.is_finished() => {
                        Some(crate::time::deadline_after(now, age))
                    }
                    _ => None,
                };
                if let Some(at) = expires {
                    state.expiries.insert((at, update.id.clone()));
                }
                state.by_state[index(update.state)].insert((seq, update.id.clone()));
                state.jobs.insert(
                    update.id.clone(),
                    Entry {
                        record,
                        seq,
                        expires,
                    },
                );
                if let Keep::Count(n) = update.keep {
                    if update.state.is_finished() {
                        state.trim(update.state, n);
                    }
                }
                state.trim(update.state, self.inner.max_per_state);
            }
        }
        self.emit(update.event(&self.inner.queue));
        Ok(())
    }

    async fn progress(&self, id: &str, attempt: u32, value: serde_json::Value) -> Result<()> {
        {
            let mut state = self.lock();
            state.expire(Instant::now());
            if let Some(entry) = state.jobs.get_mut(id) {
                entry.record.progress = Some(value.clone());
                entry.record.updated_at = std::time::SystemTime::now();
            }
        }
        self.emit(JobEvent::progress(&self.inner.queue, id, attempt, value));
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        let mut state = self.lock();
        state.expire(Instant::now());
        Ok(state.jobs.get(id).map(|e| e.record.clone()))
    }

    async fn list(&self, job_state: JobState, max: usize) -> Result<Vec<JobRecord>> {
        let mut state = self.lock();
        state.expire(Instant::now());
        Ok(state.by_state[index(job_state)]
            .iter()
            .rev()
            .take(max)
            .filter_map(|(_, id)| state.jobs.get(id).map(|e| e.record.clone()))
            .collect())
    }

    async fn counts(&self) -> Result<StoredCounts> {
        let mut state = self.lock();
        state.expire(Instant::now());
        let mut counts = StoredCounts::default();
        for s in JobState::ALL {
            counts.set(s, state.by_state[index(s)].len() as u64);
        }
        Ok(counts)
    }

    async fn create_flow(&self, flow: FlowRecord) -> Result<()> {
        let mut state = self.lock();
        if state.flows.contains_key(&flow.parent) {
            return Ok(());
        }
        state.seq += 1;
        let seq = state.seq;
        state.flow_order.insert((seq, flow.parent.clone()));
        state.flows.insert(
            flow.parent.clone(),
            FlowData {
                record: flow,
                seq,
                outcomes: FlowChildren::default(),
                released: false,
            },
        );
        let over = (state.flow_order.len() as u64).saturating_sub(self.inner.max_per_state);
        for _ in 0..over {
            if let Some((_, parent)) = state.flow_order.pop_first() {
                tracing::warn!(queue = %self.inner.queue, flow = %parent, "too many pending flows: dropping the oldest");
                state.flows.remove(&parent);
            }
        }
        Ok(())
    }

    async fn child_done(
        &self,
        parent: &str,
        child: &str,
        outcome: ChildOutcome,
    ) -> Result<Release> {
        let mut state = self.lock();
        let Some(flow) = state.flows.get_mut(parent) else {
            return Ok(Release::Wait);
        };
        let release = flow.child_done(child, outcome);
        if matches!(release, Release::Failed { .. }) {
            let seq = flow.seq;
            state.flows.remove(parent);
            state.flow_order.remove(&(seq, parent.to_string()));
        }
        Ok(release)
    }

    async fn parent_sent(&self, parent: &str) -> Result<()> {
        let mut state = self.lock();
        if let Some(flow) = state.flows.remove(parent) {
            state.flow_order.remove(&(flow.seq, parent.to_string()));
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<JobEvents> {
        let rx = self.inner.events.subscribe();
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((Ok(event), rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((
                    Err(Error::new(
                        ErrorKind::Backend,
                        format!("job events: this subscriber fell behind and missed {n} events"),
                    )),
                    rx,
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })))
    }
}

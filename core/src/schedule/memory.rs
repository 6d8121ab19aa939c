//! Schedules kept in process: the reference [`ScheduleStore`], shared by name like
//! `memory://NAME` queues.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::store::{
    claim_in, complete_in, upsert_in, ClaimOutcome, ClaimRequest, ScheduleDef, ScheduleEntry,
    ScheduleStore, Upserted,
};
use crate::error::Result;

/// An in-process schedule store: every scheduler of this process holding a clone
/// (or the same [`named`](MemoryScheduleStore::named) store) shares its schedules
/// and claims. Gone when the process ends — for schedules that survive restarts,
/// use a store on a server (`ferrymq_redis::RedisScheduleStore`).
#[derive(Debug, Clone, Default)]
pub struct MemoryScheduleStore {
    inner: Arc<Mutex<BTreeMap<String, ScheduleEntry>>>,
}

impl MemoryScheduleStore {
    /// A new, empty store of its own.
    pub fn new() -> Self {
        MemoryScheduleStore::default()
    }

    /// The process-wide store named `name` (the queue's name, by convention, as
    /// `ferry schedule` and `Config::schedule_store` use it).
    pub fn named(name: &str) -> Self {
        static TABLE: OnceLock<Mutex<HashMap<String, MemoryScheduleStore>>> = OnceLock::new();
        let mut table = TABLE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        table.entry(name.to_string()).or_default().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ScheduleEntry>> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ScheduleStore for MemoryScheduleStore {
    async fn upsert(
        &self,
        def: &ScheduleDef,
        now: DateTime<Utc>,
    ) -> Result<(Upserted, ScheduleEntry)> {
        let mut map = self.lock();
        let (outcome, created) = upsert_in(map.get_mut(def.id()), def, now);
        if let Some(entry) = created {
            map.insert(def.id().to_string(), entry);
        }
        let entry = map.get(def.id()).cloned();
        Ok((outcome, entry.ok_or_else(|| gone(def.id()))?))
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        Ok(self.lock().remove(id).is_some())
    }

    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>> {
        Ok(self.lock().get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>> {
        Ok(self.lock().values().cloned().collect())
    }

    async fn claim(&self, id: &str, request: &ClaimRequest) -> Result<ClaimOutcome> {
        Ok(match self.lock().get_mut(id) {
            Some(entry) => claim_in(entry, request, request.now),
            None => ClaimOutcome::Gone,
        })
    }

    async fn complete(
        &self,
        id: &str,
        owner: &str,
        run: DateTime<Utc>,
    ) -> Result<Option<ScheduleEntry>> {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(id) else {
            return Ok(None);
        };
        Ok(complete_in(entry, owner, run).then(|| entry.clone()))
    }

    async fn abandon(&self, id: &str, owner: &str, run: DateTime<Utc>) -> Result<()> {
        if let Some(entry) = self.lock().get_mut(id) {
            if entry
                .state
                .pending
                .as_ref()
                .is_some_and(|p| p.owner == owner && p.run == run)
            {
                entry.state.pending = None;
            }
        }
        Ok(())
    }
}

fn gone(id: &str) -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::Backend,
        format!("schedule {id:?} vanished during its upsert"),
    )
}

//! Process-wide table of named queues, so a producer and a consumer that connect to
//! the same `memory://NAME` meet, like clients of one broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

use super::{queue::Queue, MemoryConfig};

fn table() -> &'static Mutex<HashMap<String, Arc<Queue>>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Arc<Queue>>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

pub(super) fn open(config: &MemoryConfig) -> Result<Arc<Queue>> {
    let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = table.get(&config.queue) {
        if existing.config != *config {
            return Err(Error::invalid_config(
                "queue",
                format!(
                    "memory queue {:?} already exists with different settings ({:?})",
                    config.queue, existing.config
                ),
            ));
        }
        return Ok(existing.clone());
    }
    let queue = Arc::new(Queue::new(config.clone()));
    table.insert(config.queue.clone(), queue.clone());
    Ok(queue)
}

/// Forget the named queue and every message in it. Producers and consumers still
/// holding it keep working on the detached queue; new connections get a fresh one.
pub fn delete_queue(name: &str) -> bool {
    table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name)
        .is_some()
}

/// The named queue, if it exists.
pub(super) fn existing(name: &str) -> Result<Arc<Queue>> {
    table()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
        .ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::NotFound,
                format!("memory queue {name:?} does not exist"),
            )
        })
}

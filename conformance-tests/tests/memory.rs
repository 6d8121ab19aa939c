//! The conformance suite against the in-memory backend. Needs no server.
//!
//! ```text
//! cargo test -p ferrymq-conformance --test memory
//! ```

use std::process::ExitCode;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_conformance::Backend;
use ferrymq_core::admin::Admin;
use ferrymq_core::memory::{delete_queue, MemoryConfig};
use ferrymq_core::{Capabilities, Consumer, Producer, Result};

/// Short, so the lease cases take about a second each.
const VISIBILITY: Duration = Duration::from_secs(1);

struct Memory {
    capabilities: Capabilities,
}

impl Memory {
    fn config(queue: &str) -> MemoryConfig {
        MemoryConfig::new(queue).visibility_timeout(VISIBILITY)
    }

    fn new() -> Result<Self> {
        // Capabilities come from the backend itself, read off a throwaway queue.
        let probe = ferrymq_conformance::unique_queue_name("capabilities-probe");
        let capabilities = Memory::config(&probe).producer()?.capabilities().clone();
        delete_queue(&probe);
        Ok(Memory { capabilities })
    }
}

#[async_trait]
impl Backend for Memory {
    fn name(&self) -> &str {
        "memory"
    }

    fn describe(&self) -> String {
        format!("in-process, visibility timeout {VISIBILITY:?}")
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn producer(&self, queue: &str) -> Result<Box<dyn Producer>> {
        Ok(Box::new(Memory::config(queue).producer()?))
    }

    async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(Memory::config(queue).consumer()?))
    }

    async fn open_bounded(
        &self,
        queue: &str,
        capacity: usize,
    ) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        let (p, c) = Memory::config(queue).capacity(capacity).connect()?;
        Ok((Box::new(p), Box::new(c)))
    }

    async fn admin(&self, queue: &str) -> Result<Box<dyn Admin>> {
        Ok(Box::new(Memory::config(queue).admin()))
    }

    async fn cleanup(&self, queue: &str) -> Result<()> {
        delete_queue(queue);
        Ok(())
    }

    fn timer_slack(&self) -> Duration {
        // In-process timers fire on time; this covers scheduling on a busy machine.
        Duration::from_millis(250)
    }
}

fn main() -> ExitCode {
    ferrymq_conformance::run(|| async { Ok(Memory::new()?) })
}

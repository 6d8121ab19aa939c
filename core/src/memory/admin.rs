//! [`Admin`] for the in-memory queue, and its [`Driver`] registration.

use std::fmt;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{capabilities, registry, MemoryConfig, MemoryConsumer, MemoryProducer};
use crate::admin::{Admin, Peeked, QueueInfo, QueueSpec};
use crate::backend::{BackendConfig, Driver};
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::producer::Producer;

/// Administration of one in-memory queue: create, describe, peek, purge, delete.
#[derive(Debug, Clone)]
pub struct MemoryAdmin {
    config: MemoryConfig,
}

impl MemoryConfig {
    /// The queue's administration.
    pub fn admin(&self) -> MemoryAdmin {
        MemoryAdmin {
            config: self.clone(),
        }
    }
}

impl MemoryAdmin {
    fn info(&self) -> Result<QueueInfo> {
        let queue = registry::existing(&self.config.queue)?;
        let depth = {
            let mut state = queue.lock();
            state.tick(Instant::now());
            state.depth()
        };
        let c = &queue.config;
        Ok(QueueInfo::new(c.queue.clone(), depth, capabilities(c))
            .setting(
                "visibility_timeout",
                humantime::format_duration(c.visibility_timeout),
            )
            .setting("capacity", c.capacity)
            .setting("max_message_size", c.max_message_size)
            .setting("dedup_window", humantime::format_duration(c.dedup_window)))
    }
}

fn no_spec_fields(spec: &QueueSpec) -> Result<()> {
    let unused = [
        ("partitions", spec.partitions.is_some()),
        ("replication", spec.replication.is_some()),
        ("fifo", spec.fifo.is_some()),
        ("retention", spec.retention.is_some()),
        ("dead_letter", spec.dead_letter.is_some()),
        ("priority_levels", spec.priority_levels.is_some()),
    ];
    match unused.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(Error::invalid_config(
            name,
            "the in-memory queue has no such setting",
        )),
        None => Ok(()),
    }
}

#[async_trait]
impl Admin for MemoryAdmin {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn queue(&self) -> &str {
        &self.config.queue
    }

    async fn create(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        no_spec_fields(spec)?;
        if registry::existing(&self.config.queue).is_ok() {
            return Err(Error::invalid_config(
                "queue",
                format!("memory queue {:?} already exists", self.config.queue),
            ));
        }
        self.ensure(spec).await
    }

    async fn ensure(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        no_spec_fields(spec)?;
        let mut config = self.config.clone();
        if let Some(v) = spec.visibility_timeout {
            config.visibility_timeout = v;
        }
        config.producer()?;
        self.info()
    }

    async fn delete(&self) -> Result<bool> {
        Ok(super::delete_queue(&self.config.queue))
    }

    async fn describe(&self) -> Result<QueueInfo> {
        self.info()
    }

    async fn purge(&self) -> Result<u64> {
        let queue = registry::existing(&self.config.queue)?;
        let mut state = queue.lock();
        state.tick(Instant::now());
        Ok(state.purge())
    }

    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        let queue = registry::existing(&self.config.queue)?;
        let mut state = queue.lock();
        state.tick(Instant::now());
        Ok(state
            .peek(max)
            .into_iter()
            .map(|(seq, at, message)| Peeked::new(seq.to_string(), Some(at), message))
            .collect())
    }
}

impl fmt::Display for MemoryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory://{}?visibility={}&capacity={}&max_message_size={}&dedup_window={}",
            self.queue,
            humantime::format_duration(self.visibility_timeout),
            self.capacity,
            self.max_message_size,
            humantime::format_duration(self.dedup_window)
        )
    }
}

#[async_trait]
impl BackendConfig for MemoryConfig {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn queue(&self) -> &str {
        &self.queue
    }

    fn with_queue(&self, queue: &str) -> Result<Box<dyn BackendConfig>> {
        let mut config = self.clone();
        config.queue = queue.to_string();
        // The same checks as a URL: a name that could not be written as
        // memory://NAME is refused here too.
        MemoryConfig::from_url(&format!("memory://{queue}"))?;
        Ok(Box::new(config))
    }

    fn identity(&self) -> String {
        format!("memory:{}", self.queue)
    }

    fn to_value(&self, _expose_secrets: bool) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    fn clone_box(&self) -> Box<dyn BackendConfig> {
        Box::new(self.clone())
    }

    async fn producer(&self) -> Result<Box<dyn Producer>> {
        Ok(Box::new(MemoryConfig::producer(self)?) as Box<dyn Producer>)
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(MemoryConfig::consumer(self)?) as Box<dyn Consumer>)
    }

    async fn connect(&self) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        let (p, c): (MemoryProducer, MemoryConsumer) = MemoryConfig::connect(self)?;
        Ok((Box::new(p), Box::new(c)))
    }

    async fn admin(&self) -> Result<Box<dyn Admin>> {
        Ok(Box::new(MemoryConfig::admin(self)))
    }

    /// The process-wide [`MemoryScheduleStore`](crate::schedule::MemoryScheduleStore)
    /// named after the queue.
    async fn schedule_store(&self) -> Result<Box<dyn crate::schedule::ScheduleStore>> {
        Ok(Box::new(crate::schedule::MemoryScheduleStore::named(
            &self.queue,
        )))
    }
}

/// The in-memory backend's registration: `memory://NAME`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryDriver;

impl Driver for MemoryDriver {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["memory"]
    }

    fn parse_url(&self, url: &str) -> Result<Box<dyn BackendConfig>> {
        Ok(Box::new(MemoryConfig::from_url(url)?))
    }

    fn parse_value(&self, value: serde_json::Value) -> Result<Box<dyn BackendConfig>> {
        let config: MemoryConfig = serde_json::from_value(value)
            .map_err(|e| Error::invalid_config("memory", e.to_string()))?;
        config.validate()?;
        Ok(Box::new(config))
    }
}

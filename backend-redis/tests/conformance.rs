//! The conformance suite (`ferrymq-conformance`) against a real redis-server, in
//! three setups: `redis` (plain queues), `redis-ordered` (`ordered=true`: per-key
//! order, `Ordering::PerKey`, so the per-key cases apply there) and `redis-cluster`
//! (plain queues on a 3-master Redis Cluster, `cluster=true`: redis-rs' cluster
//! client; each case's queues hash to slots spread over the masters).
//!
//! ```text
//! scripts/redis.sh start 6399
//! scripts/redis-cluster.sh start 7000          # masters 7000-7002
//! FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399 \
//! FERRYMQ_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:7000 \
//!     cargo test -p ferrymq-redis --test conformance
//! cargo test -p ferrymq-redis --test conformance -- redis-ordered::   # one setup
//! ```
//!
//! Each case gets fresh, uniquely named queues, deleted afterwards; the visibility
//! timeout is 2 s so the lease cases take a few seconds each.
//!
//! What this backend can do is read off its own capabilities, and the harness probes
//! the rest (lease deadlines on deliveries, admin operations): cases for features the
//! backend does not have yet are reported by name as not applicable, and apply by
//! themselves once the backend gains them (`release_keeps_attempt`, a lease deadline
//! via `AckHandle::with_lease`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_conformance::{require_env, run_setups, Backend, Setup};
use ferrymq_core::middleware::DedupStore;
use ferrymq_core::{Admin, Capabilities, Consumer, Producer, Result};
use ferrymq_redis::RedisConfig;

const VISIBILITY: &str = "2s";

struct Redis {
    /// `redis://host:port[/db]`, without a queue.
    base: String,
    /// Extra URL parameters of this setup (`&ordered=true`).
    extra: &'static str,
    capabilities: Capabilities,
    shown: String,
}

impl Redis {
    fn config(&self, queue: &str) -> Result<RedisConfig> {
        RedisConfig::from_url(&format!(
            "{}/{queue}?visibility={VISIBILITY}{}",
            self.base, self.extra
        ))
    }

    async fn connect(url: &str, extra: &'static str) -> Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        let mut redis = Redis {
            base,
            extra,
            capabilities: Capabilities::minimal("redis"),
            shown: String::new(),
        };
        // Capabilities come from the backend itself, read off a throwaway queue.
        let probe = redis.config(&ferrymq_conformance::unique_queue_name(
            "capabilities-probe",
        ))?;
        redis.capabilities = probe.producer().await?.capabilities().clone();
        probe.delete_queue().await?;
        redis.shown = probe.to_string();
        Ok(redis)
    }
}

#[async_trait]
impl Backend for Redis {
    fn name(&self) -> &str {
        "redis"
    }

    fn describe(&self) -> String {
        format!("{}, visibility timeout {VISIBILITY}", self.shown)
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn producer(&self, queue: &str) -> Result<Box<dyn Producer>> {
        Ok(Box::new(self.config(queue)?.producer().await?))
    }

    async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(self.config(queue)?.consumer().await?))
    }

    async fn open(&self, queue: &str) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        let (p, c) = self.config(queue)?.connect().await?;
        Ok((Box::new(p), Box::new(c)))
    }

    async fn admin(&self, queue: &str) -> Result<Box<dyn Admin>> {
        Ok(Box::new(self.config(queue)?.admin().await?))
    }

    async fn dedup_store(&self, queue: &str) -> Result<Arc<dyn DedupStore>> {
        let consumer = self.config(queue)?.consumer().await?;
        Ok(Arc::new(consumer.dedup_store(Duration::from_secs(600))))
    }

    async fn cleanup(&self, queue: &str) -> Result<()> {
        self.config(queue)?.delete_queue().await.map(|_| ())
    }

    fn timer_slack(&self) -> Duration {
        // Delayed messages are promoted, and expired leases reclaimed, by the next
        // receive; an idle receive polls every 250 ms (visibility / 8, at most 250 ms).
        Duration::from_millis(500)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

fn url() -> std::result::Result<String, ferrymq_core::BoxError> {
    require_env(
        "FERRYMQ_TEST_REDIS_URL",
        "Start Redis with `scripts/redis.sh start 6399` (or `scripts/test.sh`) and set \
         FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399",
    )
}

fn cluster_url() -> std::result::Result<String, ferrymq_core::BoxError> {
    require_env(
        "FERRYMQ_TEST_REDIS_CLUSTER_URL",
        "Start a 3-master Redis Cluster with `scripts/redis-cluster.sh start 7000` (or \
         `scripts/test.sh`) and set FERRYMQ_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:7000 \
         (any node is a seed)",
    )
}

fn main() -> ExitCode {
    run_setups(vec![
        Setup::new("redis", || async { Ok(Redis::connect(&url()?, "").await?) }),
        Setup::new("redis-ordered", || async {
            Ok(Redis::connect(&url()?, "&ordered=true").await?)
        }),
        Setup::new("redis-cluster", || async {
            Ok(Redis::connect(&cluster_url()?, "&cluster=true").await?)
        }),
    ])
}

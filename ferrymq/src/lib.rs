//! # ferrymq
//!
//! One API for producing and consuming messages over AWS SQS, Apache Kafka, Redis and
//! an in-process queue, with deduplication, retry-to-DLQ, visibility extension,
//! backpressure and batching written once in [`ferrymq_core`] and proven by one
//! conformance suite against every backend.
//!
//! A service picks its backend by configuration alone:
//!
//! ```
//! use std::time::Duration;
//! use ferrymq::{Consumer, Message, Producer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq::Result<()> {
//! // memory://NAME works everywhere; redis://… etc. behind cargo features.
//! let url = std::env::var("FERRYMQ_URL").unwrap_or_else(|_| "memory://facade-doc".into());
//! let (producer, consumer) = ferrymq::connect(&url).await?;
//! producer.send(Message::new("hello")).await?;
//! for delivery in consumer.receive(10, Duration::from_secs(1)).await? {
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```

mod drivers;
pub mod redact;
mod select;

pub use drivers::drivers;
pub use ferrymq_core::*;
pub use select::{from_toml, Config};

/// Connect to the queue named by `url` and return a producer and a consumer on it.
///
/// The scheme selects the backend (see [`drivers`]): `memory://NAME` always; others
/// when their cargo feature is enabled. A malformed URL, unknown scheme, missing
/// queue name or bad parameter is [`ErrorKind::InvalidConfig`] naming the parameter;
/// a backend that exists but is not compiled in names its cargo feature.
pub async fn connect(url: &str) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
    Config::from_url(url)?.connect().await
}

/// A producer for the queue named by `url` (see [`connect`]).
pub async fn connect_producer(url: &str) -> Result<Box<dyn Producer>> {
    Config::from_url(url)?.producer().await
}

/// A consumer for the queue named by `url` (see [`connect`]).
pub async fn connect_consumer(url: &str) -> Result<Box<dyn Consumer>> {
    Config::from_url(url)?.consumer().await
}

/// The schedule store of the queue named by `url` (see
/// [`schedule`](ferrymq_core::schedule)): pair it with a producer of the same URL in a
/// [`schedule::Scheduler`].
pub async fn connect_schedule_store(url: &str) -> Result<Box<dyn schedule::ScheduleStore>> {
    Config::from_url(url)?.schedule_store().await
}

/// The administration of the queue named by `url` (see [`connect`]): create, ensure,
/// describe, purge, delete, peek, dead letters. What a backend cannot do answers
/// [`ErrorKind::Unsupported`].
pub async fn connect_admin(url: &str) -> Result<Box<dyn Admin>> {
    Config::from_url(url)?.admin().await
}

/// The [`JobStore`](jobs::JobStore) of the queue named by `url`: where its jobs'
/// states, progress and results are recorded and its lifecycle events published
/// (see [`job_store`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ferrymq::Result<()> {
/// let store = ferrymq::connect_jobs("memory://facade-jobs").await?;
/// println!("{:?}", store.counts().await?);
/// # Ok(())
/// # }
/// ```
pub async fn connect_jobs(url: &str) -> Result<Box<dyn jobs::JobStore>> {
    job_store(&Config::from_url(url)?).await
}

/// The [`JobStore`](jobs::JobStore) of `config`'s queue.
///
/// `memory://NAME` gives the process-wide
/// [`MemoryJobStore::named`](jobs::MemoryJobStore::named) of that queue;
/// `redis://…` (feature `redis`) a `ferrymq_redis::RedisJobStore` on that server,
/// shared by every process. SQS and Kafka have no store of their own
/// ([`ErrorKind::Unsupported`]): record the jobs of such a queue in a Redis store
/// named after it (`redis://host/QUEUE`), or in memory when one process is enough.
pub async fn job_store(config: &Config) -> Result<Box<dyn jobs::JobStore>> {
    match config.backend() {
        "memory" => Ok(Box::new(jobs::MemoryJobStore::named(config.queue()))),
        #[cfg(feature = "redis")]
        "redis" => {
            // The driver's own settings, secrets included, read back as its type.
            let value = config.as_backend().to_value(true);
            let redis: ferrymq_redis::RedisConfig = serde_json::from_value(value)
                .map_err(|e| Error::invalid_config("redis", e.to_string()))?;
            Ok(Box::new(
                ferrymq_redis::RedisJobStore::connect(&redis).await?,
            ))
        }
        other => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{other} has no job store of its own: record the jobs of queue {} in a \
                 redis:// (or memory://) store named after it",
                config.queue()
            ),
        )),
    }
}

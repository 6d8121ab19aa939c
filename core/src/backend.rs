//! One registration per backend: the URL schemes it answers, how it reads its own
//! URL and serde config, and how it opens producers, consumers and admins.
//!
//! The facade (`ferrymq::Config`) keeps a list of [`Driver`]s, one line per compiled
//! backend, and dispatches on the scheme **before** any URL parsing, so a backend
//! reads URLs a generic parser would reject (`kafka://h1:9092,h2:9092/orders`, an SQS
//! `https://sqs.<region>.amazonaws.com/<account>/<name>` queue URL). Adding a backend
//! is one `Driver` implementation and one line in that list.

use std::fmt;

use async_trait::async_trait;

use crate::admin::Admin;
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::producer::Producer;

/// A backend's entry point, registered once with the facade.
pub trait Driver: Send + Sync + 'static {
    /// The backend's name (`memory`, `redis`, `sqs`, `kafka`): also the `backend`
    /// tag of its serde table.
    fn name(&self) -> &'static str;

    /// The URL schemes this backend answers, without `://`.
    fn schemes(&self) -> &'static [&'static str];

    /// Whether this backend takes `url`. The default matches [`scheme_of`] against
    /// [`schemes`](Driver::schemes); the SQS driver also takes its `https://` queue
    /// URLs.
    fn accepts(&self, url: &str) -> bool {
        scheme_of(url).is_some_and(|s| self.schemes().contains(&s))
    }

    /// Read a URL this driver [`accepts`](Driver::accepts). Errors are
    /// `InvalidConfig` naming the parameter, and never echo a secret.
    fn parse_url(&self, url: &str) -> Result<Box<dyn BackendConfig>>;

    /// Read the serde table form (`backend = "<name>"` plus the backend's own
    /// fields), handed over as a JSON value with the `backend` tag removed.
    fn parse_value(&self, value: serde_json::Value) -> Result<Box<dyn BackendConfig>>;
}

/// One backend's settings for one queue: what a URL or a serde table resolved to.
///
/// `Debug` and `Display` never show a secret; `Display` is the URL with secrets
/// redacted.
#[async_trait]
pub trait BackendConfig: fmt::Debug + fmt::Display + Send + Sync {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// The queue (or topic) these settings name.
    fn queue(&self) -> &str;

    /// The same settings for another queue on the same server (the DLQ of a queue,
    /// one queue per stage of a pipeline). `InvalidConfig` when `queue` is not a
    /// valid name for this backend.
    fn with_queue(&self, queue: &str) -> Result<Box<dyn BackendConfig>>;

    /// What identifies the queue on its server, independent of how the URL was
    /// spelled (`redis://h/q` and `redis://h:6379/q` are the same queue): the
    /// backend, the resolved server address, the database, the queue. Never holds a
    /// secret.
    fn identity(&self) -> String;

    /// The settings as a serde table (what [`Driver::parse_value`] reads back), with
    /// secrets redacted unless `expose_secrets` — for a config a user asked to write
    /// out and use again.
    fn to_value(&self, expose_secrets: bool) -> serde_json::Value;

    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn BackendConfig>;

    /// Connect a producer.
    async fn producer(&self) -> Result<Box<dyn Producer>>;

    /// Connect a consumer. The queue exists when it returns, and a consumer of a
    /// group (Kafka) has joined it.
    async fn consumer(&self) -> Result<Box<dyn Consumer>>;

    /// Connect a producer and a consumer.
    async fn connect(&self) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        Ok((self.producer().await?, self.consumer().await?))
    }

    /// The queue's administration.
    async fn admin(&self) -> Result<Box<dyn Admin>>;

    /// The store of the queue's schedules (`ferry schedule`, a
    /// [`Scheduler`](crate::schedule::Scheduler)). `Unsupported` by default: a backend
    /// without a place to keep them shared says so by name.
    async fn schedule_store(&self) -> Result<Box<dyn crate::schedule::ScheduleStore>> {
        Err(Error::unsupported(format!(
            "the {} backend keeps no schedules; use a memory or redis store",
            self.backend()
        )))
    }
}

impl Clone for Box<dyn BackendConfig> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// The scheme of `url` (the text before `://`), lower-cased ASCII letters, digits,
/// `+`, `-` and `.` only; `None` when there is none. Nothing after `://` is read, so
/// a URL a generic parser would reject still finds its backend.
///
/// ```
/// use ferrymq_core::backend::scheme_of;
/// assert_eq!(scheme_of("kafka://h1:9092,h2:9092/orders"), Some("kafka"));
/// assert_eq!(scheme_of("orders"), None);
/// ```
pub fn scheme_of(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let valid = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// The driver in `drivers` that accepts `url`, or `InvalidConfig` naming the
/// scheme and, for a known backend that is not compiled in, the cargo feature.
pub fn find_driver<'a>(drivers: &[&'a dyn Driver], url: &str) -> Result<&'a dyn Driver> {
    if let Some(driver) = drivers.iter().find(|d| d.accepts(url)) {
        return Ok(*driver);
    }
    let Some(scheme) = scheme_of(url) else {
        return Err(Error::invalid_config(
            "url",
            "expected a URL like memory://NAME or redis://host:port/NAME",
        ));
    };
    let known = KNOWN_BACKENDS.iter().find(|(s, _)| *s == scheme);
    let offered: Vec<String> = drivers
        .iter()
        .flat_map(|d| d.schemes().iter().map(|s| format!("{s}://")))
        .collect();
    Err(Error::invalid_config(
        "scheme",
        match known {
            Some((_, feature)) => format!(
                "{scheme}:// needs the `{feature}` backend, which this build of ferrymq does not \
                 include (enable the cargo feature `{feature}`)"
            ),
            None => format!(
                "unknown scheme {scheme}://; this build offers {}",
                offered.join(", ")
            ),
        },
    ))
}

/// Schemes of every backend ferrymq has, compiled in or not, with their cargo
/// feature: so a missing feature is named rather than called an unknown scheme.
pub const KNOWN_BACKENDS: &[(&str, &str)] = &[
    ("memory", "memory"),
    ("redis", "redis"),
    ("rediss", "redis-tls"),
    ("kafka", "kafka"),
    ("sqs", "sqs"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_read_without_parsing_the_rest() {
        assert_eq!(scheme_of("kafka://h1:9092,h2:9092/orders"), Some("kafka"));
        assert_eq!(scheme_of("redis+tls://x"), Some("redis+tls"));
        assert_eq!(scheme_of("Redis://x"), None);
        assert_eq!(scheme_of("://x"), None);
        assert_eq!(scheme_of("no scheme"), None);
    }

    #[test]
    fn a_missing_feature_is_named() {
        let e = find_driver(&[], "kafka://h1:9092,h2:9092/orders")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cargo feature `kafka`"), "{e}");
        let e = find_driver(&[], "nats://x/y")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown scheme nats://"), "{e}");
    }
}

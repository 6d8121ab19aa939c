//! The Redis backend's registration with the facade ([`Driver`]) and its
//! [`BackendConfig`] implementation.

use async_trait::async_trait;
use ferrymq_core::admin::Admin;
use ferrymq_core::backend::{BackendConfig, Driver};
use ferrymq_core::config::with_secrets_exposed;
use ferrymq_core::{Consumer, Error, Producer, Result};

use crate::config::RedisConfig;

/// The Redis backend: `redis://[user:password@]host[:port][/db]/QUEUE?…` and
/// `rediss://…` (TLS, with the `tls` cargo feature).
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisDriver;

impl Driver for RedisDriver {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["redis", "rediss"]
    }

    fn parse_url(&self, url: &str) -> Result<Box<dyn BackendConfig>> {
        Ok(Box::new(RedisConfig::from_url(url)?))
    }

    fn parse_value(&self, value: serde_json::Value) -> Result<Box<dyn BackendConfig>> {
        // serde's message names the field; it never holds a secret's value (serde
        // reports the field and the expected type, not the input).
        let config: RedisConfig = serde_json::from_value(value)
            .map_err(|e| Error::invalid_config("redis", e.to_string()))?;
        config.validate()?;
        Ok(Box::new(config))
    }
}

#[async_trait]
impl BackendConfig for RedisConfig {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn queue(&self) -> &str {
        &self.queue
    }

    fn with_queue(&self, queue: &str) -> Result<Box<dyn BackendConfig>> {
        let mut config = self.clone();
        config.queue = queue.to_string();
        config.validate()?;
        Ok(Box::new(config))
    }

    /// `redis:<host>:<port>/<db>/<queue>`: host lower-cased, the default port and
    /// database spelled out, no credentials — `redis://H/q`, `redis://h:6379/0/q` and
    /// `redis://user:pw@h/q` name the same queue.
    fn identity(&self) -> String {
        self.identity()
    }

    fn to_value(&self, expose_secrets: bool) -> serde_json::Value {
        let value = if expose_secrets {
            with_secrets_exposed(|| serde_json::to_value(self))
        } else {
            serde_json::to_value(self)
        };
        // Serializing plain fields into a JSON value cannot fail.
        value.unwrap_or(serde_json::Value::Null)
    }

    fn clone_box(&self) -> Box<dyn BackendConfig> {
        Box::new(self.clone())
    }

    async fn producer(&self) -> Result<Box<dyn Producer>> {
        Ok(Box::new(RedisConfig::producer(self).await?))
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(RedisConfig::consumer(self).await?))
    }

    async fn connect(&self) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        let (p, c) = RedisConfig::connect(self).await?;
        Ok((Box::new(p), Box::new(c)))
    }

    async fn admin(&self) -> Result<Box<dyn Admin>> {
        Ok(Box::new(RedisConfig::admin(self).await?))
    }

    async fn schedule_store(&self) -> Result<Box<dyn ferrymq_core::schedule::ScheduleStore>> {
        Ok(Box::new(crate::RedisScheduleStore::connect(self).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_core::ErrorKind;

    #[test]
    fn identity_ignores_spelling_and_credentials() {
        let a = RedisDriver.parse_url("redis://Cache.Example/q").unwrap();
        let b = RedisDriver
            .parse_url("redis://u:hunter2@cache.example:6379/0/q?group=g")
            .unwrap();
        assert_eq!(a.identity(), "redis:cache.example:6379/0/q");
        assert_eq!(a.identity(), b.identity());
        assert!(!b.identity().contains("hunter2") && !b.identity().contains('@'));
        let c = RedisDriver
            .parse_url("redis://cache.example:6380/q")
            .unwrap();
        assert_ne!(a.identity(), c.identity());
        let d = RedisDriver.parse_url("redis://cache.example/1/q").unwrap();
        assert_ne!(a.identity(), d.identity());
    }

    #[test]
    fn values_round_trip_and_redact() {
        let cfg = RedisDriver
            .parse_url("redis://u:hunter2@h:6390/2/q?group=g&visibility=3s")
            .unwrap();
        let shown = cfg.to_value(false);
        assert!(!shown.to_string().contains("hunter2"), "{shown}");
        assert!(!format!("{cfg} {cfg:?}").contains("hunter2"));
        let exposed = cfg.to_value(true);
        assert!(exposed.to_string().contains("hunter2"));
        let back = RedisDriver.parse_value(exposed).unwrap();
        assert_eq!(back.identity(), cfg.identity());
        assert_eq!(back.to_value(true), cfg.to_value(true));
        // Outside `with_secrets_exposed` nothing leaks afterwards either.
        assert!(!cfg.to_value(false).to_string().contains("hunter2"));
    }

    #[test]
    fn driver_answers_its_schemes_and_names_bad_values() {
        assert!(RedisDriver.accepts("redis://h/q"));
        assert!(RedisDriver.accepts("rediss://h/q"));
        assert!(!RedisDriver.accepts("kafka://h/q"));
        let e = RedisDriver
            .parse_value(serde_json::json!({"queue": "q", "priority_levels": 0}))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("priority_levels"), "{e}");
        let e = RedisDriver
            .parse_value(serde_json::json!({"queue": "q", "nope": 1}))
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let other = RedisDriver.parse_url("redis://h/q").unwrap();
        let dlq = other.with_queue("q-dlq").unwrap();
        assert_eq!(dlq.queue(), "q-dlq");
        assert_eq!(
            other.with_queue("a{b").unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
    }
}

//! Backend selection by URL or by serde config, dispatched through [`drivers`].

use std::fmt;
use std::str::FromStr;

use ferrymq_core::admin::Admin;
use ferrymq_core::backend::{find_driver, BackendConfig, Driver, KNOWN_BACKENDS};
use ferrymq_core::{Consumer, Error, ErrorKind, Producer, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::drivers::drivers;
use crate::redact::Secrets;

/// Which backend and queue, and its settings: what a URL or a config table resolved
/// to, ready to connect producers, consumers and an [`Admin`].
///
/// Build it from a URL ([`Config::from_url`], also via `FromStr`), from the
/// `FERRYMQ_URL` environment variable ([`Config::from_env`]), from a backend's own
/// config type ([`Config::new`]), or deserialize it with serde — a URL string,
/// `{ url = "…" }`, or a table tagged by `backend`:
///
/// ```
/// use ferrymq::Config;
///
/// #[derive(serde::Deserialize)]
/// struct AppConfig {
///     orders: Config,
///     emails: Config,
/// }
///
/// let app: AppConfig = ferrymq::from_toml(r#"
///     orders = "memory://orders?visibility=10s"
///
///     [emails]
///     backend = "memory"
///     queue = "emails"
///     visibility_timeout = "1m"
/// "#)?;
/// assert_eq!((app.orders.backend(), app.orders.queue()), ("memory", "orders"));
/// assert_eq!(app.emails.to_value(false)["visibility_timeout"], "1m");
///
/// // The same server, another queue: the DLQ of `orders`.
/// let dlq = app.orders.with_queue("orders-dlq")?;
/// assert_eq!(dlq.to_string(), "memory://orders-dlq?visibility=10s&capacity=1000000&max_message_size=262144&dedup_window=5m");
/// # Ok::<(), ferrymq::Error>(())
/// ```
///
/// **Secrets.** `Debug`, `Display` and `Serialize` never show a password or token
/// (`***`). A config written out with `Serialize` therefore no longer
/// authenticates; to write one out for reuse, use
/// [`to_toml_exposing_secrets`](Config::to_toml_exposing_secrets) or
/// [`to_value(true)`](Config::to_value). Parse config files with
/// [`ferrymq::from_toml`](crate::from_toml) rather than `toml::from_str`: the TOML
/// parser's errors quote the offending source line, password and all, and
/// `from_toml` scrubs them.
///
/// **Why a trait object and not an enum of backends.** With an enum, every backend
/// is a variant plus an arm in every method (`connect`, `producer`, `consumer`,
/// `admin`, `backend`, `queue`, serde, ...): about nine edits per backend, each a
/// chance to forget one. Wrapping `Box<dyn BackendConfig>` reduces that to one
/// line in the driver list ([`drivers`](crate::drivers)); the cost is that a
/// caller cannot match on the backend's own config type, and reads its settings
/// through [`to_value`](Config::to_value) instead.
#[derive(Clone)]
pub struct Config {
    inner: Box<dyn BackendConfig>,
}

impl Config {
    /// Wrap a backend's own config (`MemoryConfig`, `RedisConfig`, ...).
    pub fn new(backend: impl BackendConfig + 'static) -> Self {
        Config {
            inner: Box::new(backend),
        }
    }

    /// Parse a backend URL: `memory://NAME`, `redis://host:port/NAME`, ... — see the
    /// crate docs. The scheme picks the backend **before** the rest is parsed, so
    /// each backend reads its own URLs (`kafka://h1:9092,h2:9092/orders` needs the
    /// `kafka` feature; it is not an "invalid port number"). Errors are
    /// `InvalidConfig` naming the parameter, and never echo a secret.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_url_with(drivers(), url)
    }

    pub(crate) fn from_url_with(drivers: &[&dyn Driver], url: &str) -> Result<Self> {
        let driver = resolve(drivers, url)?;
        driver.parse_url(url).map(Config::from)
    }

    /// Read the serde forms from a JSON value: a URL string, `{ "url": "…" }`, or an
    /// object tagged by `backend` with the backend's own fields.
    pub fn from_value(value: Value) -> Result<Self> {
        Self::from_value_with(drivers(), value)
    }

    fn from_value_with(drivers: &[&dyn Driver], value: Value) -> Result<Self> {
        let mut table = match value {
            Value::String(url) => return Self::from_url_with(drivers, &url),
            Value::Object(table) => table,
            _ => {
                return Err(Error::invalid_config(
                    "backend",
                    "expected a URL string, { url = \"…\" }, or a table with `backend = \"…\"`",
                ))
            }
        };
        if let Some(url) = table.remove("url") {
            if let Some(other) = table.keys().next() {
                return Err(Error::invalid_config(
                    other,
                    "a table with `url` takes no other field: put settings in the URL's \
                     query, or write a table with `backend = \"…\"` and the fields",
                ));
            }
            return match url {
                Value::String(url) => Self::from_url_with(drivers, &url),
                _ => Err(Error::invalid_config("url", "must be a string")),
            };
        }
        match table.remove("backend") {
            Some(Value::String(name)) => {
                let driver = driver_named(drivers, &name)?;
                driver.parse_value(Value::Object(table)).map(Config::from)
            }
            Some(_) => Err(Error::invalid_config(
                "backend",
                "must be a backend name such as \"memory\" or \"redis\"",
            )),
            None => Err(Error::invalid_config(
                "backend",
                format!(
                    "missing: a config table needs `backend = \"…\"` ({}) or `url = \"…\"`",
                    offered_names(drivers)
                ),
            )),
        }
    }

    /// Read the URL from the `FERRYMQ_URL` environment variable.
    pub fn from_env() -> Result<Self> {
        Self::from_env_var("FERRYMQ_URL")
    }

    /// Read the URL from the environment variable `name`.
    pub fn from_env_var(name: &str) -> Result<Self> {
        let url = std::env::var(name)
            .map_err(|_| Error::invalid_config(name, "environment variable is not set"))?;
        Self::from_url(&url)
    }

    /// The backend's name (`memory`, `redis`, ...).
    pub fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    /// The queue (or topic) this config names.
    pub fn queue(&self) -> &str {
        self.inner.queue()
    }

    /// The same settings for another queue on the same server: the DLQ of a queue,
    /// one queue per stage of a pipeline. This replaces rewriting URL text, which
    /// has to know where each backend keeps the queue name (the host of
    /// `memory://NAME`, the last path segment of `redis://h/db/NAME`, an SQS queue
    /// URL ...). `InvalidConfig` when `name` is not a valid queue name there.
    pub fn with_queue(&self, name: &str) -> Result<Config> {
        self.inner.with_queue(name).map(Config::from)
    }

    /// What identifies the queue on its server, however the URL was spelled:
    /// `redis://h/q` and `redis://h:6379/0/q` are the same queue. Never holds a
    /// secret. Compare identities (or use [`same_queue`](Config::same_queue)) to
    /// tell whether two configs name one queue.
    pub fn identity(&self) -> String {
        self.inner.identity()
    }

    /// Whether `self` and `other` name the same queue on the same server.
    pub fn same_queue(&self, other: &Config) -> bool {
        self.identity() == other.identity()
    }

    /// The settings as a table tagged by `backend` — what [`Config::from_value`]
    /// and serde read back. Secrets are `***` unless `expose_secrets`, for a config
    /// the user asked to write out and use again.
    pub fn to_value(&self, expose_secrets: bool) -> Value {
        let mut value = self.inner.to_value(expose_secrets);
        if let Value::Object(table) = &mut value {
            table.insert("backend".into(), Value::String(self.backend().into()));
        }
        value
    }

    /// The settings as a TOML table (tagged by `backend`) **with passwords and
    /// tokens in clear**, for writing a config file that can be read back and used:
    /// unlike `Serialize`, which redacts them. Keep what it returns out of logs.
    ///
    /// ```
    /// let cfg = ferrymq::Config::from_url("memory://orders?visibility=5s")?;
    /// let text = cfg.to_toml_exposing_secrets()?;
    /// let back: ferrymq::Config = ferrymq::from_toml(&text)?;
    /// assert_eq!(back, cfg);
    /// # Ok::<(), ferrymq::Error>(())
    /// ```
    pub fn to_toml_exposing_secrets(&self) -> Result<String> {
        let mut value = self.to_value(true);
        strip_nulls(&mut value);
        toml::to_string(&value).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "the {} config cannot be written as TOML: {e}",
                    self.backend()
                ),
            )
        })
    }

    /// The backend's config, as the trait object the drivers produce.
    pub fn as_backend(&self) -> &dyn BackendConfig {
        &*self.inner
    }

    /// Connect and return a producer and a consumer.
    pub async fn connect(&self) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        self.inner.connect().await
    }

    /// Connect a producer only.
    pub async fn producer(&self) -> Result<Box<dyn Producer>> {
        self.inner.producer().await
    }

    /// Connect a consumer only.
    pub async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        self.inner.consumer().await
    }

    /// The queue's administration: create, describe, purge, peek, dead letters ...
    /// Operations a backend lacks answer `Unsupported`.
    pub async fn admin(&self) -> Result<Box<dyn Admin>> {
        self.inner.admin().await
    }

    /// The store of the queue's schedules (memory: in process, by queue name;
    /// redis: beside the queue). Backends without one answer `Unsupported`.
    pub async fn schedule_store(&self) -> Result<Box<dyn crate::schedule::ScheduleStore>> {
        self.inner.schedule_store().await
    }
}

impl From<Box<dyn BackendConfig>> for Config {
    fn from(inner: Box<dyn BackendConfig>) -> Self {
        Config { inner }
    }
}

/// Redacted: the backend's `Debug`.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.inner, f)
    }
}

/// The URL, secrets redacted.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.inner, f)
    }
}

/// Same backend and same settings, secrets included.
impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.backend() == other.backend() && self.to_value(true) == other.to_value(true)
    }
}

impl FromStr for Config {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        Config::from_url(url)
    }
}

/// The tagged table with secrets as `***` (see [`Config::to_toml_exposing_secrets`])
/// and unset optional fields left out (TOML has no null).
impl Serialize for Config {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut value = self.to_value(false);
        strip_nulls(&mut value);
        value.serialize(s)
    }
}

/// A URL string, `{ url = "…" }`, or a table tagged by `backend`. Errors name the
/// parameter and never echo a secret — though the format's own error may quote the
/// source (see [`from_toml`](crate::from_toml)).
impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        let mut secrets = Secrets::new();
        secrets.add_json(&value);
        // A backend's serde message could quote a value (`invalid type: integer
        // 1234`): scrub what this config holds as secrets out of it.
        Config::from_value(value)
            .map_err(|e| serde::de::Error::custom(secrets.scrub(&e.to_string())))
    }
}

/// Deserialize a TOML document (a whole application config with [`Config`]s in it)
/// with errors that show where the problem is but never a password or token.
///
/// `toml::from_str`'s errors quote the offending source line, so a bad parameter in
/// `orders = "redis://app:hunter2@h/orders?visibility=x"` prints the password. This
/// renders the same error with every secret of the document (URL passwords,
/// secret-looking query parameters and keys) replaced by `***`.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let mut secrets = Secrets::new();
        secrets.add_toml(text);
        Error::new(ErrorKind::InvalidConfig, secrets.scrub(&e.to_string()))
    })
}

/// The driver for `url`. [`find_driver`] knows the schemes of backends that are not
/// compiled in; this adds URLs that a missing backend shares a scheme with.
fn resolve<'a>(drivers: &[&'a dyn Driver], url: &str) -> Result<&'a dyn Driver> {
    find_driver(drivers, url).map_err(|e| match missing_backend_of(url) {
        Some((what, feature)) => Error::invalid_config(
            "scheme",
            format!(
                "{what} needs the `{feature}` backend, which this build of ferrymq does not \
                 include (enable the cargo feature `{feature}`)"
            ),
        ),
        None => e,
    })
}

/// SQS queue URLs are `https://sqs.<region>.amazonaws.com/<account>/<name>`: when no
/// compiled driver took one, say that the `sqs` backend is missing rather than
/// calling `https://` an unknown scheme.
fn missing_backend_of(url: &str) -> Option<(&'static str, &'static str)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    let host = host.rsplit('@').next()?.split(':').next()?;
    let sqs = host.starts_with("sqs.")
        && (host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn"));
    sqs.then_some((
        "an SQS queue URL (https://sqs.<region>.amazonaws.com/…)",
        "sqs",
    ))
}

fn driver_named<'a>(drivers: &[&'a dyn Driver], name: &str) -> Result<&'a dyn Driver> {
    if let Some(driver) = drivers.iter().find(|d| d.name() == name) {
        return Ok(*driver);
    }
    Err(Error::invalid_config(
        "backend",
        match KNOWN_BACKENDS.iter().find(|(scheme, _)| *scheme == name) {
            Some((_, feature)) => format!(
                "backend {name:?} is not included in this build of ferrymq (enable the cargo \
                 feature `{feature}`)"
            ),
            None => format!(
                "unknown backend {name:?}; this build offers {}",
                offered_names(drivers)
            ),
        },
    ))
}

fn offered_names(drivers: &[&dyn Driver]) -> String {
    let names: Vec<String> = drivers.iter().map(|d| format!("{:?}", d.name())).collect();
    names.join(", ")
}

/// TOML has no null: drop absent optional fields so they read back as absent.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(table) => {
            table.retain(|_, v| !v.is_null());
            table.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use ferrymq_core::memory::MemoryConfig;

    /// A stand-in SQS driver, to show that dispatch happens on the URL as a whole
    /// before anything parses it: an `https://` queue URL reaches the driver that
    /// claims it.
    struct FakeSqs;

    impl Driver for FakeSqs {
        fn name(&self) -> &'static str {
            "sqs"
        }
        fn schemes(&self) -> &'static [&'static str] {
            &["sqs"]
        }
        fn accepts(&self, url: &str) -> bool {
            missing_backend_of(url).is_some()
                || ferrymq_core::backend::scheme_of(url) == Some("sqs")
        }
        fn parse_url(&self, url: &str) -> Result<Box<dyn BackendConfig>> {
            let name = url.rsplit('/').next().unwrap_or_default();
            Ok(Box::new(FakeSqsConfig(MemoryConfig::new(name))))
        }
        fn parse_value(&self, _value: Value) -> Result<Box<dyn BackendConfig>> {
            Ok(Box::new(FakeSqsConfig(MemoryConfig::new("from-table"))))
        }
    }

    #[derive(Debug, Clone)]
    struct FakeSqsConfig(MemoryConfig);

    impl fmt::Display for FakeSqsConfig {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "sqs://{}", self.0.queue)
        }
    }

    #[async_trait]
    impl BackendConfig for FakeSqsConfig {
        fn backend(&self) -> &'static str {
            "sqs"
        }
        fn queue(&self) -> &str {
            &self.0.queue
        }
        fn with_queue(&self, queue: &str) -> Result<Box<dyn BackendConfig>> {
            Ok(Box::new(FakeSqsConfig(MemoryConfig::new(queue))))
        }
        fn identity(&self) -> String {
            format!("sqs:{}", self.0.queue)
        }
        fn to_value(&self, _expose_secrets: bool) -> Value {
            serde_json::json!({ "queue": self.0.queue })
        }
        fn clone_box(&self) -> Box<dyn BackendConfig> {
            Box::new(self.clone())
        }
        async fn producer(&self) -> Result<Box<dyn Producer>> {
            Err(Error::unsupported("fake"))
        }
        async fn consumer(&self) -> Result<Box<dyn Consumer>> {
            Err(Error::unsupported("fake"))
        }
        async fn admin(&self) -> Result<Box<dyn Admin>> {
            Err(Error::unsupported("fake"))
        }
    }

    const SQS_URL: &str = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders";

    #[test]
    fn an_sqs_queue_url_reaches_the_sqs_driver() {
        let drivers: [&dyn Driver; 2] = [&ferrymq_core::memory::MemoryDriver, &FakeSqs];
        let cfg = Config::from_url_with(&drivers, SQS_URL).unwrap();
        assert_eq!((cfg.backend(), cfg.queue()), ("sqs", "orders"));
        let cfg = Config::from_value_with(&drivers, serde_json::json!({"backend": "sqs"})).unwrap();
        assert_eq!(cfg.queue(), "from-table");
    }

    #[test]
    fn an_sqs_queue_url_without_the_driver_names_the_feature() {
        let err =
            Config::from_url_with(&[&ferrymq_core::memory::MemoryDriver], SQS_URL).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("cargo feature `sqs`"), "{err}");
        let err = Config::from_url_with(&[], "https://example.com/q").unwrap_err();
        assert!(err.to_string().contains("unknown scheme https://"), "{err}");
    }
}

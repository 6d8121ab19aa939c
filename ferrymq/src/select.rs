//! Backend selection by URL or by serde config.

use std::str::FromStr;

use ferrymq_core::config::parse_url;
use ferrymq_core::memory::MemoryConfig;
use ferrymq_core::{Consumer, Error, Producer, Result};
use serde::{Deserialize, Serialize};

/// Which backend, and its settings.
///
/// Build it from a URL ([`Config::from_url`], also via `FromStr`), from the
/// `FERRYMQ_URL` environment variable ([`Config::from_env`]), or deserialize it with
/// serde — either a URL string or a table tagged by `backend`:
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
/// let app: AppConfig = toml::from_str(r#"
///     orders = "memory://orders?visibility=10s"
///
///     [emails]
///     backend = "memory"
///     queue = "emails"
///     visibility_timeout = "1m"
/// "#).unwrap();
/// assert!(matches!(app.orders, Config::Memory(ref m) if m.queue == "orders"));
/// ```
///
/// `Debug`, `Display` and serialization never show passwords or tokens.
// A config is built once at startup; boxing the larger variants would only make
// matching on them clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", try_from = "Repr")]
#[non_exhaustive]
pub enum Config {
    /// The in-process queue (`memory://NAME`).
    Memory(MemoryConfig),
    /// Redis Streams (`redis://[user:pass@]host:port[/db]/QUEUE?...`, `rediss://`).
    #[cfg(feature = "redis")]
    Redis(ferrymq_redis::RedisConfig),
}

/// The accepted serde shapes: a URL string, `{ url = "…" }`, or a tagged table.
#[allow(clippy::large_enum_variant)]
#[derive(Deserialize)]
#[serde(untagged)]
enum Repr {
    Url(String),
    UrlTable { url: String },
    Tagged(Tagged),
}

#[allow(clippy::large_enum_variant)]
#[derive(Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
enum Tagged {
    Memory(MemoryConfig),
    #[cfg(feature = "redis")]
    Redis(ferrymq_redis::RedisConfig),
}

impl TryFrom<Repr> for Config {
    type Error = Error;

    fn try_from(repr: Repr) -> Result<Self> {
        match repr {
            Repr::Url(url) | Repr::UrlTable { url } => Config::from_url(&url),
            Repr::Tagged(Tagged::Memory(m)) => Ok(Config::Memory(m)),
            #[cfg(feature = "redis")]
            Repr::Tagged(Tagged::Redis(r)) => Ok(Config::Redis(r)),
        }
    }
}

/// Schemes of backends that exist in ferrymq but may not be compiled into this build.
const KNOWN_SCHEMES: &[(&str, &str)] = &[
    ("redis", "redis"),
    ("rediss", "redis"),
    ("kafka", "kafka"),
    ("sqs", "sqs"),
];

impl Config {
    /// Parse a backend URL. See the crate docs for the schemes.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = parse_url(url)?;
        match parsed.scheme() {
            "memory" => MemoryConfig::from_url(url).map(Config::Memory),
            #[cfg(feature = "redis")]
            "redis" | "rediss" => ferrymq_redis::RedisConfig::from_url(url).map(Config::Redis),
            other => match KNOWN_SCHEMES.iter().find(|(s, _)| *s == other) {
                // Only reached when the backend's feature is off.
                Some((_, feature)) => Err(Error::invalid_config(
                    "scheme",
                    format!(
                        "{other}:// needs the `{feature}` backend, which this build of ferrymq does not include (enable the cargo feature `{feature}`)"
                    ),
                )),
                None => Err(Error::invalid_config(
                    "scheme",
                    format!("unknown scheme {other}://; expected memory://, redis://, kafka:// or sqs://"),
                )),
            },
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
        match self {
            Config::Memory(_) => "memory",
            #[cfg(feature = "redis")]
            Config::Redis(_) => "redis",
        }
    }

    /// Connect and return a producer and a consumer.
    pub async fn connect(&self) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        match self {
            Config::Memory(m) => {
                let (p, c) = m.connect()?;
                Ok((Box::new(p), Box::new(c)))
            }
            #[cfg(feature = "redis")]
            Config::Redis(r) => {
                let (p, c) = r.connect().await?;
                Ok((Box::new(p), Box::new(c)))
            }
        }
    }

    /// Connect a producer only.
    pub async fn producer(&self) -> Result<Box<dyn Producer>> {
        match self {
            Config::Memory(m) => Ok(Box::new(m.producer()?)),
            #[cfg(feature = "redis")]
            Config::Redis(r) => Ok(Box::new(r.producer().await?)),
        }
    }

    /// Connect a consumer only.
    pub async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        match self {
            Config::Memory(m) => Ok(Box::new(m.consumer()?)),
            #[cfg(feature = "redis")]
            Config::Redis(r) => Ok(Box::new(r.consumer().await?)),
        }
    }
}

impl FromStr for Config {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        Config::from_url(url)
    }
}

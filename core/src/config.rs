//! Helpers every backend uses to read its URL: typed query parameters that name
//! themselves in errors, durations, and secrets that never print.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

use crate::error::{Error, Result};

/// A password or token. `Debug` and `Display` print `***`; the value is only reachable
/// through [`Secret::expose`], so it cannot end up in logs by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for handing to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl Serialize for Secret {
    /// Serializes redacted, so a config dumped for diagnostics leaks nothing — except
    /// inside [`with_secrets_exposed`], for a config the user asked to write out and
    /// use again.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if EXPOSE_SECRETS.with(std::cell::Cell::get) {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str("***")
        }
    }
}

thread_local! {
    static EXPOSE_SECRETS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` (a serialization) with every [`Secret`] serialized as its real value.
/// Everywhere else a secret serializes as `***`. Serialization is synchronous, so the
/// flag (thread-local) covers exactly the serializer calls made inside `f`.
///
/// ```
/// use ferrymq_core::config::{with_secrets_exposed, Secret};
/// let s = Secret::new("hunter2");
/// assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
/// let exposed = with_secrets_exposed(|| serde_json::to_string(&s)).unwrap();
/// assert_eq!(exposed, "\"hunter2\"");
/// ```
pub fn with_secrets_exposed<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            EXPOSE_SECRETS.with(|e| e.set(self.0));
        }
    }
    let _reset = Reset(EXPOSE_SECRETS.with(|e| e.replace(true)));
    f()
}

/// Whether a parameter called `name` holds a secret, by pattern rather than by a
/// fixed list, so every backend's secrets are covered (`password`, `sasl.password`,
/// `ssl.key.password`, `aws_secret_access_key`, `session_token`, `sasl.oauthbearer.client.secret` ...).
pub fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "private",
        "key.pem",
        "api_key",
        "apikey",
        "access_key",
        "signature",
    ]
    .iter()
    .any(|pattern| name.contains(pattern))
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Cannot fail: the URL already has a password, so it can hold one.
        let _ = shown.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = shown
        .query_pairs()
        .map(|(k, v)| {
            let secretish = is_secret_param(&k);
            (
                k.into_owned(),
                if secretish {
                    "***".into()
                } else {
                    v.into_owned()
                },
            )
        })
        .collect();
    if !pairs.is_empty() {
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

/// Parse a URL, mapping failures to `InvalidConfig` without echoing secrets.
pub fn parse_url(raw: &str) -> Result<Url> {
    Url::parse(raw).map_err(|e| Error::invalid_config("url", format!("not a valid URL: {e}")))
}

/// Parse `30s`, `500ms`, `5m`, `1h 30m` (humantime), or a bare number of seconds.
pub fn parse_duration(param: &str, value: &str) -> Result<Duration> {
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(value).map_err(|e| {
        Error::invalid_config(
            param,
            format!("{value:?} is not a duration like 30s or 500ms ({e})"),
        )
    })
}

/// The query parameters of a config URL, consumed one by one so that a parameter the
/// backend does not know is reported instead of silently ignored.
#[derive(Debug)]
pub struct QueryParams {
    params: BTreeMap<String, String>,
}

impl QueryParams {
    /// Read the query of `url`. A parameter given twice is an error.
    pub fn from_url(url: &Url) -> Result<Self> {
        let mut params = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            if params.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Error::invalid_config(&k, "given more than once"));
            }
        }
        Ok(QueryParams { params })
    }

    /// Take a raw string parameter.
    pub fn take_str(&mut self, name: &str) -> Option<String> {
        self.params.remove(name)
    }

    /// Take and parse a parameter with `FromStr`.
    pub fn take<T>(&mut self, name: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.params.remove(name) {
            None => Ok(None),
            Some(raw) => raw
                .parse::<T>()
                .map(Some)
                .map_err(|e| Error::invalid_config(name, format!("{raw:?}: {e}"))),
        }
    }

    /// Take a duration parameter (see [`parse_duration`]).
    pub fn take_duration(&mut self, name: &str) -> Result<Option<Duration>> {
        match self.params.remove(name) {
            None => Ok(None),
            Some(raw) => parse_duration(name, &raw).map(Some),
        }
    }

    /// Take a boolean parameter (`true`/`false`/`1`/`0`/`yes`/`no`).
    pub fn take_bool(&mut self, name: &str) -> Result<Option<bool>> {
        match self.params.remove(name).as_deref() {
            None => Ok(None),
            Some("true" | "1" | "yes") => Ok(Some(true)),
            Some("false" | "0" | "no") => Ok(Some(false)),
            Some(other) => Err(Error::invalid_config(
                name,
                format!("{other:?} is not a boolean (true/false)"),
            )),
        }
    }

    /// Fail on the first parameter nobody took.
    pub fn finish(self) -> Result<()> {
        match self.params.into_keys().next() {
            None => Ok(()),
            Some(name) => Err(Error::invalid_config(&name, "unknown parameter")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn redacts_password_and_token_params() {
        let url = Url::parse("redis://user:hunter2@h:1/q?token=abc&group=g").unwrap();
        let shown = redact_url(&url);
        assert!(
            !shown.contains("hunter2") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(shown.contains("group=g"));
        let url = Url::parse(
            "kafka://h:1/t?rdkafka.sasl.password=p1&rdkafka.ssl.key.password=p2&aws_secret_access_key=p3&session_token=p4",
        )
        .unwrap();
        let shown = redact_url(&url);
        for secret in ["p1", "p2", "p3", "p4"] {
            assert!(!shown.contains(&format!("={secret}")), "{shown}");
        }
    }

    #[test]
    fn params_are_typed_and_named() {
        let url = Url::parse("memory://q?visibility=30s&capacity=abc&extra=1").unwrap();
        let mut p = QueryParams::from_url(&url).unwrap();
        assert_eq!(
            p.take_duration("visibility").unwrap(),
            Some(Duration::from_secs(30))
        );
        let err = p.take::<usize>("capacity").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("capacity"));
        let err = p.finish().unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("d", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("d", "7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("d", "soon").is_err());
    }
}

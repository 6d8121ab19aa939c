//! The message model shared by every backend.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};

/// Longest header name accepted, in bytes (SQS message attribute limit).
pub const MAX_HEADER_NAME_LEN: usize = 256;

/// Header name prefix reserved for ferrymq's own bookkeeping (dead-letter reason,
/// origin, attempt counts). Users may read these headers but not send them.
pub const RESERVED_HEADER_PREFIX: &str = "ferrymq-";

/// Ordered string headers.
///
/// Order is kept as inserted, because some brokers (Kafka) keep it and users notice
/// when it changes. Names are case-sensitive and unique: [`Headers::insert`] replaces.
///
/// Names and values are validated on send (see [`Headers::validate`]) against the
/// strictest backend, so that switching backend never turns a working message into a
/// rejected one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// Set `name` to `value`, replacing an existing entry in place.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Remove `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let pos = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(pos).1)
    }

    /// Entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the headers add to a message (names plus values).
    pub fn encoded_len(&self) -> usize {
        self.entries.iter().map(|(n, v)| n.len() + v.len()).sum()
    }

    /// Check every name and value.
    ///
    /// Names: 1..=256 bytes of ASCII letters, digits, `-`, `_`, `.`, not starting with
    /// `aws.` or `amazon.` (SQS's attribute-name rule, the strictest of the backends).
    /// Values: any Unicode except control characters other than tab, CR and LF
    /// (the character set SQS and XML accept).
    pub fn validate(&self) -> Result<()> {
        for (name, value) in &self.entries {
            validate_header_name(name)?;
            validate_header_value(name, value)?;
        }
        Ok(())
    }
}

fn validate_header_name(name: &str) -> Result<()> {
    let invalid = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidMessage,
            format!("header name {name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return invalid("must not be empty");
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return invalid("longer than 256 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return invalid("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("aws.") || lower.starts_with("amazon.") {
        return invalid("the prefixes `aws.` and `amazon.` are reserved");
    }
    Ok(())
}

fn validate_header_value(name: &str, value: &str) -> Result<()> {
    match value
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'))
    {
        Some(c) => Err(Error::new(
            ErrorKind::InvalidMessage,
            format!("header {name:?}: value contains control character {c:?}"),
        )),
        None => Ok(()),
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (k, v) in iter {
            headers.insert(k, v);
        }
        headers
    }
}

/// A message to send: payload, headers and delivery options.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::Message;
///
/// let msg = Message::new("hello")
///     .header("event-type", "order-placed")
///     .key("order-42")
///     .dedup_id("order-42-placed")
///     .delay(Duration::from_secs(5))
///     .priority(10);
/// assert_eq!(msg.payload().as_ref(), b"hello");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    payload: Bytes,
    headers: Headers,
    key: Option<String>,
    dedup_id: Option<String>,
    delay: Option<Duration>,
    priority: Option<i32>,
}

impl Message {
    /// A message with this payload and no options.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// A message whose payload is `value` serialized as JSON, with
    /// `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)?;
        Ok(Message::new(body).header("content-type", "application/json"))
    }

    /// Add or replace a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Replace all headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Ordering key: SQS FIFO message group, Kafka record key, per-key lane elsewhere.
    /// Messages with the same key are delivered in send order, one at a time, on
    /// backends whose capabilities claim [`Ordering::PerKey`](crate::Ordering::PerKey).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Deduplication id: a second send with the same id inside the backend's dedup
    /// window is accepted and dropped.
    pub fn dedup_id(mut self, id: impl Into<String>) -> Self {
        self.dedup_id = Some(id.into());
        self
    }

    /// Do not deliver before this much time has passed.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Priority: among ready messages, higher is delivered first.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Mutable headers, for middleware that annotates a message.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The ordering key.
    pub fn get_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The deduplication id.
    pub fn get_dedup_id(&self) -> Option<&str> {
        self.dedup_id.as_deref()
    }

    /// Remove the deduplication id, returning it (the dead-letter copy of a message
    /// carries it in a header instead).
    pub fn take_dedup_id(&mut self) -> Option<String> {
        self.dedup_id.take()
    }

    /// The requested delay.
    pub fn get_delay(&self) -> Option<Duration> {
        self.delay
    }

    /// The priority.
    pub fn get_priority(&self) -> Option<i32> {
        self.priority
    }

    /// Clear the delay (used when a delayed message becomes due).
    pub fn clear_delay(&mut self) {
        self.delay = None;
    }

    /// Size counted against a backend's maximum: payload plus header names and values.
    pub fn encoded_len(&self) -> usize {
        self.payload.len() + self.headers.encoded_len()
    }

    /// Decode the payload as JSON.
    pub fn decode_json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!("payload is not the expected JSON: {e}"),
            )
            .with_source(e)
        })
    }

    /// Validate the message for a backend allowing `max_size` bytes: headers must be
    /// valid and [`encoded_len`](Message::encoded_len) at most `max_size`.
    /// Backends call this before sending anything.
    pub fn validate(&self, max_size: usize) -> Result<()> {
        self.headers.validate()?;
        if let Some(name) = self
            .headers
            .iter()
            .map(|(n, _)| n)
            .find(|n| n.starts_with(RESERVED_HEADER_PREFIX) && !is_known_reserved(n))
        {
            return Err(Error::new(
                ErrorKind::InvalidMessage,
                format!("header name {name:?}: the `ferrymq-` prefix is reserved"),
            ));
        }
        let len = self.encoded_len();
        if len > max_size {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("message is {len} bytes, the maximum is {max_size}"),
            ));
        }
        Ok(())
    }
}

/// Headers under the reserved prefix that ferrymq's middleware writes. They may be
/// sent (a dead-letter queue re-publishes them on redrive), others may not.
pub mod reserved {
    /// Why the message was dead-lettered.
    pub const FAILURE_REASON: &str = "ferrymq-failure-reason";
    /// The queue it was first consumed from.
    pub const ORIGIN_QUEUE: &str = "ferrymq-origin-queue";
    /// How many attempts were made.
    pub const ATTEMPTS: &str = "ferrymq-attempts";
    /// When the first failure happened (RFC 3339).
    pub const FIRST_FAILURE_AT: &str = "ferrymq-first-failure-at";
    /// When it was dead-lettered (RFC 3339).
    pub const DEAD_LETTERED_AT: &str = "ferrymq-dead-lettered-at";
    /// The backend message id in the origin queue.
    pub const ORIGIN_MESSAGE_ID: &str = "ferrymq-origin-message-id";
    /// Attempt counter carried by backends that count attempts in a header.
    pub const ATTEMPT: &str = "ferrymq-attempt";
    /// The message's own dedup id, moved here when it is dead-lettered: the DLQ copy
    /// is sent without a dedup id, so that the DLQ's dedup window can never drop it
    /// (a message redriven and dead-lettered again within the window would otherwise
    /// be acked at the source and dropped by the DLQ). A redrive puts it back with
    /// [`restore_origin_dedup_id`](crate::middleware::retry::restore_origin_dedup_id).
    pub const ORIGIN_DEDUP_ID: &str = "ferrymq-origin-dedup-id";
    /// The job id a [`JobStore`](crate::jobs::JobStore) records the message under
    /// (set with [`JobMessage::job_id`](crate::jobs::JobMessage::job_id)).
    pub const JOB_ID: &str = "ferrymq-job-id";
    /// This message's retention once completed (`none`, a count, or an age such as
    /// `1h`), overriding the queue's; see [`Keep`](crate::jobs::Keep).
    pub const KEEP_COMPLETED: &str = "ferrymq-keep-completed";
    /// This message's retention once failed or dead-lettered, like
    /// [`KEEP_COMPLETED`].
    pub const KEEP_FAILED: &str = "ferrymq-keep-failed";
    /// On a flow's child: the job id of its parent (see [`Flow`](crate::jobs::Flow)).
    pub const FLOW_PARENT: &str = "ferrymq-flow-parent";
    /// On a flow's parent: its children's results, as JSON (read with
    /// [`jobs::children`](crate::jobs::children)).
    pub const FLOW_CHILDREN: &str = "ferrymq-flow-children";

    /// All reserved names ferrymq itself writes.
    pub const ALL: &[&str] = &[
        FAILURE_REASON,
        ORIGIN_QUEUE,
        ATTEMPTS,
        FIRST_FAILURE_AT,
        DEAD_LETTERED_AT,
        ORIGIN_MESSAGE_ID,
        ATTEMPT,
        ORIGIN_DEDUP_ID,
        JOB_ID,
        KEEP_COMPLETED,
        KEEP_FAILED,
        FLOW_PARENT,
        FLOW_CHILDREN,
    ];
}

fn is_known_reserved(name: &str) -> bool {
    reserved::ALL.contains(&name) || crate::schedule::RESERVED_HEADERS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_order_and_replace_in_place() {
        let mut h = Headers::new();
        h.insert("b", "1");
        h.insert("a", "2");
        h.insert("b", "3");
        let v: Vec<_> = h.iter().collect();
        assert_eq!(v, vec![("b", "3"), ("a", "2")]);
        assert_eq!(h.remove("b").as_deref(), Some("3"));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn header_validation() {
        assert!(Message::new("x")
            .header("ok-name_1.2", "ünïcødé ✓ \t\n")
            .validate(1024)
            .is_ok());
        for bad in ["", "has space", "colon:", "aws.thing", "Amazon.x", "é"] {
            let err = Message::new("x")
                .header(bad, "v")
                .validate(1024)
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidMessage, "{bad:?}");
        }
        let err = Message::new("x")
            .header("n", "nul\0")
            .validate(1024)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidMessage);
        let long = "n".repeat(257);
        assert!(Message::new("x").header(long, "v").validate(1024).is_err());
    }

    #[test]
    fn reserved_prefix_only_for_known_names() {
        assert!(Message::new("x")
            .header(reserved::FAILURE_REASON, "boom")
            .validate(1024)
            .is_ok());
        let err = Message::new("x")
            .header("ferrymq-made-up", "v")
            .validate(1024)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidMessage);
    }

    #[test]
    fn size_counts_payload_and_headers() {
        let m = Message::new(vec![0u8; 10]).header("abc", "defg");
        assert_eq!(m.encoded_len(), 17);
        assert!(m.validate(17).is_ok());
        assert_eq!(m.validate(16).unwrap_err().kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn json_round_trip() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Order {
            id: u64,
        }
        let m = Message::json(&Order { id: 7 }).unwrap();
        assert_eq!(m.headers().get("content-type"), Some("application/json"));
        assert_eq!(m.decode_json::<Order>().unwrap(), Order { id: 7 });
        assert_eq!(
            Message::new("nope")
                .decode_json::<Order>()
                .unwrap_err()
                .kind(),
            ErrorKind::Decode
        );
    }
}

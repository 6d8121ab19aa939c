//! How a message is laid out in a stream entry.
//!
//! Every part is its own binary-safe field, so payloads, keys and dedup ids need no
//! escaping at all. The headers share one field `h`, length-prefixed as
//! `<len>:<name><len>:<value>` repeated (lengths in bytes, decimal), which keeps their
//! order, survives any byte in a value, and still reads well in `redis-cli`:
//! `h` = `12:content-type16:application/json`.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrymq_core::{Headers, Message};
use redis::{Cmd, Value};

/// Append `message`'s fields (`p`, `h`, `k`, `d`, `r`) to an `XADD` (or a script
/// call taking field/value pairs). `scratch` is reused for the header encoding.
pub(crate) fn push_fields(cmd: &mut Cmd, message: &Message, scratch: &mut Vec<u8>) {
    cmd.arg("p").arg(message.payload().as_ref());
    if !message.headers().is_empty() {
        scratch.clear();
        encode_headers(message.headers(), scratch);
        cmd.arg("h").arg(scratch.as_slice());
    }
    if let Some(key) = message.get_key() {
        cmd.arg("k").arg(key);
    }
    if let Some(id) = message.get_dedup_id() {
        cmd.arg("d").arg(id);
    }
    if let Some(p) = message.get_priority() {
        cmd.arg("r").arg(p);
    }
}

pub(crate) fn encode_headers(headers: &Headers, out: &mut Vec<u8>) {
    for (name, value) in headers.iter() {
        for part in [name, value] {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{}:", part.len());
            out.extend_from_slice(part.as_bytes());
        }
    }
}

/// Parse the `h` field. Malformed input (not written by ferrymq) keeps what parsed
/// and reports the rest as lost, never failing the delivery.
pub(crate) fn decode_headers(mut raw: &[u8]) -> (Headers, bool) {
    let mut headers = Headers::new();
    let take = |raw: &mut &[u8]| -> Option<String> {
        let colon = raw.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&raw[..colon]).ok()?.parse().ok()?;
        let rest = &raw[colon + 1..];
        if rest.len() < len {
            return None;
        }
        let s = String::from_utf8_lossy(&rest[..len]).into_owned();
        *raw = &rest[len..];
        Some(s)
    };
    while !raw.is_empty() {
        let Some(name) = take(&mut raw) else {
            return (headers, false);
        };
        let Some(value) = take(&mut raw) else {
            return (headers, false);
        };
        headers.insert(name, value);
    }
    (headers, true)
}

/// A message read back from a stream entry, with the bookkeeping fields.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) message: Message,
    /// `i`: the id the message had when first enqueued (absent on first delivery).
    pub(crate) stable_id: Option<String>,
    /// `t`: first enqueue time in ms (absent: take it from the stream id).
    pub(crate) enqueued_ms: Option<u64>,
    /// `a`: deliveries before this stream entry existed.
    pub(crate) prior: u32,
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// Decode the field/value array of a stream entry. Unknown fields are ignored, so
/// newer writers stay readable.
pub(crate) fn decode_fields(fields: Value) -> Decoded {
    let items = match fields {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    };
    let mut payload = Bytes::new();
    let mut headers = Headers::new();
    let mut key = None;
    let mut dedup = None;
    let mut priority = None;
    let mut stable_id = None;
    let mut enqueued_ms = None;
    let mut prior = 0;
    let mut it = items.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        let name = match &name {
            Value::BulkString(b) => b.as_slice(),
            Value::SimpleString(s) => s.as_bytes(),
            _ => continue,
        };
        match name {
            b"p" => payload = bytes(value).map(Bytes::from).unwrap_or_default(),
            b"h" => {
                if let Some(raw) = bytes(value) {
                    let (h, complete) = decode_headers(&raw);
                    if !complete {
                        tracing::warn!("ferrymq-redis: a stream entry has malformed headers; kept the readable ones");
                    }
                    headers = h;
                }
            }
            b"k" => key = text(value),
            b"d" => dedup = text(value),
            b"r" => priority = text(value).and_then(|s| s.parse().ok()),
            b"i" => stable_id = text(value),
            b"t" => enqueued_ms = text(value).and_then(|s| s.parse().ok()),
            b"a" => prior = text(value).and_then(|s| s.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    let mut message = Message::new(payload).with_headers(headers);
    if let Some(k) = key {
        message = message.key(k);
    }
    if let Some(d) = dedup {
        message = message.dedup_id(d);
    }
    if let Some(p) = priority {
        message = message.priority(p);
    }
    Decoded {
        message,
        stable_id,
        enqueued_ms,
        prior,
    }
}

/// Milliseconds part of a stream id (`1700000000000-3` -> 1700000000000).
pub(crate) fn stream_id_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_any_bytes() {
        let h: Headers = [
            ("content-type", "application/json"),
            ("weird", "12:3:x\n\r\t:é😀"),
            ("empty", ""),
        ]
        .into_iter()
        .collect();
        let mut buf = Vec::new();
        encode_headers(&h, &mut buf);
        assert!(buf.starts_with(b"12:content-type16:application/json"));
        let (back, complete) = decode_headers(&buf);
        assert!(complete);
        assert_eq!(back, h);
    }

    #[test]
    fn malformed_headers_keep_what_parsed() {
        let (h, complete) = decode_headers(b"1:a1:b9:truncated");
        assert!(!complete);
        assert_eq!(h.get("a"), Some("b"));
    }

    #[test]
    fn stream_id_ms_parses() {
        assert_eq!(stream_id_ms("1700000000000-3"), 1_700_000_000_000);
        assert_eq!(stream_id_ms("junk"), 0);
    }
}

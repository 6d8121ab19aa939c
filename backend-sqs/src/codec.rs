//! How a ferrymq [`Message`] travels as an SQS message, and back.
//!
//! SQS bodies must be non-empty text of XML characters, a message carries at most 10
//! message attributes, attribute values cannot be empty, attribute names allow fewer
//! forms than ferrymq header names, and SQS hands attributes back as an unordered
//! map. The encoding therefore has two layers, chosen per part of the message:
//!
//! - **Body.** A payload that is non-empty UTF-8 of XML characters (no CR, which XML
//!   line-end handling may rewrite) is the SQS body as it is. Anything else (empty,
//!   binary, control characters) goes raw into the Binary attribute `ferrymq-body`,
//!   and the body is a short placeholder naming that attribute.
//! - **Headers.** Headers that fit as plain String attributes — every name a valid SQS
//!   attribute name, every value non-empty XML text without CR, and few enough for
//!   the 10-attribute budget left by the other attributes — are one String attribute
//!   each. SQS returns attributes unordered: plain headers come back sorted by name,
//!   so when the sent order is not sorted, the String attribute `ferrymq-order` lists
//!   the names in order (comma-separated; names cannot contain commas). Otherwise all
//!   headers go, in order, into the Binary attribute `ferrymq-headers`: a version
//!   byte `1`, then per header a LEB128 length and the name's UTF-8 bytes, a LEB128
//!   length and the value's UTF-8 bytes.
//! - **Key.** On a FIFO queue the key is the `MessageGroupId` when it is a valid one
//!   (1–128 printable ASCII characters, not starting with `ferrymq:`); any other key
//!   is hashed into the group id (`ferrymq:k:<sha256 hex>`, so one key is still one
//!   group) and carried in the attribute `ferrymq-key`. A keyless FIFO message gets a
//!   group of its own (`ferrymq:<random>`): one shared default group would serialise
//!   every keyless message. On a standard queue the key is the attribute `ferrymq-key`.
//! - **Dedup id.** On a FIFO queue it is the `MessageDeduplicationId` when valid (same
//!   rule), else its hash (`ferrymq:d:<sha256 hex>`) plus the attribute
//!   `ferrymq-dedup`; a message without one gets a unique id (`ferrymq:u:<random>`),
//!   so a queue with content-based deduplication does not drop distinct messages with
//!   equal bodies. On a standard queue the id is the attribute `ferrymq-dedup` (for
//!   the Dedup middleware; SQS does not deduplicate standard queues).
//!   `ferrymq-key` and `ferrymq-dedup` are String attributes when the text allows,
//!   else Binary with a leading zero byte (a Binary value cannot be empty either).
//!
//! So a simple message — UTF-8 text, up to 10 plain headers in name order (9 when
//! another order must be recorded), no key on a standard queue — is a plain body
//! with String attributes, readable by any SQS client. Reading is the inverse, and
//! messages from other SQS clients read naturally: the body is the payload, String
//! and Number attributes are headers (sorted by name), and a foreign Binary
//! attribute becomes a header holding its base64 text.
//!
//! Size: SQS counts the body plus, per attribute, the name, the data type and the
//! value. [`Encoded::size`] counts the same, and the producer refuses an encoded
//! message above the queue's `MaximumMessageSize` with `TooLarge` before sending.
//! `MessageGroupId` and `MessageDeduplicationId` are parameters, not counted.

use std::collections::HashMap;
use std::fmt::Write as _;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use bytes::Bytes;
use ferrymq_core::{Error, ErrorKind, Headers, Message, Result};
use sha2::{Digest, Sha256};

/// Binary attribute holding a payload the body cannot carry.
pub const ATTR_BODY: &str = "ferrymq-body";
/// Binary attribute holding every header, framed, in order.
pub const ATTR_HEADERS: &str = "ferrymq-headers";
/// String attribute listing plain header names in send order.
pub const ATTR_ORDER: &str = "ferrymq-order";
/// The key, where no group id carries it.
pub const ATTR_KEY: &str = "ferrymq-key";
/// The dedup id, where no deduplication id carries it.
pub const ATTR_DEDUP: &str = "ferrymq-dedup";

/// The body of a message whose payload is in [`ATTR_BODY`].
pub const PLACEHOLDER_BODY: &str = "(ferrymq: the payload is in message attribute ferrymq-body)";

/// The attribute names of the codec itself (never headers).
const CODEC_ATTRIBUTES: [&str; 5] = [ATTR_BODY, ATTR_HEADERS, ATTR_ORDER, ATTR_KEY, ATTR_DEDUP];

/// SQS: at most this many message attributes.
pub const MAX_ATTRIBUTES: usize = 10;

/// Bytes kept free of a queue's `MaximumMessageSize` for the codec (placeholder body,
/// codec attribute names and types, header framing), so that a message of
/// `max_message_size` by [`Message::encoded_len`] always fits, whatever its bytes
/// and for up to about a hundred headers.
pub const ENCODING_RESERVE: usize = 1024;

/// Prefix of group and deduplication ids ferrymq makes up; a user id with it is
/// hashed, so reading one back is never ambiguous.
const OWN_ID_PREFIX: &str = "ferrymq:";

const FRAME_VERSION: u8 = 1;

/// A message ready for `SendMessage` / a `SendMessageBatch` entry.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The SQS body.
    pub body: String,
    /// Message attributes.
    pub attributes: HashMap<String, MessageAttributeValue>,
    /// FIFO: the message group.
    pub group_id: Option<String>,
    /// FIFO: the deduplication id.
    pub dedup_id: Option<String>,
    /// Standard queues: `DelaySeconds`.
    pub delay_seconds: Option<i32>,
    /// Size as SQS counts it: body plus attribute names, types and values.
    pub size: usize,
}

/// Whether `c` is a character SQS accepts in a body or attribute value
/// (`#x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF`).
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// Text SQS carries unchanged: non-empty, XML characters, no CR.
fn is_plain_text(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| is_xml_char(c) && c != '\r')
}

/// A name SQS takes as a message attribute name, and not one of the codec's.
fn is_plain_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() < 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !CODEC_ATTRIBUTES.contains(&name)
}

/// A valid `MessageGroupId` / `MessageDeduplicationId` of the user's (1–128
/// printable ASCII characters, not our own prefix).
fn is_valid_fifo_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && !id.starts_with(OWN_ID_PREFIX)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn built(
    result: std::result::Result<MessageAttributeValue, aws_sdk_sqs::error::BuildError>,
) -> Result<MessageAttributeValue> {
    result.map_err(|e| Error::backend("building an SQS message attribute", e))
}

fn string_attr(value: &str) -> Result<MessageAttributeValue> {
    built(
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build(),
    )
}

fn binary_attr(value: Vec<u8>) -> Result<MessageAttributeValue> {
    built(
        MessageAttributeValue::builder()
            .data_type("Binary")
            .binary_value(Blob::new(value))
            .build(),
    )
}

/// Text as a String attribute when SQS carries it unchanged, else Binary with a
/// leading zero byte (so never empty).
fn text_attr(value: &str) -> Result<MessageAttributeValue> {
    if is_plain_text(value) {
        string_attr(value)
    } else {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.push(0);
        bytes.extend_from_slice(value.as_bytes());
        binary_attr(bytes)
    }
}

fn read_text_attr(name: &str, value: &MessageAttributeValue) -> Result<String> {
    if let Some(s) = value.string_value() {
        return Ok(s.to_string());
    }
    match value.binary_value() {
        Some(blob) => {
            let bytes = blob.as_ref();
            let text = bytes.get(1..).unwrap_or_default();
            String::from_utf8(text.to_vec()).map_err(|_| {
                Error::new(
                    ErrorKind::Decode,
                    format!("message attribute {name} is not UTF-8"),
                )
            })
        }
        None => Err(Error::new(
            ErrorKind::Decode,
            format!("message attribute {name} has no value"),
        )),
    }
}

fn attr_size(name: &str, value: &MessageAttributeValue) -> usize {
    name.len()
        + value.data_type().len()
        + value.string_value().map_or(0, str::len)
        + value.binary_value().map_or(0, |b| b.as_ref().len())
}

fn write_leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb128(bytes: &[u8], pos: &mut usize) -> Option<usize> {
    let mut n: usize = 0;
    let mut shift = 0u32;
    loop {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        let part = usize::from(byte & 0x7f).checked_shl(shift)?;
        n |= part;
        if byte & 0x80 == 0 {
            return Some(n);
        }
        shift += 7;
        if shift >= usize::BITS {
            return None;
        }
    }
}

/// Headers framed in order (see the module docs).
pub fn frame_headers(headers: &Headers) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + headers.encoded_len() + 4 * headers.len());
    out.push(FRAME_VERSION);
    for (name, value) in headers.iter() {
        write_leb128(&mut out, name.len());
        out.extend_from_slice(name.as_bytes());
        write_leb128(&mut out, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The inverse of [`frame_headers`].
pub fn unframe_headers(bytes: &[u8]) -> Result<Headers> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Decode,
            format!("message attribute {ATTR_HEADERS} is malformed: {why}"),
        )
    };
    match bytes.first() {
        Some(&FRAME_VERSION) => {}
        Some(v) => return Err(bad(&format!("unknown version {v}"))),
        None => return Err(bad("empty")),
    }
    let mut pos = 1;
    let mut headers = Headers::new();
    let take = |pos: &mut usize| -> Result<String> {
        let len = read_leb128(bytes, pos).ok_or_else(|| bad("bad length"))?;
        let end = pos.checked_add(len).ok_or_else(|| bad("bad length"))?;
        let slice = bytes.get(*pos..end).ok_or_else(|| bad("truncated"))?;
        *pos = end;
        String::from_utf8(slice.to_vec()).map_err(|_| bad("not UTF-8"))
    };
    while pos < bytes.len() {
        let name = take(&mut pos)?;
        let value = take(&mut pos)?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Encode `message` for a FIFO or a standard queue. The message was validated
/// (headers, reserved names, size by `encoded_len`) and its delay checked against
/// the queue's capabilities.
pub fn encode(message: &Message, fifo: bool) -> Result<Encoded> {
    let mut attributes: HashMap<String, MessageAttributeValue> = HashMap::new();
    let mut group_id = None;
    let mut dedup_id = None;

    if fifo {
        group_id = Some(match message.get_key() {
            None => format!("{OWN_ID_PREFIX}{}", random_hex()),
            Some(key) if is_valid_fifo_id(key) => key.to_string(),
            Some(key) => {
                attributes.insert(ATTR_KEY.into(), text_attr(key)?);
                format!("{OWN_ID_PREFIX}k:{}", sha256_hex(key.as_bytes()))
            }
        });
        dedup_id = Some(match message.get_dedup_id() {
            None => format!("{OWN_ID_PREFIX}u:{}", random_hex()),
            Some(id) if is_valid_fifo_id(id) => id.to_string(),
            Some(id) => {
                attributes.insert(ATTR_DEDUP.into(), text_attr(id)?);
                format!("{OWN_ID_PREFIX}d:{}", sha256_hex(id.as_bytes()))
            }
        });
    } else {
        if let Some(key) = message.get_key() {
            attributes.insert(ATTR_KEY.into(), text_attr(key)?);
        }
        if let Some(id) = message.get_dedup_id() {
            attributes.insert(ATTR_DEDUP.into(), text_attr(id)?);
        }
    }

    let payload = message.payload();
    let body = match std::str::from_utf8(payload) {
        Ok(text) if is_plain_text(text) => text.to_string(),
        _ => {
            attributes.insert(ATTR_BODY.into(), binary_attr(payload.to_vec())?);
            PLACEHOLDER_BODY.to_string()
        }
    };

    let headers = message.headers();
    if !headers.is_empty() {
        let names: Vec<&str> = headers.iter().map(|(n, _)| n).collect();
        let sorted = names.windows(2).all(|w| w[0] < w[1]);
        let budget = MAX_ATTRIBUTES.saturating_sub(attributes.len() + usize::from(!sorted));
        let plain = headers.len() <= budget
            && headers
                .iter()
                .all(|(n, v)| is_plain_attribute_name(n) && is_plain_text(v));
        if plain {
            for (name, value) in headers.iter() {
                attributes.insert(name.to_string(), string_attr(value)?);
            }
            if !sorted {
                attributes.insert(ATTR_ORDER.into(), string_attr(&names.join(","))?);
            }
        } else {
            attributes.insert(ATTR_HEADERS.into(), binary_attr(frame_headers(headers))?);
        }
    }

    let delay_seconds = if fifo {
        None
    } else {
        message
            .get_delay()
            .filter(|d| !d.is_zero())
            .map(crate::config::whole_seconds)
    };
    let size = body.len()
        + attributes
            .iter()
            .map(|(n, v)| attr_size(n, v))
            .sum::<usize>();
    Ok(Encoded {
        body,
        attributes,
        group_id,
        dedup_id,
        delay_seconds,
        size,
    })
}

/// Rebuild the ferrymq message from a received SQS message's parts.
pub fn decode(
    body: Option<&str>,
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
    system: Option<&HashMap<MessageSystemAttributeName, String>>,
    fifo: bool,
) -> Result<Message> {
    let empty = HashMap::new();
    let attributes = attributes.unwrap_or(&empty);
    let payload: Bytes = match attributes.get(ATTR_BODY).and_then(|v| v.binary_value()) {
        Some(blob) => Bytes::copy_from_slice(blob.as_ref()),
        None => Bytes::copy_from_slice(body.unwrap_or_default().as_bytes()),
    };

    let headers = match attributes.get(ATTR_HEADERS).and_then(|v| v.binary_value()) {
        Some(blob) => unframe_headers(blob.as_ref())?,
        None => plain_headers(attributes),
    };

    let system_attr = |name: MessageSystemAttributeName| system.and_then(|s| s.get(&name));
    let key = match attributes.get(ATTR_KEY) {
        Some(v) => Some(read_text_attr(ATTR_KEY, v)?),
        None if fifo => system_attr(MessageSystemAttributeName::MessageGroupId)
            .filter(|g| !g.starts_with(OWN_ID_PREFIX))
            .cloned(),
        None => None,
    };
    let dedup = match attributes.get(ATTR_DEDUP) {
        Some(v) => Some(read_text_attr(ATTR_DEDUP, v)?),
        None if fifo => system_attr(MessageSystemAttributeName::MessageDeduplicationId)
            .filter(|d| !d.starts_with(OWN_ID_PREFIX))
            .cloned(),
        None => None,
    };

    let mut message = Message::new(payload).with_headers(headers);
    if let Some(key) = key {
        message = message.key(key);
    }
    if let Some(dedup) = dedup {
        message = message.dedup_id(dedup);
    }
    Ok(message)
}

/// Headers from plain attributes: every attribute but the codec's, sorted by name
/// (or in the order `ferrymq-order` records).
fn plain_headers(attributes: &HashMap<String, MessageAttributeValue>) -> Headers {
    let mut plain: Vec<(&str, String)> = attributes
        .iter()
        .filter(|(name, _)| !CODEC_ATTRIBUTES.contains(&name.as_str()))
        .map(|(name, value)| {
            let text = match (value.string_value(), value.binary_value()) {
                (Some(s), _) => s.to_string(),
                (None, Some(b)) => aws_smithy_types::base64::encode(b.as_ref()),
                (None, None) => String::new(),
            };
            (name.as_str(), text)
        })
        .collect();
    plain.sort_by(|a, b| a.0.cmp(b.0));
    if let Some(order) = attributes.get(ATTR_ORDER).and_then(|v| v.string_value()) {
        let rank: HashMap<&str, usize> =
            order.split(',').enumerate().map(|(i, n)| (n, i)).collect();
        plain.sort_by_key(|(name, _)| rank.get(name).copied().unwrap_or(usize::MAX));
    }
    plain.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: &Message, fifo: bool) -> (Message, Encoded) {
        let encoded = encode(message, fifo).unwrap();
        let mut system = HashMap::new();
        if let Some(g) = &encoded.group_id {
            system.insert(MessageSystemAttributeName::MessageGroupId, g.clone());
        }
        if let Some(d) = &encoded.dedup_id {
            system.insert(
                MessageSystemAttributeName::MessageDeduplicationId,
                d.clone(),
            );
        }
        let back = decode(
            Some(&encoded.body),
            Some(&encoded.attributes),
            Some(&system),
            fifo,
        )
        .unwrap();
        (back, encoded)
    }

    fn without_delay(m: &Message) -> Message {
        let mut m = m.clone();
        m.clear_delay();
        m
    }

    #[test]
    fn simple_messages_stay_plain() {
        let m = Message::new("hello")
            .header("content-type", "text/plain")
            .header("event", "greeting");
        let (back, enc) = round_trip(&m, false);
        assert_eq!(back, m);
        assert_eq!(enc.body, "hello");
        assert_eq!(enc.attributes.len(), 2);
        assert_eq!(
            enc.attributes["event"].string_value(),
            Some("greeting"),
            "plain String attribute"
        );
        assert!(enc.group_id.is_none() && enc.dedup_id.is_none());
    }

    #[test]
    fn unsorted_plain_headers_keep_their_order() {
        let m = Message::new("x").header("b", "1").header("a", "2");
        let (back, enc) = round_trip(&m, false);
        assert_eq!(
            back.headers().iter().collect::<Vec<_>>(),
            vec![("b", "1"), ("a", "2")]
        );
        assert_eq!(enc.attributes[ATTR_ORDER].string_value(), Some("b,a"));
        assert!(!enc.attributes.contains_key(ATTR_HEADERS));
    }

    #[test]
    fn awkward_payloads_and_headers_round_trip() {
        let all: Vec<u8> = (0..=255u8).collect();
        let many: Headers = (0..16)
            .map(|i| (format!("h{i:02}"), format!("ü{i}")))
            .collect();
        let cases = vec![
            Message::new(Vec::new()),
            Message::new(all),
            Message::new("nul \0 inside"),
            Message::new("cr\r\nlf"),
            Message::new("\u{FFFE} not xml"),
            Message::new("x").with_headers(many),
            Message::new("x").header("empty", ""),
            Message::new("x").header("dots..twice", "v"),
            Message::new("x").header(".leading", "v"),
            Message::new("x").header("ws", "tab\there\r\n"),
        ];
        for m in cases {
            for fifo in [false, true] {
                let (back, enc) = round_trip(&m, fifo);
                assert_eq!(back, m, "fifo={fifo}");
                assert!(!enc.body.is_empty());
                assert!(enc.attributes.len() <= MAX_ATTRIBUTES);
                assert!(enc.body.chars().all(is_xml_char));
            }
        }
    }

    #[test]
    fn keys_and_dedup_ids() {
        // Valid ids go native on FIFO.
        let m = Message::new("x").key("order-7").dedup_id("d-1");
        let (back, enc) = round_trip(&m, true);
        assert_eq!(back, m);
        assert_eq!(enc.group_id.as_deref(), Some("order-7"));
        assert_eq!(enc.dedup_id.as_deref(), Some("d-1"));
        assert!(enc.attributes.is_empty());
        // Invalid ones are hashed, deterministically, and carried.
        let long = "k".repeat(200);
        for key in ["ünïcødé", "has space", long.as_str(), "", "ferrymq:sneaky"] {
            let m = Message::new("x").key(key).dedup_id(key);
            let (back, enc) = round_trip(&m, true);
            assert_eq!(back, m, "{key:?}");
            let g = enc.group_id.unwrap();
            assert!(g.starts_with("ferrymq:k:") && g.len() <= 128, "{g}");
            assert_eq!(
                Some(g),
                encode(&m, true).unwrap().group_id,
                "same key, same group"
            );
            assert!(enc.dedup_id.unwrap().len() <= 128);
        }
        // Keyless FIFO messages get groups of their own, and no key back.
        let m = Message::new("x");
        let (back, a) = round_trip(&m, true);
        assert_eq!(back.get_key(), None);
        assert_eq!(back.get_dedup_id(), None);
        let b = encode(&m, true).unwrap();
        assert_ne!(a.group_id, b.group_id);
        assert_ne!(a.dedup_id, b.dedup_id);
        // Standard queues carry key and dedup id as attributes.
        let m = Message::new("x").key("k").dedup_id("d");
        let (back, enc) = round_trip(&m, false);
        assert_eq!(back, m);
        assert!(enc.group_id.is_none());
    }

    #[test]
    fn budget_of_ten_attributes() {
        let ten: Headers = (0..10)
            .map(|i| (format!("h{i}"), "v".to_string()))
            .collect();
        let (_, enc) = round_trip(&Message::new("x").with_headers(ten.clone()), false);
        assert_eq!(enc.attributes.len(), 10);
        assert!(!enc.attributes.contains_key(ATTR_HEADERS));
        // With a key attribute there is room for nine only: all go framed.
        let m = Message::new("x").with_headers(ten).key("k");
        let (back, enc) = round_trip(&m, false);
        assert_eq!(back, m);
        assert_eq!(enc.attributes.len(), 2);
    }

    #[test]
    fn size_counts_like_sqs() {
        let m = Message::new(vec![0u8; 100]).header("h", "v");
        let enc = encode(&m, false).unwrap();
        // body + ferrymq-body/Binary/100 + h/String/v
        assert_eq!(
            enc.size,
            PLACEHOLDER_BODY.len() + ATTR_BODY.len() + 6 + 100 + 1 + 6 + 1
        );
        assert!(
            ENCODING_RESERVE > PLACEHOLDER_BODY.len() + ATTR_BODY.len() + ATTR_HEADERS.len() + 12
        );
    }

    #[test]
    fn delay_is_rounded_up_on_standard_queues_only() {
        let m = Message::new("x").delay(std::time::Duration::from_millis(1500));
        assert_eq!(encode(&m, false).unwrap().delay_seconds, Some(2));
        assert_eq!(encode(&m, true).unwrap().delay_seconds, None);
        assert_eq!(without_delay(&m).get_delay(), None);
    }

    #[test]
    fn foreign_messages_read_naturally() {
        let mut attrs = HashMap::new();
        attrs.insert("b".to_string(), string_attr("2").unwrap());
        attrs.insert("a".to_string(), string_attr("1").unwrap());
        attrs.insert("bin".to_string(), binary_attr(vec![1, 2, 3]).unwrap());
        let m = decode(Some("plain"), Some(&attrs), None, false).unwrap();
        assert_eq!(m.payload().as_ref(), b"plain");
        assert_eq!(
            m.headers().iter().collect::<Vec<_>>(),
            vec![("a", "1"), ("b", "2"), ("bin", "AQID")]
        );
    }

    #[test]
    fn malformed_frames_are_decode_errors() {
        for bad in [
            &[][..],
            &[9],
            &[1, 5, b'a'],
            &[
                1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ] {
            assert_eq!(unframe_headers(bad).unwrap_err().kind(), ErrorKind::Decode);
        }
        assert!(unframe_headers(&[1]).unwrap().is_empty());
    }
}

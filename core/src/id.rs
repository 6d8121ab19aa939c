//! [`MessageId`]: a backend's id of a message, cheap to make, clone and drop.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// Longest id kept inline, in bytes: every decimal `u64`, Redis stream ids
/// (`1733077860000-12`) and Kafka `partition/offset` fit; SQS's 36-byte UUIDs do not.
const INLINE: usize = 22;

/// The id a backend gave a message ([`DeliveryMeta::id`](crate::DeliveryMeta::id)):
/// a string, compared, hashed, printed and serialized as one.
///
/// Why not a `String`: an id is made for every delivery and copied into every event
/// and dead-letter header. Short ids (up to 22 bytes: sequence numbers, Redis
/// stream ids, Kafka `partition/offset`) are stored inline with no allocation, and
/// longer ones (SQS UUIDs) behind a shared reference count, so a clone never
/// allocates either.
///
/// ```
/// use ferrymq_core::MessageId;
///
/// let id = MessageId::from("1733077860000-0");
/// assert_eq!(id, "1733077860000-0");
/// assert_eq!(id.as_str().len(), 15);
/// assert!(id.starts_with("1733")); // `Deref<Target = str>`
/// let long = MessageId::from(String::from("5fea7756-0ea4-451a-a703-a558b933e274"));
/// let copy = long.clone(); // a reference count, no copy of the bytes
/// assert_eq!(copy.to_string(), "5fea7756-0ea4-451a-a703-a558b933e274");
/// assert_eq!(MessageId::from(42u64), "42");
/// ```
#[derive(Clone)]
pub struct MessageId(Repr);

#[derive(Clone)]
enum Repr {
    /// `bytes[..len]` is the id (a whole `str` cut at a length it was measured at,
    /// so always UTF-8).
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Shared(Arc<str>),
}

impl MessageId {
    /// The empty id.
    pub const fn empty() -> Self {
        MessageId(Repr::Inline {
            len: 0,
            bytes: [0; INLINE],
        })
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            Repr::Shared(s) => s,
        }
    }

    fn inline(s: &str) -> Option<Self> {
        let len = u8::try_from(s.len())
            .ok()
            .filter(|&n| usize::from(n) <= INLINE)?;
        let mut bytes = [0; INLINE];
        bytes.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
        Some(MessageId(Repr::Inline { len, bytes }))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        MessageId::empty()
    }
}

impl From<&str> for MessageId {
    fn from(s: &str) -> Self {
        MessageId::inline(s).unwrap_or_else(|| MessageId(Repr::Shared(Arc::from(s))))
    }
}

impl From<String> for MessageId {
    fn from(s: String) -> Self {
        MessageId::inline(&s).unwrap_or_else(|| MessageId(Repr::Shared(Arc::from(s))))
    }
}

impl From<&String> for MessageId {
    fn from(s: &String) -> Self {
        MessageId::from(s.as_str())
    }
}

impl From<Arc<str>> for MessageId {
    fn from(s: Arc<str>) -> Self {
        MessageId::inline(&s).unwrap_or(MessageId(Repr::Shared(s)))
    }
}

impl From<&MessageId> for MessageId {
    fn from(id: &MessageId) -> Self {
        id.clone()
    }
}

/// The decimal form of a sequence number (always inline).
impl From<u64> for MessageId {
    fn from(n: u64) -> Self {
        // No formatting machinery: this runs once per delivery on the memory backend.
        let mut id = Digits::default();
        id.int(n, false);
        id.finish()
            .unwrap_or_else(|| MessageId::from(n.to_string()))
    }
}

impl MessageId {
    /// `partition/offset`: the id of a record in a partitioned log (a Kafka
    /// record's), written straight into the inline storage — no formatting
    /// machinery and no allocation when it fits in 22 bytes, as it does for any
    /// offset below 10^18 on partitions below 1,000.
    ///
    /// ```
    /// use ferrymq_core::MessageId;
    ///
    /// assert_eq!(MessageId::log_position(2, 1_042), "2/1042");
    /// assert_eq!(MessageId::log_position(-1, 0), "-1/0");
    /// assert_eq!(
    ///     MessageId::log_position(i32::MAX, i64::MAX),
    ///     "2147483647/9223372036854775807"
    /// );
    /// ```
    pub fn log_position(partition: i32, offset: i64) -> Self {
        let mut id = Digits::default();
        id.int(u64::from(partition.unsigned_abs()), partition < 0);
        id.byte(b'/');
        id.int(offset.unsigned_abs(), offset < 0);
        id.finish()
            .unwrap_or_else(|| MessageId::from(format!("{partition}/{offset}")))
    }
}

/// An inline id being written; `len` past [`INLINE`] once it no longer fits.
#[derive(Default)]
struct Digits {
    bytes: [u8; INLINE],
    len: usize,
}

impl Digits {
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
        }
        self.len = self.len.saturating_add(1);
    }

    /// `n` in decimal, with a minus sign when `negative`.
    fn int(&mut self, n: u64, negative: bool) {
        if negative {
            self.byte(b'-');
        }
        // Count the digits, then write them from the last.
        let mut len = 1;
        let mut rest = n / 10;
        while rest > 0 {
            len += 1;
            rest /= 10;
        }
        let end = self.len.saturating_add(len);
        if let Some(digits) = self.bytes.get_mut(self.len..end) {
            let mut rest = n;
            for d in digits.iter_mut().rev() {
                *d = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
        }
        self.len = end;
    }

    /// The id, or `None` when it did not fit.
    fn finish(self) -> Option<MessageId> {
        let len = u8::try_from(self.len)
            .ok()
            .filter(|&n| usize::from(n) <= INLINE)?;
        Some(MessageId(Repr::Inline {
            len,
            bytes: self.bytes,
        }))
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> Self {
        id.as_str().to_owned()
    }
}

impl From<&MessageId> for String {
    fn from(id: &MessageId) -> Self {
        id.as_str().to_owned()
    }
}

impl Deref for MessageId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for MessageId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for MessageId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for MessageId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for MessageId {}

impl PartialOrd for MessageId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MessageId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// Hashes as its string does, so a `HashMap<MessageId, _>` can be looked up by `&str`.
impl Hash for MessageId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for MessageId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for MessageId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for MessageId {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<MessageId> for str {
    fn eq(&self, other: &MessageId) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<MessageId> for &str {
    fn eq(&self, other: &MessageId) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<MessageId> for String {
    fn eq(&self, other: &MessageId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MessageId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message id string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MessageId, E> {
                Ok(MessageId::from(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<MessageId, E> {
                Ok(MessageId::from(v))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn short_ids_are_inline_and_long_ones_shared() {
        for s in [
            "",
            "0",
            "18446744073709551615",
            "1733077860000-12",
            "3/1234567890",
            "exactly-twenty-two-by.",
        ] {
            let id = MessageId::from(s);
            assert!(matches!(id.0, Repr::Inline { .. }), "{s:?} inline");
            assert_eq!(id.as_str(), s);
            assert_eq!(MessageId::from(s.to_string()), s);
        }
        let uuid = "5fea7756-0ea4-451a-a703-a558b933e274";
        let id = MessageId::from(uuid.to_string());
        assert!(matches!(id.0, Repr::Shared(_)));
        assert_eq!(id, uuid);
        let copy = id.clone();
        match (&id.0, &copy.0) {
            (Repr::Shared(a), Repr::Shared(b)) => assert!(Arc::ptr_eq(a, b), "shared, not copied"),
            _ => panic!("not shared"),
        }
        // Multi-byte characters: kept whole on either side of the inline limit.
        for s in ["ünïcödé-ïd", "ééééééééééé", "éééééééééééé"] {
            assert_eq!(MessageId::from(s), s);
        }
    }

    #[test]
    fn numbers_format_as_decimal() {
        for n in [0u64, 7, 10, 99, 1_000_000, u64::MAX] {
            assert_eq!(MessageId::from(n), n.to_string());
        }
    }

    #[test]
    fn log_positions_match_their_formatted_string_inline_or_not() {
        let cases = [
            (0, 0),
            (-1, 0),
            (2, 1_042),
            (999, 999_999_999_999_999_999), // 22 bytes: the most kept inline
            (999, i64::MAX),                // 23 bytes
            (i32::MAX, i64::MAX),
            (i32::MIN, i64::MIN),
        ];
        for (p, o) in cases {
            let id = MessageId::log_position(p, o);
            let text = format!("{p}/{o}");
            assert_eq!(id, text);
            assert_eq!(matches!(id.0, Repr::Inline { .. }), text.len() <= INLINE);
        }
    }

    #[test]
    fn compares_hashes_and_serializes_as_a_string() {
        let id = MessageId::from("m-1");
        let (text, owned): (&str, String) = ("m-1", "m-1".into());
        assert_eq!(id, text);
        assert_eq!(text, id);
        assert_eq!(id, *text);
        assert_eq!(*text, id);
        assert_eq!(id, owned);
        assert_eq!(owned, id);
        let (a, b) = (MessageId::from("a"), MessageId::from("b"));
        assert!(a < b);
        let mut map = HashMap::new();
        map.insert(id.clone(), 1);
        assert_eq!(map.get("m-1"), Some(&1));
        assert_eq!(format!("{id} {id:?}"), "m-1 \"m-1\"");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"m-1\"");
        let back: MessageId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        let long: MessageId =
            serde_json::from_str("\"5fea7756-0ea4-451a-a703-a558b933e274\"").unwrap();
        assert_eq!(long.len(), 36);
        assert_eq!(String::from(long.clone()), long.as_str());
    }
}

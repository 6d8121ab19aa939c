//! [`Position`]: where a message sits in its backend, formatted only when read.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

/// Where a delivered message sits in its backend
/// ([`DeliveryMeta::position`](crate::DeliveryMeta::position)): Kafka's
/// `topic/partition/offset`, a Redis stream's `level/entry-id`, an SQS FIFO
/// sequence number. Reads as a `str` (`Deref<Target = str>`).
///
/// Why not a `String`: a log-structured backend has a position for every record it
/// hands out, and few handlers read it. [`Position::in_log`] keeps the topic (a
/// shared reference count), partition and offset, and writes the text the first
/// time it is read — receiving costs neither the formatting nor an allocation.
///
/// ```
/// use std::sync::Arc;
/// use ferrymq_core::Position;
///
/// let p = Position::in_log(Arc::from("orders"), 2, 1_041);
/// assert_eq!(p, "orders/2/1041");
/// assert!(p.ends_with("/1041")); // `Deref<Target = str>`
/// assert_eq!(Position::from("7/12"), Position::in_log(Arc::from(""), 7, 12));
/// ```
#[derive(Clone)]
pub struct Position(Repr);

#[derive(Clone)]
enum Repr {
    Text(String),
    Log {
        /// `None`: the position is `partition/offset` alone (a send receipt's id).
        topic: Option<Arc<str>>,
        partition: i32,
        offset: i64,
        text: OnceLock<String>,
    },
}

impl Position {
    /// `topic/partition/offset` in a partitioned log (`partition/offset` when
    /// `topic` is empty), formatted on first use.
    pub fn in_log(topic: Arc<str>, partition: i32, offset: i64) -> Self {
        Self::log(Some(topic), partition, offset)
    }

    /// `partition/offset`, formatted on first use (what
    /// [`SendReceipt::at_position`](crate::SendReceipt::at_position) keeps).
    pub(crate) fn in_partition(partition: i32, offset: i64) -> Self {
        Self::log(None, partition, offset)
    }

    fn log(topic: Option<Arc<str>>, partition: i32, offset: i64) -> Self {
        Position(Repr::Log {
            topic,
            partition,
            offset,
            text: OnceLock::new(),
        })
    }

    /// The position as a string slice.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Text(s) => s,
            Repr::Log {
                topic,
                partition,
                offset,
                text,
            } => text.get_or_init(|| log_text(topic.as_deref(), *partition, *offset)),
        }
    }
}

fn log_text(topic: Option<&str>, partition: i32, offset: i64) -> String {
    match topic.filter(|t| !t.is_empty()) {
        Some(topic) => format!("{topic}/{partition}/{offset}"),
        None => format!("{partition}/{offset}"),
    }
}

impl From<String> for Position {
    fn from(s: String) -> Self {
        Position(Repr::Text(s))
    }
}

impl From<&str> for Position {
    fn from(s: &str) -> Self {
        Position(Repr::Text(s.to_string()))
    }
}

impl From<Position> for String {
    fn from(p: Position) -> Self {
        match p.0 {
            Repr::Text(s) => s,
            Repr::Log {
                topic,
                partition,
                offset,
                text,
            } => text
                .into_inner()
                .unwrap_or_else(|| log_text(topic.as_deref(), partition, offset)),
        }
    }
}

impl Deref for Position {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Position {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for Position {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Position {}

impl PartialEq<str> for Position {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Position {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Position {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_position_reads_like_its_text() {
        for (topic, p, o, text) in [
            ("t", 0, 0, "t/0/0"),
            ("", 3, 99, "3/99"),
            (
                "a.retry-5s",
                i32::MAX,
                i64::MAX,
                "a.retry-5s/2147483647/9223372036854775807",
            ),
            ("t", -1, -1001, "t/-1/-1001"),
        ] {
            let lazy = Position::in_log(Arc::from(topic), p, o);
            assert_eq!(lazy.clone(), Position::from(text));
            assert_eq!(lazy, text);
            assert_eq!(format!("{lazy}"), text);
            assert_eq!(format!("{lazy:?}"), format!("{text:?}"));
            assert_eq!(String::from(lazy), text);
        }
    }
}

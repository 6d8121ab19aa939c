//! Which deliveries count as "the same message".

use sha2::{Digest, Sha256};

use crate::delivery::Delivery;
use crate::message::{Message, RESERVED_HEADER_PREFIX};

/// What makes two deliveries "the same message" for [`Dedup`](super::Dedup), when the
/// message has no [`dedup_id`](crate::Message::dedup_id). A dedup id, when present,
/// always is the key: the producer said which sends are one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyStrategy {
    /// The backend's message id (the default). It is stable across redeliveries of
    /// one message (SQS MessageId, the Redis stable id, the memory sequence number),
    /// so a message handled whose ack was lost is acked as a duplicate when it comes
    /// back, and never names two different messages of one queue. A second *send* of
    /// the same content is a new message with a new id: it is handled — give it a
    /// dedup id to have it dropped. (Ids a backend reuses — a memory queue deleted
    /// and recreated, a Kafka topic recreated — within the store's retention would
    /// be taken as duplicates.)
    #[default]
    MessageId,
    /// No key: a message without a dedup id is handled without asking the store.
    DedupIdOnly,
    /// The SHA-256 [`content_hash`] of payload, ordering key and headers (opt-in,
    /// [`DedupLayer::content_hash`](super::DedupLayer::content_hash)). Also drops a
    /// re-send of the same content — and **any other message that happens to be
    /// byte-identical**: two orders with the same payload and headers are taken as
    /// one, the second acked unhandled. Only for messages whose content names them
    /// uniquely.
    ContentHash,
}

/// The dedup key of `delivery` inside `namespace`: `namespace/id:<dedup_id>` when the
/// message has a dedup id, else per `strategy`: `namespace/msg:<message id>`,
/// `namespace/sha256:<hex>` of its [`content_hash`], or `None` (not deduplicated;
/// also for [`KeyStrategy::MessageId`] when the backend gave no id).
///
/// The namespace keeps two queues sharing one store apart; [`Dedup`](super::Dedup)
/// uses the delivery's queue name unless told otherwise.
pub fn dedup_key(namespace: &str, delivery: &Delivery, strategy: KeyStrategy) -> Option<String> {
    if let Some(id) = delivery.message().get_dedup_id() {
        return Some(format!("{namespace}/id:{id}"));
    }
    match strategy {
        KeyStrategy::MessageId if delivery.id().is_empty() => None,
        KeyStrategy::MessageId => Some(format!("{namespace}/msg:{}", delivery.id())),
        KeyStrategy::DedupIdOnly => None,
        KeyStrategy::ContentHash => Some(format!(
            "{namespace}/sha256:{}",
            content_hash(delivery.message())
        )),
    }
}

/// Hex SHA-256 of what makes a message the same message: payload, ordering key and
/// headers in order, each length-prefixed so that no two different messages encode
/// alike. Headers under the reserved `ferrymq-` prefix are left out: backends and
/// middleware add them (attempt counters, dead-letter records) to what is still the
/// same message.
pub fn content_hash(message: &Message) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(message.payload());
    match message.get_key() {
        Some(k) => {
            field(b"k");
            field(k.as_bytes());
        }
        None => field(b"-"),
    }
    for (name, value) in message.headers().iter() {
        if name.starts_with(RESERVED_HEADER_PREFIX) {
            continue;
        }
        field(name.as_bytes());
        field(value.as_bytes());
    }
    let digest = h.finalize();
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::middleware::testing::loose_delivery;
    use crate::reserved;

    #[test]
    fn keys_name_one_message_never_its_content() {
        let (a, _) = loose_delivery(Message::new("same"), "1", 1);
        let (b, _) = loose_delivery(Message::new("same"), "2", 1);
        let key = |d: &Delivery, s| dedup_key("q", d, s);
        assert_eq!(key(&a, KeyStrategy::MessageId).as_deref(), Some("q/msg:1"));
        assert_ne!(
            key(&a, KeyStrategy::default()),
            key(&b, KeyStrategy::default()),
            "identical payloads of two messages are two keys"
        );
        assert_eq!(key(&a, KeyStrategy::DedupIdOnly), None);
        assert_eq!(
            key(&a, KeyStrategy::ContentHash),
            key(&b, KeyStrategy::ContentHash),
            "content hashing is what merges them, and only on request"
        );
        let (c, _) = loose_delivery(Message::new("x").dedup_id("order-1"), "3", 1);
        for s in [
            KeyStrategy::MessageId,
            KeyStrategy::DedupIdOnly,
            KeyStrategy::ContentHash,
        ] {
            assert_eq!(key(&c, s).as_deref(), Some("q/id:order-1"));
        }
        let (no_id, _) = loose_delivery(Message::new("x"), "", 1);
        assert_eq!(key(&no_id, KeyStrategy::MessageId), None);
    }

    #[test]
    fn hash_ignores_reserved_headers_but_not_others() {
        let a = Message::new("p").header("x", "1");
        let b = a.clone().header(reserved::ATTEMPT, "3");
        let c = a.clone().header("y", "2");
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(content_hash(&a), content_hash(&c));
        assert_ne!(content_hash(&a), content_hash(&a.clone().key("k")));
        // Length prefixes: payload/header boundary cannot be shifted.
        assert_ne!(
            content_hash(&Message::new("ab").header("c", "d")),
            content_hash(&Message::new("a").header("bc", "d"))
        );
        assert_eq!(content_hash(&a).len(), 64);
    }
}

//! Which deliveries count as "the same message".

use sha2::{Digest, Sha256};

use crate::delivery::Delivery;
use crate::message::{Message, RESERVED_HEADER_PREFIX};

/// The dedup key of `delivery` inside `namespace`: `namespace/id:<dedup_id>` when the
/// message has a dedup id, else `namespace/sha256:<hex>` of its [`content_hash`].
///
/// The namespace keeps two queues sharing one store apart; [`Dedup`](super::Dedup)
/// uses the delivery's queue name unless told otherwise.
pub fn dedup_key(namespace: &str, delivery: &Delivery) -> String {
    match delivery.message().get_dedup_id() {
        Some(id) => format!("{namespace}/id:{id}"),
        None => format!("{namespace}/sha256:{}", content_hash(delivery.message())),
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
    use crate::reserved;

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

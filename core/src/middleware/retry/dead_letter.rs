use std::time::SystemTime;

use crate::delivery::Delivery;
use crate::message::{reserved, Message};

/// Longest failure reason written to the DLQ header, in bytes.
const MAX_REASON: usize = 1024;

/// The message to publish to a DLQ for `delivery`: the original payload, key, dedup id
/// and headers, plus the reserved dead-letter headers. The backend attempt counter
/// header is dropped, so that a redrive starts counting afresh.
pub fn dead_letter_message(
    delivery: &Delivery,
    reason: &str,
    attempts: u32,
    first_failure_at: SystemTime,
    dead_lettered_at: SystemTime,
) -> Message {
    let mut message = delivery.message().clone();
    let meta = delivery.meta();
    let headers = message.headers_mut();
    headers.remove(reserved::ATTEMPT);
    headers.insert(reserved::FAILURE_REASON, header_safe(reason));
    headers.insert(reserved::ORIGIN_QUEUE, meta.queue.to_string());
    headers.insert(reserved::ATTEMPTS, attempts.to_string());
    headers.insert(reserved::FIRST_FAILURE_AT, rfc3339(first_failure_at));
    headers.insert(reserved::DEAD_LETTERED_AT, rfc3339(dead_lettered_at));
    headers.insert(reserved::ORIGIN_MESSAGE_ID, meta.id.clone());
    message
}

pub(super) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// A header value every backend accepts: no control characters but tab, CR, LF; at
/// most [`MAX_REASON`] bytes, cut at a character boundary.
fn header_safe(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_REASON));
    for c in reason.chars() {
        let c = if c.is_control() && !matches!(c, '\t' | '\r' | '\n') {
            ' '
        } else {
            c
        };
        if out.len() + c.len_utf8() > MAX_REASON {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push_str("unknown error");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_is_sanitised_and_bounded() {
        assert_eq!(header_safe("a\0b\tc"), "a b\tc");
        assert_eq!(header_safe(""), "unknown error");
        let long = "é".repeat(1000);
        let cut = header_safe(&long);
        assert!(cut.len() <= MAX_REASON && cut.chars().all(|c| c == 'é'));
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
    }
}

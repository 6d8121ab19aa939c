use std::time::SystemTime;

use crate::delivery::Delivery;
use crate::message::{reserved, Message};

/// Longest failure reason written to the DLQ header, in bytes.
const MAX_REASON: usize = 1024;

/// The message to publish to a DLQ for `delivery`: the original payload, key, priority
/// and headers, plus the reserved dead-letter headers. The backend attempt counter
/// header is dropped, so that a redrive starts counting afresh.
///
/// The dedup id is **not** sent as a dedup id: it moves to the
/// [`ORIGIN_DEDUP_ID`](reserved::ORIGIN_DEDUP_ID) header. A DLQ that deduplicates
/// (the memory and Redis backends, SQS FIFO) would otherwise drop the copy of a
/// message that was redriven and failed again within its window — and the source
/// would already have acked it: in neither queue. A message that went through the DLQ
/// before keeps the header it already has. [`restore_origin_dedup_id`] undoes this
/// on redrive.
pub fn dead_letter_message(
    delivery: &Delivery,
    reason: &str,
    attempts: u32,
    first_failure_at: SystemTime,
    dead_lettered_at: SystemTime,
) -> Message {
    let mut message = delivery.message().clone();
    let meta = delivery.meta();
    let dedup_id = message.take_dedup_id();
    let headers = message.headers_mut();
    headers.remove(reserved::ATTEMPT);
    if let Some(id) = dedup_id {
        headers.insert(reserved::ORIGIN_DEDUP_ID, id);
    }
    headers.insert(reserved::FAILURE_REASON, header_safe(reason));
    headers.insert(reserved::ORIGIN_QUEUE, meta.queue.to_string());
    headers.insert(reserved::ATTEMPTS, attempts.to_string());
    headers.insert(reserved::FIRST_FAILURE_AT, rfc3339(first_failure_at));
    headers.insert(reserved::DEAD_LETTERED_AT, rfc3339(dead_lettered_at));
    headers.insert(reserved::ORIGIN_MESSAGE_ID, meta.id.clone());
    message
}

/// The copy of a dead-lettered `message` to send back to a work queue keeps its
/// original dedup id: moved back from the [`ORIGIN_DEDUP_ID`](reserved::ORIGIN_DEDUP_ID)
/// header (see [`dead_letter_message`]) unless the message has a dedup id of its own.
/// The backend attempt counter header is dropped, so attempts count afresh.
///
/// ```
/// use ferrymq_core::middleware::retry::restore_origin_dedup_id;
/// use ferrymq_core::{reserved, Message};
///
/// let dead = Message::new("order").header(reserved::ORIGIN_DEDUP_ID, "order-7");
/// let back = restore_origin_dedup_id(dead);
/// assert_eq!(back.get_dedup_id(), Some("order-7"));
/// assert_eq!(back.headers().get(reserved::ORIGIN_DEDUP_ID), None);
/// ```
pub fn restore_origin_dedup_id(mut message: Message) -> Message {
    let headers = message.headers_mut();
    headers.remove(reserved::ATTEMPT);
    let origin = headers.remove(reserved::ORIGIN_DEDUP_ID);
    match (message.get_dedup_id().is_some(), origin) {
        (false, Some(id)) => message.dedup_id(id),
        _ => message,
    }
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

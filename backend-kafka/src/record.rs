//! How a ferrymq message is laid out in a Kafka record, and read back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ferrymq_core::{reserved, Error, ErrorKind, Headers, Message, MessageId, Result};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message as _;

/// Attempt of the delivery this record makes (absent: 1). A header counter, so only
/// nacks count (a replay after a crash or rebalance says the same attempt again).
pub const H_ATTEMPT: &str = reserved::ATTEMPT;
/// Not to be delivered before this time (ms since the Unix epoch): delayed sends and
/// retry copies, on a tier topic.
pub const H_NOT_BEFORE: &str = "ferrymq-not-before";
/// When the message was first enqueued (ms since the epoch), kept across retries.
pub const H_ENQUEUED_AT: &str = "ferrymq-enqueued-at";
/// The message's id from its first record, kept across retries.
pub const H_ID: &str = "ferrymq-id";

/// Headers ferrymq writes and strips again on receive.
pub const INTERNAL: &[&str] = &[H_ATTEMPT, H_NOT_BEFORE, H_ENQUEUED_AT, H_ID];

/// Bytes a record batch of one record adds on the wire beyond its record (the v2
/// batch header).
pub const BATCH_OVERHEAD: usize = 61;
/// Upper bound of a record's own framing (length, attributes, timestamp and offset
/// deltas, key and value lengths, header count: varints of at most 5 bytes each,
/// timestamp delta up to 10).
pub const RECORD_OVERHEAD: usize = 40;
/// Upper bound of one header's framing (two varint lengths).
pub const HEADER_OVERHEAD: usize = 10;

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, rounded **up**: for not-before times, so a
/// delay is never cut short by the truncation.
pub fn unix_ms_ceil(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| {
            let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
            i64::try_from(ms).unwrap_or(i64::MAX)
        })
        .unwrap_or(0)
}

/// The time `ms` since the Unix epoch (the epoch for negative values).
pub fn from_unix_ms(ms: i64) -> SystemTime {
    let ms = u64::try_from(ms).unwrap_or(0);
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// Size of `message` as one record on the wire, with its framing and the ferrymq
/// headers a retry may add: what the broker's `message.max.bytes` limits.
pub fn wire_size(message: &Message) -> usize {
    let key = message.get_key().map_or(0, str::len);
    let headers: usize = message
        .headers()
        .iter()
        .map(|(n, v)| n.len() + v.len() + HEADER_OVERHEAD)
        .sum();
    // A retry copy carries the four internal headers (names + at most 20-digit values).
    let internal: usize = INTERNAL
        .iter()
        .map(|n| n.len() + 40 + HEADER_OVERHEAD)
        .sum();
    message.payload().len() + key + headers + internal + RECORD_OVERHEAD + BATCH_OVERHEAD
}

/// Refuse a message the broker would refuse, before anything is produced.
pub fn check_size(
    message: &Message,
    max_message_size: usize,
    max_record_bytes: usize,
) -> Result<()> {
    message.validate(max_message_size)?;
    let wire = wire_size(message);
    if wire > max_record_bytes {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "as a Kafka record (key, headers and record overhead counted) the message is \
                 about {wire} bytes, the maximum is {max_record_bytes} (max_record_bytes); \
                 nothing was produced"
            ),
        ));
    }
    Ok(())
}

/// The user's headers (the internal ones dropped: ferrymq writes those itself).
pub fn user_headers(headers: &Headers) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.len() + INTERNAL.len());
    for (n, v) in headers.iter() {
        if !INTERNAL.contains(&n) {
            out = out.insert(Header {
                key: n,
                value: Some(v.as_bytes()),
            });
        }
    }
    out
}

/// Append one internal header.
pub fn with_header(headers: OwnedHeaders, name: &str, value: &str) -> OwnedHeaders {
    headers.insert(Header {
        key: name,
        value: Some(value.as_bytes()),
    })
}

/// One record as received, parsed once on the poll thread.
///
/// The id and position strings are not made here but when the record is handed
/// out ([`Received::id`], [`Received::position`]): a record's strings were made
/// once at parse and copied again into its delivery, four allocations per record
/// where two do.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic_index: usize,
    pub partition: i32,
    pub offset: i64,
    pub payload: Bytes,
    pub key: Option<String>,
    pub headers: Headers,
    /// The original id from the `ferrymq-id` header (a retry copy's), if any.
    pub id_header: Option<String>,
    pub attempt: u32,
    pub enqueued_at: SystemTime,
    pub not_before: Option<SystemTime>,
}

/// Payloads of polled records up to this size share chunks of [`CHUNK`] bytes
/// (one allocation per chunk, each payload a reference-counted slice of it):
/// copying each into its own buffer cost two allocations per record (the copy,
/// and the shared header its first clone into the message adds).
const SHARE_UP_TO: usize = 2048;
/// Size of a shared payload chunk. A chunk lives until its last record is
/// dropped, so a record held long pins at most this much beyond its own size.
const CHUNK: usize = 16 * 1024;

/// Where the poll thread copies small payloads to (see [`SHARE_UP_TO`]).
#[derive(Debug, Default)]
pub struct PayloadArena {
    buf: BytesMut,
}

impl PayloadArena {
    /// `p` as `Bytes`: a slice of the current chunk when small, a copy of its own
    /// otherwise.
    pub fn copy(&mut self, p: &[u8]) -> Bytes {
        if p.len() > SHARE_UP_TO {
            return Bytes::copy_from_slice(p);
        }
        if self.buf.capacity() - self.buf.len() < p.len() {
            self.buf = BytesMut::with_capacity(CHUNK);
        }
        self.buf.extend_from_slice(p);
        self.buf.split().freeze()
    }
}

impl Received {
    /// Read a polled record of topic number `topic_index` (0: the queue's topic,
    /// 1..: its retry tiers).
    pub fn parse(m: &BorrowedMessage<'_>, topic_index: usize) -> Received {
        let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        Self::parse_with(m, topic_index, payload)
    }

    /// [`Received::parse`], the payload copied into `arena`.
    pub fn parse_in(
        m: &BorrowedMessage<'_>,
        topic_index: usize,
        arena: &mut PayloadArena,
    ) -> Received {
        let payload = arena.copy(m.payload().unwrap_or_default());
        Self::parse_with(m, topic_index, payload)
    }

    fn parse_with(m: &BorrowedMessage<'_>, topic_index: usize, payload: Bytes) -> Received {
        let mut headers = Headers::new();
        let mut attempt = None;
        let mut not_before = None;
        let mut enqueued_at = None;
        let mut id = None;
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                let value = h
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                match h.key {
                    H_ATTEMPT => attempt = value.parse::<u32>().ok(),
                    H_NOT_BEFORE => not_before = value.parse::<i64>().ok().map(from_unix_ms),
                    H_ENQUEUED_AT => enqueued_at = value.parse::<i64>().ok().map(from_unix_ms),
                    H_ID => id = Some(value),
                    name => headers.insert(name, value),
                }
            }
        }
        let enqueued_at = enqueued_at
            .or_else(|| m.timestamp().to_millis().map(from_unix_ms))
            .unwrap_or_else(SystemTime::now);
        Received {
            topic_index,
            partition: m.partition(),
            offset: m.offset(),
            payload,
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            id_header: id,
            attempt: attempt.unwrap_or(1).max(1),
            enqueued_at,
            not_before,
        }
    }

    /// The message's id: the original one a retry copy carries, else
    /// [`record_id`] of this record (`topic`: the name of its topic).
    pub fn id(&self, topic: &str) -> String {
        match &self.id_header {
            Some(id) => id.clone(),
            None => record_id(self.topic_index, topic, self.partition, self.offset),
        }
    }

    /// [`Received::id`] as a [`MessageId`], made without a `String` for the usual
    /// case (a record of the queue's topic: `partition/offset` fits the id's
    /// inline storage): an allocation and a free per delivery less.
    pub fn message_id(&self, topic: &str) -> MessageId {
        match &self.id_header {
            Some(id) => MessageId::from(id.as_str()),
            None if self.topic_index == 0 => MessageId::log_position(self.partition, self.offset),
            None => MessageId::from(self.id(topic)),
        }
    }

    /// `topic/partition/offset` of this record (`topic`: the name of its topic).
    pub fn position(&self, topic: &str) -> String {
        position(topic, self.partition, self.offset)
    }

    /// The message as the user sent it.
    pub fn message(&self) -> Message {
        let m = Message::new(self.payload.clone()).with_headers(self.headers.clone());
        match &self.key {
            Some(k) => m.key(k.clone()),
            None => m,
        }
    }
}

/// A polled record's not-before as far as ferrymq honours it (`tier`: the delay of
/// the tier topic it came from, `None` for the queue's own topic).
///
/// On the queue's topic there is none: ferrymq puts delays and retries on the
/// tiers, so a not-before there was written by someone else, and honouring it
/// would hold the whole partition — with a far-future value, for good. On a tier
/// it is at most the tier's delay from `now`: a later one (poison, or a producer
/// whose clock is far ahead) waits that long instead of until its time.
pub fn bounded_not_before(
    not_before: Option<SystemTime>,
    tier: Option<Duration>,
    now: SystemTime,
) -> Option<SystemTime> {
    let (t, tier) = (not_before?, tier?);
    Some(t.min(now.checked_add(tier).unwrap_or(now)))
}

/// A record's id: `partition/offset` in the queue's own topic,
/// `topic/partition/offset` elsewhere (a delayed send's first record, on a tier).
pub fn record_id(topic_index: usize, topic: &str, partition: i32, offset: i64) -> String {
    if topic_index == 0 {
        position("", partition, offset)
    } else {
        position(topic, partition, offset)
    }
}

/// `topic/partition/offset` (`partition/offset` for an empty topic), written into
/// one allocation of the right size: `format!` guesses small and grows, and this
/// runs for every record sent and received.
pub fn position(topic: &str, partition: i32, offset: i64) -> String {
    // A partition takes at most 11 characters, an offset 20, the slashes 2.
    let mut s = String::with_capacity(topic.len() + 33);
    if !topic.is_empty() {
        s.push_str(topic);
        s.push('/');
    }
    push_partition_offset(&mut s, partition, offset);
    s
}

/// Append `partition/offset`. The digits come from `itoa`: `write!` through
/// `core::fmt` cost ~500 instructions per record for an id and a position, a
/// third of everything a receive did per record.
pub fn push_partition_offset(s: &mut String, partition: i32, offset: i64) {
    s.push_str(itoa::Buffer::new().format(partition));
    s.push('/');
    s.push_str(itoa::Buffer::new().format(offset));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_share_a_chunk_and_stay_intact() {
        let mut arena = PayloadArena::default();
        let payloads: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| {
                let len = (i as usize * 37) % (SHARE_UP_TO + 500);
                (0..len).map(|j| (i as usize + j) as u8).collect()
            })
            .collect();
        let copies: Vec<Bytes> = payloads.iter().map(|p| arena.copy(p)).collect();
        // Later copies never overwrite earlier ones, also across chunks.
        for (p, c) in payloads.iter().zip(&copies) {
            assert_eq!(&p[..], &c[..]);
        }
        let cloned: Vec<Bytes> = copies.iter().map(Bytes::clone).collect();
        drop(copies);
        for (p, c) in payloads.iter().zip(&cloned) {
            assert_eq!(&p[..], &c[..]);
        }
    }

    #[test]
    fn a_not_before_is_bounded_by_its_tier_and_dropped_on_the_queue_topic() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let tier = Duration::from_secs(5);
        let soon = now + Duration::from_secs(2);
        let far = now + Duration::from_secs(1_000 * 365 * 24 * 3600);
        assert_eq!(bounded_not_before(Some(soon), Some(tier), now), Some(soon));
        assert_eq!(
            bounded_not_before(Some(far), Some(tier), now),
            Some(now + tier)
        );
        assert_eq!(bounded_not_before(Some(far), None, now), None);
        assert_eq!(bounded_not_before(None, Some(tier), now), None);
        // A huge tier never overflows the arithmetic.
        assert_eq!(
            bounded_not_before(Some(far), Some(Duration::MAX), now),
            Some(far.min(now))
        );
    }

    #[test]
    fn message_id_matches_the_string_id() {
        let mut r = Received {
            topic_index: 0,
            partition: 2147483647,
            offset: i64::MAX,
            payload: Bytes::new(),
            key: None,
            headers: Headers::new(),
            id_header: None,
            attempt: 1,
            enqueued_at: UNIX_EPOCH,
            not_before: None,
        };
        assert_eq!(r.message_id("t").as_str(), r.id("t"));
        assert_eq!(r.id("t"), "2147483647/9223372036854775807");
        assert_eq!(
            position("t", i32::MIN, i64::MIN),
            "t/-2147483648/-9223372036854775808"
        );
        r.partition = -1;
        r.offset = 0;
        assert_eq!(r.message_id("t").as_str(), "-1/0");
        r.topic_index = 1;
        assert_eq!(r.message_id("t.retry.1s").as_str(), "t.retry.1s/-1/0");
        r.id_header = Some("0/42".into());
        assert_eq!(r.message_id("t.retry.1s").as_str(), "0/42");
    }

    #[test]
    fn not_before_times_round_up_so_a_delay_is_never_cut_short() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert!(from_unix_ms(unix_ms_ceil(t)) >= t);
        assert!(
            from_unix_ms(unix_ms(t)) < t,
            "truncation is early: why ceil is needed"
        );
        let exact = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(unix_ms_ceil(exact), unix_ms(exact));
    }
}

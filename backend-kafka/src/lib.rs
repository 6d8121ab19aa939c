//! # ferrymq-kafka
//!
//! The Kafka backend of ferrymq, over librdkafka (`rdkafka`, bundled build).
//! See the README section "Kafka" for the design; in short:
//!
//! - **Producer**: idempotent (`enable.idempotence=true`, `acks=all`), keys placed
//!   by `murmur2_random` (the Java client's partitioner), `send` resolves on the
//!   delivery report with the id `partition/offset`.
//! - **Consumer**: one group member (`cooperative-sticky`) polled by a thread of its
//!   own, into a bounded per-partition buffer (paused when full). Acks mark offsets
//!   done; only the contiguous done watermark is stored and committed.
//! - **Retries and delays**: tiered retry topics `TOPIC.retry-<delay>`.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod admin;
mod config;
mod consumer;
mod producer;
mod record;

use ferrymq_core::{Accuracy, Attempts, Capabilities, Ordering};

pub use admin::KafkaAdmin;
pub use config::{KafkaConfig, KafkaDriver, MAX_TOPIC_LEN};
pub use consumer::KafkaConsumer;
pub use producer::KafkaProducer;

/// Header names ferrymq writes on retry copies and delayed records (stripped again
/// before a delivery is handed out; read them from [`ferrymq_core::DeliveryMeta`]).
pub mod headers {
    pub use crate::record::{H_ATTEMPT, H_ENQUEUED_AT, H_ID, H_NOT_BEFORE};
}

/// What a Kafka queue with these settings can do.
pub(crate) fn capabilities(cfg: &KafkaConfig) -> Capabilities {
    let mut c = Capabilities::minimal("kafka");
    c.ordering = Ordering::PerKeyPipelined;
    c.max_delay = cfg.max_delay();
    c.max_nack_delay = cfg.max_delay();
    c.nack_delay_blocks = false;
    c.release_keeps_attempt = true;
    c.max_message_size = cfg.max_message_size;
    c.max_batch = 10_000;
    c.attempts = Attempts::NacksOnly;
    c.depth = Accuracy::Approximate;
    c.visibility_timeout = None;
    c.extend_visibility = false;
    c
}

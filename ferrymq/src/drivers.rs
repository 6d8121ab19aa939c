//! The backends compiled into this build: one line each.

use ferrymq_core::backend::Driver;

/// Every backend this build of ferrymq can open, in the order a URL is offered to
/// them. Adding a backend is its [`Driver`] (in its own crate), its cargo feature in
/// `Cargo.toml`, and **one line here** — URL dispatch, serde tables, admin, the
/// `ferry` CLI and the "needs the cargo feature" errors all follow from this list.
static DRIVERS: &[&dyn Driver] = &[
    &ferrymq_core::memory::MemoryDriver,
    #[cfg(feature = "redis")]
    &ferrymq_redis::RedisDriver,
    #[cfg(feature = "sqs")]
    &ferrymq_sqs::SqsDriver,
    #[cfg(feature = "kafka")]
    &ferrymq_kafka::KafkaDriver,
];

/// The backends compiled into this build (see [`Config`](crate::Config)).
///
/// ```
/// let names: Vec<&str> = ferrymq::drivers().iter().map(|d| d.name()).collect();
/// assert!(names.contains(&"memory"));
/// ```
pub fn drivers() -> &'static [&'static dyn Driver] {
    DRIVERS
}

//! # ferrymq-core
//!
//! The message model, the [`Producer`] / [`Consumer`] / [`Ack`] traits every backend
//! implements, [`Capabilities`], the typed [`Error`], and the in-memory backend
//! ([`memory`]) that is both the zero-setup default and the reference every other
//! backend is compared with by the conformance suite. Repeatable jobs (cron in a
//! time zone, or fixed intervals) are in [`schedule`].
//!
//! ```
//! use std::time::Duration;
//! use ferrymq_core::{memory::MemoryConfig, Consumer, Message, Producer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (producer, consumer) = MemoryConfig::new("doc-orders").connect()?;
//! producer.send(Message::new("hello").header("event-type", "greeting")).await?;
//! let deliveries = consumer.receive(10, Duration::from_secs(1)).await?;
//! assert_eq!(deliveries[0].payload().as_ref(), b"hello");
//! deliveries[0].ack().await?;
//! # Ok(())
//! # }
//! ```

pub mod admin;
pub mod backend;
pub mod batch;
pub mod capabilities;
pub mod config;
pub mod consumer;
pub mod delivery;
pub mod depth;
pub mod error;
mod id;
pub mod jobs;
pub mod memory;
pub mod message;
pub mod middleware;
mod position;
pub mod producer;
pub mod schedule;
pub mod time;
pub mod worker;

pub use admin::Admin;
pub use capabilities::{Accuracy, Attempts, Capabilities, Ordering, Priority};
pub use consumer::{into_stream, Consumer};
pub use delivery::{Ack, AckHandle, Delivery, DeliveryMeta, Settle};
pub use depth::Depth;
pub use error::{BoxError, Error, ErrorKind, Result};
pub use id::MessageId;
pub use message::{reserved, Headers, Message};
pub use position::Position;
pub use producer::{Producer, SendReceipt};
pub use worker::{Worker, WorkerSummary};

#[cfg(test)]
mod send_sync {
    //! Every public type and future is `Send` (and `Sync` where shared), so they can
    //! cross `tokio::spawn`. These fail to compile, not at run time, if that breaks.
    use super::*;
    use std::time::Duration;

    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn types_are_send_sync() {
        assert_send_sync::<Message>();
        assert_send_sync::<Delivery>();
        assert_send_sync::<AckHandle>();
        assert_send_sync::<Error>();
        assert_send_sync::<Box<dyn Producer>>();
        assert_send_sync::<Box<dyn Consumer>>();
        assert_send_sync::<Box<dyn Admin>>();
        assert_send_sync::<Box<dyn backend::BackendConfig>>();
        assert_send_sync::<memory::MemoryProducer>();
        assert_send_sync::<memory::MemoryConsumer>();
    }

    #[test]
    fn futures_are_send() {
        let (p, c) = memory::MemoryConfig::new("send-sync")
            .connect()
            .expect("connect");
        let p: Box<dyn Producer> = Box::new(p);
        let c: Box<dyn Consumer> = Box::new(c);
        assert_send(&p.send(Message::new("x")));
        assert_send(&p.send_batch(vec![]));
        assert_send(&p.flush());
        assert_send(&p.close());
        assert_send(&p.depth());
        assert_send(&c.receive(1, Duration::ZERO));
        assert_send(&c.depth());
        assert_send(&c.close());
    }

    #[tokio::test]
    async fn delivery_futures_are_send() {
        let (p, c) = memory::MemoryConfig::new("send-sync-2")
            .connect()
            .expect("connect");
        p.send(Message::new("x")).await.expect("send");
        let d = c
            .receive(1, Duration::ZERO)
            .await
            .expect("receive")
            .remove(0);
        assert_send(&d.ack());
        assert_send(&d.nack(None));
        assert_send(&d.extend(Duration::from_secs(1)));
        assert_send(&d.release(None));
    }
}

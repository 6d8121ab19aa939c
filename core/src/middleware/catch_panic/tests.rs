use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::memory::MemoryConfig;
use crate::middleware::{handler_fn, HandlerPanicked};
use crate::{BoxError, Consumer, Delivery, Message, Producer};

async fn delivery(queue: &str) -> Delivery {
    let (p, c) = MemoryConfig::new(queue).connect().unwrap();
    p.send(Message::new("x")).await.unwrap();
    c.receive(1, Duration::ZERO).await.unwrap().remove(0)
}

#[tokio::test]
async fn panic_in_future_becomes_error_and_service_keeps_working() {
    let d = delivery("mw-catch-panic-1").await;
    let mut svc = CatchPanicLayer::new().layer(handler_fn(|d: Delivery| async move {
        if d.payload().as_ref() == b"x" {
            panic!("kaboom");
        }
        Ok::<_, BoxError>(())
    }));
    let err = svc.ready().await.unwrap().call(d).await.unwrap_err();
    let p = err
        .downcast_ref::<HandlerPanicked>()
        .expect("HandlerPanicked");
    assert_eq!(p.message(), "kaboom");
    // The same service instance still serves.
    let d2 = Delivery::new(
        Message::new("fine"),
        crate::DeliveryMeta::new("1", 1, std::time::SystemTime::now(), "q".into()),
        d2_acker(),
    );
    svc.ready().await.unwrap().call(d2).await.unwrap();
}

#[tokio::test]
async fn panic_in_call_becomes_error() {
    let d = delivery("mw-catch-panic-2").await;
    let svc = CatchPanic::new(handler_fn(
        |_d: Delivery| -> futures::future::Ready<Result<(), BoxError>> { panic!("sync boom") },
    ));
    let err = svc.oneshot(d).await.unwrap_err();
    assert_eq!(err.to_string(), "handler panicked: sync boom");
}

fn d2_acker() -> crate::AckHandle {
    #[derive(Debug)]
    struct Noop;
    #[async_trait::async_trait]
    impl crate::Ack for Noop {
        async fn ack(&self) -> crate::Result<()> {
            Ok(())
        }
        async fn nack(&self, _: Option<Duration>) -> crate::Result<()> {
            Ok(())
        }
        async fn extend(&self, _: Duration) -> crate::Result<()> {
            Ok(())
        }
    }
    crate::AckHandle::new(Noop)
}

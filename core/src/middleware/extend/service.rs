use std::task::{Context, Poll};

use futures::future::{Either, FutureExt, Map};
use tower::Service;

use super::heartbeat::{self, AbortOnDrop};
use super::layer::Heartbeat;
use crate::delivery::Delivery;
use crate::error::BoxError;
use crate::middleware::BoxFuture;

type IntoBox<E> = fn(Result<(), E>) -> Result<(), BoxError>;

/// Extends the lease of each delivery while the inner service handles it; see the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct ExtendVisibility<S> {
    inner: S,
    heartbeat: Option<Heartbeat>,
}

impl<S> ExtendVisibility<S> {
    pub(super) fn from_parts(inner: S, heartbeat: Option<Heartbeat>) -> Self {
        ExtendVisibility { inner, heartbeat }
    }
}

impl<S> Service<Delivery> for ExtendVisibility<S>
where
    S: Service<Delivery, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Map<S::Future, IntoBox<S::Error>>, BoxFuture<Result<(), BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let acker = delivery.acker().clone();
        let handling = self.inner.call(delivery);
        let into_box: IntoBox<S::Error> = |r| r.map_err(Into::into);
        let Some(hb) = self.heartbeat else {
            return Either::Left(handling.map(into_box));
        };
        // Spawned, not joined: it must beat even while the handler's task is busy.
        let guard = AbortOnDrop(tokio::spawn(heartbeat::run(acker, hb.timeout, hb.every)));
        Either::Right(Box::pin(async move {
            let _guard = guard;
            handling.await.map_err(Into::into)
        }))
    }
}

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

use super::heartbeat::{Beats, Registration};
use crate::delivery::Delivery;
use crate::error::BoxError;

/// Extends the lease of each delivery while the inner service handles it; see the
/// [module docs](super).
///
/// Clones share one heartbeat (one driver task for all their leases).
#[derive(Debug, Clone)]
pub struct ExtendVisibility<S> {
    inner: S,
    heartbeat: Option<Arc<Beats>>,
}

impl<S> ExtendVisibility<S> {
    pub(super) fn from_parts(inner: S, heartbeat: Option<super::layer::Heartbeat>) -> Self {
        ExtendVisibility {
            inner,
            heartbeat: heartbeat.map(|h| Arc::new(Beats::new(h.timeout, h.every))),
        }
    }
}

impl<S> Service<Delivery> for ExtendVisibility<S>
where
    S: Service<Delivery, Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = ExtendVisibilityFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        // Registered before the handler is called: its lease is kept from the start,
        // even through a long synchronous first poll (the driver is its own task).
        let lease = self
            .heartbeat
            .as_ref()
            .map(|beats| beats.register(delivery.acker().clone()));
        ExtendVisibilityFuture {
            inner: self.inner.call(delivery),
            _lease: lease,
        }
    }
}

pin_project! {
    /// Future of [`ExtendVisibility`]: the inner future, and the lease's place in the
    /// heartbeat, given up when this future completes or is dropped.
    pub struct ExtendVisibilityFuture<F> {
        #[pin]
        inner: F,
        _lease: Option<Registration>,
    }
}

impl<F> std::fmt::Debug for ExtendVisibilityFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtendVisibilityFuture")
            .finish_non_exhaustive()
    }
}

impl<F, E> Future for ExtendVisibilityFuture<F>
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                // Stop beating now, not when the caller gets round to dropping us.
                this._lease.take();
                Poll::Ready(result.map_err(Into::into))
            }
        }
    }
}

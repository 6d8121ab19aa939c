use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::{Context, Poll};

use futures::FutureExt;
use tower::Service;

use super::CatchPanicFuture;
use crate::error::BoxError;
use crate::middleware::HandlerPanicked;

/// Catches panics of the inner service, in `call` and while its future runs, and
/// returns them as [`HandlerPanicked`] errors.
///
/// `AssertUnwindSafe` is sound here in the sense that matters: after a panic the
/// handler's future is dropped, and the service itself is only reused if its own
/// state survived the panic, which is the same contract as `std::thread` workers.
#[derive(Debug, Clone, Copy)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S> CatchPanic<S> {
    /// Wrap `inner`.
    pub fn new(inner: S) -> Self {
        CatchPanic { inner }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, R> Service<R> for CatchPanic<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(future) => CatchPanicFuture::running(AssertUnwindSafe(future).catch_unwind()),
            Err(payload) => CatchPanicFuture::panicked(HandlerPanicked::from_payload(&*payload)),
        }
    }
}

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::CatchUnwind;
use pin_project_lite::pin_project;

use crate::error::BoxError;
use crate::middleware::HandlerPanicked;

pin_project! {
    /// Future of [`CatchPanic`](super::CatchPanic).
    pub struct CatchPanicFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Running { #[pin] future: CatchUnwind<AssertUnwindSafe<F>> },
        Panicked { error: Option<HandlerPanicked> },
    }
}

impl<F> CatchPanicFuture<F> {
    pub(super) fn running(future: CatchUnwind<AssertUnwindSafe<F>>) -> Self {
        CatchPanicFuture {
            kind: Kind::Running { future },
        }
    }

    pub(super) fn panicked(error: HandlerPanicked) -> Self {
        CatchPanicFuture {
            kind: Kind::Panicked { error: Some(error) },
        }
    }
}

impl<F> std::fmt::Debug for CatchPanicFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchPanicFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Running { future } => match future.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(result)) => Poll::Ready(result.map_err(Into::into)),
                Poll::Ready(Err(payload)) => {
                    Poll::Ready(Err(Box::new(HandlerPanicked::from_payload(&*payload))))
                }
            },
            KindProj::Panicked { error } => {
                Poll::Ready(Err(Box::new(error.take().unwrap_or_else(|| {
                    HandlerPanicked::from_payload(&"polled after completion")
                }))))
            }
        }
    }
}

//! Handlers from async closures.

use std::fmt;
use std::future::Future;
use std::task::{Context, Poll};

use futures::future::{FutureExt, Map};
use tower::Service;

use crate::delivery::Delivery;
use crate::error::BoxError;

/// Turn an async closure `Fn(Delivery) -> Future<Output = Result<(), E>>` into a
/// handler service (`Response = ()`, `Error = BoxError`).
///
/// Like [`tower::service_fn`], but fixes the request and response types and boxes the
/// error, so closures need no annotations and any `E: Into<BoxError>` works. The
/// closure is cloned with the service, so capture `Arc`s, not `&` references.
///
/// ```
/// use ferrymq_core::middleware::handler_fn;
/// use ferrymq_core::Delivery;
///
/// let handler = handler_fn(|d: Delivery| async move {
///     let text = std::str::from_utf8(d.payload())?.to_owned();
///     println!("{text}");
///     Ok::<_, std::str::Utf8Error>(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn { f }
}

/// A handler made by [`handler_fn`].
#[derive(Clone, Copy)]
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

type IntoBox<E> = fn(Result<(), E>) -> Result<(), BoxError>;

impl<F, Fut, E> Service<Delivery> for HandlerFn<F>
where
    F: FnMut(Delivery) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Map<Fut, IntoBox<E>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let into_box: IntoBox<E> = |r| r.map_err(Into::into);
        (self.f)(delivery).map(into_box)
    }
}

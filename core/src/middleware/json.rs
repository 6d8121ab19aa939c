//! Typed handlers: decode the JSON payload before the handler sees it.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::future::{ready, Either, FutureExt, Map, Ready};
use serde::de::DeserializeOwned;
use tower::{Layer, Service};

use super::error::Permanent;
use crate::delivery::Delivery;
use crate::error::BoxError;

type IntoBox<E> = fn(Result<(), E>) -> Result<(), BoxError>;

/// Adapts a service over `(T, Delivery)` into a handler over [`Delivery`] by decoding
/// the payload as JSON into `T` first.
///
/// A payload that does not decode is a [`Permanent`] error (wrapping an
/// [`ErrorKind::Decode`](crate::ErrorKind::Decode) error): no number of retries will
/// make it decode, so [`RetryToDlq`](super::RetryToDlq) dead-letters it at once. The
/// inner service is not called for it.
pub struct Json<S, T> {
    inner: S,
    _payload: PhantomData<fn() -> T>,
}

impl<S, T> Json<S, T> {
    /// Wrap `inner`.
    pub fn new(inner: S) -> Self {
        Json {
            inner,
            _payload: PhantomData,
        }
    }
}

impl<S: Clone, T> Clone for Json<S, T> {
    fn clone(&self) -> Self {
        Json::new(self.inner.clone())
    }
}

impl<S: fmt::Debug, T> fmt::Debug for Json<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Json")
            .field("inner", &self.inner)
            .field("payload", &std::any::type_name::<T>())
            .finish()
    }
}

impl<S, T> Service<Delivery> for Json<S, T>
where
    S: Service<(T, Delivery), Response = ()>,
    S::Error: Into<BoxError>,
    T: DeserializeOwned,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Ready<Result<(), BoxError>>, Map<S::Future, IntoBox<S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        match delivery.json::<T>() {
            Ok(value) => {
                let into_box: IntoBox<S::Error> = |r| r.map_err(Into::into);
                Either::Right(self.inner.call((value, delivery)).map(into_box))
            }
            Err(e) => Either::Left(ready(Err(Box::new(Permanent::new(e)) as BoxError))),
        }
    }
}

/// Layer producing [`Json`].
pub struct JsonLayer<T> {
    _payload: PhantomData<fn() -> T>,
}

impl<T> JsonLayer<T> {
    /// A layer decoding payloads into `T`.
    pub fn new() -> Self {
        JsonLayer {
            _payload: PhantomData,
        }
    }
}

impl<T> Default for JsonLayer<T> {
    fn default() -> Self {
        JsonLayer::new()
    }
}

impl<T> Clone for JsonLayer<T> {
    fn clone(&self) -> Self {
        JsonLayer::new()
    }
}

impl<T> fmt::Debug for JsonLayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLayer")
            .field("payload", &std::any::type_name::<T>())
            .finish()
    }
}

impl<S, T> Layer<S> for JsonLayer<T> {
    type Service = Json<S, T>;
    fn layer(&self, inner: S) -> Json<S, T> {
        Json::new(inner)
    }
}

/// A typed handler from an async closure `Fn(T, Delivery) -> Future<Output = Result<(), E>>`.
///
/// ```
/// use ferrymq_core::middleware::json_handler;
/// use ferrymq_core::{BoxError, Delivery};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// let handler = json_handler(|order: Order, _delivery: Delivery| async move {
///     println!("invoicing order {}", order.id);
///     Ok::<_, BoxError>(())
/// });
/// # let _ = handler;
/// ```
pub fn json_handler<T, F, Fut, E>(f: F) -> Json<JsonFn<F>, T>
where
    F: FnMut(T, Delivery) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
    T: DeserializeOwned,
{
    Json::new(JsonFn { f })
}

/// The inner service of [`json_handler`]: calls the closure with the decoded value.
#[derive(Clone, Copy)]
pub struct JsonFn<F> {
    f: F,
}

impl<F> fmt::Debug for JsonFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

impl<T, F, Fut, E> Service<(T, Delivery)> for JsonFn<F>
where
    F: FnMut(T, Delivery) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    type Response = ();
    type Error = E;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (value, delivery): (T, Delivery)) -> Fut {
        (self.f)(value, delivery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryConfig;
    use crate::middleware::is_permanent;
    use crate::{Consumer, ErrorKind, Message, Producer};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tower::ServiceExt;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u64,
    }

    #[tokio::test]
    async fn decodes_or_fails_permanently_without_calling_handler() {
        let (p, c) = MemoryConfig::new("mw-json-unit").connect().unwrap();
        p.send(Message::json(&Order { id: 7 }).unwrap())
            .await
            .unwrap();
        p.send(Message::new("not json")).await.unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let svc = json_handler(move |o: Order, _d: Delivery| {
            let seen = s2.clone();
            async move {
                seen.fetch_add(o.id, Ordering::SeqCst);
                Ok::<_, BoxError>(())
            }
        });
        let ds = c.receive(2, Duration::ZERO).await.unwrap();
        svc.clone().oneshot(ds[0].clone()).await.unwrap();
        let err = svc.oneshot(ds[1].clone()).await.unwrap_err();
        assert!(is_permanent(&*err));
        let inner = err.downcast_ref::<Permanent>().unwrap().get_ref();
        assert_eq!(
            inner.downcast_ref::<crate::Error>().unwrap().kind(),
            ErrorKind::Decode
        );
        assert_eq!(seen.load(Ordering::SeqCst), 7);
    }
}

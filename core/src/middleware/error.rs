//! Error classes the middleware understand.

use std::error::Error as StdError;
use std::fmt;

use crate::error::{BoxError, Error, ErrorKind};

/// Marks a handler error as permanent: retrying the same message cannot succeed (a
/// payload that does not decode, an order that references nothing), so
/// [`RetryToDlq`](super::RetryToDlq) dead-letters it at once instead of burning
/// attempts.
///
/// ```
/// use ferrymq_core::middleware::{is_permanent, permanent, Permanent};
/// use ferrymq_core::BoxError;
///
/// let e: BoxError = permanent("customer 42 does not exist");
/// assert!(is_permanent(&*e));
/// let e: BoxError = Box::new(Permanent::new(std::io::Error::other("bad data")));
/// assert_eq!(e.to_string(), "bad data");
/// ```
#[derive(Debug)]
pub struct Permanent {
    source: BoxError,
}

impl Permanent {
    /// Wrap `error` as permanent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Permanent {
            source: error.into(),
        }
    }

    /// The wrapped error.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// Unwrap.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for Permanent {
    // The wrapped message alone: it becomes the dead-letter reason, where a prefix
    // would only be noise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl StdError for Permanent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Shorthand for `Box::new(Permanent::new(error))`.
pub fn permanent(error: impl Into<BoxError>) -> BoxError {
    Box::new(Permanent::new(error))
}

/// Whether `error` is permanent: a [`Permanent`] anywhere in its source chain, or a
/// ferrymq [`Error`] of kind [`ErrorKind::Decode`] at the top (what
/// [`Delivery::json`](crate::Delivery::json) returns for a payload that does not fit).
///
/// Decode errors deeper in the chain are not taken as permanent: a handler whose
/// downstream HTTP call returned garbage may well succeed next time.
pub fn is_permanent(error: &(dyn StdError + 'static)) -> bool {
    if error
        .downcast_ref::<Error>()
        .is_some_and(|e| e.kind() == ErrorKind::Decode)
    {
        return true;
    }
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<Permanent>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// A handler panicked; the panic was caught and turned into this error (by
/// [`CatchPanic`](super::CatchPanic), or by the worker as a last resort). It is
/// transient: the message is retried like any other failure.
#[derive(Debug, Clone)]
pub struct HandlerPanicked {
    message: String,
}

impl HandlerPanicked {
    /// From a panic payload as returned by `catch_unwind`.
    pub fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_string()
        };
        HandlerPanicked { message }
    }

    /// The panic message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler panicked: {}", self.message)
    }
}

impl StdError for HandlerPanicked {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let decode: BoxError = Box::new(Error::new(ErrorKind::Decode, "bad json"));
        assert!(is_permanent(&*decode));
        let transient: BoxError = Box::new(Error::new(ErrorKind::Timeout, "slow"));
        assert!(!is_permanent(&*transient));
        let io: BoxError = Box::new(std::io::Error::other("x"));
        assert!(!is_permanent(&*io));
        // Permanent deep in a chain counts.
        let wrapped: BoxError =
            Box::new(Error::new(ErrorKind::Backend, "ctx").with_source(Permanent::new("inner")));
        assert!(is_permanent(&*wrapped));
        // Decode below the top does not.
        let deep: BoxError = Box::new(
            Error::new(ErrorKind::Backend, "ctx")
                .with_source(Error::new(ErrorKind::Decode, "downstream")),
        );
        assert!(!is_permanent(&*deep));
    }

    #[test]
    fn panic_payloads() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(HandlerPanicked::from_payload(&*p).message(), "boom 1");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(
            HandlerPanicked::from_payload(&*p).to_string(),
            "handler panicked: static"
        );
    }
}

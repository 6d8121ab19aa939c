//! The one error type of ferrymq: a kind to match on, a message for humans, and the
//! backend's own error as `source` where there is one.

use std::fmt;

/// Boxed error used for handler failures and backend sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout ferrymq.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
///
/// Match on the kind, not on the message text: messages are for people and may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The queue is at its configured bound; nothing was enqueued. Try again later.
    QueueFull,
    /// The message exceeds the backend's maximum size; nothing was enqueued.
    TooLarge,
    /// The message itself is malformed (for example an invalid header name or value);
    /// nothing was enqueued.
    InvalidMessage,
    /// A URL or config value is wrong; the message names the parameter.
    InvalidConfig,
    /// The queue, topic or key does not exist.
    NotFound,
    /// The backend cannot do this (see [`Capabilities`](crate::Capabilities)).
    Unsupported,
    /// The producer or consumer was closed.
    Closed,
    /// The delivery was already acked or nacked through this handle.
    AlreadyAcked,
    /// The delivery's lease is gone: its visibility timeout passed and it was handed to
    /// another consumer, so this handle may no longer settle it.
    LeaseExpired,
    /// The payload could not be decoded into the requested type.
    Decode,
    /// An operation did not complete in time.
    Timeout,
    /// The server could not be reached, or the connection broke.
    Connection,
    /// The server refused the credentials.
    Auth,
    /// A key or resource of the wrong type, or state the backend did not expect.
    Backend,
    /// The broker is throttling this client (SQS `ThrottlingException`, Kafka quota);
    /// nothing was done. Try again after a pause.
    Throttled,
    /// The request may or may not have taken effect: it left this process and no
    /// answer came back (a send timing out after the request was written, librdkafka's
    /// "possibly persisted"). Unlike every other error of `send`, the message may be
    /// on the broker: a retry is at-least-once and may duplicate it.
    OutcomeUnknown,
}

impl ErrorKind {
    /// Whether retrying the same operation later may succeed. For
    /// [`OutcomeUnknown`](ErrorKind::OutcomeUnknown) a retry may also duplicate.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::QueueFull
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Throttled
                | ErrorKind::OutcomeUnknown
        )
    }

    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::QueueFull => "queue full",
            ErrorKind::TooLarge => "message too large",
            ErrorKind::InvalidMessage => "invalid message",
            ErrorKind::InvalidConfig => "invalid config",
            ErrorKind::NotFound => "not found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::AlreadyAcked => "already acked",
            ErrorKind::LeaseExpired => "lease expired",
            ErrorKind::Decode => "decode error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Connection => "connection error",
            ErrorKind::Auth => "authentication failed",
            ErrorKind::Backend => "backend error",
            ErrorKind::Throttled => "throttled",
            ErrorKind::OutcomeUnknown => "outcome unknown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ferrymq error: [`kind`](Error::kind) to match on, a message, an optional source.
///
/// One pointer wide (the parts are boxed, as `std::io::Error` does): a
/// `Result<()>` is then 8 bytes instead of 48, and every settle's result, the
/// Worker's per-delivery reports and the futures that hold them move that much
/// less on the success path, where no error is ever built.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("message", &self.inner.message)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                source: None,
            }),
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The human-readable message (without the kind prefix).
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// Shorthand for [`ErrorKind::InvalidConfig`] naming the offending parameter.
    pub fn invalid_config(param: &str, why: impl fmt::Display) -> Self {
        Error::new(ErrorKind::InvalidConfig, format!("`{param}`: {why}"))
    }

    /// Shorthand for [`ErrorKind::Closed`].
    pub fn closed(what: &str) -> Self {
        Error::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::Backend`] wrapping a source error.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::new(ErrorKind::Backend, message).with_source(source)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.kind, self.inner.message)?;
        if let Some(source) = &self.inner.source {
            write!(f, " ({source})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(
            ErrorKind::Decode,
            "JSON payload could not be (de)serialized",
        )
        .with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_message_and_source() {
        let io = std::io::Error::other("boom");
        let e = Error::new(ErrorKind::Connection, "redis at 127.0.0.1:1").with_source(io);
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert_eq!(
            e.to_string(),
            "connection error: redis at 127.0.0.1:1 (boom)"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn invalid_config_names_parameter() {
        let e = Error::invalid_config("visibility", "expected a duration like 30s");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("`visibility`"));
    }

    #[test]
    fn an_error_is_one_pointer_and_a_unit_result_too() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
        assert_eq!(
            std::mem::size_of::<Result<()>>(),
            std::mem::size_of::<usize>()
        );
        let e = Error::new(ErrorKind::Timeout, "slow").with_source(std::io::Error::other("x"));
        assert_eq!(
            format!("{e:?}"),
            r#"Error { kind: Timeout, message: "slow", source: Some(Custom { kind: Other, error: "x" }) }"#
        );
    }

    #[test]
    fn transient_kinds() {
        assert!(ErrorKind::QueueFull.is_transient());
        assert!(!ErrorKind::TooLarge.is_transient());
    }
}

//! SDK errors as ferrymq error kinds.
//!
//! The SDK retries transient failures itself (standard retry mode, `max_attempts`),
//! so an error that reaches this mapping is final for the call; ferrymq does not
//! retry on top.

use std::error::Error as StdError;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use ferrymq_core::{Error, ErrorKind};

/// What kind of call failed: decides what a lost answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// `SendMessage` / `SendMessageBatch`: a lost answer may mean enqueued.
    Send,
    /// Anything else.
    Other,
}

/// Service error codes, as the SDK reports them (the JSON protocol's short names
/// and the query-compatible `AWS.SimpleQueueService.*` forms).
fn kind_of_code(code: &str, call: Call) -> Option<ErrorKind> {
    let code = code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code);
    Some(match code {
        "ThrottlingException"
        | "Throttling"
        | "RequestThrottled"
        | "ThrottledException"
        | "TooManyRequestsException"
        | "KmsThrottled"
        | "OverLimit"
        | "PurgeQueueInProgress" => ErrorKind::Throttled,
        "QueueDoesNotExist" | "NonExistentQueue" | "ResourceNotFoundException" => {
            ErrorKind::NotFound
        }
        "ReceiptHandleIsInvalid" | "MessageNotInflight" | "InvalidReceiptHandle" => {
            ErrorKind::LeaseExpired
        }
        "AccessDenied"
        | "AccessDeniedException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "UnrecognizedClientException"
        | "InvalidSecurity"
        | "MissingAuthenticationToken"
        | "ExpiredToken"
        | "AuthFailure"
        | "IncompleteSignature"
        | "OptInRequired"
        | "KmsAccessDenied"
        | "RequestExpired" => ErrorKind::Auth,
        "UnsupportedOperation" => ErrorKind::Unsupported,
        "QueueNameExists" | "QueueAlreadyExists" | "QueueDeletedRecently" => {
            ErrorKind::InvalidConfig
        }
        "InvalidParameterValue"
        | "InvalidParameterValueException"
        | "InvalidMessageContents"
        | "InvalidAttributeName"
        | "InvalidAttributeValue"
        | "MissingParameter"
        | "InvalidBatchEntryId"
        | "BatchEntryIdsNotDistinct"
        | "TooManyEntriesInBatchRequest"
        | "EmptyBatchRequest"
        | "BatchRequestTooLong"
        | "InvalidAddress"
        | "InvalidIdFormat"
        | "ValidationError" => match call {
            Call::Send => ErrorKind::InvalidMessage,
            Call::Other => ErrorKind::InvalidConfig,
        },
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "KmsUnavailable" => match call
        {
            Call::Send => ErrorKind::OutcomeUnknown,
            Call::Other => ErrorKind::Connection,
        },
        _ => return None,
    })
}

/// [`kind_of_code`], but a bad-parameter error about the receipt handle ("Value …
/// for parameter ReceiptHandle is invalid. Reason: The receipt handle has expired.",
/// what SQS answers for a handle past its visibility timeout) is `LeaseExpired`: the
/// lease is gone, nothing is wrong with the configuration.
fn kind_of(code: &str, message: Option<&str>, call: Call) -> Option<ErrorKind> {
    let bad_parameter = matches!(
        code.strip_prefix("AWS.SimpleQueueService.").unwrap_or(code),
        "InvalidParameterValue" | "InvalidParameterValueException"
    );
    if bad_parameter && message.is_some_and(|m| m.contains("ReceiptHandle")) {
        return Some(ErrorKind::LeaseExpired);
    }
    kind_of_code(code, call)
}

/// The kind of a per-entry failure of a batch call (`BatchResultErrorEntry`).
pub(crate) fn batch_entry_kind(
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
    call: Call,
) -> ErrorKind {
    kind_of(code, message, call).unwrap_or(if sender_fault {
        ErrorKind::Backend
    } else {
        match call {
            Call::Send => ErrorKind::OutcomeUnknown,
            Call::Other => ErrorKind::Connection,
        }
    })
}

/// Whether the chain holds an I/O error from before any byte of the request left:
/// no connection could be made (refused, unreachable, DNS).
fn is_connect_failure(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::AddrNotAvailable
                    | K::NetworkUnreachable
                    | K::HostUnreachable
                    | K::NotFound
            ) {
                return true;
            }
        }
        let text = e.to_string();
        if text.contains("dns error")
            || text.contains("tcp connect error")
            || text.contains("HTTP connect timeout")
            || text.contains("client error (Connect)")
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Map an SDK error of `what` (e.g. "SendMessage to queue orders") to a ferrymq
/// error. The message carries the SDK's full error context, which names codes and
/// causes but no credentials.
pub(crate) fn map_sdk<E, R>(what: &str, call: Call, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let context = DisplayErrorContext(&err).to_string();
    let kind = match &err {
        SdkError::ConstructionFailure(_) => {
            if context.contains("credentials") || context.contains("identity") {
                ErrorKind::Auth
            } else {
                ErrorKind::InvalidConfig
            }
        }
        SdkError::TimeoutError(_) => match call {
            Call::Send => ErrorKind::OutcomeUnknown,
            Call::Other => ErrorKind::Timeout,
        },
        SdkError::DispatchFailure(d) => {
            let connect = is_connect_failure(&err);
            if connect {
                ErrorKind::Connection
            } else if d.is_user() {
                ErrorKind::InvalidConfig
            } else if d.is_timeout() {
                match call {
                    Call::Send => ErrorKind::OutcomeUnknown,
                    Call::Other => ErrorKind::Timeout,
                }
            } else {
                match call {
                    // The connection broke: the request may have been written.
                    Call::Send => ErrorKind::OutcomeUnknown,
                    Call::Other => ErrorKind::Connection,
                }
            }
        }
        SdkError::ResponseError(_) => match call {
            Call::Send => ErrorKind::OutcomeUnknown,
            Call::Other => ErrorKind::Connection,
        },
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            match kind_of(code, service.err().message(), call) {
                Some(kind) => kind,
                None if context.contains("credentials") => ErrorKind::Auth,
                None => ErrorKind::Backend,
            }
        }
        _ => ErrorKind::Backend,
    };
    let hint = match kind {
        ErrorKind::OutcomeUnknown => {
            "; the request left and no answer came back, so it may have taken effect"
        }
        ErrorKind::Throttled => "; SQS is throttling, try again after a pause",
        _ => "",
    };
    Error::new(kind, format!("SQS {what}: {context}{hint}")).with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(
            kind_of_code("AWS.SimpleQueueService.NonExistentQueue", Call::Other),
            Some(ErrorKind::NotFound)
        );
        assert_eq!(
            kind_of_code("ThrottlingException", Call::Send),
            Some(ErrorKind::Throttled)
        );
        assert_eq!(
            kind_of_code("InvalidParameterValue", Call::Send),
            Some(ErrorKind::InvalidMessage)
        );
        assert_eq!(
            kind_of_code("InternalError", Call::Send),
            Some(ErrorKind::OutcomeUnknown)
        );
        assert_eq!(
            kind_of_code("ReceiptHandleIsInvalid", Call::Other),
            Some(ErrorKind::LeaseExpired)
        );
        assert_eq!(kind_of_code("Whatever", Call::Other), None);
        assert_eq!(
            batch_entry_kind("Whatever", None, false, Call::Send),
            ErrorKind::OutcomeUnknown
        );
    }

    /// SQS (and LocalStack) answer a settle with a receipt handle whose visibility
    /// timeout ran out — on FIFO queues even in the lease clock's last moments —
    /// with `InvalidParameterValue`, naming the handle: the lease is gone, which is
    /// `LeaseExpired`, not a configuration error.
    #[test]
    fn an_expired_receipt_handle_is_a_lost_lease() {
        let expired = "Value NzQ2...== for parameter ReceiptHandle is invalid. Reason: The \
                       receipt handle has expired.";
        for code in ["InvalidParameterValue", "InvalidParameterValueException"] {
            assert_eq!(
                batch_entry_kind(code, Some(expired), true, Call::Other),
                ErrorKind::LeaseExpired,
                "{code}"
            );
            assert_eq!(
                kind_of(code, Some(expired), Call::Other),
                Some(ErrorKind::LeaseExpired)
            );
        }
        // Any other bad parameter stays what it was.
        assert_eq!(
            batch_entry_kind(
                "InvalidParameterValue",
                Some("Value 99999 for parameter VisibilityTimeout is invalid."),
                true,
                Call::Other
            ),
            ErrorKind::InvalidConfig
        );
    }

    #[test]
    fn refused_connections_are_connection_errors() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_connect_failure(&io));
        let other = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(!is_connect_failure(&other));
    }
}

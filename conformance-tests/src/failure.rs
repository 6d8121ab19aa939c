//! How a case fails: a message that says what was expected and what happened.

use std::fmt;
use std::panic::Location;

/// The outcome of a case: `Ok(())` passes.
///
/// Cases may also fail by panicking (`assert!`, `assert_eq!`): the harness reports
/// the panic message as the failure, so plain assertions are fine.
pub type CaseResult<T = ()> = Result<T, Failure>;

/// A case failure, with the source location that raised it.
///
/// Backend errors convert with `?`, keeping the location of the `?`.
#[derive(Debug)]
pub struct Failure {
    message: String,
    location: &'static Location<'static>,
}

impl Failure {
    /// A failure with this explanation, located at the caller.
    #[track_caller]
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            location: Location::caller(),
        }
    }

    /// A failure raised at `location` (for helpers that capture their caller's
    /// location before an `.await`).
    pub fn located(message: impl Into<String>, location: &'static Location<'static>) -> Self {
        Failure {
            message: message.into(),
            location,
        }
    }

    /// The explanation, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (at {}:{})",
            self.message,
            self.location.file(),
            self.location.line()
        )
    }
}

impl std::error::Error for Failure {}

impl From<ferrymq_core::Error> for Failure {
    #[track_caller]
    fn from(e: ferrymq_core::Error) -> Self {
        Failure::new(format!("unexpected backend error: {e}"))
    }
}

/// Fail the case with a formatted message unless `cond` holds.
///
/// ```
/// use ferrymq_conformance::{ensure, CaseResult};
/// fn check(n: usize) -> CaseResult {
///     ensure!(n < 3, "expected fewer than 3, got {n}");
///     Ok(())
/// }
/// assert!(check(1).is_ok());
/// assert!(check(5).unwrap_err().to_string().contains("got 5"));
/// ```
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return ::std::result::Result::Err($crate::Failure::new(format!($($arg)+)));
        }
    };
}

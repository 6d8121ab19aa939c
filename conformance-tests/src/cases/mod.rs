//! The cases, grouped by the promise they check. Each is
//! `pub async fn name(ctx: &Context) -> CaseResult` and is listed once in
//! [`CASES`](crate::CASES).
//!
//! Rules every case follows: it uses only fresh queues from [`Context::queue`]
//! (so cases run in parallel), bounds every wait, keeps to a few seconds, reads
//! timing from the capabilities (visibility timeout) and the factory's timer slack,
//! and asserts what the API promises — never what one backend happens to do.
//!
//! [`Context::queue`]: crate::Context::queue

pub mod admin;
pub mod basics;
pub mod capacity;
pub mod concurrency;
pub mod lifecycle;
pub mod limits;
pub mod ordering;
pub mod receiving;
pub mod schedules;
pub mod scheduling;
pub mod settle;
pub mod validation;
pub mod visibility;

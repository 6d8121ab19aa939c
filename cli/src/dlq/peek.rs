//! Peeking by leasing: the fallback of `ferry dlq peek --lease` for backends without
//! a native peek ([`Admin::peek`](ferrymq::Admin::peek) answering `Unsupported`, as
//! SQS does: it has no way to read a message without receiving it).
//!
//! Receive — which leases the messages — show them, then give every lease back with
//! `release(None)` (a `nack(None)` where the backend cannot release without
//! counting). The messages stay in the queue, deliverable again at once. Side
//! effects a user should know about, and which `ferry dlq peek --help` states:
//!
//! - while peek holds them (a moment), other consumers do not see them;
//! - on backends that count receives (SQS `ApproximateReceiveCount`), each peek
//!   counts as one — and can push a message over a native `maxReceiveCount`;
//! - on backends with per-key ordering, a key's later messages stay hidden while its
//!   first one is leased, so peek shows the first message of each key.
//!
//! All leases are held until the end, so a message is never shown twice.

use std::time::Duration;

use ferrymq::{Consumer, Delivery, Result};

/// At most this many per receive call.
const BATCH: usize = 100;

/// What [`peek`] saw.
#[derive(Debug, Default)]
pub struct Peeked {
    /// Messages shown.
    pub shown: usize,
    /// Messages still waiting in the queue after the peek that were not shown (more
    /// than `max`, or hidden behind a leased message of the same key).
    pub not_shown: u64,
}

/// Lease up to `max` messages of `dlq` (waiting up to `wait` for the first), hand each
/// to `show`, then release them all. A failed release is an error, but loses nothing:
/// the message comes back after the visibility timeout.
pub async fn peek(
    dlq: &dyn Consumer,
    max: usize,
    wait: Duration,
    mut show: impl FnMut(usize, &Delivery),
) -> Result<Peeked> {
    let mut held: Vec<Delivery> = Vec::new();
    let mut receive_error = None;
    while held.len() < max {
        let wait = if held.is_empty() {
            wait
        } else {
            Duration::ZERO
        };
        match dlq.receive((max - held.len()).min(BATCH), wait).await {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => {
                for d in batch {
                    show(held.len() + 1, &d);
                    held.push(d);
                }
            }
            Err(e) => {
                receive_error = Some(e);
                break;
            }
        }
    }
    let shown = held.len();
    let mut release_error = None;
    for d in held {
        if let Err(e) = d.release(None).await {
            release_error.get_or_insert(e);
        }
    }
    if let Some(e) = receive_error.or(release_error) {
        return Err(e);
    }
    let not_shown = if dlq.capabilities().depth.is_available() {
        dlq.depth()
            .await
            .map(|d| d.waiting + d.delayed)
            .unwrap_or(0)
    } else {
        0
    }
    .saturating_sub(shown as u64);
    Ok(Peeked { shown, not_shown })
}

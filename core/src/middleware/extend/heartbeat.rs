use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use crate::delivery::AckHandle;
use crate::error::ErrorKind;

/// Extends `acker` by `timeout` every `every` until settled, lost, or aborted.
pub(super) async fn run(acker: AckHandle, timeout: Duration, every: Duration) {
    let mut next = crate::time::deadline_in(every);
    loop {
        sleep_until(next).await;
        if acker.is_settled() {
            return;
        }
        match acker.extend(timeout).await {
            Ok(()) => {
                metrics::counter!("ferrymq_visibility_extended_total").increment(1);
            }
            Err(e) if matches!(e.kind(), ErrorKind::AlreadyAcked | ErrorKind::LeaseExpired) => {
                if e.kind() == ErrorKind::LeaseExpired {
                    tracing::warn!(error = %e, "visibility heartbeat: the lease is gone; the message may be handled twice");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "visibility heartbeat: extend failed; trying again")
            }
        }
        next = crate::time::deadline_after(next, every);
    }
}

/// Aborts the heartbeat task when dropped: on completion, error, panic unwinding or
/// cancellation of the handler future alike.
#[derive(Debug)]
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

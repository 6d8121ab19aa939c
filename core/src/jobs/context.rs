//! The job a handler is running, reachable from inside it without a new parameter:
//! [`TrackJobs`](super::TrackJobs) runs the stack inside a task-local scope, as the
//! worker does for [`outcome`](crate::middleware::outcome).

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use super::JobStore;
use crate::error::Result;

/// The job being handled: its id and its store. Cheap to clone, and `Send`, so a
/// handler may hand it to a task it spawns to report progress from there.
#[derive(Clone)]
pub struct JobContext {
    id: Arc<str>,
    attempt: u32,
    store: Arc<dyn JobStore>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("queue", &self.store.queue())
            .finish()
    }
}

impl JobContext {
    pub(super) fn new(id: Arc<str>, attempt: u32, store: Arc<dyn JobStore>) -> Self {
        JobContext { id, attempt, store }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The delivery's attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        self.store.queue()
    }

    /// Record `value` (a number, or any small serializable value) as the job's
    /// progress and emit a progress event.
    ///
    /// A value over [`MAX_VALUE_BYTES`](super::MAX_VALUE_BYTES) as JSON is
    /// [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge), and nothing is recorded.
    pub async fn progress(&self, value: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(value)?;
        if let Some(len) = super::types::oversized(&value) {
            return Err(crate::Error::new(
                crate::ErrorKind::TooLarge,
                format!(
                    "progress of job {:?}: {len} bytes of JSON, the limit is {}",
                    self.id,
                    super::MAX_VALUE_BYTES
                ),
            ));
        }
        self.store.progress(&self.id, self.attempt, value).await
    }
}

struct Scope {
    job: JobContext,
    result: RefCell<Option<serde_json::Value>>,
}

tokio::task_local! {
    static JOB: Scope;
}

/// The job the calling handler runs, inside [`TrackJobs`](super::TrackJobs);
/// `None` outside it.
pub fn current() -> Option<JobContext> {
    JOB.try_with(|s| s.job.clone()).ok()
}

/// Report progress of the job the calling handler runs (see
/// [`JobContext::progress`]). Progress is advisory: outside a tracked handler it
/// does nothing, and a store that fails is logged, never failing the handler.
pub async fn progress(value: impl Serialize) {
    let Some(job) = current() else {
        return;
    };
    if let Err(e) = job.progress(value).await {
        tracing::warn!(queue = job.queue(), job = job.id(), error = %e, "recording progress failed");
    }
}

/// Set the result of the job the calling handler runs, for handlers whose response
/// must stay `()` (under [`RetryToDlq`](crate::middleware::RetryToDlq));
/// [`json_job_handler`](super::json_job_handler) does this with what its closure
/// returns. The last value set wins. A value that does not serialize is
/// [`ErrorKind::Decode`](crate::ErrorKind::Decode); outside a tracked handler this
/// does nothing.
pub fn set_result(value: impl Serialize) -> Result<()> {
    let value = serde_json::to_value(value)?;
    let _ = JOB.try_with(|s| *s.result.borrow_mut() = Some(value).filter(|v| !v.is_null()));
    Ok(())
}

/// Run `future` as job `job`; returns its output and the result set inside it.
pub(super) async fn scope<F: Future>(
    job: JobContext,
    future: F,
) -> (F::Output, Option<serde_json::Value>) {
    JOB.scope(
        Scope {
            job,
            result: RefCell::new(None),
        },
        async move {
            let output = future.await;
            let result = JOB
                .try_with(|s| s.result.borrow_mut().take())
                .ok()
                .flatten();
            (output, result)
        },
    )
    .await
}

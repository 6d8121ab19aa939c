//! What a case is given: the backend factory, its capabilities, and the timing
//! budgets derived from them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::admin::Admin;
use ferrymq_core::{Accuracy, Capabilities, Consumer, Producer};

use crate::backend::Backend;
use crate::claims::Claims;
use crate::failure::{CaseResult, Failure};

/// Longest a single backend call (open, send, ack, depth) may take before the case
/// fails as hung.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One case's view of the backend: opens fresh queues and remembers them so the
/// harness can [`cleanup`](Backend::cleanup) after the case.
pub struct Context {
    backend: Arc<dyn Backend>,
    claims: Claims,
    case: &'static str,
    queues: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("backend", &self.backend.name())
            .field("case", &self.case)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for running `case` against `backend`, with claims made of its
    /// capabilities alone (see [`Claims::from_capabilities`]); build one yourself to
    /// call a case directly. The harness uses [`with_claims`](Context::with_claims)
    /// with what it probed.
    pub fn new(backend: Arc<dyn Backend>, case: &'static str) -> Self {
        let claims = Claims::from_capabilities(backend.capabilities());
        Self::with_claims(backend, claims, case)
    }

    /// A context for running `case` against `backend`, which makes `claims`.
    pub fn with_claims(backend: Arc<dyn Backend>, claims: Claims, case: &'static str) -> Self {
        Context {
            backend,
            claims,
            case,
            queues: Mutex::new(Vec::new()),
        }
    }

    /// The backend factory.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The concrete factory, for a backend's own cases
    /// ([`Backend::extra_cases`]); `None` when it is another type or does not
    /// implement [`Backend::as_any`].
    pub fn backend_as<B: Backend>(&self) -> Option<&B> {
        self.backend.as_any()?.downcast_ref::<B>()
    }

    /// The backend's capabilities.
    pub fn caps(&self) -> &Capabilities {
        &self.claims.capabilities
    }

    /// Everything the backend claims: capabilities and what the harness probed.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// The case being run.
    pub fn case(&self) -> &'static str {
        self.case
    }

    /// A fresh queue name, remembered for cleanup.
    pub fn queue(&self) -> String {
        let name = self.backend.queue_name(self.case);
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        name
    }

    /// The queues named so far.
    pub fn queues(&self) -> Vec<String> {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A producer and a consumer on `queue`.
    pub async fn open(&self, queue: &str) -> CaseResult<(Box<dyn Producer>, Box<dyn Consumer>)> {
        bounded(format!("opening queue {queue}"), self.backend.open(queue)).await
    }

    /// A fresh queue with a producer and a consumer on it.
    pub async fn fresh(&self) -> CaseResult<(String, Box<dyn Producer>, Box<dyn Consumer>)> {
        let queue = self.queue();
        let (p, c) = self.open(&queue).await?;
        Ok((queue, p, c))
    }

    /// A new producer on `queue`.
    pub async fn producer(&self, queue: &str) -> CaseResult<Box<dyn Producer>> {
        bounded(
            format!("opening a producer on {queue}"),
            self.backend.producer(queue),
        )
        .await
    }

    /// A new consumer on `queue`, competing with the others.
    pub async fn consumer(&self, queue: &str) -> CaseResult<Box<dyn Consumer>> {
        bounded(
            format!("opening a consumer on {queue}"),
            self.backend.consumer(queue),
        )
        .await
    }

    /// The administration of `queue` (the factory's [`Backend::admin`]).
    pub async fn admin(&self, queue: &str) -> CaseResult<Box<dyn Admin>> {
        bounded(
            format!("opening the admin of {queue}"),
            self.backend.admin(queue),
        )
        .await
    }

    /// The dedup store the backend wants the Dedup middleware cases to prove.
    pub async fn dedup_store(
        &self,
        queue: &str,
    ) -> CaseResult<Arc<dyn ferrymq_core::middleware::DedupStore>> {
        bounded(
            format!("opening the dedup store of {queue}"),
            self.backend.dedup_store(queue),
        )
        .await
    }

    /// The visibility timeout the factory chose, if the backend has leases.
    pub fn visibility(&self) -> Option<Duration> {
        self.claims.capabilities.visibility_timeout
    }

    /// How late the backend's timers may fire.
    pub fn slack(&self) -> Duration {
        self.backend.timer_slack()
    }

    /// Bound for something that should happen right away (a sent message becoming
    /// receivable). Generous, since passing cases return as soon as it happens.
    pub fn prompt(&self) -> Duration {
        Duration::from_secs(5) + self.slack()
    }

    /// How long to watch to be confident that nothing (more) is coming when nothing
    /// is due: at least 300 ms, at least the timer slack.
    pub fn quiet(&self) -> Duration {
        Duration::from_millis(300).max(self.slack())
    }

    /// Bound for an un-acked delivery to come back: the visibility timeout plus the
    /// slack, plus the prompt bound.
    pub fn redelivery_bound(&self) -> Duration {
        self.visibility().unwrap_or_default() + self.prompt()
    }

    /// Bound for something that must happen well before a lease could have run out
    /// (a nacked or released message coming back): three quarters of the visibility
    /// timeout, so it cannot be mistaken for a lease expiry; the prompt bound
    /// without leases.
    pub fn before_lease_expiry(&self) -> Duration {
        match self.visibility() {
            Some(vis) => vis.mul_f64(0.75),
            None => self.prompt(),
        }
    }

    /// Bound for a depth count to show a change: the prompt bound for exact depth,
    /// the backend's [`approximate_depth_lag`](Backend::approximate_depth_lag) for
    /// approximate depth (an eventually-true check). Passing checks return as soon
    /// as the count matches.
    pub fn depth_bound(&self) -> Duration {
        match self.claims.capabilities.depth {
            Accuracy::Approximate => self.backend.approximate_depth_lag().max(self.prompt()),
            _ => self.prompt(),
        }
    }

    pub(crate) async fn cleanup(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        for queue in self.queues() {
            match tokio::time::timeout(CALL_TIMEOUT, self.backend.cleanup(&queue)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("cleanup of queue {queue} failed: {e}")),
                Err(_) => errors.push(format!(
                    "cleanup of queue {queue} did not finish within {CALL_TIMEOUT:?}"
                )),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Await `fut`, failing the case if it takes longer than [`CALL_TIMEOUT`] or errs.
#[track_caller]
pub fn bounded<T, F>(
    what: impl Into<String>,
    fut: F,
) -> impl std::future::Future<Output = CaseResult<T>>
where
    F: std::future::Future<Output = ferrymq_core::Result<T>>,
{
    let location = std::panic::Location::caller();
    let what = what.into();
    async move {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failure::located(format!("{what}: {e}"), location)),
            Err(_) => Err(Failure::located(
                format!("{what}: no answer within {CALL_TIMEOUT:?}"),
                location,
            )),
        }
    }
}

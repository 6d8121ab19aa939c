//! [`TrackJobs`]: the layer that records each delivery's job in a [`JobStore`],
//! composed around a handler stack rather than built into the worker.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{FutureExt, Map};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::{Layer, Service};

use super::context::{self, JobContext};
use super::flow::{ChildAcked, ChildOutcome, FlowParent, Release};
use super::types::{job_id_of, JobState, JobUpdate, Keep};
use super::JobStore;
use crate::delivery::Delivery;
use crate::error::{BoxError, Error, ErrorKind};
use crate::message::reserved;
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::{permanent, BoxFuture, Json};
use crate::producer::Producer;

/// Records the job of every delivery it handles: `active` when the handler starts,
/// then `completed` with the handler's result (after acking the delivery itself),
/// or `waiting` (retried), `failed` or `dead_lettered` with the error, as the layers
/// inside it decided; each step emits its [`JobEvent`](super::JobEvent). Inside, the
/// handler reaches its job through [`progress`](super::progress),
/// [`set_result`](super::set_result) and [`current`](super::current).
///
/// Place it **outside** [`RetryToDlq`](crate::middleware::RetryToDlq) (it reads the
/// outcome that layer records) and **inside**
/// [`Dedup`](crate::middleware::Dedup) (a duplicate never reaches it, so it cannot
/// overwrite the original's record; under it, a skipped duplicate would leave the
/// record `active`, as the layer records that before the stack runs):
///
/// ```text
/// ExtendVisibility → Dedup → TrackJobs → RetryToDlq → CatchPanic → json_job_handler
/// ```
///
/// The inner service's response is the job's result: any `Serialize` value (`()`
/// records none). Under `RetryToDlq`, whose response is `()`, the result travels
/// through [`set_result`](super::set_result) — which [`json_job_handler`] does.
///
/// A store that fails is logged, never failing the delivery: jobs are bookkeeping,
/// and the message's handling must not depend on them.
pub struct TrackJobs<S> {
    inner: S,
    config: Arc<Config>,
}

struct Config {
    store: Arc<dyn JobStore>,
    keep_completed: Keep,
    keep_failed: Keep,
    flows: Option<Flows>,
}

/// Where flows are recorded and where their parents go.
#[derive(Clone)]
struct Flows {
    store: Arc<dyn JobStore>,
    parents: Vec<FlowParent>,
}

impl<S: Clone> Clone for TrackJobs<S> {
    fn clone(&self) -> Self {
        TrackJobs {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for TrackJobs<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackJobs")
            .field("inner", &self.inner)
            .field("store", &self.config.store)
            .field("keep_completed", &self.config.keep_completed)
            .field("keep_failed", &self.config.keep_failed)
            .finish()
    }
}

/// Layer producing [`TrackJobs`].
#[derive(Clone)]
pub struct TrackJobsLayer {
    store: Arc<dyn JobStore>,
    keep_completed: Keep,
    keep_failed: Keep,
    flows: Option<Flows>,
}

impl fmt::Debug for TrackJobsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackJobsLayer")
            .field("store", &self.store)
            .field("keep_completed", &self.keep_completed)
            .field("keep_failed", &self.keep_failed)
            .field(
                "flow_parents",
                &self.flows.as_ref().map(|f| {
                    f.parents
                        .iter()
                        .map(|p| p.queue().to_string())
                        .collect::<Vec<_>>()
                }),
            )
            .finish()
    }
}

impl TrackJobsLayer {
    /// Record jobs in `store`, keeping nothing once finished (set
    /// [`keep_completed`](Self::keep_completed) / [`keep_failed`](Self::keep_failed)).
    pub fn new(store: impl JobStore + 'static) -> Self {
        TrackJobsLayer {
            store: Arc::new(store),
            keep_completed: Keep::None,
            keep_failed: Keep::None,
            flows: None,
        }
    }

    /// Complete [`Flow`](super::Flow)s: the deliveries handled here may be a flow's
    /// children, recorded in this layer's store (or the one of
    /// [`flow_store`](Self::flow_store)); a released parent goes out through
    /// `parent`, whose queue must be the flow's parent queue. Call once per parent
    /// queue. See the [flow module](super::flow) for what is guaranteed.
    pub fn flows(mut self, parent: impl Producer + 'static) -> Self {
        let flows = self.flows.get_or_insert_with(|| Flows {
            store: self.store.clone(),
            parents: Vec::new(),
        });
        flows.parents.push(FlowParent::new(parent));
        self
    }

    /// Record flows in `store` rather than in the layer's own store (children in
    /// several queues sharing one flow store).
    pub fn flow_store(mut self, store: impl JobStore + 'static) -> Self {
        let store: Arc<dyn JobStore> = Arc::new(store);
        match &mut self.flows {
            Some(flows) => flows.store = store,
            None => {
                self.flows = Some(Flows {
                    store,
                    parents: Vec::new(),
                })
            }
        }
        self
    }

    /// The queue's retention of completed jobs; a message's
    /// [`KEEP_COMPLETED`](reserved::KEEP_COMPLETED) header overrides it.
    pub fn keep_completed(mut self, keep: Keep) -> Self {
        self.keep_completed = keep;
        self
    }

    /// The queue's retention of failed and dead-lettered jobs; a message's
    /// [`KEEP_FAILED`](reserved::KEEP_FAILED) header overrides it.
    pub fn keep_failed(mut self, keep: Keep) -> Self {
        self.keep_failed = keep;
        self
    }
}

impl<S> Layer<S> for TrackJobsLayer {
    type Service = TrackJobs<S>;
    fn layer(&self, inner: S) -> TrackJobs<S> {
        TrackJobs {
            inner,
            config: Arc::new(Config {
                store: self.store.clone(),
                keep_completed: self.keep_completed,
                keep_failed: self.keep_failed,
                flows: self.flows.clone(),
            }),
        }
    }
}

impl Config {
    /// The retention of `state` for `delivery`: its header, else the queue's.
    fn keep(&self, delivery: &Delivery, state: JobState) -> Keep {
        let (header, default) = match state {
            JobState::Completed => (reserved::KEEP_COMPLETED, self.keep_completed),
            JobState::Failed | JobState::DeadLettered => (reserved::KEEP_FAILED, self.keep_failed),
            JobState::Waiting | JobState::Active => return Keep::None,
        };
        match delivery.headers().get(header).map(str::parse::<Keep>) {
            Some(Ok(keep)) => keep,
            Some(Err(e)) => {
                tracing::warn!(queue = %delivery.meta().queue, id = %delivery.id(), error = %e, "ignoring the message's {header} header");
                default
            }
            None => default,
        }
    }

    /// A flow child ended: record it under its flow and send the parent when
    /// released. `Err` when a step failed: the child must not be acked yet.
    async fn child_done(
        &self,
        delivery: &Delivery,
        child: &str,
        outcome: ChildOutcome,
    ) -> Result<(), Error> {
        let Some(parent) = delivery.headers().get(reserved::FLOW_PARENT) else {
            return Ok(());
        };
        let Some(flows) = &self.flows else {
            tracing::warn!(queue = %delivery.meta().queue, job = child, flow = parent, "a flow's child ended, but this TrackJobs layer has no flows(): its parent is never released");
            return Ok(());
        };
        match flows.store.child_done(parent, child, outcome).await? {
            Release::Wait => Ok(()),
            Release::Failed { reason } => {
                let update = JobUpdate::new(parent, JobState::DeadLettered, 0)
                    .failure(reason)
                    .keep(self.keep_failed);
                flows.store.record(update).await
            }
            Release::Send { queue, message } => {
                let producer = flows.parents.iter().find(|p| p.queue() == queue).ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidConfig,
                        format!(
                            "flow {parent:?}: its parent goes to queue {queue:?}, and this TrackJobs layer has no flows() producer for it"
                        ),
                    )
                })?;
                let receipt = producer.producer().send(message).await?;
                tracing::info!(queue = %queue, flow = parent, duplicate = receipt.is_duplicate(), "flow complete: parent sent");
                flows.store.parent_sent(parent).await
            }
        }
    }

    /// A flow child completed: where the flow store and the child's backend can,
    /// record its result, send the parent if it was the last, and ack the child in
    /// one atomic step (`Some`: done, or `Err`: failed, both or neither). `None`:
    /// not a flow's child here, or no such step here — the caller goes step by step.
    async fn ack_child(
        &self,
        delivery: &Delivery,
        child: &str,
        result: &Option<serde_json::Value>,
    ) -> Option<Result<(), Error>> {
        let parent = delivery.headers().get(reserved::FLOW_PARENT)?;
        let flows = self.flows.as_ref()?;
        match flows
            .store
            .ack_child_completed(delivery, parent, child, result.clone(), &flows.parents)
            .await
        {
            Ok(None) => None,
            Ok(Some(ChildAcked::Sent { queue, duplicate })) => {
                tracing::info!(queue = %queue, flow = parent, duplicate, "flow complete: parent sent with the last child's ack");
                Some(Ok(()))
            }
            Ok(Some(_)) => Some(Ok(())),
            Err(e) => Some(Err(e)),
        }
    }

    async fn record(&self, delivery: &Delivery, update: JobUpdate) {
        let state = update.state;
        let update = update.keep(self.keep(delivery, state));
        if let Err(e) = self.store.record(update).await {
            tracing::warn!(queue = self.store.queue(), id = %delivery.id(), %state, error = %e, "recording the job failed");
        }
    }
}

impl<S, R> Service<Delivery> for TrackJobs<S>
where
    S: Service<Delivery, Response = R>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    R: Serialize + Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let handling = self.inner.call(delivery.clone());
        let config = self.config.clone();
        let Some(id) = job_id_of(delivery.message(), Some(delivery.id())).map(Arc::<str>::from)
        else {
            // No id to record it under (a backend without message ids, no header).
            return Box::pin(handling.map(|r| r.map(|_| ()).map_err(Into::into)));
        };
        Box::pin(async move {
            let attempt = delivery.attempt();
            let meta = delivery.meta();
            config
                .record(
                    &delivery,
                    JobUpdate::new(&*id, JobState::Active, attempt).created_at(meta.enqueued_at),
                )
                .await;
            let job = JobContext::new(id.clone(), attempt, config.store.clone());
            let ((output, recorded), set) = context::scope(job, outcome::scope(handling)).await;
            // Hand what the inner layers recorded on to whoever drives us.
            if let Some(o) = recorded {
                outcome::record(o);
            }
            let update = |state| JobUpdate::new(&*id, state, attempt);
            match output.map_err(Into::into) {
                Ok(response) => {
                    let result = match serde_json::to_value(&response) {
                        Ok(serde_json::Value::Null) => set,
                        Ok(value) => Some(value),
                        Err(e) => {
                            tracing::warn!(queue = %meta.queue, job = %id, error = %e, "the handler's result does not serialize; recorded without it");
                            set
                        }
                    };
                    let result = match result.as_ref().and_then(super::types::oversized) {
                        Some(len) => {
                            tracing::warn!(queue = %meta.queue, job = %id, bytes = len, limit = super::MAX_VALUE_BYTES, "the handler's result is too large to record; recorded without it");
                            None
                        }
                        None => result,
                    };
                    let acker = delivery.acker();
                    if recorded == Some(Outcome::Deduplicated) {
                        return Ok(());
                    }
                    if acker.is_settled() {
                        // The handler settled it itself.
                        let done = if acker.is_acked() {
                            if let Err(e) = config
                                .child_done(&delivery, &id, ChildOutcome::Completed(result.clone()))
                                .await
                            {
                                tracing::warn!(queue = %meta.queue, job = %id, error = %e, "the handler acked a flow child itself, and completing its flow failed");
                            }
                            update(JobState::Completed).result(result)
                        } else {
                            update(JobState::Waiting)
                        };
                        config.record(&delivery, done).await;
                        return Ok(());
                    }
                    // A flow's child: its result, the parent's send if this was the
                    // last, and the ack in one atomic step where the backend can.
                    match config.ack_child(&delivery, &id, &result).await {
                        Some(Ok(())) => {
                            config
                                .record(&delivery, update(JobState::Completed).result(result))
                                .await;
                            return Ok(());
                        }
                        Some(Err(e)) => {
                            config
                                .record(
                                    &delivery,
                                    update(JobState::Failed)
                                        .failure(format!("handled, but the ack failed: {e}")),
                                )
                                .await;
                            return Err(Box::new(e) as BoxError);
                        }
                        None => {}
                    }
                    // Else step by step: its result recorded, and the parent sent
                    // if this was the last, before the ack — a crash in between
                    // leaves the child to be delivered again, never a parent lost.
                    if let Err(e) = config
                        .child_done(&delivery, &id, ChildOutcome::Completed(result.clone()))
                        .await
                    {
                        config
                            .record(
                                &delivery,
                                update(JobState::Failed).failure(format!(
                                    "handled, but completing its flow failed: {e}"
                                )),
                            )
                            .await;
                        return Err(Box::new(e) as BoxError);
                    }
                    // Acked here, not by the worker, so `completed` is recorded only
                    // once the message is gone for good.
                    match delivery.ack().await {
                        Ok(()) => {
                            config
                                .record(&delivery, update(JobState::Completed).result(result))
                                .await;
                            Ok(())
                        }
                        Err(e) => {
                            config
                                .record(
                                    &delivery,
                                    update(JobState::Failed)
                                        .failure(format!("handled, but the ack failed: {e}")),
                                )
                                .await;
                            Err(Box::new(e) as BoxError)
                        }
                    }
                }
                Err(error) => {
                    let reason = error.to_string();
                    let step = match recorded {
                        Some(Outcome::Deduplicated) => None,
                        Some(Outcome::Deferred) => Some(update(JobState::Waiting)),
                        Some(Outcome::Retried { after }) => {
                            Some(update(JobState::Waiting).failure(reason).retry_after(after))
                        }
                        Some(Outcome::DeadLettered) => {
                            Some(update(JobState::DeadLettered).failure(reason))
                        }
                        _ => Some(update(JobState::Failed).failure(reason)),
                    };
                    let dead = step
                        .as_ref()
                        .is_some_and(|s| s.state == JobState::DeadLettered);
                    if let Some(step) = step {
                        config.record(&delivery, step).await;
                    }
                    if dead {
                        // Already acked (moved to the DLQ): a failing flow step can
                        // only be logged.
                        if let Err(e) = config
                            .child_done(&delivery, &id, ChildOutcome::Failed(error.to_string()))
                            .await
                        {
                            tracing::warn!(queue = %meta.queue, job = %id, error = %e, "a flow child was dead-lettered, and telling its flow failed");
                        }
                    }
                    Err(error)
                }
            }
        })
    }
}

/// The inner service of [`json_job_handler`]: calls the closure with the decoded
/// value and sets what it returns as the job's result.
#[derive(Clone, Copy)]
pub struct JobJsonFn<F> {
    f: F,
}

impl<F> fmt::Debug for JobJsonFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobJsonFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

/// A typed job handler: [`Json`] over a closure returning the job's result.
pub type JobJson<F, T> = Json<JobJsonFn<F>, T>;

fn keep_result<R: Serialize, E: Into<BoxError>>(
    r: std::result::Result<R, E>,
) -> std::result::Result<(), BoxError> {
    let value = r.map_err(Into::into)?;
    // A result that cannot be serialized never will be: retrying cannot help.
    context::set_result(value).map_err(permanent)
}

impl<T, F, Fut, R, E> Service<(T, Delivery)> for JobJsonFn<F>
where
    F: FnMut(T, Delivery) -> Fut,
    Fut: Future<Output = std::result::Result<R, E>>,
    R: Serialize,
    E: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Map<Fut, fn(std::result::Result<R, E>) -> std::result::Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (value, delivery): (T, Delivery)) -> Self::Future {
        let finish: fn(std::result::Result<R, E>) -> std::result::Result<(), BoxError> =
            keep_result::<R, E>;
        (self.f)(value, delivery).map(finish)
    }
}

/// A typed job handler from an async closure `Fn(T, Delivery) -> Future<Output =
/// Result<R, E>>` with `R: Serialize`: the payload is decoded from JSON into `T`
/// (undecodable is a [`Permanent`](crate::middleware::Permanent) error, as with
/// [`json_handler`](crate::middleware::json_handler)), and `R` becomes the job's
/// result under [`TrackJobs`] — through [`set_result`](super::set_result), so the
/// response is `()` and [`RetryToDlq`](crate::middleware::RetryToDlq) may sit in
/// between.
///
/// ```
/// use ferrymq_core::jobs::json_job_handler;
/// use ferrymq_core::{BoxError, Delivery};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// let handler = json_job_handler(|order: Order, _d: Delivery| async move {
///     Ok::<_, BoxError>(serde_json::json!({ "invoice": order.id }))
/// });
/// # let _ = handler;
/// ```
pub fn json_job_handler<T, F, Fut, R, E>(f: F) -> JobJson<F, T>
where
    F: FnMut(T, Delivery) -> Fut,
    Fut: Future<Output = std::result::Result<R, E>>,
    R: Serialize,
    E: Into<BoxError>,
    T: DeserializeOwned,
{
    Json::new(JobJsonFn { f })
}

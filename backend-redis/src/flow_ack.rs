//! A flow child's ack that carries its flow step (`JobStore::ack_child_completed`).
//!
//! On other backends a flow child's completion is three steps: the result recorded
//! (and the parent released) in the job store, the parent sent, the child acked —
//! in that order, so a crash in between redelivers the child, whose rerun finishes
//! the flow. Here, when the child's queue, the job store and the parent's queue are
//! on one Redis, the three are one script (FLOW_ACK in scripts.rs): the lease
//! checked, the result recorded, the last child's parent enqueued with its dedup id
//! and the flow forgotten, the child acked (`XACK` + `XDEL`; on an ordered queue its
//! key handed on). A kill before the script changes nothing; a kill after it leaves
//! nothing to redo — the child is not delivered again.
//!
//! How the step reaches the ack: [`RedisJobStore::ack_child_completed`] puts it in
//! a task-local and calls the delivery's own `ack()` (so its handle's bookkeeping —
//! acked once, lease lost — stays the handle's). The Redis ack takes the step from
//! there ([`current`]), runs the script instead of its batched ack, and leaves the
//! outcome in the step. An ack that cannot carry it (another server, a parent
//! producer that is no Redis producer of that server, keys in several cluster
//! slots) declines before sending anything: the handle stays pending and the jobs
//! layer goes step by step.

use std::sync::{Arc, Mutex};

use ferrymq_core::jobs::{ChildAcked, FlowParent};
use ferrymq_core::{reserved, Error, ErrorKind, Result};
use redis::Value;

use crate::client::{ms, Shared};
use crate::jobs::RedisJobStore;
use crate::scripts::scripts;
use crate::RedisProducer;

/// One flow step waiting for the child's ack.
pub(crate) struct Step {
    pub(crate) store: RedisJobStore,
    pub(crate) parent: String,
    pub(crate) child: String,
    /// The child's result as JSON text (`null` for none).
    pub(crate) result: String,
    /// Redis producers of the flows' parent queues.
    pub(crate) parents: Vec<RedisProducer>,
    outcome: Mutex<Option<Outcome>>,
}

/// What the ack did with the step.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Done with the ack.
    Done(ChildAcked),
    /// Not done, and nothing sent: the caller goes step by step.
    Declined,
}

tokio::task_local! {
    static STEP: Arc<Step>;
}

/// The flow step offered to the ack running in this task, if any.
pub(crate) fn current() -> Option<Arc<Step>> {
    STEP.try_with(Arc::clone).ok()
}

impl Step {
    pub(crate) fn new(
        store: RedisJobStore,
        parent: &str,
        child: &str,
        result: Option<serde_json::Value>,
        parents: &[FlowParent],
    ) -> Option<Self> {
        let parents: Vec<RedisProducer> = parents
            .iter()
            .filter_map(|p| p.downcast_ref::<RedisProducer>().cloned())
            .collect();
        if parents.is_empty() {
            return None;
        }
        Some(Step {
            store,
            parent: parent.to_owned(),
            child: child.to_owned(),
            result: result.unwrap_or_default().to_string(),
            parents,
            outcome: Mutex::new(None),
        })
    }

    /// Run `ack` with this step offered to it.
    pub(crate) async fn offer<F: std::future::Future>(self: &Arc<Self>, ack: F) -> F::Output {
        STEP.scope(self.clone(), ack).await
    }

    pub(crate) fn take_outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn set(&self, outcome: Outcome) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }

    /// Decline: the handle stays pending (an error that is not `LeaseExpired`),
    /// nothing was sent.
    fn decline(&self, why: &str) -> Error {
        tracing::debug!(flow = %self.parent, child = %self.child, why, "ferrymq-redis: the flow step goes step by step, not with the ack");
        self.set(Outcome::Declined);
        Error::new(
            ErrorKind::Unsupported,
            format!("this ack cannot carry the flow step: {why}"),
        )
    }
}

/// The lease being acked.
pub(crate) struct Lease<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) level: usize,
    pub(crate) stream_id: &'a str,
    pub(crate) deliveries: u64,
    /// `Some(key)` on an ordered queue (the message's key, if any).
    pub(crate) ordered: Option<Option<&'a str>>,
}

/// Whether one script may touch keys of these servers/queues: one server, and on
/// Redis Cluster one hash slot.
fn one_server(a: &Shared, b: &Shared) -> bool {
    a.config.endpoint() == b.config.endpoint()
}

/// The hash slot of a key (CRC16 of its hash tag, as Redis Cluster computes it).
fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Whether the connection is to a Redis Cluster, where a script's keys must share
/// one slot.
fn clustered(shared: &Shared) -> bool {
    shared.is_cluster()
}

/// The ack of `lease` with `step`: the FLOW_ACK script. `Err(LeaseExpired)` when
/// the lease is gone (nothing done); a declined step is an `Unsupported` error with
/// the step's outcome `Declined`.
pub(crate) async fn ack_with_step(step: &Step, lease: Lease<'_>) -> Result<()> {
    let shared = lease.shared;
    let store = step.store.shared();
    if !one_server(shared, store) {
        return Err(step.decline("the job store is on another server"));
    }
    let parents: Vec<&RedisProducer> = step
        .parents
        .iter()
        .filter(|p| one_server(shared, p.shared()))
        .collect();
    if parents.is_empty() {
        return Err(step.decline("no parent producer on this server"));
    }
    let keys = &shared.keys;
    let flow_key = step.store.flow_key(&step.parent);
    let mut names: Vec<&str> = vec![
        &flow_key,
        step.store.flows_key(),
        &keys.leases,
        &keys.revoked,
        &keys.ready[lease.level],
        &keys.locks,
        &keys.held,
        &keys.unblocked,
        &keys.wake,
    ];
    for p in &parents {
        names.extend(p.shared().keys.ready.iter().map(String::as_str));
    }
    if clustered(shared) {
        let first = slot(names[0]);
        if names.iter().any(|k| slot(k) != first) {
            return Err(step.decline("its keys are in several cluster slots"));
        }
    }
    let lua = &scripts().flow_ack;
    let mut cmd = lua.call(names.len());
    for k in &names {
        cmd.arg(*k);
    }
    let key_flag = match lease.ordered {
        Some(Some(k)) => format!("+{k}"),
        _ => "-".to_owned(),
    };
    cmd.arg(&shared.config.group)
        .arg(lease.level)
        .arg(lease.stream_id)
        .arg(lease.deliveries)
        .arg(if lease.ordered.is_some() { "1" } else { "0" })
        .arg(key_flag)
        .arg(&step.parent)
        .arg(&step.child)
        .arg(&step.result)
        .arg(reserved::FLOW_CHILDREN)
        .arg(parents.len());
    for p in &parents {
        let ps = p.shared();
        cmd.arg(&*ps.queue)
            .arg(ps.keys.ready.len())
            .arg(ps.keys.dedup(""))
            .arg(ms(ps.config.dedup_window).max(1));
    }
    // A write: an answer lost after the request went out is OutcomeUnknown (the
    // step may have happened — then the child is acked and its redelivery, if the
    // lease was still ours, is refused).
    let reply = shared.eval_write(lua, &cmd).await?;
    let parts: Vec<Value> = match reply {
        Value::Array(parts) => parts,
        other => {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("unexpected reply to a flow ack: {other:?}"),
            ))
        }
    };
    let text = |i: usize| parts.get(i).and_then(as_text);
    match text(0).as_deref() {
        Some("lease") => Err(crate::ack::lease_expired()),
        Some("decline") => Err(step.decline(&format!(
            "the flow's parent goes to queue {:?}, which has no producer on this server among flows()",
            text(1).unwrap_or_default()
        ))),
        Some("none") | Some("wait") => {
            step.set(Outcome::Done(ChildAcked::Wait));
            Ok(())
        }
        Some("sent") => {
            step.set(Outcome::Done(ChildAcked::Sent {
                queue: text(1).unwrap_or_default(),
                duplicate: matches!(parts.get(2), Some(Value::Int(1))),
            }));
            Ok(())
        }
        _ => Err(Error::new(
            ErrorKind::Backend,
            format!("unexpected reply to a flow ack: {parts:?}"),
        )),
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification's examples.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot("ferrymq:{orders}:ready:0"), slot("orders"));
        assert_eq!(
            slot("ferrymq:{orders}:flow:x"),
            slot("ferrymq:{orders}:leases")
        );
        assert_ne!(
            slot("ferrymq:{orders}:ready:0"),
            slot("ferrymq:{emails}:ready:0")
        );
        assert_eq!(slot("a{}b"), crc16(b"a{}b") % 16384);
    }
}

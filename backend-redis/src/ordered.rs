//! Settling deliveries of an ordered queue (`ordered=true`, `Ordering::PerKey`).
//!
//! The gate itself lives in the scripts (see `ORDERED_HELPERS` in scripts.rs): a
//! key has one head, the only message of it that is ever handed out. Settling
//! a head is what moves its key on, so every settle is one script that checks the
//! lease and moves the key in the same atomic step:
//!
//! - **ack**: `XACK` + `XDEL`, and the key's next held entry becomes its head (queued
//!   for the next receive) — batched like the plain acks: whatever arrives while a
//!   batch is on the wire goes out together;
//! - **nack / release**: the head stays the head and stays in its entry; it is
//!   parked and handed out again — at once, or when its delay is due (the key
//!   stays blocked meanwhile, other keys flow: `nack_delay_blocks` is false);
//! - **extend**: as on any queue (the lease is the entry's).
//!
//! A consumer killed mid-handler holds its head's lease until the visibility
//! timeout; the reclaim then hands the head out again, first, to another consumer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::batch::{BatchConfig, Batcher};
use ferrymq_core::middleware::outcome::{self, Outcome};
use ferrymq_core::{Ack, Error, ErrorKind, Result};
use redis::Value;

use crate::ack::{lease_expired, RedisAck};
use crate::client::{ms, Shared, MAX_BATCH};
use crate::scripts::scripts;

struct AckItem {
    stream_id: String,
    deliveries: u64,
    key: Option<String>,
}

/// Batches acks of an ordered queue into ORDERED_ACK calls, over the same
/// [`Batcher`] as the plain acks (one flush task, a few batches on the wire).
#[derive(Debug, Clone)]
pub(crate) struct OrderedBatcher {
    batcher: Batcher<AckItem, bool>,
}

impl OrderedBatcher {
    pub(crate) fn spawn(shared: Arc<Shared>) -> Self {
        let config = BatchConfig::new(MAX_BATCH).linger(shared.config.ack_linger);
        let batcher = Batcher::spawn("redis ordered ack", config, move |batch: Vec<AckItem>| {
            let shared = shared.clone();
            async move {
                match flush(&shared, &batch).await {
                    Ok(flags) => flags.into_iter().map(Ok).collect(),
                    Err(e) => batch
                        .iter()
                        .map(|_| Err(Error::new(e.kind(), e.message())))
                        .collect(),
                }
            }
        });
        OrderedBatcher { batcher }
    }

    async fn ack(&self, stream_id: &str, deliveries: u64, key: Option<&str>) -> Result<bool> {
        self.batcher
            .submit(AckItem {
                stream_id: stream_id.to_owned(),
                deliveries,
                key: key.map(str::to_owned),
            })
            .await
    }
}

async fn flush(shared: &Shared, batch: &[AckItem]) -> Result<Vec<bool>> {
    let keys = &shared.keys;
    let lua = &scripts().ordered_ack;
    let mut cmd = lua.call(7);
    cmd.arg(&keys.leases)
        .arg(&keys.locks)
        .arg(&keys.held)
        .arg(&keys.unblocked)
        .arg(&keys.ready[0])
        .arg(&keys.wake)
        .arg(&keys.revoked)
        .arg(&shared.config.group);
    let mut flagged = String::new();
    for req in batch {
        flagged.clear();
        match &req.key {
            Some(k) => {
                flagged.push('+');
                flagged.push_str(k);
            }
            None => flagged.push('-'),
        }
        cmd.arg(&req.stream_id)
            .arg(req.deliveries)
            .arg(flagged.as_str());
    }
    let reply = shared.eval(lua, &cmd).await?;
    match reply {
        Value::Array(flags) if flags.len() == batch.len() => Ok(flags
            .into_iter()
            .map(|f| matches!(f, Value::Int(1)))
            .collect()),
        other => Err(Error::new(
            ErrorKind::Backend,
            format!("unexpected ordered ack reply: {other:?}"),
        )),
    }
}

/// One delivery's lease on an ordered queue.
pub(crate) struct OrderedAck {
    /// The entry's lease (extend goes through it unchanged).
    pub(crate) lease: RedisAck,
    /// The message's key: its ack hands the key on.
    pub(crate) key: Option<String>,
    pub(crate) batcher: OrderedBatcher,
}

impl std::fmt::Debug for OrderedAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderedAck")
            .field("lease", &self.lease)
            .field("key", &self.key)
            .finish()
    }
}

impl OrderedAck {
    async fn give_back(&self, redeliver_after: Option<Duration>, release: bool) -> Result<()> {
        let shared = &self.lease.shared;
        shared.capabilities.check_nack_delay(redeliver_after)?;
        let keys = &shared.keys;
        let config = &shared.config;
        let delay = redeliver_after.map_or(0, |d| if d.is_zero() { 0 } else { ms(d).max(1) });
        let lua = &scripts().ordered_nack;
        let mut cmd = lua.call(9);
        cmd.arg(&keys.leases)
            .arg(&keys.dead)
            .arg(&keys.locks)
            .arg(&keys.held)
            .arg(&keys.unblocked)
            .arg(&keys.parked)
            .arg(&keys.ready[0])
            .arg(&keys.wake)
            .arg(&keys.revoked)
            .arg(&config.group)
            .arg(&self.lease.stream_id)
            .arg(self.lease.deliveries)
            .arg(delay)
            .arg(config.max_deliveries)
            .arg(config.dlq_max_len)
            .arg(ms(config.dlq_retention))
            .arg(&*shared.queue)
            .arg(if release { "1" } else { "0" });
        let reply = shared.eval(lua, &cmd).await?;
        let (code, trimmed): (i64, i64) = redis::from_redis_value(reply).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!("unexpected ordered nack reply: {e}"),
            )
        })?;
        crate::ack::warn_trimmed(shared, trimmed);
        match code {
            0 => Err(lease_expired()),
            2 => {
                tracing::info!(
                    queue = %shared.queue,
                    stream_id = %self.lease.stream_id,
                    "ferrymq-redis: message dead-lettered after max_deliveries"
                );
                outcome::record(Outcome::DeadLettered);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Ack for OrderedAck {
    async fn ack(&self) -> Result<()> {
        if let Some(step) = crate::flow_ack::current() {
            let lease = crate::flow_ack::Lease {
                shared: &self.lease.shared,
                level: self.lease.level,
                stream_id: &self.lease.stream_id,
                deliveries: self.lease.deliveries,
                ordered: Some(self.key.as_deref()),
            };
            return crate::flow_ack::ack_with_step(&step, lease).await;
        }
        if self
            .batcher
            .ack(
                &self.lease.stream_id,
                self.lease.deliveries,
                self.key.as_deref(),
            )
            .await?
        {
            Ok(())
        } else {
            Err(lease_expired())
        }
    }

    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.give_back(redeliver_after, false).await
    }

    async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.give_back(redeliver_after, true).await
    }

    async fn extend(&self, by: Duration) -> Result<()> {
        self.lease.extend(by).await
    }
}

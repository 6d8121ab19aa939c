//! Settling deliveries: batched acks, nack (now or later), extend.
//!
//! Every settle names the lease it belongs to — level, stream id and the entry's
//! delivery counter at delivery time — and the scripts check that the entry is still
//! pending with that counter. A redelivery (reclaim after the visibility timeout)
//! bumps the counter, so a stale handle gets `LeaseExpired` instead of acking a
//! message another consumer is working on.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::batch::{BatchConfig, Batcher};
use ferrymq_core::middleware::outcome::{self, Outcome};
use ferrymq_core::{Ack, Error, ErrorKind, Result};
use redis::Value;

use crate::client::{Shared, MAX_BATCH};
use crate::scripts::scripts;

/// One ack for the batcher: the lease it settles.
struct AckItem {
    level: usize,
    stream_id: String,
    deliveries: u64,
}

/// Acks flushed as batches (core's [`Batcher`]): whatever arrived while the previous
/// batches were on the wire (plus `ack_linger`, when set) goes out as one ACK script
/// call — one `XACK` + `XDEL` per level. Each `ack()` returns only after its batch
/// was applied on the server; `false` when its lease was no longer held.
#[derive(Debug, Clone)]
pub(crate) struct AckBatcher {
    batcher: Batcher<AckItem, bool>,
}

impl AckBatcher {
    pub(crate) fn spawn(shared: Arc<Shared>) -> Self {
        let config = BatchConfig::new(MAX_BATCH).linger(shared.config.ack_linger);
        let batcher = Batcher::spawn("redis ack", config, move |batch: Vec<AckItem>| {
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
        AckBatcher { batcher }
    }

    async fn ack(&self, level: usize, stream_id: &str, deliveries: u64) -> Result<bool> {
        self.batcher
            .submit(AckItem {
                level,
                stream_id: stream_id.to_owned(),
                deliveries,
            })
            .await
    }
}

async fn flush(shared: &Shared, batch: &[AckItem]) -> Result<Vec<bool>> {
    let keys = &shared.keys;
    // The script wants the ids grouped by level; `order` maps back to the batch.
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].level);
    let mut cmd = scripts().ack.call(2 + keys.ready.len());
    cmd.arg(&keys.leases).arg(&keys.revoked);
    for k in &keys.ready {
        cmd.arg(k);
    }
    let mut counts = String::with_capacity(batch.len() * 2);
    for &i in &order {
        // Writing to a String cannot fail.
        let _ = write!(counts, "{},", batch[i].deliveries);
    }
    cmd.arg(&shared.config.group).arg(batch.len()).arg(counts);
    let mut start = 0;
    while start < order.len() {
        let level = batch[order[start]].level;
        let end = start
            + order[start..]
                .iter()
                .take_while(|&&i| batch[i].level == level)
                .count();
        cmd.arg(level).arg(end - start);
        for &i in &order[start..end] {
            cmd.arg(&batch[i].stream_id);
        }
        start = end;
    }
    let reply = shared.eval(&scripts().ack, &cmd).await?;
    let mut acked = vec![false; batch.len()];
    match reply {
        Value::Int(n) if n as usize == batch.len() => acked.fill(true),
        Value::Array(flags) if flags.len() == batch.len() => {
            for (&i, flag) in order.iter().zip(flags) {
                acked[i] = matches!(flag, Value::Int(1));
            }
        }
        other => {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("unexpected ack reply: {other:?}"),
            ))
        }
    }
    Ok(acked)
}

pub(crate) fn lease_expired() -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        "the visibility timeout passed and the message was redelivered, or it was settled through another delivery",
    )
}

/// One delivery's lease on a Redis queue.
pub(crate) struct RedisAck {
    pub(crate) shared: Arc<Shared>,
    pub(crate) batcher: AckBatcher,
    pub(crate) level: usize,
    pub(crate) stream_id: String,
    pub(crate) deliveries: u64,
}

impl std::fmt::Debug for RedisAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAck")
            .field("queue", &self.shared.queue)
            .field("level", &self.level)
            .field("stream_id", &self.stream_id)
            .field("deliveries", &self.deliveries)
            .finish()
    }
}

/// Say so when dead-lettering deleted older dead letters: trimming a dead-letter
/// store loses data, which should never happen silently.
pub(crate) fn warn_trimmed(shared: &Shared, trimmed: i64) {
    if trimmed > 0 {
        tracing::warn!(
            queue = %shared.queue,
            trimmed,
            dlq_max_len = shared.config.dlq_max_len,
            dlq_retention = ?shared.config.dlq_retention,
            "ferrymq-redis: the dead-letter stream was trimmed: {trimmed} older dead letter(s) deleted \
             (bounded by dlq_max_len and dlq_retention); redrive or raise the bounds to keep them"
        );
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisAck {
    /// Remove the entry and enqueue the message again (now, or after `delay`): a
    /// nack counts this delivery as an attempt, a release does not.
    async fn give_back(&self, redeliver_after: Option<Duration>, release: bool) -> Result<()> {
        let shared = &self.shared;
        // Refused before anything is sent: a delay past the limit would otherwise
        // become a bogus script argument (u64::MAX ms is no point in time).
        shared.capabilities.check_nack_delay(redeliver_after)?;
        let keys = &shared.keys;
        let config = &shared.config;
        let delay = redeliver_after.map_or(0, |d| if d.is_zero() { 0 } else { millis(d).max(1) });
        let mut cmd = scripts().nack.call(6);
        cmd.arg(&keys.delayed)
            .arg(&keys.jobs)
            .arg(&keys.leases)
            .arg(&keys.dead)
            .arg(&keys.revoked)
            .arg(&keys.ready[self.level])
            .arg(&config.group)
            .arg(self.level)
            .arg(&self.stream_id)
            .arg(self.deliveries)
            .arg(delay)
            .arg(config.max_deliveries)
            .arg(config.dlq_max_len)
            .arg(millis(config.dlq_retention))
            .arg(&*shared.queue)
            .arg(if release { "1" } else { "0" });
        let reply = shared.eval(&scripts().nack, &cmd).await?;
        let (code, trimmed): (i64, i64) = redis::from_redis_value(reply)
            .map_err(|e| Error::new(ErrorKind::Backend, format!("unexpected nack reply: {e}")))?;
        warn_trimmed(shared, trimmed);
        match code {
            0 => Err(lease_expired()),
            2 => {
                tracing::info!(
                    queue = %shared.queue,
                    stream_id = %self.stream_id,
                    "ferrymq-redis: message dead-lettered after max_deliveries"
                );
                // The nack succeeded — the message left the queue — but it went to
                // the dead-letter stream, not back for another attempt. Said through
                // the worker's outcome record (a no-op outside a handler's scope):
                // an error would leave the handle pending, which it is not.
                outcome::record(Outcome::DeadLettered);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Ack for RedisAck {
    async fn ack(&self) -> Result<()> {
        if let Some(step) = crate::flow_ack::current() {
            let lease = crate::flow_ack::Lease {
                shared: &self.shared,
                level: self.level,
                stream_id: &self.stream_id,
                deliveries: self.deliveries,
                ordered: None,
            };
            return crate::flow_ack::ack_with_step(&step, lease).await;
        }
        if self
            .batcher
            .ack(self.level, &self.stream_id, self.deliveries)
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
        let shared = &self.shared;
        if let Some(max) = shared.capabilities.max_visibility {
            if by > max {
                return Err(Error::unsupported(format!(
                    "an extend by {by:?} is longer than redis supports ({max:?}); the lease is unchanged"
                )));
            }
        }
        let keys = &shared.keys;
        let mut cmd = scripts().extend.call(2);
        cmd.arg(&keys.leases)
            .arg(&keys.ready[self.level])
            .arg(&shared.config.group)
            .arg(self.level)
            .arg(&self.stream_id)
            .arg(self.deliveries)
            .arg(millis(by))
            .arg(millis(shared.config.visibility_timeout));
        match shared.eval(&scripts().extend, &cmd).await? {
            Value::Int(1) => Ok(()),
            _ => Err(lease_expired()),
        }
    }
}

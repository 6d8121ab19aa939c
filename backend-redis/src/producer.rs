//! The sending side.
//!
//! A plain message (no dedup id, no delay) is one `XADD` — the cheapest write Redis
//! has. A message with a dedup id or a delay goes through the ENQUEUE script, which
//! claims the dedup id and enqueues (or parks in the delayed ZSET) atomically.
//! `send_batch` puts all of them in one pipeline: one round trip per batch.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use async_trait::async_trait;
use ferrymq_core::{Capabilities, Depth, Error, ErrorKind, Message, Producer, Result, SendReceipt};
use redis::{Cmd, RedisError, Value};

use crate::client::{is_noscript, ms, Shared, MAX_BATCH};
use crate::codec::push_fields;
use crate::keys::level;
use crate::scripts::scripts;

/// Sends to one Redis queue. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisProducer {
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for RedisProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProducer")
            .field("queue", &self.shared.queue)
            .finish_non_exhaustive()
    }
}

/// How one message is sent.
#[derive(Clone, Copy)]
struct Plan {
    level: usize,
    scripted: bool,
}

impl RedisProducer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisProducer {
            shared,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::closed("producer"));
        }
        Ok(())
    }

    /// Validate and encode one message into its command.
    fn encode(&self, message: &Message, scratch: &mut Vec<u8>) -> Result<(Cmd, Plan)> {
        let shared = &self.shared;
        message.validate(shared.config.max_message_size)?;
        // A delay past the limit is refused before anything is sent (`Duration::MAX`
        // would otherwise saturate into a bogus due time).
        shared.capabilities.check_delay(message.get_delay())?;
        let level = level(message.get_priority(), shared.config.priority_levels);
        let delay_ms = message
            .get_delay()
            .filter(|d| !d.is_zero())
            .map_or(0, |d| ms(d).max(1));
        let dedup = message.get_dedup_id();
        if delay_ms == 0 && dedup.is_none() {
            // Sized up front: one allocation per buffer instead of a few regrowths.
            let key = &shared.keys.ready[level];
            let mut cmd = Cmd::with_capacity(
                5 + 2 * 4,
                32 + key.len() + message.encoded_len() + message.headers().len() * 8,
            );
            cmd.arg("XADD").arg(key).arg("*");
            push_fields(&mut cmd, message, scratch);
            return Ok((
                cmd,
                Plan {
                    level,
                    scripted: false,
                },
            ));
        }
        let keys = &shared.keys;
        let mut cmd = scripts().enqueue.call(if dedup.is_some() { 5 } else { 4 });
        cmd.arg(&keys.ready[level])
            .arg(&keys.delayed)
            .arg(&keys.jobs)
            .arg(&keys.seq);
        if let Some(id) = dedup {
            cmd.arg(keys.dedup(id));
        }
        cmd.arg(ms(shared.config.dedup_window).max(1))
            .arg(delay_ms)
            .arg(level)
            .arg(&keys.suffixes[level]);
        push_fields(&mut cmd, message, scratch);
        Ok((
            cmd,
            Plan {
                level,
                scripted: true,
            },
        ))
    }

    fn receipt(&self, plan: Plan, reply: Value) -> Result<SendReceipt> {
        let bad = || {
            Error::new(
                ErrorKind::Backend,
                "unexpected reply to an enqueue from redis",
            )
        };
        if !plan.scripted {
            let id: String = redis::from_redis_value(reply).map_err(|_| bad())?;
            let suffix = &self.shared.keys.suffixes[plan.level];
            return Ok(SendReceipt::new(if suffix.is_empty() {
                id
            } else {
                id + suffix
            }));
        }
        let (duplicate, id): (i64, String) = redis::from_redis_value(reply).map_err(|_| bad())?;
        Ok(if duplicate == 1 {
            SendReceipt::duplicate(id)
        } else {
            SendReceipt::new(id)
        })
    }

    /// Send one chunk as one pipeline, filling `out` with one result per message.
    /// Returns the failure of the chunk as a whole (nothing after it should be
    /// sent), if any: then each of its entries says `OutcomeUnknown` — a pipeline
    /// that broke part-way ran the commands before the break, and which ones is
    /// not known — unless nothing was sent at all.
    async fn send_chunk(
        &self,
        messages: &[Message],
        out: &mut Vec<Result<SendReceipt>>,
        scratch: &mut Vec<u8>,
    ) -> Option<Error> {
        let shared = &self.shared;
        let base = out.len();
        let mut pipe = redis::Pipeline::with_capacity(messages.len());
        let mut sent: Vec<(usize, Plan)> = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            match self.encode(message, scratch) {
                Ok((cmd, plan)) => {
                    pipe.add_command(cmd);
                    sent.push((base + i, plan));
                    out.push(Err(Error::new(ErrorKind::OutcomeUnknown, "no reply")));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if sent.is_empty() {
            return None;
        }
        let replies = shared
            .with_write_timeout(
                "send batch",
                pipe.ignore_errors()
                    .query_async::<Vec<Value>>(&mut shared.conn()),
            )
            .await;
        let replies = match replies {
            Ok(replies) if replies.len() == sent.len() => replies,
            Ok(replies) => {
                let e = Error::new(
                    ErrorKind::OutcomeUnknown,
                    format!(
                        "send batch: {} replies to {} commands from redis; which landed is unknown",
                        replies.len(),
                        sent.len()
                    ),
                );
                for &(slot, _) in &sent {
                    out[slot] = Err(copy(&e));
                }
                return Some(e);
            }
            Err(e) => {
                for &(slot, _) in &sent {
                    out[slot] = Err(copy(&e));
                }
                return Some(e);
            }
        };
        let mut retry = Vec::new();
        for ((slot, plan), reply) in sent.into_iter().zip(replies) {
            out[slot] = match reply {
                Value::ServerError(e) => {
                    let e = RedisError::from(e);
                    if is_noscript(&e) {
                        retry.push((slot, plan));
                        continue;
                    }
                    Err(shared.map_err(e, "send"))
                }
                reply => self.receipt(plan, reply),
            };
        }
        if retry.is_empty() {
            return None;
        }
        // The server lost its scripts (restart): a NOSCRIPT call did not run, so
        // sending those entries again is safe — and until then they are not sent.
        if let Err(e) = shared.load_scripts().await {
            let e = not_sent(&e);
            for &(slot, _) in &retry {
                out[slot] = Err(copy(&e));
            }
            return Some(e);
        }
        let mut pipe = redis::pipe();
        let mut again = Vec::with_capacity(retry.len());
        for (slot, plan) in retry {
            match self.encode(&messages[slot - base], scratch) {
                Ok((cmd, _)) => {
                    pipe.add_command(cmd);
                    again.push((slot, plan));
                }
                Err(e) => out[slot] = Err(e),
            }
        }
        let replies = shared
            .with_write_timeout(
                "send batch",
                pipe.ignore_errors()
                    .query_async::<Vec<Value>>(&mut shared.conn()),
            )
            .await;
        match replies {
            Ok(replies) if replies.len() == again.len() => {
                for ((slot, plan), reply) in again.into_iter().zip(replies) {
                    out[slot] = match reply {
                        Value::ServerError(e) => Err(shared.map_err(RedisError::from(e), "send")),
                        reply => self.receipt(plan, reply),
                    };
                }
                None
            }
            other => {
                let e = match other {
                    Err(e) => e,
                    Ok(_) => Error::new(
                        ErrorKind::OutcomeUnknown,
                        "send batch: a reply per command expected from redis; which landed is unknown",
                    ),
                };
                for &(slot, _) in &again {
                    out[slot] = Err(copy(&e));
                }
                Some(e)
            }
        }
    }
}

/// A copy of an error for each entry it applies to.
fn copy(e: &Error) -> Error {
    Error::new(e.kind(), e.message())
}

/// An entry that was not sent because the chunk before it failed: nothing of it is
/// on the server, so a retry does not duplicate it (never `OutcomeUnknown`).
fn not_sent(cause: &Error) -> Error {
    let kind = match cause.kind() {
        ErrorKind::OutcomeUnknown | ErrorKind::Timeout => ErrorKind::Connection,
        kind => kind,
    };
    Error::new(
        kind,
        format!("not sent: an earlier part of this batch failed ({cause})"),
    )
}

#[async_trait]
impl Producer for RedisProducer {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.check_open()?;
        let mut scratch = Vec::new();
        let (cmd, plan) = self.encode(&message, &mut scratch)?;
        let shared = &self.shared;
        let reply = if plan.scripted {
            shared.eval_write(&scripts().enqueue, &cmd).await?
        } else {
            let mut conn = shared.conn();
            shared
                .with_write_timeout("XADD", cmd.query_async::<Value>(&mut conn))
                .await?
        };
        self.receipt(plan, reply)
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.check_open()?;
        let mut out = Vec::with_capacity(messages.len());
        let mut scratch = Vec::new();
        let mut chunks = messages.chunks(MAX_BATCH);
        for chunk in chunks.by_ref() {
            if let Some(failure) = self.send_chunk(chunk, &mut out, &mut scratch).await {
                // Stop at the first chunk that failed as a whole: the server is
                // likely unreachable, and each further chunk would wait out its
                // own timeout. The rest was not sent.
                let e = not_sent(&failure);
                for _ in chunks.flatten() {
                    out.push(Err(copy(&e)));
                }
                break;
            }
        }
        Ok(out)
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, AtomicOrdering::Release);
        Ok(())
    }

    async fn depth(&self) -> Result<Depth> {
        depth(&self.shared).await
    }

    fn queue(&self) -> &str {
        &self.shared.queue
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.capabilities
    }
}

/// Depth counts from the DEPTH script.
pub(crate) async fn depth(shared: &Shared) -> Result<Depth> {
    let keys = &shared.keys;
    if shared.config.ordered {
        let lua = &scripts().ordered_depth;
        let mut cmd = lua.call(5);
        cmd.arg(&keys.delayed)
            .arg(&keys.dead)
            .arg(&keys.leases)
            .arg(&keys.parked)
            .arg(&keys.ready[0])
            .arg(&shared.config.group)
            .arg(ms(shared.config.visibility_timeout));
        let reply = shared.eval(lua, &cmd).await?;
        return depth_of(reply);
    }
    let mut cmd = scripts().depth.call(3 + keys.ready.len());
    cmd.arg(&keys.delayed).arg(&keys.dead).arg(&keys.leases);
    for k in &keys.ready {
        cmd.arg(k);
    }
    cmd.arg(&shared.config.group)
        .arg(ms(shared.config.visibility_timeout));
    let reply = shared.eval(&scripts().depth, &cmd).await?;
    depth_of(reply)
}

fn depth_of(reply: Value) -> Result<Depth> {
    let (waiting, in_flight, delayed, dead_lettered): (u64, u64, u64, u64) =
        redis::from_redis_value(reply)
            .map_err(|e| Error::new(ErrorKind::Backend, format!("unexpected depth reply: {e}")))?;
    Ok(Depth {
        waiting,
        in_flight,
        delayed,
        dead_lettered,
    })
}

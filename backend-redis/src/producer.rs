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

    async fn send_chunk(
        &self,
        messages: &[Message],
        out: &mut Vec<Result<SendReceipt>>,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let shared = &self.shared;
        let base = out.len();
        let mut pipe = redis::Pipeline::with_capacity(messages.len());
        let mut sent: Vec<(usize, Plan)> = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            match self.encode(message, scratch) {
                Ok((cmd, plan)) => {
                    pipe.add_command(cmd);
                    sent.push((base + i, plan));
                    out.push(Ok(SendReceipt::new(String::new())));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if sent.is_empty() {
            return Ok(());
        }
        let replies: Vec<Value> = shared
            .with_write_timeout(
                "send batch",
                pipe.ignore_errors().query_async(&mut shared.conn()),
            )
            .await?;
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
        if !retry.is_empty() {
            // The server lost its scripts (restart): a NOSCRIPT call did not run, so
            // sending those entries again is safe.
            shared.load_scripts().await?;
            let mut pipe = redis::pipe();
            for &(slot, _) in &retry {
                let (cmd, _) = self.encode(&messages[slot - base], scratch)?;
                pipe.add_command(cmd);
            }
            let replies: Vec<Value> = shared
                .with_write_timeout(
                    "send batch",
                    pipe.ignore_errors().query_async(&mut shared.conn()),
                )
                .await?;
            for ((slot, plan), reply) in retry.into_iter().zip(replies) {
                out[slot] = match reply {
                    Value::ServerError(e) => Err(shared.map_err(RedisError::from(e), "send")),
                    reply => self.receipt(plan, reply),
                };
            }
        }
        Ok(())
    }
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
        for chunk in messages.chunks(MAX_BATCH) {
            self.send_chunk(chunk, &mut out, &mut scratch).await?;
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
    let mut cmd = scripts().depth.call(3 + keys.ready.len());
    cmd.arg(&keys.delayed).arg(&keys.dead).arg(&keys.leases);
    for k in &keys.ready {
        cmd.arg(k);
    }
    cmd.arg(&shared.config.group)
        .arg(ms(shared.config.visibility_timeout));
    let reply = shared.eval(&scripts().depth, &cmd).await?;
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

//! The raw baseline on Redis: redis-rs (the same client and version ferrymq-redis
//! uses) driven the way an expert would, with the same batch size as everyone else.
//!
//! - produce: one pipeline of [`BATCH`] × `XADD key * p PAYLOAD` per round trip
//!   (commands pre-sized, replies ignored), on a multiplexed connection;
//! - consume: each handler task has its own connection (a blocking read must not
//!   share one) and loops `XREADGROUP GROUP g cN COUNT 100 BLOCK 100 STREAMS key >`,
//!   handles the batch, then settles it with **one pipeline of `XACK key g ids…` +
//!   `XDEL key ids…`** (one round trip). The XDEL is there because ferrymq deletes
//!   acked entries too; without it the stream grows without bound.
//!
//! What it does not do, and ferrymq does: redelivery of expired leases, attempts,
//! delays, dead-lettering, headers, dedup.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{
    handle, latency_us, pace, payload, run_until_done, stamp_of, timed_run, wall_nanos, Progress,
    BATCH,
};
use crate::env::{finish_drain, proc_status_kib, ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub struct RawRedis;

const GROUP: &str = "g";

async fn connect(url: &str) -> Result<MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

async fn create_group(conn: &mut MultiplexedConnection, key: &str) -> Result<()> {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

async fn produce_all(
    conn: &mut MultiplexedConnection,
    key: &str,
    n: u64,
    size: usize,
) -> Result<()> {
    let mut sent = 0;
    while sent < n {
        let k = (BATCH as u64).min(n - sent);
        let mut pipe = redis::Pipeline::with_capacity(k as usize);
        for i in 0..k {
            // Pre-sized, so the command buffer is written once, not regrown per arg.
            let mut cmd = redis::Cmd::with_capacity(5, key.len() + size.max(8) + 8);
            cmd.arg("XADD")
                .arg(key)
                .arg("*")
                .arg("p")
                .arg(payload(size, sent + i).as_ref());
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(conn).await?;
        sent += k;
    }
    Ok(())
}

fn bulk(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(anyhow!("expected a bulk string, got {other:?}")),
    }
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(anyhow!("expected an array, got {other:?}")),
    }
}

/// `(id, payload)` of every entry in an XREADGROUP reply of one stream.
fn parse_read(reply: Value) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if matches!(reply, Value::Nil) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for stream in array(reply)? {
        let mut parts = array(stream)?.into_iter();
        let entries = parts
            .nth(1)
            .ok_or_else(|| anyhow!("stream reply without entries"))?;
        for entry in array(entries)? {
            let mut e = array(entry)?.into_iter();
            let id = bulk(e.next().ok_or_else(|| anyhow!("entry without id"))?)?;
            let fields = array(e.next().ok_or_else(|| anyhow!("entry without fields"))?)?;
            let mut fields = fields.into_iter();
            let mut body = None;
            while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
                if bulk(k)? == b"p" {
                    body = Some(bulk(v)?);
                }
            }
            out.push((
                id,
                body.ok_or_else(|| anyhow!("entry without payload field"))?,
            ));
        }
    }
    Ok(out)
}

async fn consume(
    url: String,
    key: String,
    consumer: String,
    progress: Arc<Progress>,
    record_latency: bool,
) -> Result<()> {
    let mut conn = connect(&url).await?;
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(GROUP)
        .arg(&consumer)
        .arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(100)
        .arg("STREAMS")
        .arg(&key)
        .arg(">");
    while !progress.should_stop() {
        let reply: Value = read.query_async(&mut conn).await?;
        let entries = parse_read(reply)?;
        if entries.is_empty() {
            continue;
        }
        let mut lat = Vec::new();
        for (_, body) in &entries {
            if record_latency {
                lat.push(latency_us(stamp_of(body).unwrap_or(0)));
            }
            handle(body);
        }
        let mut pipe = redis::pipe();
        let ack = pipe.cmd("XACK").arg(&key).arg(GROUP);
        for (id, _) in &entries {
            ack.arg(id.as_slice());
        }
        ack.ignore();
        let del = pipe.cmd("XDEL").arg(&key);
        for (id, _) in &entries {
            del.arg(id.as_slice());
        }
        del.ignore();
        pipe.query_async::<()>(&mut conn).await?;
        if record_latency {
            progress.record_latencies(lat);
        }
        progress.add(entries.len() as u64);
    }
    Ok(())
}

#[async_trait]
impl Subject for RawRedis {
    fn name(&self) -> &'static str {
        "raw-redis"
    }
    fn backend(&self) -> Backend {
        Backend::Redis
    }
    fn role(&self) -> Role {
        Role::Raw
    }
    fn describe(&self) -> String {
        "redis-rs: pipelined XADD x100 per round trip; per handler task its own connection with \
         XREADGROUP COUNT 100 BLOCK 100, then one pipeline XACK + XDEL per batch"
            .into()
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let key = env.queue_name(self.name());
        let mut conn = connect(&url).await?;
        create_group(&mut conn, &key).await?;
        let start = Instant::now();
        produce_all(&mut conn, &key, n, size).await?;
        Ok(Sample::throughput(n, start.elapsed()))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let key = env.queue_name(self.name());
        let mut conn = connect(&url).await?;
        create_group(&mut conn, &key).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        let k = key.clone();
        tasks.spawn(async move { produce_all(&mut conn, &k, n, size).await });
        for i in 0..concurrency {
            tasks.spawn(consume(
                url.clone(),
                key.clone(),
                format!("c{i}"),
                progress.clone(),
                false,
            ));
        }
        timed_run(tasks, &progress, start, env.stall, env.cap).await
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let key = env.queue_name(self.name());
        let mut conn = connect(&url).await?;
        create_group(&mut conn, &key).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(
            url,
            key.clone(),
            "c0".into(),
            progress.clone(),
            true,
        ));
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                redis::cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("p")
                    .arg(payload(size, wall_nanos()).as_ref())
                    .query_async::<Value>(&mut conn)
                    .await?;
            }
            Ok(())
        });
        run_until_done(tasks, &progress, Instant::now(), env.stall).await?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let key = env.queue_name(self.name());
        let mut conn = connect(&url).await?;
        create_group(&mut conn, &key).await?;
        produce_all(&mut conn, &key, backlog, size).await?;
        env.rss_sample(self.name(), key, Some(url), backlog, size, false)
            .await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let url = spec
            .redis_url
            .clone()
            .ok_or_else(|| anyhow!("no redis url"))?;
        let before = proc_status_kib("VmRSS")?;
        let progress = Progress::new(spec.backlog);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(
            url,
            spec.queue.clone(),
            "c0".into(),
            progress.clone(),
            false,
        ));
        let start = Instant::now();
        finish_drain(before, tasks, &progress, start, spec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xreadgroup_replies() {
        let entry = |id: &str, p: &str| {
            Value::Array(vec![
                Value::BulkString(id.into()),
                Value::Array(vec![
                    Value::BulkString(b"p".to_vec()),
                    Value::BulkString(p.into()),
                ]),
            ])
        };
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"key".to_vec()),
            Value::Array(vec![entry("1-0", "a"), entry("1-1", "b")]),
        ])]);
        let got = parse_read(reply).unwrap();
        assert_eq!(
            got,
            vec![
                (b"1-0".to_vec(), b"a".to_vec()),
                (b"1-1".to_vec(), b"b".to_vec())
            ]
        );
        assert!(parse_read(Value::Nil).unwrap().is_empty());
    }
}

//! Peer: BullMQ (npm, pinned in bench/bullmq/package-lock.json) on Node 20, driven
//! through bench/bullmq/bench.js, one Node process per run.
//!
//! The bench installs the pinned packages with `npm ci` into a cache directory
//! outside the repository (keyed by the lock file) and points `NODE_PATH` there.
//! The script times itself, so Node's start-up is not counted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::Subject;
use crate::drive::BATCH;
use crate::env::Env;
use crate::model::{Backend, Role, Sample};

pub struct BullMq;

/// An installed copy of bench/bullmq.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    script: PathBuf,
    node_modules: PathBuf,
    pub node_version: String,
    pub bullmq_version: String,
}

fn run_quiet(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl NodeSetup {
    /// Check Node ≥ 20 and install the pinned packages of `src` (bench/bullmq) into
    /// `cache/bench-bullmq` with `npm ci`, unless that lock file is installed already.
    pub fn prepare(src: &Path, cache: &Path) -> Result<Self> {
        let node_version = run_quiet(std::process::Command::new("node").arg("--version"))
            .context("Node.js is needed for the BullMQ peer")?;
        let major: u32 = node_version
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 20 {
            bail!("BullMQ peer needs Node >= 20, found {node_version}");
        }
        let lock = std::fs::read(src.join("package-lock.json"))
            .with_context(|| format!("reading {}", src.join("package-lock.json").display()))?;
        let manifest = std::fs::read(src.join("package.json"))?;
        let dest = cache.join("bench-bullmq");
        std::fs::create_dir_all(&dest)?;
        let stamp = dest.join(".installed-lock");
        let installed = std::fs::read(&stamp).is_ok_and(|s| s == lock)
            && dest.join("node_modules/bullmq/package.json").exists();
        if !installed {
            std::fs::write(dest.join("package.json"), &manifest)?;
            std::fs::write(dest.join("package-lock.json"), &lock)?;
            eprintln!("bullmq: npm ci into {}", dest.display());
            run_quiet(
                std::process::Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dest),
            )?;
            std::fs::write(&stamp, &lock)?;
        }
        let node_modules = dest.join("node_modules");
        let pkg: Value =
            serde_json::from_slice(&std::fs::read(node_modules.join("bullmq/package.json"))?)?;
        Ok(NodeSetup {
            script: src.join("bench.js"),
            node_modules,
            node_version,
            bullmq_version: pkg["version"].as_str().unwrap_or("?").to_string(),
        })
    }

    fn spawn(&self, spec: &Value) -> Result<tokio::process::Child> {
        tokio::process::Command::new("node")
            .arg(&self.script)
            .arg(spec.to_string())
            .env("NODE_PATH", &self.node_modules)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting node")
    }

    /// Run bench.js with `spec`; its JSON line, or its error.
    async fn run(&self, spec: Value, limit: Duration) -> Result<Value> {
        let child = self.spawn(&spec)?;
        finish(child, limit).await
    }

    /// An end-to-end run with the Worker and the producer in two Node processes,
    /// so that, like the Rust subjects' two runtime threads, each gets a core.
    async fn run_split(&self, consume: Value, produce: Value, limit: Duration) -> Result<Value> {
        let mut consumer = self.spawn(&consume)?;
        let stdout = consumer
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout of the consumer process"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("the BullMQ consumer was not ready within 30 s"))??;
        if ready.as_deref().map(str::trim) != Some(r#"{"ready":true}"#) {
            let err = finish(consumer, Duration::from_secs(5)).await.err();
            bail!("the BullMQ consumer did not start: {ready:?} {err:?}");
        }
        let producer = self.run(produce, limit);
        let consumed = tokio::time::timeout(limit, async {
            let mut last = None;
            while let Some(line) = lines.next_line().await? {
                last = Some(line);
            }
            let status = consumer.wait().await?;
            Ok::<_, anyhow::Error>((status, last))
        });
        tokio::pin!(producer, consumed);
        // A capped consumer ends while the producer may still be adding: then the
        // producer is dropped (and killed), not waited for.
        let (consumed, produced) = tokio::select! {
            c = &mut consumed => (c, None),
            p = &mut producer => (consumed.await, Some(p)),
        };
        let (status, line) = consumed.map_err(|_| {
            anyhow!(
                "the BullMQ consumer did not finish within {} s",
                limit.as_secs()
            )
        })??;
        let line = line.unwrap_or_default();
        let v: Value = serde_json::from_str(&line)
            .map_err(|_| anyhow!("the BullMQ consumer printed {line:?} ({status})"))?;
        if let Some(e) = v.get("error") {
            bail!("bullmq: {}", e.as_str().unwrap_or_default());
        }
        let produced = match produced {
            Some(p) => Some(p),
            None if v["capped"] == Value::Bool(true) => None,
            None => Some(producer.await),
        };
        if let Some(Err(e)) = produced {
            return Err(e.context("the BullMQ producer failed"));
        }
        Ok(v)
    }
}

async fn finish(child: tokio::process::Child, limit: Duration) -> Result<Value> {
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("bench.js did not finish within {} s", limit.as_secs()))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line).map_err(|_| {
        anyhow!(
            "bench.js printed {line:?} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("bullmq: {}", e.as_str().unwrap_or_default());
    }
    Ok(v)
}

fn setup(env: &Env) -> Result<&NodeSetup> {
    env.bullmq.as_ref().ok_or_else(|| match &env.bullmq_error {
        Some(e) => anyhow!("BullMQ could not be set up: {e}"),
        None => anyhow!("BullMQ is not set up"),
    })
}

fn base(env: &Env, mode: &str, queue: &str, n: u64, size: usize) -> Result<Value> {
    let r = env.redis()?;
    Ok(json!({
        "mode": mode,
        "redis": {"host": r.host, "port": r.port, "db": r.db},
        "queue": queue,
        "n": n,
        "size": size,
        "batch": BATCH,
        "stall_ms": env.stall.as_millis() as u64,
    }))
}

fn limit(env: &Env, n: u64) -> Duration {
    env.stall * 4 + Duration::from_secs(n / 1_000)
}

fn secs(v: &Value) -> Result<Duration> {
    v["secs"]
        .as_f64()
        .map(Duration::from_secs_f64)
        .ok_or_else(|| anyhow!("bench.js reported no secs: {v}"))
}

#[async_trait]
impl Subject for BullMq {
    fn name(&self) -> &'static str {
        "bullmq"
    }
    fn backend(&self) -> Backend {
        Backend::Redis
    }
    fn role(&self) -> Role {
        Role::Peer
    }
    fn describe(&self) -> String {
        "BullMQ (Node 20, pinned in bench/bullmq): Queue.addBulk(100) sequentially; Worker at concurrency N \
         with a no-op processor, counted on 'completed'; removeOnComplete: true. End to end, the Worker and \
         the producer are two Node processes (one core each)"
            .into()
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let spec = base(env, "produce", &env.queue_name(self.name()), n, size)?;
        let v = setup(env)?.run(spec, limit(env, n)).await?;
        Ok(Sample::throughput(n, secs(&v)?))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let queue = env.queue_name(self.name());
        let mut consume = base(env, "consume", &queue, n, size)?;
        consume["concurrency"] = json!(concurrency);
        consume["max_ms"] = json!(env.cap.as_millis() as u64);
        let produce = base(env, "produce", &queue, n, size)?;
        let v = setup(env)?
            .run_split(consume, produce, limit(env, n))
            .await?;
        let done = v["done"].as_u64().unwrap_or(n);
        Ok(Sample::throughput_capped(done, secs(&v)?, done < n))
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let mut spec = base(env, "latency", &env.queue_name(self.name()), n, size)?;
        spec["rate"] = json!(rate);
        let v = setup(env)?
            .run(spec, limit(env, n) + Duration::from_secs(n / rate.max(1)))
            .await?;
        let lat: Vec<f64> = v["latencies_us"]
            .as_array()
            .ok_or_else(|| anyhow!("bench.js reported no latencies"))?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        Ok(Sample::latency(lat, rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        let queue = env.queue_name(self.name());
        let node = setup(env)?;
        node.run(
            base(env, "fill", &queue, backlog, size)?,
            limit(env, backlog),
        )
        .await?;
        let mut spec = base(env, "drain", &queue, backlog, size)?;
        spec["concurrency"] = json!(1);
        spec["max_ms"] = json!(env.rss_cap.as_millis() as u64);
        let v = node.run(spec, limit(env, backlog)).await?;
        Ok(Sample::Rss {
            backlog,
            peak_kib: v["maxrss_kib"]
                .as_u64()
                .ok_or_else(|| anyhow!("bench.js reported no maxrss_kib"))?,
            before_consume_kib: None,
            secs: secs(&v)?.as_secs_f64(),
            consumed: v["done"].as_u64().unwrap_or(backlog),
            capped: v["capped"] == Value::Bool(true),
        })
    }
}

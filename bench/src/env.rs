//! What every driver needs from the run: the Redis server, fresh queue names, the
//! stall limit, and how to start a consumer child process for RSS measurements.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::redis_server::RedisServer;

#[derive(Debug)]
pub struct Env {
    pub redis: Option<RedisServer>,
    /// The Kafka broker, when a Kafka subject runs.
    pub kafka: Option<crate::subjects::kafka::KafkaBroker>,
    pub stall: Duration,
    /// Throughput runs stop here and report the rate so far (marked capped).
    pub cap: Duration,
    /// RSS consumer children stop draining after this long.
    pub rss_cap: Duration,
    /// `--worker-prefetch`.
    pub worker_prefetch: Option<usize>,
    pub exe: PathBuf,
    pub bullmq: Option<crate::subjects::bullmq::NodeSetup>,
    /// Why BullMQ could not be set up, when it could not.
    pub bullmq_error: Option<String>,
    next: AtomicU64,
}

impl Env {
    pub fn new(redis: Option<RedisServer>, stall: Duration, cap: Duration) -> Result<Self> {
        Ok(Env {
            redis,
            kafka: None,
            stall,
            cap,
            rss_cap: cap * 2,
            worker_prefetch: None,
            exe: std::env::current_exe().context("locating the bench binary")?,
            bullmq: None,
            bullmq_error: None,
            next: AtomicU64::new(0),
        })
    }

    /// A queue name no earlier run in this process used.
    pub fn queue_name(&self, subject: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("bench-{subject}-{}-{n}", std::process::id())
    }

    pub fn redis(&self) -> Result<&RedisServer> {
        self.redis
            .as_ref()
            .ok_or_else(|| anyhow!("no Redis server in this run"))
    }

    pub fn kafka(&self) -> Result<&crate::subjects::kafka::KafkaBroker> {
        self.kafka
            .as_ref()
            .ok_or_else(|| anyhow!("no Kafka broker in this run"))
    }

    /// Drain a `backlog` of `size`-byte messages already waiting in `queue` with a
    /// consumer child of `subject`, and turn its report into an RSS sample.
    /// `in_process_queue`: the queue lives in the child (memory backends), so its RSS
    /// before consuming is meaningful and reported.
    pub async fn rss_sample(
        &self,
        subject: &str,
        queue: String,
        redis_url: Option<String>,
        backlog: u64,
        size: usize,
        in_process_queue: bool,
    ) -> Result<crate::model::Sample> {
        let report = self
            .run_child(&ChildSpec {
                subject: subject.into(),
                queue,
                backlog,
                size,
                redis_url,
                stall_secs: self.stall.as_secs(),
                cap_secs: self.rss_cap.as_secs_f64(),
                worker_prefetch: self.worker_prefetch,
            })
            .await?;
        Ok(crate::model::Sample::Rss {
            backlog,
            peak_kib: report.peak_kib,
            before_consume_kib: in_process_queue.then_some(report.before_consume_kib),
            secs: report.secs,
            consumed: report.consumed,
            capped: report.capped,
        })
    }

    /// Run this binary as an RSS consumer child and return what it reported.
    pub async fn run_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let spec_json = serde_json::to_string(spec)?;
        let child = tokio::process::Command::new(&self.exe)
            .arg("--child")
            .arg(&spec_json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the consumer child process")?;
        // Generous: a child reports its own stalls; this only bounds a hung process.
        let limit = self.stall * 4 + Duration::from_secs(spec.backlog / 2_000);
        let out = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("consumer child did not finish within {} s", limit.as_secs()))??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        if !out.status.success() {
            bail!(
                "consumer child failed ({}): {} {}",
                out.status,
                line,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_str(line).with_context(|| format!("child printed {line:?}"))
    }
}

/// What the parent asks an RSS consumer child to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    pub subject: String,
    pub queue: String,
    pub backlog: u64,
    pub size: usize,
    pub redis_url: Option<String>,
    pub stall_secs: u64,
    /// Draining stops after this long (the peak of a slow consumer is reached long
    /// before it has drained 1M messages).
    pub cap_secs: f64,
    #[serde(default)]
    pub worker_prefetch: Option<usize>,
}

/// What the child reports on its last stdout line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildReport {
    /// VmHWM (peak resident set) of the child, KiB.
    pub peak_kib: u64,
    /// VmRSS just before consuming started, KiB.
    pub before_consume_kib: u64,
    pub consumed: u64,
    pub secs: f64,
    /// Draining hit the time cap before the backlog was empty.
    #[serde(default)]
    pub capped: bool,
}

/// The end of every RSS child: drain (at most `spec.cap_secs`), then read the peak
/// RSS. `before_kib` is the RSS read before the consuming tasks started.
pub async fn finish_drain(
    before_kib: u64,
    tasks: tokio::task::JoinSet<Result<()>>,
    progress: &std::sync::Arc<crate::drive::Progress>,
    start: std::time::Instant,
    spec: &ChildSpec,
) -> Result<ChildReport> {
    let (elapsed, capped) = crate::drive::drive(
        tasks,
        progress,
        start,
        Duration::from_secs(spec.stall_secs),
        Some(Duration::from_secs_f64(spec.cap_secs)),
    )
    .await?;
    Ok(ChildReport {
        peak_kib: proc_status_kib("VmHWM")?,
        before_consume_kib: before_kib,
        consumed: if capped {
            progress.capped_at()
        } else {
            progress.target()
        },
        secs: elapsed.as_secs_f64(),
        capped,
    })
}

/// A field of /proc/self/status in KiB (VmHWM, VmRSS).
pub fn proc_status_kib(field: &str) -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_peak_rss() {
        // RSS first: the peak read afterwards can only be higher.
        let rss = proc_status_kib("VmRSS").unwrap();
        let hwm = proc_status_kib("VmHWM").unwrap();
        assert!(hwm >= rss && rss > 0, "hwm {hwm} rss {rss}");
    }
}

//! Command-line flags.
//!
//! Defaults are a full run sized for a 2-core machine (~10 minutes); `--smoke` swaps
//! in tiny counts so CI can check that every subject still runs end to end.

use std::path::PathBuf;

use clap::Parser;

/// Side-by-side benchmarks of ferrymq against raw clients and peer libraries.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferrymq-bench", version, about)]
pub struct Args {
    /// Messages per throughput run (produce-only and end-to-end).
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,

    /// Rounds; every subject runs once per round, interleaved (A, B, A, B, ...),
    /// and the tables report medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,

    /// Backends to run (comma separated): memory, redis, kafka.
    #[arg(long, value_delimiter = ',', default_value = "memory,redis")]
    pub backends: Vec<String>,

    /// Only these subjects (comma separated names, see `--list`); default all.
    #[arg(long, value_delimiter = ',')]
    pub subjects: Vec<String>,

    /// Workloads (comma separated): produce, e2e, latency, rss.
    #[arg(long, value_delimiter = ',', default_value = "produce,e2e,latency,rss")]
    pub workloads: Vec<String>,

    /// Handler concurrencies for the end-to-end workload (64: where round-trip-per-job
    /// peers are at their best).
    #[arg(long, value_delimiter = ',', default_value = "1,4,64")]
    pub concurrency: Vec<usize>,

    /// Message payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,4096")]
    pub sizes: Vec<usize>,

    /// Messages per second sent, one at a time, in the latency workload.
    #[arg(long, default_value_t = 2_000)]
    pub latency_rate: u64,

    /// Messages per latency run.
    #[arg(long, default_value_t = 2_000)]
    pub latency_messages: u64,

    /// Backlogs (messages waiting before the consumer starts) for the RSS workload.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    pub rss_backlogs: Vec<u64>,

    /// Payload sizes for the RSS workload (a 1M x 4 KiB backlog is 4 GiB in Redis
    /// and takes minutes to fill, so the default is 100 B only).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pub rss_sizes: Vec<usize>,

    /// Rounds of the RSS workload (a peak RSS varies little between rounds, and
    /// the 1M backlogs dominate the run time).
    #[arg(long, default_value_t = 1)]
    pub rss_rounds: usize,

    /// Peers (not ferrymq, not raw) run the RSS workload only up to this backlog:
    /// filling and draining 1M jobs through BullMQ or omniqueue takes minutes each.
    #[arg(long, default_value_t = 10_000)]
    pub peer_rss_max_backlog: u64,

    /// An end-to-end run still going after this many seconds is stopped and its
    /// rate taken over the messages it handled (marked "capped" in the results):
    /// slow peers would otherwise take minutes per run. RSS consumers drain for at
    /// most twice this.
    #[arg(long, default_value_t = 5.0)]
    pub max_run_secs: f64,

    /// A run that makes no progress for this many seconds fails (apalis-redis is
    /// known to stall for good once ~8,000 jobs wait).
    #[arg(long, default_value_t = 15)]
    pub stall_secs: u64,

    /// Use this Redis server (redis://host:port/db) instead of starting one. The
    /// bench FLUSHes that database between runs: never point it at data you keep.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// Port of the Redis server the bench starts (with scripts/redis.sh) and stops.
    /// Its own port, so the bench neither flushes nor disturbs the test server.
    #[arg(long, default_value_t = 6398)]
    pub redis_port: u16,

    /// Use this Kafka cluster (`host:port[,host:port…]`) instead of starting one
    /// (the bench creates and deletes topics of its own there).
    #[arg(long)]
    pub kafka_brokers: Option<String>,

    /// Port of the Kafka broker the bench starts (with scripts/kafka.sh; the
    /// controller on the next port) and stops, when a Kafka subject runs.
    #[arg(long, default_value_t = 9396)]
    pub kafka_port: u16,

    /// Set the ferrymq Worker's prefetch (default: the Worker's own default). For
    /// experiments only: the published results use the defaults.
    #[arg(long)]
    pub worker_prefetch: Option<usize>,

    /// Tiny counts (finishes in well under a minute): a CI smoke test.
    #[arg(long)]
    pub smoke: bool,

    /// Write every figure, the ratios and the machine description to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Directory with BullMQ's package.json, package-lock.json and bench.js.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bullmq"))]
    pub bullmq_dir: PathBuf,

    /// Cache directory for npm installs (default $FERRYMQ_CACHE or ~/.cache/ferrymq).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,

    /// List the subjects and exit.
    #[arg(long)]
    pub list: bool,

    /// Internal: run as the consumer child of an RSS measurement (JSON spec).
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

impl Args {
    /// Apply `--smoke`: tiny counts, one round, small backlogs.
    pub fn normalized(mut self) -> Self {
        if self.smoke {
            // Every subject and workload once, small enough for CI (< 60 s with the
            // slow peers, which hit the 1 s cap): it proves the drivers still run, it
            // measures nothing.
            self.messages = self.messages.min(1_000);
            self.rounds = self.rounds.min(1);
            self.sizes = vec![100];
            self.concurrency = vec![1, 64];
            self.latency_messages = self.latency_messages.min(100);
            self.latency_rate = self.latency_rate.min(1_000);
            self.rss_backlogs = vec![1_000];
            self.peer_rss_max_backlog = self.peer_rss_max_backlog.min(1_000);
            self.max_run_secs = self.max_run_secs.min(1.0);
            self.rss_rounds = 1;
            self.stall_secs = self.stall_secs.min(10);
        }
        self.rounds = self.rounds.max(1);
        self.rss_rounds = self.rss_rounds.max(1);
        self
    }

    pub fn wants_workload(&self, name: &str) -> bool {
        self.workloads.iter().any(|w| w == name)
    }

    pub fn wants_backend(&self, name: &str) -> bool {
        self.backends.iter().any(|b| b == name)
    }

    pub fn wants_subject(&self, name: &str) -> bool {
        self.subjects.is_empty() || self.subjects.iter().any(|s| s == name)
    }

    pub fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("FERRYMQ_CACHE") {
            return PathBuf::from(dir);
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        home.join(".cache").join("ferrymq")
    }
}

//! What is measured (workloads), who is measured (roles, backends) and what one
//! measurement yields (samples).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The queue technology a subject runs on; ratios only compare within one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Memory,
    Redis,
    Kafka,
    Sqs,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::Kafka => "kafka",
            Backend::Sqs => "sqs",
        })
    }
}

/// Why a subject is in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The client used directly, the way an expert would: the lower bound.
    Raw,
    /// ferrymq itself.
    Ferrymq,
    /// A library people would otherwise pick.
    Peer,
}

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// Send `n` messages in batches; timed until the last send is confirmed.
    Produce,
    /// Produce `n` while `concurrency` handlers consume and ack them; timed from the
    /// first send to the last ack.
    EndToEnd { concurrency: usize },
    /// One send at a time at a fixed rate; enqueue-to-handler latency.
    Latency,
    /// Peak RSS of a consumer process draining a backlog of this many messages.
    Rss { backlog: u64 },
}

impl Workload {
    /// Stable key used in tables and the JSON file.
    pub fn key(&self) -> String {
        match self {
            Workload::Produce => "produce".into(),
            Workload::EndToEnd { concurrency } => format!("e2e-c{concurrency}"),
            Workload::Latency => "latency".into(),
            Workload::Rss { backlog } => format!("rss-{}", human_count(*backlog)),
        }
    }
}

/// `1000000` -> `1M`, `10000` -> `10k`.
pub fn human_count(n: u64) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n % 1_000 == 0 {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

/// `100` -> `100B`, `4096` -> `4KiB`.
pub fn human_size(n: usize) -> String {
    if n >= 1024 && n % 1024 == 0 {
        format!("{}KiB", n / 1024)
    } else {
        format!("{n}B")
    }
}

/// The figures of one measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sample {
    Throughput {
        /// Messages handled (fewer than asked when `capped`).
        messages: u64,
        secs: f64,
        msgs_per_sec: f64,
        /// The run hit the time cap and was stopped; the rate is over what it did.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        capped: bool,
    },
    Latency {
        messages: u64,
        rate: u64,
        p50_us: f64,
        p99_us: f64,
        max_us: f64,
    },
    Rss {
        backlog: u64,
        /// VmHWM of the consumer process, KiB.
        peak_kib: u64,
        /// RSS of the consumer process once the backlog was in place and before
        /// consuming started (only where the backlog lives in that process).
        #[serde(skip_serializing_if = "Option::is_none")]
        before_consume_kib: Option<u64>,
        /// How long draining ran.
        secs: f64,
        /// Messages drained (fewer than the backlog when `capped`).
        consumed: u64,
        /// Draining was stopped at the time cap; the peak is over what it drained.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        capped: bool,
    },
}

impl Sample {
    pub fn throughput(messages: u64, elapsed: Duration) -> Self {
        Sample::throughput_capped(messages, elapsed, false)
    }

    pub fn throughput_capped(messages: u64, elapsed: Duration, capped: bool) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Sample::Throughput {
            messages,
            secs,
            msgs_per_sec: messages as f64 / secs,
            capped,
        }
    }

    /// Latencies in microseconds, in any order.
    pub fn latency(mut micros: Vec<f64>, rate: u64) -> Self {
        micros.sort_by(f64::total_cmp);
        Sample::Latency {
            messages: micros.len() as u64,
            rate,
            p50_us: percentile(&micros, 50.0),
            p99_us: percentile(&micros, 99.0),
            max_us: micros.last().copied().unwrap_or(0.0),
        }
    }

    /// The headline number (msgs/s, p50 µs, peak KiB) used for medians and ratios.
    pub fn headline(&self) -> f64 {
        match self {
            Sample::Throughput { msgs_per_sec, .. } => *msgs_per_sec,
            Sample::Latency { p50_us, .. } => *p50_us,
            Sample::Rss { peak_kib, .. } => *peak_kib as f64,
        }
    }
}

/// Nearest-rank percentile of sorted data.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median (mean of the middle two for even counts).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn keys() {
        assert_eq!(Workload::EndToEnd { concurrency: 4 }.key(), "e2e-c4");
        assert_eq!(Workload::Rss { backlog: 1_000_000 }.key(), "rss-1M");
        assert_eq!(Workload::Rss { backlog: 10_000 }.key(), "rss-10k");
        assert_eq!(human_size(4096), "4KiB");
        assert_eq!(human_size(100), "100B");
    }
}

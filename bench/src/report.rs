//! Results: medians per (subject, workload, size), ratios ferrymq/raw and
//! ferrymq/peer, Markdown tables for stdout (pasteable into the README) and the
//! JSON document with every figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::model::{human_size, median, Backend, Role, Sample};

/// Every sample and failure of one (subject, workload, size).
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub subject: String,
    pub backend: Backend,
    pub role: Role,
    pub workload: String,
    pub size: usize,
    pub samples: Vec<Sample>,
    /// Set when a run failed; later rounds of this cell are skipped.
    pub failure: Option<String>,
    /// Set when the cell was deliberately not run.
    pub skipped: Option<String>,
    pub median: Option<Median>,
}

/// Medians over rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Median {
    /// msgs/s, p50 µs or peak KiB (see `metric`).
    pub value: f64,
    pub metric: &'static str,
    /// For latency: median p99 µs; for RSS: median RSS before consuming, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<f64>,
}

impl Cell {
    pub fn compute_median(&mut self) {
        let heads: Vec<f64> = self.samples.iter().map(Sample::headline).collect();
        let Some(value) = median(&heads) else {
            self.median = None;
            return;
        };
        let (metric, secondary) = match self.samples.first() {
            Some(Sample::Throughput { .. }) => ("msgs_per_sec", None),
            Some(Sample::Latency { .. }) => {
                let p99: Vec<f64> = self
                    .samples
                    .iter()
                    .filter_map(|s| match s {
                        Sample::Latency { p99_us, .. } => Some(*p99_us),
                        _ => None,
                    })
                    .collect();
                ("p50_us", median(&p99))
            }
            Some(Sample::Rss { .. }) => {
                let before: Vec<f64> = self
                    .samples
                    .iter()
                    .filter_map(|s| match s {
                        Sample::Rss {
                            before_consume_kib: Some(b),
                            ..
                        } => Some(*b as f64),
                        _ => None,
                    })
                    .collect();
                ("peak_rss_kib", median(&before))
            }
            None => return,
        };
        self.median = Some(Median {
            value,
            metric,
            secondary,
        });
    }
}

/// One ratio: `ferrymq` subject over `versus` subject.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub backend: Backend,
    pub workload: String,
    pub size: usize,
    pub ferrymq: String,
    pub versus: String,
    pub versus_role: Role,
    pub metric: &'static str,
    /// ferrymq / versus. Throughput: higher is better for ferrymq; latency and RSS:
    /// lower is better for ferrymq.
    pub ratio: f64,
    /// p99 ratio, for latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_p99: Option<f64>,
}

pub fn ratios(cells: &[Cell]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for f in cells.iter().filter(|c| c.role == Role::Ferrymq) {
        let Some(fm) = &f.median else { continue };
        for o in cells.iter().filter(|c| {
            c.role != Role::Ferrymq
                && c.backend == f.backend
                && c.workload == f.workload
                && c.size == f.size
        }) {
            let Some(om) = &o.median else { continue };
            if om.value <= 0.0 {
                continue;
            }
            let ratio_p99 = match (fm.metric, fm.secondary, om.secondary) {
                ("p50_us", Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            out.push(Ratio {
                backend: f.backend,
                workload: f.workload.clone(),
                size: f.size,
                ferrymq: f.subject.clone(),
                versus: o.subject.clone(),
                versus_role: o.role,
                metric: fm.metric,
                ratio: fm.value / om.value,
                ratio_p99,
            });
        }
    }
    out
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn fmt_latency(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 1_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn fmt_cell(c: &Cell) -> String {
    if c.failure.is_some() && c.median.is_none() {
        return "FAIL (see Failures)".into();
    }
    if c.skipped.is_some() {
        return "not run".into();
    }
    let Some(m) = &c.median else {
        return "–".into();
    };
    match m.metric {
        "msgs_per_sec"
            if c.samples
                .iter()
                .any(|s| matches!(s, Sample::Throughput { capped: true, .. })) =>
        {
            format!("{} (capped)", thousands(m.value))
        }
        "msgs_per_sec" => thousands(m.value),
        "p50_us" => format!(
            "{} / {}",
            fmt_latency(m.value),
            m.secondary.map_or("?".into(), fmt_latency)
        ),
        _ => {
            let mib = m.value / 1024.0;
            let capped = if c
                .samples
                .iter()
                .any(|s| matches!(s, Sample::Rss { capped: true, .. }))
            {
                " (capped)"
            } else {
                ""
            };
            match m.secondary {
                Some(b) => format!("{mib:.1} ({:.1} before consuming){capped}", b / 1024.0),
                None => format!("{mib:.1}{capped}"),
            }
        }
    }
}

fn workload_header(w: &str) -> String {
    if w == "produce" {
        "produce msg/s".into()
    } else if let Some(c) = w.strip_prefix("e2e-c") {
        format!("e2e c={c} msg/s")
    } else if w == "latency" {
        "latency p50 / p99".into()
    } else if let Some(b) = w.strip_prefix("rss-") {
        format!("RSS {b} backlog MiB")
    } else {
        w.into()
    }
}

/// Order workloads the way the issue lists them.
fn workload_rank(w: &str) -> (u8, u64) {
    if w == "produce" {
        (0, 0)
    } else if let Some(c) = w.strip_prefix("e2e-c") {
        (1, c.parse().unwrap_or(0))
    } else if w == "latency" {
        (2, 0)
    } else {
        let n = w.trim_start_matches("rss-");
        let v = if let Some(m) = n.strip_suffix('M') {
            m.parse::<u64>().unwrap_or(0) * 1_000_000
        } else if let Some(k) = n.strip_suffix('k') {
            k.parse::<u64>().unwrap_or(0) * 1_000
        } else {
            n.parse().unwrap_or(0)
        };
        (3, v)
    }
}

/// Markdown tables: one per backend and size with the medians, then the ratios.
pub fn tables(cells: &[Cell], ratios: &[Ratio], rounds: usize, rss_rounds: usize) -> String {
    let mut out = String::new();
    let mut groups: BTreeMap<(Backend, usize), Vec<&Cell>> = BTreeMap::new();
    for c in cells {
        groups.entry((c.backend, c.size)).or_default().push(c);
    }
    for ((backend, size), cs) in &groups {
        let mut workloads: Vec<&str> = cs.iter().map(|c| c.workload.as_str()).collect();
        workloads.sort_by_key(|w| workload_rank(w));
        workloads.dedup();
        let mut subjects: Vec<&str> = Vec::new();
        for c in cs {
            if !subjects.contains(&c.subject.as_str()) {
                subjects.push(&c.subject);
            }
        }
        let _ = writeln!(
            out,
            "\n### {backend}, {} messages (medians of {rounds} rounds; RSS {rss_rounds})\n",
            human_size(*size)
        );
        let _ = write!(out, "| subject |");
        for w in &workloads {
            let _ = write!(out, " {} |", workload_header(w));
        }
        let _ = write!(out, "\n|---|");
        for _ in &workloads {
            let _ = write!(out, "---:|");
        }
        out.push('\n');
        for s in &subjects {
            let _ = write!(out, "| {s} |");
            for w in &workloads {
                let cell = cs.iter().find(|c| c.subject == *s && c.workload == *w);
                let _ = write!(out, " {} |", cell.map_or("n/a".into(), |c| fmt_cell(c)));
            }
            out.push('\n');
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\n### Ratios ferrymq / other (throughput: > 1 means ferrymq is faster; latency p50 and RSS: < 1 means ferrymq is lower)\n"
        );
        let mut by_pair: BTreeMap<(Backend, usize, String, String), Vec<&Ratio>> = BTreeMap::new();
        for r in ratios {
            by_pair
                .entry((r.backend, r.size, r.ferrymq.clone(), r.versus.clone()))
                .or_default()
                .push(r);
        }
        let mut workloads: Vec<&str> = ratios.iter().map(|r| r.workload.as_str()).collect();
        workloads.sort_by_key(|w| workload_rank(w));
        workloads.dedup();
        let _ = write!(out, "| backend | size | ferrymq / other |");
        for w in &workloads {
            let _ = write!(out, " {w} |");
        }
        let _ = write!(out, "\n|---|---|---|");
        for _ in &workloads {
            let _ = write!(out, "---:|");
        }
        out.push('\n');
        for ((backend, size, f, v), rs) in &by_pair {
            let _ = write!(out, "| {backend} | {} | {f} / {v} |", human_size(*size));
            for w in &workloads {
                match rs.iter().find(|r| r.workload == *w) {
                    Some(r) => {
                        let _ = write!(out, " {:.2} |", r.ratio);
                    }
                    None => {
                        let _ = write!(out, " – |");
                    }
                }
            }
            out.push('\n');
        }
    }
    let mut not_run: Vec<&str> = cells.iter().filter_map(|c| c.skipped.as_deref()).collect();
    not_run.sort_unstable();
    not_run.dedup();
    for reason in not_run {
        let _ = writeln!(out, "\nnot run: {reason}");
    }
    let failures: Vec<&Cell> = cells.iter().filter(|c| c.failure.is_some()).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n### Failures\n");
        for c in failures {
            let _ = writeln!(
                out,
                "- {} {} {}: {}",
                c.subject,
                c.workload,
                human_size(c.size),
                c.failure.as_deref().unwrap_or_default()
            );
        }
    }
    out
}

/// The whole JSON document.
pub fn document(meta: Value, cells: &[Cell], ratios: &[Ratio]) -> Value {
    let mut doc = meta;
    doc["results"] = serde_json::to_value(cells).unwrap_or(Value::Null);
    doc["ratios"] = serde_json::to_value(ratios).unwrap_or(Value::Null);
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cell(subject: &str, role: Role, rates: &[f64]) -> Cell {
        let mut c = Cell {
            subject: subject.into(),
            backend: Backend::Redis,
            role,
            workload: "produce".into(),
            size: 100,
            samples: rates
                .iter()
                .map(|r| Sample::throughput(*r as u64, Duration::from_secs(1)))
                .collect(),
            failure: None,
            skipped: None,
            median: None,
        };
        c.compute_median();
        c
    }

    #[test]
    fn ratios_use_medians() {
        let cells = vec![
            cell("raw", Role::Raw, &[100.0, 300.0, 200.0]),
            cell("fm", Role::Ferrymq, &[100.0, 150.0, 190.0]),
            cell("peer", Role::Peer, &[10.0, 10.0, 10.0]),
        ];
        let r = ratios(&cells);
        assert_eq!(r.len(), 2);
        let raw = r.iter().find(|r| r.versus == "raw").unwrap();
        assert!((raw.ratio - 0.75).abs() < 1e-9, "{}", raw.ratio);
        let peer = r.iter().find(|r| r.versus == "peer").unwrap();
        assert!((peer.ratio - 15.0).abs() < 1e-9);
        let t = tables(&cells, &r, 3, 1);
        assert!(t.contains("| fm | 150 |"), "{t}");
        assert!(t.contains("fm / raw | 0.75 |"), "{t}");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}

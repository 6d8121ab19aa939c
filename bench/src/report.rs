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

/// "ferrymq vs peer" at the peer's best end-to-end concurrency: the peer's highest
/// e2e rate over the concurrencies run, against ferrymq's at that same concurrency
/// (and ferrymq's own best, for reference).
#[derive(Debug, Clone, Serialize)]
pub struct BestRatio {
    pub backend: Backend,
    pub size: usize,
    pub ferrymq: String,
    pub peer: String,
    /// The concurrency at which the peer was fastest.
    pub peer_best_concurrency: usize,
    pub peer_msgs_per_sec: f64,
    pub ferrymq_msgs_per_sec: f64,
    /// ferrymq / peer, both at the peer's best concurrency.
    pub ratio: f64,
    /// ferrymq's best e2e rate over every concurrency / the peer's best.
    pub best_vs_best: f64,
}

fn e2e_concurrency(workload: &str) -> Option<usize> {
    workload.strip_prefix("e2e-c")?.parse().ok()
}

fn best_e2e<'a>(
    cells: &'a [Cell],
    subject: &str,
    backend: Backend,
    size: usize,
) -> Vec<(usize, f64, &'a Cell)> {
    cells
        .iter()
        .filter(|c| c.subject == subject && c.backend == backend && c.size == size)
        .filter_map(|c| Some((e2e_concurrency(&c.workload)?, c.median.as_ref()?.value, c)))
        .collect()
}

pub fn best_ratios(cells: &[Cell]) -> Vec<BestRatio> {
    let mut out = Vec::new();
    let mut seen: Vec<(String, Backend, usize)> = Vec::new();
    for c in cells {
        if !matches!(c.role, Role::Ferrymq | Role::Peer) {
            continue;
        }
        let key = (c.subject.clone(), c.backend, c.size);
        if !seen.contains(&key) {
            seen.push(key);
        }
    }
    for (f, backend, size) in seen.iter().filter(|(s, ..)| {
        cells
            .iter()
            .any(|c| &c.subject == s && c.role == Role::Ferrymq)
    }) {
        let fm = best_e2e(cells, f, *backend, *size);
        let Some(f_best) = fm.iter().map(|x| x.1).reduce(f64::max) else {
            continue;
        };
        for (p, pb, ps) in seen.iter().filter(|(s, b, z)| {
            b == backend
                && z == size
                && cells
                    .iter()
                    .any(|c| &c.subject == s && c.role == Role::Peer)
        }) {
            let _ = (pb, ps);
            let peer = best_e2e(cells, p, *backend, *size);
            let Some(&(c_best, p_rate, _)) = peer.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else {
                continue;
            };
            let Some(&(_, f_rate, _)) = fm.iter().find(|x| x.0 == c_best) else {
                continue;
            };
            if p_rate <= 0.0 {
                continue;
            }
            out.push(BestRatio {
                backend: *backend,
                size: *size,
                ferrymq: f.clone(),
                peer: p.clone(),
                peer_best_concurrency: c_best,
                peer_msgs_per_sec: p_rate,
                ferrymq_msgs_per_sec: f_rate,
                ratio: f_rate / p_rate,
                best_vs_best: f_best / p_rate,
            });
        }
    }
    out
}

/// Markdown table of [`best_ratios`].
pub fn best_table(best: &[BestRatio]) -> String {
    if best.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n### ferrymq vs each peer at the peer's best end-to-end concurrency\n\n\
         | backend | size | ferrymq / peer | peer's best c | peer msg/s | ferrymq msg/s at that c | ratio | ferrymq best / peer best |\n\
         |---|---|---|---:|---:|---:|---:|---:|\n",
    );
    for b in best {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} | {} | {} | {:.2} | {:.2} |",
            b.backend,
            human_size(b.size),
            b.ferrymq,
            b.peer,
            b.peer_best_concurrency,
            thousands(b.peer_msgs_per_sec),
            thousands(b.ferrymq_msgs_per_sec),
            b.ratio,
            b.best_vs_best
        );
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart of the throughput ratios (ferrymq / other, per workload),
/// on a log scale around 1 (parity): bars to the right mean ferrymq is faster.
pub fn svg(ratios: &[Ratio]) -> String {
    let mut rows: Vec<&Ratio> = ratios
        .iter()
        .filter(|r| r.metric == "msgs_per_sec" && r.ratio > 0.0)
        .collect();
    rows.sort_by(|a, b| {
        (
            a.backend,
            a.size,
            &a.ferrymq,
            &a.versus,
            workload_rank(&a.workload),
        )
            .cmp(&(
                b.backend,
                b.size,
                &b.ferrymq,
                &b.versus,
                workload_rank(&b.workload),
            ))
    });
    let (label_w, plot_w, row_h, top, bottom) = (430.0, 520.0, 18.0, 40.0, 40.0);
    let height = top + bottom + row_h * rows.len().max(1) as f64;
    let width = label_w + plot_w + 70.0;
    // Log scale from 1/100 to 1000.
    let (lo, hi) = (-2.0f64, 3.0f64);
    let x = |v: f64| label_w + (v.log10().clamp(lo, hi) - lo) / (hi - lo) * plot_w;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{:.0}" y="16" font-size="13" font-weight="bold">ferrymq / other, throughput (log scale; right of 1 = ferrymq faster)</text>"#,
        label_w
    );
    for e in lo as i32..=hi as i32 {
        let v = 10f64.powi(e);
        let xv = x(v);
        let _ = writeln!(
            out,
            r##"<line x1="{xv:.1}" y1="{:.0}" x2="{xv:.1}" y2="{:.0}" stroke="{}" stroke-width="1"/><text x="{xv:.1}" y="{:.0}" text-anchor="middle" fill="#555">{}</text>"##,
            top - 6.0,
            height - bottom + 4.0,
            if e == 0 { "#333" } else { "#ddd" },
            height - bottom + 18.0,
            if e < 0 {
                format!("{v}")
            } else {
                format!("{v:.0}")
            }
        );
    }
    let one = x(1.0);
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let xv = x(r.ratio);
        let (x0, w) = if xv >= one {
            (one, xv - one)
        } else {
            (xv, one - xv)
        };
        let color = match (r.versus_role, r.ratio >= 1.0) {
            (Role::Raw, _) => "#4a7bd0",
            (_, true) => "#3a9a5b",
            (_, false) => "#d0703a",
        };
        let label = format!(
            "{} {} {} / {} {}",
            r.backend,
            human_size(r.size),
            r.ferrymq,
            r.versus,
            r.workload
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{:.2}</text>"#,
            label_w - 6.0,
            y + row_h * 0.7,
            xml_escape(&label),
            y + 2.0,
            w.max(1.0),
            row_h - 4.0,
            x0 + w.max(1.0) + 4.0,
            y + row_h * 0.7,
            r.ratio
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.0}" y="{:.0}" fill="#555">blue: vs the raw client (the bound); green/orange: vs a peer (faster/slower)</text>"##,
        label_w,
        height - 6.0
    );
    out.push_str("</svg>\n");
    out
}

/// The whole JSON document.
pub fn document(meta: Value, cells: &[Cell], ratios: &[Ratio], best: &[BestRatio]) -> Value {
    let mut doc = meta;
    doc["results"] = serde_json::to_value(cells).unwrap_or(Value::Null);
    doc["ratios"] = serde_json::to_value(ratios).unwrap_or(Value::Null);
    doc["at_peer_best"] = serde_json::to_value(best).unwrap_or(Value::Null);
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
    fn peers_are_quoted_at_their_best_concurrency() {
        let mk = |subject: &str, role: Role, workload: &str, rate: f64| {
            let mut c = cell(subject, role, &[rate]);
            c.workload = workload.into();
            c.compute_median();
            c
        };
        let cells = vec![
            mk("fm", Role::Ferrymq, "e2e-c1", 100.0),
            mk("fm", Role::Ferrymq, "e2e-c64", 400.0),
            mk("peer", Role::Peer, "e2e-c1", 10.0),
            mk("peer", Role::Peer, "e2e-c64", 50.0),
        ];
        let best = best_ratios(&cells);
        assert_eq!(best.len(), 1);
        assert_eq!(best[0].peer_best_concurrency, 64);
        assert!((best[0].ratio - 8.0).abs() < 1e-9);
        let svg = svg(&ratios(&cells));
        assert!(
            svg.starts_with("<svg") && svg.contains("fm / peer e2e-c64"),
            "{svg}"
        );
        assert!(best_table(&best).contains("| fm / peer | 64 |"));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}

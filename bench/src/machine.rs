//! The machine a run was measured on, read from /proc.

use serde_json::{json, Value};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Cores, CPU model, memory, kernel and load average.
pub fn describe() -> Value {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let mem_total_kib: Option<u64> = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    json!({
        "cores": std::thread::available_parallelism().map_or(0, usize::from),
        "cpu_model": model,
        "mem_total_kib": mem_total_kib,
        "mem_total_gib": mem_total_kib.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "loadavg": load_average(),
    })
}

/// /proc/loadavg's first three fields.
pub fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Versions of the Rust crates measured, from the workspace lock file this binary
/// was built with.
pub fn crate_versions() -> Value {
    let lock = include_str!("../../Cargo.lock");
    let mut map = serde_json::Map::new();
    for name in ["omniqueue", "apalis", "apalis-redis", "redis", "tokio"] {
        let mut versions = Vec::new();
        let needle = format!("name = \"{name}\"\nversion = \"");
        let mut rest = lock;
        while let Some(i) = rest.find(&needle) {
            rest = &rest[i + needle.len()..];
            if let Some(end) = rest.find('"') {
                versions.push(Value::String(rest[..end].to_string()));
            }
        }
        map.insert(name.to_string(), Value::Array(versions));
    }
    Value::Object(map)
}

//! The Redis server of a run: started with the project's `scripts/redis.sh` on a
//! port of the bench's own (so that FLUSHDB between runs can never touch the test
//! server), or one the user names with `--redis-url`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

#[derive(Debug)]
pub struct RedisServer {
    /// `redis://host:port/db`.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub db: i64,
    /// The bench started it, so it stops it.
    started: bool,
    script: PathBuf,
}

/// A multiplexed connection with a 60 s response timeout (redis-rs defaults to
/// 500 ms, which a FLUSHDB of a large backlog or a busy 2-core machine exceeds).
pub async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(60)));
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

fn script_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/redis.sh"))
}

fn ping(host: &str, port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-h", host, "-p", &port.to_string(), "ping"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
}

impl RedisServer {
    /// Use the server at `url`.
    pub fn existing(url: &str) -> Result<Self> {
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .with_context(|| format!("parsing --redis-url {url}"))?;
        let (host, port) = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
            other => bail!("--redis-url must be a plain TCP address, got {other:?}"),
        };
        let db = info.redis_settings().db();
        Ok(RedisServer {
            url: format!("redis://{host}:{port}/{db}"),
            host,
            port,
            db,
            started: false,
            script: script_path(),
        })
    }

    /// Start a server on 127.0.0.1:`port` with scripts/redis.sh (or reuse the one
    /// already answering there).
    pub fn start(port: u16) -> Result<Self> {
        let host = "127.0.0.1".to_string();
        let script = script_path();
        let already = ping(&host, port);
        if !already {
            if script.exists() {
                let out = Command::new("bash")
                    .arg(&script)
                    .args(["start", &port.to_string()])
                    .output()
                    .context("running scripts/redis.sh")?;
                if !out.status.success() {
                    bail!(
                        "scripts/redis.sh start {port} failed: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            } else {
                let state = std::env::temp_dir().join(format!("ferrymq-bench-redis-{port}"));
                std::fs::create_dir_all(&state)?;
                let status = Command::new("redis-server")
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                    ])
                    .args(["--appendonly", "no", "--daemonize", "yes"])
                    .arg("--pidfile")
                    .arg(state.join("redis.pid"))
                    .arg("--logfile")
                    .arg(state.join("redis.log"))
                    .status()
                    .context("starting redis-server (is it installed?)")?;
                if !status.success() {
                    bail!("redis-server failed to start");
                }
                let mut up = false;
                for _ in 0..100 {
                    if ping(&host, port) {
                        up = true;
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                if !up {
                    bail!("redis-server on port {port} did not answer PING within 10 s");
                }
            }
        }
        Ok(RedisServer {
            url: format!("redis://{host}:{port}/0"),
            host,
            port,
            db: 0,
            started: !already,
            script,
        })
    }

    /// Empty the bench's database, so that one run's leftovers cannot slow the next.
    /// Synchronous on the server (freeing a few GiB takes seconds), so that no
    /// background freeing competes with the next run for a core.
    pub async fn flush(&self) -> Result<()> {
        let mut conn = connect(&self.url).await?;
        redis::cmd("FLUSHDB").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// `INFO server` and a few `INFO memory` fields, as a JSON object.
    pub async fn info(&self) -> Result<serde_json::Value> {
        let mut conn = connect(&self.url).await?;
        let text: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        let mut map = serde_json::Map::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(':') {
                if matches!(
                    k,
                    "redis_version"
                        | "redis_mode"
                        | "os"
                        | "arch_bits"
                        | "multiplexing_api"
                        | "gcc_version"
                ) {
                    map.insert(
                        k.to_string(),
                        serde_json::Value::String(v.trim().to_string()),
                    );
                }
            }
        }
        map.insert("url".into(), serde_json::Value::String(self.url.clone()));
        Ok(serde_json::Value::Object(map))
    }

    /// Stop the server if this run started it.
    pub fn stop(&self) {
        if !self.started {
            return;
        }
        if self.script.exists() {
            let _ = Command::new("bash")
                .arg(&self.script)
                .args(["stop", &self.port.to_string()])
                .output();
        } else {
            let _ = Command::new("redis-cli")
                .args([
                    "-h",
                    &self.host,
                    "-p",
                    &self.port.to_string(),
                    "shutdown",
                    "nosave",
                ])
                .output();
        }
    }
}

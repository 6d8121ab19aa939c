//! Shared helpers of the Redis backend tests: the server comes from
//! FERRYMQ_TEST_REDIS_URL (start one with `scripts/redis.sh start 6399`).
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrymq_redis::{RedisConfig, RedisConsumer, RedisProducer};

/// `redis://127.0.0.1:6399` (no queue). Panics — fails the test — when unset.
pub fn base_url() -> String {
    match std::env::var("FERRYMQ_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
        _ => panic!(
            "FERRYMQ_TEST_REDIS_URL is not set: start a server with `scripts/redis.sh start 6399` \
             and export FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399"
        ),
    }
}

/// A queue name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    )
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(0)
}

/// Config for a fresh queue on the test server, `query` appended (`a=1&b=2`).
pub fn config(prefix: &str, query: &str) -> RedisConfig {
    let mut url = format!("{}/{}", base_url(), unique(prefix));
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    RedisConfig::from_url(&url).unwrap()
}

pub async fn connect(prefix: &str, query: &str) -> (RedisProducer, RedisConsumer, RedisConfig) {
    let cfg = config(prefix, query);
    let (p, c) = cfg.connect().await.unwrap();
    (p, c, cfg)
}

/// A raw redis connection to the test server, to look at keys directly.
pub async fn raw() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(base_url()).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

pub const WAIT: Duration = Duration::from_secs(5);

/// A redis-server of a test's own (for server settings the shared one must not
/// get), on a free port, killed on drop. Needs `redis-server` on PATH.
pub struct OwnServer {
    pub port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl OwnServer {
    pub fn start(extra: &[&str]) -> OwnServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("ferrymq-own-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); scripts/redis.sh start installs it")
            });
        // Owned at once, so every path below (a panic too) kills and reaps it.
        let server = OwnServer { port, child, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let up = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return server;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, queue: &str) -> String {
        format!("redis://127.0.0.1:{}/{queue}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

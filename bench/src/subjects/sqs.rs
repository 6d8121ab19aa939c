//! The SQS subjects' server and the ferrymq subjects on it (`ferrymq-sqs`, traits;
//! `ferrymq-sqs-worker`, the Worker with the default stack), driven by the same code
//! as every other backend ([`super::ferry`]). The raw baseline is in
//! [`super::sqs_raw`].
//!
//! The server: `FERRYMQ_BENCH_SQS_ENDPOINT=http://host:port` names one; otherwise the
//! bench starts LocalStack with the project's `scripts/sqs.sh` on
//! `FERRYMQ_BENCH_SQS_PORT` (default 4597, its own, so the test server is left alone)
//! when the first SQS subject runs, and stops it at the end of the run. Credentials
//! are static dummies (`test`/`test`, region us-east-1), never the AWS chain.
//!
//! Queues are standard queues with ferrymq's defaults, one fresh queue per run,
//! deleted after the run (LocalStack's once-a-second timer walks every queue, so
//! leftovers would slow later runs).
//!
//! LocalStack is the ceiling here (~1,300 msg/s for a raw batched loop on a 2-core
//! machine): the ratios to raw are the point, not the absolute rates.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;

use super::ferry::{FerryTraits, FerryWorker, Pair};
use super::Subject;
use crate::env::Env;
use crate::model::{Backend, Role, Sample, Workload};

/// The SQS server of this run.
#[derive(Debug)]
struct Server {
    endpoint: String,
    /// Started by the bench on this port (so stopped by it).
    started: Option<u16>,
}

static SERVER: OnceLock<std::result::Result<Server, String>> = OnceLock::new();

fn script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/sqs.sh"))
}

fn start_server() -> Result<Server> {
    if let Ok(endpoint) = std::env::var("FERRYMQ_BENCH_SQS_ENDPOINT") {
        if !endpoint.is_empty() {
            return Ok(Server {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                started: None,
            });
        }
    }
    let port: u16 = match std::env::var("FERRYMQ_BENCH_SQS_PORT") {
        Ok(p) => p
            .parse()
            .with_context(|| format!("FERRYMQ_BENCH_SQS_PORT={p:?} is not a port"))?,
        Err(_) => 4597,
    };
    let out = Command::new("bash")
        .arg(script())
        .args(["start", &port.to_string()])
        .output()
        .context("running scripts/sqs.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/sqs.sh start {port} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Server {
        endpoint: format!("http://127.0.0.1:{port}"),
        started: Some(port),
    })
}

/// The endpoint of the run's SQS server, starting LocalStack on first use.
pub fn endpoint() -> Result<String> {
    let server = SERVER.get_or_init(|| {
        // Called from the bench's multi-threaded runtime: the start blocks (~1-3 s).
        tokio::task::block_in_place(start_server).map_err(|e| format!("{e:#}"))
    });
    match server {
        Ok(s) => Ok(s.endpoint.clone()),
        Err(e) => Err(anyhow!("no SQS server: {e}")),
    }
}

/// Stop the LocalStack the bench started, if it did.
pub fn stop_server() {
    if let Some(Ok(Server {
        started: Some(port),
        ..
    })) = SERVER.get()
    {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &port.to_string()])
            .output();
    }
}

/// `sqs://QUEUE?…` on the run's server with ferrymq's defaults.
pub fn url(queue: &str) -> Result<String> {
    Ok(format!(
        "sqs://{queue}?endpoint={}&region=us-east-1&access_key_id=test&secret_access_key=test\
         &create=true",
        endpoint()?
    ))
}

/// Delete the queues named in `opened` (best effort).
async fn delete_queues(opened: &Mutex<Vec<String>>) {
    let names: Vec<String> = opened
        .lock()
        .map(|mut v| v.drain(..).collect())
        .unwrap_or_default();
    for name in names {
        if let Ok(cfg) = url(&name).and_then(|u| Ok(ferrymq_sqs::SqsConfig::from_url(&u)?)) {
            use ferrymq_core::Admin;
            if let Ok(admin) = cfg.admin().await {
                let _ = admin.delete().await;
            }
        }
    }
}

/// A ferrymq subject on SQS: the shared driver, plus deleting its queues after each
/// run and leaving out the RSS workload (a backlog lives in LocalStack, not in the
/// consumer, and filling 1M messages at ~1,300 msg/s takes minutes).
pub struct OnSqs {
    inner: Box<dyn Subject>,
    opened: Arc<Mutex<Vec<String>>>,
}

/// A connector that opens ferrymq-sqs queues and records their names.
fn connector(opened: Arc<Mutex<Vec<String>>>) -> super::ferry::Connector {
    Arc::new(move |_, queue: String| {
        let opened = opened.clone();
        Box::pin(async move {
            if let Ok(mut v) = opened.lock() {
                v.push(queue.clone());
            }
            let (p, c) = ferrymq_sqs::SqsConfig::from_url(&url(&queue)?)?
                .connect()
                .await?;
            Ok::<Pair, anyhow::Error>((Box::new(p), Box::new(c)))
        })
    })
}

const TRAITS: &str = "ferrymq-sqs (defaults, standard queue) through Box<dyn Producer>/Box<dyn \
                      Consumer>: send_batch(100) (SendMessageBatch of 10, 5 in flight); \
                      receive(100) shared by N tasks, Delivery::ack_all per batch \
                      (DeleteMessageBatch via the ack batcher)";

impl OnSqs {
    fn traits(name: &'static str, opened: &Arc<Mutex<Vec<String>>>) -> FerryTraits {
        FerryTraits::new(name, Backend::Sqs, connector(opened.clone()), TRAITS.into())
    }

    pub fn ferrymq_traits() -> Self {
        let opened = Arc::default();
        OnSqs {
            inner: Box::new(Self::traits("ferrymq-sqs", &opened)),
            opened,
        }
    }

    pub fn ferrymq_worker() -> Self {
        let opened = Arc::default();
        OnSqs {
            inner: Box::new(FerryWorker::new(
                "ferrymq-sqs-worker",
                Self::traits("ferrymq-sqs-worker", &opened),
            )),
            opened,
        }
    }
}

#[async_trait]
impl Subject for OnSqs {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn backend(&self) -> Backend {
        Backend::Sqs
    }
    fn role(&self) -> Role {
        Role::Ferrymq
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn applies(&self, workload: &Workload) -> bool {
        !matches!(workload, Workload::Rss { .. }) && self.inner.applies(workload)
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let r = self.inner.produce(env, n, size).await;
        delete_queues(&self.opened).await;
        r
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let r = self.inner.e2e(env, n, size, concurrency).await;
        delete_queues(&self.opened).await;
        r
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let r = self.inner.latency(env, n, size, rate).await;
        delete_queues(&self.opened).await;
        r
    }

    async fn rss(&self, _env: &Env, _backlog: u64, _size: usize) -> Result<Sample> {
        bail!("the RSS workload is not run on SQS")
    }
}

/// Every SQS subject, raw first.
pub fn subjects() -> Vec<Box<dyn Subject>> {
    vec![
        Box::new(super::sqs_raw::RawSqs),
        Box::new(OnSqs::ferrymq_traits()),
        Box::new(OnSqs::ferrymq_worker()),
    ]
}

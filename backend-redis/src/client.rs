//! The connection state a producer and consumer share, startup checks, and the
//! mapping of redis errors to ferrymq's typed errors.
//!
//! Two kinds of connection:
//! - one multiplexed, self-reconnecting connection (`ConnectionManager`) for every
//!   non-blocking command: sends, receive scripts, acks, depth. Concurrent callers
//!   are pipelined on it, so no call waits for a pool checkout;
//! - a `deadpool` pool for blocking reads: `XREADGROUP … BLOCK` holds its
//!   connection until data arrives, and would stall every command queued behind it
//!   on a shared connection.
//!
//! Against a Redis Cluster (`cluster=true`) both kinds are redis-rs' own cluster
//! client, [`redis::cluster_async::ClusterConnection`]: several shared ones for the
//! non-blocking commands, and pooled ones of their own (no response timeout) for
//! blocking reads — a blocking read on a shared cluster connection would stall its
//! node's pipeline exactly as on one server. Either way the rest of the backend sees
//! one type, [`Conn`], which implements [`ConnectionLike`]. Every key of a queue
//! carries the `{queue}` hash tag ([`Keys`]), so each script, pipeline and blocking
//! read of a queue goes to the one master that holds its slot.

use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::{Capabilities, Error, ErrorKind, Ordering, Priority, Result};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};

use crate::config::RedisConfig;
use crate::keys::Keys;
use crate::scripts::{scripts, Lua};
use crate::settings::Role;

/// Whole milliseconds of `d`, saturating (a script argument).
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Largest batch per call (send pipeline, receive, ack script).
pub(crate) const MAX_BATCH: usize = 1000;

/// Longest delay of a send or a nack, and longest lease extension: a year. Redis has
/// no limit of its own, but a due time is milliseconds in a Lua number (exact to
/// 2^53), and `Duration::MAX` as a delay is a bug upstream rather than a plan —
/// it is refused as `Unsupported` before anything is sent.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A connection to one server or to a cluster; cheap to clone (a handle on a
/// multiplexed connection's driver task).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server, self-reconnecting: the shared connections.
    Managed(ConnectionManager),
    /// One server, one plain connection: a blocking read's own.
    Plain(MultiplexedConnection),
    /// A Redis Cluster: routes each command to its key's slot, follows
    /// `MOVED`/`ASK`, reconnects by itself.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Makes the blocking-read connections: plain ones to the server, or cluster
/// connections of their own.
pub(crate) enum BlockingManager {
    Single {
        client: redis::Client,
        config: AsyncConnectionConfig,
    },
    Cluster(ClusterClient),
}

impl deadpool::managed::Manager for BlockingManager {
    type Type = Conn;
    type Error = RedisError;

    async fn create(&self) -> std::result::Result<Conn, RedisError> {
        match self {
            BlockingManager::Single { client, config } => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Plain),
            BlockingManager::Cluster(client) => {
                client.get_async_connection().await.map(Conn::Cluster)
            }
        }
    }

    async fn recycle(
        &self,
        conn: &mut Conn,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        match conn {
            // A cluster connection reconnects by itself (and a PING would go to
            // every master).
            Conn::Cluster(_) => Ok(()),
            _ => {
                let pong: String = redis::cmd("PING").query_async(conn).await?;
                if pong == "PONG" {
                    Ok(())
                } else {
                    Err(deadpool::managed::RecycleError::message(
                        "unexpected PING reply",
                    ))
                }
            }
        }
    }
}

/// The pool of connections for blocking reads.
pub(crate) type BlockingPool = deadpool::managed::Pool<BlockingManager>;
/// One of them; [`BlockingConn::take`] keeps it out of the pool (dropped after a
/// blocking read that may still be pending on the server).
pub(crate) type BlockingConn = deadpool::managed::Object<BlockingManager>;

pub(crate) struct Shared {
    pub(crate) config: RedisConfig,
    pub(crate) queue: Arc<str>,
    pub(crate) keys: Keys,
    conns: Vec<Conn>,
    next_conn: std::sync::atomic::AtomicUsize,
    pub(crate) blocking: BlockingPool,
    pub(crate) capabilities: Arc<Capabilities>,
    endpoint: String,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queue", &self.queue)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

pub(crate) fn capabilities(config: &RedisConfig) -> Capabilities {
    let mut caps = Capabilities::minimal("redis");
    // Ordered queues: one head per key handed out, kept across nacks, nack delays
    // and expired leases (the conformance suite's per-key cases, on the
    // `redis-ordered` setup).
    caps.ordering = if config.ordered {
        Ordering::PerKey
    } else {
        Ordering::None
    };
    caps.max_delay = Some(MAX_DELAY);
    caps.dedup_window = Some(config.dedup_window);
    caps.visibility_timeout = Some(config.visibility_timeout);
    // Checked per extend (`by` counted from the extend, which is never less than
    // the total counted from the receive would allow).
    caps.max_visibility = Some(MAX_DELAY);
    caps.extend_visibility = true;
    caps.max_nack_delay = Some(MAX_DELAY);
    caps.nack_delay_blocks = false;
    // Tested: receive → release → receive says attempt 1 (tests/queue.rs).
    caps.release_keeps_attempt = true;
    caps.priority = if config.priority_levels > 1 {
        Priority::Levels(config.priority_levels)
    } else {
        Priority::None
    };
    caps.max_message_size = config.max_message_size;
    caps.max_batch = MAX_BATCH;
    caps.attempts = ferrymq_core::Attempts::Exact;
    caps.depth = ferrymq_core::Accuracy::Exact;
    caps.native_dead_letter_after = Some(config.max_deliveries).filter(|n| *n > 0);
    caps.bounded = false;
    caps
}

impl Shared {
    pub(crate) async fn connect(config: RedisConfig, role: Role) -> Result<Arc<Shared>> {
        config.validate()?;
        let endpoint = config.endpoint();
        let (conns, manager) = if config.cluster {
            connect_cluster(&config, &endpoint).await?
        } else {
            connect_single(&config, &endpoint).await?
        };
        let blocking = deadpool::managed::Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.command_timeout))
            .wait_timeout(Some(config.command_timeout))
            .build()
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("connection pool: {e}")))?;

        // An admin describes the queue as it is: it adopts the recorded settings
        // (and the keys of the recorded priority levels) before anything else.
        let config = if role == Role::Admin {
            let meta = Keys::new(&config.queue, 1).meta;
            let reply = tokio::time::timeout(
                config.command_timeout,
                redis::cmd("HGETALL")
                    .arg(&meta)
                    .query_async::<Value>(&mut conns[0].clone()),
            )
            .await;
            match reply {
                Ok(Ok(v)) => crate::settings::adopt(config, &crate::settings::recorded(v)),
                // Refused or timed out: the startup checks below say why.
                _ => config,
            }
        } else {
            config
        };

        let shared = Arc::new(Shared {
            queue: config.queue.as_str().into(),
            keys: Keys::new(&config.queue, config.priority_levels),
            capabilities: Arc::new(capabilities(&config)),
            conns,
            next_conn: std::sync::atomic::AtomicUsize::new(0),
            blocking,
            endpoint,
            config,
        });
        shared.startup_checks().await?;
        if !matches!(role, Role::Admin | Role::Other) {
            shared.record_settings(role).await?;
        }
        Ok(shared)
    }

    /// Record this client's settings of `role` where the queue has none yet, and
    /// refuse the connection when the recorded ones disagree (see
    /// [`settings`](crate::settings)).
    pub(crate) async fn record_settings(&self, role: Role) -> Result<()> {
        let settings = crate::settings::settings_of(&self.config, role);
        let lua = &scripts().settings;
        let mut cmd = lua.call(1);
        cmd.arg(&self.keys.meta).arg("1");
        for (field, value, _) in &settings {
            cmd.arg(*field).arg(value);
        }
        let recorded = crate::settings::recorded(self.eval(lua, &cmd).await?);
        crate::settings::check(&self.config, role, &recorded, &self.keys.meta)
    }

    /// PING (an unauthenticated connection fails here with `Auth`), the eviction
    /// policy warning, key types, and script loading — in one round trip.
    async fn startup_checks(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        pipe.cmd("CONFIG").arg("GET").arg("maxmemory-policy");
        pipe.cmd("INFO").arg("server");
        let typed = self.keys.typed();
        for (key, _) in &typed {
            pipe.cmd("TYPE").arg(*key);
        }
        for lua in scripts().all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(lua.script_code());
        }
        let replies: Vec<Value> = self
            .with_timeout(
                "startup checks",
                pipe.ignore_errors().query_async(&mut self.conn()),
            )
            .await?;
        let mut replies = replies.into_iter();
        if let Some(Value::ServerError(e)) = replies.next() {
            return Err(self.map_err(RedisError::from(e), "PING"));
        }
        match replies.next() {
            Some(Value::ServerError(e)) => tracing::debug!(
                error = %RedisError::from(e),
                "ferrymq-redis: CONFIG GET maxmemory-policy refused; cannot check eviction policy"
            ),
            Some(v) => self.check_eviction(v),
            None => {}
        }
        match replies.next() {
            Some(Value::ServerError(e)) => tracing::debug!(
                error = %RedisError::from(e),
                "ferrymq-redis: INFO server refused; cannot check the server version"
            ),
            Some(v) => {
                let text: String = FromRedisValue::from_redis_value(v).unwrap_or_default();
                check_version(&text, &self.endpoint)?;
            }
            None => {}
        }
        for (key, expected) in typed {
            let actual = match replies.next() {
                Some(Value::SimpleString(s)) => s,
                Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                Some(Value::ServerError(e)) => {
                    return Err(self.map_err(RedisError::from(e), "TYPE"))
                }
                _ => continue,
            };
            if actual != "none" && actual != expected {
                return Err(wrong_type(key, &actual, expected, &self.queue));
            }
        }
        for (lua, reply) in scripts().all().into_iter().zip(replies) {
            if let Value::ServerError(e) = reply {
                return Err(self
                    .map_err(RedisError::from(e), "SCRIPT LOAD")
                    .with_context(lua.name));
            }
        }
        Ok(())
    }

    fn check_eviction(&self, reply: Value) {
        let items: Vec<String> = FromRedisValue::from_redis_value(reply).unwrap_or_default();
        let Some(policy) = items.get(1) else {
            return;
        };
        if policy.starts_with("allkeys-") {
            tracing::warn!(
                policy = %policy,
                queue = %self.queue,
                "ferrymq-redis: maxmemory-policy {policy} lets Redis evict queue keys under memory pressure, \
                 which loses messages; use noeviction (or volatile-* so only expiring dedup keys can go)"
            );
        } else if policy.starts_with("volatile-") {
            tracing::info!(
                policy = %policy,
                "ferrymq-redis: maxmemory-policy {policy} may evict dedup claims (they expire), never messages"
            );
        }
    }

    /// Whether this is a Redis Cluster, where one script's (or pipeline's) keys
    /// must share a hash slot: true for every key of one queue (`{queue}` tag),
    /// not for keys of two queues.
    #[allow(dead_code)] // for scripts that may span queues (flow steps)
    pub(crate) fn is_cluster(&self) -> bool {
        self.config.cluster
    }

    /// The next of the shared multiplexed connections (cheap clone).
    pub(crate) fn conn(&self) -> Conn {
        let i = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }

    pub(crate) async fn with_timeout<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.command_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map_err(e, what)),
            Err(_) => Err(self.timeout(what)),
        }
    }

    /// [`with_timeout`](Self::with_timeout) for a write whose effect a caller must
    /// not assume away (a send): an error after the request may have been written
    /// is `OutcomeUnknown`, see [`map_write_err`](Self::map_write_err).
    pub(crate) async fn with_write_timeout<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.command_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map_write_err(e, what)),
            Err(_) => Err(self.outcome_unknown(what)),
        }
    }

    /// No answer to a write within `command_timeout`. The request may be on the
    /// server — written before the server froze, or queued behind a slow command —
    /// so this is not "nothing enqueued".
    pub(crate) fn outcome_unknown(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::OutcomeUnknown,
            format!(
                "{what}: redis at {} did not answer within {:?} (command_timeout); the request \
                 may have been applied — a retry may duplicate it",
                self.endpoint, self.config.command_timeout
            ),
        )
    }

    /// Map the error of a write. The server's own error reply (it ran the command
    /// and refused, or did not know the script) and a refused connection (nothing
    /// was sent: the connection could not be made) keep their kinds; a response
    /// timeout or a connection that broke after the request was handed to it is
    /// `OutcomeUnknown`. An I/O error while reconnecting is also reported as unknown:
    /// the client cannot tell the two apart, and claiming "nothing enqueued" for a
    /// message that was is the error that loses or duplicates silently.
    pub(crate) fn map_write_err(&self, e: RedisError, what: &str) -> Error {
        let answered = matches!(e.kind(), redis::ErrorKind::Server(_)) || e.code().is_some();
        if !answered
            && !e.is_connection_refusal()
            && (e.is_timeout() || e.is_connection_dropped() || e.is_io_error())
        {
            return Error::new(
                ErrorKind::OutcomeUnknown,
                format!(
                    "{what}: the connection to redis at {} failed after the request was sent \
                     ({e}); it may have been applied — a retry may duplicate it",
                    self.endpoint
                ),
            )
            .with_source(e);
        }
        self.map_err(e, what)
    }

    pub(crate) fn timeout(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "{what}: redis at {} did not answer within {:?} (command_timeout)",
                self.endpoint, self.config.command_timeout
            ),
        )
    }

    /// Run one command.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd, what: &str) -> Result<T> {
        let mut conn = self.conn();
        self.with_timeout(what, cmd.query_async(&mut conn)).await
    }

    /// Run a script by SHA; load it and retry once when the server lost it.
    pub(crate) async fn eval(&self, lua: &Lua, cmd: &Cmd) -> Result<Value> {
        self.eval_as(lua, cmd, false).await
    }

    /// [`eval`](Self::eval) for a send: failures after the request went out are
    /// `OutcomeUnknown`.
    pub(crate) async fn eval_write(&self, lua: &Lua, cmd: &Cmd) -> Result<Value> {
        self.eval_as(lua, cmd, true).await
    }

    async fn eval_as(&self, lua: &Lua, cmd: &Cmd, write: bool) -> Result<Value> {
        let mut conn = self.conn();
        let first = tokio::time::timeout(self.config.command_timeout, async {
            match cmd.query_async::<Value>(&mut conn).await {
                Err(e) if is_noscript(&e) => {
                    lua.script.load_async(&mut conn).await?;
                    cmd.query_async::<Value>(&mut conn).await
                }
                other => other,
            }
        })
        .await;
        match first {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if write => Err(self.map_write_err(e, lua.name)),
            Ok(Err(e)) => Err(self.map_err(e, lua.name)),
            Err(_) if write => Err(self.outcome_unknown(lua.name)),
            Err(_) => Err(self.timeout(lua.name)),
        }
    }

    /// Load every script (after the server answered NOSCRIPT inside a pipeline).
    pub(crate) async fn load_scripts(&self) -> Result<()> {
        if let Conn::Cluster(conn) = self.conn() {
            // A pipeline of keyless commands would go to a random node; one
            // `SCRIPT LOAD` goes to every node.
            let loads = scripts().all().into_iter().map(|lua| {
                let mut conn = conn.clone();
                async move { lua.script.load_async(&mut conn).await.map(|_| ()) }
            });
            return self
                .with_timeout("SCRIPT LOAD", async {
                    futures::future::try_join_all(loads).await.map(|_| ())
                })
                .await;
        }
        let mut pipe = redis::pipe();
        for lua in scripts().all() {
            pipe.cmd("SCRIPT")
                .arg("LOAD")
                .arg(lua.script_code())
                .ignore();
        }
        self.with_timeout("SCRIPT LOAD", pipe.query_async::<()>(&mut self.conn()))
            .await
    }

    /// Create the consumer group on every ready stream (idempotent).
    pub(crate) async fn ensure_group(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        for key in &self.keys.ready {
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(&self.config.group)
                .arg("0")
                .arg("MKSTREAM");
        }
        let replies: Vec<Value> = self
            .with_timeout(
                "XGROUP CREATE",
                pipe.ignore_errors().query_async(&mut self.conn()),
            )
            .await?;
        for reply in replies {
            if let Value::ServerError(e) = reply {
                let e = RedisError::from(e);
                if e.code() != Some("BUSYGROUP") {
                    return Err(self.map_err(e, "XGROUP CREATE"));
                }
            }
        }
        Ok(())
    }

    /// Map a redis error to a typed ferrymq error.
    pub(crate) fn map_err(&self, e: RedisError, what: &str) -> Error {
        map_error(e, what, &self.endpoint, &self.queue)
    }
}

/// Oldest server this backend works with: `SET … NX GET` (the dedup store's
/// claim) and `XAUTOCLAIM`-era stream commands are 7.0. On an older server the
/// dedup claim fails every time, so the Dedup middleware would defer every message
/// forever.
pub(crate) const MIN_VERSION: (u32, u32) = (7, 0);

/// `redis_version` of an `INFO server` reply, as (major, minor, patch).
pub(crate) fn parse_version(info: &str) -> Option<(u32, u32, u32)> {
    let line = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let mut parts = line.trim().split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// `Unsupported` naming the version needed when the server is older than
/// [`MIN_VERSION`]; an INFO reply without a version is let through.
pub(crate) fn check_version(info: &str, endpoint: &str) -> Result<()> {
    match parse_version(info) {
        Some((major, minor, patch)) if (major, minor) < MIN_VERSION => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "redis at {endpoint} is version {major}.{minor}.{patch}; ferrymq-redis needs Redis {}.{} \
                 or newer (SET … NX GET for dedup claims, stream commands of 7.0)",
                MIN_VERSION.0, MIN_VERSION.1
            ),
        )),
        _ => Ok(()),
    }
}

trait WithContext {
    fn with_context(self, ctx: &str) -> Self;
}

impl WithContext for Error {
    fn with_context(self, ctx: &str) -> Self {
        Error::new(self.kind(), format!("{ctx}: {}", self.message()))
    }
}

pub(crate) fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        || e.code() == Some("NOSCRIPT")
}

pub(crate) fn is_nogroup(e: &Error) -> bool {
    e.kind() == ErrorKind::Backend && e.message().contains("NOGROUP")
}

fn wrong_type(key: &str, actual: &str, expected: &str, queue: &str) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!(
            "key {key} of queue {queue:?} holds a {actual}, but ferrymq keeps a {expected} there; \
             another program uses this name (inspect with `redis-cli TYPE {key}`)"
        ),
    )
}

pub(crate) fn map_error(e: RedisError, what: &str, endpoint: &str, queue: &str) -> Error {
    let code = e.code().unwrap_or_default().to_string();
    let text = e.to_string();
    let kind = if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(code.as_str(), "NOAUTH" | "WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("WRONGPASS")
    {
        ErrorKind::Auth
    } else if code == "WRONGTYPE" || text.contains("WRONGTYPE") {
        return Error::new(
            ErrorKind::Backend,
            format!(
                "{what}: a key of queue {queue:?} holds the wrong type of value; another program \
                 uses this name (inspect with `redis-cli --scan --pattern 'ferrymq:{{{queue}}}:*'` and TYPE)"
            ),
        )
        .with_source(e);
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || code == "LOADING"
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
    {
        ErrorKind::Connection
    } else {
        ErrorKind::Backend
    };
    Error::new(kind, format!("{what} on redis at {endpoint}: {text}")).with_source(e)
}

/// One connection of `config`'s own, for a one-off job (deleting a queue).
pub(crate) async fn connect_once(config: &RedisConfig) -> Result<Conn> {
    let endpoint = config.endpoint();
    let conn = if config.cluster {
        let urls = config.cluster_urls()?;
        let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.command_timeout)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(|e| open_error(e, config))?;
        connect_all(
            config,
            &endpoint,
            std::iter::once(client.get_async_connection()),
        )
        .await?
        .into_iter()
        .next()
        .map(Conn::Cluster)
    } else {
        let client = redis::Client::open(config.client_url()?.as_str())
            .map_err(|e| open_error(e, config))?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout));
        connect_all(
            config,
            &endpoint,
            std::iter::once(client.get_multiplexed_async_connection_with_config(&conn_config)),
        )
        .await?
        .into_iter()
        .next()
        .map(Conn::Plain)
    };
    conn.ok_or_else(|| {
        Error::new(
            ErrorKind::Connection,
            format!("redis at {endpoint}: no connection"),
        )
    })
}

/// Run a keyless command (SCAN) on the server that holds `key`: on a cluster, the
/// master of its slot; on one server, that server.
pub(crate) async fn query_on_slot<T: FromRedisValue>(
    conn: &mut Conn,
    cmd: Cmd,
    key: &str,
) -> redis::RedisResult<T> {
    match conn {
        Conn::Cluster(c) => {
            use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                Route::with_key(key, SlotAddr::Master),
            ));
            let v = c.route_command(cmd, route).await?;
            T::from_redis_value(v).map_err(Into::into)
        }
        other => cmd.query_async(other).await,
    }
}

/// The shared connections and the blocking-read manager of one server.
async fn connect_single(
    config: &RedisConfig,
    endpoint: &str,
) -> Result<(Vec<Conn>, BlockingManager)> {
    let url = config.client_url()?;
    let client = redis::Client::open(url.as_str()).map_err(|e| open_error(e, config))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout))
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    // Several multiplexed connections, used in turn: each has its own driver
    // task, so parsing large replies (a receive of 100 entries) spreads over the
    // runtime's threads instead of queueing behind one socket.
    let connecting = (0..config.connections)
        .map(|_| ConnectionManager::new_with_config(client.clone(), manager_config.clone()));
    let conns = connect_all(config, endpoint, connecting).await?;
    let manager = BlockingManager::Single {
        client,
        config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            // Blocking reads wait longer than any response timeout; they are
            // bounded by a timer of their own.
            .set_response_timeout(None),
    };
    Ok((conns.into_iter().map(Conn::Managed).collect(), manager))
}

/// The shared connections and the blocking-read manager of a Redis Cluster: two
/// cluster clients, one with `command_timeout` as its response timeout and one
/// without (blocking reads are bounded by a timer of their own).
async fn connect_cluster(
    config: &RedisConfig,
    endpoint: &str,
) -> Result<(Vec<Conn>, BlockingManager)> {
    let urls = config.cluster_urls()?;
    let builder = || {
        ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(config.connect_timeout)
            // Redirects and reconnects retried a few times, briefly (as the
            // single-server connection manager does).
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500)
    };
    let client = builder()
        .response_timeout(config.command_timeout)
        .build()
        .map_err(|e| open_error(e, config))?;
    let blocking = builder().build().map_err(|e| open_error(e, config))?;
    let connecting = (0..config.connections).map(|_| client.get_async_connection());
    let conns = connect_all(config, endpoint, connecting).await?;
    Ok((
        conns.into_iter().map(Conn::Cluster).collect(),
        BlockingManager::Cluster(blocking),
    ))
}

async fn connect_all<C>(
    config: &RedisConfig,
    endpoint: &str,
    connecting: impl Iterator<Item = impl std::future::Future<Output = redis::RedisResult<C>>>,
) -> Result<Vec<C>> {
    match tokio::time::timeout(
        config.connect_timeout,
        futures::future::try_join_all(connecting),
    )
    .await
    {
        Ok(Ok(conns)) => Ok(conns),
        Ok(Err(e)) => Err(connect_error(e, endpoint, config.connect_timeout)),
        Err(_) => Err(Error::new(
            ErrorKind::Connection,
            format!(
                "redis at {endpoint} could not be reached within {:?} (connect_timeout)",
                config.connect_timeout
            ),
        )),
    }
}

fn connect_error(e: RedisError, endpoint: &str, timeout: Duration) -> Error {
    let err = map_error(e, "connect", endpoint, "");
    match err.kind() {
        ErrorKind::Auth => err,
        ErrorKind::Timeout => Error::new(
            ErrorKind::Connection,
            format!(
                "redis at {endpoint} could not be reached within {timeout:?} (connect_timeout)"
            ),
        ),
        ErrorKind::Backend => err,
        _ => Error::new(
            ErrorKind::Connection,
            format!(
                "redis at {endpoint} could not be reached: {}",
                err.message()
            ),
        ),
    }
}

fn open_error(e: RedisError, config: &RedisConfig) -> Error {
    if config.tls && e.to_string().contains("TLS") {
        return Error::invalid_config(
            "scheme",
            "rediss:// needs the `tls` cargo feature of ferrymq-redis",
        );
    }
    Error::invalid_config("url", format!("{}: {e}", config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(parse_version(info), Some((7, 0, 15)));
        assert_eq!(parse_version("redis_version:6.2.14\n"), Some((6, 2, 14)));
        assert_eq!(parse_version("redis_version:8.0-rc1\n"), Some((8, 0, 0)));
        assert_eq!(
            parse_version("redis_version:255.255.255"),
            Some((255, 255, 255))
        );
        assert_eq!(parse_version("no version here"), None);
        assert_eq!(parse_version("redis_version:\n"), None);
    }

    #[test]
    fn an_old_server_is_unsupported_naming_the_version_needed() {
        let e = check_version("redis_version:6.2.14\r\n", "h:6379/0").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("6.2.14"), "{e}");
        assert!(e.to_string().contains("needs Redis 7.0 or newer"), "{e}");
        assert!(check_version("redis_version:5.0.0", "h").is_err());
        assert!(check_version("redis_version:7.0.0", "h").is_ok());
        assert!(check_version("redis_version:7.2.4", "h").is_ok());
        assert!(check_version("redis_version:10.0.0", "h").is_ok());
        assert!(check_version("", "h").is_ok(), "no version: let through");
    }
}

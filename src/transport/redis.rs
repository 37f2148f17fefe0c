//! The shared Redis connection (single node or Redis Cluster) used by the rate limiter and the
//! ChatKit secret bindings: one multiplexed connection, every call bounded by `redis_timeout`,
//! and a circuit breaker so a dead Redis costs nothing once it is known to be dead.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, Pipeline, RedisFuture, ServerErrorKind, Value};

use crate::config::RateLimitStore;
use crate::obs::metrics::Metrics;

/// Consecutive failures that open the breaker.
const BREAKER_THRESHOLD: u32 = 3;
/// A background task pings Redis this often while the breaker is open, and while no call has
/// succeeded for as long. Requests never wait on a Redis known to be dead, and the breaker (and
/// so `/readyz` under `deny`) follows Redis even with no traffic: `deny` takes the pod out of
/// the Service, so requests could not be the probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Why a store call did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis call timed out")]
    Timeout,
    #[error("redis circuit breaker open")]
    CircuitOpen,
    #[error("redis not connected yet")]
    NotConnected,
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

#[derive(Clone)]
enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

struct Inner {
    conn: Mutex<Option<RedisConn>>,
    timeout: Duration,
    /// Consecutive failed calls; the breaker is open at `BREAKER_THRESHOLD` and above.
    failures: AtomicU32,
    /// Milliseconds since `epoch` of the last successful call (the probe skips a busy Redis).
    last_ok_ms: AtomicU64,
    epoch: Instant,
    metrics: Metrics,
}

/// Handle to Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("healthy", &self.healthy()).finish()
    }
}

impl RedisStore {
    /// Start connecting in the background and return at once: the gate serves (degraded, per
    /// `on_store_error`) while Redis is unreachable, and picks it up when it appears.
    /// Errors only for a malformed URL.
    pub fn start(store: &RateLimitStore, timeout: Duration, metrics: Metrics) -> anyhow::Result<Option<RedisStore>> {
        let connector: Connector = match store {
            RateLimitStore::Local => return Ok(None),
            RateLimitStore::Redis { url } => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| anyhow::anyhow!("rate_limit.redis_url: {:?}", e.kind()))?;
                Connector::Single(Box::new(client))
            }
            RateLimitStore::Cluster { urls } => {
                let client = redis::cluster::ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .connection_timeout(timeout.max(Duration::from_millis(250)))
                    .response_timeout(timeout)
                    .build()
                    .map_err(|e| anyhow::anyhow!("rate_limit.redis_cluster: {:?}", e.kind()))?;
                Connector::Cluster(Box::new(client))
            }
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(None),
                timeout,
                failures: AtomicU32::new(0),
                last_ok_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                metrics,
            }),
        };
        tokio::spawn(connect(connector, Arc::downgrade(&store.inner), timeout));
        tokio::spawn(probe(Arc::downgrade(&store.inner)));
        Ok(Some(store))
    }

    /// False while the breaker is open or no connection was ever made.
    pub fn healthy(&self) -> bool {
        self.inner.connection().is_some() && !self.inner.breaker_open()
    }

    /// A connection to use, or why there is none. An open breaker answers at once: the
    /// background probe, not a request, finds out when Redis is back.
    fn admit(&self) -> Result<RedisConn, StoreError> {
        if self.inner.breaker_open() {
            return Err(StoreError::CircuitOpen);
        }
        self.inner.connection().ok_or(StoreError::NotConnected)
    }

    /// Run one command with the timeout and the breaker.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.admit()?;
        let started = Instant::now();
        let result = tokio::time::timeout(self.inner.timeout, cmd.query_async::<T>(&mut conn)).await;
        self.finish(started, result)
    }

    /// Run a Lua script (EVALSHA, re-loaded on NOSCRIPT by the redis crate) in one round trip.
    pub async fn invoke<T: FromRedisValue>(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut conn = self.admit()?;
        let started = Instant::now();
        let result = tokio::time::timeout(self.inner.timeout, invocation.invoke_async::<T>(&mut conn)).await;
        self.finish(started, result)
    }

    fn finish<T>(
        &self,
        started: Instant,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        self.inner.metrics.redis_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => {
                self.inner.record(true);
                Ok(v)
            }
            Ok(Err(e)) => {
                if refused_call(&e) {
                    // Redis answered: it is up, so this does not count towards the breaker.
                    self.inner.metrics.redis_errors.inc();
                    self.inner.record(true);
                } else {
                    self.inner.record(false);
                }
                Err(StoreError::Redis(e))
            }
            Err(_) => {
                self.inner.record(false);
                Err(StoreError::Timeout)
            }
        }
    }
}

/// True when Redis answered but refused this one call (a script error, a key of the wrong type):
/// a fault of the call, not an outage of Redis.
fn refused_call(e: &redis::RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::ResponseError
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NoPerm
            | ServerErrorKind::ExecAbort
            | ServerErrorKind::NoScript,
        )
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::Parse => true,
        ErrorKind::Extension => e.code() == Some("WRONGTYPE"),
        _ => false,
    }
}

impl Inner {
    fn connection(&self) -> Option<RedisConn> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }

    fn breaker_open(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= BREAKER_THRESHOLD
    }

    /// Count a call's outcome; logs only when the breaker changes state.
    fn record(&self, ok: bool) {
        if ok {
            self.last_ok_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            if self.failures.swap(0, Ordering::Relaxed) >= BREAKER_THRESHOLD {
                tracing::info!("redis reachable again; circuit breaker closed");
            }
        } else {
            self.metrics.redis_errors.inc();
            if self.failures.fetch_add(1, Ordering::Relaxed) + 1 == BREAKER_THRESHOLD {
                tracing::error!(
                    failures = BREAKER_THRESHOLD,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "redis failing; circuit breaker open, calls fail fast until a probe succeeds"
                );
            }
        }
    }
}

/// Connect in the background, retrying with backoff until it works (then the connection
/// reconnects by itself). The first failure is a warning; the retries are debug noise.
async fn connect(connector: Connector, weak: Weak<Inner>, timeout: Duration) {
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match connector.connect(timeout).await {
            Ok(conn) => {
                if let Some(inner) = weak.upgrade() {
                    if let Ok(mut slot) = inner.conn.lock() {
                        *slot = Some(conn);
                    }
                    tracing::info!("connected to redis");
                }
                return;
            }
            Err(e) => {
                if weak.strong_count() == 0 {
                    return;
                }
                if warned {
                    tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "redis connect failed");
                } else {
                    tracing::warn!(error = %e, "redis connect failed; retrying in the background");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// PING Redis every `PROBE_INTERVAL` while the breaker is open (the first answer closes it) or
/// no call succeeded within the interval (so a Redis that dies while idle is noticed).
async fn probe(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let idle_ms =
            (inner.epoch.elapsed().as_millis() as u64).saturating_sub(inner.last_ok_ms.load(Ordering::Relaxed));
        if !inner.breaker_open() && idle_ms < PROBE_INTERVAL.as_millis() as u64 {
            continue;
        }
        let Some(mut conn) = inner.connection() else { continue };
        let ping = redis::cmd("PING");
        let result = tokio::time::timeout(inner.timeout, ping.query_async::<Value>(&mut conn)).await;
        inner.record(matches!(result, Ok(Ok(_))));
    }
}

enum Connector {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Connector {
    async fn connect(&self, timeout: Duration) -> redis::RedisResult<RedisConn> {
        match self {
            Connector::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Ok(RedisConn::Single(client.get_connection_manager_with_config(config).await?))
            }
            Connector::Cluster(client) => Ok(RedisConn::Cluster(client.get_async_connection().await?)),
        }
    }
}

//! The shared Redis connection (single node or Redis Cluster) used by the rate limiter and the
//! ChatKit secret bindings: one multiplexed connection, every call bounded by `redis_timeout`,
//! and a circuit breaker so a dead Redis costs nothing once it is known to be dead.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};

use crate::config::RateLimitStore;
use crate::metrics::Metrics;

/// Consecutive failures that open the breaker.
const BREAKER_THRESHOLD: u32 = 3;
/// How long an open breaker refuses calls before letting one probe through.
const BREAKER_OPEN: Duration = Duration::from_secs(1);

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
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
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
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

struct Inner {
    conn: Mutex<Option<Conn>>,
    timeout: Duration,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open (0 = closed).
    open_until_ms: AtomicU64,
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
                open_until_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                metrics,
            }),
        };
        let weak = Arc::downgrade(&store.inner);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
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
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "redis connect failed");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Some(store))
    }

    /// False while the breaker is open or no connection was ever made.
    pub fn healthy(&self) -> bool {
        let connected = self.inner.conn.lock().map(|c| c.is_some()).unwrap_or(false);
        connected && self.inner.failures.load(Ordering::Relaxed) < BREAKER_THRESHOLD
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    fn admit(&self) -> Result<Conn, StoreError> {
        let open_until = self.inner.open_until_ms.load(Ordering::Relaxed);
        if open_until != 0 {
            let now = self.now_ms();
            if now < open_until {
                return Err(StoreError::CircuitOpen);
            }
            // Half-open: let this one call probe, hold the rest back for another period.
            if self
                .inner
                .open_until_ms
                .compare_exchange(
                    open_until,
                    now + BREAKER_OPEN.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                return Err(StoreError::CircuitOpen);
            }
        }
        let conn = self.inner.conn.lock().ok().and_then(|c| c.clone());
        conn.ok_or(StoreError::NotConnected)
    }

    fn record(&self, ok: bool) {
        if ok {
            if self.inner.failures.swap(0, Ordering::Relaxed) >= BREAKER_THRESHOLD {
                tracing::info!("redis reachable again; circuit breaker closed");
            }
            self.inner.open_until_ms.store(0, Ordering::Relaxed);
        } else {
            self.inner.metrics.redis_errors.inc();
            let n = self.inner.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= BREAKER_THRESHOLD {
                if n == BREAKER_THRESHOLD {
                    tracing::error!(failures = n, "redis failing; circuit breaker open");
                }
                self.inner.open_until_ms.store(self.now_ms() + BREAKER_OPEN.as_millis() as u64, Ordering::Relaxed);
            }
        }
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
                self.record(true);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.record(false);
                Err(StoreError::Redis(e))
            }
            Err(_) => {
                self.record(false);
                Err(StoreError::Timeout)
            }
        }
    }
}

enum Connector {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Connector {
    async fn connect(&self, timeout: Duration) -> redis::RedisResult<Conn> {
        match self {
            Connector::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Ok(Conn::Single(client.get_connection_manager_with_config(config).await?))
            }
            Connector::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }
}

//! Keep-alive HTTP/1.1 connections to the app: bodiless idempotent requests without an upgrade
//! (most of them) go through [`crate::http::h1`]'s lean exchange, the others through hyper's
//! connection API; each kind has its own idle connections.
//!
//! A request takes the most recently used idle connection of its worker (see
//! [`crate::transport::workers::Workers`]) that is ready, or opens one: a connection is driven by the worker
//! that opened it and used only by that worker's requests. The
//! connection comes back when its answer's body has been read to the end (the body carries it,
//! see [`crate::http::body::GateBody::from_app`]): no task per request, no channel hop, no hashing.
//! Idle connections older than the idle timeout are never reused and are closed by a reaper.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::header::UPGRADE;
use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::body::{AppBody, GateBody, IdleShelf, Lent};
use crate::http::h1::{self, Home, LeanShelf};
use crate::transport::https_client::Replay;

/// Why a request did not get an answer from the app.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, DNS, `connect_timeout`).
    #[error("connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    /// The exchange failed on an open connection.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The lean exchange failed on an open connection.
    #[error(transparent)]
    Lean(#[from] h1::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }

    /// The peer closed the connection before any answer arrived (an idle keep-alive connection
    /// closed by the app just as it was reused).
    fn is_stale(&self) -> bool {
        match self {
            SendError::Connect { .. } => false,
            SendError::Http(e) => crate::transport::https_client::closed_before_answer(e),
            SendError::Lean(e) => e.unanswered(),
        }
    }
}

/// How the pool connects and keeps connections.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// `host:port` of the app (resolved on each new connection).
    pub target: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle connections kept in all (shared out among the workers).
    pub max_idle: usize,
    /// Workers serving requests; each has its own idle connections.
    pub workers: usize,
}

/// The app's connection pool. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct AppPool {
    inner: Arc<Inner>,
}

struct Inner {
    opts: PoolOptions,
    /// By worker, most recently returned last.
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// The lean exchange's, by worker, most recently returned last.
    lean: Box<[Mutex<Vec<LeanIdle>>]>,
    /// Idle connections kept per worker.
    max_idle: usize,
    idle_ms: AtomicU64,
    reaper: AtomicBool,
}

struct Idle {
    tx: http1::SendRequest<GateBody>,
    since: Instant,
}

struct LeanIdle {
    conn: Box<h1::Conn>,
    since: Instant,
}

/// The request's head, taken out of `parts` for a call that needs it owned; an empty head (no
/// allocation) is left behind.
pub(crate) fn take_parts(parts: &mut http::request::Parts) -> http::request::Parts {
    std::mem::replace(parts, Request::new(()).into_parts().0)
}

impl IdleShelf for Inner {
    fn put_idle(&self, worker: usize, tx: http1::SendRequest<GateBody>) {
        self.put(worker, tx);
    }
}

impl LeanShelf for Inner {
    fn put_lean(&self, worker: usize, conn: Box<h1::Conn>) {
        let mut idle = self.lean[worker].lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(LeanIdle { conn, since: Instant::now() });
        }
    }
}

impl AppPool {
    pub fn new(opts: PoolOptions) -> AppPool {
        let idle_ms = opts.idle_timeout.as_millis() as u64;
        let workers = opts.workers.max(1);
        let max_idle = opts.max_idle.div_ceil(workers);
        AppPool {
            inner: Arc::new(Inner {
                idle: (0..workers).map(|_| Mutex::new(Vec::with_capacity(max_idle.min(64)))).collect(),
                lean: (0..workers).map(|_| Mutex::new(Vec::with_capacity(max_idle.min(64)))).collect(),
                max_idle,
                idle_ms: AtomicU64::new(idle_ms),
                reaper: AtomicBool::new(false),
                opts,
            }),
        }
    }

    /// The idle timeout now.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.idle_ms.load(Ordering::Relaxed))
    }

    /// Expire idle connections after `idle` from now on (connections idle longer are dropped).
    pub fn set_idle_timeout(&self, idle: Duration) {
        self.inner.idle_ms.store(idle.as_millis() as u64, Ordering::Relaxed);
    }

    /// Send `req` (`now`: the time, for the idle connections' age). On a reused connection that
    /// turns out closed before answering, the request goes out once more on a new connection:
    /// itself when it was never written, else a copy of it when it is `replayable` (bodiless and
    /// idempotent; the copy is made only on a reused connection). `retried` is called when that
    /// happens. A `replayable` request without an upgrade takes the lean exchange.
    pub async fn send(
        &self,
        parts: &mut http::request::Parts,
        body: GateBody,
        replayable: bool,
        now: Instant,
        retried: impl FnOnce(&SendError),
    ) -> Result<Response<AppBody>, SendError> {
        if replayable && !parts.headers.contains_key(UPGRADE) {
            // The body has ended (replayable): nothing of it to send.
            drop(body);
            return self.send_lean(parts, now, retried).await;
        }
        // Boxed: the hyper path (bodies, upgrades) has the larger state, which every bodiless
        // request's would otherwise carry room for.
        Box::pin(self.send_hyper(take_parts(parts), body, replayable, now, retried)).await
    }

    /// [`AppPool::send`] through [`h1::exchange`]: the request has no body, so it is sent again
    /// as it is (its head encoded anew) when a reused connection closed before answering.
    async fn send_lean(
        &self,
        parts: &http::request::Parts,
        now: Instant,
        retried: impl FnOnce(&SendError),
    ) -> Result<Response<AppBody>, SendError> {
        let worker = self.inner.slot();
        let (conn, reused) = match self.inner.take_lean(worker, now) {
            Some(conn) => (conn, true),
            None => (h1::Conn::new(Box::pin(self.open()).await?), false),
        };
        let error = match h1::exchange(conn, parts, self.home(worker)).await {
            Ok(resp) => return Ok(resp.map(|body| AppBody::Lean { body })),
            Err(e) => SendError::Lean(e),
        };
        if !(reused && error.is_stale()) {
            return Err(error);
        }
        retried(&error);
        // Boxed: the retry is rare, and its state would otherwise widen every request's.
        Box::pin(async {
            let conn = h1::Conn::new(self.open().await?);
            let resp = h1::exchange(conn, parts, self.home(worker)).await?;
            Ok(resp.map(|body| AppBody::Lean { body }))
        })
        .await
    }

    fn home(&self, worker: usize) -> Home {
        Home::new(Arc::downgrade(&self.inner) as Weak<dyn LeanShelf>, worker)
    }

    async fn send_hyper(
        &self,
        parts: http::request::Parts,
        body: GateBody,
        replayable: bool,
        now: Instant,
        retried: impl FnOnce(&SendError),
    ) -> Result<Response<AppBody>, SendError> {
        let req = Request::from_parts(parts, body);
        // Connecting is boxed: its future is large and rarely needed, and every request's
        // state would otherwise carry room for it.
        let worker = self.inner.slot();
        // No idle connection of its own: an idle lean one is taken over before a new one is
        // opened (the way back is not possible: hyper keeps its connection's socket).
        let (mut tx, reused) = match self.inner.take(worker, now) {
            Some(tx) => (tx, true),
            None => match self.inner.take_lean(worker, now) {
                Some(conn) => (Box::pin(self.drive((*conn).into_io())).await?, true),
                None => (Box::pin(self.connect()).await?, false),
            },
        };
        // Only a reused connection can turn out closed under the request.
        let replay = (reused && replayable).then(|| Replay::of(&req));
        // Boxed: the retry is rare, and its state would otherwise widen every request's.
        let retry = Box::pin(match tx.try_send_request(req).await {
            Ok(resp) => return Ok(self.answer(resp, tx, worker)),
            Err(e) => {
                drop(tx);
                self.retry(e, reused, replay, retried, worker)
            }
        });
        retry.await
    }

    /// A request the connection did not answer: sent once more on a new connection when that
    /// is safe (see [`AppPool::send`]), else the error.
    async fn retry(
        &self,
        mut e: hyper::client::conn::TrySendError<Request<GateBody>>,
        reused: bool,
        replay: Option<Replay>,
        retried: impl FnOnce(&SendError),
        worker: usize,
    ) -> Result<Response<AppBody>, SendError> {
        let unsent = e.take_message();
        let error = SendError::Http(e.into_error());
        let again = match (reused && error.is_stale(), unsent, replay) {
            (true, Some(req), _) => req,
            (true, None, Some(replay)) => replay.into_request(),
            _ => return Err(error),
        };
        retried(&error);
        let mut tx = self.connect().await?;
        let resp = tx.send_request(again).await?;
        Ok(self.answer(resp, tx, worker))
    }

    fn answer(
        &self,
        resp: Response<hyper::body::Incoming>,
        tx: http1::SendRequest<GateBody>,
        worker: usize,
    ) -> Response<AppBody> {
        let lent = Lent::new(Arc::downgrade(&self.inner) as Weak<dyn IdleShelf>, tx, worker);
        resp.map(|body| AppBody::hyper(body, lent))
    }

    /// A new TCP connection to the app (`connect_timeout`, no Nagle, TCP keep-alive probes).
    async fn open(&self) -> Result<TcpStream, SendError> {
        let opts = &self.inner.opts;
        let failed = |reason: String| SendError::Connect { target: opts.target.clone(), reason };
        let stream = tokio::time::timeout(opts.connect_timeout, connect_any(&opts.target))
            .await
            .map_err(|_| failed(format!("timed out after {} ms", opts.connect_timeout.as_millis())))?
            .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)));
        Inner::start_reaper(&self.inner);
        Ok(stream)
    }

    async fn connect(&self) -> Result<http1::SendRequest<GateBody>, SendError> {
        self.drive(self.open().await?).await
    }

    /// Hyper's client connection on `stream`, driven by a task of its own.
    async fn drive(&self, stream: TcpStream) -> Result<http1::SendRequest<GateBody>, SendError> {
        let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "app connection ended with an error");
            }
        });
        Ok(tx)
    }
}

impl Inner {
    /// The current worker's idle connections.
    fn slot(&self) -> usize {
        crate::transport::workers::worker_index() % self.idle.len()
    }

    /// The most recently used ready connection of `worker`; closed and expired ones are dropped
    /// on the way.
    fn take(&self, worker: usize, now: Instant) -> Option<http1::SendRequest<GateBody>> {
        let max_age = Duration::from_millis(self.idle_ms.load(Ordering::Relaxed));
        let mut idle = self.idle[worker].lock().unwrap_or_else(PoisonError::into_inner);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.tx.is_closed() || now.saturating_duration_since(c.since) >= max_age {
                idle.swap_remove(i);
            } else if c.tx.is_ready() {
                return Some(idle.swap_remove(i).tx);
            }
            // Else still finishing its last exchange: left for a later request.
        }
        None
    }

    /// The most recently used clean lean connection of `worker`; expired ones and ones that
    /// the app closed (or wrote to) while idle are dropped on the way.
    fn take_lean(&self, worker: usize, now: Instant) -> Option<Box<h1::Conn>> {
        let max_age = Duration::from_millis(self.idle_ms.load(Ordering::Relaxed));
        let mut idle = self.lean[worker].lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(mut c) = idle.pop() {
            if now.saturating_duration_since(c.since) < max_age && c.conn.is_clean() {
                return Some(c.conn);
            }
        }
        None
    }

    fn put(&self, worker: usize, tx: http1::SendRequest<GateBody>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle[worker].lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(Idle { tx, since: Instant::now() });
        }
    }

    /// One task per pool closes connections idle past the timeout (they would be dropped at
    /// the next checkout anyway; the reaper frees them, and the app's side, sooner).
    fn start_reaper(this: &Arc<Inner>) {
        if this.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(this);
        tokio::spawn(async move {
            loop {
                let period = match weak.upgrade() {
                    Some(pool) => Duration::from_millis(pool.idle_ms.load(Ordering::Relaxed) / 2),
                    None => return,
                };
                tokio::time::sleep(period.clamp(Duration::from_millis(50), Duration::from_secs(5))).await;
                let Some(pool) = weak.upgrade() else { return };
                let max_age = Duration::from_millis(pool.idle_ms.load(Ordering::Relaxed));
                let now = Instant::now();
                for idle in &pool.idle {
                    let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
                    idle.retain(|c| !c.tx.is_closed() && now.saturating_duration_since(c.since) < max_age);
                }
                for idle in &pool.lean {
                    let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
                    idle.retain_mut(|c| now.saturating_duration_since(c.since) < max_age && c.conn.is_clean());
                }
            }
        });
    }
}

/// Connect to the first address of `target` that answers.
async fn connect_any(target: &str) -> std::io::Result<TcpStream> {
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return TcpStream::connect(addr).await;
    }
    let mut last = None;
    for addr in tokio::net::lookup_host(target).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
}

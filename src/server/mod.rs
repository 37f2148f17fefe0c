//! Listeners and connections: accept loops with a connection limit, TLS handshakes with a
//! timeout, HTTP/1.1 + HTTP/2 serving with header and idle timeouts, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context as _;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::chatkit::ChatKit;
use crate::config::Config;
use crate::obs::audit::{Audit, AuditSink};
use crate::obs::metrics::Metrics;
use crate::pipeline::{ConnActivity, Gateway};
use crate::ratelimit::RateLimiter;
use crate::request::routes::RouteTable;
use crate::server::admin::{Admin, Readiness};
use crate::transport::client_io::ClientIo;
use crate::transport::redis::RedisStore;
use crate::transport::tls;

pub mod admin;

/// The sockets the gate serves, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub https: TcpListener,
    pub plain: Option<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind the configured addresses.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let https = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("server.listen: cannot bind {}", config.server.listen))?;
        let plain = match config.server.redirect_listen {
            Some(addr) => Some(
                TcpListener::bind(addr).await.with_context(|| format!("server.redirect_listen: cannot bind {addr}"))?,
            ),
            None => None,
        };
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin.listen: cannot bind {}", config.admin.listen))?;
        Ok(Listeners { https, plain, admin })
    }
}

thread_local! {
    /// This thread's worker number: 0 for the thread `run` is called on, 1… for [`Workers`].
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker the current thread is (0 outside [`Workers`]): per-worker state, such as the
/// app's idle connections, is looked up by it.
pub fn worker_index() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// The further workers of `server.workers` > 1. Each is a thread with its own single-threaded
/// runtime that accepts on the gate's listeners and runs the connections it accepted to their
/// end, with the app connections they use (nginx's worker processes, as threads): no
/// work-stealing scheduler and no cross-thread wake-ups on the proxy path. The thread `run` is
/// called on is worker 0 and also runs the admin listener and the background tasks.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// No further workers: everything on the caller's runtime.
    pub fn none() -> Workers {
        Workers { handles: Vec::new(), stop: CancellationToken::new(), threads: Vec::new() }
    }

    /// Start `n` worker threads (numbered 1 to `n`), each with its runtime running.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Workers::none();
        for i in 1..=n {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new().name(format!("gate-worker-{i}")).spawn(move || {
                WORKER.with(|w| w.set(i));
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                // Runs the tasks spawned on this runtime until the gate has finished.
                rt.block_on(stop.cancelled());
            })?;
            workers.threads.push(thread);
            let handle = rx.recv().map_err(|_| std::io::Error::other("worker thread exited at start"))??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Workers in all, the caller's thread included.
    pub fn count(&self) -> usize {
        self.handles.len() + 1
    }
}

impl Drop for Workers {
    /// Stop the worker threads; tasks still on them (connections past `shutdown_grace`) are
    /// dropped with their runtimes, as those of the caller's runtime are when it ends.
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A further accept loop on `listener`'s socket, run by the worker behind `handle`.
fn accept_on(
    handle: &tokio::runtime::Handle,
    listener: &TcpListener,
    tls: Option<watch::Receiver<Arc<ServerConfig>>>,
    ctx: Arc<ConnCtx>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let socket: std::net::TcpListener = socket2::SockRef::from(listener).try_clone().context("listener")?.into();
    socket.set_nonblocking(true).context("listener")?;
    Ok(handle.spawn(async move {
        // Registered with this worker's reactor: the socket is the same, its readiness is seen
        // by every worker, and each accepted connection is served by the worker that took it.
        match TcpListener::from_std(socket) {
            Ok(listener) => accept_loop(listener, tls, ctx, limit, stop, tracker).await,
            Err(e) => tracing::error!(error = %e, "a worker cannot accept on the listener"),
        }
    }))
}

/// Run the gate until `shutdown` resolves, then drain for up to `server.shutdown_grace`.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_workers(config, listeners, shutdown, &Workers::none()).await
}

/// [`run`], with the gate's listeners also served by `workers`.
pub async fn run_with_workers(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    workers: &Workers,
) -> anyhow::Result<()> {
    let mut config = config;
    // The workers actually serving (per-worker state, such as the app's idle connections, is
    // sized by it).
    config.server.workers = Some(workers.count());
    tls::install_default_provider();
    let metrics = Metrics::new().context("metrics registry")?;
    let tls = tls::start(&config.tls, &metrics).context("tls")?;
    let sink = match &config.log.audit_file {
        Some(path) => AuditSink::File(path.clone()),
        None => AuditSink::Stdout,
    };
    let audit = Audit::start(sink, metrics.clone()).context("log.audit_file")?;
    let routes = RouteTable::new(&config);
    let store = match &config.rate_limit {
        Some(rl) => RedisStore::start(&rl.store, rl.redis_timeout, metrics.clone())?,
        None => None,
    };
    let limiter = match &config.rate_limit {
        Some(rl) => Some(Arc::new(
            RateLimiter::new(rl, routes.all(), store.clone(), metrics.clone(), audit.clone()).context("rate_limit")?,
        )),
        None => None,
    };
    let auth = match &config.auth {
        Some(a) => Some(Authenticator::new(a, metrics.clone(), audit.clone(), limiter.clone()).context("auth")?),
        None => None,
    };
    let chatkit = match &config.chatkit {
        Some(ck) => {
            let chatkit = ChatKit::new(ck, store.clone(), metrics.clone(), audit.clone()).context("chatkit")?;
            Some(match config.server.max_body_bytes {
                Some(limit) => chatkit.with_body_limit(usize::try_from(limit).unwrap_or(usize::MAX)),
                None => chatkit,
            })
        }
        None => None,
    };
    let gateway = Arc::new(Gateway::new(&config, metrics.clone(), auth, limiter, chatkit, routes, audit.clone())?);
    let readiness = Arc::new(Readiness::default());
    let admin = Arc::new(Admin { readiness: readiness.clone(), metrics: metrics.clone(), gateway: gateway.clone() });

    let http = Arc::new(Protocols::new(&config));
    let stop_accepting = CancellationToken::new();
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(config.server.max_connections));

    let addrs = (listeners.https.local_addr()?, listeners.plain.as_ref().map(|l| l.local_addr()).transpose()?);
    let ctx = Arc::new(ConnCtx {
        max_connections: config.server.max_connections,
        gateway: gateway.clone(),
        http,
        drain: drain.clone(),
        idle_timeout: config.server.idle_timeout,
        header_timeout: config.server.header_timeout,
        handshake_timeout: config.tls.handshake_timeout,
        open_by_worker: (0..workers.count()).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect(),
    });
    let mut accept_loops = Vec::new();
    for handle in &workers.handles {
        for (listener, tls) in std::iter::once((&listeners.https, Some(tls.clone())))
            .chain(listeners.plain.as_ref().map(|plain| (plain, None)))
        {
            let (ctx, limit, stop, tracker) = (ctx.clone(), limit.clone(), stop_accepting.clone(), connections.clone());
            accept_loops.push(accept_on(handle, listener, tls, ctx, limit, stop, tracker)?);
        }
    }
    accept_loops.push(tokio::spawn(accept_loop(
        listeners.https,
        Some(tls),
        ctx.clone(),
        limit.clone(),
        stop_accepting.clone(),
        connections.clone(),
    )));
    if let Some(plain) = listeners.plain {
        accept_loops.push(tokio::spawn(accept_loop(
            plain,
            None,
            ctx.clone(),
            limit.clone(),
            stop_accepting.clone(),
            connections.clone(),
        )));
    }
    let admin_addr = listeners.admin.local_addr()?;
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin_loop(
        listeners.admin,
        admin.clone(),
        admin_stop.clone(),
        config.server.header_timeout,
        config.admin.max_connections,
    ));
    readiness.started.store(true, Ordering::Release);
    tracing::info!(
        https = %addrs.0,
        redirect = ?addrs.1,
        admin = %admin_addr,
        workers = workers.count(),
        version = env!("CARGO_PKG_VERSION"),
        "chatkit-gate listening"
    );

    shutdown.await;
    let grace = config.server.shutdown_grace;
    let delay = config.server.shutdown_delay;
    // 1. Not ready at once, but keep serving (and accepting) while load balancers and
    //    Kubernetes endpoints stop routing here; HTTP/1 answers carry `Connection: close` so
    //    keep-alive clients move to another replica.
    readiness.draining.store(true, Ordering::Release);
    gateway.begin_draining();
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        grace_ms = grace.as_millis() as u64,
        "shutdown requested: readyz 503, serving for shutdown_delay before draining"
    );
    tokio::time::sleep(delay).await;
    // 2. Stop accepting, tell open connections to finish (GOAWAY / close when idle), drain.
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutdown_delay over: listeners closed, draining");
    stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    let drain_deadline = tokio::time::Instant::now() + grace;
    // A connection accepted just before the listener closed has its request on the wire: let it
    // arrive (and be answered with `Connection: close`) before idle connections are closed.
    if !connections.is_empty() {
        tokio::time::sleep(DRAIN_SETTLE.min(grace)).await;
    }
    drain.cancel();
    connections.close();
    gateway.tunnels.close();
    let drained = tokio::time::timeout_at(drain_deadline, async {
        connections.wait().await;
        gateway.tunnels.wait().await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!(
            open_connections = connections.len(),
            open_tunnels = gateway.tunnels.len(),
            "shutdown_grace elapsed with connections still open; closing them"
        ),
    }
    // Old ChatKit sessions being cancelled in the background, then the last audit lines.
    gateway.drain_background(grace).await;
    audit.flush().await;
    admin_stop.cancel();
    let _ = admin_task.await;
    Ok(())
}

/// The HTTP servers a connection can get: on TLS, the one ALPN chose (no sniffing of the first
/// bytes); on the plain listener, HTTP/1.1 or HTTP/2 with prior knowledge, told by the preface.
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// The same settings on hyper's HTTP/1.1 builder and on `auto`'s.
macro_rules! h1_settings {
    ($b:expr, $config:expr) => {
        // hyper's header timer also runs while a keep-alive connection waits for its next
        // request, which would close idle connections at header_timeout: `drive`
        // times heads itself.
        $b.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size($config.server.max_header_bytes.max(8192))
            .keep_alive(true)
    };
}

/// The same settings on hyper's HTTP/2 builder and on `auto`'s.
macro_rules! h2_settings {
    ($b:expr, $config:expr) => {
        // h2 refuses a header block over this size with a GOAWAY (the client never sees an
        // answer), so it is set above max_header_bytes and the gate answers 431 itself.
        // Windows and send buffers are bounded: a stream buffers at most H2_STREAM_WINDOW.
        $b.timer(TokioTimer::new())
            .max_header_list_size(h2_header_list_limit($config.server.max_header_bytes))
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

const H2_MAX_STREAMS: u32 = 250;
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_SEND_BUFFER: usize = 128 * 1024;

impl Protocols {
    fn new(config: &Config) -> Protocols {
        let mut h1 = http1::Builder::new();
        h1_settings!(h1, config);
        h1.writev(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2_settings!(h2, config);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        h1_settings!(auto.http1(), config);
        h2_settings!(auto.http2(), config);
        Protocols { h1, h2, auto }
    }
}

/// A connection being served: run it, or ask it to finish (HTTP/2 GOAWAY, HTTP/1.1 close
/// after the current exchange).
trait Serving: Future<Output = Result<(), Self::Error>> {
    type Error: Into<Box<dyn std::error::Error + Send + Sync>>;
    fn shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Serving for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Serving for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    type Error = hyper::Error;
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Serving for auto::UpgradeableConnection<'_, I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// After the listeners close, open connections keep serving this long before idle ones are
/// closed and the others told to finish (HTTP/2 GOAWAY): counted within `shutdown_grace`.
const DRAIN_SETTLE: Duration = Duration::from_millis(500);

/// The saturation warning is repeated at most this often per listener.
const SATURATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The header-list size hyper's HTTP/2 side accepts: well above `max_header_bytes`, which the
/// gate enforces itself with a 431.
fn h2_header_list_limit(max_header_bytes: usize) -> u32 {
    u32::try_from(max_header_bytes.saturating_mul(8).max(256 * 1024)).unwrap_or(u32::MAX)
}

struct ConnCtx {
    max_connections: usize,
    gateway: Arc<Gateway>,
    http: Arc<Protocols>,
    drain: CancellationToken,
    idle_timeout: Duration,
    header_timeout: Duration,
    handshake_timeout: Duration,
    /// Connections open on each worker, for [`ConnCtx::defer_accept`].
    open_by_worker: Box<[std::sync::atomic::AtomicUsize]>,
}

/// How long a worker that holds more connections than another waits before it accepts anyway
/// (a worker stuck elsewhere must not keep new connections waiting in the queue).
const ACCEPT_DEFER: Duration = Duration::from_millis(1);

impl ConnCtx {
    /// Should `worker` leave the next connection to a worker holding fewer (by more than an
    /// eighth of its own)? Every worker is woken for a new connection on the shared listener, and
    /// the first one awake would otherwise take them all: a client opening 64 connections at
    /// once, or an ingress keeping two, would get one worker.
    fn defer_accept(&self, worker: usize) -> bool {
        let open = &self.open_by_worker;
        if open.len() < 2 {
            return false;
        }
        let mine = open[worker].load(Ordering::Relaxed);
        open.iter().any(|o| mine.saturating_sub(o.load(Ordering::Relaxed)) > mine / 8)
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<ServerConfig>>>,
    ctx: Arc<ConnCtx>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut last_warned: Option<std::time::Instant> = None;
    let worker = worker_index() % ctx.open_by_worker.len();
    loop {
        if ctx.defer_accept(worker) {
            tokio::select! {
                () = tokio::time::sleep(ACCEPT_DEFER) => {}
                () = stop.cancelled() => return,
            }
        }
        // Past max_connections we stop accepting: new clients wait in the kernel's queue.
        // That is counted, shown by a gauge and logged (at most every 10 s), never silent.
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let metrics = &ctx.gateway.metrics;
                metrics.connection_limit_waits.inc();
                metrics.accept_paused.inc();
                if last_warned.is_none_or(|t| t.elapsed() >= SATURATION_LOG_INTERVAL) {
                    last_warned = Some(std::time::Instant::now());
                    tracing::warn!(
                        max_connections = ctx.max_connections,
                        "server.max_connections reached: new connections wait in the kernel queue \
                         (logged at most every 10 s; see chatkit_gate_connection_limit_waits_total)"
                    );
                }
                let p = tokio::select! {
                    p = limit.clone().acquire_owned() => p.ok(),
                    () = stop.cancelled() => None,
                };
                metrics.accept_paused.dec();
                match p {
                    Some(p) => p,
                    None => return,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.as_ref().map(|rx| rx.borrow().clone());
        ctx.open_by_worker[worker].fetch_add(1, Ordering::Relaxed);
        tracker.spawn(async move {
            ctx.gateway.metrics.connections_open.inc();
            serve_connection(stream, peer, tls, &ctx, permit).await;
            ctx.gateway.metrics.connections_open.dec();
            ctx.open_by_worker[worker].fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One client connection, from accept to close. This frame is the connection's task for its
/// whole life, so large values are not passed down by value (an async fn keeps its arguments,
/// and a moved-from local keeps its room until its scope ends): hyper's connection is pinned in
/// place and the TLS stream is boxed. The task was 15 KiB; an HTTP/1.1 connection's is now
/// 1.3 KiB plus its 1.2 KiB TLS stream.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
    ctx: &ConnCtx,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (gateway, http) = (&ctx.gateway, &ctx.http);
    let activity = Arc::new(ConnActivity::new(Some(permit), gateway.clock.now_ms()));
    let service = {
        let (gateway, activity, https) = (gateway.clone(), activity.clone(), tls.is_some());
        // The request's future is boxed: hyper keeps a slot for it per HTTP/1.1 connection,
        // which would otherwise hold the whole pipeline's state (about 3.7 KiB) for as long as the
        // connection is open, idle or not.
        service_fn(move |req| Box::pin(gateway.clone().serve(req, peer, https, activity.clone())))
    };
    let Some(config) = tls else {
        // The plain listener: HTTP/1.1 or HTTP/2 with prior knowledge, told by the preface.
        let io = TokioIo::new(ClientIo::new(stream, activity.clone(), gateway.clock.clone()));
        let mut conn = Box::pin(http.auto.serve_connection_with_upgrades(io, service));
        return drive(conn.as_mut(), peer, ctx, &activity).await;
    };
    let Some(tls) = handshake(stream, peer, config, ctx).await else { return };
    // The header timeout of the first request runs from the end of the handshake.
    activity.first_request_clock(gateway.clock.now_ms());
    // The server ALPN chose: no sniffing of the first bytes.
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(ClientIo::new(tls, activity.clone(), gateway.clock.clone()));
    if h2 {
        // Boxed, so that the task of every connection is only as large as HTTP/1.1 needs.
        let mut conn = Box::pin(http.h2.serve_connection(io, service));
        drive(conn.as_mut(), peer, ctx, &activity).await;
    } else {
        let conn = std::pin::pin!(http.h1.serve_connection(io, service).with_upgrades());
        drive(conn, peer, ctx, &activity).await;
    }
}

/// The TLS handshake, bounded by `tls.handshake_timeout` and cut short by draining.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    ctx: &ConnCtx,
) -> Option<Box<tokio_rustls::server::TlsStream<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshake = tokio::select! {
        // Boxed: its state is freed once the handshake is done.
        r = tokio::time::timeout(ctx.handshake_timeout, Box::pin(acceptor.accept(stream))) => r,
        () = ctx.drain.cancelled() => return None,
    };
    match handshake {
        Ok(Ok(tls)) => Some(Box::new(tls)),
        Ok(Err(e)) => {
            ctx.gateway.metrics.tls_handshake_errors.inc();
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            ctx.gateway.metrics.tls_handshake_errors.inc();
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            None
        }
    }
}

/// Run a connection until it ends, closing it when idle or too slow with a request head, and
/// asking it to finish when the gate drains.
///
/// The drain and the check timer are polled only when one of them woke the task (see
/// [`SideWake`]): nearly every wake-up is the connection's own, and polling both each time was
/// two timer and token checks per request.
async fn drive<C: Serving>(mut conn: std::pin::Pin<&mut C>, peer: SocketAddr, ctx: &ConnCtx, activity: &ConnActivity) {
    let idle_ms = ctx.idle_timeout.as_millis() as u64;
    let head_ms = ctx.header_timeout.as_millis() as u64;
    let period =
        (ctx.idle_timeout.min(ctx.header_timeout) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drain = ctx.drain.cancelled();
    let mut drain = std::pin::pin!(drain);
    let side = SideWake::woken();
    let side_waker = std::task::Waker::from(side.clone());
    let mut closing = false;
    let ended = std::future::poll_fn(|cx| {
        loop {
            // The connection first: it is what woke the task nearly every time.
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            // Registered before the flag is read: a side wake-up after the read wakes the task.
            side.task.register(cx.waker());
            if !side.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut side_cx = std::task::Context::from_waker(&side_waker);
            if !closing && drain.as_mut().poll(&mut side_cx).is_ready() {
                closing = true;
                conn.as_mut().shutdown();
                // The connection acts on it when polled; the timer is looked at on that turn.
                side.woken.store(true, Ordering::Relaxed);
                continue;
            }
            if tick.poll_tick(&mut side_cx).is_pending() {
                return Poll::Pending;
            }
            let now = ctx.gateway.clock.now_ms();
            match activity.head_wait_ms(now) {
                // A request head that takes longer than header_timeout (slowloris): cut off.
                Some(ms) if ms >= head_ms => {
                    tracing::info!(client_ip = %peer.ip(), "request headers too slow: connection closed");
                    return Poll::Ready(None);
                }
                None if !closing && activity.idle_ms(now).is_some_and(|ms| ms >= idle_ms) => {
                    closing = true;
                    conn.as_mut().shutdown();
                }
                _ => {}
            }
            // Polled again on the next turn, the timer registers its next tick.
            side.woken.store(true, Ordering::Relaxed);
        }
    })
    .await;
    if let Some(Err(e)) = ended {
        let e: Box<dyn std::error::Error + Send + Sync> = e.into();
        log_connection_error(peer, e.as_ref());
    }
}

/// The waker [`drive`] polls the drain and the check timer with: it notes that one of them woke
/// the task, then wakes the task.
struct SideWake {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl SideWake {
    /// Made woken, so that both are polled (and registered) at the first poll.
    fn woken() -> Arc<SideWake> {
        Arc::new(SideWake {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        })
    }
}

impl std::task::Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Malformed, oversize or too-slow requests never reach the pipeline (hyper answers 400/431 or
/// closes the connection): they get a log line here. Peers hanging up are only debug noise.
fn log_connection_error(peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    match e.downcast_ref::<hyper::Error>() {
        Some(he) if he.is_parse_too_large() => {
            tracing::info!(client_ip = %peer.ip(), error = %he, "request headers too large: answered 431");
        }
        Some(he) if he.is_parse() => {
            tracing::info!(client_ip = %peer.ip(), error = %he, "malformed request: answered 400")
        }
        Some(he) if he.is_timeout() => {
            tracing::info!(client_ip = %peer.ip(), error = %he, "request headers too slow: connection closed")
        }
        _ => tracing::debug!(client_ip = %peer.ip(), error = %e, "connection ended with error"),
    }
}

/// The admin listener: HTTP/1.1 only, the same header timeout as the public one (here hyper's
/// own timer is right: an idle scrape connection may be closed), and its own connection cap so
/// a flood of half-open connections cannot starve `/healthz` of file descriptors for long.
async fn admin_loop(
    listener: TcpListener,
    admin: Arc<Admin>,
    stop: CancellationToken,
    header_timeout: Duration,
    max_connections: usize,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(16 * 1024);
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Full: close at once rather than queue (a queued probe would time out anyway).
            admin.metrics.admin_connections_refused.inc();
            if refused_logged.elapsed() >= Duration::from_secs(10) {
                refused_logged = std::time::Instant::now();
                tracing::warn!(max_connections, "admin listener full: refusing connections");
            }
            drop(stream);
            continue;
        };
        let admin = admin.clone();
        let conn = http.serve_connection(TokioIo::new(stream), service_fn(move |req| admin.clone().serve(req)));
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.await;
        });
    }
}

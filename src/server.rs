//! Listeners and connections: accept loops with a connection limit, TLS handshakes with a
//! timeout, HTTP/1.1 + HTTP/2 serving with header and idle timeouts, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, Readiness};
use crate::audit::{Audit, AuditSink};
use crate::auth::Authenticator;
use crate::chatkit::ChatKit;
use crate::client_io::ClientIo;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{ConnActivity, Gateway};
use crate::ratelimit::RateLimiter;
use crate::routes::RouteTable;
use crate::store::RedisStore;
use crate::tls;

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

/// Run the gate until `shutdown` resolves, then drain for up to `server.shutdown_grace`.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
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
    let auth = match &config.auth {
        Some(a) => Some(Authenticator::new(a, metrics.clone(), audit.clone()).context("auth")?),
        None => None,
    };
    let limiter = match &config.rate_limit {
        Some(rl) => Some(
            RateLimiter::new(rl, routes.all(), store.clone(), metrics.clone(), audit.clone()).context("rate_limit")?,
        ),
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

    let http = Arc::new(http_builder(&config));
    let stop_accepting = CancellationToken::new();
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(config.server.max_connections));

    let addrs = (listeners.https.local_addr()?, listeners.plain.as_ref().map(|l| l.local_addr()).transpose()?);
    let ctx = Arc::new(ConnCtx {
        gateway: gateway.clone(),
        http,
        drain: drain.clone(),
        idle_timeout: config.server.idle_timeout,
        header_timeout: config.server.header_timeout,
        handshake_timeout: config.tls.handshake_timeout,
    });
    let mut accept_loops = Vec::new();
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
        version = env!("CARGO_PKG_VERSION"),
        "chatkit-gate listening"
    );

    shutdown.await;
    let grace = config.server.shutdown_grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutdown requested: draining");
    readiness.draining.store(true, Ordering::Release);
    stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    drain.cancel();
    connections.close();
    gateway.tunnels.close();
    let drained = tokio::time::timeout(grace, async {
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

fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer also runs while a keep-alive connection waits for its next request,
    // which would close idle connections at header_timeout: serve_connection times heads itself.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(config.server.max_header_bytes.max(8192))
        .keep_alive(true);
    // HTTP/2: h2 refuses a header block over this size with a GOAWAY (the client never sees an
    // answer), so it is set above max_header_bytes and the gate answers 431 itself.
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(h2_header_list_limit(config.server.max_header_bytes))
        .max_concurrent_streams(250)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// The header-list size hyper's HTTP/2 side accepts: well above `max_header_bytes`, which the
/// gate enforces itself with a 431.
fn h2_header_list_limit(max_header_bytes: usize) -> u32 {
    u32::try_from(max_header_bytes.saturating_mul(8).max(256 * 1024)).unwrap_or(u32::MAX)
}

struct ConnCtx {
    gateway: Arc<Gateway>,
    http: Arc<auto::Builder<TokioExecutor>>,
    drain: CancellationToken,
    idle_timeout: Duration,
    header_timeout: Duration,
    handshake_timeout: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<ServerConfig>>>,
    ctx: Arc<ConnCtx>,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        // Past max_connections we stop accepting: new clients wait in the kernel's queue.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = stop.cancelled() => return,
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
        tracker.spawn(async move {
            ctx.gateway.metrics.connections_open.inc();
            let activity = Arc::new(ConnActivity::new(Some(permit), ctx.gateway.clock.now_ms()));
            match tls {
                Some(config) => serve_tls(stream, peer, config, &ctx, activity).await,
                None => serve_connection(stream, peer, false, &ctx, activity).await,
            }
            ctx.gateway.metrics.connections_open.dec();
        });
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    ctx: &ConnCtx,
    activity: Arc<ConnActivity>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshake = tokio::select! {
        r = tokio::time::timeout(ctx.handshake_timeout, acceptor.accept(stream)) => r,
        () = ctx.drain.cancelled() => return,
    };
    match handshake {
        Ok(Ok(tls)) => {
            // The header timeout of the first request runs from the end of the handshake.
            activity.first_request_clock(ctx.gateway.clock.now_ms());
            serve_connection(tls, peer, true, ctx, activity).await
        }
        Ok(Err(e)) => {
            ctx.gateway.metrics.tls_handshake_errors.inc();
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            ctx.gateway.metrics.tls_handshake_errors.inc();
            tracing::debug!(peer = %peer, "TLS handshake timed out");
        }
    }
}

async fn serve_connection<I>(io: I, peer: SocketAddr, tls: bool, ctx: &ConnCtx, activity: Arc<ConnActivity>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let gateway = ctx.gateway.clone();
    let io = ClientIo::new(io, activity.clone(), gateway.clock.clone());
    let service = {
        let activity = activity.clone();
        service_fn(move |req| gateway.clone().serve(req, peer, tls, activity.clone()))
    };
    let conn = ctx.http.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle_ms = ctx.idle_timeout.as_millis() as u64;
    let head_ms = ctx.header_timeout.as_millis() as u64;
    let period =
        (ctx.idle_timeout.min(ctx.header_timeout) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    log_connection_error(peer, e.as_ref());
                }
                return;
            }
            () = ctx.drain.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                let now = ctx.gateway.clock.now_ms();
                // A request head that takes longer than header_timeout (slowloris): cut off.
                if activity.head_wait_ms(now).is_some_and(|ms| ms >= head_ms) {
                    tracing::info!(client_ip = %peer.ip(), "request headers too slow: connection closed");
                    return;
                }
                if !closing && activity.head_wait_ms(now).is_none() && activity.idle_ms(now).is_some_and(|ms| ms >= idle_ms) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
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

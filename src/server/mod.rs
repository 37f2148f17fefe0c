//! Listeners and connections: [`run`] starts the gateway on bound listeners and shuts it down
//! gracefully; `accept` (accept loops with a connection limit, TLS handshakes with a timeout),
//! `protocols` (HTTP/1.1 and HTTP/2 settings), `drive` (header and idle timeouts, drain) and
//! `admin` (the admin port) do the rest.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::chatkit::ChatKit;
use crate::config::Config;
use crate::obs::audit::{Audit, AuditSink};
use crate::obs::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::ratelimit::RateLimiter;
use crate::request::routes::RouteTable;
use crate::server::accept::{accept_loop, accept_on};
use crate::server::admin::admin_loop;
use crate::server::admin::{Admin, Readiness};
use crate::server::conn_ctx::ConnCtx;
use crate::server::protocols::Protocols;
use crate::transport::redis::RedisStore;
use crate::transport::tls;
use crate::transport::workers::Workers;

mod accept;
pub mod admin;
mod conn_ctx;
mod drive;
mod protocols;

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
    gateway.tunnels().close();
    let drained = tokio::time::timeout_at(drain_deadline, async {
        connections.wait().await;
        gateway.tunnels().wait().await;
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!(
            open_connections = connections.len(),
            open_tunnels = gateway.tunnels().len(),
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

/// After the listeners close, open connections keep serving this long before idle ones are
/// closed and the others told to finish (HTTP/2 GOAWAY): counted within `shutdown_grace`.
const DRAIN_SETTLE: Duration = Duration::from_millis(500);

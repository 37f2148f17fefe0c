//! Accepting connections: the accept loops (one per listener and worker) with the connection
//! limit, the TLS handshake with its timeout, and serving one connection from accept to close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::conn_ctx::{ACCEPT_DEFER, ConnCtx};
use crate::server::drive::drive;
use crate::transport::client_io::ClientIo;
use crate::transport::conn::ConnActivity;
use crate::transport::workers::worker_index;

/// A further accept loop on `listener`'s socket, run by the worker behind `handle`.
pub(crate) fn accept_on(
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

/// The saturation warning is repeated at most this often per listener.
const SATURATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) async fn accept_loop(
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

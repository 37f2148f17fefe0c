//! The admin listener: `/healthz`, `/readyz` and `/metrics`, never on the public port.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::http::body::GateBody;
use crate::obs::metrics::Metrics;
use crate::pipeline::Gateway;

/// Readiness as the orchestrator sees it.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Listeners bound and TLS loaded.
    pub started: AtomicBool,
    /// SIGTERM/SIGINT received.
    pub draining: AtomicBool,
}

pub struct Admin {
    pub readiness: Arc<Readiness>,
    pub metrics: Metrics,
    pub gateway: Arc<Gateway>,
}

impl Admin {
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.readiness.draining.load(Ordering::Acquire) {
            return Err("draining");
        }
        if !self.readiness.started.load(Ordering::Acquire) {
            return Err("starting");
        }
        if !self.gateway.limiter_ready() {
            return Err("rate-limit store unavailable (on_store_error = deny)");
        }
        Ok(())
    }

    pub async fn serve(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<GateBody>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
        }
        Ok(match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}\n")),
            },
            "/metrics" => {
                let mut resp = text(StatusCode::OK, &self.metrics.render());
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                resp
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        })
    }
}

fn text(status: StatusCode, body: &str) -> Response<GateBody> {
    let mut resp = Response::new(GateBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The admin listener: HTTP/1.1 only, the same header timeout as the public one (here hyper's
/// own timer is right: an idle scrape connection may be closed), and its own connection cap so
/// a flood of half-open connections cannot starve `/healthz` of file descriptors for long.
pub(crate) async fn admin_loop(
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

//! The admin listener: `/healthz`, `/readyz` and `/metrics`, never on the public port.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

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

//! The app behind the gate: one pooled keep-alive client ([`Upstream`]) with its timeouts, the
//! `Keep-Alive` timeout it learns from the app, and which requests may be sent twice.

use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderMap, Response};

use crate::config::UpstreamSettings;
use crate::http::body::{AppBody, GateBody, UploadFailure};
use crate::http::error::GateError;
use crate::http::headers::KEEP_ALIVE;
use crate::obs::metrics::Metrics;
use crate::upstream::pool::{AppPool, PoolOptions, SendError};

pub mod pool;

/// The app behind the gate: its connection pool and timeouts.
pub struct Upstream {
    pool: AppPool,
    timeout: Duration,
    metrics: Metrics,
    retries: prometheus::IntCounter,
    upstream_duration: prometheus::Histogram,
}

impl Upstream {
    /// `workers`: the workers serving (each keeps its own idle connections to the app).
    pub fn new(settings: &UpstreamSettings, workers: usize, metrics: Metrics) -> anyhow::Result<Upstream> {
        let authority: &Authority =
            settings.url.authority().ok_or_else(|| anyhow::anyhow!("upstream.url: URL has no host"))?;
        if settings.url.scheme() != Some(&Scheme::HTTP) {
            anyhow::bail!("upstream.url: only http:// is supported");
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let pool = AppPool::new(PoolOptions {
            target,
            connect_timeout: settings.connect_timeout,
            idle_timeout: settings.pool_idle_timeout,
            max_idle: settings.pool_max_idle_per_host,
            workers,
        });
        Ok(Upstream {
            pool,
            timeout: settings.timeout,
            retries: metrics.upstream_retries.with_label_values(&["app"]),
            upstream_duration: metrics.upstream_duration.clone(),
            metrics,
        })
    }

    /// Send a prepared request. `upstream.timeout` runs from when the request body has been
    /// sent to the response headers (a slow upload is `server.body_timeout`'s business). A
    /// bodiless idempotent request whose pooled connection was closed under it is sent once more
    /// on a fresh connection. A failed client body is the client's error (408 or 400), not the
    /// app's.
    pub async fn send(&self, parts: &mut http::request::Parts, body: GateBody) -> Result<Response<AppBody>, GateError> {
        let upload = body.upload_state();
        let started = Instant::now();
        let replayable = replayable(&parts.method, &body);
        let exchange = self.pool.send(parts, body, replayable, started, |e| {
            self.retries.inc();
            tracing::debug!(error = %e, "pooled connection closed before answering: retrying on a fresh one");
        });
        tokio::pin!(exchange);
        // The clock read that started the exchange also starts the timeout, unless an upload
        // was still being sent.
        let (early, sent_at) = match &upload {
            Some(up) if !up.is_sent() => tokio::select! {
                r = &mut exchange => (Some(r), started),
                () = up.sent() => (None, Instant::now()),
            },
            _ => (None, started),
        };
        let result = match (early, sent_at.checked_add(self.timeout)) {
            (Some(r), _) => Ok(r),
            (None, Some(deadline)) => tokio::time::timeout_at(deadline.into(), exchange).await,
            (None, None) => Ok(exchange.await),
        };
        self.upstream_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(answer)) => {
                if let Some(secs) = keep_alive_timeout(answer.headers()) {
                    self.learn_keep_alive(secs);
                }
                Ok(answer)
            }
            Ok(Err(e)) => {
                if let Some(failure) = upload.as_ref().and_then(|up| up.failure()) {
                    return Err(self.client_body_failed(failure, &e));
                }
                let kind = if e.is_connect() { "connect" } else { "protocol" };
                self.metrics.upstream_errors.with_label_values(&[kind]).inc();
                tracing::warn!(kind, error = %crate::http::error::error_chain(&e), "upstream request failed");
                Err(GateError::UpstreamUnavailable)
            }
            Err(_) => {
                self.metrics.upstream_errors.with_label_values(&["timeout"]).inc();
                tracing::warn!(timeout_ms = self.timeout.as_millis() as u64, "upstream timed out");
                Err(GateError::UpstreamTimeout)
            }
        }
    }

    /// The app said it closes idle connections after `secs` (`Keep-Alive: timeout=N`): when
    /// that is sooner than the pool's idle timeout, pool with a timeout safely below it.
    fn learn_keep_alive(&self, secs: u64) {
        let app_ms = secs.saturating_mul(1000);
        // Expire a second before the app does, or at half its timeout when that is shorter.
        let target = app_ms.saturating_sub(1000).max(app_ms / 2).max(100);
        let before = self.pool.idle_timeout().as_millis() as u64;
        if target >= before {
            return;
        }
        self.pool.set_idle_timeout(Duration::from_millis(target));
        tracing::info!(
            app_keep_alive_s = secs,
            pool_idle_ms = target,
            previous_ms = before,
            "the app closes idle connections sooner than upstream.pool_idle_timeout: pooling for less"
        );
    }

    fn client_body_failed(&self, failure: UploadFailure, e: &SendError) -> GateError {
        let (kind, answer) = match failure {
            UploadFailure::Timeout => ("timeout", GateError::RequestTimeout),
            UploadFailure::Malformed => ("malformed", GateError::BadRequest("Bad request")),
        };
        self.metrics.client_body_errors.with_label_values(&[kind]).inc();
        tracing::info!(kind, error = %crate::http::error::error_chain(e), "client request body failed: app connection released");
        answer
    }
}

/// `N` of a response's `Keep-Alive: timeout=N` (RFC 2068 §19.7.1, still sent by many servers).
fn keep_alive_timeout(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(&KEEP_ALIVE)?.to_str().ok()?;
    value.split(',').find_map(|param| {
        let (name, n) = param.split_once('=')?;
        name.trim().eq_ignore_ascii_case("timeout").then(|| n.trim().trim_matches('"').parse().ok())?
    })
}

/// May this request be sent again after a pooled connection failed under it? Only an
/// idempotent method without a body (nothing to replay).
fn replayable(method: &http::Method, body: &GateBody) -> bool {
    use http::Method;
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
        && http_body::Body::is_end_stream(body)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use http::HeaderValue;

    use super::*;

    #[test]
    fn keep_alive_timeout_is_read_from_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(keep_alive_timeout(&h), None);
        h.insert("keep-alive", HeaderValue::from_static("max=100, Timeout=5"));
        assert_eq!(keep_alive_timeout(&h), Some(5));
        h.insert("keep-alive", HeaderValue::from_static("timeout=soon"));
        assert_eq!(keep_alive_timeout(&h), None);
    }
}

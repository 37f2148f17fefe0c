//! The introspection call: which credentials a request carries, the pooled client that asks the
//! introspection URL about them, and how its answer is read (identity, cacheability, cookies).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, COOKIE, HOST, SET_COOKIE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::Semaphore;

use crate::auth::breaker::{Breaker, CallKind};
use crate::auth::credentials::Credentials;
use crate::config::AuthSettings;
use crate::http::headers::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_ORIGINAL_METHOD, X_ORIGINAL_URI, X_REQUEST_ID,
};
use crate::request::context::RequestContext;

/// Largest introspection answer read; a larger one is an error.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// What the original request contributes to the introspection call besides credentials.
pub(crate) struct OriginalRequest {
    pub method: HeaderValue,
    pub uri: Option<HeaderValue>,
    pub host: Option<HeaderValue>,
    pub client_ip: HeaderValue,
    pub https: bool,
    pub request_id: HeaderValue,
}

impl OriginalRequest {
    pub fn of(parts: &http::request::Parts, ctx: &RequestContext) -> OriginalRequest {
        let host = parts
            .headers
            .get(HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        OriginalRequest {
            method: HeaderValue::from_str(parts.method.as_str()).unwrap_or(HeaderValue::from_static("GET")),
            uri: parts.uri.path_and_query().and_then(|pq| HeaderValue::from_str(pq.as_str()).ok()),
            host,
            client_ip: HeaderValue::from_str(&ctx.client_ip.to_string()).unwrap_or(HeaderValue::from_static("")),
            https: ctx.https,
            request_id: ctx.request_id.clone(),
        }
    }
}

/// Why introspection gave no answer we can use.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Failure {
    #[error("introspection timed out")]
    Timeout,
    #[error("introspection connection failed: {0}")]
    Connect(String),
    #[error("introspection request failed: {0}")]
    Request(String),
    #[error("introspection answered status {0}")]
    Status(u16),
    #[error("introspection answer unreadable: {0}")]
    Body(String),
    #[error("introspection answer invalid: {0}")]
    Invalid(String),
    #[error("introspection circuit breaker open")]
    CircuitOpen,
    #[error("too many introspection calls in flight")]
    Overloaded,
}

impl Failure {
    /// The `kind` label of `chatkit_gate_auth_introspection_errors_total`; `None` for calls
    /// never made (breaker open, in-flight cap), which are counted as rejected instead.
    pub fn kind(&self) -> Option<&'static str> {
        Some(match self {
            Failure::Timeout => "timeout",
            Failure::Connect(_) => "connect",
            Failure::Request(_) => "request",
            Failure::Status(_) => "status",
            Failure::Body(_) => "body",
            Failure::Invalid(_) => "invalid",
            Failure::CircuitOpen | Failure::Overloaded => return None,
        })
    }

    /// Short, bounded reason for audit events and logs.
    pub fn reason(&self) -> String {
        match self {
            Failure::Timeout => "timeout".into(),
            Failure::Connect(_) => "connection failed".into(),
            Failure::Request(_) => "request failed".into(),
            Failure::Status(s) => format!("status {s}"),
            Failure::Body(_) => "unreadable answer".into(),
            Failure::Invalid(_) => "invalid answer".into(),
            Failure::CircuitOpen => "circuit breaker open".into(),
            Failure::Overloaded => "too many calls in flight".into(),
        }
    }
}

/// A usable introspection answer.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// 2xx = signed in (if it names a user), 401/403 = signed out.
    pub fn signed_in(&self) -> bool {
        self.status.is_success()
    }

    /// `Set-Cookie` values to hand to the client.
    pub fn set_cookies(&self) -> Vec<HeaderValue> {
        self.headers.get_all(SET_COOKIE).iter().cloned().collect()
    }

    /// The longest the answer may be cached by its own `Cache-Control`: `None` = no limit,
    /// `Some(ZERO)` = not at all (`no-store`, `no-cache`, `max-age=0`).
    pub fn cache_limit(&self) -> Option<Duration> {
        cache_limit(&self.headers)
    }
}

/// `Cache-Control` of an answer as a cap on how long to keep it (`s-maxage` wins over `max-age`:
/// the gate's cache is shared by every request bearing the same credentials).
pub(crate) fn cache_limit(headers: &HeaderMap) -> Option<Duration> {
    let (mut max_age, mut s_maxage) = (None, None);
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            // An unparsable age is treated as 0, as RFC 9111 asks of caches.
            let secs = || arg.map(|a| a.parse::<u64>().unwrap_or(0)).map(Duration::from_secs);
            if name.eq_ignore_ascii_case("max-age") {
                max_age = secs().or(max_age);
            } else if name.eq_ignore_ascii_case("s-maxage") {
                s_maxage = secs().or(s_maxage);
            }
        }
    }
    s_maxage.or(max_age)
}

type HttpsClient = crate::transport::https_client::HttpsClient<Empty<Bytes>>;

/// The pooled keep-alive client for the introspection URL (one per gate, never per request).
pub(crate) struct Introspector {
    client: HttpsClient,
    /// Never pools: the one retry after a pooled connection failed goes out on a new one.
    fresh: HttpsClient,
    url: Uri,
    timeout: Duration,
    user_agent: HeaderValue,
    metrics: IntrospectionMetrics,
    breaker: Breaker,
    in_flight: Arc<Semaphore>,
}

/// The metric handles an [`Introspector`] updates.
pub(crate) struct IntrospectionMetrics {
    pub duration: Histogram,
    pub retries: IntCounter,
    pub in_flight: IntGauge,
    pub breaker_open: IntGauge,
    pub rejected_breaker: IntCounter,
    pub rejected_in_flight: IntCounter,
}

/// Idle pooled connections to the introspection URL are dropped after this long: below the
/// keep-alive timeouts of common app servers (gunicorn 2 s, Node and uvicorn 5 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

impl Introspector {
    pub fn new(settings: &AuthSettings, metrics: IntrospectionMetrics) -> anyhow::Result<Self> {
        let options = crate::transport::https_client::ClientOptions {
            ca_file: settings.ca_file.as_deref(),
            ca_key: "auth.ca_file",
            connect_timeout: settings.timeout,
            pool_idle_timeout: POOL_IDLE_TIMEOUT,
            pool_max_idle_per_host: 64,
        };
        let client = crate::transport::https_client::https_client(options)?;
        let fresh = crate::transport::https_client::https_client(crate::transport::https_client::ClientOptions {
            pool_max_idle_per_host: 0,
            ..options
        })?;
        let breaker = Breaker::new(settings.breaker_failures, settings.breaker_cooldown, metrics.breaker_open.clone());
        Ok(Introspector {
            client,
            fresh,
            url: settings.introspection_url.clone(),
            timeout: settings.timeout,
            user_agent: HeaderValue::from_static(concat!("chatkit-gate/", env!("CARGO_PKG_VERSION"))),
            metrics,
            breaker,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
        })
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The introspection request: a bodiless GET with only the credentials and the listed facts.
    pub fn request(&self, creds: &Credentials, fwd: &OriginalRequest) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.url.clone();
        let h = req.headers_mut();
        for (name, value) in &creds.headers {
            h.append(name.clone(), value.clone());
        }
        if let Some(cookie) = &creds.cookie {
            h.insert(COOKIE, cookie.clone());
        }
        h.insert(&X_FORWARDED_FOR, fwd.client_ip.clone());
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(if fwd.https { "https" } else { "http" }));
        if let Some(host) = &fwd.host {
            h.insert(&X_FORWARDED_HOST, host.clone());
        }
        h.insert(&X_ORIGINAL_METHOD, fwd.method.clone());
        if let Some(uri) = &fwd.uri {
            h.insert(&X_ORIGINAL_URI, uri.clone());
        }
        h.insert(&X_REQUEST_ID, fwd.request_id.clone());
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        h.insert(USER_AGENT, self.user_agent.clone());
        req
    }

    /// Make the call, unless the breaker is open or `max_in_flight` calls are already out (both
    /// fail at once, counted). Failures and timeouts feed the breaker.
    pub async fn call(&self, req: Request<Empty<Bytes>>) -> Result<Answer, Failure> {
        let Some(admit) = self.breaker.admit() else {
            self.metrics.rejected_breaker.inc();
            return Err(Failure::CircuitOpen);
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.metrics.rejected_in_flight.inc();
            if admit == CallKind::Probe {
                // Not a verdict on the endpoint: let the next caller probe.
                self.breaker.release_probe();
            }
            tracing::warn!("introspection calls at auth.max_in_flight: answering 503 at once");
            return Err(Failure::Overloaded);
        };
        self.metrics.in_flight.inc();
        let result = self.call_once(req).await;
        self.metrics.in_flight.dec();
        let endpoint_ok = !matches!(
            result,
            Err(Failure::Timeout | Failure::Connect(_) | Failure::Request(_) | Failure::Body(_) | Failure::Status(_))
        );
        self.breaker.record(admit, endpoint_ok);
        result
    }

    /// The call under the configured timeout (connect, headers and body together), retried
    /// once on a fresh connection when a pooled one was closed under it.
    async fn call_once(&self, req: Request<Empty<Bytes>>) -> Result<Answer, Failure> {
        let start = Instant::now();
        let replay = crate::transport::https_client::Replay::of(&req);
        let result = tokio::time::timeout(self.timeout, async {
            let sent = crate::transport::https_client::send_with_retry(
                &self.client,
                &self.fresh,
                req,
                Some(replay),
                &self.metrics.retries,
            );
            let resp = sent.await.map_err(|e| {
                let detail = crate::http::error::error_chain(&e);
                if e.is_connect() { Failure::Connect(detail) } else { Failure::Request(detail) }
            })?;
            let (parts, body) = resp.into_parts();
            // Read 401/403 bodies too: a fully read answer keeps the connection reusable.
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| Failure::Body(e.to_string()))?
                .to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        })
        .await;
        self.metrics.duration.observe(start.elapsed().as_secs_f64());
        let answer = result.map_err(|_| Failure::Timeout)??;
        match answer.status.as_u16() {
            200..=299 | 401 | 403 => Ok(answer),
            other => Err(Failure::Status(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cache_control_caps_the_ttl() {
        let cc = |v: &str| cache_limit(&headers(&[("cache-control", v)]));
        assert_eq!(cc("private, max-age=10"), Some(Duration::from_secs(10)));
        assert_eq!(cc("max-age=10, s-maxage=3"), Some(Duration::from_secs(3)));
        assert_eq!(cc("No-Store"), Some(Duration::ZERO));
        assert_eq!(cc("no-cache"), Some(Duration::ZERO));
        assert_eq!(cc("max-age=banana"), Some(Duration::ZERO));
        assert_eq!(cc("public"), None);
        assert_eq!(cache_limit(&HeaderMap::new()), None);
    }
}

//! The introspection call: which credentials a request carries, the pooled client that asks the
//! introspection URL about them, and how its answer is read (identity, cacheability, cookies).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, COOKIE, HOST, SET_COOKIE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use prometheus::{Histogram, IntCounter, IntGauge};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::breaker::{Breaker, CallKind};
use super::cache::Key;
use crate::config::AuthSettings;
use crate::http::headers::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_ORIGINAL_METHOD, X_ORIGINAL_URI, X_REQUEST_ID,
};
use crate::request::context::RequestContext;

/// Largest introspection answer read; a larger one is an error.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// The credentials a request carries, as they will be forwarded, and their cache key.
pub(crate) struct Credentials {
    /// Just the configured cookies (`name=value; …`), or the whole Cookie header.
    pub cookie: Option<HeaderValue>,
    /// `forward_headers` present on the request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The route name in the key (a rotated credential is cached under the same route).
    pub route: Box<str>,
}

/// Which cookies and headers count as credentials, and the per-process salt of their hash.
pub(crate) struct CredentialRules {
    /// Empty = the whole Cookie header.
    pub cookies: Vec<String>,
    pub forward_headers: Vec<HeaderName>,
    pub salt: [u8; 16],
}

/// The credentials of a request with their cache key, borrowed from the request: a cached
/// decision needs only the key, so the cookie value and the route are copied only for an
/// introspection call ([`Found::into_owned`]).
pub(crate) struct Found<'a> {
    cookie: Option<CookieBytes<'a>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    pub key: Key,
    route: &'a str,
}

impl Found<'_> {
    pub fn into_owned(self) -> Credentials {
        Credentials {
            cookie: self.cookie.and_then(CookieBytes::into_value),
            headers: self.headers,
            route: self.route.into(),
        }
    }
}

/// A forwarded cookie value, as found in the request.
enum CookieBytes<'a> {
    /// A whole `Cookie` field (shared, not copied).
    Field(&'a HeaderValue),
    /// One `name=value` pair inside a field.
    Pair(&'a [u8]),
    /// Pairs or fields joined with `; `.
    Joined(Vec<u8>),
}

impl CookieBytes<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            CookieBytes::Field(v) => v.as_bytes(),
            CookieBytes::Pair(b) => b,
            CookieBytes::Joined(b) => b,
        }
    }

    fn into_value(self) -> Option<HeaderValue> {
        match self {
            CookieBytes::Field(v) => Some(v.clone()),
            CookieBytes::Pair(b) => HeaderValue::from_bytes(b).ok(),
            CookieBytes::Joined(b) => HeaderValue::from_maybe_shared(Bytes::from(b)).ok(),
        }
    }
}

impl CredentialRules {
    /// The forwarded credentials of a request, or `None` when it carries none at all. The key also
    /// holds the route: the introspection call names the original path, so its answer may
    /// differ per route and is cached per route. Borrowed from the request
    /// ([`Found::into_owned`] copies what an introspection call needs).
    pub fn find<'a>(&self, headers: &'a HeaderMap, route: &'a str) -> Option<Found<'a>> {
        let cookie = if self.cookies.is_empty() { whole_cookie(headers) } else { self.named_cookies(headers) };
        let mut forwarded = Vec::new();
        for name in &self.forward_headers {
            for value in headers.get_all(name) {
                forwarded.push((name.clone(), value.clone()));
            }
        }
        if cookie.is_none() && forwarded.is_empty() {
            return None;
        }
        let key = self.key(route, cookie.as_ref().map(CookieBytes::as_bytes), &forwarded);
        Some(Found { cookie, headers: forwarded, key, route })
    }

    /// The cache key of a route, a forwarded cookie value and forwarded headers.
    pub fn key(&self, route: &str, cookie: Option<&[u8]>, forwarded: &[(HeaderName, HeaderValue)]) -> Key {
        fn part(h: &mut Sha256, bytes: &[u8]) {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        let mut h = Sha256::new();
        h.update(self.salt);
        part(&mut h, route.as_bytes());
        // What part(&key_bytes(cookie)) would hash, without building those bytes.
        let cookie = cookie.unwrap_or_default();
        h.update((super::cookies::key_bytes_len(cookie) as u64).to_le_bytes());
        super::cookies::feed_key_bytes(cookie, |b| h.update(b));
        for (name, value) in forwarded {
            part(&mut h, name.as_str().as_bytes());
            part(&mut h, value.as_bytes());
        }
        Key(h.finalize().into())
    }

    /// `name=value` pairs of the configured cookies (and their `.N` chunks), in request order;
    /// allocates only when there are several.
    fn named_cookies<'a>(&self, headers: &'a HeaderMap) -> Option<CookieBytes<'a>> {
        // HTTP/2 clients may send one `cookie` field per pair: look at all of them.
        let fields = headers.get_all(COOKIE);
        let mut found = fields.iter().flat_map(|field| {
            field.as_bytes().split(|b| *b == b';').map(<[u8]>::trim_ascii).filter(|pair| {
                let name = pair.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii();
                pair.len() > name.len()
                    && self.cookies.iter().any(|c| super::cookies::is_name_or_chunk(name, c.as_bytes()))
            })
        });
        let first = found.next()?;
        let Some(second) = found.next() else {
            // One pair: when it is a whole field (`Cookie: session=…` alone, or HTTP/2's one
            // field per pair), that field's value is shared, not copied. A pair, a trimmed slice
            // of a valid field, is itself a valid header value.
            return Some(match fields.iter().find(|field| field.as_bytes() == first) {
                Some(whole) => CookieBytes::Field(whole),
                None => CookieBytes::Pair(first),
            });
        };
        let mut out: Vec<u8> = Vec::with_capacity(fields.iter().map(HeaderValue::len).sum());
        out.extend_from_slice(first);
        for pair in std::iter::once(second).chain(found) {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(pair);
        }
        Some(CookieBytes::Joined(out))
    }
}

fn whole_cookie(headers: &HeaderMap) -> Option<CookieBytes<'_>> {
    let mut values = headers.get_all(COOKIE).iter().filter(|v| !v.as_bytes().trim_ascii().is_empty());
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(CookieBytes::Field(first));
    };
    let mut out = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        out.extend_from_slice(b"; ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(CookieBytes::Joined(out))
}

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

    fn rules(cookies: &[&str], forward: &[&str]) -> CredentialRules {
        CredentialRules {
            cookies: cookies.iter().map(|c| c.to_string()).collect(),
            forward_headers: forward.iter().map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap()).collect(),
            salt: [7; 16],
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    impl CredentialRules {
        fn extract(&self, headers: &HeaderMap, route: &str) -> Option<Credentials> {
            self.find(headers, route).map(Found::into_owned)
        }
    }

    #[test]
    fn only_the_named_cookies_are_kept_across_cookie_fields() {
        let r = rules(&["session", "sid"], &[]);
        let h =
            headers(&[("cookie", "theme=dark; session=abc;  other=1"), ("cookie", "sid=x=y"), ("cookie", "session")]);
        let c = r.extract(&h, "r").unwrap();
        assert_eq!(c.cookie.unwrap(), "session=abc; sid=x=y");
        assert!(r.extract(&headers(&[("cookie", "theme=dark; sessionx=1")]), "r").is_none());
        let chunked = r.extract(&headers(&[("cookie", "session.0=a; session.x=1; session.1=b")]), "r").unwrap();
        assert_eq!(chunked.cookie.unwrap(), "session.0=a; session.1=b", "chunks of a configured cookie");
    }

    #[test]
    fn whole_cookie_header_when_no_names_are_configured() {
        let r = rules(&[], &[]);
        assert_eq!(r.extract(&headers(&[("cookie", "a=1; b=2")]), "r").unwrap().cookie.unwrap(), "a=1; b=2");
        assert_eq!(
            r.extract(&headers(&[("cookie", "a=1"), ("cookie", "b=2")]), "r").unwrap().cookie.unwrap(),
            "a=1; b=2"
        );
        assert!(r.extract(&HeaderMap::new(), "r").is_none());
    }

    #[test]
    fn the_key_depends_on_every_forwarded_credential_and_nothing_else() {
        let r = rules(&["session"], &["authorization"]);
        let k = |pairs: &[(&str, &str)]| r.find(&headers(pairs), "api").map(|c| c.key.0);
        let base = k(&[("cookie", "session=abc; theme=dark"), ("authorization", "Bearer t")]);
        assert_eq!(base, k(&[("cookie", "theme=light; session=abc"), ("authorization", "Bearer t")]));
        assert_ne!(base, k(&[("cookie", "session=abd"), ("authorization", "Bearer t")]));
        assert_ne!(base, k(&[("cookie", "session=abc"), ("authorization", "Bearer u")]));
        assert_ne!(k(&[("authorization", "Bearer t")]), k(&[("cookie", "session=abc")]));
        assert!(k(&[("authorization", "Bearer t")]).is_some(), "a forwarded header alone is a credential");
        let on = |route: &str| r.find(&headers(&[("cookie", "session=abc")]), route).map(|c| c.key.0);
        assert_ne!(on("api"), on("admin"), "one decision per route");
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

//! The app behind the gate: one pooled keep-alive client, and the headers a forwarded request
//! and its answer carry (hop-by-hop removed, `X-Forwarded-*` and `X-Request-Id` set).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::header::{CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Response, Uri};
use ipnet::IpNet;

use crate::config::UpstreamSettings;
use crate::http::body::{AppBody, GateBody, UploadFailure};
use crate::http::error::GateError;
use crate::obs::metrics::Metrics;
use crate::upstream::pool::{AppPool, PoolOptions, SendError};

pub mod pool;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the `Proxy-*` and legacy `Keep-Alive` ones): never
/// forwarded in either direction (an allowed upgrade re-adds its own `Connection`/`Upgrade`).
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("proxy-authenticate"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// The tokens of every `Connection` header, trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

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
                tracing::warn!(kind, error = %error_chain(&e), "upstream request failed");
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
        tracing::info!(kind, error = %error_chain(e), "client request body failed: app connection released");
        answer
    }
}

/// The request target sent to the app: origin-form (`/path?query`).
pub fn origin_form(path_and_query: Option<&PathAndQuery>) -> Uri {
    Uri::from(path_and_query.cloned().unwrap_or_else(|| PathAndQuery::from_static("/")))
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether the peer's forwarding headers are believed.
pub fn peer_is_trusted(peer: SocketAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && is_trusted(peer.ip(), trusted)
}

/// The client address: the peer, or for a trusted peer the right-most untrusted address in
/// `X-Forwarded-For` (falling back to the left-most when every hop is trusted).
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    if !peer_is_trusted(peer, trusted) {
        return peer_ip;
    }
    let mut leftmost = None;
    let hops: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| parse_hop(s.trim()))
        .collect();
    for ip in hops.iter().rev() {
        if !is_trusted(*ip, trusted) {
            return *ip;
        }
        leftmost = Some(*ip);
    }
    leftmost.unwrap_or(peer_ip)
}

fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // "1.2.3.4:5678" or "[::1]:5678"
    s.parse::<SocketAddr>().ok().map(|a| canonical(a.ip()))
}

/// A client-sent request id is kept when short and plain; otherwise one is generated.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c)) {
            return v.clone();
        }
    }
    // 32 hex digits, written without the formatting machinery.
    let id: u128 = rand::random();
    let mut hex = [0u8; 32];
    for (i, d) in hex.iter_mut().enumerate() {
        *d = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Which of [`HOP_BY_HOP`] a header block has, noted on a pass the caller makes over its names
/// anyway, so that only those are removed (usually just `Connection`) instead of a lookup for
/// each of the nine.
#[derive(Default)]
pub(crate) struct HopByHop([bool; HOP_BY_HOP.len()]);

/// Indices of [`HOP_BY_HOP`] the passes ask about by name.
const CONNECTION_AT: usize = 0;
const TRANSFER_ENCODING_AT: usize = 7;

impl HopByHop {
    /// Note `name`; true when it is hop-by-hop.
    pub(crate) fn note(&mut self, name: &HeaderName) -> bool {
        // One string match (length first) instead of nine name comparisons; the indices are
        // those of HOP_BY_HOP (pinned by a test).
        let i = match name.as_str() {
            "connection" => CONNECTION_AT,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "proxy-authorization" => 3,
            "proxy-authenticate" => 4,
            "te" => 5,
            "trailer" => 6,
            "transfer-encoding" => TRANSFER_ENCODING_AT,
            "upgrade" => 8,
            _ => return false,
        };
        self.0[i] = true;
        true
    }

    fn any(&self) -> bool {
        self.0.contains(&true)
    }

    /// `Connection` was noted.
    fn connection(&self) -> bool {
        self.0[CONNECTION_AT]
    }

    /// A message framed by Transfer-Encoding ignores Content-Length (RFC 9112 §6.3); forwarding
    /// both would let the next hop frame it differently (request smuggling). Hyper re-frames.
    /// Decided by the names noted, without a lookup.
    pub(crate) fn drop_length_beside_chunked(&self, headers: &mut HeaderMap) {
        if self.0[TRANSFER_ENCODING_AT] {
            headers.remove(http::header::CONTENT_LENGTH);
        }
    }

    pub(crate) fn remove_from(&self, headers: &mut HeaderMap) {
        for (name, _) in HOP_BY_HOP.iter().zip(self.0).filter(|(_, present)| *present) {
            headers.remove(name);
        }
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`, from an
/// answer of the app (requests go through [`crate::request::hygiene::clean_request_headers`]).
/// With `upgrade`, `Connection: upgrade` and `Upgrade` survive (the tunnel needs them).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = HopByHop::default();
    for name in headers.keys() {
        present.note(name);
    }
    if !upgrade && !present.any() {
        return;
    }
    // The pass above already knows which are present: no lookups to find out again.
    present.drop_length_beside_chunked(headers);
    if present.connection() {
        let named: Vec<HeaderName> = connection_tokens(headers)
            // `keep-alive` names a header of the list above, removed below when present.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(upgrade && *n == UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let upgrade_value = if upgrade { headers.get(UPGRADE).cloned() } else { None };
    present.remove_from(headers);
    if let Some(v) = upgrade_value {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, v);
    }
}

/// What the forwarding headers are made from.
pub struct Forwarded<'a> {
    /// The peer's address as a header value (made once per connection).
    pub peer: &'a HeaderValue,
    pub https: bool,
    pub request_id: &'a HeaderValue,
    /// The validated host of the request (`Host` and `X-Forwarded-Host` for the app).
    pub host: &'a HeaderValue,
    /// A trusted peer's `X-Forwarded-For` chain, extended with the peer.
    pub prior_forwarded_for: Option<&'a str>,
}

/// Header fields [`set_forwarding_headers`] adds to a request (`Host` replaces the client's).
pub const FORWARDING_HEADERS_ADDED: usize = 4;

/// Set `Host`, `X-Forwarded-For/-Proto/-Host` and `X-Request-Id` on a request to the app. Client
/// copies of these were removed by the header pass ([`crate::request::hygiene::clean_request_headers`]).
pub fn set_forwarding_headers(headers: &mut HeaderMap, f: &Forwarded<'_>) {
    // Room for the four added below at once: the map hyper parsed is sized to what the
    // client sent, and growing it insert by insert rehashes it more than once.
    headers.reserve(FORWARDING_HEADERS_ADDED);
    headers.insert(HOST, f.host.clone());
    let xff = match f.prior_forwarded_for {
        Some(prior) => {
            let peer = f.peer.to_str().unwrap_or("unknown");
            HeaderValue::from_str(&format!("{prior}, {peer}")).unwrap_or_else(|_| f.peer.clone())
        }
        None => f.peer.clone(),
    };
    headers.insert(&X_FORWARDED_FOR, xff);
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(if f.https { "https" } else { "http" }));
    headers.insert(&X_FORWARDED_HOST, f.host.clone());
    headers.insert(&X_REQUEST_ID, f.request_id.clone());
}

/// A peer's address as a header value (IPv4-mapped IPv6 addresses as IPv4).
pub fn peer_value(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&canonical(peer.ip()).to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn hop_by_hop_note_marks_each_name_at_its_index_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let mut seen = HopByHop::default();
            assert!(seen.note(name), "{name}");
            let mut want = [false; HOP_BY_HOP.len()];
            want[i] = true;
            assert_eq!(seen.0, want, "{name}");
        }
        let mut seen = HopByHop::default();
        for other in ["host", "x-connection", "connections", "tes", "upgrade-insecure-requests", "keep_alive"] {
            assert!(!seen.note(&HeaderName::from_static(other)), "{other}");
        }
        assert!(!seen.any());
    }

    #[test]
    fn untrusted_peer_forwarded_for_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        let peer: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &nets(&["10.0.0.0/8"])), "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn trusted_peer_gives_rightmost_untrusted_hop() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6, 198.51.100.7"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        let peer: SocketAddr = "10.0.0.2:5555".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &nets(&["10.0.0.0/8"])), "198.51.100.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn keep_alive_timeout_is_read_from_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(keep_alive_timeout(&h), None);
        h.insert("keep-alive", HeaderValue::from_static("max=100, Timeout=5"));
        assert_eq!(keep_alive_timeout(&h), Some(5));
        h.insert("keep-alive", HeaderValue::from_static("timeout=soon"));
        assert_eq!(keep_alive_timeout(&h), None);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn content_length_beside_transfer_encoding_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h[http::header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn upgrade_survives_when_tunnelling() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }

    #[test]
    fn request_id_is_kept_when_plain_and_replaced_when_not() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("<script>"));
        assert_eq!(request_id(&h).len(), 32);
    }
}

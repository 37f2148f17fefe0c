//! The request pipeline: match route → authenticate → rate-limit → own endpoint or forward to
//! the app; plus the per-request bookkeeping (request id, HSTS, metrics, access log).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::header::SET_COOKIE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthResult, Authenticator};
use crate::chatkit::ChatKit;
use crate::chatkit_server::ChatKitServers;
use crate::config::{Config, ServerSettings};
use crate::http::body::{BodyEnd, GateBody};
use crate::http::error::GateError;
use crate::obs::audit::Audit;
use crate::request::context::RequestContext;
use crate::transport::conn::{Clock, ConnActivity};

use crate::obs::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::request::hygiene::{self, Cleaned, HeaderRules};
use crate::request::routes::{RouteKind, RouteTable};
use crate::transport::tunnel;
use crate::upstream::pool::take_parts;
use crate::upstream::{self, Forwarded, Upstream, X_FORWARDED_PROTO, X_REQUEST_ID};

pub mod https_only;

/// Identity headers are stripped with this prefix when `[auth]` is absent.
const DEFAULT_PREFIX: &str = "x-auth-request-";

/// Lives as long as a request and its response body: in-flight accounting, then, when the body
/// ends, fails or is dropped, the access-log line and the request metrics (pingora's logging
/// phase). Dropped before any response (the client left while the gate waited): status 499.
struct Observer {
    gateway: Arc<Gateway>,
    conn: Arc<ConnActivity>,
    /// `None`: the plain-HTTP answer (`https_redirect`).
    route: Option<usize>,
    method: Method,
    /// `None` until there is a response.
    status: Option<StatusCode>,
    request_id: HeaderValue,
    client_ip: std::net::IpAddr,
    error: Option<GateError>,
    started: Instant,
    headers_at: Option<Instant>,
    /// When the answer ended (its body finished, failed or was dropped).
    ended: Option<Instant>,
    streamed: bool,
    done: bool,
    /// Refused by admission (path, Host, method, header size): route label `rejected`.
    rejected: bool,
}

impl Observer {
    fn route_name(&self) -> &str {
        match self.route {
            Some(i) => self.gateway.routes.all()[i].name.as_str(),
            None if self.rejected => "rejected",
            None => "https_redirect",
        }
    }

    /// The route's index in `Gateway::route_metrics`.
    fn route_slot(&self) -> usize {
        let n = self.gateway.routes.all().len();
        match self.route {
            Some(i) => i,
            None if self.rejected => n,
            None => n + 1,
        }
    }
}

impl crate::http::body::BodyGuard for Observer {
    fn finished(&mut self, end: BodyEnd) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // One clock read for the durations and for the connection's idle clock (see `Drop`).
        let now = Instant::now();
        self.ended = Some(now);
        let m = &self.gateway.metrics;
        let route = self.route_name();
        let status = self.status.map_or(499, |s| s.as_u16());
        let elapsed = now.saturating_duration_since(self.started);
        let status_label = match &self.status {
            Some(s) => s.as_str(),
            None => "499",
        };
        let slot = &self.gateway.route_metrics[self.route_slot()];
        slot.count(&m.http_requests, route, method_label(&self.method), status, status_label);
        slot.duration.observe(elapsed.as_secs_f64());
        let stream_ms = match (self.streamed, self.headers_at) {
            (true, Some(at)) => {
                let d = now.saturating_duration_since(at);
                slot.observe_stream(&m.stream_duration, route, end, d.as_secs_f64());
                Some(millis(d))
            }
            _ => None,
        };
        let rid = self.request_id.to_str().unwrap_or("-");
        let duration_ms = millis(elapsed);
        let (method, client_ip, outcome) = (&self.method, self.client_ip, end.as_str());
        match &self.error {
            Some(e) if status >= 500 || self.rejected => tracing::warn!(
                method = %method, route, status, duration_ms, stream_ms, outcome,
                request_id = rid, client_ip = %client_ip, error = %e, "request"
            ),
            _ if end == BodyEnd::UpstreamError => tracing::warn!(
                method = %method, route, status, duration_ms, stream_ms, outcome,
                request_id = rid, client_ip = %client_ip, "request"
            ),
            _ if !tracing::enabled!(tracing::Level::INFO) => {}
            // The binary's JSON log: the same line as tracing would write, built directly.
            _ => match crate::obs::logwriter::json_sink() {
                Some(sink) => ACCESS_LINE.with_borrow_mut(|buf| {
                    let mut line = crate::obs::logwriter::JsonLine::start(buf, "INFO", "request");
                    line.str("method", method.as_str()).str("route", route).uint("status", u64::from(status));
                    line.float("duration_ms", duration_ms);
                    if let Some(ms) = stream_ms {
                        line.float("stream_ms", ms);
                    }
                    line.str("outcome", outcome).str("request_id", rid).ip("client_ip", client_ip);
                    line.finish(module_path!());
                    sink.line(buf);
                }),
                None => tracing::info!(
                    method = %method, route, status, duration_ms, stream_ms, outcome,
                    request_id = rid, client_ip = %client_ip, "request"
                ),
            },
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if !self.done {
            crate::http::body::BodyGuard::finished(self, BodyEnd::ClientAborted);
        }
        self.gateway.metrics.http_in_flight.dec();
        if self.conn.request_ended() {
            let clock = &self.gateway.clock;
            self.conn.touch(self.ended.map_or_else(|| clock.now_ms(), |at| clock.ms_at(at)));
        }
    }
}

thread_local! {
    /// The access-log line of this worker thread, reused.
    static ACCESS_LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    /// Request counters and duration histogram per route label (see [`RouteMetrics`]).
    route_metrics: Vec<RouteMetrics>,
    pub(crate) server: ServerSettings,
    routes: RouteTable,
    upstream: Upstream,
    auth: Option<Authenticator>,
    limiter: Option<Arc<RateLimiter>>,
    chatkit: Option<ChatKit>,
    chatkit_servers: ChatKitServers,
    hsts: Option<HeaderValue>,
    /// Set at SIGTERM: HTTP/1 answers carry `Connection: close` from then on.
    draining: AtomicBool,
    header_rules: HeaderRules,
    pub(crate) metrics: Metrics,
    pub(crate) clock: Arc<Clock>,
    /// Upgraded (tunnelled) connections, so shutdown can wait for them.
    pub(crate) tunnels: TaskTracker,
}

impl Gateway {
    pub fn new(
        config: &Config,
        metrics: Metrics,
        auth: Option<Authenticator>,
        limiter: Option<Arc<RateLimiter>>,
        chatkit: Option<ChatKit>,
        routes: RouteTable,
        audit: Audit,
    ) -> anyhow::Result<Gateway> {
        let chatkit_servers = ChatKitServers::new(config, &routes, limiter.as_deref(), metrics.clone(), audit)?;
        // By route index, then `rejected`, then `https_redirect` (see `Observer::route_slot`).
        let route_metrics = routes
            .all()
            .iter()
            .map(|r| r.name.as_str())
            .chain(["rejected", "https_redirect"])
            .map(|name| RouteMetrics {
                duration: metrics.http_request_duration.with_label_values(&[name]),
                requests: std::sync::RwLock::default(),
                stream_complete: std::sync::OnceLock::new(),
            })
            .collect();
        Ok(Gateway {
            route_metrics,
            chatkit_servers,
            server: config.server.clone(),
            routes,
            upstream: Upstream::new(&config.upstream, config.server.workers.unwrap_or(1), metrics.clone())?,
            auth,
            limiter,
            chatkit,
            hsts: config.tls.hsts.clone(),
            draining: AtomicBool::new(false),
            header_rules: HeaderRules {
                identity_prefix: config
                    .auth
                    .as_ref()
                    .map_or(DEFAULT_PREFIX.to_string(), |a| a.header_prefix.to_ascii_lowercase().replace('_', "-")),
                allow_underscore: config.server.allow_underscore_headers,
                upgrades: config.server.upgrades.clone(),
            },
            metrics,
            clock: Arc::new(Clock::new()),
            tunnels: TaskTracker::new(),
        })
    }

    /// Wait (up to `grace`) for work the gate started on its own behalf, e.g. session cancels.
    pub async fn drain_background(&self, grace: std::time::Duration) {
        if let Some(ck) = &self.chatkit {
            ck.drain(grace).await;
        }
    }

    pub fn limiter_ready(&self) -> bool {
        self.limiter.as_deref().is_none_or(RateLimiter::ready)
    }

    /// Shutdown has begun: keep serving, but ask HTTP/1 clients to reconnect elsewhere.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.metrics.draining.set(1);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Serve one request from a client connection. Never fails: errors become answers here.
    pub async fn serve(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
        conn: Arc<ConnActivity>,
    ) -> Result<Response<GateBody>, Infallible> {
        let started = Instant::now();
        self.metrics.http_in_flight.inc();
        conn.request_started(req.version());

        let peer_trusted = upstream::peer_is_trusted(peer, &self.server.trusted_proxies);
        let https = tls
            || (peer_trusted
                && req.headers().get(&X_FORWARDED_PROTO).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")));
        let request_id = upstream::request_id(req.headers());
        let client_ip = upstream::client_ip(peer, req.headers(), &self.server.trusted_proxies);
        let version = req.version();
        let mut observer = Observer {
            gateway: self.clone(),
            conn,
            route: None,
            method: req.method().clone(),
            status: None,
            request_id: request_id.clone(),
            client_ip,
            error: None,
            started,
            headers_at: None,
            ended: None,
            streamed: false,
            done: false,
            rejected: false,
        };

        let mut resp = if !https {
            https_only::plain_http_answer(req.method(), req.uri(), req.headers(), &self.server)
        } else {
            match self.admit(&mut req, peer_trusted) {
                Ok(admitted) => {
                    let route = self.routes.find(req.uri().path()).clone();
                    observer.route = Some(route.index);
                    let ctx = RequestContext { request_id: request_id.clone(), client_ip, route, https };
                    let conn = observer.conn.clone();
                    // The head stays here: the phases borrow it rather than move it down the chain.
                    let (mut parts, body) = req.into_parts();
                    let (resp, error) = self.handle(&mut parts, body, &ctx, peer, admitted, &conn).await;
                    observer.error = error;
                    resp
                }
                Err(e) => {
                    drain_unread(req.into_body());
                    observer.rejected = true;
                    let resp = e.to_response();
                    observer.error = Some(e);
                    resp
                }
            }
        };

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let headers = resp.headers_mut();
        // `X-Request-Id` and `Strict-Transport-Security`, in one growth of the map at most.
        headers.reserve(2);
        // Unique per request: HTTP/2 sends it as a never-indexed literal, not through the HPACK
        // table (an entry per answer would only evict the ones worth keeping).
        let mut request_id = request_id;
        request_id.set_sensitive(true);
        headers.insert(&X_REQUEST_ID, request_id);
        if version <= http::Version::HTTP_11 && self.is_draining() && !switching {
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if https {
            https_only::add_hsts(headers, self.hsts.as_ref());
        }
        observer.status = Some(resp.status());
        observer.headers_at = Some(Instant::now());
        observer.streamed = resp.body().is_streamed();
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(parts, body.with_guard(Box::new(observer))))
    }

    /// The phases, in order. Returns the answer and the error it came from, if any (for the log).
    async fn handle(
        &self,
        parts: &mut http::request::Parts,
        body: Incoming,
        ctx: &RequestContext,
        peer: SocketAddr,
        admitted: Admitted,
        conn: &Arc<ConnActivity>,
    ) -> (Response<GateBody>, Option<GateError>) {
        let auth = match &self.auth {
            Some(a) => match a.authorize(&ctx.route, parts, ctx).await {
                Ok(r) => r,
                Err(e) => return early(e, body),
            },
            None => AuthResult::default(),
        };
        // The gate's own endpoints take POST only: a wrong method is refused before it can use
        // rate-limit quota.
        if matches!(ctx.route.kind, RouteKind::ChatKit(_)) && parts.method != Method::POST {
            return early(GateError::MethodNotAllowed, body);
        }
        let mut limits = match &self.limiter {
            // Checked with the request type's policies, once the body is read (one round trip).
            _ if ctx.route.kind == RouteKind::ChatKitServer => None,
            Some(l) => match l.check(&ctx.route, auth.identity.as_deref(), ctx).await {
                Ok(h) => h,
                Err(e) => return early(e, body),
            },
            None => None,
        };
        let f = Forwarded {
            peer: conn.peer_value(peer),
            https: ctx.https,
            request_id: &ctx.request_id,
            host: &admitted.host,
            prior_forwarded_for: admitted.cleaned.prior_forwarded_for.as_deref(),
        };
        // What goes to the app, if anything; one call to `forward` for every route kind, so a
        // request's state has room for one exchange.
        let (body, upgrade, guard) = match ctx.route.kind {
            RouteKind::ChatKit(endpoint) => {
                let result = match (&self.chatkit, auth.identity.clone()) {
                    // Boxed: a rare path with a large future, kept out of every proxied request's state.
                    (Some(ck), Some(identity)) => {
                        Box::pin(ck.handle(endpoint, take_parts(parts), body, identity, ctx)).await
                    }
                    _ => Err(GateError::Unauthorized),
                };
                return finish(result, auth.set_cookies, limits);
            }
            RouteKind::Proxy => (GateBody::upload(body, self.server.body_timeout), admitted.cleaned.upgrade, None),
            RouteKind::ChatKitServer => {
                let identity = auth.identity.as_deref();
                let admit = self.chatkit_servers.admit(parts, body, identity, ctx, self.limiter.as_deref());
                match Box::pin(admit).await {
                    Ok(a) => {
                        limits = a.limits;
                        // ChatKit requests are POSTs: never an upgrade.
                        (a.body, None, a.guard)
                    }
                    Err((resp, e)) => {
                        let result = match e {
                            Some(e) => Err(e),
                            None => Ok(resp),
                        };
                        return finish(result, auth.set_cookies, limits);
                    }
                }
            }
        };
        let result = self.forward(parts, body, &f, upgrade, conn).await.map(|r| match guard {
            Some(guard) => r.map(|b| b.with_guard(guard)),
            None => r,
        });
        finish(result, auth.set_cookies, limits)
    }

    /// Check what the app will be told before anything else runs: the method, the header block's
    /// size (HTTP/2; hyper bounds HTTP/1.1 itself), the host, and the path, normalised in place
    /// so the route is chosen on exactly what is forwarded; then the header pass.
    fn admit(&self, req: &mut Request<Incoming>, peer_trusted: bool) -> Result<Admitted, GateError> {
        if !hygiene::method_allowed(req.method()) {
            return Err(GateError::MethodNotForwarded);
        }
        if req.version() == http::Version::HTTP_2 && header_list_size(req) > self.server.max_header_bytes {
            return Err(GateError::HeadersTooLarge);
        }
        let host = hygiene::request_host(req.version(), req.uri(), req.headers(), &self.server.hosts)?;
        let normalised = match crate::http::path::normalize_path(req.uri().path()) {
            Ok(std::borrow::Cow::Owned(p)) => Some(p),
            Ok(std::borrow::Cow::Borrowed(_)) => None,
            Err(crate::http::path::UnsafePath) => return Err(GateError::BadRequest("Bad request")),
        };
        if let Some(path) = normalised {
            *req.uri_mut() = hygiene::with_path(req.uri(), &path)?;
        }
        let version = req.version();
        let cleaned = hygiene::clean_request_headers(req.headers_mut(), version, peer_trusted, &self.header_rules);
        Ok(Admitted { host, cleaned })
    }

    /// Forward to the app, streaming both bodies; tunnel an upgrade when the app agrees to the
    /// protocol the client asked for.
    async fn forward(
        &self,
        parts: &mut http::request::Parts,
        body: GateBody,
        f: &Forwarded<'_>,
        asked: Option<HeaderValue>,
        conn: &Arc<ConnActivity>,
    ) -> Result<Response<GateBody>, GateError> {
        let client_upgrade = if asked.is_some() { parts.extensions.remove::<OnUpgrade>() } else { None };
        upstream::set_forwarding_headers(&mut parts.headers, f);
        parts.uri = upstream::origin_form(parts.uri.path_and_query());
        parts.version = http::Version::HTTP_11;
        let mut resp = self.upstream.send(parts, body).await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(asked), Some(client)) = (asked, client_upgrade) else {
                tracing::warn!("app answered 101 to a request that did not ask to upgrade");
                return Err(GateError::UpstreamUnavailable);
            };
            if !hygiene::upgrade_accepted(&asked, resp.headers()) {
                tracing::warn!(
                    asked = asked.to_str().unwrap_or("?"),
                    answered = resp.headers().get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or(""),
                    "app switched to a protocol the client did not ask for; not tunnelled"
                );
                return Err(GateError::UpstreamUnavailable);
            }
            let app = hyper::upgrade::on(&mut resp);
            let idle = self.server.idle_timeout;
            let (clock, conn) = (self.clock.clone(), conn.clone());
            self.tunnels.spawn(async move {
                match tokio::try_join!(client, app) {
                    Ok((client, app)) => tunnel::run(TokioIo::new(client), TokioIo::new(app), idle, &clock).await,
                    Err(e) => tracing::warn!(error = %e, "upgrade failed"),
                }
                // The connection's max_connections slot is released with the tunnel.
                drop(conn);
            });
            let (mut parts, _) = resp.into_parts();
            upstream::remove_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, GateBody::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        upstream::remove_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, GateBody::from_app(body)))
    }
}

/// The answer and the error it came from, with the auth cookies and rate-limit headers.
fn finish(
    result: Result<Response<GateBody>, GateError>,
    set_cookies: Vec<HeaderValue>,
    limits: Option<crate::ratelimit::RateLimitHeaders>,
) -> (Response<GateBody>, Option<GateError>) {
    let (mut resp, error) = match result {
        Ok(r) => (r, None),
        Err(e) => failed(e),
    };
    let headers = resp.headers_mut();
    for cookie in set_cookies {
        headers.append(SET_COOKIE, cookie);
    }
    if let Some(limits) = limits {
        limits.apply(headers);
    }
    (resp, error)
}

/// A route's request metrics, resolved once: its duration histogram, and the request counters
/// met so far by method and status (a label lookup hashes three strings on every request; this
/// is a scan of a few entries under a read lock).
struct RouteMetrics {
    duration: prometheus::Histogram,
    requests: std::sync::RwLock<Vec<(&'static str, u16, prometheus::IntCounter)>>,
    /// Its streams that ended complete, resolved at the first (so the series appears only then).
    stream_complete: std::sync::OnceLock<prometheus::Histogram>,
}

/// Request counters kept per route; further method/status pairs are looked up each time.
const ROUTE_COUNTERS_KEPT: usize = 32;

impl RouteMetrics {
    /// Observe a streamed body's duration in `chatkit_gate_stream_duration_seconds`.
    fn observe_stream(&self, vec: &prometheus::HistogramVec, route: &str, end: BodyEnd, secs: f64) {
        if end == BodyEnd::Complete {
            self.stream_complete.get_or_init(|| vec.with_label_values(&[route, end.as_str()])).observe(secs);
        } else {
            vec.with_label_values(&[route, end.as_str()]).observe(secs);
        }
    }

    /// Count one answered request in `chatkit_gate_http_requests_total`.
    fn count(&self, vec: &prometheus::IntCounterVec, route: &str, method: &'static str, status: u16, label: &str) {
        if let Ok(kept) = self.requests.read()
            && let Some((_, _, counter)) = kept.iter().find(|(m, s, _)| *s == status && *m == method)
        {
            counter.inc();
            return;
        }
        let counter = vec.with_label_values(&[route, method, label]);
        counter.inc();
        if let Ok(mut kept) = self.requests.write()
            && kept.len() < ROUTE_COUNTERS_KEPT
            && !kept.iter().any(|(m, s, _)| *s == status && *m == method)
        {
            kept.push((method, status, counter));
        }
    }
}

/// A duration in milliseconds, to the microsecond (as `as_micros() as f64 / 1000.0`, without the
/// 128-bit conversion).
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(d.subsec_micros()))) as f64 / 1000.0
}

/// What admission established for a request that may go on.
struct Admitted {
    host: HeaderValue,
    cleaned: Cleaned,
}

/// HTTP/2 header list size as RFC 9113 §6.5.2 counts it (name + value + 32 per field).
fn header_list_size(req: &Request<Incoming>) -> usize {
    let pseudo = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + req.method().as_str().len() + 96;
    req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum::<usize>() + pseudo
}

/// Largest request body read and discarded after an early answer, and for how long.
const DRAIN_MAX_BYTES: usize = 16 << 20;
const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// After an early answer (401, 429, 400…) the client may still be sending its body. Reading
/// and discarding it, bounded, lets the answer arrive: otherwise HTTP/2 resets the stream and
/// HTTP/1.1 closes on unread data, and clients report a reset instead of the answer.
fn drain_unread(body: Incoming) {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut seen = 0usize;
        let deadline = tokio::time::sleep(DRAIN_MAX_TIME);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(f)) => {
                        seen += f.data_ref().map_or(0, bytes::Bytes::len);
                        if seen > DRAIN_MAX_BYTES {
                            return;
                        }
                    }
                    _ => return,
                },
                () = &mut deadline => return,
            }
        }
    });
}

fn early(e: GateError, body: Incoming) -> (Response<GateBody>, Option<GateError>) {
    drain_unread(body);
    failed(e)
}

fn failed(e: GateError) -> (Response<GateBody>, Option<GateError>) {
    (e.to_response(), Some(e))
}

/// Bounded method label: the standard methods by name, anything else as `OTHER`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

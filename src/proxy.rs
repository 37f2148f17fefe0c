//! The request pipeline: match route → authenticate → rate-limit → own endpoint or forward to
//! the app; plus the per-request bookkeeping (request id, HSTS, metrics, access log).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use http::header::SET_COOKIE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthResult, Authenticator, strip_prefixed};
use crate::body::GateBody;
use crate::chatkit::ChatKit;
use crate::config::{Config, ServerSettings};
use crate::context::RequestContext;
use crate::error::GateError;
use crate::https;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::routes::{RouteKind, RouteTable};
use crate::upstream::{self, Forwarded, Upstream, X_FORWARDED_PROTO, X_REQUEST_ID};

/// Identity headers are stripped with this prefix when `[auth]` is absent.
const DEFAULT_PREFIX: &str = "x-auth-request-";

/// Per-connection activity, for the idle timeout: requests in flight (streams included) and
/// when the last one finished.
#[derive(Debug, Default)]
pub struct ConnActivity {
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl ConnActivity {
    /// Milliseconds idle at `now_ms`, or `None` while a request is in flight.
    pub fn idle_ms(&self, now_ms: u64) -> Option<u64> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Acquire)))
    }

    pub fn touch(&self, now_ms: u64) {
        self.idle_since_ms.store(now_ms, Ordering::Release);
    }
}

/// Lives as long as a response (its body included): in-flight accounting.
struct InFlight {
    metrics: Metrics,
    conn: Arc<ConnActivity>,
    clock: Arc<Clock>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.http_in_flight.dec();
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.touch(self.clock.now_ms());
        }
    }
}

/// A monotonic millisecond clock shared by connections.
#[derive(Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub(crate) server: ServerSettings,
    routes: RouteTable,
    upstream: Upstream,
    auth: Option<Authenticator>,
    limiter: Option<Arc<RateLimiter>>,
    chatkit: Option<ChatKit>,
    hsts: Option<HeaderValue>,
    /// Set at SIGTERM: HTTP/1 answers carry `Connection: close` from then on.
    draining: AtomicBool,
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
    ) -> anyhow::Result<Gateway> {
        Ok(Gateway {
            server: config.server.clone(),
            routes,
            upstream: Upstream::new(&config.upstream, metrics.clone())?,
            auth,
            limiter,
            chatkit,
            hsts: config.tls.hsts.clone(),
            draining: AtomicBool::new(false),
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
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
        conn: Arc<ConnActivity>,
    ) -> Result<Response<GateBody>, Infallible> {
        let started = Instant::now();
        self.metrics.http_in_flight.inc();
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight { metrics: self.metrics.clone(), conn, clock: self.clock.clone() };

        let peer_trusted = upstream::peer_is_trusted(peer, &self.server.trusted_proxies);
        let https = tls
            || (peer_trusted
                && req.headers().get(&X_FORWARDED_PROTO).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")));
        let request_id = upstream::request_id(req.headers());
        let client_ip = upstream::client_ip(peer, req.headers(), &self.server.trusted_proxies);
        let method = req.method().clone();
        let version = req.version();

        let (route_name, mut resp, error) = if !https {
            let resp = https::plain_http_answer(req.method(), req.uri(), req.headers(), &self.server);
            ("https_redirect", resp, None)
        } else {
            let route = self.routes.find(req.uri().path()).clone();
            let index = route.index;
            let ctx = RequestContext { request_id: request_id.clone(), client_ip, route, https };
            let (resp, error) = self.handle(req, &ctx, peer, peer_trusted).await;
            (self.routes.all()[index].name.as_str(), resp, error)
        };

        let status = resp.status();
        let headers = resp.headers_mut();
        headers.insert(&X_REQUEST_ID, request_id.clone());
        if version <= http::Version::HTTP_11 && self.is_draining() && status != StatusCode::SWITCHING_PROTOCOLS {
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if https {
            https::add_hsts(headers, self.hsts.as_ref());
        }
        let elapsed = started.elapsed();
        self.metrics.http_requests.with_label_values(&[route_name, method_label(&method), status.as_str()]).inc();
        self.metrics.http_request_duration.with_label_values(&[route_name]).observe(elapsed.as_secs_f64());
        let rid = request_id.to_str().unwrap_or("-");
        match error {
            Some(e) if status.is_server_error() => tracing::warn!(
                method = %method, route = route_name, status = status.as_u16(), duration_ms = elapsed.as_micros() as f64 / 1000.0,
                request_id = rid, client_ip = %client_ip, error = %e, "request"
            ),
            _ => tracing::info!(
                method = %method, route = route_name, status = status.as_u16(), duration_ms = elapsed.as_micros() as f64 / 1000.0,
                request_id = rid, client_ip = %client_ip, "request"
            ),
        }
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(parts, body.with_guard(Box::new(guard))))
    }

    /// The phases, in order. Returns the answer and the error it came from, if any (for the log).
    async fn handle(
        &self,
        req: Request<Incoming>,
        ctx: &RequestContext,
        peer: SocketAddr,
        peer_trusted: bool,
    ) -> (Response<GateBody>, Option<GateError>) {
        let (mut parts, body) = req.into_parts();
        let auth = match &self.auth {
            Some(a) => match a.authorize(&ctx.route, &mut parts, ctx).await {
                Ok(r) => r,
                Err(e) => return failed(e),
            },
            None => {
                strip_prefixed(&mut parts.headers, DEFAULT_PREFIX);
                AuthResult::default()
            }
        };
        let limits = match &self.limiter {
            Some(l) => match l.check(&ctx.route, auth.identity.as_deref(), ctx).await {
                Ok(h) => h,
                Err(e) => return failed(e),
            },
            None => None,
        };
        let result = match ctx.route.kind {
            RouteKind::ChatKit(endpoint) => match (&self.chatkit, auth.identity.clone()) {
                // Boxed: a rare path with a large future, kept out of every proxied request's state.
                (Some(ck), Some(identity)) => Box::pin(ck.handle(endpoint, parts, body, identity, ctx)).await,
                _ => Err(GateError::Unauthorized),
            },
            RouteKind::Proxy => {
                let f = Forwarded { peer, peer_trusted, https: ctx.https, request_id: &ctx.request_id };
                self.forward(parts, body, &f).await
            }
        };
        let (mut resp, error) = match result {
            Ok(r) => (r, None),
            Err(e) => failed(e),
        };
        let headers = resp.headers_mut();
        for cookie in auth.set_cookies {
            headers.append(SET_COOKIE, cookie);
        }
        if let Some(limits) = limits {
            limits.apply(headers);
        }
        (resp, error)
    }

    /// Forward to the app, streaming both bodies; tunnel an upgrade when the app agrees.
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        f: &Forwarded<'_>,
    ) -> Result<Response<GateBody>, GateError> {
        let upgrade = upstream::wants_upgrade(&parts.headers, parts.version);
        let client_upgrade = if upgrade { parts.extensions.remove::<OnUpgrade>() } else { None };
        upstream::remove_hop_by_hop(&mut parts.headers, upgrade);
        upstream::set_forwarding_headers(&mut parts.headers, &parts.uri, f);
        parts.uri = self.upstream.uri_for(parts.uri.path_and_query())?;
        parts.version = http::Version::HTTP_11;
        let req = Request::from_parts(parts, GateBody::upload(body, self.server.body_timeout));

        let mut resp = self.upstream.send(req).await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client), true) = (client_upgrade, upgrade) else {
                tracing::warn!("app answered 101 to a request that did not ask to upgrade");
                return Err(GateError::UpstreamUnavailable);
            };
            let app = hyper::upgrade::on(&mut resp);
            self.tunnels.spawn(async move {
                match tokio::try_join!(client, app) {
                    Ok((client, app)) => {
                        let mut client = TokioIo::new(client);
                        let mut app = TokioIo::new(app);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
                            tracing::debug!(error = %e, "tunnel closed with error");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "upgrade failed"),
                }
            });
            let (mut parts, _) = resp.into_parts();
            upstream::remove_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, GateBody::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        upstream::remove_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, GateBody::incoming(body)))
    }
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

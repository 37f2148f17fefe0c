//! The request pipeline, phase by phase: admit (`admit.rs`) → match the route → authenticate →
//! rate-limit → the gate's own endpoint or forward to the app (`forward.rs`) → observe
//! (`observe.rs`); errors become answers in `answer.rs`. [`Gateway`] holds what every request
//! shares.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthResult, Authenticator};
use crate::chatkit::ChatKit;
use crate::chatkit_server::ChatKitServers;
use crate::config::{Config, ServerSettings};
use crate::http::body::GateBody;
use crate::http::error::GateError;
use crate::http::forwarded::{self, ForwardingHeaders};
use crate::http::headers::{X_FORWARDED_PROTO, X_REQUEST_ID};
use crate::obs::audit::Audit;
use crate::obs::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::request::context::RequestContext;
use crate::request::hygiene::HeaderRules;
use crate::request::routes::{RouteKind, RouteTable};
use crate::transport::conn::{Clock, ConnActivity};
use crate::upstream::Upstream;
use crate::upstream::pool::take_parts;

mod admit;
mod answer;
mod forward;
pub mod https_only;
mod observe;

use crate::pipeline::admit::{Cleared, admit};
use crate::pipeline::answer::{drain_unread, early, finish};
use crate::pipeline::forward::Forwarder;
use crate::pipeline::observe::{Observer, Recorder};

/// Identity headers are stripped with this prefix when `[auth]` is absent.
const DEFAULT_PREFIX: &str = "x-auth-request-";

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    /// Per-route request metrics and the access log (the observe phase).
    recorder: Arc<Recorder>,
    pub(crate) server: ServerSettings,
    routes: RouteTable,
    forwarder: Forwarder,
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
        let clock = Arc::new(Clock::new());
        let recorder = Arc::new(Recorder::new(&routes, metrics.clone(), clock.clone()));
        let forwarder = Forwarder {
            upstream: Upstream::new(&config.upstream, config.server.workers.unwrap_or(1), metrics.clone())?,
            tunnels: TaskTracker::new(),
            clock: clock.clone(),
            idle_timeout: config.server.idle_timeout,
        };
        Ok(Gateway {
            recorder,
            chatkit_servers,
            server: config.server.clone(),
            routes,
            forwarder,
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
            clock,
        })
    }

    /// Wait (up to `grace`) for work the gate started on its own behalf, e.g. session cancels.
    pub async fn drain_background(&self, grace: std::time::Duration) {
        if let Some(ck) = &self.chatkit {
            ck.drain(grace).await;
        }
    }

    /// Upgraded (tunnelled) connections, so shutdown can wait for them.
    pub(crate) fn tunnels(&self) -> &TaskTracker {
        &self.forwarder.tunnels
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

        let peer_trusted = forwarded::peer_is_trusted(peer, &self.server.trusted_proxies);
        let https = tls
            || (peer_trusted
                && req.headers().get(&X_FORWARDED_PROTO).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")));
        let request_id = forwarded::request_id(req.headers());
        let client_ip = forwarded::client_ip(peer, req.headers(), &self.server.trusted_proxies);
        let version = req.version();
        let mut observer =
            Observer::new(self.recorder.clone(), conn, req.method().clone(), request_id.clone(), client_ip, started);

        let mut resp = if !https {
            https_only::plain_http_answer(req.method(), req.uri(), req.headers(), &self.server)
        } else {
            match admit(&mut req, peer_trusted, &self.server, &self.header_rules) {
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
        admitted: Cleared,
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
        let f = ForwardingHeaders {
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
        let result = self.forwarder.forward(parts, body, &f, upgrade, conn).await.map(|r| match guard {
            Some(guard) => r.map(|b| b.with_guard(guard)),
            None => r,
        });
        finish(result, auth.set_cookies, limits)
    }
}

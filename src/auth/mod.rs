//! Forward authentication: asks the introspection URL who a request's cookies belong to, caches
//! the answer, hands the identity to the app in headers, and decides 401/302/503 otherwise.
//!
//! Owns: the introspection call (`introspect`, `credentials`, `breaker`, `cookies`), the
//! decision cache (`cache`) and what a decision is (`decision`), the identity headers to the app
//! (`identity`), and the answers for signed-out (`login`) and unavailable cases.

mod breaker;
mod cache;
mod cookies;
mod credentials;
mod decision;
mod identity;
mod introspect;
mod login;

pub use crate::auth::identity::MAX_IDENTITY_VALUE_BYTES;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, Request};
use http_body_util::Empty;
use prometheus::IntCounter;

use self::cache::{DecisionCache, Flight, Lookup, Store};
use self::credentials::{CredentialRules, Credentials};
use self::decision::{CallResult, Decision, DecisionResult, DecisionSource, Signed};
use self::introspect::{Answer, Failure, IntrospectionMetrics, Introspector, OriginalRequest};
use crate::auth::identity::{IdentityHeaders, header_value, sanitized, scalar_text};
use crate::auth::login::{is_navigation, percent_encode, return_path};
use crate::config::{AuthSettings, RouteAuth, Unauthenticated};
use crate::http::error::GateError;
use crate::obs::audit::{Audit, AuditEvent, AuditKind};
use crate::obs::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::request::context::{Identity, RequestContext};
use crate::request::routes::{Route, RouteKind};

/// Where `auth.login_url` wants the way back (`/api/auth/signin?callbackUrl={rd}`); without it
/// the gate appends `rd=`.
pub const RD_PLACEHOLDER: &str = "{rd}";

/// Longest TTL honoured (keeps `Instant` arithmetic far from overflow).
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

/// What authentication decided for a request that may go on.
#[derive(Debug, Default)]
pub struct AuthResult {
    /// `None` on public routes and for signed-out requests on optional routes.
    pub identity: Option<Arc<Identity>>,
    /// `Set-Cookie` values from the introspection answer, for the client.
    pub set_cookies: Vec<HeaderValue>,
}

struct Inner {
    login_url: String,
    /// `login_url` without its query: never redirected to itself.
    login_path: String,
    cache_ttl: Duration,
    negative_cache_ttl: Duration,
    stale_if_error: Duration,
    respect_cache_control: bool,
    timeout: Duration,
    user_id: String,
    user_name: Option<String>,
    user_email: Option<String>,
    headers: IdentityHeaders,
    rules: CredentialRules,
    introspector: Introspector,
    cache: DecisionCache<Decision, CallResult>,
    /// `auth_decisions` children resolved once (no label lookup per request), by verdict × source.
    decisions: Vec<IntCounter>,
    audit: Audit,
    /// A 2xx without a user id is signed out; say so once, loudly, in case it is a wrong pointer.
    warned_no_user: AtomicBool,
    /// `auth.introspection_rate_limit`: the limiter and a route naming just that policy.
    introspection_limit: Option<(Arc<RateLimiter>, Route)>,
    rejected_rate_limited: IntCounter,
    metrics: Metrics,
}

/// Why a decision could not be made.
enum Refusal {
    Failed(Failure),
    /// `auth.introspection_rate_limit` refused the call this cache miss would make.
    Limited(GateError),
}

/// The authentication phase. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Host and path only: a URL's userinfo may hold a password.
        let url = self.inner.introspector.url();
        f.debug_struct("Authenticator")
            .field("introspection_host", &url.host())
            .field("introspection_path", &url.path())
            .finish_non_exhaustive()
    }
}

fn header_name(s: &str) -> anyhow::Result<HeaderName> {
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| anyhow::anyhow!("auth.header_prefix: invalid header name {s:?}"))
}

fn pointer(p: &Option<String>) -> Option<String> {
    p.as_ref().filter(|p| !p.is_empty()).cloned()
}

impl Authenticator {
    /// `limiter` is needed when `auth.introspection_rate_limit` names a policy.
    pub fn new(
        settings: &AuthSettings,
        metrics: Metrics,
        audit: Audit,
        limiter: Option<Arc<RateLimiter>>,
    ) -> anyhow::Result<Self> {
        let prefix = settings.header_prefix.clone();
        let mut claims = Vec::new();
        for (name, ptr) in &settings.claims {
            if !ptr.is_empty() {
                claims.push((name.clone(), ptr.clone(), header_name(&format!("{prefix}{name}"))?));
            }
        }
        let headers = IdentityHeaders {
            user: header_name(&format!("{prefix}user"))?,
            email: header_name(&format!("{prefix}email"))?,
            name: header_name(&format!("{prefix}name"))?,
            claims,
        };
        let login_path = settings.login_url.split(['?', '#']).next().unwrap_or("/").to_string();
        HeaderValue::from_str(&settings.login_url)
            .map_err(|_| anyhow::anyhow!("auth.login_url: not usable in a Location header"))?;
        let introspector = Introspector::new(
            settings,
            IntrospectionMetrics {
                duration: metrics.auth_introspection_duration.clone(),
                retries: metrics.upstream_retries.with_label_values(&["introspection"]),
                in_flight: metrics.auth_introspection_in_flight.clone(),
                breaker_open: metrics.auth_breaker_open.clone(),
                rejected_breaker: metrics.auth_introspection_rejected.with_label_values(&["breaker_open"]),
                rejected_in_flight: metrics.auth_introspection_rejected.with_label_values(&["in_flight_limit"]),
            },
        )?;
        let introspection_limit = match (&settings.introspection_rate_limit, limiter) {
            (None, _) => None,
            (Some(policy), Some(limiter)) => Some((
                limiter,
                Route {
                    index: usize::MAX,
                    name: "introspection".into(),
                    path: String::new(),
                    auth: RouteAuth::Public,
                    unauthenticated: Unauthenticated::Json,
                    rate_limit: vec![policy.clone()],
                    kind: RouteKind::Proxy,
                },
            )),
            (Some(_), None) => anyhow::bail!("auth.introspection_rate_limit: needs a [rate_limit] section"),
        };
        let decisions = DecisionResult::ALL
            .iter()
            .flat_map(|v| {
                DecisionSource::ALL.map(|s| metrics.auth_decisions.with_label_values(&[v.label(), s.label()]))
            })
            .collect();
        let inner = Inner {
            login_url: settings.login_url.clone(),
            login_path,
            cache_ttl: settings.cache_ttl.min(MAX_TTL),
            negative_cache_ttl: settings.negative_cache_ttl.min(MAX_TTL),
            stale_if_error: settings.stale_if_error.min(MAX_TTL),
            respect_cache_control: settings.respect_cache_control,
            timeout: settings.timeout,
            user_id: settings.user_id.clone(),
            user_name: pointer(&settings.user_name),
            user_email: pointer(&settings.user_email),
            headers,
            rules: CredentialRules {
                cookies: settings.cookies.clone(),
                forward_headers: settings.forward_headers.clone(),
                salt: rand::random(),
            },
            introspector,
            cache: DecisionCache::new(settings.cache_max_entries, metrics.auth_cache_entries.clone()),
            decisions,
            audit,
            warned_no_user: AtomicBool::new(false),
            introspection_limit,
            rejected_rate_limited: metrics.auth_introspection_rejected.with_label_values(&["rate_limited"]),
            metrics,
        };
        Ok(Authenticator { inner: Arc::new(inner) })
    }

    /// On non-public routes, decide (client copies of identity headers, in every spelling, were
    /// removed by the header pass, [`crate::request::hygiene::clean_request_headers`]). `Err` is the answer to send
    /// instead of proxying: 401 or 302 to the login page (signed out on a required route), or
    /// 503 (introspection unavailable and no usable cached identity, on any non-public route).
    pub async fn authorize(
        &self,
        route: &Route,
        parts: &mut http::request::Parts,
        ctx: &RequestContext,
    ) -> Result<AuthResult, GateError> {
        let inner = &self.inner;
        if route.auth == RouteAuth::Public {
            return Ok(AuthResult::default());
        }
        let (decision, set_cookies, source) = match self.decide(route, parts, ctx).await {
            Ok(decided) => decided,
            Err(Refusal::Limited(e)) => return Err(e),
            Err(Refusal::Failed(failure)) => {
                inner.count(DecisionResult::Error, DecisionSource::Introspection);
                inner.audit.log(
                    AuditEvent::new(AuditKind::AuthUnavailable, ctx.request_id(), ctx.client_ip)
                        .reason(failure.reason())
                        .route(&route.name),
                );
                return Err(GateError::AuthUnavailable);
            }
        };
        match decision {
            Decision::SignedIn(signed) => {
                inner.count(DecisionResult::Allow, source);
                // One growth of the map at most for the identity and the forwarding headers
                // added next (set_forwarding_headers' own reserve is then a no-op).
                parts.headers.reserve(signed.headers.len() + crate::http::forwarded::FORWARDING_HEADERS_ADDED);
                for (name, value) in &signed.headers {
                    parts.headers.insert(name.clone(), value.clone());
                }
                Ok(AuthResult { identity: Some(signed.identity.clone()), set_cookies })
            }
            Decision::SignedOut => {
                inner.count(DecisionResult::Deny, source);
                if route.auth == RouteAuth::Optional {
                    return Ok(AuthResult::default());
                }
                let reason = if source == DecisionSource::None { "no credentials" } else { "signed out" };
                inner.audit.log(
                    AuditEvent::new(AuditKind::AuthDenied, ctx.request_id(), ctx.client_ip)
                        .reason(reason)
                        .route(&route.name),
                );
                Err(inner.unauthenticated(route, parts))
            }
        }
    }

    /// The decision for a request: cached (fresh, or stale while one background call refreshes
    /// it), or from a (shared) introspection call, or a stale identity when that call fails.
    async fn decide(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        ctx: &RequestContext,
    ) -> Result<(Decision, Vec<HeaderValue>, DecisionSource), Refusal> {
        let inner = &self.inner;
        // Borrowed from the request: a cached decision needs only the key.
        let Some(found) = inner.rules.find(&parts.headers, &route.name) else {
            return Ok((Decision::SignedOut, Vec::new(), DecisionSource::None));
        };
        let mut rx = match inner.cache.lookup(found.key, Instant::now()) {
            Lookup::Fresh(decision) => return Ok((decision, Vec::new(), DecisionSource::Cache)),
            Lookup::Pending { lead, stale: Some(Decision::SignedIn(signed)), .. } => {
                // Stale-while-revalidate: answer now; one call (single-flight per credentials)
                // refreshes the entry. A hung endpoint then costs this user nothing.
                if let Some(flight) = lead {
                    let creds = found.into_owned();
                    let req = inner.introspector.request(&creds, &OriginalRequest::of(parts, ctx));
                    tokio::spawn(self.inner.clone().introspect(flight, req, creds));
                }
                return Ok((Decision::SignedIn(signed), Vec::new(), DecisionSource::Stale));
            }
            // A stale signed-out decision is never served: it has no stale window.
            Lookup::Pending { rx, lead, .. } => {
                if let Some(flight) = lead {
                    if let Some((limiter, limit_route)) = &inner.introspection_limit
                        && let Err(e) = limiter.check(limit_route, None, ctx).await
                    {
                        inner.rejected_rate_limited.inc();
                        // Dropping the flight frees the key; anyone who joined it sees it abandoned.
                        drop(flight);
                        return Err(Refusal::Limited(e));
                    }
                    // Spawned: the call finishes (and feeds the cache and the other waiters) even
                    // when this request is abandoned by its client.
                    let creds = found.into_owned();
                    let req = inner.introspector.request(&creds, &OriginalRequest::of(parts, ctx));
                    tokio::spawn(self.inner.clone().introspect(flight, req, creds));
                }
                rx
            }
        };
        // The call is bounded by `timeout`; the margin only guards against a lost task.
        let waited = tokio::time::timeout(inner.timeout + Duration::from_secs(1), rx.wait_for(Option::is_some)).await;
        let outcome = match waited {
            Ok(Ok(outcome)) => outcome.clone(),
            _ => None,
        };
        match outcome {
            Some(CallResult::Decided(decision, cookies)) => {
                Ok((decision, cookies.to_vec(), DecisionSource::Introspection))
            }
            Some(CallResult::Failed(failure)) => Err(Refusal::Failed(failure)),
            None => Err(Refusal::Failed(Failure::Request("introspection call abandoned".into()))),
        }
    }
}

impl Inner {
    fn count(&self, verdict: DecisionResult, source: DecisionSource) {
        let i = verdict as usize * DecisionSource::ALL.len() + source as usize;
        if let Some(counter) = self.decisions.get(i) {
            counter.inc();
        }
    }

    /// One introspection call for a flight: ask, read the answer, update the cache, wake waiters.
    async fn introspect(
        self: Arc<Self>,
        flight: Flight<Decision, CallResult>,
        req: Request<Empty<Bytes>>,
        creds: Credentials,
    ) {
        let (store, outcome) = match self.introspector.call(req).await.and_then(|a| self.read(&a).map(|d| (a, d))) {
            Ok((answer, decision)) => {
                let (ttl, grace, cookies) = match &decision {
                    Decision::SignedIn(_) => (self.cache_ttl, self.stale_if_error, self.relayed(&answer, &creds)),
                    Decision::SignedOut => (self.negative_cache_ttl, Duration::ZERO, Vec::new()),
                };
                let limit = if self.respect_cache_control { answer.cache_limit() } else { None };
                let ttl = limit.map_or(ttl, |l| l.min(ttl));
                let now = Instant::now();
                let store = if ttl.is_zero() {
                    // Not cacheable: also forget an older decision, so it can't be served stale.
                    Store::Remove
                } else {
                    // A rotated credential (sliding session) is what the browser sends next: the
                    // same decision under its key keeps that request a cache hit.
                    if let Some(next) = cookies::rotated(creds.cookie.as_ref(), &cookies) {
                        let key = self.rules.key(&creds.route, Some(&next), &creds.headers);
                        self.cache.insert(key, decision.clone(), now + ttl, now + ttl + grace);
                    }
                    Store::Insert { value: decision.clone(), fresh_until: now + ttl, stale_until: now + ttl + grace }
                };
                (store, CallResult::Decided(decision, cookies.into()))
            }
            Err(failure) => {
                if let Some(kind) = failure.kind() {
                    self.metrics.auth_introspection_errors.with_label_values(&[kind]).inc();
                }
                match &failure {
                    Failure::Invalid(_) => tracing::error!(error = %failure, "introspection answer unusable"),
                    // Logged (and counted) where the breaker and the cap decide, not per request.
                    Failure::CircuitOpen | Failure::Overloaded => {
                        tracing::debug!(error = %failure, "introspection skipped")
                    }
                    _ => tracing::warn!(error = %failure, "authentication service unavailable"),
                }
                (Store::Keep, CallResult::Failed(failure))
            }
        };
        flight.finish(store, outcome);
    }

    /// The answer's `Set-Cookie` values the browser may get (see [`cookies::relayable`]); the
    /// others are dropped, and logged by name only at debug level.
    fn relayed(&self, answer: &Answer, creds: &Credentials) -> Vec<HeaderValue> {
        let mut out = answer.set_cookies();
        out.retain(|v| {
            let keep = cookies::relayable(&self.rules.cookies, creds.cookie.as_ref(), v);
            if !keep {
                tracing::debug!(
                    cookie = %String::from_utf8_lossy(cookies::pair_name(v.as_bytes())),
                    "introspection Set-Cookie not relayed: that cookie was not forwarded"
                );
            }
            keep
        });
        out
    }

    /// The decision an answer carries (2xx with a user id = signed in; 401/403 = signed out).
    fn read(&self, answer: &Answer) -> Result<Decision, Failure> {
        if !answer.signed_in() {
            return Ok(Decision::SignedOut);
        }
        let body: serde_json::Value = if answer.body.trim_ascii().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&answer.body).map_err(|e| Failure::Invalid(format!("2xx body is not JSON: {e}")))?
        };
        let id = match body.pointer(&self.user_id) {
            // NextAuth-style endpoints answer 200 `{}` or `null` when signed out.
            None | Some(serde_json::Value::Null) => {
                if !self.warned_no_user.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        pointer = %self.user_id,
                        "introspection answered 2xx without a user id: treated as signed out \
                         (if signed-in users get this too, check auth.user_id); logged once"
                    );
                }
                return Ok(Decision::SignedOut);
            }
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => {
                return Err(Failure::Invalid(format!("{} is not a non-empty string or number", self.user_id)));
            }
        };
        if id.len() > MAX_IDENTITY_VALUE_BYTES || id.chars().any(char::is_control) {
            return Err(Failure::Invalid(format!(
                "{} has control characters or is longer than {MAX_IDENTITY_VALUE_BYTES} bytes",
                self.user_id
            )));
        }
        let text = |p: &Option<String>| p.as_ref().and_then(|p| body.pointer(p)).and_then(scalar_text);
        let name = text(&self.user_name).and_then(|s| sanitized(&s));
        let email = text(&self.user_email).and_then(|s| sanitized(&s));
        let mut headers = Vec::with_capacity(3 + self.headers.claims.len());
        let mut claims = Vec::with_capacity(self.headers.claims.len());
        headers.extend(header_value(&id).map(|v| (self.headers.user.clone(), v)));
        headers.extend(email.as_deref().and_then(header_value).map(|v| (self.headers.email.clone(), v)));
        headers.extend(name.as_deref().and_then(header_value).map(|v| (self.headers.name.clone(), v)));
        for (claim, ptr, header) in &self.headers.claims {
            let Some(value) = body.pointer(ptr).filter(|v| v.is_string() || v.is_number() || v.is_boolean()) else {
                continue;
            };
            if let Some(v) = scalar_text(value).as_deref().and_then(header_value) {
                headers.push((header.clone(), v));
            }
            claims.push((claim.clone(), value.clone()));
        }
        let identity = Arc::new(Identity { id, name, email, claims });
        Ok(Decision::SignedIn(Arc::new(Signed { identity, headers })))
    }

    /// The answer for a signed-out request on a required route: 401, or 302 to the login page.
    fn unauthenticated(&self, route: &Route, parts: &http::request::Parts) -> GateError {
        let on_login_page = parts.uri.path().trim_end_matches('/') == self.login_path.trim_end_matches('/');
        let redirect = match route.unauthenticated {
            Unauthenticated::Json => false,
            Unauthenticated::Redirect => true,
            Unauthenticated::Auto => is_navigation(parts),
        };
        if !redirect || on_login_page {
            return GateError::Unauthorized;
        }
        let rd = percent_encode(return_path(parts.uri.path_and_query().map_or("/", |pq| pq.as_str())));
        let location = if self.login_url.contains(RD_PLACEHOLDER) {
            self.login_url.replacen(RD_PLACEHOLDER, &rd, 1)
        } else {
            let sep = if self.login_url.contains('?') { '&' } else { '?' };
            format!("{}{sep}rd={rd}", self.login_url)
        };
        match HeaderValue::from_str(&location) {
            Ok(location) => GateError::LoginRedirect(location),
            Err(_) => GateError::Unauthorized,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn decision_counters_are_indexed_by_declaration_order() {
        assert!(DecisionSource::ALL.iter().enumerate().all(|(i, s)| *s as usize == i));
        assert!(DecisionResult::ALL.iter().enumerate().all(|(i, v)| *v as usize == i));
    }
}

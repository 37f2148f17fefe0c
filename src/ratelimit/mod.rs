//! Rate limits: named policies per route, all of a request's policies checked in one store round
//! trip (a Lua script on Redis, or the in-process store), a local deny cache, `on_store_error`,
//! and the 429 answer with `Retry-After` and the `RateLimit-Policy` / `RateLimit` headers.
//!
//! Keys are `<key_prefix>:rl:{<subject>}:<policy>:<sw|gcra>`, the subject being `u:<user id>`
//! (or `uh:<sha-256>` for ids that are long or hold braces), `ip:<IPv4>` or `ip:<IPv6 /64>`.
//! `key = "user"` on a request without a signed-in user falls back to the client IP, so
//! anonymous traffic on public and optional routes is still limited.

mod cache;
mod local;
mod remote;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::config::{Algorithm, LimitKey, OnStoreError, PolicySettings, RateLimitSettings, RateLimitStore};
use crate::http::error::GateError;
use crate::obs::audit::{Audit, AuditEvent, AuditKind};
use crate::obs::metrics::Metrics;
use crate::request::context::Identity;
use crate::request::context::RequestContext;
use crate::request::routes::Route;
use crate::transport::redis::{RedisStore, StoreError};

use cache::DenyCache;
use local::LocalStore;
use remote::RedisLimiter;

/// `RateLimit-Policy` (IETF httpapi draft): the quota of each policy of the route.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (IETF httpapi draft): what is left of each quota for this client.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// User ids longer than this (or holding braces or control characters) are hashed in keys.
const MAX_RAW_ID: usize = 128;

/// `RateLimit-Policy` and `RateLimit` values for a response of a limited route.
#[derive(Debug, Clone)]
pub struct RateLimitHeaders {
    pub policy: HeaderValue,
    pub limit: HeaderValue,
}

impl RateLimitHeaders {
    /// Add both headers to a response's headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        headers.insert(RATELIMIT, self.limit.clone());
    }
}

/// How a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algo {
    /// Exact sliding log: at most `limit` admissions in any `window_us`.
    SlidingWindow { limit: u32, window_us: i64 },
    /// GCRA: a bucket of `burst` requests, one unit back every `interval_us`.
    Gcra { burst: u32, interval_us: i64 },
}

/// One configured policy, with what every request needs precomputed.
#[derive(Debug)]
pub(crate) struct Policy {
    pub name: String,
    pub algo: Algo,
    key: LimitKey,
    /// `}:<name>:<sw|gcra>`: the key after the hash tag's subject.
    key_suffix: String,
    /// `"<name>";q=<limit>;w=<window seconds>`.
    header_item: String,
    /// A concurrency lease (a sliding log whose entries are removed when the stream ends; the
    /// window is only the TTL safety net). Never in the deny cache or the `RateLimit` headers.
    lease: bool,
}

impl Policy {
    fn new(p: &PolicySettings) -> Policy {
        let window_us = i64::try_from(p.window.as_micros()).unwrap_or(i64::MAX).max(1);
        let (algo, short) = match p.algorithm {
            Algorithm::SlidingWindow => (Algo::SlidingWindow { limit: p.limit.max(1), window_us }, "sw"),
            Algorithm::Gcra => {
                let limit = i64::from(p.limit.max(1));
                let interval_us = ((window_us + limit / 2) / limit).max(1);
                (Algo::Gcra { burst: p.burst.max(1), interval_us }, "gcra")
            }
        };
        Policy {
            name: p.name.clone(),
            algo,
            key: p.key,
            key_suffix: format!("}}:{}:{short}", p.name),
            header_item: format!("\"{}\";q={};w={}", p.name, p.limit, ceil_secs(p.window).max(1)),
            lease: false,
        }
    }

    /// At most `limit` held at once per user (or IP), each lease expiring after `ttl` at most.
    fn lease(name: &str, limit: u32, ttl: Duration) -> Policy {
        let window_us = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX).max(1);
        Policy {
            name: name.to_string(),
            algo: Algo::SlidingWindow { limit: limit.max(1), window_us },
            key: LimitKey::UserOrIp,
            key_suffix: format!("}}:{name}:lease"),
            header_item: String::new(),
            lease: true,
        }
    }
}

/// When a client over a concurrency limit may try again: streams end at any time.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// Policies prepared once for one kind of request (a ChatKit-server route's request type):
/// the route's and the type's policies, and optionally a concurrency lease.
#[derive(Debug)]
pub struct PreparedPlan {
    plan: Plan,
    lease: Option<Policy>,
}

/// A refused request: the answer, and whether a concurrency lease (not a quota) refused it.
#[derive(Debug)]
pub struct Denied {
    pub error: GateError,
    pub concurrency: bool,
}

impl Denied {
    fn rate(error: GateError) -> Denied {
        Denied { error, concurrency: false }
    }
}

/// What an admitted request holds: the `RateLimit*` headers and, for a leased request, the
/// lease (released when dropped: when the stream ends, fails or is abandoned).
#[derive(Debug, Default)]
pub struct Admission {
    pub headers: Option<RateLimitHeaders>,
    pub lease: Option<Lease>,
}

/// A held concurrency lease. Dropping it gives it back (Redis: in a spawned task; a lost
/// release is covered by the lease TTL).
pub struct Lease {
    key: String,
    held: Held,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

enum Held {
    Redis { limiter: Arc<RedisLimiter>, nonce: String },
    Local { store: Arc<LocalStore>, admitted_us: i64 },
}

impl Lease {
    /// Give the lease back now. A Redis release runs in a task of its own (it outlives the
    /// caller); its handle lets a stream hold its last frame until the release is through, so
    /// a client that starts its next stream the moment this one ends is never refused.
    pub fn give_back(mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.release()
    }

    /// Whether giving the lease back takes a round trip (see [`Lease::give_back`]).
    pub fn is_remote(&self) -> bool {
        matches!(self.held, Held::Redis { .. })
    }

    fn release(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let key = std::mem::take(&mut self.key);
        if key.is_empty() {
            return None;
        }
        match &self.held {
            Held::Local { store, admitted_us } => {
                store.release(&key, *admitted_us);
                None
            }
            Held::Redis { limiter, nonce } => {
                let (limiter, nonce) = (limiter.clone(), nonce.clone());
                let rt = tokio::runtime::Handle::try_current().ok()?;
                Some(rt.spawn(async move { limiter.release(&key, &nonce).await }))
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropping the handle detaches the task: the release still runs.
        drop(self.release());
    }
}

/// One policy applied to one request: the counter it uses.
#[derive(Debug)]
pub(crate) struct Check<'a> {
    pub policy: &'a Policy,
    /// The store key, e.g. `chatkit-gate:rl:{u:alice}:chatkit:sw`.
    pub key: String,
    /// Length of `key` through the end of the hash tag: keys with equal tags share a slot.
    tag_end: usize,
}

impl Check<'_> {
    pub fn tag(&self) -> &str {
        &self.key[..self.tag_end]
    }
}

/// What the store said about one policy of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// This policy alone would admit the request (it is admitted when all policies do).
    pub allowed: bool,
    /// Units left after this request (a rejected request consumes nothing).
    pub remaining: u64,
    /// Rejected by this policy: until it admits again. Otherwise: until one more unit is back
    /// (zero when the quota is full).
    pub wait: Duration,
}

/// The policies of one route and its constant `RateLimit-Policy` value.
#[derive(Debug, Clone)]
struct Plan {
    names: Vec<String>,
    policies: Vec<usize>,
    policy_header: HeaderValue,
}

/// Where decisions are made.
enum Backend {
    /// No Redis configured: the in-process store is the store.
    Local,
    Redis(Arc<RedisLimiter>),
}

/// Where a decision came from, as the `source` metric label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Redis,
    Local,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Local => "local",
        }
    }
}

pub struct RateLimiter {
    policies: Vec<Policy>,
    /// By `Route::index`.
    plans: Vec<Option<Plan>>,
    backend: Backend,
    /// The embedded store, or the `on_store_error = "local"` fallback.
    local: Arc<LocalStore>,
    on_store_error: OnStoreError,
    cache: DenyCache,
    prefix: String,
    metrics: Metrics,
    audit: Audit,
    /// Set while Redis fails and `on_store_error` decides: logged once per change.
    degraded: AtomicBool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("policies", &self.policies.len()).finish()
    }
}

impl RateLimiter {
    pub fn new(
        settings: &RateLimitSettings,
        routes: &[Arc<Route>],
        store: Option<RedisStore>,
        metrics: Metrics,
        audit: Audit,
    ) -> anyhow::Result<Self> {
        let policies: Vec<Policy> = settings.policies.values().map(Policy::new).collect();
        let mut plans = Vec::new();
        for route in routes {
            if route.rate_limit.is_empty() {
                continue;
            }
            let plan = build_plan(&policies, &route.rate_limit)
                .map_err(|name| anyhow::anyhow!("route {:?}: unknown rate-limit policy {name:?}", route.name))?;
            if plans.len() <= route.index {
                plans.resize_with(route.index + 1, || None);
            }
            plans[route.index] = Some(plan);
        }
        let cluster = matches!(settings.store, RateLimitStore::Cluster { .. });
        let backend = match (store, &settings.store) {
            (Some(store), _) => Backend::Redis(Arc::new(RedisLimiter::new(store, cluster))),
            (None, RateLimitStore::Local) => Backend::Local,
            (None, _) => anyhow::bail!("rate_limit: a Redis store is configured but was not started"),
        };
        // Every series this configuration can produce exists from the start, at zero.
        let (sources, degraded): (&[&str], Option<&str>) = match (&backend, settings.on_store_error) {
            (Backend::Local, _) => (&["local", "cache"], None),
            (Backend::Redis(_), OnStoreError::Local) => (&["redis", "cache", "local"], None),
            (Backend::Redis(_), OnStoreError::Allow) => (&["redis", "cache"], Some("allowed")),
            (Backend::Redis(_), OnStoreError::Deny) => (&["redis", "cache"], Some("denied")),
        };
        for p in &policies {
            for decision in ["allowed", "limited"] {
                for source in sources {
                    metrics.rate_limit_decisions.with_label_values(&[p.name.as_str(), decision, source]);
                }
            }
            if let Some(decision) = degraded {
                metrics.rate_limit_decisions.with_label_values(&[p.name.as_str(), decision, "store_error"]);
            }
        }
        metrics.rate_limit_store_degraded.set(0);
        Ok(RateLimiter {
            policies,
            plans,
            backend,
            local: Arc::new(LocalStore::new()),
            on_store_error: settings.on_store_error,
            cache: DenyCache::new(),
            prefix: settings.key_prefix.clone(),
            metrics,
            audit,
            degraded: AtomicBool::new(false),
        })
    }

    /// Check the route's policies for this request (one store round trip for all of them).
    /// `Ok(None)` when the route has no policies, and when Redis is down under
    /// `on_store_error = "allow"` (the quota is then unknown). `Err` is the answer to send:
    /// 429 with `Retry-After` and the `RateLimit*` headers, or 503 under `deny`.
    pub async fn check(
        &self,
        route: &Route,
        identity: Option<&Identity>,
        ctx: &RequestContext,
    ) -> Result<Option<RateLimitHeaders>, GateError> {
        if route.rate_limit.is_empty() {
            return Ok(None);
        }
        let plan = self.plan(route)?;
        Ok(self.decide(route, &plan, None, identity, ctx).await.map_err(|d| d.error)?.headers)
    }

    /// Prepare `names` (deduplicated, in order) and an optional concurrency lease
    /// (`(name, limit, ttl)`) for `check_prepared`. `Err` names an unknown policy.
    pub fn prepare(&self, names: &[String], lease: Option<(&str, u32, Duration)>) -> anyhow::Result<PreparedPlan> {
        let plan =
            build_plan(&self.policies, names).map_err(|name| anyhow::anyhow!("unknown rate-limit policy {name:?}"))?;
        Ok(PreparedPlan { plan, lease: lease.map(|(name, limit, ttl)| Policy::lease(name, limit, ttl)) })
    }

    /// Like `check`, for a prepared set of policies (and lease): all in one store round trip.
    pub async fn check_prepared(
        &self,
        route: &Route,
        prepared: &PreparedPlan,
        identity: Option<&Identity>,
        ctx: &RequestContext,
    ) -> Result<Admission, Denied> {
        if prepared.plan.policies.is_empty() && prepared.lease.is_none() {
            return Ok(Admission::default());
        }
        self.decide(route, &prepared.plan, prepared.lease.as_ref(), identity, ctx).await
    }

    async fn decide(
        &self,
        route: &Route,
        plan: &Plan,
        lease: Option<&Policy>,
        identity: Option<&Identity>,
        ctx: &RequestContext,
    ) -> Result<Admission, Denied> {
        let mut checks = self.checks(&plan.policies, identity, ctx.client_ip);
        let limited = checks.len();
        if let Some(lease) = lease {
            checks.push(self.check_for(lease, identity, ctx.client_ip));
        }

        if let Some((i, wait)) = self.cache.blocked(&checks[..limited], Instant::now()) {
            let policy = checks[i].policy;
            self.count(policy, "limited", "cache");
            let limit = header_value(&rate_limit_item(policy, &Outcome { allowed: false, remaining: 0, wait }));
            return Err(Denied::rate(too_many(wait, plan.policy_header.clone(), limit)));
        }

        // The sliding-log member of this request in Redis (and a Redis lease's id).
        let nonce = match self.backend {
            Backend::Redis(_) => format!("{:016x}", rand::random::<u64>()),
            Backend::Local => String::new(),
        };
        let mut local_now = 0;
        let (outcomes, source) = match &self.backend {
            Backend::Local => {
                let (outcomes, now) = self.local.check_timed(&checks);
                local_now = now;
                (outcomes, Source::Local)
            }
            Backend::Redis(redis) => match redis.check(&checks, &nonce).await {
                Ok(outcomes) => {
                    self.store_answered();
                    (outcomes, Source::Redis)
                }
                Err(e) => {
                    self.store_failed(&e);
                    // A timed-out call may still have run: never leave its lease behind.
                    if let Some(c) = checks.get(limited) {
                        let (redis, key, nonce) = (redis.clone(), c.key.clone(), nonce.clone());
                        tokio::spawn(async move { redis.release(&key, &nonce).await });
                    }
                    match self.on_store_error {
                        OnStoreError::Local => {
                            let (outcomes, now) = self.local.check_timed(&checks);
                            local_now = now;
                            (outcomes, Source::Local)
                        }
                        OnStoreError::Allow => {
                            checks.iter().for_each(|c| self.count(c.policy, "allowed", "store_error"));
                            return Ok(Admission::default());
                        }
                        OnStoreError::Deny => {
                            checks.iter().for_each(|c| self.count(c.policy, "denied", "store_error"));
                            return Err(Denied::rate(GateError::RateLimitUnavailable));
                        }
                    }
                }
            },
        };

        let mut limit = String::new();
        for (c, o) in checks[..limited].iter().zip(&outcomes) {
            if !limit.is_empty() {
                limit.push_str(", ");
            }
            limit.push_str(&rate_limit_item(c.policy, o));
        }
        let limit = header_value(&limit);
        if outcomes.iter().all(|o| o.allowed) {
            checks.iter().for_each(|c| self.count(c.policy, "allowed", source.label()));
            let headers = (limited > 0).then(|| RateLimitHeaders { policy: plan.policy_header.clone(), limit });
            let lease = (limited < checks.len()).then(|| {
                let key = checks.swap_remove(limited).key;
                let held = match (&self.backend, source) {
                    (Backend::Redis(redis), Source::Redis) => Held::Redis { limiter: redis.clone(), nonce },
                    _ => Held::Local { store: self.local.clone(), admitted_us: local_now },
                };
                Lease { key, held }
            });
            return Ok(Admission { headers, lease });
        }

        // Rejected: wait for the slowest rejecting policy; remember every rejecting key (but a
        // lease: a stream may end at any moment).
        let now = Instant::now();
        let mut binding: Option<(&Check<'_>, Duration)> = None;
        for (c, o) in checks.iter().zip(&outcomes).filter(|(_, o)| !o.allowed) {
            self.count(c.policy, "limited", source.label());
            let wait = if c.policy.lease { LEASE_RETRY } else { o.wait };
            if !c.policy.lease {
                self.cache.insert(&c.key, now + wait);
            }
            if binding.is_none_or(|(_, w)| wait > w) {
                binding = Some((c, wait));
            }
        }
        let wait = binding.map(|(_, w)| w).unwrap_or_default();
        let retry_after = ceil_secs(wait).max(1);
        if let Some((c, _)) = binding {
            tracing::debug!(
                route = %route.name,
                policy = %c.policy.name,
                source = source.label(),
                retry_after,
                request_id = ctx.request_id(),
                "rate limited"
            );
            self.audit.log(
                AuditEvent::new(AuditKind::RateLimited, ctx.request_id(), ctx.client_ip)
                    .user(identity.map(|i| i.id.as_str()))
                    .policy(&c.policy.name)
                    .route(&route.name)
                    .reason(format!("retry after {retry_after}s")),
            );
        }
        Err(Denied {
            error: too_many(wait, plan.policy_header.clone(), limit),
            concurrency: binding.is_some_and(|(c, _)| c.policy.lease),
        })
    }

    /// The Redis store decisions are kept in, if any (other per-user state may live beside them).
    pub fn redis_store(&self) -> Option<RedisStore> {
        match &self.backend {
            Backend::Redis(r) => Some(r.store().clone()),
            Backend::Local => None,
        }
    }

    /// Start of every key this limiter writes.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// False when the store is down and `on_store_error = "deny"` (drives `/readyz`).
    pub fn ready(&self) -> bool {
        let Backend::Redis(redis) = &self.backend else { return true };
        let healthy = redis.healthy();
        if healthy {
            // Redis came back while no request was checked (readiness probes keep asking):
            // end the degraded state now rather than at the next request.
            self.store_answered();
        }
        healthy || self.on_store_error != OnStoreError::Deny
    }

    fn plan<'a>(&'a self, route: &Route) -> Result<Cow<'a, Plan>, GateError> {
        if let Some(Some(plan)) = self.plans.get(route.index)
            && plan.names == route.rate_limit
        {
            return Ok(Cow::Borrowed(plan));
        }
        // A route this limiter was not built with (tests, or a table rebuilt since).
        build_plan(&self.policies, &route.rate_limit).map(Cow::Owned).map_err(|name| {
            tracing::error!(route = %route.name, policy = %name, "unknown rate-limit policy");
            GateError::Internal
        })
    }

    fn checks<'a>(&'a self, policies: &[usize], identity: Option<&Identity>, ip: IpAddr) -> Vec<Check<'a>> {
        let user = identity.map(|i| user_subject(&i.id));
        let ip = ip_subject(ip);
        policies.iter().map(|&i| self.key_for(&self.policies[i], user.as_deref(), &ip)).collect()
    }

    fn check_for<'a>(&self, policy: &'a Policy, identity: Option<&Identity>, ip: IpAddr) -> Check<'a> {
        let user = identity.map(|i| user_subject(&i.id));
        self.key_for(policy, user.as_deref(), &ip_subject(ip))
    }

    fn key_for<'a>(&self, policy: &'a Policy, user: Option<&str>, ip: &str) -> Check<'a> {
        let subject = match (policy.key, user) {
            (LimitKey::User | LimitKey::UserOrIp, Some(user)) => user,
            _ => ip,
        };
        let mut key = String::with_capacity(self.prefix.len() + subject.len() + policy.key_suffix.len() + 6);
        let _ = write!(key, "{}:rl:{{{subject}", self.prefix);
        let tag_end = key.len() + 1;
        key.push_str(&policy.key_suffix);
        Check { policy, key, tag_end }
    }

    fn count(&self, policy: &Policy, decision: &str, source: &str) {
        self.metrics.rate_limit_decisions.with_label_values(&[policy.name.as_str(), decision, source]).inc();
    }

    fn store_failed(&self, e: &StoreError) {
        if !self.degraded.load(Ordering::Relaxed) && !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.rate_limit_store_degraded.set(1);
            let on_store_error = match self.on_store_error {
                OnStoreError::Local => "local",
                OnStoreError::Allow => "allow",
                OnStoreError::Deny => "deny",
            };
            tracing::warn!(error = %e, on_store_error, "rate-limit store unavailable; on_store_error decides until it answers");
        }
    }

    fn store_answered(&self) {
        // Load first: the common case writes nothing to this shared flag.
        if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::AcqRel) {
            self.metrics.rate_limit_store_degraded.set(0);
            tracing::info!("rate-limit store answering again; decisions come from redis");
        }
    }
}

/// The route's policies by index, in order, duplicates dropped. `Err` names an unknown policy.
fn build_plan(policies: &[Policy], names: &[String]) -> Result<Plan, String> {
    let mut indexes: Vec<usize> = Vec::with_capacity(names.len());
    for name in names {
        let i = policies.iter().position(|p| &p.name == name).ok_or_else(|| name.clone())?;
        if !indexes.contains(&i) {
            indexes.push(i);
        }
    }
    let header = indexes.iter().map(|&i| policies[i].header_item.as_str()).collect::<Vec<_>>().join(", ");
    Ok(Plan { names: names.to_vec(), policies: indexes, policy_header: header_value(&header) })
}

fn too_many(wait: Duration, policy: HeaderValue, limit: HeaderValue) -> GateError {
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(RATELIMIT_POLICY, policy);
    headers.insert(RATELIMIT, limit);
    GateError::TooManyRequests { retry_after: ceil_secs(wait).max(1), headers }
}

/// `"<name>";r=<remaining>;t=<seconds>`; a rejecting policy's `t` is its `Retry-After`.
fn rate_limit_item(policy: &Policy, o: &Outcome) -> String {
    let t = if o.allowed { ceil_secs(o.wait) } else { ceil_secs(o.wait).max(1) };
    format!("\"{}\";r={};t={}", policy.name, o.remaining, t)
}

/// Policy names are letters, digits, `_` and `-` (config validation), so this never fails.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whole seconds, rounded up: a client waiting this long finds the slot free.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `u:<id>`, or `uh:<hash>` for ids that are long or could break the hash tag.
fn user_subject(id: &str) -> String {
    if id.len() <= MAX_RAW_ID && !id.chars().any(|c| c == '{' || c == '}' || c.is_control()) {
        return format!("u:{id}");
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut s = String::with_capacity(3 + 32);
    s.push_str("uh:");
    for b in &digest[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `ip:<IPv4>`; IPv6 by its /64 (one subscriber usually holds a whole /64).
fn ip_subject(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("ip:{net}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn subjects_are_safe_hash_tags() {
        assert_eq!(user_subject("alice"), "u:alice");
        assert!(user_subject("a}b").starts_with("uh:"));
        assert!(user_subject(&"x".repeat(200)).starts_with("uh:"));
        assert_eq!(user_subject("a}b").len(), 3 + 32);
        assert_eq!(ip_subject("10.1.2.3".parse().unwrap()), "ip:10.1.2.3");
        assert_eq!(ip_subject("::ffff:10.1.2.3".parse().unwrap()), "ip:10.1.2.3");
        assert_eq!(ip_subject("2001:db8:1:2:3:4:5:6".parse().unwrap()), "ip:2001:db8:1:2::/64");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(41)), 41);
        assert_eq!(ceil_secs(Duration::from_millis(41_001)), 42);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }

    #[test]
    fn policy_header_items_follow_the_draft_syntax() {
        let sw = Policy::new(&PolicySettings {
            name: "chatkit".into(),
            algorithm: Algorithm::SlidingWindow,
            limit: 5,
            window: Duration::from_secs(60),
            burst: 5,
            key: LimitKey::User,
        });
        assert_eq!(sw.header_item, "\"chatkit\";q=5;w=60");
        assert_eq!(sw.algo, Algo::SlidingWindow { limit: 5, window_us: 60_000_000 });
        let gcra = Policy::new(&PolicySettings {
            name: "api".into(),
            algorithm: Algorithm::Gcra,
            limit: 600,
            window: Duration::from_millis(60_500),
            burst: 100,
            key: LimitKey::UserOrIp,
        });
        assert_eq!(gcra.header_item, "\"api\";q=600;w=61");
        assert_eq!(gcra.algo, Algo::Gcra { burst: 100, interval_us: 100_833 });
        let plan = build_plan(&[sw, gcra], &["api".into(), "chatkit".into(), "api".into()]).unwrap();
        assert_eq!(plan.policies, vec![1, 0]);
        assert_eq!(plan.policy_header, "\"api\";q=600;w=61, \"chatkit\";q=5;w=60");
        let item = rate_limit_item(
            &Policy::new(&PolicySettings {
                name: "chatkit".into(),
                algorithm: Algorithm::SlidingWindow,
                limit: 5,
                window: Duration::from_secs(60),
                burst: 5,
                key: LimitKey::User,
            }),
            &Outcome { allowed: true, remaining: 2, wait: Duration::from_millis(40_200) },
        );
        assert_eq!(item, "\"chatkit\";r=2;t=41");
    }
}

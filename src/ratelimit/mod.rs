//! Rate limits: named policies per route, all of a request's policies checked in one store round
//! trip (a Lua script on Redis, or the in-process store), a local deny cache, `on_store_error`,
//! and the 429 answer with `Retry-After` and the `RateLimit-Policy` / `RateLimit` headers
//! (`headers`). [`RateLimiter`] lives here; `policy` holds the policies and subjects, `lease` what
//! an admitted request holds, `local` and `remote` the two stores, `cache` the deny cache.
//!
//! Keys are `<key_prefix>:rl:{<subject>}:<policy>:<sw|gcra>`, the subject being `u:<user id>`
//! (or `uh:<sha-256>` for ids that are long or hold braces), `ip:<IPv4>` or `ip:<IPv6 /64>`.
//! `key = "user"` on a request without a signed-in user falls back to the client IP, so
//! anonymous traffic on public and optional routes is still limited.

mod cache;
mod headers;
mod lease;
mod local;
mod policy;
mod remote;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{LimitKey, OnStoreError, RateLimitSettings, RateLimitStore};
use crate::http::error::GateError;
use crate::obs::audit::{Audit, AuditEvent, AuditKind};
use crate::obs::metrics::Metrics;
use crate::request::context::Identity;
use crate::request::context::RequestContext;
use crate::request::routes::Route;
use crate::transport::redis::{RedisStore, StoreError};

pub use crate::ratelimit::headers::{RATELIMIT, RATELIMIT_POLICY, RateLimitHeaders};
pub use crate::ratelimit::lease::{Admission, Denied, Lease, PreparedPlan};

use crate::ratelimit::cache::DenyCache;
use crate::ratelimit::headers::{rate_limit_item, too_many};
use crate::ratelimit::lease::Held;
use crate::ratelimit::local::LocalStore;
use crate::ratelimit::policy::{
    Check, Plan, Policy, Verdict, build_plan, ceil_secs, header_value, ip_subject, user_subject,
};
use crate::ratelimit::remote::RedisLimiter;

/// When a client over a concurrency limit may try again: streams end at any time.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// Where decisions are made.
enum Backend {
    /// No Redis configured: the in-process store is the store.
    Local,
    Redis(Arc<RedisLimiter>),
}

/// Where a decision came from, as the `source` metric label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecidedBy {
    Redis,
    Local,
}

impl DecidedBy {
    fn label(self) -> &'static str {
        match self {
            DecidedBy::Redis => "redis",
            DecidedBy::Local => "local",
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
            let limit = header_value(&rate_limit_item(policy, &Verdict { allowed: false, remaining: 0, wait }));
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
                (outcomes, DecidedBy::Local)
            }
            Backend::Redis(redis) => match redis.check(&checks, &nonce).await {
                Ok(outcomes) => {
                    self.store_answered();
                    (outcomes, DecidedBy::Redis)
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
                            (outcomes, DecidedBy::Local)
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
                    (Backend::Redis(redis), DecidedBy::Redis) => Held::Redis { limiter: redis.clone(), nonce },
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

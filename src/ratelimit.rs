//! Rate limits (STUB: the contract only; the rate-limit issue fills it in).
//!
//! Owns: policies per route, the Redis scripts and the in-process store, the local deny cache,
//! `on_store_error`, and the 429 answer with `Retry-After` and `RateLimit*` headers.

use http::HeaderValue;

use crate::audit::Audit;
use crate::auth::Identity;
use crate::config::RateLimitSettings;
use crate::context::RequestContext;
use crate::error::GateError;
use crate::metrics::Metrics;
use crate::routes::Route;
use crate::store::RedisStore;

/// `RateLimit-Policy` and `RateLimit` values for a response of a limited route.
#[derive(Debug, Clone)]
pub struct RateLimitHeaders {
    pub policy: HeaderValue,
    pub limit: HeaderValue,
}

pub struct RateLimiter {
    _store: Option<RedisStore>,
}

impl RateLimiter {
    pub fn new(
        _settings: &RateLimitSettings,
        _routes: &[std::sync::Arc<Route>],
        store: Option<RedisStore>,
        _metrics: Metrics,
        _audit: Audit,
    ) -> anyhow::Result<Self> {
        Ok(RateLimiter { _store: store })
    }

    /// Check the route's policies for this request (one store round trip for all of them).
    /// `Ok(None)` when the route has no policies.
    pub async fn check(
        &self,
        route: &Route,
        _identity: Option<&Identity>,
        _ctx: &RequestContext,
    ) -> Result<Option<RateLimitHeaders>, GateError> {
        if route.rate_limit.is_empty() {
            return Ok(None);
        }
        Err(GateError::RateLimitUnavailable)
    }

    /// False when the store is down and `on_store_error = "deny"` (drives `/readyz`).
    pub fn ready(&self) -> bool {
        true
    }
}

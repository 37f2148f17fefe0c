//! The `RateLimit-Policy` and `RateLimit` headers (IETF httpapi draft) and the 429 answer
//! with `Retry-After`.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::http::error::GateError;
use crate::ratelimit::policy::{Policy, Verdict, ceil_secs};

/// `RateLimit-Policy` (IETF httpapi draft): the quota of each policy of the route.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (IETF httpapi draft): what is left of each quota for this client.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

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

pub(crate) fn too_many(wait: Duration, policy: HeaderValue, limit: HeaderValue) -> GateError {
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(RATELIMIT_POLICY, policy);
    headers.insert(RATELIMIT, limit);
    GateError::TooManyRequests { retry_after: ceil_secs(wait).max(1), headers }
}

/// `"<name>";r=<remaining>;t=<seconds>`; a rejecting policy's `t` is its `Retry-After`.
pub(crate) fn rate_limit_item(policy: &Policy, o: &Verdict) -> String {
    let t = if o.allowed { ceil_secs(o.wait) } else { ceil_secs(o.wait).max(1) };
    format!("\"{}\";r={};t={}", policy.name, o.remaining, t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(41)), 41);
        assert_eq!(ceil_secs(Duration::from_millis(41_001)), 42);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}

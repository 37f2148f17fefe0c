//! Policies as the limiter uses them: how each counts ([`Algo`]), a route's plan, one policy
//! applied to one request ([`Check`]) and what the store said of it ([`Verdict`]); and the
//! subjects keys are made of (`u:<id>`, `uh:<hash>`, `ip:<v4>`, `ip:<v6>/64`).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::config::{Algorithm, LimitKey, PolicySettings};

/// User ids longer than this (or holding braces or control characters) are hashed in keys.
const MAX_RAW_ID: usize = 128;

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
    pub(crate) key: LimitKey,
    /// `}:<name>:<sw|gcra>`: the key after the hash tag's subject.
    pub(crate) key_suffix: String,
    /// `"<name>";q=<limit>;w=<window seconds>`.
    header_item: String,
    /// A concurrency lease (a sliding log whose entries are removed when the stream ends; the
    /// window is only the TTL safety net). Never in the deny cache or the `RateLimit` headers.
    pub(crate) lease: bool,
}

impl Policy {
    pub(crate) fn new(p: &PolicySettings) -> Policy {
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
    pub(crate) fn lease(name: &str, limit: u32, ttl: Duration) -> Policy {
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

/// One policy applied to one request: the counter it uses.
#[derive(Debug)]
pub(crate) struct Check<'a> {
    pub policy: &'a Policy,
    /// The store key, e.g. `chatkit-gate:rl:{u:alice}:chatkit:sw`.
    pub key: String,
    /// Length of `key` through the end of the hash tag: keys with equal tags share a slot.
    pub(crate) tag_end: usize,
}

impl Check<'_> {
    pub fn tag(&self) -> &str {
        &self.key[..self.tag_end]
    }
}

/// What the store said about one policy of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
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
pub(crate) struct Plan {
    pub(crate) names: Vec<String>,
    pub(crate) policies: Vec<usize>,
    pub(crate) policy_header: HeaderValue,
}

/// The route's policies by index, in order, duplicates dropped. `Err` names an unknown policy.
pub(crate) fn build_plan(policies: &[Policy], names: &[String]) -> Result<Plan, String> {
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

/// Policy names are letters, digits, `_` and `-` (config validation), so this never fails.
pub(crate) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `u:<id>`, or `uh:<hash>` for ids that are long or could break the hash tag.
pub(crate) fn user_subject(id: &str) -> String {
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
pub(crate) fn ip_subject(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("ip:{net}/64")
        }
    }
}

/// Whole seconds, rounded up: a client waiting this long finds the slot free.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::ratelimit::headers::rate_limit_item;

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
    fn policy_header_items_follow_the_draft_syntax() {
        let chatkit = PolicySettings {
            name: "chatkit".into(),
            algorithm: Algorithm::SlidingWindow,
            limit: 5,
            window: Duration::from_secs(60),
            burst: 5,
            key: LimitKey::User,
        };
        let sw = Policy::new(&chatkit);
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
            &Policy::new(&chatkit),
            &Verdict { allowed: true, remaining: 2, wait: Duration::from_millis(40_200) },
        );
        assert_eq!(item, "\"chatkit\";r=2;t=41");
    }
}

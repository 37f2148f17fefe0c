//! `[rate_limit]`: the store (Redis URL, cluster or memory) and the policies.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::errors::Errors;
use crate::config::raw::*;
use crate::config::settings::*;

pub(super) fn validate_rate_limit(raw: RawRateLimit, e: &mut Errors) -> RateLimitSettings {
    let from_secret = match (raw.redis_url_env, raw.redis_url_file) {
        (Some(env), None) => Some(("rate_limit.redis_url_env", SecretSource::Env(env))),
        (None, Some(file)) => Some(("rate_limit.redis_url_file", SecretSource::File(file))),
        (None, None) => None,
        (Some(_), Some(_)) => {
            e.push("rate_limit.redis_url_env", "set only one of redis_url_env and redis_url_file");
            None
        }
    };
    let store = match (raw.redis_url, from_secret, raw.redis_cluster) {
        (None, None, None) => RateLimitStore::Local,
        (Some(url), None, None) => {
            check_redis_url(&mut *e, "rate_limit.redis_url", &url);
            RateLimitStore::Redis { url }
        }
        (None, Some((key, source)), None) => match source.read() {
            Ok(url) => {
                check_redis_url(&mut *e, key, &url);
                RateLimitStore::Redis { url }
            }
            Err(msg) => {
                e.push(key, msg);
                RateLimitStore::Local
            }
        },
        (None, None, Some(urls)) => {
            if urls.is_empty() {
                e.push("rate_limit.redis_cluster", "must list at least one node");
            }
            for (i, u) in urls.iter().enumerate() {
                check_redis_url(&mut *e, &format!("rate_limit.redis_cluster[{i}]"), u);
            }
            RateLimitStore::Cluster { urls }
        }
        _ => {
            e.push("rate_limit.redis_url", "set only one of redis_url, redis_url_env/_file and redis_cluster");
            RateLimitStore::Local
        }
    };
    let on_store_error = match raw.on_store_error.as_deref() {
        None | Some("local") => OnStoreError::Local,
        Some("allow") => OnStoreError::Allow,
        Some("deny") => OnStoreError::Deny,
        Some(other) => {
            e.push("rate_limit.on_store_error", format!("must be local, allow or deny (got {other:?})"));
            OnStoreError::Local
        }
    };
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "chatkit-gate".into());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        e.push("rate_limit.key_prefix", "must be 1 to 64 printable ASCII characters without '{' or '}'");
    }
    let mut policies = BTreeMap::new();
    for (name, p) in raw.policies {
        let key = format!("rate_limit.policies.{name}");
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            e.push(&key, "policy names use letters, digits, '_' and '-'");
        }
        let algorithm = match p.algorithm.as_deref() {
            None | Some("sliding_window") => Algorithm::SlidingWindow,
            Some("gcra") => Algorithm::Gcra,
            Some(other) => {
                e.push(format!("{key}.algorithm"), format!("must be sliding_window or gcra (got {other:?})"));
                Algorithm::SlidingWindow
            }
        };
        let limit = match p.limit {
            None => {
                e.push(format!("{key}.limit"), "required");
                1
            }
            Some(l) if l < 1 => {
                e.push(format!("{key}.limit"), "must be at least 1");
                1
            }
            Some(l) if l > 1_000_000 => {
                e.push(format!("{key}.limit"), "must be at most 1000000");
                1
            }
            Some(l) => l as u32,
        };
        let window = match p.window.as_deref() {
            None => {
                e.push(format!("{key}.window"), "required");
                Duration::from_secs(60)
            }
            Some(w) => e.positive_duration(&format!("{key}.window"), Some(w), Duration::from_secs(60)),
        };
        if window < Duration::from_millis(1) {
            e.push(format!("{key}.window"), "must be at least 1ms");
        }
        if window > Duration::from_secs(30 * 86_400) {
            e.push(format!("{key}.window"), "must be at most 30d");
        }
        let burst = match (algorithm, p.burst) {
            (Algorithm::SlidingWindow, Some(_)) => {
                e.push(format!("{key}.burst"), "only applies to algorithm = \"gcra\"");
                limit
            }
            (_, None) => limit,
            (_, Some(b)) if b < 1 => {
                e.push(format!("{key}.burst"), "must be at least 1");
                limit
            }
            (_, Some(b)) => b.min(1_000_000) as u32,
        };
        let key_kind = match p.key.as_deref() {
            None | Some("user_or_ip") => LimitKey::UserOrIp,
            Some("user") => LimitKey::User,
            Some("ip") => LimitKey::Ip,
            Some(other) => {
                e.push(format!("{key}.key"), format!("must be user, ip or user_or_ip (got {other:?})"));
                LimitKey::UserOrIp
            }
        };
        policies.insert(name.clone(), PolicySettings { name, algorithm, limit, window, burst, key: key_kind });
    }
    RateLimitSettings {
        store,
        redis_timeout: e.positive_duration(
            "rate_limit.redis_timeout",
            raw.redis_timeout.as_deref(),
            Duration::from_millis(50),
        ),
        on_store_error,
        key_prefix,
        policies,
    }
}

pub(super) fn check_redis_url(e: &mut Errors, key: &str, url: &str) {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        // Never echo the URL: it may carry a password.
        e.push(key, "must start with redis:// or rediss://");
    }
}

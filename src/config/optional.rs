//! Validation of the optional sections: `[auth]`, `[rate_limit]` and `[chatkit]`.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, Uri};

use super::raw::*;
use super::validate::{Errors, check_policy_names};
use super::*;

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

pub(super) fn validate_chatkit(
    raw: RawChatKit,
    rate_limit: Option<&RateLimitSettings>,
    e: &mut Errors,
) -> ChatKitSettings {
    let api_key = match (raw.api_key_env, raw.api_key_file) {
        (Some(env), None) => SecretSource::Env(env),
        (None, Some(file)) => SecretSource::File(file),
        (None, None) => SecretSource::Env("OPENAI_API_KEY".into()),
        (Some(env), Some(_)) => {
            e.push("chatkit.api_key_env", "set only one of api_key_env and api_key_file");
            SecretSource::Env(env)
        }
    };
    let api_base = raw.api_base.unwrap_or_else(|| "https://api.openai.com/v1".into());
    // Only validated here (problems are pushed); the client parses it again per call path.
    let _ = e.http_url("chatkit.api_base", &api_base, true);
    let api_base = api_base.trim_end_matches('/').to_string();
    let workflow_id = match raw.workflow_id {
        Some(w) if !w.trim().is_empty() => w,
        _ => {
            e.push("chatkit.workflow_id", "required (e.g. \"wf_...\" from Agent Builder)");
            String::new()
        }
    };
    let session_path = raw.session_path.unwrap_or_else(|| "/api/chatkit/session".into());
    let refresh_path = raw.refresh_path.unwrap_or_else(|| "/api/chatkit/refresh".into());
    for (key, p) in [("chatkit.session_path", &session_path), ("chatkit.refresh_path", &refresh_path)] {
        if !p.starts_with('/') {
            e.push(key, "must start with '/'");
        }
    }
    if session_path == refresh_path {
        e.push("chatkit.refresh_path", "must differ from chatkit.session_path");
    }
    let expires_after = e.duration("chatkit.expires_after", raw.expires_after.as_deref(), Duration::from_secs(600));
    if expires_after < Duration::from_secs(1) || expires_after > Duration::from_secs(600) {
        e.push("chatkit.expires_after", "must be between 1s and 600s (the API's bounds)");
    }
    if expires_after.subsec_nanos() != 0 {
        e.push("chatkit.expires_after", "must be whole seconds");
    }
    check_policy_names("chatkit.rate_limit", &raw.rate_limit, rate_limit, e);
    let max_requests_per_minute = match raw.max_requests_per_minute {
        None => None,
        Some(n) if n < 1 => {
            e.push("chatkit.max_requests_per_minute", "must be at least 1");
            None
        }
        Some(n) => Some(n.min(u32::MAX as i64) as u32),
    };
    let mut state_variables = Vec::new();
    for (name, v) in raw.state_variables {
        let key = format!("chatkit.state_variables.{name}");
        if name.is_empty() || name.chars().count() > 64 {
            e.push(&key, "names must be 1 to 64 characters");
        }
        let default = match v.default {
            None => None,
            Some(toml::Value::String(s)) => Some(serde_json::Value::String(s)),
            Some(toml::Value::Integer(i)) => Some(serde_json::Value::from(i)),
            Some(toml::Value::Float(f)) => serde_json::Number::from_f64(f).map(serde_json::Value::Number),
            Some(toml::Value::Boolean(b)) => Some(serde_json::Value::Bool(b)),
            Some(_) => {
                e.push(format!("{key}.default"), "must be a string, number or boolean");
                None
            }
        };
        let source = match (v.claim, v.header) {
            (Some(c), None) => StateSource::Claim(c.to_ascii_lowercase()),
            (None, Some(h)) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => StateSource::Header(h),
                Err(_) => {
                    e.push(format!("{key}.header"), format!("invalid header name {h:?}"));
                    StateSource::Constant
                }
            },
            (None, None) if default.is_some() => StateSource::Constant,
            (None, None) => {
                e.push(&key, "needs claim, header or default");
                StateSource::Constant
            }
            (Some(_), Some(_)) => {
                e.push(&key, "set only one of claim and header");
                StateSource::Constant
            }
        };
        state_variables.push(StateVariable { name, source, default });
    }
    if let Some(c) = &raw.configuration {
        if let Some(f) = &c.file_upload {
            if let Some(size) = f.max_file_size
                && !(1..=512).contains(&size)
            {
                e.push("chatkit.configuration.file_upload.max_file_size", "must be 1..512 (MB)");
            }
            if f.max_files == Some(0) {
                e.push("chatkit.configuration.file_upload.max_files", "must be at least 1");
            }
        }
        if let Some(h) = &c.history
            && h.recent_threads == Some(0)
        {
            e.push("chatkit.configuration.history.recent_threads", "must be at least 1");
        }
    }
    ChatKitSettings {
        api_key,
        api_base,
        ca_file: raw.ca_file,
        workflow_id,
        workflow_version: raw.workflow_version,
        session_path,
        refresh_path,
        expires_after,
        timeout: e.positive_duration("chatkit.timeout", raw.timeout.as_deref(), Duration::from_secs(10)),
        rate_limit: raw.rate_limit,
        max_requests_per_minute,
        tracing: raw.tracing,
        state_variables,
        configuration: raw.configuration,
    }
}

pub(super) fn json_pointer(e: &mut Errors, key: &str, v: &str) -> String {
    if !v.is_empty() && !v.starts_with('/') {
        e.push(key, format!("must be a JSON pointer starting with '/', e.g. \"/user/id\" (got {v:?})"));
    }
    v.to_string()
}

/// What `auth.preset` sets; every key written in the file still wins.
struct Preset {
    /// Appended to `upstream.url` when `introspection_url` is not set.
    introspection_path: &'static str,
    cookies: &'static [&'static str],
    login_url: &'static str,
    respect_cache_control: bool,
}

fn preset(name: &str) -> Option<Preset> {
    Some(match name {
        // NextAuth v4: `__Secure-` over HTTPS (NEXTAUTH_URL = https://…), plain over HTTP. Its
        // session endpoint answers `Cache-Control: no-store` and rotates the JWT on every call.
        "nextauth" => Preset {
            introspection_path: "/api/auth/session",
            cookies: &["__Secure-next-auth.session-token", "next-auth.session-token"],
            login_url: "/api/auth/signin?callbackUrl={rd}",
            respect_cache_control: false,
        },
        "authjs" => Preset {
            introspection_path: "/api/auth/session",
            cookies: &["__Secure-authjs.session-token", "authjs.session-token"],
            login_url: "/api/auth/signin?callbackUrl={rd}",
            respect_cache_control: false,
        },
        // The whoami view of the README (401 when signed out, `Cache-Control: max-age` honoured).
        "django" => Preset {
            introspection_path: "/auth/whoami/",
            cookies: &["sessionid"],
            login_url: "/accounts/login/?next={rd}",
            respect_cache_control: true,
        },
        _ => return None,
    })
}

pub(super) fn validate_auth(raw: RawAuth, upstream: Option<&Uri>, e: &mut Errors) -> AuthSettings {
    let preset = match raw.preset.as_deref() {
        None => None,
        Some(name) => {
            let p = preset(name);
            if p.is_none() {
                e.push("auth.preset", format!("must be nextauth, authjs or django (got {name:?})"));
            }
            p
        }
    };
    let introspection_url = match (raw.introspection_url.as_deref(), &preset) {
        (Some(v), _) => e.http_url("auth.introspection_url", v, true),
        // The framework's endpoint on the app itself.
        (None, Some(p)) => upstream.and_then(|u| {
            let base = u.to_string();
            e.http_url(
                "auth.introspection_url",
                &format!("{}{}", base.trim_end_matches('/'), p.introspection_path),
                true,
            )
        }),
        // An unknown preset is already reported.
        (None, None) if raw.preset.is_some() => None,
        (None, None) => {
            e.push("auth.introspection_url", "required (or set auth.preset)");
            None
        }
    };
    let header_prefix = raw.header_prefix.unwrap_or_else(|| "x-auth-request-".into()).to_ascii_lowercase();
    let mut forward_headers = Vec::new();
    for (i, h) in raw.forward_headers.iter().enumerate() {
        let key = format!("auth.forward_headers[{i}]");
        match HeaderName::from_bytes(h.trim().as_bytes()) {
            Ok(name)
                if matches!(
                    name.as_str(),
                    "upgrade"
                        | "connection"
                        | "content-length"
                        | "transfer-encoding"
                        | "te"
                        | "trailer"
                        | "keep-alive"
                        | "proxy-connection"
                        | "host"
                ) =>
            {
                e.push(key, format!("{name} is never forwarded"));
            }
            Ok(name) if name == http::header::COOKIE => {
                e.push(key, "cookies are forwarded by auth.cookies ([] = the whole Cookie header)");
            }
            Ok(name) if name.as_str().starts_with(&header_prefix) => {
                e.push(key, "headers starting with auth.header_prefix are removed from every request");
            }
            Ok(name) => forward_headers.push(name),
            Err(_) => e.push(key, format!("invalid header name {h:?}")),
        }
    }
    if header_prefix.len() < 2 || HeaderName::from_bytes(format!("{header_prefix}user").as_bytes()).is_err() {
        e.push("auth.header_prefix", format!("invalid header prefix {header_prefix:?}"));
    }
    let mut claims = Vec::new();
    for (name, pointer) in &raw.claims {
        let key = format!("auth.claims.{name}");
        if HeaderName::from_bytes(format!("{header_prefix}{name}").as_bytes()).is_err()
            || name.is_empty()
            || matches!(name.to_ascii_lowercase().as_str(), "user" | "email" | "name")
        {
            e.push(&key, "claim names must be header-safe and not user/email/name");
        }
        claims.push((name.to_ascii_lowercase(), json_pointer(e, &key, pointer)));
    }
    let cookies = raw.cookies.unwrap_or_else(|| match &preset {
        Some(p) => p.cookies.iter().map(|c| c.to_string()).collect(),
        None => vec!["session".into()],
    });
    for (i, c) in cookies.iter().enumerate() {
        if c.is_empty() || c.contains([';', '=', ' ', ',']) {
            e.push(format!("auth.cookies[{i}]"), format!("invalid cookie name {c:?}"));
        }
    }
    let login_url = raw.login_url.unwrap_or_else(|| preset.as_ref().map_or("/login", |p| p.login_url).to_string());
    if !login_url.starts_with('/')
        || login_url.starts_with("//")
        || login_url.starts_with("/\\")
        || login_url.contains('#')
        || HeaderValue::from_str(&login_url).is_err()
    {
        e.push("auth.login_url", "must be a path on this site, e.g. \"/login\"");
    } else if login_url.contains(['{', '}']) {
        let query = login_url.split_once('?').map_or("", |(_, q)| q);
        if login_url.matches("{rd}").count() != 1
            || !query.contains("{rd}")
            || login_url.replacen("{rd}", "", 1).contains(['{', '}'])
        {
            e.push(
                "auth.login_url",
                "the only placeholder is one {rd} in the query, e.g. \"/api/auth/signin?callbackUrl={rd}\"",
            );
        }
    }
    let cache_max_entries = raw.cache_max_entries.unwrap_or(100_000);
    if cache_max_entries == 0 {
        e.push("auth.cache_max_entries", "must be at least 1 (set auth.cache_ttl = \"0\" to disable caching)");
    }
    AuthSettings {
        introspection_url: introspection_url.unwrap_or_else(|| Uri::from_static("http://127.0.0.1/")),
        timeout: e.positive_duration("auth.timeout", raw.timeout.as_deref(), Duration::from_secs(2)),
        cookies,
        forward_headers,
        user_id: json_pointer(e, "auth.user_id", raw.user_id.as_deref().unwrap_or("/user/id")),
        user_name: Some(json_pointer(e, "auth.user_name", raw.user_name.as_deref().unwrap_or("/user/name"))),
        user_email: Some(json_pointer(e, "auth.user_email", raw.user_email.as_deref().unwrap_or("/user/email"))),
        claims,
        cache_ttl: e.duration("auth.cache_ttl", raw.cache_ttl.as_deref(), Duration::from_secs(30)),
        negative_cache_ttl: e.duration(
            "auth.negative_cache_ttl",
            raw.negative_cache_ttl.as_deref(),
            Duration::from_secs(5),
        ),
        stale_if_error: e.duration("auth.stale_if_error", raw.stale_if_error.as_deref(), Duration::from_secs(60)),
        cache_max_entries: cache_max_entries.max(1),
        login_url,
        header_prefix,
        ca_file: raw.ca_file,
        respect_cache_control: raw
            .respect_cache_control
            .unwrap_or(preset.as_ref().is_none_or(|p| p.respect_cache_control)),
        max_in_flight: match raw.max_in_flight {
            Some(0) => {
                e.push("auth.max_in_flight", "must be at least 1");
                1
            }
            Some(n) => n,
            None => 256,
        },
        breaker_failures: raw.breaker_failures.unwrap_or(5),
        breaker_cooldown: e.positive_duration(
            "auth.breaker_cooldown",
            raw.breaker_cooldown.as_deref(),
            Duration::from_secs(5),
        ),
        introspection_rate_limit: raw.introspection_rate_limit,
    }
}

//! `[auth]`: introspection, cookies, presets, identity headers and claims.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use crate::config::errors::Errors;
use crate::config::raw::*;
use crate::config::settings::*;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    fn config_errors(auth: &str) -> Vec<String> {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n\
             [auth]\nintrospection_url = \"http://127.0.0.1:3000/s\"\n{auth}\n"
        );
        match crate::config::Config::from_toml(&text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn auth_config_rejects_credentials_the_gate_manages_itself() {
        let errs =
            config_errors("forward_headers = [\"authorization\", \"cookie\", \"Host\", \"x-auth-request-user\"]");
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("auth.forward_headers[1]: cookies are forwarded by auth.cookies"), "{errs:?}");
        assert!(errs[1].starts_with("auth.forward_headers[2]: host is never forwarded"), "{errs:?}");
        assert!(errs[2].starts_with("auth.forward_headers[3]: headers starting with auth.header_prefix"), "{errs:?}");
        for bad in ["//evil.example/login", "/login#x", "https://evil.example/login", "/\\\\evil"] {
            let errs = config_errors(&format!("login_url = {bad:?}"));
            assert!(errs.iter().any(|e| e.starts_with("auth.login_url:")), "{bad}: {errs:?}");
        }
        assert!(config_errors("login_url = \"/login?next=1\"\nrespect_cache_control = false").is_empty());
        assert!(config_errors("respect_cache_control = \"no\"").iter().any(|e| e.contains("respect_cache_control")));
    }

    fn settings(auth: &str) -> crate::config::AuthSettings {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n[auth]\n{auth}\n"
        );
        crate::config::Config::from_toml(&text).unwrap().auth.unwrap()
    }

    #[test]
    fn presets_set_the_framework_defaults_and_explicit_keys_win() {
        let a = settings("preset = \"nextauth\"");
        assert_eq!(a.introspection_url, "http://127.0.0.1:3000/api/auth/session");
        assert_eq!(a.cookies, ["__Secure-next-auth.session-token", "next-auth.session-token"]);
        assert_eq!(a.login_url, "/api/auth/signin?callbackUrl={rd}");
        assert!(!a.respect_cache_control, "NextAuth answers no-store");
        assert_eq!((a.user_id.as_str(), a.user_email.as_deref()), ("/user/id", Some("/user/email")));
        let a = settings("preset = \"authjs\"");
        assert_eq!(a.cookies, ["__Secure-authjs.session-token", "authjs.session-token"]);
        let a = settings("preset = \"django\"");
        assert_eq!(a.introspection_url, "http://127.0.0.1:3000/auth/whoami/");
        assert_eq!(
            (a.cookies.as_slice(), a.login_url.as_str()),
            (&["sessionid".to_string()][..], "/accounts/login/?next={rd}")
        );
        assert!(a.respect_cache_control);
        let a = settings(
            "preset = \"nextauth\"\nintrospection_url = \"http://127.0.0.1:4000/s\"\ncookies = []\nlogin_url = \"/login\"\nrespect_cache_control = true",
        );
        assert_eq!(
            (a.introspection_url.to_string().as_str(), a.login_url.as_str()),
            ("http://127.0.0.1:4000/s", "/login")
        );
        assert!(a.cookies.is_empty() && a.respect_cache_control);
        let errs = config_errors("preset = \"rails\"");
        assert!(errs.iter().any(|e| e.starts_with("auth.preset: must be nextauth, authjs or django")), "{errs:?}");
    }

    #[test]
    fn login_url_takes_one_rd_placeholder_in_its_query() {
        assert!(config_errors("login_url = \"/accounts/login/?next={rd}\"").is_empty());
        for bad in ["/login/{rd}", "/login?a={rd}&b={rd}", "/login?next={next}", "/login?next={rd}}"] {
            let errs = config_errors(&format!("login_url = {bad:?}"));
            assert!(errs.iter().any(|e| e.starts_with("auth.login_url: the only placeholder")), "{bad}: {errs:?}");
        }
    }
}

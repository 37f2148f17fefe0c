//! Validation of the core sections (`[server]`, `[tls]`, `[upstream]`, `[admin]`, `[[routes]]`,
//! `[log]`) and the cross-section rules; every problem is pushed with its key.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;

use crate::config::auth::validate_auth;
use crate::config::chatkit::validate_chatkit;
use crate::config::chatkit_server::validate_chatkit_server;
use crate::config::errors::{Errors, check_policy_names};
use crate::config::rate_limit::validate_rate_limit;
use crate::config::raw::*;
use crate::config::settings::*;

pub(super) fn validate(raw: RawConfig, e: &mut Errors) -> Option<Config> {
    let server = validate_server(raw.server, e);
    let tls = validate_tls(raw.tls, e);
    let upstream = validate_upstream(raw.upstream, e);
    let admin = AdminSettings {
        listen: match raw.admin.listen.as_deref() {
            Some(v) => e.addr("admin.listen", v),
            None => Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
        }
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9090))),
        max_connections: match raw.admin.max_connections {
            Some(0) => {
                e.push("admin.max_connections", "must be at least 1");
                1
            }
            Some(n) => n,
            None => 64,
        },
    };
    let auth = raw.auth.map(|a| validate_auth(a, upstream.as_ref().map(|u| &u.url), e));
    let rate_limit = raw.rate_limit.map(|r| validate_rate_limit(r, e));
    let chatkit = raw.chatkit.map(|c| validate_chatkit(c, rate_limit.as_ref(), e));
    let routes = validate_routes(raw.routes, auth.is_some(), rate_limit.as_ref(), e);
    let log = validate_log(raw.log, e);

    if let Some(server) = &server {
        if let Some(redirect) = server.redirect_listen
            && redirect == server.listen
        {
            e.push("server.redirect_listen", "must differ from server.listen");
        }
        if admin.listen == server.listen {
            e.push("admin.listen", "must differ from server.listen (metrics never on the public port)");
        }
    }
    if let (Some(chatkit), Some(auth)) = (&chatkit, &auth) {
        for var in &chatkit.state_variables {
            if let StateSource::Claim(claim) = &var.source
                && !auth.claims.iter().any(|(name, _)| name == claim)
            {
                e.push(
                    format!("chatkit.state_variables.{}.claim", var.name),
                    format!("claim {claim:?} is not defined in auth.claims"),
                );
            }
        }
    }
    if let Some(policy) = auth.as_ref().and_then(|a| a.introspection_rate_limit.as_ref()) {
        let key = "auth.introspection_rate_limit";
        match rate_limit.as_ref().map(|rl| rl.policies.get(policy)) {
            None => e.push(key, format!("policy {policy:?} named but there is no [rate_limit] section")),
            Some(None) => e.push(key, format!("unknown policy {policy:?} (not in rate_limit.policies)")),
            Some(Some(p)) if p.key != LimitKey::Ip => {
                e.push(key, format!("policy {policy:?} must have key = \"ip\" (no user is known before introspection)"))
            }
            Some(Some(_)) => {}
        }
    }
    for (i, route) in routes.iter().enumerate() {
        if route.chatkit_server.as_ref().is_some_and(|c| c.thread_ownership) && auth.is_none() {
            e.push(
                format!("routes[{i}].chatkit_server.thread_ownership"),
                "needs an [auth] section (owners are users)",
            );
        }
        if let Some(rule) = route.chatkit_server.as_ref().and_then(|c| c.models.as_ref())
            && !auth.as_ref().is_some_and(|a| a.claims.iter().any(|(name, _)| *name == rule.claim))
        {
            e.push(
                format!("routes[{i}].chatkit_server.models.claim"),
                format!("claim {:?} is not defined in auth.claims", rule.claim),
            );
        }
    }
    if chatkit.is_some() && auth.is_none() {
        e.push("chatkit", "requires [auth]: sessions are minted for the signed-in user");
    }
    Some(Config { server: server?, tls: tls?, upstream: upstream?, admin, auth, routes, rate_limit, chatkit, log })
}

pub(super) fn validate_server(raw: Option<RawServer>, e: &mut Errors) -> Option<ServerSettings> {
    let Some(raw) = raw else {
        e.push("server", "missing section (server.listen is required)");
        return None;
    };
    let listen = match raw.listen.as_deref() {
        Some(v) => e.addr("server.listen", v),
        None => {
            e.push("server.listen", "required");
            None
        }
    };
    let redirect_listen = raw.redirect_listen.as_deref().and_then(|v| e.addr("server.redirect_listen", v));
    let mut hosts = Vec::new();
    for (i, h) in raw.hosts.iter().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        if h.is_empty() || h.contains(['/', ' ', '@', '?', '#']) || h.parse::<http::uri::Authority>().is_err() {
            e.push(format!("server.hosts[{i}]"), format!("invalid host {h:?}"));
        } else {
            hosts.push(h);
        }
    }
    let mut trusted_proxies = Vec::new();
    for (i, p) in raw.trusted_proxies.iter().enumerate() {
        let parsed = p.parse::<IpNet>().or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => e.push(
                format!("server.trusted_proxies[{i}]"),
                format!("invalid CIDR or address {p:?}: expected e.g. \"10.0.0.0/8\""),
            ),
        }
    }
    let max_header_bytes = raw.max_header_bytes.unwrap_or(32 * 1024);
    if max_header_bytes < 8192 {
        e.push("server.max_header_bytes", "must be at least 8192");
    }
    let max_connections = raw.max_connections.unwrap_or(10_000);
    if max_connections == 0 {
        e.push("server.max_connections", "must be at least 1");
    }
    let workers = match raw.workers {
        Some(w) if !(1..=MAX_WORKERS).contains(&w) => {
            e.push("server.workers", format!("must be between 1 and {MAX_WORKERS}"));
            None
        }
        w => w,
    };
    let mut upgrades = Vec::new();
    for (i, u) in raw.upgrades.unwrap_or_else(|| vec!["websocket".into()]).iter().enumerate() {
        let u = u.trim().to_ascii_lowercase();
        if u == "h2c" {
            e.push(format!("server.upgrades[{i}]"), "h2c is never tunnelled (it would bypass the gate)");
        } else if u.is_empty() || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~!#$&'*+^`|".contains(&b)) {
            e.push(format!("server.upgrades[{i}]"), format!("invalid protocol token {u:?}"));
        } else {
            upgrades.push(u);
        }
    }
    Some(ServerSettings {
        listen: listen?,
        redirect_listen,
        https_port: raw.https_port.unwrap_or(443),
        hosts,
        trusted_proxies,
        header_timeout: e.positive_duration(
            "server.header_timeout",
            raw.header_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_header_bytes: max_header_bytes.max(8192),
        max_body_bytes: raw.max_body_bytes,
        idle_timeout: e.positive_duration("server.idle_timeout", raw.idle_timeout.as_deref(), Duration::from_secs(60)),
        max_connections: max_connections.max(1),
        workers,
        shutdown_grace: e.duration("server.shutdown_grace", raw.shutdown_grace.as_deref(), Duration::from_secs(25)),
        shutdown_delay: e.duration("server.shutdown_delay", raw.shutdown_delay.as_deref(), Duration::from_secs(5)),
        body_timeout: e.positive_duration("server.body_timeout", raw.body_timeout.as_deref(), Duration::from_secs(30)),
        upgrades,
        allow_underscore_headers: raw.allow_underscore_headers,
    })
}

pub(super) fn validate_tls(raw: Option<RawTls>, e: &mut Errors) -> Option<TlsSettings> {
    let Some(raw) = raw else {
        e.push("tls", "missing section: set tls.cert_file and tls.key_file, or tls.self_signed = true");
        return None;
    };
    let source = match (raw.self_signed, raw.cert_file, raw.key_file) {
        (true, None, None) => Some(TlsSource::SelfSigned),
        (true, _, _) => {
            e.push("tls.self_signed", "cannot be combined with tls.cert_file/tls.key_file");
            None
        }
        (false, Some(cert_file), Some(key_file)) => Some(TlsSource::Files { cert_file, key_file }),
        (false, None, _) => {
            e.push("tls.cert_file", "required (or tls.self_signed = true for development)");
            None
        }
        (false, Some(_), None) => {
            e.push("tls.key_file", "required with tls.cert_file");
            None
        }
    };
    let hsts = match raw.hsts.as_deref() {
        None => Some(HeaderValue::from_static("max-age=31536000; includeSubDomains")),
        Some("") => None,
        Some(v) => match HeaderValue::from_str(v) {
            Ok(h) => Some(h),
            Err(_) => {
                e.push("tls.hsts", "not a valid header value");
                None
            }
        },
    };
    Some(TlsSettings {
        source: source?,
        reload_interval: e.positive_duration(
            "tls.reload_interval",
            raw.reload_interval.as_deref(),
            Duration::from_secs(10),
        ),
        handshake_timeout: e.positive_duration(
            "tls.handshake_timeout",
            raw.handshake_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        hsts,
    })
}

pub(super) fn validate_upstream(raw: Option<RawUpstream>, e: &mut Errors) -> Option<UpstreamSettings> {
    let Some(raw) = raw else {
        e.push("upstream", "missing section (upstream.url is required)");
        return None;
    };
    let url = match raw.url.as_deref() {
        Some(v) => e.http_url("upstream.url", v, false),
        None => {
            e.push("upstream.url", "required");
            None
        }
    };
    if let Some(u) = &url
        && u.path() != "/"
        && !u.path().is_empty()
    {
        e.push("upstream.url", "must not have a path (requests keep their own path)");
    }
    Some(UpstreamSettings {
        url: url?,
        connect_timeout: e.positive_duration(
            "upstream.connect_timeout",
            raw.connect_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        timeout: e.positive_duration("upstream.timeout", raw.timeout.as_deref(), Duration::from_secs(60)),
        pool_idle_timeout: e.positive_duration(
            "upstream.pool_idle_timeout",
            raw.pool_idle_timeout.as_deref(),
            // Below the idle timeouts of common app servers (gunicorn 2 s, Node and uvicorn 5 s):
            // the gate must drop a pooled connection before the app does.
            Duration::from_secs(1),
        ),
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
    })
}

pub(super) fn validate_routes(
    raw: Vec<RawRoute>,
    has_auth: bool,
    rate_limit: Option<&RateLimitSettings>,
    e: &mut Errors,
) -> Vec<RouteSettings> {
    let mut routes: Vec<RouteSettings> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let path = match r.path {
            // Routes match the normalised request path, so a route path must be normalised too.
            Some(p)
                if p.starts_with('/') && crate::http::path::normalize_path(&p).ok().as_deref() != Some(p.as_str()) =>
            {
                e.push(
                    format!("{key}.path"),
                    format!(
                        "must be a normalised path: no '.'/'..' segments, '//', '\\' or encoded separators (got {p:?})"
                    ),
                );
                continue;
            }
            Some(p) if p.starts_with('/') => p,
            Some(p) => {
                e.push(format!("{key}.path"), format!("must start with '/' (got {p:?})"));
                continue;
            }
            None => {
                e.push(format!("{key}.path"), "required");
                continue;
            }
        };
        let auth = match r.auth.as_deref() {
            None if has_auth => RouteAuth::Required,
            None => RouteAuth::Public,
            Some("public") => RouteAuth::Public,
            Some("optional") => RouteAuth::Optional,
            Some("required") => RouteAuth::Required,
            Some(other) => {
                e.push(format!("{key}.auth"), format!("must be public, optional or required (got {other:?})"));
                RouteAuth::Required
            }
        };
        if auth != RouteAuth::Public && !has_auth {
            e.push(format!("{key}.auth"), "needs an [auth] section (without it every route is public)");
        }
        let unauthenticated = match r.unauthenticated.as_deref() {
            None | Some("auto") => Unauthenticated::Auto,
            Some("json") => Unauthenticated::Json,
            Some("redirect") => Unauthenticated::Redirect,
            Some(other) => {
                e.push(format!("{key}.unauthenticated"), format!("must be json, redirect or auto (got {other:?})"));
                Unauthenticated::Auto
            }
        };
        check_policy_names(&format!("{key}.rate_limit"), &r.rate_limit, rate_limit, e);
        let name = r.name.unwrap_or_else(|| path.clone());
        if name.is_empty() || name.len() > 64 {
            e.push(format!("{key}.name"), "must be 1 to 64 characters");
        }
        if routes.iter().any(|x| x.name == name) {
            e.push(format!("{key}.name"), format!("duplicate route name {name:?}"));
        }
        let chatkit_server =
            r.chatkit_server.map(|c| validate_chatkit_server(&format!("{key}.chatkit_server"), c, rate_limit, e));
        routes.push(RouteSettings { name, path, auth, unauthenticated, rate_limit: r.rate_limit, chatkit_server });
    }
    routes
}

pub(super) fn validate_log(raw: RawLog, e: &mut Errors) -> LogSettings {
    let format = match raw.format.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(other) => {
            e.push("log.format", format!("must be json or text (got {other:?})"));
            LogFormat::Json
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        e.push("log.level", format!("invalid level {level:?}: expected e.g. \"info\" or \"debug\""));
    }
    LogSettings { format, level, audit_file: raw.audit_file }
}

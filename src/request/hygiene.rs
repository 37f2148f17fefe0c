//! What the app may trust: one pass over every request before it is routed. The path is
//! normalised (and that normalised path is both routed on and forwarded), `Host` is validated,
//! and hop-by-hop and gate-owned client headers are removed before the gate adds its own.

use http::header::{CONNECTION, CONTENT_LENGTH, COOKIE, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};

use crate::http::error::GateError;
use crate::http::headers;

/// The request URI with `path` in place of its own (query kept), in origin form.
pub fn with_path(uri: &Uri, path: &str) -> Result<Uri, GateError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    Uri::builder().path_and_query(pq).build().map_err(|_| GateError::BadRequest("Bad request"))
}

/// RFC 9112 §3.2 / RFC 3986 `host [":" port]`: a DNS-style name or IPv4 address, or an IPv6
/// literal in brackets, and an optional numeric port. Stricter than the RFC's reg-name on
/// purpose: no percent-escapes, no sub-delims, no userinfo.
fn valid_host(h: &[u8]) -> bool {
    if h.is_empty() || h.len() > 262 {
        return false;
    }
    let (name, port) = if h[0] == b'[' {
        let Some(end) = h.iter().position(|&c| c == b']') else { return false };
        let inner = &h[1..end];
        if inner.is_empty() || !inner.iter().all(|&c| c.is_ascii_hexdigit() || c == b':' || c == b'.') {
            return false;
        }
        (&h[..=end], &h[end + 1..])
    } else {
        match h.iter().position(|&c| c == b':') {
            Some(i) => (&h[..i], &h[i..]),
            None => (h, &h[h.len()..]),
        }
    };
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    if name[0] != b'[' && !name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_') {
        return false;
    }
    match port {
        [] => true,
        [b':', digits @ ..] => {
            !digits.is_empty() && digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit) && {
                let n: u32 = digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'));
                (1..=65535).contains(&n)
            }
        }
        _ => false,
    }
}

/// The host part, lower-cased, without port or trailing dot (for `server.hosts`).
fn host_name(h: &str) -> String {
    let name =
        if h.starts_with('[') { h.find(']').map_or(h, |i| &h[..=i]) } else { h.rsplit_once(':').map_or(h, |(n, _)| n) };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The one host this request is for, validated: `400` for a missing, repeated or malformed
/// `Host` or an HTTP/2 `host` contradicting `:authority`; `421` for a host not in `hosts`.
/// In absolute form (`GET http://h/ HTTP/1.1`) the target's host wins over `Host` (RFC 9112
/// §3.2.2); the app then receives that host.
pub fn request_host(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
    hosts: &[String],
) -> Result<HeaderValue, GateError> {
    let bad = GateError::BadRequest("Bad request");
    let mut host_headers = headers.get_all(HOST).iter();
    let host_header = host_headers.next();
    if host_headers.next().is_some() {
        return Err(bad);
    }
    let authority = uri.authority().map(|a| a.as_str());
    let chosen: &[u8] = match (version, authority, host_header) {
        (Version::HTTP_2 | Version::HTTP_3, Some(a), Some(h)) => {
            if !a.as_bytes().eq_ignore_ascii_case(h.as_bytes()) {
                return Err(bad);
            }
            a.as_bytes()
        }
        (Version::HTTP_2 | Version::HTTP_3, Some(a), None) => a.as_bytes(),
        (Version::HTTP_2 | Version::HTTP_3, None, Some(h)) => h.as_bytes(),
        // HTTP/1.1 requires Host even in absolute form; an HTTP/1.0 request may omit it.
        (_, Some(a), Some(_)) => a.as_bytes(),
        (Version::HTTP_10 | Version::HTTP_09, Some(a), None) => a.as_bytes(),
        (_, None, Some(h)) => h.as_bytes(),
        _ => return Err(bad),
    };
    if !valid_host(chosen) {
        return Err(bad);
    }
    let Ok(text) = std::str::from_utf8(chosen) else { return Err(bad) };
    if !hosts.is_empty() && !hosts.contains(&host_name(text)) {
        return Err(GateError::MisdirectedRequest);
    }
    match host_header {
        // The Host header's own value when it is what was chosen: shared, not copied.
        Some(h) if h.as_bytes() == chosen => Ok(h.clone()),
        _ => HeaderValue::from_str(text).map_err(|_| bad),
    }
}

/// Does `name` (already lower-case) start with `prefix`, reading `_` in `name` as `-`?
fn starts_folded(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len() && name.iter().zip(prefix).all(|(&n, &p)| n == p || (n == b'_' && p == b'-'))
}

fn eq_folded(name: &[u8], other: &[u8]) -> bool {
    name.len() == other.len() && starts_folded(name, other)
}

/// Client headers the gate owns outright: whoever sends them, the app only ever sees the gate's.
fn gate_owned(name: &[u8], identity_prefix: &[u8]) -> bool {
    starts_folded(name, identity_prefix)
        || starts_folded(name, b"x-forwarded-")
        || starts_folded(name, b"x-original-")
        || eq_folded(name, b"x-request-id")
        || eq_folded(name, b"proxy")
}

/// Client-IP and URL-override headers, believed only from `trusted_proxies`.
fn untrusted_override(name: &[u8]) -> bool {
    [&b"forwarded"[..], b"x-real-ip", b"x-client-ip", b"true-client-ip", b"x-rewrite-url", b"x-cluster-client-ip"]
        .iter()
        .any(|n| eq_folded(name, n))
}

/// Rules for the header pass, fixed at start.
#[derive(Debug, Clone)]
pub struct HeaderRules {
    /// The identity header prefix, lower-case, `-` form.
    pub identity_prefix: String,
    pub allow_underscore: bool,
    /// Upgrade protocols that may be tunnelled (lower-case).
    pub upgrades: Vec<String>,
}

/// What the header pass found out.
#[derive(Debug, Default)]
pub struct Cleaned {
    /// The allowed protocol the client asked to switch to (its `Upgrade` value), if any.
    pub upgrade: Option<HeaderValue>,
    /// A trusted peer's `X-Forwarded-For` chain, joined, to extend.
    pub prior_forwarded_for: Option<String>,
}

/// The protocol name of an `Upgrade` value's first offer (`websocket`, `h2c`, `TLS/1.2` → `tls`).
fn upgrade_protocol(v: &HeaderValue) -> Option<String> {
    let first = v.to_str().ok()?.split(',').next()?.trim();
    let name = first.split('/').next()?.trim();
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// One pass over the client's headers, before authentication adds identity headers: remove
/// hop-by-hop headers and those `Connection` names, every gate-owned header (any case, `_` read
/// as `-`), client-IP overrides from untrusted peers, and underscore names unless allowed. HTTP/2
/// cookie crumbs are joined into one `Cookie` (RFC 9113 §8.2.3). An `Upgrade` survives only
/// for an allowed protocol on HTTP/1.1 (`Connection: upgrade` is then re-added).
pub fn clean_request_headers(
    headers: &mut HeaderMap,
    version: Version,
    peer_trusted: bool,
    rules: &HeaderRules,
) -> Cleaned {
    let mut cleaned = Cleaned::default();
    let mut connection_upgrade = false;
    let mut named: Vec<HeaderName> = Vec::new();
    for token in headers::connection_tokens(headers) {
        if token.eq_ignore_ascii_case("upgrade") {
            connection_upgrade = true;
        } else if let Ok(n) = HeaderName::from_bytes(token.as_bytes())
            && n != HOST
            && n != CONTENT_LENGTH
            // `Connection: keep-alive` and friends are removed below anyway: no list needed.
            && !headers::HOP_BY_HOP.contains(&n)
        {
            named.push(n);
        }
    }
    if version == Version::HTTP_11
        && connection_upgrade
        && let Some(v) = headers.get(UPGRADE)
        && headers.get_all(UPGRADE).iter().count() == 1
        && upgrade_protocol(v).is_some_and(|p| p != "h2c" && rules.upgrades.contains(&p))
    {
        cleaned.upgrade = Some(v.clone());
    }
    if peer_trusted {
        let mut chain = String::new();
        for v in headers.get_all(&headers::X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                if !chain.is_empty() {
                    chain.push_str(", ");
                }
                chain.push_str(s.trim());
            }
        }
        cleaned.prior_forwarded_for = (!chain.is_empty()).then_some(chain);
    }
    let prefix = rules.identity_prefix.as_bytes();
    // The hop-by-hop names present are noted on the same pass: only they are removed.
    let mut hop = headers::HopByHop::default();
    for name in headers.keys() {
        if hop.note(name) {
            continue;
        }
        let n = name.as_str().as_bytes();
        let doomed = gate_owned(n, prefix)
            || (!peer_trusted && untrusted_override(n))
            || (!rules.allow_underscore && n.contains(&b'_'));
        if doomed {
            named.push(name.clone());
        }
    }
    hop.drop_length_beside_chunked(headers);
    hop.remove_from(headers);
    for name in named {
        headers.remove(name);
    }
    if let Some(v) = &cleaned.upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, v.clone());
    }
    join_cookies(headers);
    cleaned
}

/// Several `Cookie` fields (HTTP/2 sends one per cookie) become one, joined with `; `.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (all.next(), all.next()) else { return };
    let mut joined = Vec::with_capacity(first.len() * 4);
    for (i, v) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

/// Does the app's 101 switch to the protocol the client asked for?
pub fn upgrade_accepted(asked: &HeaderValue, answered: &HeaderMap) -> bool {
    let mut all = answered.get_all(UPGRADE).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => upgrade_protocol(v).is_some() && upgrade_protocol(v) == upgrade_protocol(asked),
        _ => false,
    }
}

/// Methods the gate never forwards.
pub fn method_allowed(m: &Method) -> bool {
    m != Method::CONNECT
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn hosts_are_validated() {
        for ok in ["example.com", "example.com:8443", "127.0.0.1:1", "[::1]:443", "a_b.local"] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "a/evil", "a b", "user@host", "host:", "host:0", "host:99999", "[zz]", "h%41", "a:1:2"] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn underscore_and_case_variants_of_owned_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x_auth_request_user", HeaderValue::from_static("admin"));
        h.insert("x-auth-request-email", HeaderValue::from_static("a@b"));
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("proxy", HeaderValue::from_static("http://evil"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-drop"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let rules = HeaderRules { identity_prefix: "x-auth-request-".into(), allow_underscore: true, upgrades: vec![] };
        clean_request_headers(&mut h, Version::HTTP_11, false, &rules);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn content_length_beside_transfer_encoding_is_dropped_from_requests() {
        let rules =
            HeaderRules { identity_prefix: "x-auth-request-".into(), allow_underscore: false, upgrades: vec![] };
        let mut h = HeaderMap::new();
        h.insert("Transfer-Encoding", HeaderValue::from_static("chunked"));
        h.insert("Content-Length", HeaderValue::from_static("40"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        clean_request_headers(&mut h, Version::HTTP_11, false, &rules);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        // Without Transfer-Encoding the length frames the body: kept.
        let mut h = HeaderMap::new();
        h.insert("Content-Length", HeaderValue::from_static("40"));
        clean_request_headers(&mut h, Version::HTTP_11, false, &rules);
        assert_eq!(h["content-length"], "40");
    }

    #[test]
    fn identity_headers_are_removed_in_every_case_and_repeat() {
        let mut h = HeaderMap::new();
        h.append("x-auth-request-user", HeaderValue::from_static("admin"));
        h.append("X-Auth-Request-User", HeaderValue::from_static("root"));
        h.append("x-auth-request-anything", HeaderValue::from_static("1"));
        h.append("x-auth", HeaderValue::from_static("kept"));
        let rules =
            HeaderRules { identity_prefix: "x-auth-request-".into(), allow_underscore: false, upgrades: vec![] };
        clean_request_headers(&mut h, Version::HTTP_11, false, &rules);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-auth"], "kept");
    }

    #[test]
    fn only_allowed_upgrades_survive() {
        let rules = HeaderRules {
            identity_prefix: "x-auth-request-".into(),
            allow_underscore: false,
            upgrades: vec!["websocket".into()],
        };
        for (asked, kept) in [("websocket", true), ("WebSocket", true), ("h2c", false), ("tls/1.2", false)] {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static("Upgrade"));
            h.insert("upgrade", HeaderValue::from_str(asked).unwrap());
            let c = clean_request_headers(&mut h, Version::HTTP_11, false, &rules);
            assert_eq!(c.upgrade.is_some(), kept, "{asked}");
            assert_eq!(h.contains_key("upgrade"), kept, "{asked}");
        }
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }
}

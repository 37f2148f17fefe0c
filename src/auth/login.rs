//! Sending a signed-out browser to sign in: which requests are navigations, and the way back
//! (`rd`) as a relative, encoded path.

use http::Method;
use http::header::ACCEPT;

/// A browser navigation (`auto` redirects these): a GET/HEAD with `Sec-Fetch-Mode: navigate`,
/// or, from browsers that send no `Sec-Fetch-Mode`, one that accepts `text/html`.
pub(crate) fn is_navigation(parts: &http::request::Parts) -> bool {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return false;
    }
    if let Some(mode) = parts.headers.get("sec-fetch-mode") {
        return mode.as_bytes().eq_ignore_ascii_case(b"navigate");
    }
    parts.headers.get_all(ACCEPT).iter().any(|v| v.as_bytes().windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html")))
}

/// The `rd` target: the original path and query, only ever as a path on this site.
pub(crate) fn return_path(path_and_query: &str) -> &str {
    let pq = path_and_query;
    if !pq.starts_with('/') || pq.starts_with("//") || pq.starts_with("/\\") || pq.len() > 2048 {
        return "/";
    }
    pq
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use http::Request;

    use super::*;

    #[test]
    fn return_path_is_always_relative_and_encoded() {
        assert_eq!(percent_encode(return_path("/original?q=1")), "%2Foriginal%3Fq%3D1");
        assert_eq!(return_path("//evil.example/x"), "/");
        assert_eq!(return_path("/\\evil.example"), "/");
        assert_eq!(return_path("https://evil.example/"), "/");
        assert_eq!(percent_encode("/a b/ü"), "%2Fa%20b%2F%C3%BC");
    }

    #[test]
    fn navigation_is_get_or_head_by_fetch_mode_then_accept() {
        let parts = |method: &str, headers: &[(&str, &str)]| {
            let mut b = Request::builder().method(method).uri("/x");
            for (n, v) in headers {
                b = b.header(*n, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert!(is_navigation(&parts("GET", &[("sec-fetch-mode", "navigate")])));
        assert!(is_navigation(&parts("HEAD", &[("accept", "text/html,application/xhtml+xml")])));
        assert!(!is_navigation(&parts("GET", &[("sec-fetch-mode", "cors"), ("accept", "text/html")])));
        assert!(!is_navigation(&parts("POST", &[("sec-fetch-mode", "navigate")])));
        assert!(!is_navigation(&parts("GET", &[("accept", "application/json")])));
    }
}

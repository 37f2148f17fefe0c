//! Request-target path normalisation: percent-decoding of unreserved bytes, dot segments and
//! repeated slashes resolved, unsafe forms refused; and the segment-boundary prefix match that
//! routes use. The gate routes on the normalised path and forwards that same path.

use std::borrow::Cow;

/// Why a request target cannot be normalised safely (answered `400 {"error":"Bad request"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsafePath;

/// Normalise a request path (no query): decode percent-encoded unreserved characters, resolve
/// `.` and `..` segments (RFC 3986 §5.2.4), merge repeated slashes. Rejected, because an app
/// or a router may read them differently from the gate: percent-encoded `.`, `/`, `\` or NUL
/// (and their double-encoded `%25..` forms), a raw `\` or NUL, a malformed `%`, a `.`/`..`
/// segment carrying `;` parameters (`..;/`, read as `..` by Java servers), and a `..` that
/// climbs above the root. A path that needs no change is returned borrowed (no allocation).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, UnsafePath> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(UnsafePath);
    }
    let mut clean = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' | 0 => return Err(UnsafePath),
            b'%' => clean = false,
            b'/' if matches!(b.get(i + 1), Some(b'/' | b'.')) => clean = false,
            _ => {}
        }
    }
    if clean {
        return Ok(Cow::Borrowed(path));
    }
    // Segments after the leading '/'; empty ones (from "//") are merged away.
    let mut out: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    for raw in path[1..].split('/') {
        if raw.is_empty() {
            trailing_slash = true;
            continue;
        }
        let seg = decode_segment(raw)?;
        let bare = seg.split(';').next().unwrap_or("");
        if (bare == "." || bare == "..") && seg.len() != bare.len() {
            return Err(UnsafePath);
        }
        match bare {
            "." => trailing_slash = true,
            ".." => {
                if out.pop().is_none() {
                    return Err(UnsafePath);
                }
                trailing_slash = true;
            }
            _ => {
                out.push(seg.into_owned());
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    Ok(Cow::Owned(s))
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// One segment with unreserved characters decoded and other escapes upper-cased.
fn decode_segment(seg: &str) -> Result<Cow<'_, str>, UnsafePath> {
    if !seg.contains('%') {
        return Ok(Cow::Borrowed(seg));
    }
    let b = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'%' {
            out.push(c as char);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) else {
            return Err(UnsafePath);
        };
        let v = hi << 4 | lo;
        match v {
            b'.' | b'/' | b'\\' | 0 => return Err(UnsafePath),
            // "%252e" is "%2e" to an app that decodes twice.
            b'%' if b.len() >= i + 5 => {
                let next = (b.get(i + 3).copied().and_then(hex), b.get(i + 4).copied().and_then(hex));
                if let (Some(h2), Some(l2)) = next
                    && matches!(h2 << 4 | l2, b'.' | b'/' | b'\\' | 0)
                {
                    return Err(UnsafePath);
                }
                out.push_str("%25");
            }
            v if v.is_ascii_alphanumeric() || v == b'-' || v == b'_' || v == b'~' => out.push(v as char),
            v => {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[(v >> 4) as usize]));
                out.push(char::from(b"0123456789ABCDEF"[(v & 15) as usize]));
            }
        }
        i += 3;
    }
    // Every byte pushed is ASCII or came from the (UTF-8) input unchanged.
    Ok(Cow::Owned(out))
}

/// Does a route `prefix` match `path` on a segment boundary? `/login` matches `/login` and
/// `/login/…`, never `/loginx`; `/api/` matches everything under it and `/api` itself.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => prefix.strip_suffix('/').is_some_and(|p| p == path),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn norm(p: &str) -> Result<String, UnsafePath> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_and_slashes_are_resolved() {
        assert_eq!(norm("/login/../api/x").unwrap(), "/api/x");
        assert_eq!(norm("/a/./b//c").unwrap(), "/a/b/c");
        assert_eq!(norm("//api///x/").unwrap(), "/api/x/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/.well-known/x").unwrap(), "/.well-known/x");
        assert_eq!(norm("/%61pi/%7euser/%c3%a9").unwrap(), "/api/~user/%C3%A9");
        assert!(matches!(normalize_path("/plain/path").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        for p in [
            "/login/%2e%2e/api/x",
            "/login/.%2e/api/x",
            "/public/..%2fapi/x",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%00b",
            "/a%252e%252e/b",
            "/..",
            "/a/../../b",
            "/login/..;/api",
            "/x/.;a/y",
            "/bad%zz",
            "/bad%",
            "relative",
        ] {
            assert_eq!(norm(p), Err(UnsafePath), "{p}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/login", "/login"));
        assert!(prefix_matches("/login", "/login/x"));
        assert!(!prefix_matches("/login", "/loginx"));
        assert!(!prefix_matches("/login", "/login-admin"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(prefix_matches("/api/", "/api"));
        assert!(!prefix_matches("/api/", "/apix"));
        assert!(prefix_matches("/", "/anything"));
    }
}

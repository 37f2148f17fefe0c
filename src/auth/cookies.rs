//! Cookies as credentials: which `Cookie` pairs are forwarded, which `Set-Cookie` values of an
//! introspection answer may reach the browser, and the credentials the browser will send next
//! when the answer rotates them (sliding sessions), so that request is a cache hit.

use http::HeaderValue;

/// `name` is `base` or one of its chunks (`base.0`, `base.1`, … — NextAuth splits large JWTs).
pub(crate) fn is_name_or_chunk(name: &[u8], base: &[u8]) -> bool {
    match name.strip_prefix(base) {
        Some([]) => true,
        Some([b'.', digits @ ..]) => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// `name` without a chunk suffix (`tok.1` → `tok`).
fn chunk_base(name: &[u8]) -> &[u8] {
    if let Some(dot) = name.iter().rposition(|b| *b == b'.') {
        let digits = &name[dot + 1..];
        if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
            return &name[..dot];
        }
    }
    name
}

/// The `name=value` pairs of a `Cookie` value, trimmed, empty ones dropped.
pub(crate) fn pairs(cookie: &[u8]) -> impl Iterator<Item = &[u8]> {
    cookie.split(|b| *b == b';').map(<[u8]>::trim_ascii).filter(|p| !p.is_empty())
}

/// The name of a `name=value` pair (or of a `Set-Cookie` value).
pub(crate) fn pair_name(pair: &[u8]) -> &[u8] {
    let first = pair.split(|b| *b == b';').next().unwrap_or_default();
    first.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii()
}

/// Bytes fed to the cache key for a forwarded `Cookie` value: its pairs ordered by name (a
/// stable sort: two pairs of one name keep their order), so the key does not depend on the
/// order a browser happens to send them in — nor on where a rotated cookie ends up.
#[cfg(test)]
pub(crate) fn key_bytes(cookie: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cookie.len());
    feed_key_bytes(cookie, |b| out.extend_from_slice(b));
    out
}

/// The length of [`key_bytes`] of `cookie`.
pub(crate) fn key_bytes_len(cookie: &[u8]) -> usize {
    pairs(cookie).map(|p| 8 + p.len()).sum()
}

/// Hand the bytes of [`key_bytes`] to `feed` in order, without building them: a lone pair (the
/// usual session cookie) needs no sorting and no allocation.
pub(crate) fn feed_key_bytes(cookie: &[u8], mut feed: impl FnMut(&[u8])) {
    let mut it = pairs(cookie);
    let (Some(first), second) = (it.next(), it.next()) else { return };
    let Some(second) = second else {
        feed(&(first.len() as u64).to_le_bytes());
        feed(first);
        return;
    };
    let mut list: Vec<&[u8]> = [first, second].into_iter().chain(it).collect();
    list.sort_by(|a, b| pair_name(a).cmp(pair_name(b)));
    for p in list {
        feed(&(p.len() as u64).to_le_bytes());
        feed(p);
    }
}

/// One `Set-Cookie` value, as far as the gate needs to read it.
struct SetCookie<'a> {
    name: &'a [u8],
    value: &'a [u8],
    /// `Max-Age=0` (or negative), an `Expires` in 1970, or an empty value: the cookie is removed.
    deletes: bool,
}

fn parse_set_cookie(v: &HeaderValue) -> Option<SetCookie<'_>> {
    let mut parts = v.as_bytes().split(|b| *b == b';');
    let first = parts.next()?.trim_ascii();
    let eq = first.iter().position(|b| *b == b'=')?;
    let name = first[..eq].trim_ascii();
    let value = first[eq + 1..].trim_ascii();
    if name.is_empty() {
        return None;
    }
    let mut deletes = value.is_empty() || value == b"\"\"";
    for attr in parts {
        let attr = attr.trim_ascii();
        let (k, a) = match attr.iter().position(|b| *b == b'=') {
            Some(i) => (attr[..i].trim_ascii(), attr[i + 1..].trim_ascii()),
            None => (attr, &b""[..]),
        };
        if k.eq_ignore_ascii_case(b"max-age") && (a.starts_with(b"-") || a.iter().all(|b| *b == b'0')) {
            deletes = true;
        }
        if k.eq_ignore_ascii_case(b"expires") && a.windows(4).any(|w| w == b"1970") {
            deletes = true;
        }
    }
    Some(SetCookie { name, value, deletes })
}

/// Which `Set-Cookie` values of an introspection answer the browser may get: only cookies whose
/// name was forwarded on that call — the configured credential cookies and their chunks, or,
/// when the whole Cookie header is forwarded, the names that request carried (and their chunks).
/// Anything else the endpoint sets (a CSRF token, a callback URL) was minted for the gate's
/// call, not for the browser, and would overwrite the browser's own copy.
pub(crate) fn relayable(configured: &[String], forwarded: Option<&HeaderValue>, set_cookie: &HeaderValue) -> bool {
    let Some(sc) = parse_set_cookie(set_cookie) else {
        return false;
    };
    if !configured.is_empty() {
        return configured.iter().any(|c| is_name_or_chunk(sc.name, c.as_bytes()));
    }
    let base = chunk_base(sc.name);
    forwarded.is_some_and(|cookie| pairs(cookie.as_bytes()).any(|p| chunk_base(pair_name(p)) == base))
}

/// The forwarded `Cookie` value the browser will send once it has applied `relayed`, when that
/// changes it (a rotated session, chunks added or removed); `None` when nothing changes or no
/// cookie would be left.
pub(crate) fn rotated(forwarded: Option<&HeaderValue>, relayed: &[HeaderValue]) -> Option<Vec<u8>> {
    let mut list: Vec<Vec<u8>> =
        forwarded.map(|c| pairs(c.as_bytes()).map(<[u8]>::to_vec).collect()).unwrap_or_default();
    let mut changed = false;
    for sc in relayed.iter().filter_map(parse_set_cookie) {
        let at = list.iter().position(|p| pair_name(p) == sc.name);
        if sc.deletes {
            let before = list.len();
            list.retain(|p| pair_name(p) != sc.name);
            changed |= list.len() != before;
            continue;
        }
        let mut pair = sc.name.to_vec();
        pair.push(b'=');
        pair.extend_from_slice(sc.value);
        match at {
            Some(i) if list[i] == pair => {}
            Some(i) => {
                list[i] = pair;
                changed = true;
            }
            None => {
                list.push(pair);
                changed = true;
            }
        }
    }
    if !changed || list.is_empty() {
        return None;
    }
    Some(list.join(&b"; "[..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn chunks_are_the_name_a_dot_and_digits() {
        assert!(is_name_or_chunk(b"tok", b"tok"));
        assert!(is_name_or_chunk(b"tok.0", b"tok"));
        assert!(is_name_or_chunk(b"tok.12", b"tok"));
        assert!(!is_name_or_chunk(b"tok.", b"tok"));
        assert!(!is_name_or_chunk(b"tok.x", b"tok"));
        assert!(!is_name_or_chunk(b"tokx", b"tok"));
        assert!(!is_name_or_chunk(b"to", b"tok"));
        assert_eq!(chunk_base(b"a.b.3"), b"a.b");
        assert_eq!(chunk_base(b"next-auth.csrf-token"), b"next-auth.csrf-token");
    }

    #[test]
    fn only_forwarded_names_are_relayed() {
        let configured = vec!["__Secure-next-auth.session-token".to_string()];
        let session = hv("__Secure-next-auth.session-token=new; Path=/; HttpOnly; Secure");
        let chunk = hv("__Secure-next-auth.session-token.1=x; Path=/");
        let csrf = hv("__Host-next-auth.csrf-token=abc%7Cdef; Path=/; HttpOnly; Secure");
        let callback = hv("__Secure-next-auth.callback-url=https%3A%2F%2Fx; Path=/");
        assert!(relayable(&configured, None, &session));
        assert!(relayable(&configured, None, &chunk));
        assert!(!relayable(&configured, None, &csrf));
        assert!(!relayable(&configured, None, &callback));
        assert!(!relayable(&configured, None, &hv("garbage")));
        // The whole Cookie header forwarded: the names that request carried, and their chunks.
        let carried = hv("tok.0=a; tok.1=b; theme=dark");
        assert!(relayable(&[], Some(&carried), &hv("tok.2=c")));
        assert!(relayable(&[], Some(&carried), &hv("theme=light")));
        assert!(!relayable(&[], Some(&carried), &hv("csrf=1")));
        assert!(!relayable(&[], None, &hv("tok.0=a")));
    }

    #[test]
    fn a_rotation_gives_the_cookie_the_browser_sends_next() {
        let fwd = hv("a=1; s.0=x; s.1=y");
        let next = rotated(Some(&fwd), &[hv("s.0=X; Path=/"), hv("s.1=; Max-Age=0")]).unwrap();
        assert_eq!(next, b"a=1; s.0=X");
        let next = rotated(Some(&fwd), &[hv("s.2=z; Path=/")]).unwrap();
        assert_eq!(next, b"a=1; s.0=x; s.1=y; s.2=z");
        assert_eq!(rotated(Some(&fwd), &[hv("a=1; Path=/")]), None, "same value: no change");
        assert_eq!(rotated(Some(&hv("s=1")), &[hv("s=gone; Expires=Thu, 01 Jan 1970 00:00:00 GMT")]), None);
        assert_eq!(rotated(Some(&fwd), &[]), None);
    }

    #[test]
    fn key_bytes_are_length_prefixed_pairs_sorted_by_name() {
        assert_eq!(key_bytes(b""), b"");
        assert_eq!(key_bytes(b" ; "), b"");
        assert_eq!(key_bytes(b"s=1"), [&3u64.to_le_bytes()[..], b"s=1"].concat());
        assert_eq!(key_bytes(b"b=2; a=1"), [&3u64.to_le_bytes()[..], b"a=1", &3u64.to_le_bytes()[..], b"b=2"].concat());
        for c in [&b""[..], b"s=1", b"b=2; a=1", b"x=1;y=22; a=333;"] {
            assert_eq!(key_bytes_len(c), key_bytes(c).len(), "{c:?}");
        }
    }

    #[test]
    fn key_bytes_ignore_pair_order_but_not_values() {
        assert_eq!(key_bytes(b"a=1; b=2"), key_bytes(b"b=2;a=1"));
        assert_ne!(key_bytes(b"a=1; b=2"), key_bytes(b"a=1; b=3"));
        assert_ne!(key_bytes(b"a=1; a=2"), key_bytes(b"a=2; a=1"), "duplicates keep their order");
        assert_ne!(key_bytes(b"a=1; b=2"), key_bytes(b"a=1b=2"));
    }
}

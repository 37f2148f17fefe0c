//! Which cookies and headers of a request are credentials (the configured cookies, with their
//! chunked `.0/.1` forms, or the whole `Cookie` header; `forward_headers`), and their salted
//! SHA-256 cache key, computed from the request without copying until an introspection call needs it.

use bytes::Bytes;
use http::header::COOKIE;
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::auth::cache::Key;

/// The credentials a request carries, as they will be forwarded, and their cache key.
pub(crate) struct Credentials {
    /// Just the configured cookies (`name=value; …`), or the whole Cookie header.
    pub cookie: Option<HeaderValue>,
    /// `forward_headers` present on the request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The route name in the key (a rotated credential is cached under the same route).
    pub route: Box<str>,
}

/// Which cookies and headers count as credentials, and the per-process salt of their hash.
pub(crate) struct CredentialRules {
    /// Empty = the whole Cookie header.
    pub cookies: Vec<String>,
    pub forward_headers: Vec<HeaderName>,
    pub salt: [u8; 16],
}

/// The credentials of a request with their cache key, borrowed from the request: a cached
/// decision needs only the key, so the cookie value and the route are copied only for an
/// introspection call ([`Found::into_owned`]).
pub(crate) struct Found<'a> {
    cookie: Option<CookieBytes<'a>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    pub key: Key,
    route: &'a str,
}

impl Found<'_> {
    pub fn into_owned(self) -> Credentials {
        Credentials {
            cookie: self.cookie.and_then(CookieBytes::into_value),
            headers: self.headers,
            route: self.route.into(),
        }
    }
}

/// A forwarded cookie value, as found in the request.
enum CookieBytes<'a> {
    /// A whole `Cookie` field (shared, not copied).
    Field(&'a HeaderValue),
    /// One `name=value` pair inside a field.
    Pair(&'a [u8]),
    /// Pairs or fields joined with `; `.
    Joined(Vec<u8>),
}

impl CookieBytes<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            CookieBytes::Field(v) => v.as_bytes(),
            CookieBytes::Pair(b) => b,
            CookieBytes::Joined(b) => b,
        }
    }

    fn into_value(self) -> Option<HeaderValue> {
        match self {
            CookieBytes::Field(v) => Some(v.clone()),
            CookieBytes::Pair(b) => HeaderValue::from_bytes(b).ok(),
            CookieBytes::Joined(b) => HeaderValue::from_maybe_shared(Bytes::from(b)).ok(),
        }
    }
}

impl CredentialRules {
    /// The forwarded credentials of a request, or `None` when it carries none at all. The key also
    /// holds the route: the introspection call names the original path, so its answer may
    /// differ per route and is cached per route. Borrowed from the request
    /// ([`Found::into_owned`] copies what an introspection call needs).
    pub fn find<'a>(&self, headers: &'a HeaderMap, route: &'a str) -> Option<Found<'a>> {
        let cookie = if self.cookies.is_empty() { whole_cookie(headers) } else { self.named_cookies(headers) };
        let mut forwarded = Vec::new();
        for name in &self.forward_headers {
            for value in headers.get_all(name) {
                forwarded.push((name.clone(), value.clone()));
            }
        }
        if cookie.is_none() && forwarded.is_empty() {
            return None;
        }
        let key = self.key(route, cookie.as_ref().map(CookieBytes::as_bytes), &forwarded);
        Some(Found { cookie, headers: forwarded, key, route })
    }

    /// The cache key of a route, a forwarded cookie value and forwarded headers.
    pub fn key(&self, route: &str, cookie: Option<&[u8]>, forwarded: &[(HeaderName, HeaderValue)]) -> Key {
        fn part(h: &mut Sha256, bytes: &[u8]) {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        let mut h = Sha256::new();
        h.update(self.salt);
        part(&mut h, route.as_bytes());
        // What part(&key_bytes(cookie)) would hash, without building those bytes.
        let cookie = cookie.unwrap_or_default();
        h.update((crate::auth::cookies::key_bytes_len(cookie) as u64).to_le_bytes());
        crate::auth::cookies::feed_key_bytes(cookie, |b| h.update(b));
        for (name, value) in forwarded {
            part(&mut h, name.as_str().as_bytes());
            part(&mut h, value.as_bytes());
        }
        Key(h.finalize().into())
    }

    /// `name=value` pairs of the configured cookies (and their `.N` chunks), in request order;
    /// allocates only when there are several.
    fn named_cookies<'a>(&self, headers: &'a HeaderMap) -> Option<CookieBytes<'a>> {
        // HTTP/2 clients may send one `cookie` field per pair: look at all of them.
        let fields = headers.get_all(COOKIE);
        let mut found = fields.iter().flat_map(|field| {
            field.as_bytes().split(|b| *b == b';').map(<[u8]>::trim_ascii).filter(|pair| {
                let name = pair.split(|b| *b == b'=').next().unwrap_or_default().trim_ascii();
                pair.len() > name.len()
                    && self.cookies.iter().any(|c| crate::auth::cookies::is_name_or_chunk(name, c.as_bytes()))
            })
        });
        let first = found.next()?;
        let Some(second) = found.next() else {
            // One pair: when it is a whole field (`Cookie: session=…` alone, or HTTP/2's one
            // field per pair), that field's value is shared, not copied. A pair, a trimmed slice
            // of a valid field, is itself a valid header value.
            return Some(match fields.iter().find(|field| field.as_bytes() == first) {
                Some(whole) => CookieBytes::Field(whole),
                None => CookieBytes::Pair(first),
            });
        };
        let mut out: Vec<u8> = Vec::with_capacity(fields.iter().map(HeaderValue::len).sum());
        out.extend_from_slice(first);
        for pair in std::iter::once(second).chain(found) {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(pair);
        }
        Some(CookieBytes::Joined(out))
    }
}

fn whole_cookie(headers: &HeaderMap) -> Option<CookieBytes<'_>> {
    let mut values = headers.get_all(COOKIE).iter().filter(|v| !v.as_bytes().trim_ascii().is_empty());
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(CookieBytes::Field(first));
    };
    let mut out = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        out.extend_from_slice(b"; ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(CookieBytes::Joined(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn rules(cookies: &[&str], forward: &[&str]) -> CredentialRules {
        CredentialRules {
            cookies: cookies.iter().map(|c| c.to_string()).collect(),
            forward_headers: forward.iter().map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap()).collect(),
            salt: [7; 16],
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    impl CredentialRules {
        fn extract(&self, headers: &HeaderMap, route: &str) -> Option<Credentials> {
            self.find(headers, route).map(Found::into_owned)
        }
    }

    #[test]
    fn only_the_named_cookies_are_kept_across_cookie_fields() {
        let r = rules(&["session", "sid"], &[]);
        let h =
            headers(&[("cookie", "theme=dark; session=abc;  other=1"), ("cookie", "sid=x=y"), ("cookie", "session")]);
        let c = r.extract(&h, "r").unwrap();
        assert_eq!(c.cookie.unwrap(), "session=abc; sid=x=y");
        assert!(r.extract(&headers(&[("cookie", "theme=dark; sessionx=1")]), "r").is_none());
        let chunked = r.extract(&headers(&[("cookie", "session.0=a; session.x=1; session.1=b")]), "r").unwrap();
        assert_eq!(chunked.cookie.unwrap(), "session.0=a; session.1=b", "chunks of a configured cookie");
    }

    #[test]
    fn whole_cookie_header_when_no_names_are_configured() {
        let r = rules(&[], &[]);
        assert_eq!(r.extract(&headers(&[("cookie", "a=1; b=2")]), "r").unwrap().cookie.unwrap(), "a=1; b=2");
        assert_eq!(
            r.extract(&headers(&[("cookie", "a=1"), ("cookie", "b=2")]), "r").unwrap().cookie.unwrap(),
            "a=1; b=2"
        );
        assert!(r.extract(&HeaderMap::new(), "r").is_none());
    }

    #[test]
    fn the_key_depends_on_every_forwarded_credential_and_nothing_else() {
        let r = rules(&["session"], &["authorization"]);
        let k = |pairs: &[(&str, &str)]| r.find(&headers(pairs), "api").map(|c| c.key.0);
        let base = k(&[("cookie", "session=abc; theme=dark"), ("authorization", "Bearer t")]);
        assert_eq!(base, k(&[("cookie", "theme=light; session=abc"), ("authorization", "Bearer t")]));
        assert_ne!(base, k(&[("cookie", "session=abd"), ("authorization", "Bearer t")]));
        assert_ne!(base, k(&[("cookie", "session=abc"), ("authorization", "Bearer u")]));
        assert_ne!(k(&[("authorization", "Bearer t")]), k(&[("cookie", "session=abc")]));
        assert!(k(&[("authorization", "Bearer t")]).is_some(), "a forwarded header alone is a credential");
        let on = |route: &str| r.find(&headers(&[("cookie", "session=abc")]), route).map(|c| c.key.0);
        assert_ne!(on("api"), on("admin"), "one decision per route");
    }
}

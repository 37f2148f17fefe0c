//! Who the client is and what the app is told of it: trusted proxies, the client address from
//! `X-Forwarded-For`, the request id, and the forwarding headers set on every request to the app
//! (`Host`, `X-Forwarded-For/-Proto/-Host`, `X-Request-Id`) with its origin-form target.

use std::net::{IpAddr, SocketAddr};

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Uri};
use ipnet::IpNet;

use crate::http::headers::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|n| n.contains(&ip))
}

/// Whether the peer's forwarding headers are believed.
pub fn peer_is_trusted(peer: SocketAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && is_trusted(peer.ip(), trusted)
}

/// The client address: the peer, or for a trusted peer the right-most untrusted address in
/// `X-Forwarded-For` (falling back to the left-most when every hop is trusted).
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !peer_is_trusted(peer, trusted) {
        return peer_ip;
    }
    let mut leftmost = None;
    // Right to left over every `X-Forwarded-For` field, without collecting the hops.
    let hops = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.rsplit(','))
        .filter_map(|s| parse_hop(s.trim()));
    for ip in hops {
        if !is_trusted(ip, trusted) {
            return ip;
        }
        leftmost = Some(ip);
    }
    leftmost.unwrap_or(peer_ip)
}

fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    // "1.2.3.4:5678" or "[::1]:5678"
    s.parse::<SocketAddr>().ok().map(|a| a.ip().to_canonical())
}

/// A client-sent request id is kept when short and plain; otherwise one is generated.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c)) {
            return v.clone();
        }
    }
    // 32 hex digits, written without the formatting machinery.
    let id: u128 = rand::random();
    let mut hex = [0u8; 32];
    for (i, d) in hex.iter_mut().enumerate() {
        *d = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// What the forwarding headers are made from.
pub struct ForwardingHeaders<'a> {
    /// The peer's address as a header value (made once per connection).
    pub peer: &'a HeaderValue,
    pub https: bool,
    pub request_id: &'a HeaderValue,
    /// The validated host of the request (`Host` and `X-Forwarded-Host` for the app).
    pub host: &'a HeaderValue,
    /// A trusted peer's `X-Forwarded-For` chain, extended with the peer.
    pub prior_forwarded_for: Option<&'a str>,
}

/// Header fields [`set_forwarding_headers`] adds to a request (`Host` replaces the client's).
pub const FORWARDING_HEADERS_ADDED: usize = 4;

/// Set `Host`, `X-Forwarded-For/-Proto/-Host` and `X-Request-Id` on a request to the app. Client
/// copies of these were removed by the header pass ([`crate::request::hygiene::clean_request_headers`]).
pub fn set_forwarding_headers(headers: &mut HeaderMap, f: &ForwardingHeaders<'_>) {
    // Room for the four added below at once: the map hyper parsed is sized to what the
    // client sent, and growing it insert by insert rehashes it more than once.
    headers.reserve(FORWARDING_HEADERS_ADDED);
    headers.insert(HOST, f.host.clone());
    let xff = match f.prior_forwarded_for {
        Some(prior) => {
            let peer = f.peer.to_str().unwrap_or("unknown");
            HeaderValue::from_str(&format!("{prior}, {peer}")).unwrap_or_else(|_| f.peer.clone())
        }
        None => f.peer.clone(),
    };
    headers.insert(&X_FORWARDED_FOR, xff);
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(if f.https { "https" } else { "http" }));
    headers.insert(&X_FORWARDED_HOST, f.host.clone());
    headers.insert(&X_REQUEST_ID, f.request_id.clone());
}

/// A peer's address as a header value (IPv4-mapped IPv6 addresses as IPv4).
pub fn peer_value(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_canonical().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The request target sent to the app: origin-form (`/path?query`).
pub fn origin_form(path_and_query: Option<&PathAndQuery>) -> Uri {
    Uri::from(path_and_query.cloned().unwrap_or_else(|| PathAndQuery::from_static("/")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_forwarded_for_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        let peer: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &nets(&["10.0.0.0/8"])), "203.0.113.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn trusted_peer_gives_rightmost_untrusted_hop() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6, 198.51.100.7"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        let peer: SocketAddr = "10.0.0.2:5555".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &nets(&["10.0.0.0/8"])), "198.51.100.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn every_hop_trusted_gives_the_leftmost() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9, [::ffff:10.8.8.8]:443"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("junk, 10.1.1.1"));
        let peer: SocketAddr = "10.0.0.2:5555".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &nets(&["10.0.0.0/8"])), "10.9.9.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn request_id_is_kept_when_plain_and_replaced_when_not() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("<script>"));
        assert_eq!(request_id(&h).len(), 32);
    }
}

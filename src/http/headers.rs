//! Header names the gate reads and writes, and the hop-by-hop rules (RFC 9110 §7.6.1): which
//! headers never cross a proxy, noted in one pass over a header block and removed.

use http::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};

/// The forwarding headers the gate sets on every request to the app (and on introspection calls).
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The method and target of the request being authorized, on an introspection call.
pub static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
pub static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
/// The legacy `Keep-Alive` header: hop-by-hop, and read for the app's idle timeout.
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the `Proxy-*` and legacy `Keep-Alive` ones): never
/// forwarded in either direction (an allowed upgrade re-adds its own `Connection`/`Upgrade`).
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("proxy-authenticate"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// The tokens of every `Connection` header, trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Which of [`HOP_BY_HOP`] a header block has, noted on a pass the caller makes over its names
/// anyway, so that only those are removed (usually just `Connection`) instead of a lookup for
/// each of the nine.
#[derive(Default)]
pub(crate) struct HopByHop([bool; HOP_BY_HOP.len()]);

/// Indices of [`HOP_BY_HOP`] the passes ask about by name.
const CONNECTION_AT: usize = 0;
const TRANSFER_ENCODING_AT: usize = 7;

impl HopByHop {
    /// Note `name`; true when it is hop-by-hop.
    pub(crate) fn note(&mut self, name: &HeaderName) -> bool {
        // One string match (length first) instead of nine name comparisons; the indices are
        // those of HOP_BY_HOP (pinned by a test).
        let i = match name.as_str() {
            "connection" => CONNECTION_AT,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "proxy-authorization" => 3,
            "proxy-authenticate" => 4,
            "te" => 5,
            "trailer" => 6,
            "transfer-encoding" => TRANSFER_ENCODING_AT,
            "upgrade" => 8,
            _ => return false,
        };
        self.0[i] = true;
        true
    }

    fn any(&self) -> bool {
        self.0.contains(&true)
    }

    /// `Connection` was noted.
    fn connection(&self) -> bool {
        self.0[CONNECTION_AT]
    }

    /// A message framed by Transfer-Encoding ignores Content-Length (RFC 9112 §6.3); forwarding
    /// both would let the next hop frame it differently (request smuggling). Hyper re-frames.
    /// Decided by the names noted, without a lookup.
    pub(crate) fn drop_length_beside_chunked(&self, headers: &mut HeaderMap) {
        if self.0[TRANSFER_ENCODING_AT] {
            headers.remove(http::header::CONTENT_LENGTH);
        }
    }

    pub(crate) fn remove_from(&self, headers: &mut HeaderMap) {
        for (name, _) in HOP_BY_HOP.iter().zip(self.0).filter(|(_, present)| *present) {
            headers.remove(name);
        }
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`, from an
/// answer of the app (requests go through [`crate::request::hygiene::clean_request_headers`]).
/// With `upgrade`, `Connection: upgrade` and `Upgrade` survive (the tunnel needs them).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = HopByHop::default();
    for name in headers.keys() {
        present.note(name);
    }
    if !upgrade && !present.any() {
        return;
    }
    // The pass above already knows which are present: no lookups to find out again.
    present.drop_length_beside_chunked(headers);
    if present.connection() {
        let named: Vec<HeaderName> = connection_tokens(headers)
            // `keep-alive` names a header of the list above, removed below when present.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(upgrade && *n == UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let upgrade_value = if upgrade { headers.get(UPGRADE).cloned() } else { None };
    present.remove_from(headers);
    if let Some(v) = upgrade_value {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn hop_by_hop_note_marks_each_name_at_its_index_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let mut seen = HopByHop::default();
            assert!(seen.note(name), "{name}");
            let mut want = [false; HOP_BY_HOP.len()];
            want[i] = true;
            assert_eq!(seen.0, want, "{name}");
        }
        let mut seen = HopByHop::default();
        for other in ["host", "x-connection", "connections", "tes", "upgrade-insecure-requests", "keep_alive"] {
            assert!(!seen.note(&HeaderName::from_static(other)), "{other}");
        }
        assert!(!seen.any());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn content_length_beside_transfer_encoding_is_dropped() {
        let mut h = HeaderMap::new();
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h[http::header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn upgrade_survives_when_tunnelling() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }
}

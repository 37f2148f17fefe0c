//! The admit phase: what the app will be told is checked before anything else runs (the
//! method, the header block's size, the host, the path, normalised in place so the route is
//! chosen on exactly what is forwarded), then the header pass.

use http::{HeaderValue, Request};
use hyper::body::Incoming;

use crate::config::ServerSettings;
use crate::http::error::GateError;
use crate::request::hygiene::{self, Cleaned, HeaderRules};

/// What admission established for a request that may go on.
pub(crate) struct Cleared {
    pub(crate) host: HeaderValue,
    pub(crate) cleaned: Cleaned,
}

/// Check what the app will be told before anything else runs: the method, the header block's
/// size (HTTP/2; hyper bounds HTTP/1.1 itself), the host, and the path, normalised in place
/// so the route is chosen on exactly what is forwarded; then the header pass.
pub(crate) fn admit(
    req: &mut Request<Incoming>,
    peer_trusted: bool,
    server: &ServerSettings,
    rules: &HeaderRules,
) -> Result<Cleared, GateError> {
    if !hygiene::method_allowed(req.method()) {
        return Err(GateError::MethodNotForwarded);
    }
    if req.version() == http::Version::HTTP_2 && header_list_size(req) > server.max_header_bytes {
        return Err(GateError::HeadersTooLarge);
    }
    let host = hygiene::request_host(req.version(), req.uri(), req.headers(), &server.hosts)?;
    let normalised = match crate::http::path::normalize_path(req.uri().path()) {
        Ok(std::borrow::Cow::Owned(p)) => Some(p),
        Ok(std::borrow::Cow::Borrowed(_)) => None,
        Err(crate::http::path::UnsafePath) => return Err(GateError::BadRequest("Bad request")),
    };
    if let Some(path) = normalised {
        *req.uri_mut() = hygiene::with_path(req.uri(), &path)?;
    }
    let version = req.version();
    let cleaned = hygiene::clean_request_headers(req.headers_mut(), version, peer_trusted, rules);
    Ok(Cleared { host, cleaned })
}

/// HTTP/2 header list size as RFC 9113 §6.5.2 counts it (name + value + 32 per field).
fn header_list_size(req: &Request<Incoming>) -> usize {
    let pseudo = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + req.method().as_str().len() + 96;
    req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum::<usize>() + pseudo
}

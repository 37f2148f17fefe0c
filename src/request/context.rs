//! What the pipeline knows about one request, handed to every phase, and who made it
//! ([`Identity`], as authentication established it).

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::request::routes::Route;

/// Per-request facts established before any phase runs.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// `X-Request-Id`: the client's (when well-formed) or generated.
    pub request_id: HeaderValue,
    /// Peer address, or for a trusted proxy the right-most untrusted `X-Forwarded-For` entry.
    pub client_ip: IpAddr,
    /// The matched route.
    pub route: Arc<Route>,
    /// True on the TLS listener, and for a trusted proxy's `X-Forwarded-Proto: https`.
    pub https: bool,
}

impl RequestContext {
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("-")
    }
}

/// The signed-in user, as the introspection answer described them.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    /// `[auth.claims]` values that resolved, by claim name (string, number or boolean).
    pub claims: Vec<(String, serde_json::Value)>,
}

impl Identity {
    pub fn claim(&self, name: &str) -> Option<&serde_json::Value> {
        self.claims.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

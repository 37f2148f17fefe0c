//! Forward authentication (STUB: the contract only; the auth issue fills it in).
//!
//! Owns: the introspection client, the decision cache, identity headers to the app, and the
//! 401/302/503 decisions for signed-out and unavailable cases.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

use crate::audit::Audit;
use crate::config::AuthSettings;
use crate::context::RequestContext;
use crate::error::GateError;
use crate::metrics::Metrics;
use crate::routes::Route;

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

/// What authentication decided for a request that may go on.
#[derive(Debug, Default)]
pub struct AuthResult {
    /// `None` on public routes and for signed-out requests on optional routes.
    pub identity: Option<Arc<Identity>>,
    /// `Set-Cookie` values from the introspection answer, for the client.
    pub set_cookies: Vec<HeaderValue>,
}

/// Remove every header whose name starts with `prefix` (client-sent identity is never believed).
pub fn strip_prefixed(headers: &mut HeaderMap, prefix: &str) {
    let doomed: Vec<_> = headers.keys().filter(|k| k.as_str().starts_with(prefix)).cloned().collect();
    for k in doomed {
        headers.remove(k);
    }
}

pub struct Authenticator {
    prefix: String,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, _metrics: Metrics, _audit: Audit) -> anyhow::Result<Self> {
        Ok(Authenticator { prefix: settings.header_prefix.clone() })
    }

    /// Strip client identity headers; on non-public routes, decide. `Err` is the answer to send
    /// instead of proxying (401, 302 to login, 503).
    pub async fn authorize(
        &self,
        _route: &Route,
        parts: &mut http::request::Parts,
        _ctx: &RequestContext,
    ) -> Result<AuthResult, GateError> {
        strip_prefixed(&mut parts.headers, &self.prefix);
        Err(GateError::AuthUnavailable)
    }
}

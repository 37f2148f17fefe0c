//! ChatKit session minting and refresh (STUB: the contract only; the ChatKit issue fills it in).
//!
//! Owns: the ChatKit API client, `POST session_path` / `POST refresh_path`, the secret → user
//! bindings, and their audit events.

use std::sync::Arc;

use http::Response;
use hyper::body::Incoming;

use crate::audit::Audit;
use crate::auth::Identity;
use crate::body::GateBody;
use crate::config::ChatKitSettings;
use crate::context::RequestContext;
use crate::error::GateError;
use crate::metrics::Metrics;
use crate::store::RedisStore;

/// The gate's own ChatKit endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Session,
    Refresh,
}

pub struct ChatKit {
    settings: ChatKitSettings,
}

impl ChatKit {
    pub fn new(
        settings: &ChatKitSettings,
        _store: Option<RedisStore>,
        _metrics: Metrics,
        _audit: Audit,
    ) -> anyhow::Result<Self> {
        Ok(ChatKit { settings: settings.clone() })
    }

    /// Answer one request to an own endpoint; the caller has authenticated it (identity is the
    /// signed-in user) and applied the ChatKit rate-limit policies.
    pub async fn handle(
        &self,
        _endpoint: Endpoint,
        _parts: http::request::Parts,
        _body: Incoming,
        _identity: Arc<Identity>,
        _ctx: &RequestContext,
    ) -> Result<Response<GateBody>, GateError> {
        Err(GateError::ChatKitNotConfigured(format!("{} is not set", self.settings.api_key.describe())))
    }

    /// Problems `chatkit-gate check` reports (e.g. the API key source is not readable).
    pub fn check(settings: &ChatKitSettings) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Err(msg) = settings.api_key.read() {
            let key = match settings.api_key {
                crate::config::SecretSource::Env(_) => "chatkit.api_key_env",
                crate::config::SecretSource::File(_) => "chatkit.api_key_file",
            };
            problems.push((key.to_string(), msg));
        }
        problems
    }
}

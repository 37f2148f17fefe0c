//! ChatKit session minting and refresh: the gate's own `POST session_path` / `POST refresh_path`,
//! minting sessions with the operator's key for the signed-in user, binding each client secret to
//! its user, and the audit events and metrics of it all.
//!
//! The caller (the pipeline) has authenticated the request and applied `[chatkit].rate_limit`.

mod api;
mod bindings;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};
use tokio_util::task::TaskTracker;

pub use api::{ApiError, CreatedSession};
pub use bindings::{Binding, Bindings, SecretHash, unix_now};

use crate::config::{ChatKitSettings, StateSource};
use crate::http::body::{GateBody, ReadBodyError, read_limited};
use crate::http::error::{GateError, json_response};
use crate::obs::audit::{Audit, AuditEvent, AuditKind};
use crate::obs::metrics::Metrics;
use crate::request::context::Identity;
use crate::request::context::RequestContext;
use crate::request::routes::Endpoint;
use crate::transport::redis::RedisStore;

/// Default limit on the JSON body of the two endpoints (`server.max_body_bytes` overrides it).
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
/// Longest header value used as a state variable (longer ones fall back to the default).
const MAX_STATE_HEADER: usize = 512;

/// Answers the two endpoints. One per gateway; cheap to share behind an `Arc`.
pub struct ChatKit {
    settings: ChatKitSettings,
    api: Arc<api::ApiClient>,
    bindings: Arc<Bindings>,
    metrics: Metrics,
    audit: Audit,
    /// Old-session cancellations running after their refresh was answered.
    cancels: TaskTracker,
    body_limit: usize,
    /// Refreshes in progress, by token and user: a second refresh with the same token waits for
    /// the first and gets its session instead of minting (and cancelling) again.
    refreshes: std::sync::Mutex<std::collections::HashMap<(SecretHash, String), Arc<RefreshFlight>>>,
}

/// One refresh in progress; filled with the new session's answer once minted.
type RefreshFlight = tokio::sync::OnceCell<(String, i64)>;

/// Removes a refresh flight from the map when its leader finishes (or is cancelled).
struct FlightEntry<'a> {
    map: &'a std::sync::Mutex<std::collections::HashMap<(SecretHash, String), Arc<RefreshFlight>>>,
    key: Option<(SecretHash, String)>,
}

impl Drop for FlightEntry<'_> {
    fn drop(&mut self) {
        if let (Some(key), Ok(mut map)) = (self.key.take(), self.map.lock()) {
            map.remove(&key);
        }
    }
}

/// What a refresh token turned out to be.
enum Previous {
    /// Not minted here, or expired: mint without cancelling anything.
    Unknown,
    /// This user's live session: cancel it once the new one exists.
    Own(SecretHash, Binding),
    /// This user's session, already cancelled by an earlier refresh.
    OwnCancelled(Binding),
}

impl ChatKit {
    /// Build the API client (one connection pool). A missing API key does not fail startup: the
    /// endpoints answer 503 naming the variable or file until it is there.
    pub fn new(
        settings: &ChatKitSettings,
        store: Option<RedisStore>,
        metrics: Metrics,
        audit: Audit,
    ) -> anyhow::Result<Self> {
        let api = api::ApiClient::new(settings, metrics.clone())?;
        Ok(ChatKit {
            settings: settings.clone(),
            api: Arc::new(api),
            bindings: Arc::new(Bindings::new(store)),
            metrics,
            audit,
            cancels: TaskTracker::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            refreshes: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Use `server.max_body_bytes` instead of the 16 KiB default.
    pub fn with_body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    /// Answer one request to an own endpoint; the caller has authenticated it (identity is the
    /// signed-in user) and applied the ChatKit rate-limit policies. `Err` is the answer to send.
    pub async fn handle(
        &self,
        endpoint: Endpoint,
        parts: http::request::Parts,
        body: Incoming,
        identity: Arc<Identity>,
        ctx: &RequestContext,
    ) -> Result<Response<GateBody>, GateError> {
        // The pipeline refuses other methods before rate limits; `handle_bytes` checks again.
        let body = match read_limited(body, self.body_limit).await {
            Ok(b) => b,
            Err(ReadBodyError::TooLarge(_)) => return Err(GateError::PayloadTooLarge),
            Err(ReadBodyError::Io(e)) => {
                tracing::debug!(request_id = %ctx.request_id(), error = %e, "ChatKit request body read failed");
                return Err(GateError::BadRequest("Invalid request"));
            }
        };
        self.handle_bytes(endpoint, &parts.method, &parts.headers, body, &identity, ctx).await
    }

    /// [`ChatKit::handle`] once the body is read (the body limit is the caller's job here).
    pub async fn handle_bytes(
        &self,
        endpoint: Endpoint,
        method: &Method,
        headers: &HeaderMap,
        body: Bytes,
        identity: &Identity,
        ctx: &RequestContext,
    ) -> Result<Response<GateBody>, GateError> {
        if method != Method::POST {
            return Err(GateError::MethodNotAllowed);
        }
        if body.len() > self.body_limit {
            return Err(GateError::PayloadTooLarge);
        }
        let request = parse_body(&body)?;
        let (client_secret, expires_at) = match endpoint {
            Endpoint::Session => self.mint_recorded(endpoint, headers, identity, ctx, Previous::Unknown).await?,
            Endpoint::Refresh => {
                let token = refresh_token(&request).ok_or(GateError::BadRequest("Token required"))?;
                let previous = self.previous(token, identity, ctx).await?;
                let key = (SecretHash::of(token), identity.id.clone());
                let (flight, _entry) = {
                    let mut map = self.refreshes.lock().map_err(|_| GateError::Internal)?;
                    match map.get(&key) {
                        Some(f) => (f.clone(), None),
                        None => {
                            let f = Arc::new(RefreshFlight::new());
                            map.insert(key.clone(), f.clone());
                            (f, Some(FlightEntry { map: &self.refreshes, key: Some(key) }))
                        }
                    }
                };
                let mut led = false;
                let minted = flight
                    .get_or_try_init(|| {
                        led = true;
                        self.mint_recorded(endpoint, headers, identity, ctx, previous)
                    })
                    .await?
                    .clone();
                if !led {
                    tracing::info!(
                        request_id = %ctx.request_id(),
                        user_id = %identity.id,
                        "concurrent refresh with the same token: answered with the session it minted"
                    );
                }
                minted
            }
        };
        Ok(json_response(StatusCode::OK, &json!({ "client_secret": client_secret, "expires_at": expires_at })))
    }

    /// Mint, bind the new secret to its user, audit, and cancel the session it replaces.
    async fn mint_recorded(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        identity: &Identity,
        ctx: &RequestContext,
        previous: Previous,
    ) -> Result<(String, i64), GateError> {
        let session = self.mint(endpoint, headers, identity, ctx).await?;
        let hash = SecretHash::of(&session.client_secret);
        let binding = Binding {
            session_id: session.id.clone(),
            user_id: identity.id.clone(),
            expires_at: session.expires_at,
            cancelled: false,
        };
        self.bindings.put(hash, &binding).await;
        self.metrics.chatkit_sessions.with_label_values(&[endpoint.label(), "created"]).inc();
        let mut event = AuditEvent::new(
            match endpoint {
                Endpoint::Session => AuditKind::SessionCreated,
                Endpoint::Refresh => AuditKind::SessionRefreshed,
            },
            ctx.request_id(),
            ctx.client_ip,
        )
        .user(Some(&identity.id))
        .session(&session.id)
        .route(&ctx.route.name)
        .api_request_id(session.api_request_id.as_deref());
        match &previous {
            Previous::Unknown if endpoint == Endpoint::Refresh => {
                event = event.reason("previous token unknown or expired")
            }
            Previous::Unknown => {}
            Previous::Own(_, old) => event = event.reason(format!("replaces {}", old.session_id)),
            Previous::OwnCancelled(old) => {
                event = event.reason(format!("replaces {} (already cancelled)", old.session_id))
            }
        }
        self.audit.log(event);
        tracing::info!(
            request_id = %ctx.request_id(),
            endpoint = endpoint.label(),
            user_id = %identity.id,
            session_id = %session.id,
            secret_hash = %hash.short(),
            expires_at = session.expires_at,
            api_request_id = session.api_request_id.as_deref().unwrap_or("-"),
            "ChatKit session minted"
        );
        if let Previous::Own(old_hash, old) = previous {
            self.cancel_later(old_hash, old, ctx);
        }
        Ok((session.client_secret, session.expires_at))
    }

    /// Resolve a refresh token: another user's is refused here (403, `TOKEN_MISMATCH`).
    async fn previous(&self, token: &str, identity: &Identity, ctx: &RequestContext) -> Result<Previous, GateError> {
        let hash = SecretHash::of(token);
        match self.bindings.get(hash).await {
            None => Ok(Previous::Unknown),
            Some(b) if b.user_id != identity.id => {
                tracing::warn!(
                    request_id = %ctx.request_id(),
                    user_id = %identity.id,
                    session_id = %b.session_id,
                    secret_hash = %hash.short(),
                    "refresh with a token minted for another user refused"
                );
                self.audit.log(
                    AuditEvent::new(AuditKind::TokenMismatch, ctx.request_id(), ctx.client_ip)
                        .user(Some(&identity.id))
                        .session(&b.session_id)
                        .route(&ctx.route.name)
                        .reason("token was minted for another user"),
                );
                Err(GateError::Forbidden)
            }
            Some(b) if b.cancelled => Ok(Previous::OwnCancelled(b)),
            Some(b) => Ok(Previous::Own(hash, b)),
        }
    }

    /// Create a session at the API; failures are logged, audited and counted here.
    async fn mint(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        identity: &Identity,
        ctx: &RequestContext,
    ) -> Result<CreatedSession, GateError> {
        let result = match self.api.authorization() {
            Ok(auth) => self.api.create(&auth, &self.session_request(identity, headers), &ctx.request_id).await,
            Err(e) => Err(e),
        };
        let err = match result {
            Ok(session) => return Ok(session),
            Err(e) => e,
        };
        self.metrics.chatkit_sessions.with_label_values(&[endpoint.label(), "failed"]).inc();
        let api_request_id = err.api_request_id().unwrap_or("-");
        match &err {
            ApiError::NotConfigured(_) => tracing::warn!(
                request_id = %ctx.request_id(),
                endpoint = endpoint.label(),
                problem = %err.detail(),
                "ChatKit is not configured"
            ),
            ApiError::Status { status, .. } if *status < 500 => tracing::error!(
                request_id = %ctx.request_id(),
                endpoint = endpoint.label(),
                status,
                api_request_id,
                api_message = %err.detail(),
                "ChatKit API refused to create a session"
            ),
            _ => tracing::warn!(
                request_id = %ctx.request_id(),
                endpoint = endpoint.label(),
                reason = %err.reason(),
                api_request_id,
                api_message = %err.detail(),
                "ChatKit API failed to create a session"
            ),
        }
        self.audit.log(
            AuditEvent::new(AuditKind::SessionFailed, ctx.request_id(), ctx.client_ip)
                .user(Some(&identity.id))
                .route(&ctx.route.name)
                .reason(err.reason())
                .api_request_id(err.api_request_id()),
        );
        Err(match err {
            ApiError::NotConfigured(what) => GateError::ChatKitNotConfigured(what),
            ApiError::Timeout => GateError::ChatKitTimeout,
            ApiError::RateLimited { retry_after, .. } => GateError::ChatKitRateLimited(retry_after),
            ApiError::Network(_) | ApiError::Status { .. } | ApiError::Malformed { .. } => {
                GateError::ChatKitUnavailable
            }
        })
    }

    /// Cancel a refreshed session without holding up the answer; a failure is logged and
    /// counted, never reported to the browser (the session expires on its own).
    fn cancel_later(&self, hash: SecretHash, old: Binding, ctx: &RequestContext) {
        let api = self.api.clone();
        let bindings = self.bindings.clone();
        let metrics = self.metrics.clone();
        let request_id = ctx.request_id.clone();
        self.cancels.spawn(async move {
            let result = match api.authorization() {
                Ok(auth) => api.cancel(&auth, &old.session_id, &request_id).await,
                Err(e) => Err(e),
            };
            let request_id = request_id.to_str().unwrap_or("-");
            match result {
                Ok(api_request_id) => {
                    tracing::info!(
                        request_id,
                        session_id = %old.session_id,
                        api_request_id = api_request_id.as_deref().unwrap_or("-"),
                        "refreshed ChatKit session cancelled"
                    );
                    bindings.put(hash, &Binding { cancelled: true, ..old }).await;
                }
                Err(e) => {
                    metrics.chatkit_cancel_failures.inc();
                    tracing::warn!(
                        request_id,
                        session_id = %old.session_id,
                        reason = %e.reason(),
                        api_request_id = e.api_request_id().unwrap_or("-"),
                        api_message = %e.detail(),
                        "could not cancel the refreshed ChatKit session; it expires on its own"
                    );
                }
            }
        });
    }

    /// Wait (at most `grace`) for old-session cancellations still running; for shutdown.
    pub async fn drain(&self, grace: Duration) {
        self.cancels.close();
        if tokio::time::timeout(grace, self.cancels.wait()).await.is_err() {
            tracing::warn!(
                pending = self.cancels.len(),
                "shutdown: ChatKit cancellations still running were abandoned"
            );
        }
        self.cancels.reopen();
    }

    /// The body of `POST /chatkit/sessions` for this user.
    fn session_request(&self, identity: &Identity, headers: &HeaderMap) -> Value {
        let s = &self.settings;
        let mut workflow = Map::new();
        workflow.insert("id".into(), s.workflow_id.clone().into());
        if let Some(v) = &s.workflow_version {
            workflow.insert("version".into(), v.clone().into());
        }
        let state = self.state_variables(identity, headers);
        if !state.is_empty() {
            workflow.insert("state_variables".into(), Value::Object(state));
        }
        if let Some(enabled) = s.tracing {
            workflow.insert("tracing".into(), json!({ "enabled": enabled }));
        }
        let mut body = json!({
            "user": identity.id,
            "workflow": workflow,
            "expires_after": { "anchor": "created_at", "seconds": s.expires_after.as_secs() },
        });
        if let Some(n) = s.max_requests_per_minute {
            body["rate_limits"] = json!({ "max_requests_per_1_minute": n });
        }
        if let Some(c) = &s.configuration
            && let Ok(v) = serde_json::to_value(c)
        {
            body["chatkit_configuration"] = v;
        }
        body
    }

    /// `workflow.state_variables`: each from its claim or header, else its default, else left out.
    fn state_variables(&self, identity: &Identity, headers: &HeaderMap) -> Map<String, Value> {
        let mut out = Map::new();
        for var in &self.settings.state_variables {
            let value = match &var.source {
                StateSource::Claim(claim) => identity
                    .claims
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(claim))
                    .map(|(_, v)| v)
                    .filter(|v| v.is_string() || v.is_number() || v.is_boolean())
                    .cloned(),
                StateSource::Header(name) => headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.len() <= MAX_STATE_HEADER)
                    .map(|v| Value::String(v.to_string())),
                StateSource::Constant => None,
            };
            if let Some(v) = value.or_else(|| var.default.clone()) {
                out.insert(var.name.clone(), v);
            }
        }
        out
    }

    /// Problems `chatkit-gate check` reports (the API key source, the extra CA file).
    pub fn check(settings: &ChatKitSettings) -> Vec<(String, String)> {
        api::check(settings)
    }
}

/// Empty (or blank) → `{}`; otherwise a JSON object, else 400.
fn parse_body(body: &[u8]) -> Result<Map<String, Value>, GateError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(GateError::BadRequest("Invalid request")),
        Err(_) => Err(GateError::BadRequest("Invalid JSON")),
    }
}

/// `token`, or `currentClientSecret` as chatkit-js names it; a non-empty string.
fn refresh_token(request: &Map<String, Value>) -> Option<&str> {
    ["token", "currentClientSecret"]
        .iter()
        .filter_map(|k| request.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn body_rules() {
        assert!(parse_body(b"").unwrap().is_empty());
        assert!(parse_body(b"  \n").unwrap().is_empty());
        assert_eq!(parse_body(br#"{"a":1}"#).unwrap().len(), 1);
        assert!(matches!(parse_body(b"{nope"), Err(GateError::BadRequest("Invalid JSON"))));
        assert!(matches!(parse_body(b"[1]"), Err(GateError::BadRequest("Invalid request"))));
        assert!(matches!(parse_body(b"\"s\""), Err(GateError::BadRequest("Invalid request"))));
    }

    #[test]
    fn refresh_token_accepts_both_names() {
        let m = |s: &str| parse_body(s.as_bytes()).unwrap();
        assert_eq!(refresh_token(&m(r#"{"token":"a"}"#)), Some("a"));
        assert_eq!(refresh_token(&m(r#"{"currentClientSecret":"b"}"#)), Some("b"));
        assert_eq!(refresh_token(&m(r#"{"token":"","currentClientSecret":"b"}"#)), Some("b"));
        assert_eq!(refresh_token(&m(r#"{"token":5}"#)), None);
        assert_eq!(refresh_token(&m("{}")), None);
    }
}

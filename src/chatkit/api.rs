//! The ChatKit Sessions API client: one pooled HTTPS client, the API key (re-read when its file
//! changes, never logged), `create` and `cancel`, and the API's failures classified for the
//! browser (a status) and for the log (the API's message and `x-request-id`).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

use crate::config::{ChatKitSettings, SecretSource};
use crate::http::headers::X_REQUEST_ID;
use crate::obs::metrics::Metrics;

/// Largest API answer we read (a session object is about 1 KiB).
const MAX_ANSWER: usize = 256 * 1024;
/// `Retry-After` we send when the API said 429 without one.
const DEFAULT_RETRY_AFTER: u64 = 5;
/// The API's messages are logged up to this many characters.
const MAX_LOGGED_MESSAGE: usize = 300;

const OPENAI_BETA: HeaderName = HeaderName::from_static("openai-beta");

/// A session the API created.
#[derive(Clone)]
pub struct CreatedSession {
    pub id: String,
    pub client_secret: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub api_request_id: Option<String>,
}

/// Without the secret, so a stray `{:?}` cannot leak it.
impl std::fmt::Debug for CreatedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedSession")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .field("api_request_id", &self.api_request_id)
            .finish_non_exhaustive()
    }
}

/// Why an API call failed. Every text here is safe to log (no key, no secret); none of it is
/// safe to show a browser, which only ever sees the mapped status and a fixed message.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// No usable API key; the text names the variable or file.
    NotConfigured(String),
    /// Connection refused, reset, DNS, TLS: the API was not reached or dropped the exchange.
    Network(String),
    /// No complete answer within `[chatkit].timeout`.
    Timeout,
    /// The API answered 429.
    RateLimited { retry_after: u64, api_request_id: Option<String>, message: String },
    /// Any other non-2xx answer.
    Status { status: u16, api_request_id: Option<String>, message: String },
    /// A 2xx answer that is not the session object we need.
    Malformed { api_request_id: Option<String>, detail: String },
}

impl ApiError {
    /// A short, bounded reason for the audit log and labels.
    pub fn reason(&self) -> String {
        match self {
            ApiError::NotConfigured(_) => "not configured".into(),
            ApiError::Network(_) => "api unreachable".into(),
            ApiError::Timeout => "api timed out".into(),
            ApiError::RateLimited { .. } => "api status 429".into(),
            ApiError::Status { status, .. } => format!("api status {status}"),
            ApiError::Malformed { .. } => "api answer malformed".into(),
        }
    }

    pub fn api_request_id(&self) -> Option<&str> {
        match self {
            ApiError::RateLimited { api_request_id, .. }
            | ApiError::Status { api_request_id, .. }
            | ApiError::Malformed { api_request_id, .. } => api_request_id.as_deref(),
            _ => None,
        }
    }

    /// What the log says about it (already sanitized).
    pub fn detail(&self) -> &str {
        match self {
            ApiError::NotConfigured(m) | ApiError::Network(m) => m,
            ApiError::Timeout => "no answer within the timeout",
            ApiError::RateLimited { message, .. } | ApiError::Status { message, .. } => message,
            ApiError::Malformed { detail, .. } => detail,
        }
    }
}

/// The API key, read from its source; a file source is re-read when the file changes.
struct ApiKey {
    source: SecretSource,
    state: Mutex<KeyState>,
}

#[derive(Default)]
struct KeyState {
    header: Option<HeaderValue>,
    /// Identity of the file content last read (mtime, size, inode).
    stamp: Option<FileStamp>,
    /// Why there is no (new) key, as last logged; logged again only when it changes.
    problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(meta: &std::fs::Metadata) -> FileStamp {
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0;
    FileStamp { modified: meta.modified().ok(), len: meta.len(), inode }
}

fn bearer(source: &SecretSource, key: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::try_from(format!("Bearer {key}"))
        .map_err(|_| format!("{} holds characters not allowed in an HTTP header", source.describe()))?;
    value.set_sensitive(true);
    Ok(value)
}

impl ApiKey {
    fn new(source: SecretSource) -> ApiKey {
        let key = ApiKey { source, state: Mutex::new(KeyState::default()) };
        let _ = key.current();
        key
    }

    /// The `Authorization` value, or why there is none (naming the source, never the value).
    fn current(&self) -> Result<HeaderValue, String> {
        let Ok(mut state) = self.state.lock() else {
            return Err(format!("{} could not be read", self.source.describe()));
        };
        match &self.source {
            SecretSource::Env(_) => {
                // The environment of a running process does not change: read it once.
                if state.header.is_none() && state.problem.is_none() {
                    match self.source.read().and_then(|k| bearer(&self.source, &k)) {
                        Ok(h) => state.header = Some(h),
                        Err(problem) => {
                            tracing::warn!(source = %self.source.describe(), %problem, "ChatKit minting disabled until the key is set");
                            state.problem = Some(problem);
                        }
                    }
                }
            }
            SecretSource::File(path) => {
                // One stat per mint: cheap, and a rotated Kubernetes Secret is picked up at once.
                let now = std::fs::metadata(path).map(|m| stamp(&m));
                let changed = match &now {
                    Ok(s) => state.stamp.as_ref() != Some(s),
                    Err(_) => true,
                };
                if changed {
                    match self.source.read().and_then(|k| bearer(&self.source, &k)) {
                        Ok(h) => {
                            if state.header.is_some() {
                                tracing::info!(file = %path.display(), "ChatKit key file changed; using the new key");
                            }
                            state.header = Some(h);
                            state.stamp = now.ok();
                            state.problem = None;
                        }
                        Err(problem) => {
                            if state.problem.as_deref() != Some(problem.as_str()) {
                                if state.header.is_some() {
                                    tracing::warn!(file = %path.display(), %problem, "ChatKit key file unreadable; keeping the last key read");
                                } else {
                                    tracing::warn!(file = %path.display(), %problem, "ChatKit minting disabled until the key file is readable");
                                }
                            }
                            state.problem = Some(problem);
                        }
                    }
                }
            }
        }
        match (&state.header, &state.problem) {
            (Some(h), _) => Ok(h.clone()),
            (None, Some(p)) => Err(p.clone()),
            (None, None) => Err(format!("{} is not set", self.source.describe())),
        }
    }
}

/// The client for `{api_base}/chatkit/sessions`.
pub struct ApiClient {
    client: crate::transport::https_client::HttpsClient<Full<Bytes>>,
    base: String,
    timeout: Duration,
    key: ApiKey,
    metrics: Metrics,
}

impl ApiClient {
    /// Build the pooled client. Fails only on an unusable `ca_file`.
    pub fn new(settings: &ChatKitSettings, metrics: Metrics) -> anyhow::Result<ApiClient> {
        let client = crate::transport::https_client::https_client(crate::transport::https_client::ClientOptions {
            ca_file: settings.ca_file.as_deref(),
            ca_key: "chatkit.ca_file",
            connect_timeout: settings.timeout,
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 32,
        })?;
        if let Some(host) = plain_http_remote_host(&settings.api_base) {
            tracing::warn!(
                api_base = %settings.api_base,
                %host,
                "chatkit.api_base is plain http:// to a non-loopback host: the key would cross the network in clear"
            );
        }
        Ok(ApiClient {
            client,
            base: settings.api_base.clone(),
            timeout: settings.timeout,
            key: ApiKey::new(settings.api_key.clone()),
            metrics,
        })
    }

    /// The `Authorization` header value, or why ChatKit is not configured.
    pub fn authorization(&self) -> Result<HeaderValue, ApiError> {
        self.key.current().map_err(ApiError::NotConfigured)
    }

    /// `POST /chatkit/sessions`.
    pub async fn create(
        &self,
        auth: &HeaderValue,
        body: &serde_json::Value,
        request_id: &HeaderValue,
    ) -> Result<CreatedSession, ApiError> {
        let body = Bytes::from(body.to_string());
        let (status, headers, answer) = self.call("create", "/chatkit/sessions", auth, body, request_id).await?;
        let api_request_id = api_request_id(&headers);
        if !status.is_success() {
            return Err(refusal(status, &headers, &answer, auth));
        }
        #[derive(Deserialize)]
        struct Session {
            id: String,
            client_secret: String,
            expires_at: i64,
        }
        match serde_json::from_slice::<Session>(&answer) {
            Ok(s) if !s.id.is_empty() && !s.client_secret.is_empty() => Ok(CreatedSession {
                id: s.id,
                client_secret: s.client_secret,
                expires_at: s.expires_at,
                api_request_id,
            }),
            Ok(_) => Err(ApiError::Malformed { api_request_id, detail: "empty id or secret".into() }),
            // serde's message names the missing field, never a value.
            Err(e) => Err(ApiError::Malformed { api_request_id, detail: format!("not a session object: {e}") }),
        }
    }

    /// `POST /chatkit/sessions/{id}/cancel`. Returns the API's request id.
    pub async fn cancel(
        &self,
        auth: &HeaderValue,
        session_id: &str,
        request_id: &HeaderValue,
    ) -> Result<Option<String>, ApiError> {
        if session_id.is_empty() || !session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(ApiError::Malformed { api_request_id: None, detail: "unusable session id".into() });
        }
        let path = format!("/chatkit/sessions/{session_id}/cancel");
        let (status, headers, answer) = self.call("cancel", &path, auth, Bytes::new(), request_id).await?;
        if !status.is_success() {
            return Err(refusal(status, &headers, &answer, auth));
        }
        Ok(api_request_id(&headers))
    }

    /// One POST, bounded by the timeout from connect to the last byte of the answer.
    async fn call(
        &self,
        operation: &'static str,
        path: &str,
        auth: &HeaderValue,
        body: Bytes,
        request_id: &HeaderValue,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ApiError> {
        let uri: Uri =
            format!("{}{path}", self.base).parse().map_err(|e| ApiError::Network(format!("invalid API URL: {e}")))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(AUTHORIZATION, auth.clone());
        h.insert(OPENAI_BETA, HeaderValue::from_static("chatkit_beta=v1"));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(&X_REQUEST_ID, request_id.clone());
        let started = Instant::now();
        let exchange = async {
            let resp =
                self.client.request(req).await.map_err(|e| ApiError::Network(crate::http::error::error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let answer = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ApiError::Network(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((parts.status, parts.headers, answer))
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout),
        };
        self.metrics.chatkit_api_duration.with_label_values(&[operation]).observe(started.elapsed().as_secs_f64());
        result
    }
}

/// Problems with the API settings `chatkit-gate check` reports, by key.
pub fn check(settings: &ChatKitSettings) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if let Err(msg) = settings.api_key.read().and_then(|k| bearer(&settings.api_key, &k).map(|_| ())) {
        let key = match settings.api_key {
            SecretSource::Env(_) => "chatkit.api_key_env",
            SecretSource::File(_) => "chatkit.api_key_file",
        };
        problems.push((key.to_string(), msg));
    }
    if let Some(path) = &settings.ca_file
        && let Err(msg) = crate::transport::https_client::load_ca(&mut rustls::RootCertStore::empty(), path)
    {
        problems.push(("chatkit.ca_file".to_string(), msg));
    }
    problems
}

/// The host of an `http://` base URL that is not loopback (the key would travel in clear).
fn plain_http_remote_host(base: &str) -> Option<String> {
    let uri: Uri = base.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
    let loopback = host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    (!loopback).then_some(host)
}

fn api_request_id(headers: &HeaderMap) -> Option<String> {
    headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(128).collect())
}

/// Classify a non-2xx answer; the API's message is kept for the log, sanitized.
fn refusal(status: StatusCode, headers: &HeaderMap, answer: &[u8], auth: &HeaderValue) -> ApiError {
    #[derive(Deserialize)]
    struct Envelope {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        message: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
        code: Option<String>,
    }
    let message = match serde_json::from_slice::<Envelope>(answer) {
        Ok(Envelope { error }) => {
            let mut m = error.message.unwrap_or_default();
            if let Some(kind) = error.kind {
                m.push_str(&format!(" (type {kind})"));
            }
            if let Some(code) = error.code {
                m.push_str(&format!(" (code {code})"));
            }
            m
        }
        Err(_) => format!("non-JSON answer of {} bytes", answer.len()),
    };
    let key = auth.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    let message = sanitize(&message, key);
    let api_request_id = api_request_id(headers);
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ApiError::RateLimited { retry_after: retry_after(headers), api_request_id, message };
    }
    ApiError::Status { status: status.as_u16(), api_request_id, message }
}

/// Seconds to wait after an API 429: its `retry-after` (seconds) or `retry-after-ms`, else a default.
fn retry_after(headers: &HeaderMap) -> u64 {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let secs = header("retry-after")
        .and_then(|v| v.parse::<f64>().ok())
        .or_else(|| header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).map(|ms| ms / 1000.0))
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| s.ceil() as u64)
        .unwrap_or(DEFAULT_RETRY_AFTER);
    secs.clamp(1, 3600)
}

/// The API's message, fit for our log: the key, anything shaped like an OpenAI key or client
/// secret, and masked keys (the API's 401 message echoes the key partly masked) removed; one
/// line, bounded.
fn sanitize(message: &str, key: &str) -> String {
    let mut m = message.to_string();
    if key.len() >= 8 {
        m = m.replace(key, "[redacted]");
    }
    let words: Vec<String> = m
        .split(' ')
        .map(|w| {
            let bare = w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_' && c != '*');
            let masked = bare.contains("****");
            if masked || bare.starts_with("sk-") || bare.starts_with("sess-") || bare.starts_with("ek_") {
                w.replace(bare, "[redacted]")
            } else {
                w.to_string()
            }
        })
        .collect();
    let m: String = words.join(" ").chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if m.chars().count() > MAX_LOGGED_MESSAGE {
        let mut cut: String = m.chars().take(MAX_LOGGED_MESSAGE).collect();
        cut.push('…');
        return cut;
    }
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn retry_after_reads_seconds_or_millis_with_a_default() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), DEFAULT_RETRY_AFTER);
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), 2);
        h.insert("retry-after", HeaderValue::from_static("20"));
        assert_eq!(retry_after(&h), 20);
        h.insert("retry-after", HeaderValue::from_static("0"));
        assert_eq!(retry_after(&h), 1);
        h.insert("retry-after", HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), 2);
    }

    #[test]
    fn sanitize_removes_keys_and_bounds_the_message() {
        let key = "sk-test-0123456789abcdef";
        let m = sanitize(&format!("Incorrect API key provided: {key}. You can find…"), key);
        assert!(!m.contains("0123456789abcdef"), "{m}");
        let m = sanitize("Incorrect API key provided: sk-proj-****************abcd.", "other-key-value");
        assert_eq!(m, "Incorrect API key provided: [redacted].");
        let m = sanitize("Incorrect API key provided: ****************wxyz. You can", "other-key-value");
        assert_eq!(m, "Incorrect API key provided: [redacted]. You can");
        assert!(sanitize(&"x".repeat(1000), key).chars().count() <= MAX_LOGGED_MESSAGE + 1);
        assert_eq!(sanitize("line\nbreak", key), "line break");
    }

    #[test]
    fn refusal_classifies_and_keeps_the_request_id() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("req_abc"));
        h.insert("retry-after", HeaderValue::from_static("7"));
        let body = br#"{"error":{"message":"Slow down","type":"rate_limit_exceeded","param":null,"code":null}}"#;
        let auth = HeaderValue::from_static("Bearer sk-x");
        match refusal(StatusCode::TOO_MANY_REQUESTS, &h, body, &auth) {
            ApiError::RateLimited { retry_after, api_request_id, message } => {
                assert_eq!((retry_after, api_request_id.as_deref()), (7, Some("req_abc")));
                assert!(message.starts_with("Slow down"));
            }
            other => panic!("{other:?}"),
        }
        let e = refusal(StatusCode::NOT_FOUND, &HeaderMap::new(), b"<html>", &auth);
        assert_eq!(e.reason(), "api status 404");
        assert_eq!(e.detail(), "non-JSON answer of 6 bytes");
    }

    #[test]
    fn plain_http_is_flagged_only_off_loopback() {
        assert_eq!(plain_http_remote_host("http://127.0.0.1:9/v1"), None);
        assert_eq!(plain_http_remote_host("http://[::1]:9/v1"), None);
        assert_eq!(plain_http_remote_host("http://localhost/v1"), None);
        assert_eq!(plain_http_remote_host("https://api.openai.com/v1"), None);
        assert_eq!(plain_http_remote_host("http://proxy.internal/v1").as_deref(), Some("proxy.internal"));
    }

    #[test]
    fn key_file_is_reread_when_it_changes_and_kept_when_it_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = ApiKey::new(SecretSource::File(path.clone()));
        let err = key.current().unwrap_err();
        assert!(err.contains("cannot be read"), "{err}");
        std::fs::write(&path, "sk-one\n").unwrap();
        assert_eq!(key.current().unwrap(), "Bearer sk-one");
        std::fs::write(&path, "sk-second-key\n").unwrap();
        assert_eq!(key.current().unwrap(), "Bearer sk-second-key");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(key.current().unwrap(), "Bearer sk-second-key");
        assert!(key.current().unwrap().is_sensitive());
    }
}

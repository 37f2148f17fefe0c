//! The validated configuration: typed settings (`Duration`, `Uri`, `SocketAddr`, `IpNet`), what
//! every other module reads. Built from the raw TOML by the validators beside this file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
    pub tls: TlsSettings,
    pub upstream: UpstreamSettings,
    pub admin: AdminSettings,
    pub auth: Option<AuthSettings>,
    pub routes: Vec<RouteSettings>,
    pub rate_limit: Option<RateLimitSettings>,
    pub chatkit: Option<ChatKitSettings>,
    pub log: LogSettings,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub redirect_listen: Option<SocketAddr>,
    /// Port put in HTTPS redirects (omitted when 443).
    pub https_port: u16,
    /// Allowed Host values, lower-case, without port. Empty = any.
    pub hosts: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// Largest request body the gate reads itself (its own endpoints); proxied bodies stream.
    pub max_body_bytes: Option<u64>,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Threads serving connections; `None`: `TOKIO_WORKER_THREADS`, else the CPUs this process
    /// may use (cgroup quota and affinity included). See [`ServerSettings::worker_threads`].
    pub workers: Option<usize>,
    pub shutdown_grace: Duration,
    /// After SIGTERM: keep serving (with `/readyz` 503) this long before the listeners close,
    /// while load balancers stop routing here.
    pub shutdown_delay: Duration,
    /// No progress on a request body for this long: 408, and the app's connection is released.
    pub body_timeout: Duration,
    /// Upgrade protocols tunnelled to the app (lower-case tokens, never `h2c`).
    pub upgrades: Vec<String>,
    /// Forward client header names containing `_` (dropped by default, like nginx).
    pub allow_underscore_headers: bool,
}

/// Upper bound on `server.workers` (and `TOKIO_WORKER_THREADS`).
pub const MAX_WORKERS: usize = 1024;

impl ServerSettings {
    /// Threads to serve with: `server.workers`, else `TOKIO_WORKER_THREADS`, else the CPUs this
    /// process may use (`available_parallelism` reads the cgroup CPU quota and the affinity mask,
    /// so a pod limited to one CPU gets one). An unusable `TOKIO_WORKER_THREADS` is an error.
    pub fn worker_threads(&self) -> Result<usize, String> {
        if let Some(workers) = self.workers {
            return Ok(workers);
        }
        match std::env::var("TOKIO_WORKER_THREADS") {
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
                _ => Err(format!("TOKIO_WORKER_THREADS={v:?}: expected a number from 1 to {MAX_WORKERS}")),
            },
            Err(std::env::VarError::NotUnicode(_)) => Err("TOKIO_WORKER_THREADS is not valid UTF-8".into()),
            Err(std::env::VarError::NotPresent) => {
                Ok(std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    Files { cert_file: PathBuf, key_file: PathBuf },
    SelfSigned,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub source: TlsSource,
    pub reload_interval: Duration,
    pub handshake_timeout: Duration,
    /// `None` disables the header.
    pub hsts: Option<HeaderValue>,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Connections served at once on the admin listener; more are refused (closed at once).
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub introspection_url: Uri,
    pub timeout: Duration,
    /// Cookie names to forward; empty = the whole Cookie header.
    pub cookies: Vec<String>,
    pub forward_headers: Vec<HeaderName>,
    /// JSON pointers into the introspection answer.
    pub user_id: String,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    /// (claim name, JSON pointer), in name order.
    pub claims: Vec<(String, String)>,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    pub stale_if_error: Duration,
    pub cache_max_entries: usize,
    pub login_url: String,
    /// Lower-case header prefix, e.g. `x-auth-request-`.
    pub header_prefix: String,
    pub ca_file: Option<PathBuf>,
    /// Let the introspection answer's `Cache-Control` (`no-store`, `no-cache`, shorter `max-age`)
    /// shorten how long its decision is cached.
    pub respect_cache_control: bool,
    /// Introspection calls in flight at most; beyond it, 503 at once.
    pub max_in_flight: usize,
    /// Consecutive failed introspection calls that open the circuit breaker (0 = no breaker).
    pub breaker_failures: u32,
    /// How long the open breaker fails calls fast before one probe is let through.
    pub breaker_cooldown: Duration,
    /// An ip-keyed rate-limit policy checked before each introspection call a cache miss makes.
    pub introspection_rate_limit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    Public,
    Optional,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthenticated {
    Json,
    Redirect,
    Auto,
}

#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// The `route` metric label.
    pub name: String,
    pub path: String,
    pub auth: RouteAuth,
    pub unauthenticated: Unauthenticated,
    /// Policy names; each exists in `rate_limit.policies`.
    pub rate_limit: Vec<String>,
    /// Set for a route in front of a self-hosted ChatKit server (`[routes.chatkit_server]`).
    pub chatkit_server: Option<ChatKitServerSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitStore {
    /// In-process store (one replica, dev).
    Local,
    Redis {
        url: String,
    },
    Cluster {
        urls: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    SlidingWindow,
    Gcra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    User,
    Ip,
    UserOrIp,
}

#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub name: String,
    pub algorithm: Algorithm,
    pub limit: u32,
    pub window: Duration,
    /// GCRA only: requests admitted at once on top of the steady rate (defaults to `limit`).
    pub burst: u32,
    pub key: LimitKey,
}

#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub store: RateLimitStore,
    pub redis_timeout: Duration,
    pub on_store_error: OnStoreError,
    /// Start of every Redis key (`<prefix>:rl:{...}`), so apps sharing one Redis stay apart.
    pub key_prefix: String,
    pub policies: BTreeMap<String, PolicySettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// How to name the source to a user, e.g. `OPENAI_API_KEY is not set`.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Env(name) => name.clone(),
            SecretSource::File(path) => path.display().to_string(),
        }
    }

    /// Read the secret; `Err` says why in words safe to show (never the value).
    pub fn read(&self) -> Result<String, String> {
        match self {
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                _ => Err(format!("{name} is not set")),
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                Ok(_) => Err(format!("{} is empty", path.display())),
                Err(e) => Err(format!("{} cannot be read: {e}", path.display())),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StateSource {
    Claim(String),
    Header(HeaderName),
    /// Only the default value.
    Constant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateVariable {
    pub name: String,
    pub source: StateSource,
    /// A string, number or boolean.
    pub default: Option<serde_json::Value>,
}

/// `chatkit_configuration` as the ChatKit Sessions API accepts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatKitConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub automatic_thread_titling: Option<Toggle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_upload: Option<FileUpload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toggle {
    pub enabled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUpload {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_file_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_threads: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ChatKitSettings {
    pub api_key: SecretSource,
    /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub api_base: String,
    pub ca_file: Option<PathBuf>,
    pub workflow_id: String,
    pub workflow_version: Option<String>,
    pub session_path: String,
    pub refresh_path: String,
    pub expires_after: Duration,
    pub timeout: Duration,
    pub rate_limit: Vec<String>,
    pub max_requests_per_minute: Option<u32>,
    pub tracing: Option<bool>,
    pub state_variables: Vec<StateVariable>,
    pub configuration: Option<ChatKitConfiguration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    pub audit_file: Option<PathBuf>,
}

/// Every request type `openai-chatkit` 1.6 accepts (`chatkit/types.py`, `ChatKitReq`), the
/// streaming ones first.
pub const CHATKIT_TYPES: &[&str] = &[
    // Streaming (`StreamingReq`): the answer is an SSE stream; model work happens here.
    "threads.create",
    "threads.add_user_message",
    "threads.retry_after_item",
    "threads.add_client_tool_output",
    "threads.add_structured_input",
    "threads.custom_action",
    // Non-streaming (`NonStreamingReq`).
    "threads.get_by_id",
    "threads.list",
    "items.list",
    "items.feedback",
    "attachments.create",
    "attachments.delete",
    "threads.update",
    "threads.delete",
    "input.transcribe",
    "threads.sync_custom_action",
];

/// The types whose answer is an SSE stream: the first six of [`CHATKIT_TYPES`].
pub const STREAMING_TYPES: &[&str] = CHATKIT_TYPES.split_at(6).0;

/// How a limit on a streaming type is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitResponse {
    /// HTTP 200 `text/event-stream` with one ChatKit `error` event: the widget shows it in the
    /// thread (with a retry button when `allow_retry`).
    Sse,
    /// The gate's usual JSON answer (429 with `Retry-After`, 403, 413, 400).
    Json,
}

/// Which models a user may ask for in `params.input.inference_options.model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRule {
    /// An `[auth.claims]` name.
    pub claim: String,
    /// By claim value (as a string): the models allowed; `"*"` allows any.
    pub allow: BTreeMap<String, Vec<String>>,
    /// For a missing claim or a value not in `allow`; `None` allows no explicit model.
    pub default: Option<Vec<String>>,
}

impl ModelRule {
    /// Whether `model` may be used by a user whose claim is `value`.
    pub fn allows(&self, value: Option<&str>, model: &str) -> bool {
        let list = value.and_then(|v| self.allow.get(v)).or(self.default.as_ref());
        list.is_some_and(|l| l.iter().any(|m| m == "*" || m == model))
    }
}

#[derive(Debug, Clone)]
pub struct ChatKitServerSettings {
    /// Largest body read for any type without an override.
    pub max_body_bytes: usize,
    pub max_body_bytes_by_type: BTreeMap<String, usize>,
    /// Forward types this gate does not know (a newer SDK) instead of answering 400.
    pub allow_unknown_types: bool,
    pub max_list_limit: Option<u64>,
    pub max_message_chars: Option<u64>,
    pub max_attachments: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
    pub stream_lease_ttl: Duration,
    pub limit_response: LimitResponse,
    /// Extra rate-limit policies by request type, checked with the route's in one round trip.
    pub rate_limit: BTreeMap<String, Vec<String>>,
    pub models: Option<ModelRule>,
    /// Remember who created each thread and answer 403 to another user's `params.thread_id`.
    pub thread_ownership: bool,
    pub thread_ownership_ttl: Duration,
}

impl ChatKitServerSettings {
    /// The most any request may send (what is read before the type is known).
    pub fn read_limit(&self) -> usize {
        self.max_body_bytes_by_type.values().copied().fold(self.max_body_bytes, usize::max)
    }

    pub fn body_limit(&self, kind: &str) -> usize {
        self.max_body_bytes_by_type.get(kind).copied().unwrap_or(self.max_body_bytes)
    }
}

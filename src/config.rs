//! The TOML configuration: raw serde structs, turned by `validate` into typed settings.
//!
//! Every problem is collected (not just the first) and names its key, so `chatkit-gate check`
//! can print them all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One configuration problem, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// All problems found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parse a duration such as `"250ms"`, `"30s"`, `"10m"`, `"1h"`, `"1m30s"` or `"0"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("invalid duration {s:?}: expected e.g. \"250ms\", \"30s\", \"10m\", \"1h\""));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => {
                return Err(format!("invalid duration {s:?}: unit must be one of ms, s, m, h, d (e.g. \"30s\")"));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Raw file shape. Unknown keys are reported by `serde_ignored` with their full path, so every
// unknown key is listed at once together with the other problems.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    server: Option<RawServer>,
    tls: Option<RawTls>,
    upstream: Option<RawUpstream>,
    #[serde(default)]
    admin: RawAdmin,
    auth: Option<RawAuth>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    rate_limit: Option<RawRateLimit>,
    chatkit: Option<RawChatKit>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
struct RawServer {
    listen: Option<String>,
    redirect_listen: Option<String>,
    https_port: Option<u16>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    header_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_body_bytes: Option<u64>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    self_signed: bool,
    reload_interval: Option<String>,
    handshake_timeout: Option<String>,
    hsts: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawAuth {
    introspection_url: Option<String>,
    timeout: Option<String>,
    cookies: Option<Vec<String>>,
    #[serde(default)]
    forward_headers: Vec<String>,
    user_id: Option<String>,
    user_name: Option<String>,
    user_email: Option<String>,
    cache_ttl: Option<String>,
    negative_cache_ttl: Option<String>,
    stale_if_error: Option<String>,
    cache_max_entries: Option<usize>,
    login_url: Option<String>,
    header_prefix: Option<String>,
    ca_file: Option<PathBuf>,
    respect_cache_control: Option<bool>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRoute {
    name: Option<String>,
    path: Option<String>,
    auth: Option<String>,
    unauthenticated: Option<String>,
    #[serde(default)]
    rate_limit: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRateLimit {
    redis_url: Option<String>,
    redis_url_env: Option<String>,
    redis_url_file: Option<PathBuf>,
    redis_cluster: Option<Vec<String>>,
    redis_timeout: Option<String>,
    on_store_error: Option<String>,
    key_prefix: Option<String>,
    #[serde(default)]
    policies: BTreeMap<String, RawPolicy>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPolicy {
    algorithm: Option<String>,
    limit: Option<i64>,
    window: Option<String>,
    burst: Option<i64>,
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawChatKit {
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    api_base: Option<String>,
    ca_file: Option<PathBuf>,
    workflow_id: Option<String>,
    workflow_version: Option<String>,
    session_path: Option<String>,
    refresh_path: Option<String>,
    expires_after: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    rate_limit: Vec<String>,
    max_requests_per_minute: Option<i64>,
    tracing: Option<bool>,
    #[serde(default)]
    state_variables: BTreeMap<String, RawStateVariable>,
    configuration: Option<ChatKitConfiguration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawStateVariable {
    claim: Option<String>,
    header: Option<String>,
    default: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
    audit_file: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Typed settings.
// ---------------------------------------------------------------------------------------------

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
    pub shutdown_grace: Duration,
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

// ---------------------------------------------------------------------------------------------
// Loading and validation.
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                message: format!("cannot read config file: {e}"),
            }])
        })?;
        Config::from_toml(&text)
    }

    /// Parse and validate TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let mut errors = Errors::default();
        let mut unknown = Vec::new();
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigErrors(vec![ConfigError { key: "<file>".into(), message: one_line(&e.to_string()) }]))?;
        let raw: RawConfig = serde_ignored::deserialize(de, |path| unknown.push(key_path(&path)))
            .map_err(|e| ConfigErrors(vec![ConfigError { key: "<file>".into(), message: one_line(&e.to_string()) }]))?;
        for key in unknown {
            errors.push(key, "unknown key");
        }
        let config = validate(raw, &mut errors);
        match (config, errors.0.is_empty()) {
            (Some(c), true) => Ok(c),
            _ => Err(ConfigErrors(errors.0)),
        }
    }

    /// The path prefixes the gate answers itself (ChatKit endpoints).
    pub fn own_paths(&self) -> Vec<&str> {
        self.chatkit.as_ref().map(|c| vec![c.session_path.as_str(), c.refresh_path.as_str()]).unwrap_or_default()
    }
}

/// `server.extra` or `routes[2].typo`: the path as a user writes it.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => {
            let p = key_path(parent);
            if p.is_empty() { key.to_string() } else { format!("{p}.{key}") }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError { key: key.into(), message: message.into() });
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => match parse_duration(v) {
                Ok(d) => d,
                Err(e) => {
                    self.push(key, e);
                    default
                }
            },
        }
    }

    fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(key, format!("invalid address {value:?}: expected e.g. \"0.0.0.0:8443\""));
                None
            }
        }
    }

    fn positive_duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let d = self.duration(key, value, default);
        if d.is_zero() {
            self.push(key, "must be greater than 0");
            return default;
        }
        d
    }

    fn http_url(&mut self, key: &str, value: &str, https_ok: bool) -> Option<Uri> {
        let uri: Uri = match value.parse() {
            Ok(u) => u,
            Err(e) => {
                self.push(key, format!("invalid URL {value:?}: {e}"));
                return None;
            }
        };
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") if https_ok => {}
            _ => {
                let allowed = if https_ok { "http:// or https://" } else { "http://" };
                self.push(key, format!("URL must start with {allowed}"));
                return None;
            }
        }
        if uri.authority().is_none() {
            self.push(key, "URL has no host");
            return None;
        }
        Some(uri)
    }
}

fn validate(raw: RawConfig, e: &mut Errors) -> Option<Config> {
    let server = validate_server(raw.server, e);
    let tls = validate_tls(raw.tls, e);
    let upstream = validate_upstream(raw.upstream, e);
    let admin = AdminSettings {
        listen: match raw.admin.listen.as_deref() {
            Some(v) => e.addr("admin.listen", v),
            None => Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
        }
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9090))),
    };
    let auth = raw.auth.map(|a| validate_auth(a, e));
    let rate_limit = raw.rate_limit.map(|r| validate_rate_limit(r, e));
    let chatkit = raw.chatkit.map(|c| validate_chatkit(c, rate_limit.as_ref(), e));
    let routes = validate_routes(raw.routes, auth.is_some(), rate_limit.as_ref(), e);
    let log = validate_log(raw.log, e);

    if let (Some(server), Some(upstream)) = (&server, &upstream) {
        if let Some(redirect) = server.redirect_listen
            && redirect == server.listen
        {
            e.push("server.redirect_listen", "must differ from server.listen");
        }
        if admin.listen == server.listen {
            e.push("admin.listen", "must differ from server.listen (metrics never on the public port)");
        }
        let _ = upstream;
    }
    if let (Some(chatkit), Some(auth)) = (&chatkit, &auth) {
        for var in &chatkit.state_variables {
            if let StateSource::Claim(claim) = &var.source
                && !auth.claims.iter().any(|(name, _)| name == claim)
            {
                e.push(
                    format!("chatkit.state_variables.{}.claim", var.name),
                    format!("claim {claim:?} is not defined in auth.claims"),
                );
            }
        }
    }
    if chatkit.is_some() && auth.is_none() {
        e.push("chatkit", "requires [auth]: sessions are minted for the signed-in user");
    }
    Some(Config { server: server?, tls: tls?, upstream: upstream?, admin, auth, routes, rate_limit, chatkit, log })
}

fn validate_server(raw: Option<RawServer>, e: &mut Errors) -> Option<ServerSettings> {
    let Some(raw) = raw else {
        e.push("server", "missing section (server.listen is required)");
        return None;
    };
    let listen = match raw.listen.as_deref() {
        Some(v) => e.addr("server.listen", v),
        None => {
            e.push("server.listen", "required");
            None
        }
    };
    let redirect_listen = raw.redirect_listen.as_deref().and_then(|v| e.addr("server.redirect_listen", v));
    let mut hosts = Vec::new();
    for (i, h) in raw.hosts.iter().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        if h.is_empty() || h.contains(['/', ' ', '@', '?', '#']) || h.parse::<http::uri::Authority>().is_err() {
            e.push(format!("server.hosts[{i}]"), format!("invalid host {h:?}"));
        } else {
            hosts.push(h);
        }
    }
    let mut trusted_proxies = Vec::new();
    for (i, p) in raw.trusted_proxies.iter().enumerate() {
        let parsed = p.parse::<IpNet>().or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => e.push(
                format!("server.trusted_proxies[{i}]"),
                format!("invalid CIDR or address {p:?}: expected e.g. \"10.0.0.0/8\""),
            ),
        }
    }
    let max_header_bytes = raw.max_header_bytes.unwrap_or(32 * 1024);
    if max_header_bytes < 8192 {
        e.push("server.max_header_bytes", "must be at least 8192");
    }
    let max_connections = raw.max_connections.unwrap_or(10_000);
    if max_connections == 0 {
        e.push("server.max_connections", "must be at least 1");
    }
    Some(ServerSettings {
        listen: listen?,
        redirect_listen,
        https_port: raw.https_port.unwrap_or(443),
        hosts,
        trusted_proxies,
        header_timeout: e.positive_duration(
            "server.header_timeout",
            raw.header_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_header_bytes: max_header_bytes.max(8192),
        max_body_bytes: raw.max_body_bytes,
        idle_timeout: e.positive_duration("server.idle_timeout", raw.idle_timeout.as_deref(), Duration::from_secs(60)),
        max_connections: max_connections.max(1),
        shutdown_grace: e.duration("server.shutdown_grace", raw.shutdown_grace.as_deref(), Duration::from_secs(25)),
    })
}

fn validate_tls(raw: Option<RawTls>, e: &mut Errors) -> Option<TlsSettings> {
    let Some(raw) = raw else {
        e.push("tls", "missing section: set tls.cert_file and tls.key_file, or tls.self_signed = true");
        return None;
    };
    let source = match (raw.self_signed, raw.cert_file, raw.key_file) {
        (true, None, None) => Some(TlsSource::SelfSigned),
        (true, _, _) => {
            e.push("tls.self_signed", "cannot be combined with tls.cert_file/tls.key_file");
            None
        }
        (false, Some(cert_file), Some(key_file)) => Some(TlsSource::Files { cert_file, key_file }),
        (false, None, _) => {
            e.push("tls.cert_file", "required (or tls.self_signed = true for development)");
            None
        }
        (false, Some(_), None) => {
            e.push("tls.key_file", "required with tls.cert_file");
            None
        }
    };
    let hsts = match raw.hsts.as_deref() {
        None => Some(HeaderValue::from_static("max-age=31536000; includeSubDomains")),
        Some("") => None,
        Some(v) => match HeaderValue::from_str(v) {
            Ok(h) => Some(h),
            Err(_) => {
                e.push("tls.hsts", "not a valid header value");
                None
            }
        },
    };
    Some(TlsSettings {
        source: source?,
        reload_interval: e.positive_duration(
            "tls.reload_interval",
            raw.reload_interval.as_deref(),
            Duration::from_secs(10),
        ),
        handshake_timeout: e.positive_duration(
            "tls.handshake_timeout",
            raw.handshake_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        hsts,
    })
}

fn validate_upstream(raw: Option<RawUpstream>, e: &mut Errors) -> Option<UpstreamSettings> {
    let Some(raw) = raw else {
        e.push("upstream", "missing section (upstream.url is required)");
        return None;
    };
    let url = match raw.url.as_deref() {
        Some(v) => e.http_url("upstream.url", v, false),
        None => {
            e.push("upstream.url", "required");
            None
        }
    };
    if let Some(u) = &url
        && u.path() != "/"
        && !u.path().is_empty()
    {
        e.push("upstream.url", "must not have a path (requests keep their own path)");
    }
    Some(UpstreamSettings {
        url: url?,
        connect_timeout: e.positive_duration(
            "upstream.connect_timeout",
            raw.connect_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        timeout: e.positive_duration("upstream.timeout", raw.timeout.as_deref(), Duration::from_secs(60)),
        pool_idle_timeout: e.positive_duration(
            "upstream.pool_idle_timeout",
            raw.pool_idle_timeout.as_deref(),
            Duration::from_secs(90),
        ),
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
    })
}

fn json_pointer(e: &mut Errors, key: &str, v: &str) -> String {
    if !v.is_empty() && !v.starts_with('/') {
        e.push(key, format!("must be a JSON pointer starting with '/', e.g. \"/user/id\" (got {v:?})"));
    }
    v.to_string()
}

fn validate_auth(raw: RawAuth, e: &mut Errors) -> AuthSettings {
    let introspection_url = match raw.introspection_url.as_deref() {
        Some(v) => e.http_url("auth.introspection_url", v, true),
        None => {
            e.push("auth.introspection_url", "required");
            None
        }
    };
    let header_prefix = raw.header_prefix.unwrap_or_else(|| "x-auth-request-".into()).to_ascii_lowercase();
    let mut forward_headers = Vec::new();
    for (i, h) in raw.forward_headers.iter().enumerate() {
        let key = format!("auth.forward_headers[{i}]");
        match HeaderName::from_bytes(h.trim().as_bytes()) {
            Ok(name)
                if matches!(
                    name.as_str(),
                    "upgrade"
                        | "connection"
                        | "content-length"
                        | "transfer-encoding"
                        | "te"
                        | "trailer"
                        | "keep-alive"
                        | "proxy-connection"
                        | "host"
                ) =>
            {
                e.push(key, format!("{name} is never forwarded"));
            }
            Ok(name) if name == http::header::COOKIE => {
                e.push(key, "cookies are forwarded by auth.cookies ([] = the whole Cookie header)");
            }
            Ok(name) if name.as_str().starts_with(&header_prefix) => {
                e.push(key, "headers starting with auth.header_prefix are removed from every request");
            }
            Ok(name) => forward_headers.push(name),
            Err(_) => e.push(key, format!("invalid header name {h:?}")),
        }
    }
    if header_prefix.len() < 2 || HeaderName::from_bytes(format!("{header_prefix}user").as_bytes()).is_err() {
        e.push("auth.header_prefix", format!("invalid header prefix {header_prefix:?}"));
    }
    let mut claims = Vec::new();
    for (name, pointer) in &raw.claims {
        let key = format!("auth.claims.{name}");
        if HeaderName::from_bytes(format!("{header_prefix}{name}").as_bytes()).is_err()
            || name.is_empty()
            || matches!(name.to_ascii_lowercase().as_str(), "user" | "email" | "name")
        {
            e.push(&key, "claim names must be header-safe and not user/email/name");
        }
        claims.push((name.to_ascii_lowercase(), json_pointer(e, &key, pointer)));
    }
    let cookies = raw.cookies.unwrap_or_else(|| vec!["session".into()]);
    for (i, c) in cookies.iter().enumerate() {
        if c.is_empty() || c.contains([';', '=', ' ', ',']) {
            e.push(format!("auth.cookies[{i}]"), format!("invalid cookie name {c:?}"));
        }
    }
    let login_url = raw.login_url.unwrap_or_else(|| "/login".into());
    if !login_url.starts_with('/')
        || login_url.starts_with("//")
        || login_url.starts_with("/\\")
        || login_url.contains('#')
        || HeaderValue::from_str(&login_url).is_err()
    {
        e.push("auth.login_url", "must be a path on this site, e.g. \"/login\"");
    }
    let cache_max_entries = raw.cache_max_entries.unwrap_or(100_000);
    if cache_max_entries == 0 {
        e.push("auth.cache_max_entries", "must be at least 1 (set auth.cache_ttl = \"0\" to disable caching)");
    }
    AuthSettings {
        introspection_url: introspection_url.unwrap_or_else(|| Uri::from_static("http://127.0.0.1/")),
        timeout: e.positive_duration("auth.timeout", raw.timeout.as_deref(), Duration::from_secs(2)),
        cookies,
        forward_headers,
        user_id: json_pointer(e, "auth.user_id", raw.user_id.as_deref().unwrap_or("/user/id")),
        user_name: Some(json_pointer(e, "auth.user_name", raw.user_name.as_deref().unwrap_or("/user/name"))),
        user_email: Some(json_pointer(e, "auth.user_email", raw.user_email.as_deref().unwrap_or("/user/email"))),
        claims,
        cache_ttl: e.duration("auth.cache_ttl", raw.cache_ttl.as_deref(), Duration::from_secs(30)),
        negative_cache_ttl: e.duration(
            "auth.negative_cache_ttl",
            raw.negative_cache_ttl.as_deref(),
            Duration::from_secs(5),
        ),
        stale_if_error: e.duration("auth.stale_if_error", raw.stale_if_error.as_deref(), Duration::from_secs(60)),
        cache_max_entries: cache_max_entries.max(1),
        login_url,
        header_prefix,
        ca_file: raw.ca_file,
        respect_cache_control: raw.respect_cache_control.unwrap_or(true),
    }
}

fn validate_routes(
    raw: Vec<RawRoute>,
    has_auth: bool,
    rate_limit: Option<&RateLimitSettings>,
    e: &mut Errors,
) -> Vec<RouteSettings> {
    let mut routes: Vec<RouteSettings> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let path = match r.path {
            Some(p) if p.starts_with('/') => p,
            Some(p) => {
                e.push(format!("{key}.path"), format!("must start with '/' (got {p:?})"));
                continue;
            }
            None => {
                e.push(format!("{key}.path"), "required");
                continue;
            }
        };
        let auth = match r.auth.as_deref() {
            None if has_auth => RouteAuth::Required,
            None => RouteAuth::Public,
            Some("public") => RouteAuth::Public,
            Some("optional") => RouteAuth::Optional,
            Some("required") => RouteAuth::Required,
            Some(other) => {
                e.push(format!("{key}.auth"), format!("must be public, optional or required (got {other:?})"));
                RouteAuth::Required
            }
        };
        if auth != RouteAuth::Public && !has_auth {
            e.push(format!("{key}.auth"), "needs an [auth] section (without it every route is public)");
        }
        let unauthenticated = match r.unauthenticated.as_deref() {
            None | Some("auto") => Unauthenticated::Auto,
            Some("json") => Unauthenticated::Json,
            Some("redirect") => Unauthenticated::Redirect,
            Some(other) => {
                e.push(format!("{key}.unauthenticated"), format!("must be json, redirect or auto (got {other:?})"));
                Unauthenticated::Auto
            }
        };
        check_policy_names(&format!("{key}.rate_limit"), &r.rate_limit, rate_limit, e);
        let name = r.name.unwrap_or_else(|| path.clone());
        if name.is_empty() || name.len() > 64 {
            e.push(format!("{key}.name"), "must be 1 to 64 characters");
        }
        if routes.iter().any(|x| x.name == name) {
            e.push(format!("{key}.name"), format!("duplicate route name {name:?}"));
        }
        routes.push(RouteSettings { name, path, auth, unauthenticated, rate_limit: r.rate_limit });
    }
    routes
}

fn check_policy_names(key: &str, names: &[String], rate_limit: Option<&RateLimitSettings>, e: &mut Errors) {
    for (j, p) in names.iter().enumerate() {
        match rate_limit {
            None => e.push(format!("{key}[{j}]"), format!("policy {p:?} named but there is no [rate_limit] section")),
            Some(rl) if !rl.policies.contains_key(p) => {
                e.push(format!("{key}[{j}]"), format!("unknown policy {p:?} (not in rate_limit.policies)"))
            }
            Some(_) => {}
        }
    }
}

fn validate_rate_limit(raw: RawRateLimit, e: &mut Errors) -> RateLimitSettings {
    let from_secret = match (raw.redis_url_env, raw.redis_url_file) {
        (Some(env), None) => Some(("rate_limit.redis_url_env", SecretSource::Env(env))),
        (None, Some(file)) => Some(("rate_limit.redis_url_file", SecretSource::File(file))),
        (None, None) => None,
        (Some(_), Some(_)) => {
            e.push("rate_limit.redis_url_env", "set only one of redis_url_env and redis_url_file");
            None
        }
    };
    let store = match (raw.redis_url, from_secret, raw.redis_cluster) {
        (None, None, None) => RateLimitStore::Local,
        (Some(url), None, None) => {
            check_redis_url(&mut *e, "rate_limit.redis_url", &url);
            RateLimitStore::Redis { url }
        }
        (None, Some((key, source)), None) => match source.read() {
            Ok(url) => {
                check_redis_url(&mut *e, key, &url);
                RateLimitStore::Redis { url }
            }
            Err(msg) => {
                e.push(key, msg);
                RateLimitStore::Local
            }
        },
        (None, None, Some(urls)) => {
            if urls.is_empty() {
                e.push("rate_limit.redis_cluster", "must list at least one node");
            }
            for (i, u) in urls.iter().enumerate() {
                check_redis_url(&mut *e, &format!("rate_limit.redis_cluster[{i}]"), u);
            }
            RateLimitStore::Cluster { urls }
        }
        _ => {
            e.push("rate_limit.redis_url", "set only one of redis_url, redis_url_env/_file and redis_cluster");
            RateLimitStore::Local
        }
    };
    let on_store_error = match raw.on_store_error.as_deref() {
        None | Some("local") => OnStoreError::Local,
        Some("allow") => OnStoreError::Allow,
        Some("deny") => OnStoreError::Deny,
        Some(other) => {
            e.push("rate_limit.on_store_error", format!("must be local, allow or deny (got {other:?})"));
            OnStoreError::Local
        }
    };
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "chatkit-gate".into());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        e.push("rate_limit.key_prefix", "must be 1 to 64 printable ASCII characters without '{' or '}'");
    }
    let mut policies = BTreeMap::new();
    for (name, p) in raw.policies {
        let key = format!("rate_limit.policies.{name}");
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            e.push(&key, "policy names use letters, digits, '_' and '-'");
        }
        let algorithm = match p.algorithm.as_deref() {
            None | Some("sliding_window") => Algorithm::SlidingWindow,
            Some("gcra") => Algorithm::Gcra,
            Some(other) => {
                e.push(format!("{key}.algorithm"), format!("must be sliding_window or gcra (got {other:?})"));
                Algorithm::SlidingWindow
            }
        };
        let limit = match p.limit {
            None => {
                e.push(format!("{key}.limit"), "required");
                1
            }
            Some(l) if l < 1 => {
                e.push(format!("{key}.limit"), "must be at least 1");
                1
            }
            Some(l) if l > 1_000_000 => {
                e.push(format!("{key}.limit"), "must be at most 1000000");
                1
            }
            Some(l) => l as u32,
        };
        let window = match p.window.as_deref() {
            None => {
                e.push(format!("{key}.window"), "required");
                Duration::from_secs(60)
            }
            Some(w) => e.positive_duration(&format!("{key}.window"), Some(w), Duration::from_secs(60)),
        };
        if window < Duration::from_millis(1) {
            e.push(format!("{key}.window"), "must be at least 1ms");
        }
        if window > Duration::from_secs(30 * 86_400) {
            e.push(format!("{key}.window"), "must be at most 30d");
        }
        let burst = match (algorithm, p.burst) {
            (Algorithm::SlidingWindow, Some(_)) => {
                e.push(format!("{key}.burst"), "only applies to algorithm = \"gcra\"");
                limit
            }
            (_, None) => limit,
            (_, Some(b)) if b < 1 => {
                e.push(format!("{key}.burst"), "must be at least 1");
                limit
            }
            (_, Some(b)) => b.min(1_000_000) as u32,
        };
        let key_kind = match p.key.as_deref() {
            None | Some("user_or_ip") => LimitKey::UserOrIp,
            Some("user") => LimitKey::User,
            Some("ip") => LimitKey::Ip,
            Some(other) => {
                e.push(format!("{key}.key"), format!("must be user, ip or user_or_ip (got {other:?})"));
                LimitKey::UserOrIp
            }
        };
        policies.insert(name.clone(), PolicySettings { name, algorithm, limit, window, burst, key: key_kind });
    }
    RateLimitSettings {
        store,
        redis_timeout: e.positive_duration(
            "rate_limit.redis_timeout",
            raw.redis_timeout.as_deref(),
            Duration::from_millis(50),
        ),
        on_store_error,
        key_prefix,
        policies,
    }
}

fn check_redis_url(e: &mut Errors, key: &str, url: &str) {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        // Never echo the URL: it may carry a password.
        e.push(key, "must start with redis:// or rediss://");
    }
}

fn validate_chatkit(raw: RawChatKit, rate_limit: Option<&RateLimitSettings>, e: &mut Errors) -> ChatKitSettings {
    let api_key = match (raw.api_key_env, raw.api_key_file) {
        (Some(env), None) => SecretSource::Env(env),
        (None, Some(file)) => SecretSource::File(file),
        (None, None) => SecretSource::Env("OPENAI_API_KEY".into()),
        (Some(env), Some(_)) => {
            e.push("chatkit.api_key_env", "set only one of api_key_env and api_key_file");
            SecretSource::Env(env)
        }
    };
    let api_base = raw.api_base.unwrap_or_else(|| "https://api.openai.com/v1".into());
    if e.http_url("chatkit.api_base", &api_base, true).is_none() {
        // reported
    }
    let api_base = api_base.trim_end_matches('/').to_string();
    let workflow_id = match raw.workflow_id {
        Some(w) if !w.trim().is_empty() => w,
        _ => {
            e.push("chatkit.workflow_id", "required (e.g. \"wf_...\" from Agent Builder)");
            String::new()
        }
    };
    let session_path = raw.session_path.unwrap_or_else(|| "/api/chatkit/session".into());
    let refresh_path = raw.refresh_path.unwrap_or_else(|| "/api/chatkit/refresh".into());
    for (key, p) in [("chatkit.session_path", &session_path), ("chatkit.refresh_path", &refresh_path)] {
        if !p.starts_with('/') {
            e.push(key, "must start with '/'");
        }
    }
    if session_path == refresh_path {
        e.push("chatkit.refresh_path", "must differ from chatkit.session_path");
    }
    let expires_after = e.duration("chatkit.expires_after", raw.expires_after.as_deref(), Duration::from_secs(600));
    if expires_after < Duration::from_secs(1) || expires_after > Duration::from_secs(600) {
        e.push("chatkit.expires_after", "must be between 1s and 600s (the API's bounds)");
    }
    if expires_after.subsec_nanos() != 0 {
        e.push("chatkit.expires_after", "must be whole seconds");
    }
    check_policy_names("chatkit.rate_limit", &raw.rate_limit, rate_limit, e);
    let max_requests_per_minute = match raw.max_requests_per_minute {
        None => None,
        Some(n) if n < 1 => {
            e.push("chatkit.max_requests_per_minute", "must be at least 1");
            None
        }
        Some(n) => Some(n.min(u32::MAX as i64) as u32),
    };
    let mut state_variables = Vec::new();
    for (name, v) in raw.state_variables {
        let key = format!("chatkit.state_variables.{name}");
        if name.is_empty() || name.chars().count() > 64 {
            e.push(&key, "names must be 1 to 64 characters");
        }
        let default = match v.default {
            None => None,
            Some(toml::Value::String(s)) => Some(serde_json::Value::String(s)),
            Some(toml::Value::Integer(i)) => Some(serde_json::Value::from(i)),
            Some(toml::Value::Float(f)) => serde_json::Number::from_f64(f).map(serde_json::Value::Number),
            Some(toml::Value::Boolean(b)) => Some(serde_json::Value::Bool(b)),
            Some(_) => {
                e.push(format!("{key}.default"), "must be a string, number or boolean");
                None
            }
        };
        let source = match (v.claim, v.header) {
            (Some(c), None) => StateSource::Claim(c.to_ascii_lowercase()),
            (None, Some(h)) => match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => StateSource::Header(h),
                Err(_) => {
                    e.push(format!("{key}.header"), format!("invalid header name {h:?}"));
                    StateSource::Constant
                }
            },
            (None, None) if default.is_some() => StateSource::Constant,
            (None, None) => {
                e.push(&key, "needs claim, header or default");
                StateSource::Constant
            }
            (Some(_), Some(_)) => {
                e.push(&key, "set only one of claim and header");
                StateSource::Constant
            }
        };
        state_variables.push(StateVariable { name, source, default });
    }
    if let Some(c) = &raw.configuration {
        if let Some(f) = &c.file_upload {
            if let Some(size) = f.max_file_size
                && !(1..=512).contains(&size)
            {
                e.push("chatkit.configuration.file_upload.max_file_size", "must be 1..512 (MB)");
            }
            if f.max_files == Some(0) {
                e.push("chatkit.configuration.file_upload.max_files", "must be at least 1");
            }
        }
        if let Some(h) = &c.history
            && h.recent_threads == Some(0)
        {
            e.push("chatkit.configuration.history.recent_threads", "must be at least 1");
        }
    }
    ChatKitSettings {
        api_key,
        api_base,
        ca_file: raw.ca_file,
        workflow_id,
        workflow_version: raw.workflow_version,
        session_path,
        refresh_path,
        expires_after,
        timeout: e.positive_duration("chatkit.timeout", raw.timeout.as_deref(), Duration::from_secs(10)),
        rate_limit: raw.rate_limit,
        max_requests_per_minute,
        tracing: raw.tracing,
        state_variables,
        configuration: raw.configuration,
    }
}

fn validate_log(raw: RawLog, e: &mut Errors) -> LogSettings {
    let format = match raw.format.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(other) => {
            e.push("log.format", format!("must be json or text (got {other:?})"));
            LogFormat::Json
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        e.push("log.level", format!("invalid level {level:?}: expected e.g. \"info\" or \"debug\""));
    }
    LogSettings { format, level, audit_file: raw.audit_file }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:8443"
        [tls]
        self_signed = true
        [upstream]
        url = "http://127.0.0.1:3000"
    "#;

    fn errors(text: &str) -> Vec<String> {
        Config::from_toml(text).expect_err("expected errors").0.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.tls.source, TlsSource::SelfSigned);
        assert_eq!(c.admin.listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(c.server.max_header_bytes, 32768);
        assert!(c.auth.is_none() && c.rate_limit.is_none() && c.chatkit.is_none());
    }

    #[test]
    fn unknown_key_and_bad_duration_are_both_named() {
        let errs = errors(&format!("{MINIMAL}\n[server.extra]\n").replace(
            "listen = \"127.0.0.1:8443\"",
            "listen = \"127.0.0.1:8443\"\nheader_timeout = \"10 parsecs\"\nlisten_typo = 1",
        ));
        assert!(errs.iter().any(|e| e.starts_with("server.listen_typo: unknown key")), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("server.header_timeout:")), "{errs:?}");
    }

    #[test]
    fn policy_errors_name_their_key() {
        let text = format!(
            "{MINIMAL}\n[rate_limit.policies.chatkit]\nlimit = 0\nwindow = \"60s\"\n[[routes]]\npath = \"/api/\"\nrate_limit = [\"nope\"]\n"
        );
        let errs = errors(&text);
        assert!(errs.contains(&"rate_limit.policies.chatkit.limit: must be at least 1".to_string()), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("routes[0].rate_limit[0]: unknown policy")), "{errs:?}");
        let text = format!(
            "{MINIMAL}\n[rate_limit]\nkey_prefix = \"a{{b\"\n[rate_limit.policies.week]\nlimit = 1\nwindow = \"31d\"\n"
        );
        let errs = errors(&text);
        assert!(errs.contains(&"rate_limit.policies.week.window: must be at most 30d".to_string()), "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("rate_limit.key_prefix: ")), "{errs:?}");
    }

    #[test]
    fn required_route_without_auth_is_an_error() {
        let errs = errors(&format!("{MINIMAL}\n[[routes]]\npath = \"/\"\nauth = \"required\"\n"));
        assert!(errs.iter().any(|e| e.starts_with("routes[0].auth:")), "{errs:?}");
    }

    #[test]
    fn chatkit_expiry_bounds_are_enforced() {
        let text = format!(
            "{MINIMAL}\n[auth]\nintrospection_url = \"http://127.0.0.1:3000/s\"\n[chatkit]\nworkflow_id = \"wf_1\"\nexpires_after = \"11m\"\n"
        );
        let errs = errors(&text);
        assert!(errs.iter().any(|e| e.starts_with("chatkit.expires_after:")), "{errs:?}");
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config.example.toml");
        Config::from_toml(text).unwrap();
    }
}

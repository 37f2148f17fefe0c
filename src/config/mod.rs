//! The TOML configuration: the typed settings every module reads, and how a file becomes them
//! (`raw` is the file as written, `validate` and `optional` turn it into settings).
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

mod chatkit_server;
mod optional;
mod raw;
mod validate;

pub use chatkit_server::{CHATKIT_TYPES, ChatKitServerSettings, LimitResponse, ModelRule, STREAMING_TYPES};
use raw::RawConfig;
use validate::{Errors, validate};

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
    ///
    /// A value of the wrong type (`max_connections = "many"`) is reported with its key, and the
    /// file is read again without that value so every other problem is reported too.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let mut errors = Errors::default();
        let mut tree: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigErrors(vec![ConfigError { key: "<file>".into(), message: one_line(&e.to_string()) }]))?;
        let mut type_errors: Vec<ConfigError> = Vec::new();
        let raw = loop {
            let mut unknown = Vec::new();
            let mut track = serde_path_to_error::Track::new();
            let de = serde_path_to_error::Deserializer::new(toml::Value::Table(tree.clone()), &mut track);
            match serde_ignored::deserialize::<_, _, RawConfig>(de, |path| unknown.push(key_path(&path))) {
                Ok(raw) => {
                    for key in unknown {
                        errors.push(key, "unknown key");
                    }
                    break raw;
                }
                Err(e) => {
                    let path = track.path();
                    let key = segments_key(&path);
                    // Each pass drops one value; a path that cannot be dropped ends the search.
                    let removed = !key.is_empty() && type_errors.len() < 64 && remove_path(&mut tree, &path);
                    type_errors.push(ConfigError {
                        key: if key.is_empty() { "<file>".into() } else { key },
                        message: type_message(&e.to_string()),
                    });
                    if !removed {
                        return Err(ConfigErrors(type_errors));
                    }
                }
            }
        };
        let config = validate(raw, &mut errors);
        // A dropped value reads as absent: don't also report it as "required" or defaulted.
        errors.0.retain(|e| !type_errors.iter().any(|t| is_under(&e.key, &t.key)));
        let mut all = type_errors;
        all.append(&mut errors.0);
        match (config, all.is_empty()) {
            (Some(c), true) => Ok(c),
            _ => Err(ConfigErrors(all)),
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

/// `routes[0].auth` for a serde path.
fn segments_key(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// `key` is `parent` or inside it.
fn is_under(key: &str, parent: &str) -> bool {
    key.strip_prefix(parent).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// Drop the value at `path` from the parsed file; false when there is nothing to drop.
fn remove_path(tree: &mut toml::Table, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    fn remove(value: &mut toml::Value, path: &[&Segment]) -> bool {
        match (value, path) {
            (toml::Value::Table(t), [Segment::Map { key }]) => t.remove(key.as_str()).is_some(),
            (toml::Value::Array(items), [Segment::Seq { index }]) if *index < items.len() => {
                items.remove(*index);
                true
            }
            (toml::Value::Table(t), [Segment::Map { key }, rest @ ..]) => {
                t.get_mut(key.as_str()).is_some_and(|v| remove(v, rest))
            }
            (toml::Value::Array(items), [Segment::Seq { index }, rest @ ..]) => {
                items.get_mut(*index).is_some_and(|v| remove(v, rest))
            }
            _ => false,
        }
    }
    let segments: Vec<&Segment> = path.iter().collect();
    let mut root = toml::Value::Table(std::mem::take(tree));
    let removed = remove(&mut root, &segments);
    if let toml::Value::Table(t) = root {
        *tree = t;
    }
    removed
}

/// serde's `invalid type: integer `3`, expected a string` as `expected a string, found integer 3`.
/// A string value is never echoed (it may be a URL with a password).
fn type_message(serde: &str) -> String {
    let serde = one_line(serde);
    let Some(rest) = serde.strip_prefix("invalid type: ") else {
        return serde;
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return serde;
    };
    // toml names the key itself (`a string in `server.listen``): the key is already ours.
    let expected = expected.split(" in `").next().unwrap_or(expected);
    let expected = match expected {
        "usize" | "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" => "an integer",
        "a boolean" | "bool" => "a boolean (true or false)",
        "a sequence" => "an array",
        other => other,
    };
    let found = if found.starts_with("string ") { "a string" } else { &found.replace('`', "") };
    format!("expected {expected}, found {found}")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
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
    fn type_errors_name_their_key_and_the_other_problems_are_reported_too() {
        let text = format!(
            "{MINIMAL}\n[auth]\nintrospection_url = \"http://127.0.0.1:3000/s\"\ncookies = \"session\"\n\
             [chatkit]\nworkflow_id = \"wf_1\"\nworkflow_version = 3\nexpires_after = \"11m\"\n"
        )
        .replace("url = \"http://127.0.0.1:3000\"", "url = \"http://127.0.0.1:3000\"\ntimeout = true");
        let errs = errors(&format!("{text}\n[[routes]]\npath = \"/\"\nrate_limit = [1]\n"));
        assert_eq!(
            errs,
            vec![
                "auth.cookies: expected an array, found a string",
                "chatkit.workflow_version: expected a string, found integer 3",
                "routes[0].rate_limit[0]: expected a string, found integer 1",
                "upstream.timeout: expected a string, found boolean true",
                "chatkit.expires_after: must be between 1s and 600s (the API's bounds)",
            ],
        );
        let errs = errors(&MINIMAL.replace("listen = \"127.0.0.1:8443\"", "listen = 8443\nmax_connections = \"many\""));
        assert_eq!(
            errs,
            vec![
                "server.listen: expected a string, found integer 8443",
                "server.max_connections: expected an integer, found a string"
            ]
        );
    }

    #[test]
    fn workers_are_bounded_and_an_explicit_value_wins() {
        let with = |w: &str| {
            MINIMAL.replace("listen = \"127.0.0.1:8443\"", &format!("listen = \"127.0.0.1:8443\"\nworkers = {w}"))
        };
        assert_eq!(errors(&with("0")), vec!["server.workers: must be between 1 and 1024"]);
        assert_eq!(errors(&with("1025")), vec!["server.workers: must be between 1 and 1024"]);
        let config = Config::from_toml(&with("3")).unwrap();
        assert_eq!(config.server.workers, Some(3));
        // Set in the file, TOKIO_WORKER_THREADS (read only when the key is absent) is not consulted.
        assert_eq!(config.server.worker_threads(), Ok(3));
        assert_eq!(Config::from_toml(MINIMAL).unwrap().server.workers, None);
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
        let text = include_str!("../../config.example.toml");
        Config::from_toml(text).unwrap();
    }
}

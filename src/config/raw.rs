//! The file as written: serde structs whose every field is optional, so that validation (not
//! deserialisation) reports problems, all of them, each with its key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::settings::ChatKitConfiguration;

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawConfig {
    pub(super) server: Option<RawServer>,
    pub(super) tls: Option<RawTls>,
    pub(super) upstream: Option<RawUpstream>,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    pub(super) auth: Option<RawAuth>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) chatkit: Option<RawChatKit>,
    #[serde(default)]
    pub(super) log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) redirect_listen: Option<String>,
    pub(super) https_port: Option<u16>,
    #[serde(default)]
    pub(super) hosts: Vec<String>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    pub(super) header_timeout: Option<String>,
    pub(super) max_header_bytes: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) workers: Option<usize>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) shutdown_delay: Option<String>,
    pub(super) body_timeout: Option<String>,
    pub(super) upgrades: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allow_underscore_headers: bool,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawTls {
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) self_signed: bool,
    pub(super) reload_interval: Option<String>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) hsts: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawUpstream {
    pub(super) url: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) pool_idle_timeout: Option<String>,
    pub(super) pool_max_idle_per_host: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAuth {
    pub(super) preset: Option<String>,
    pub(super) introspection_url: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) cookies: Option<Vec<String>>,
    #[serde(default)]
    pub(super) forward_headers: Vec<String>,
    pub(super) user_id: Option<String>,
    pub(super) user_name: Option<String>,
    pub(super) user_email: Option<String>,
    pub(super) cache_ttl: Option<String>,
    pub(super) negative_cache_ttl: Option<String>,
    pub(super) stale_if_error: Option<String>,
    pub(super) cache_max_entries: Option<usize>,
    pub(super) login_url: Option<String>,
    pub(super) header_prefix: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) respect_cache_control: Option<bool>,
    pub(super) max_in_flight: Option<usize>,
    pub(super) breaker_failures: Option<u32>,
    pub(super) breaker_cooldown: Option<String>,
    pub(super) introspection_rate_limit: Option<String>,
    #[serde(default)]
    pub(super) claims: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) path: Option<String>,
    pub(super) auth: Option<String>,
    pub(super) unauthenticated: Option<String>,
    #[serde(default)]
    pub(super) rate_limit: Vec<String>,
    pub(super) chatkit_server: Option<RawChatKitServer>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRateLimit {
    pub(super) redis_url: Option<String>,
    pub(super) redis_url_env: Option<String>,
    pub(super) redis_url_file: Option<PathBuf>,
    pub(super) redis_cluster: Option<Vec<String>>,
    pub(super) redis_timeout: Option<String>,
    pub(super) on_store_error: Option<String>,
    pub(super) key_prefix: Option<String>,
    #[serde(default)]
    pub(super) policies: BTreeMap<String, RawPolicy>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawPolicy {
    pub(super) algorithm: Option<String>,
    pub(super) limit: Option<i64>,
    pub(super) window: Option<String>,
    pub(super) burst: Option<i64>,
    pub(super) key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawChatKit {
    pub(super) api_key_env: Option<String>,
    pub(super) api_key_file: Option<PathBuf>,
    pub(super) api_base: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) workflow_id: Option<String>,
    pub(super) workflow_version: Option<String>,
    pub(super) session_path: Option<String>,
    pub(super) refresh_path: Option<String>,
    pub(super) expires_after: Option<String>,
    pub(super) timeout: Option<String>,
    #[serde(default)]
    pub(super) rate_limit: Vec<String>,
    pub(super) max_requests_per_minute: Option<i64>,
    pub(super) tracing: Option<bool>,
    #[serde(default)]
    pub(super) state_variables: BTreeMap<String, RawStateVariable>,
    pub(super) configuration: Option<ChatKitConfiguration>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawStateVariable {
    pub(super) claim: Option<String>,
    pub(super) header: Option<String>,
    pub(super) default: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
    pub(super) audit_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawChatKitServer {
    pub(super) max_body_bytes: Option<u64>,
    #[serde(default)]
    pub(super) max_body_bytes_by_type: BTreeMap<String, u64>,
    pub(super) unknown_types: Option<String>,
    pub(super) max_list_limit: Option<u64>,
    pub(super) max_message_chars: Option<u64>,
    pub(super) max_attachments: Option<u64>,
    pub(super) max_concurrent_streams: Option<u64>,
    pub(super) stream_lease_ttl: Option<String>,
    pub(super) limit_response: Option<String>,
    #[serde(default)]
    pub(super) rate_limit: BTreeMap<String, Vec<String>>,
    pub(super) models: Option<RawModels>,
    pub(super) thread_ownership: Option<bool>,
    pub(super) thread_ownership_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawModels {
    pub(super) claim: Option<String>,
    pub(super) default: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allow: BTreeMap<String, Vec<String>>,
}

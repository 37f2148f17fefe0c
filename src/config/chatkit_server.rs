//! `[routes.chatkit_server]`: a route in front of a self-hosted ChatKit server (the
//! `openai-chatkit` Python package), whose requests the gate reads, classifies by `type` and
//! checks before forwarding the same bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::validate::{Errors, check_policy_names};
use super::{RateLimitSettings, parse_duration};

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

fn known_type(e: &mut Errors, key: &str, t: &str) -> bool {
    if CHATKIT_TYPES.contains(&t) {
        return true;
    }
    e.push(key, format!("unknown ChatKit request type {t:?} (expected one of {})", CHATKIT_TYPES.join(", ")));
    false
}

fn bytes(e: &mut Errors, key: &str, v: u64) -> usize {
    if v == 0 {
        e.push(key, "must be at least 1");
    }
    if v > 1 << 30 {
        e.push(key, "must be at most 1073741824 (1 GiB)");
    }
    usize::try_from(v).unwrap_or(usize::MAX)
}

pub(super) fn validate_chatkit_server(
    key: &str,
    raw: RawChatKitServer,
    rate_limit: Option<&RateLimitSettings>,
    e: &mut Errors,
) -> ChatKitServerSettings {
    let max_body_bytes = bytes(e, &format!("{key}.max_body_bytes"), raw.max_body_bytes.unwrap_or(64 * 1024));
    let mut by_type = BTreeMap::new();
    for (t, v) in raw.max_body_bytes_by_type {
        let k = format!("{key}.max_body_bytes_by_type.{t}");
        if known_type(e, &k, &t) {
            by_type.insert(t, bytes(e, &k, v));
        }
    }
    let allow_unknown_types = match raw.unknown_types.as_deref() {
        None | Some("reject") => false,
        Some("allow") => true,
        Some(other) => {
            e.push(format!("{key}.unknown_types"), format!("must be reject or allow (got {other:?})"));
            false
        }
    };
    let limit_response = match raw.limit_response.as_deref() {
        None | Some("sse") => LimitResponse::Sse,
        Some("json") => LimitResponse::Json,
        Some(other) => {
            e.push(format!("{key}.limit_response"), format!("must be sse or json (got {other:?})"));
            LimitResponse::Sse
        }
    };
    for (name, v) in [
        ("max_list_limit", raw.max_list_limit),
        ("max_message_chars", raw.max_message_chars),
        ("max_concurrent_streams", raw.max_concurrent_streams),
    ] {
        if v == Some(0) {
            e.push(format!("{key}.{name}"), "must be at least 1");
        }
    }
    let max_concurrent_streams = raw.max_concurrent_streams.map(|n| u32::try_from(n).unwrap_or(u32::MAX).max(1));
    if max_concurrent_streams.is_some() && rate_limit.is_none() {
        e.push(
            format!("{key}.max_concurrent_streams"),
            "needs a [rate_limit] section (an empty one uses the in-process store)",
        );
    }
    let ttl_key = format!("{key}.stream_lease_ttl");
    let stream_lease_ttl = match raw.stream_lease_ttl.as_deref().map(parse_duration) {
        None => Duration::from_secs(600),
        Some(Ok(d)) if d >= Duration::from_secs(1) && d <= Duration::from_secs(86_400) => d,
        Some(Ok(_)) => {
            e.push(&ttl_key, "must be between 1s and 24h");
            Duration::from_secs(600)
        }
        Some(Err(m)) => {
            e.push(&ttl_key, m);
            Duration::from_secs(600)
        }
    };
    let mut per_type = BTreeMap::new();
    for (t, names) in raw.rate_limit {
        let k = format!("{key}.rate_limit.{t}");
        if known_type(e, &k, &t) {
            check_policy_names(&k, &names, rate_limit, e);
            per_type.insert(t, names);
        }
    }
    let models = raw.models.and_then(|m| {
        // Whether the claim exists is checked with [auth] (config::validate).
        let Some(claim) = m.claim.map(|c| c.to_ascii_lowercase()) else {
            e.push(format!("{key}.models.claim"), "required (the [auth.claims] name that decides the allowed models)");
            return None;
        };
        Some(ModelRule { claim, allow: m.allow, default: m.default })
    });
    let own_key = format!("{key}.thread_ownership_ttl");
    let thread_ownership_ttl = match raw.thread_ownership_ttl.as_deref().map(parse_duration) {
        None => Duration::from_secs(30 * 86_400),
        Some(Ok(d)) if d >= Duration::from_secs(1) => d,
        Some(Ok(_)) => {
            e.push(&own_key, "must be at least 1s");
            Duration::from_secs(30 * 86_400)
        }
        Some(Err(m)) => {
            e.push(&own_key, m);
            Duration::from_secs(30 * 86_400)
        }
    };
    ChatKitServerSettings {
        thread_ownership: raw.thread_ownership.unwrap_or(false),
        thread_ownership_ttl,
        max_body_bytes,
        max_body_bytes_by_type: by_type,
        allow_unknown_types,
        max_list_limit: raw.max_list_limit,
        max_message_chars: raw.max_message_chars,
        max_attachments: raw.max_attachments,
        max_concurrent_streams,
        stream_lease_ttl,
        limit_response,
        rate_limit: per_type,
        models,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use crate::config::Config;

    const BASE: &str = r#"
        [server]
        listen = "127.0.0.1:8443"
        [tls]
        self_signed = true
        [upstream]
        url = "http://127.0.0.1:3000"
        [auth]
        introspection_url = "http://127.0.0.1:3000/s"
        [auth.claims]
        tier = "/tier"
        [rate_limit.policies.ck_msg]
        limit = 3
        window = "60s"
        [[routes]]
        path = "/chatkit"
    "#;

    #[test]
    fn a_chatkit_server_route_parses_with_defaults() {
        let c = Config::from_toml(&format!("{BASE}[routes.chatkit_server]\n")).unwrap();
        let s = c.routes[0].chatkit_server.as_ref().unwrap();
        assert_eq!((s.max_body_bytes, s.allow_unknown_types, s.read_limit()), (65536, false, 65536));
        assert_eq!(s.limit_response, super::LimitResponse::Sse);
    }

    #[test]
    fn every_mistake_names_its_key() {
        let text = format!(
            "{BASE}[routes.chatkit_server]\nmax_body_bytes = 0\nunknown_types = \"maybe\"\nstream_lease_ttl = \"0\"\n\
             [routes.chatkit_server.rate_limit]\n\"threads.nope\" = [\"ck_msg\"]\n\"threads.create\" = [\"missing\"]\n\
             [routes.chatkit_server.models]\nclaim = \"plan\"\n"
        );
        let errs: Vec<String> = Config::from_toml(&text).unwrap_err().0.iter().map(ToString::to_string).collect();
        for key in [
            "routes[0].chatkit_server.max_body_bytes: must be at least 1",
            "routes[0].chatkit_server.unknown_types: must be reject or allow",
            "routes[0].chatkit_server.stream_lease_ttl: must be between 1s and 24h",
            "routes[0].chatkit_server.rate_limit.threads.nope: unknown ChatKit request type",
            "routes[0].chatkit_server.rate_limit.threads.create[0]: unknown policy \"missing\"",
            "routes[0].chatkit_server.models.claim: claim \"plan\" is not defined",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key} not in {errs:?}");
        }
    }

    #[test]
    fn model_rule_uses_the_claim_then_the_default() {
        let rule = super::ModelRule {
            claim: "tier".into(),
            allow: [("free".to_string(), vec!["small".to_string()]), ("pro".to_string(), vec!["*".to_string()])].into(),
            default: None,
        };
        assert!(rule.allows(Some("free"), "small"));
        assert!(!rule.allows(Some("free"), "large"));
        assert!(rule.allows(Some("pro"), "large"));
        assert!(!rule.allows(None, "small"));
        assert!(!rule.allows(Some("other"), "small"));
    }
}

//! `[routes.chatkit_server]`: a route in front of a self-hosted ChatKit server (the
//! `openai-chatkit` Python package), whose requests the gate reads, classifies by `type` and
//! checks before forwarding the same bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::errors::{Errors, check_policy_names, parse_duration};
use crate::config::raw::RawChatKitServer;
use crate::config::settings::{CHATKIT_TYPES, ChatKitServerSettings, LimitResponse, ModelRule, RateLimitSettings};

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
        assert_eq!(s.limit_response, crate::config::settings::LimitResponse::Sse);
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
        let rule = crate::config::settings::ModelRule {
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

//! `[chatkit]`: hosted ChatKit session minting (workflow, API key source, state variables).

use std::time::Duration;

use http::HeaderName;

use crate::config::errors::{Errors, check_policy_names};
use crate::config::raw::*;
use crate::config::settings::*;

pub(super) fn validate_chatkit(
    raw: RawChatKit,
    rate_limit: Option<&RateLimitSettings>,
    e: &mut Errors,
) -> ChatKitSettings {
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
    // Only validated here (problems are pushed); the client parses it again per call path.
    let _ = e.http_url("chatkit.api_base", &api_base, true);
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

//! The TOML configuration: the typed settings every module reads (`settings`), and how a file
//! becomes them: `raw` is the file as written; `validate` checks the core sections and `auth`,
//! `rate_limit`, `chatkit` and `chatkit_server` one optional section each; `errors` names the key
//! of every problem.
//!
//! Every problem is collected (not just the first) and names its key, so `chatkit-gate check`
//! can print them all at once.

use std::path::Path;

mod auth;
mod chatkit;
mod chatkit_server;
mod errors;
mod rate_limit;
mod raw;
mod settings;
mod validate;

pub use errors::{ConfigError, ConfigErrors, parse_duration};
pub use settings::*;

use crate::config::errors::Errors;
use crate::config::raw::RawConfig;
use crate::config::validate::validate;

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
    use std::time::Duration;

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

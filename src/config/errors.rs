//! Config errors, each tied to the key it is about; the collector the validators fill; and the
//! value checks every section shares (durations, policy names).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use crate::config::settings::RateLimitSettings;

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

/// The problems found so far.
#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError { key: key.into(), message: message.into() });
    }

    pub(super) fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
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

    pub(super) fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(key, format!("invalid address {value:?}: expected e.g. \"0.0.0.0:8443\""));
                None
            }
        }
    }

    pub(super) fn positive_duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        let d = self.duration(key, value, default);
        if d.is_zero() {
            self.push(key, "must be greater than 0");
            return default;
        }
        d
    }

    pub(super) fn http_url(&mut self, key: &str, value: &str, https_ok: bool) -> Option<Uri> {
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

pub(super) fn check_policy_names(key: &str, names: &[String], rate_limit: Option<&RateLimitSettings>, e: &mut Errors) {
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

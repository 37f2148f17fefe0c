//! The identity the app is told: header names, and values made safe for a header (control
//! characters removed, bounded in length; JSON scalars as text).

use http::{HeaderName, HeaderValue};

/// Longest identity header value sent to the app, in bytes (longer values are cut at a character
/// boundary); also the longest user id accepted.
pub const MAX_IDENTITY_VALUE_BYTES: usize = 1024;

/// Header names of the identity sent to the app.
pub(crate) struct IdentityHeaders {
    pub(crate) user: HeaderName,
    pub(crate) email: HeaderName,
    pub(crate) name: HeaderName,
    /// (claim name, JSON pointer, header name).
    pub(crate) claims: Vec<(String, String, HeaderName)>,
}

/// A JSON scalar as text (`null`, objects and arrays have none).
pub(crate) fn scalar_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The documented rule for identity values sent to the app: control characters (CR, LF, TAB,
/// NUL, DEL, C1) removed, surrounding whitespace trimmed, cut to [`MAX_IDENTITY_VALUE_BYTES`] at a
/// character boundary, other UTF-8 kept as is; empty after that = not sent.
pub(crate) fn sanitized(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len().min(MAX_IDENTITY_VALUE_BYTES));
    for c in s.trim().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_IDENTITY_VALUE_BYTES {
            break;
        }
        out.push(c);
    }
    let trimmed = out.trim_end();
    if trimmed.is_empty() {
        return None;
    }
    out.truncate(trimmed.len());
    Some(out)
}

pub(crate) fn header_value(s: &str) -> Option<HeaderValue> {
    sanitized(s).and_then(|s| HeaderValue::from_str(&s).ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn identity_values_lose_control_characters_and_are_bounded() {
        assert_eq!(sanitized("Ann\r\nX-Admin: yes").as_deref(), Some("AnnX-Admin: yes"));
        assert_eq!(sanitized("  José\u{0} \u{85}").as_deref(), Some("José"));
        assert_eq!(sanitized("\t\r\n"), None);
        let long = "é".repeat(MAX_IDENTITY_VALUE_BYTES);
        let cut = sanitized(&long).unwrap();
        assert!(cut.len() <= MAX_IDENTITY_VALUE_BYTES && cut.len() > MAX_IDENTITY_VALUE_BYTES - 2);
        assert!(header_value("Zoë").is_some(), "UTF-8 is accepted by HeaderValue");
    }
}

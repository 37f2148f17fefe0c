//! Request-level errors and the one place they become HTTP answers.

use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::http::body::GateBody;

/// Everything that ends a request with an answer of the gate's own.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("HTTPS required")]
    HttpsRequired,
    #[error("unauthorized")]
    Unauthorized,
    /// Browser navigation without a session: go to the login page.
    #[error("login required")]
    LoginRedirect(HeaderValue),
    #[error("forbidden")]
    Forbidden,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `CONNECT` (and any other method the gate never forwards).
    #[error("method not forwarded")]
    MethodNotForwarded,
    /// A host that `server.hosts` does not list.
    #[error("misdirected request")]
    MisdirectedRequest,
    #[error("request header fields too large")]
    HeadersTooLarge,
    #[error("request body too large")]
    PayloadTooLarge,
    /// The client's request body made no progress for `server.body_timeout`.
    #[error("request body timed out")]
    RequestTimeout,
    #[error("rate limited, retry after {retry_after}s")]
    TooManyRequests {
        retry_after: u64,
        /// `RateLimit-Policy` / `RateLimit` headers of the request's policies.
        headers: HeaderMap,
    },
    #[error("authentication service unavailable")]
    AuthUnavailable,
    #[error("rate-limit store unavailable")]
    RateLimitUnavailable,
    #[error("ChatKit is not configured: {0}")]
    ChatKitNotConfigured(String),
    #[error("ChatKit API unavailable")]
    ChatKitUnavailable,
    #[error("ChatKit API rate limited, retry after {0}s")]
    ChatKitRateLimited(u64),
    #[error("ChatKit API timed out")]
    ChatKitTimeout,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("internal error")]
    Internal,
    /// A rule of a ChatKit-server route refused the request (400, 403, 413 or 415).
    #[error("refused: {1}")]
    Refused(StatusCode, &'static str),
}

impl GateError {
    pub fn status(&self) -> StatusCode {
        match self {
            GateError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GateError::HttpsRequired | GateError::Forbidden => StatusCode::FORBIDDEN,
            GateError::Unauthorized => StatusCode::UNAUTHORIZED,
            GateError::LoginRedirect(_) => StatusCode::FOUND,
            GateError::MethodNotAllowed | GateError::MethodNotForwarded => StatusCode::METHOD_NOT_ALLOWED,
            GateError::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            GateError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GateError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GateError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GateError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            GateError::AuthUnavailable
            | GateError::RateLimitUnavailable
            | GateError::ChatKitNotConfigured(_)
            | GateError::ChatKitRateLimited(_) => StatusCode::SERVICE_UNAVAILABLE,
            GateError::ChatKitUnavailable | GateError::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            GateError::ChatKitTimeout | GateError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GateError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            GateError::Refused(status, _) => *status,
        }
    }

    /// The `error` string of the JSON body; never carries a secret or a peer's message.
    pub fn public_message(&self) -> String {
        match self {
            GateError::BadRequest(m) => (*m).to_string(),
            GateError::HttpsRequired => "HTTPS required".into(),
            GateError::Unauthorized | GateError::LoginRedirect(_) => "Unauthorized".into(),
            GateError::Forbidden => "Forbidden".into(),
            GateError::MethodNotAllowed | GateError::MethodNotForwarded => "Method not allowed".into(),
            GateError::MisdirectedRequest => "Misdirected request".into(),
            GateError::HeadersTooLarge => "Request header fields too large".into(),
            GateError::PayloadTooLarge => "Request body too large".into(),
            GateError::RequestTimeout => "Request body timed out".into(),
            GateError::TooManyRequests { .. } => "Too many requests".into(),
            GateError::AuthUnavailable => "Authentication service unavailable".into(),
            GateError::RateLimitUnavailable => "Rate limiting unavailable".into(),
            GateError::ChatKitNotConfigured(what) => format!("ChatKit is not configured: {what}"),
            GateError::ChatKitUnavailable => "Failed to create session".into(),
            GateError::ChatKitRateLimited(_) => "ChatKit is busy, retry later".into(),
            GateError::ChatKitTimeout => "ChatKit API timed out".into(),
            GateError::UpstreamUnavailable => "Upstream unavailable".into(),
            GateError::UpstreamTimeout => "Upstream timed out".into(),
            GateError::Internal => "Internal error".into(),
            GateError::Refused(_, m) => (*m).to_string(),
        }
    }

    /// The answer for this error (the error itself is kept for the log line).
    pub fn to_response(&self) -> Response<GateBody> {
        let status = self.status();
        if let GateError::LoginRedirect(location) = self {
            let mut resp = Response::new(GateBody::empty());
            *resp.status_mut() = status;
            resp.headers_mut().insert(LOCATION, location.clone());
            resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return resp;
        }
        let mut body = serde_json::json!({ "error": self.public_message() });
        if let GateError::TooManyRequests { retry_after, .. } = self {
            body["retryAfter"] = (*retry_after).into();
        }
        let mut resp = json_response(status, &body);
        let headers = resp.headers_mut();
        match self {
            GateError::TooManyRequests { retry_after, headers: extra } => {
                headers.insert(RETRY_AFTER, HeaderValue::from((*retry_after).max(1)));
                for (name, value) in extra {
                    headers.append(name, value.clone());
                }
            }
            GateError::ChatKitRateLimited(secs) => {
                headers.insert(RETRY_AFTER, HeaderValue::from((*secs).max(1)));
            }
            GateError::AuthUnavailable | GateError::RateLimitUnavailable | GateError::ChatKitNotConfigured(_) => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            GateError::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("POST"));
            }
            GateError::MethodNotForwarded => {
                headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
            }
            _ => {}
        }
        resp
    }
}

/// A JSON answer of our own. Never cached: these are per-user or transient.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<GateBody> {
    let mut resp = Response::new(GateBody::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An error and its causes on one line ("client error (Connect): tcp connect error: Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(e: GateError) -> (StatusCode, HeaderMap, String) {
        let resp = e.to_response();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn each_error_maps_to_its_status_and_body() {
        let cases: Vec<(GateError, u16, &str)> = vec![
            (GateError::BadRequest("Invalid JSON"), 400, r#"{"error":"Invalid JSON"}"#),
            (GateError::HttpsRequired, 403, r#"{"error":"HTTPS required"}"#),
            (GateError::Unauthorized, 401, r#"{"error":"Unauthorized"}"#),
            (GateError::Forbidden, 403, r#"{"error":"Forbidden"}"#),
            (GateError::MethodNotAllowed, 405, r#"{"error":"Method not allowed"}"#),
            (GateError::MethodNotForwarded, 405, r#"{"error":"Method not allowed"}"#),
            (GateError::MisdirectedRequest, 421, r#"{"error":"Misdirected request"}"#),
            (GateError::HeadersTooLarge, 431, r#"{"error":"Request header fields too large"}"#),
            (GateError::PayloadTooLarge, 413, r#"{"error":"Request body too large"}"#),
            (GateError::RequestTimeout, 408, r#"{"error":"Request body timed out"}"#),
            (
                GateError::TooManyRequests { retry_after: 7, headers: HeaderMap::new() },
                429,
                r#"{"error":"Too many requests","retryAfter":7}"#,
            ),
            (GateError::AuthUnavailable, 503, r#"{"error":"Authentication service unavailable"}"#),
            (GateError::RateLimitUnavailable, 503, r#"{"error":"Rate limiting unavailable"}"#),
            (
                GateError::ChatKitNotConfigured("OPENAI_API_KEY is not set".into()),
                503,
                r#"{"error":"ChatKit is not configured: OPENAI_API_KEY is not set"}"#,
            ),
            (GateError::ChatKitUnavailable, 502, r#"{"error":"Failed to create session"}"#),
            (GateError::ChatKitRateLimited(3), 503, r#"{"error":"ChatKit is busy, retry later"}"#),
            (GateError::ChatKitTimeout, 504, r#"{"error":"ChatKit API timed out"}"#),
            (GateError::UpstreamUnavailable, 502, r#"{"error":"Upstream unavailable"}"#),
            (GateError::UpstreamTimeout, 504, r#"{"error":"Upstream timed out"}"#),
            (GateError::Internal, 500, r#"{"error":"Internal error"}"#),
            (
                GateError::Refused(StatusCode::PAYLOAD_TOO_LARGE, "Message too long"),
                413,
                r#"{"error":"Message too long"}"#,
            ),
        ];
        for (err, status, body) in cases {
            let (s, _, b) = body_of(err).await;
            assert_eq!((s.as_u16(), b.as_str()), (status, body));
        }
    }

    #[tokio::test]
    async fn retry_after_and_allow_headers_are_set() {
        let (_, h, _) = body_of(GateError::TooManyRequests { retry_after: 0, headers: HeaderMap::new() }).await;
        assert_eq!(h[RETRY_AFTER], "1");
        let (_, h, _) = body_of(GateError::AuthUnavailable).await;
        assert!(h.contains_key(RETRY_AFTER));
        let (_, h, _) = body_of(GateError::ChatKitRateLimited(9)).await;
        assert_eq!(h[RETRY_AFTER], "9");
        let (_, h, _) = body_of(GateError::MethodNotAllowed).await;
        assert_eq!(h[ALLOW], "POST");
        let (s, h, b) = body_of(GateError::LoginRedirect(HeaderValue::from_static("/login?rd=%2F"))).await;
        assert_eq!((s.as_u16(), h[LOCATION].to_str().unwrap(), b.as_str()), (302, "/login?rd=%2F", ""));
    }
}

//! Errors become answers: early answers (the request's unread body drained, bounded, so the
//! client sees the answer rather than a reset), and the last step that adds the auth cookies
//! and rate-limit headers.

use http::header::SET_COOKIE;
use http::{HeaderValue, Response};
use hyper::body::Incoming;

use crate::http::body::GateBody;
use crate::http::error::GateError;

/// The answer and the error it came from, with the auth cookies and rate-limit headers.
pub(crate) fn finish(
    result: Result<Response<GateBody>, GateError>,
    set_cookies: Vec<HeaderValue>,
    limits: Option<crate::ratelimit::RateLimitHeaders>,
) -> (Response<GateBody>, Option<GateError>) {
    let (mut resp, error) = match result {
        Ok(r) => (r, None),
        Err(e) => failed(e),
    };
    let headers = resp.headers_mut();
    for cookie in set_cookies {
        headers.append(SET_COOKIE, cookie);
    }
    if let Some(limits) = limits {
        limits.apply(headers);
    }
    (resp, error)
}

/// Largest request body read and discarded after an early answer, and for how long.
const DRAIN_MAX_BYTES: usize = 16 << 20;
const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// After an early answer (401, 429, 400…) the client may still be sending its body. Reading
/// and discarding it, bounded, lets the answer arrive: otherwise HTTP/2 resets the stream and
/// HTTP/1.1 closes on unread data, and clients report a reset instead of the answer.
pub(crate) fn drain_unread(body: Incoming) {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut seen = 0usize;
        let deadline = tokio::time::sleep(DRAIN_MAX_TIME);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(f)) => {
                        seen += f.data_ref().map_or(0, bytes::Bytes::len);
                        if seen > DRAIN_MAX_BYTES {
                            return;
                        }
                    }
                    _ => return,
                },
                () = &mut deadline => return,
            }
        }
    });
}

pub(crate) fn early(e: GateError, body: Incoming) -> (Response<GateBody>, Option<GateError>) {
    drain_unread(body);
    failed(e)
}

pub(crate) fn failed(e: GateError) -> (Response<GateBody>, Option<GateError>) {
    (e.to_response(), Some(e))
}

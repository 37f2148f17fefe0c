//! Routes in front of a self-hosted ChatKit server (`[routes.chatkit_server]`): the gate reads
//! the request body once (bounded), parses only what its rules need (`type`, `params.limit`,
//! `params.thread_id`, the message's texts, attachments and model), applies the rules, and
//! forwards that same `Bytes` buffer; the answer streams back as on any route.
//!
//! Every ChatKit request is `POST` JSON `{"type", "params", "metadata"?}` to one URL
//! (`openai-chatkit`'s `ChatKitServer.process`), so the `type` is what tells a thread-list read
//! from a message that starts model work.

mod owners;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::config::{CHATKIT_TYPES, ChatKitServerSettings, Config, LimitResponse, STREAMING_TYPES};
use crate::http::body::{BodyEnd, BodyGuard, GateBody, ReadBodyError, read_limited};
use crate::http::error::GateError;
use crate::obs::audit::{Audit, AuditEvent, AuditKind};
use crate::obs::metrics::Metrics;
use crate::ratelimit::{Lease, PreparedPlan, RateLimitHeaders, RateLimiter};
use crate::request::context::Identity;
use crate::request::context::RequestContext;
use crate::request::routes::{Route, RouteKind, RouteTable};

/// The `type` label for a type this gate does not know.
const OTHER: &str = "other";
/// Thread ids longer than this are cut in audit lines (they come from the client).
const MAX_AUDIT_ID: usize = 128;

use owners::{FirstEvent, Owners};

/// A request that passed every rule: forward `body` (the bytes as received) with its head.
pub struct Checked {
    pub body: GateBody,
    pub limits: Option<RateLimitHeaders>,
    /// For the response body: the stream lease and the thread-owner recorder, if any.
    pub guard: Option<Box<dyn BodyGuard>>,
}

/// What a ChatKit-server answer carries until its body ends.
struct AnswerGuard {
    /// Held until the stream ends (streaming types with `max_concurrent_streams`).
    lease: Option<Lease>,
    /// `threads.create` with `thread_ownership`: reads the `thread.created` event.
    first_event: Option<FirstEvent>,
}

impl BodyGuard for AnswerGuard {
    fn data(&mut self, chunk: &Bytes) {
        if let Some(f) = &mut self.first_event {
            f.data(chunk);
        }
    }

    fn holds_end(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::is_remote)
    }

    fn ending(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.lease.take().and_then(Lease::give_back)
    }

    fn finished(&mut self, _: BodyEnd) {
        // The lease goes back now, not when hyper gets round to dropping the body.
        self.lease = None;
    }
}

/// Why a request was not forwarded: the answer to send, and the error for the log.
pub type Refused = (Response<GateBody>, Option<GateError>);

/// One ChatKit-server route, prepared.
struct ServerRoute {
    settings: ChatKitServerSettings,
    owners: Option<Arc<Owners>>,
    /// By index in `CHATKIT_TYPES`, then one for unknown types; `None` without `[rate_limit]`.
    plans: Vec<Option<PreparedPlan>>,
}

/// All ChatKit-server routes, by route index.
#[derive(Default)]
pub struct ChatKitServers {
    routes: Vec<Option<ServerRoute>>,
    metrics: Option<Metrics>,
    audit: Option<Audit>,
}

impl ChatKitServers {
    pub fn new(
        config: &Config,
        table: &RouteTable,
        limiter: Option<&RateLimiter>,
        metrics: Metrics,
        audit: Audit,
    ) -> anyhow::Result<ChatKitServers> {
        let mut routes = Vec::new();
        for route in table.all().iter().filter(|r| r.kind == RouteKind::ChatKitServer) {
            let Some(settings) =
                config.routes.iter().find(|r| r.name == route.name).and_then(|r| r.chatkit_server.clone())
            else {
                continue;
            };
            let mut plans = Vec::with_capacity(CHATKIT_TYPES.len() + 1);
            for kind in CHATKIT_TYPES.iter().copied().chain([OTHER]) {
                let plan = match limiter {
                    Some(l) => {
                        let mut names = route.rate_limit.clone();
                        names.extend(settings.rate_limit.get(kind).into_iter().flatten().cloned());
                        let lease_name = format!("{}_streams", route.name);
                        let lease = settings
                            .max_concurrent_streams
                            .filter(|_| STREAMING_TYPES.contains(&kind))
                            .map(|n| (lease_name.as_str(), n, settings.stream_lease_ttl));
                        Some(l.prepare(&names, lease).map_err(|e| anyhow::anyhow!("route {:?}: {e}", route.name))?)
                    }
                    None => None,
                };
                plans.push(plan);
            }
            if routes.len() <= route.index {
                routes.resize_with(route.index + 1, || None);
            }
            let owners = settings.thread_ownership.then(|| {
                let prefix = limiter.map_or("chatkit-gate", RateLimiter::key_prefix);
                Arc::new(Owners::new(limiter.and_then(RateLimiter::redis_store), prefix, settings.thread_ownership_ttl))
            });
            routes[route.index] = Some(ServerRoute { settings, plans, owners });
        }
        Ok(ChatKitServers { routes, metrics: Some(metrics), audit: Some(audit) })
    }

    /// Read, parse and check one request. `Ok`: forward it. `Err`: the answer to send.
    pub async fn admit(
        &self,
        parts: &mut http::request::Parts,
        body: Incoming,
        identity: Option<&Identity>,
        ctx: &RequestContext,
        limiter: Option<&RateLimiter>,
    ) -> Result<Checked, Refused> {
        let route = &ctx.route;
        let Some(Some(server)) = self.routes.get(route.index) else {
            return Err(refused(GateError::Internal));
        };
        // CORS preflights carry no body and start no work: forwarded as they are.
        if parts.method == Method::OPTIONS {
            return Ok(Checked { body: GateBody::incoming(body), limits: None, guard: None });
        }
        if parts.method != Method::POST {
            return Err(self.refuse(route, OTHER, identity, ctx, None, "method", GateError::MethodNotAllowed));
        }
        if !is_json(parts.headers.get(CONTENT_TYPE))
            || parts.headers.get(CONTENT_ENCODING).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            let e = GateError::Refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json");
            return Err(self.refuse(route, OTHER, identity, ctx, None, "invalid", e));
        }
        let settings = &server.settings;
        let bytes = match read_limited(body, settings.read_limit()).await {
            Ok(b) => b,
            Err(ReadBodyError::TooLarge(_)) => {
                return Err(self.refuse(route, OTHER, identity, ctx, None, "too_large", GateError::PayloadTooLarge));
            }
            Err(ReadBodyError::Io(e)) => {
                tracing::debug!(error = %e, request_id = ctx.request_id(), "ChatKit request body read failed");
                let e = GateError::BadRequest("Request body could not be read");
                return Err(self.refuse(route, OTHER, identity, ctx, None, "invalid", e));
            }
        };
        let req = match parse_request(&bytes) {
            Some(r) => r,
            None => {
                let e = GateError::BadRequest("Invalid ChatKit request");
                return Err(self.refuse(route, OTHER, identity, ctx, None, "invalid", e));
            }
        };
        let (kind, type_index) = match CHATKIT_TYPES.iter().position(|t| *t == req.kind) {
            Some(i) => (CHATKIT_TYPES[i], i),
            None if settings.allow_unknown_types => (OTHER, CHATKIT_TYPES.len()),
            None => {
                let e = GateError::BadRequest("Unknown ChatKit request type");
                return Err(self.refuse(route, OTHER, identity, ctx, None, "unknown_type", e));
            }
        };
        let params = req.params.unwrap_or_default();
        let thread_id = params.thread_id.as_deref();
        if let Err((decision, e)) = check_rules(settings, kind, bytes.len(), &params, identity) {
            return Err(self.refuse(route, kind, identity, ctx, thread_id, decision, e));
        }

        let streaming = STREAMING_TYPES.contains(&kind);
        // The owner lookup and the rate-limit decision run side by side: one round trip of latency.
        let foreign = async {
            match (&server.owners, thread_id, identity) {
                (Some(owners), Some(t), Some(i)) => owners.owner(t).await.filter(|owner| *owner != i.id),
                _ => None,
            }
        };
        let decide = async {
            match (limiter, server.plans.get(type_index).and_then(Option::as_ref)) {
                (Some(limiter), Some(plan)) => Some(limiter.check_prepared(route, plan, identity, ctx).await),
                _ => None,
            }
        };
        let (foreign, decision) = tokio::join!(foreign, decide);
        if foreign.is_some() {
            tracing::warn!(
                route = %route.name,
                user = identity.map_or("-", |i| i.id.as_str()),
                request_id = ctx.request_id(),
                "ChatKit thread of another user refused"
            );
            let e = GateError::Forbidden;
            return Err(self.refuse(route, kind, identity, ctx, thread_id, "forbidden_thread", e));
        }
        let (limits, lease) = match decision {
            Some(Ok(a)) => (a.headers, a.lease),
            Some(Err(denied)) => {
                let decision = if denied.concurrency { "concurrency_limited" } else { "rate_limited" };
                self.record(route, kind, identity, ctx, thread_id, decision);
                let sse = streaming && settings.limit_response == LimitResponse::Sse;
                return Err(match (sse, &denied.error) {
                    (true, GateError::TooManyRequests { retry_after, headers }) => {
                        let mut resp = error_event_response(&limit_message(denied.concurrency, *retry_after));
                        let h = resp.headers_mut();
                        h.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
                        for (name, value) in headers {
                            h.insert(name, value.clone());
                        }
                        (resp, None)
                    }
                    _ => refused(denied.error),
                });
            }
            None => (None, None),
        };
        self.record(route, kind, identity, ctx, thread_id, "allowed");
        let first_event = match (&server.owners, identity) {
            (Some(owners), Some(i)) if kind == "threads.create" => Some(FirstEvent::new(owners.clone(), &i.id)),
            _ => None,
        };
        let guard: Option<Box<dyn BodyGuard>> = (lease.is_some() || first_event.is_some())
            .then(|| Box::new(AnswerGuard { lease, first_event }) as Box<dyn BodyGuard>);
        // What was parsed borrows the buffer; the buffer itself is what goes on.
        drop(params);
        let _ = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        Ok(Checked { body: GateBody::full(bytes), limits, guard })
    }

    #[expect(clippy::too_many_arguments, reason = "one call shape for every refusal")]
    fn refuse(
        &self,
        route: &Route,
        kind: &'static str,
        identity: Option<&Identity>,
        ctx: &RequestContext,
        thread_id: Option<&str>,
        decision: &'static str,
        e: GateError,
    ) -> Refused {
        self.record(route, kind, identity, ctx, thread_id, decision);
        refused(e)
    }

    /// The `chatkit_gate_chatkit_requests_total` count and the `CHATKIT_REQUEST` audit line.
    fn record(
        &self,
        route: &Route,
        kind: &'static str,
        identity: Option<&Identity>,
        ctx: &RequestContext,
        thread_id: Option<&str>,
        decision: &'static str,
    ) {
        if let Some(m) = &self.metrics {
            m.chatkit_requests.with_label_values(&[route.name.as_str(), kind, decision]).inc();
        }
        if let Some(audit) = &self.audit {
            let thread_id = thread_id.map(|t| t.get(..MAX_AUDIT_ID).unwrap_or(t));
            audit.log(
                AuditEvent::new(AuditKind::ChatkitRequest, ctx.request_id(), ctx.client_ip)
                    .user(identity.map(|i| i.id.as_str()))
                    .route(&route.name)
                    .chatkit(kind, thread_id)
                    .reason(decision),
            );
        }
    }
}

fn refused(e: GateError) -> Refused {
    (e.to_response(), Some(e))
}

/// The request as the gate reads it; `None` unless it is one JSON object with a string `type`
/// (serde would also take an array for a struct: the server would not).
fn parse_request(bytes: &[u8]) -> Option<ChatKitRequest<'_>> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// `application/json`, with parameters (`; charset=utf-8`) or not.
fn is_json(v: Option<&HeaderValue>) -> bool {
    let Some(v) = v.and_then(|v| v.to_str().ok()) else { return false };
    let essence = v.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// The content rules, in order: body size for the type, list page size, message length and
/// attachments, model. `Err` carries the decision label and the answer.
fn check_rules(
    s: &ChatKitServerSettings,
    kind: &str,
    len: usize,
    params: &Params<'_>,
    identity: Option<&Identity>,
) -> Result<(), (&'static str, GateError)> {
    if len > s.body_limit(kind) {
        return Err(("too_large", GateError::PayloadTooLarge));
    }
    if let (Some(max), Some(limit)) = (s.max_list_limit, params.limit)
        && limit > max
    {
        return Err(("list_limit", GateError::BadRequest("params.limit is above this route's max_list_limit")));
    }
    let Some(input) = &params.input else { return Ok(()) };
    if let Some(max) = s.max_message_chars {
        let chars: usize =
            input.content.iter().filter_map(|c| c.text.as_deref()).map(|t| t.chars().count()).sum::<usize>()
                + input.quoted_text.as_deref().map_or(0, |t| t.chars().count());
        if chars as u64 > max {
            return Err(("too_large", GateError::Refused(StatusCode::PAYLOAD_TOO_LARGE, "Message too long")));
        }
    }
    if let Some(max) = s.max_attachments
        && input.attachments.len() as u64 > max
    {
        return Err(("too_large", GateError::Refused(StatusCode::PAYLOAD_TOO_LARGE, "Too many attachments")));
    }
    if let (Some(rule), Some(model)) = (&s.models, input.inference_options.as_ref().and_then(|o| o.model.as_deref())) {
        let claim = identity.and_then(|i| i.claim(&rule.claim)).map(|v| match v {
            serde_json::Value::String(s) => Cow::Borrowed(s.as_str()),
            other => Cow::Owned(other.to_string()),
        });
        if !rule.allows(claim.as_deref(), model) {
            return Err(("forbidden_model", GateError::Refused(StatusCode::FORBIDDEN, "Model not allowed")));
        }
    }
    Ok(())
}

fn limit_message(concurrency: bool, retry_after: u64) -> String {
    if concurrency {
        "Another answer is still being written. Wait for it to finish, then try again.".into()
    } else {
        format!("You have sent too many messages. Try again in {retry_after} seconds.")
    }
}

/// HTTP 200 `text/event-stream` with one ChatKit `ErrorEvent`
/// (`{"type":"error","code":"custom","message","allow_retry"}`, `chatkit/types.py`): the
/// widget shows it in the thread, where the user is looking.
pub fn error_event_response(message: &str) -> Response<GateBody> {
    let event = serde_json::json!({ "type": "error", "code": "custom", "message": message, "allow_retry": true });
    let mut resp = Response::new(GateBody::full(Bytes::from(format!("data: {event}\n\n"))));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// What the gate reads of a request; everything else is skipped unparsed. A repeated field
/// (`"type"` twice) is an error, never "first wins" against the server's "last wins".
#[derive(Deserialize)]
struct ChatKitRequest<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(default, borrow)]
    thread_id: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default, borrow)]
    input: Option<Input<'a>>,
}

#[derive(Deserialize)]
struct Input<'a> {
    #[serde(default, borrow)]
    content: Vec<Content<'a>>,
    #[serde(default)]
    attachments: Vec<IgnoredAny>,
    #[serde(default, borrow)]
    quoted_text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    inference_options: Option<InferenceOptions<'a>>,
}

/// `input_text` and `input_tag` both carry `text`.
#[derive(Deserialize)]
struct Content<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct InferenceOptions<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(json: &str) -> Result<(String, Option<u64>, usize), ()> {
        let r = parse_request(json.as_bytes()).ok_or(())?;
        let p = r.params.unwrap_or_default();
        let texts = p.input.as_ref().map_or(0, |i| i.content.len());
        Ok((r.kind.into_owned(), p.limit, texts))
    }

    #[test]
    fn parses_only_what_the_rules_need() {
        let msg = r#"{"type":"threads.add_user_message","params":{"thread_id":"thr_1","input":{"content":[{"type":"input_text","text":"hi"},{"type":"input_tag","id":"t","text":"x","data":{}}],"attachments":["a"],"quoted_text":null,"inference_options":{"model":null,"tool_choice":{"id":"t"}}}},"metadata":{"k":[1,2]}}"#;
        assert_eq!(parse(msg).unwrap(), ("threads.add_user_message".into(), None, 2));
        assert_eq!(parse(r#"{"type":"threads.list","params":{"limit":5,"order":"desc"}}"#).unwrap().1, Some(5));
        assert_eq!(parse(r#"{"type":"threads.list"}"#).unwrap().1, None);
    }

    #[test]
    fn ambiguous_or_malformed_requests_do_not_parse() {
        assert!(parse(r#"{"type":"threads.list","type":"threads.create","params":{}}"#).is_err());
        assert!(parse(r#"{"params":{}}"#).is_err());
        assert!(parse(r#"{"type":"threads.list","params":{"limit":-1}}"#).is_err());
        assert!(parse(r#"["threads.list"]"#).is_err());
        assert!(parse(r#"{"type":7}"#).is_err());
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(Some(&HeaderValue::from_static("application/json"))));
        assert!(is_json(Some(&HeaderValue::from_static("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&HeaderValue::from_static("text/plain"))));
        assert!(!is_json(None));
    }
}

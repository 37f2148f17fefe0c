//! The ChatKit module on its own (no gateway in front): `ChatKit::handle_bytes` against the strict
//! fake ChatKit API and a real redis-server, with every log line, audit line and metric captured
//! and scanned for secrets. The same behaviours through the real gateway are in `tests/chatkit.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::logs::Logs;

use common::eventually;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatkit_gate::chatkit::ChatKit;
use chatkit_gate::config::Config;
use chatkit_gate::http::error::GateError;
use chatkit_gate::obs::audit::Audit;
use chatkit_gate::obs::metrics::Metrics;
use chatkit_gate::request::context::Identity;
use chatkit_gate::request::context::RequestContext;
use chatkit_gate::request::routes::Endpoint;
use chatkit_gate::request::routes::RouteTable;
use chatkit_gate::transport::redis::RedisStore;
use common::certs::TestPki;
use common::fake_openai::{
    FakeChatKit, FakeOptions, Mode, RATE_LIMIT_RETRY_AFTER_SECS, TEST_API_KEY, TEST_WORKFLOW_ID,
};
use common::redis::RedisServer;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

struct Harness {
    fake: FakeChatKit,
    ck: ChatKit,
    metrics: Metrics,
    audit: Audit,
    audit_lines: Arc<Mutex<Vec<String>>>,
    logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
    key_dir: tempfile::TempDir,
    route: Arc<chatkit_gate::request::routes::Route>,
    /// Client secrets handed out, to scan for.
    secrets: Mutex<Vec<String>>,
}

struct Setup {
    fake: Option<FakeChatKit>,
    redis_url: Option<String>,
    extra: &'static str,
    api_base: Option<String>,
    key: Option<&'static str>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup { fake: None, redis_url: None, extra: "", api_base: None, key: Some(TEST_API_KEY) }
    }
}

fn config_text(api_base: &str, key_file: &std::path::Path, redis_url: Option<&str>, extra: &str) -> String {
    let rate_limit = match redis_url {
        Some(url) => format!("[rate_limit]\nredis_url = \"{url}\"\nredis_timeout = \"200ms\"\n"),
        None => String::new(),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[tls]
self_signed = true
[upstream]
url = "http://127.0.0.1:9"
[auth]
introspection_url = "http://127.0.0.1:9/session"
[auth.claims]
tier = "/user/tier"
{rate_limit}
[chatkit]
api_key_file = "{key}"
api_base = "{api_base}"
workflow_id = "{TEST_WORKFLOW_ID}"
expires_after = "5m"
timeout = "700ms"
max_requests_per_minute = 12
{extra}
[chatkit.state_variables]
subscription_tier = {{ claim = "tier" }}
region = {{ header = "x-region", default = "us-east-1" }}
plan_version = {{ default = 3 }}
[chatkit.configuration]
history = {{ enabled = true, recent_threads = 5 }}
"#,
        key = key_file.display()
    )
}

async fn start(setup: Setup) -> Harness {
    let (logs, guard) = common::logs::capture();
    let fake = match setup.fake {
        Some(f) => f,
        None => FakeChatKit::start_default().await,
    };
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("openai-key");
    if let Some(key) = setup.key {
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
    }
    let api_base = setup.api_base.unwrap_or_else(|| fake.api_base());
    let config = Config::from_toml(&config_text(&api_base, &key_file, setup.redis_url.as_deref(), setup.extra))
        .unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::new().unwrap();
    let (audit, audit_lines) = Audit::memory(metrics.clone()).unwrap();
    let store = match &config.rate_limit {
        Some(rl) => {
            let store = RedisStore::start(&rl.store, rl.redis_timeout, metrics.clone()).unwrap().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !store.healthy() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(store.healthy(), "redis store never connected");
            Some(store)
        }
        None => None,
    };
    let settings = config.chatkit.clone().unwrap();
    let ck = ChatKit::new(&settings, store, metrics.clone(), audit.clone()).unwrap();
    let route = RouteTable::new(&config).find(&settings.session_path).clone();
    Harness {
        fake,
        ck,
        metrics,
        audit,
        audit_lines,
        logs,
        _log_guard: guard,
        key_dir,
        route,
        secrets: Mutex::new(Vec::new()),
    }
}

fn user(id: &str, tier: Value) -> Identity {
    Identity {
        id: id.into(),
        name: Some("Ada".into()),
        email: Some(format!("{id}@example.com")),
        claims: vec![("tier".into(), tier)],
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    raw: String,
}

impl Harness {
    fn ctx(&self, request_id: &str) -> RequestContext {
        RequestContext {
            request_id: HeaderValue::from_str(request_id).unwrap(),
            client_ip: "203.0.113.9".parse().unwrap(),
            route: self.route.clone(),
            https: true,
        }
    }

    async fn call_with(
        &self,
        endpoint: Endpoint,
        method: Method,
        headers: HeaderMap,
        body: &str,
        identity: &Identity,
        request_id: &str,
    ) -> Answer {
        let result = self
            .ck
            .handle_bytes(endpoint, &method, &headers, Bytes::from(body.to_string()), identity, &self.ctx(request_id))
            .await;
        let resp = match result {
            Ok(r) => r,
            Err(e) => e.to_response(),
        };
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let raw = String::from_utf8(bytes.to_vec()).unwrap();
        let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        if let Some(s) = body["client_secret"].as_str() {
            self.secrets.lock().unwrap().push(s.to_string());
        }
        Answer { status: parts.status, headers: parts.headers, body, raw }
    }

    async fn call(&self, endpoint: Endpoint, body: &str, identity: &Identity) -> Answer {
        self.call_with(endpoint, Method::POST, HeaderMap::new(), body, identity, "req-test-1").await
    }

    async fn mint(&self, identity: &Identity) -> String {
        let a = self.call(Endpoint::Session, "", identity).await;
        assert_eq!(a.status, 200, "{}", a.raw);
        a.body["client_secret"].as_str().unwrap().to_string()
    }

    async fn audit(&self) -> Vec<Value> {
        self.audit.flush().await;
        self.audit_lines.lock().unwrap().iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    async fn audit_events(&self, kind: &str) -> Vec<Value> {
        self.audit().await.into_iter().filter(|e| e["event"] == kind).collect()
    }

    fn sessions(&self, endpoint: &str, result: &str) -> u64 {
        self.metrics.chatkit_sessions.with_label_values(&[endpoint, result]).get()
    }

    /// Every client secret minted, the API key: in no log line, audit line or metric.
    async fn assert_no_secret_leaked(&self) {
        let mut haystack = self.logs.text();
        for line in self.audit_lines.lock().unwrap().iter() {
            haystack.push_str(line);
        }
        haystack.push_str(&self.metrics.render());
        let mut needles: Vec<String> = self.secrets.lock().unwrap().clone();
        needles
            .extend(self.fake.created_sessions().iter().filter_map(|s| s["client_secret"].as_str().map(String::from)));
        needles.push(TEST_API_KEY.to_string());
        needles.push(TEST_API_KEY["sk-".len()..].to_string());
        assert!(needles.len() > 1);
        for needle in needles {
            assert!(!haystack.contains(&needle), "leaked {needle:?} in:\n{haystack}");
        }
    }
}

#[tokio::test]
async fn session_is_minted_with_what_the_api_requires() {
    let h = start(Setup::default()).await;
    let mut headers = HeaderMap::new();
    headers.insert("x-region", HeaderValue::from_static("eu-west-1"));
    let before = chatkit_gate::chatkit::unix_now();
    let a =
        h.call_with(Endpoint::Session, Method::POST, headers, "{}", &user("user-42", json!("pro")), "req-abc").await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.headers["content-type"], "application/json");
    let obj = a.body.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["client_secret", "expires_at"]);
    let expires_at = a.body["expires_at"].as_i64().unwrap();
    assert!((before + 299..=before + 301).contains(&expires_at), "{expires_at} vs {before}");

    let req = &h.fake.create_requests()[0];
    assert_eq!(req.header("authorization"), Some(format!("Bearer {TEST_API_KEY}").as_str()));
    assert_eq!(req.header("openai-beta"), Some("chatkit_beta=v1"));
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("x-request-id"), Some("req-abc"));
    let body = req.body.as_ref().unwrap();
    assert_eq!(
        body,
        &json!({
            "user": "user-42",
            "workflow": {
                "id": TEST_WORKFLOW_ID,
                "state_variables": { "subscription_tier": "pro", "region": "eu-west-1", "plan_version": 3 },
            },
            "expires_after": { "anchor": "created_at", "seconds": 300 },
            "rate_limits": { "max_requests_per_1_minute": 12 },
            "chatkit_configuration": { "history": { "enabled": true, "recent_threads": 5 } },
        })
    );
    let created = h.audit_events("SESSION_CREATED").await;
    assert_eq!(created.len(), 1);
    let e = &created[0];
    assert_eq!(
        (e["user_id"].as_str(), e["ip"].as_str(), e["request_id"].as_str()),
        (Some("user-42"), Some("203.0.113.9"), Some("req-abc"))
    );
    assert_eq!(e["session_id"], h.fake.created_sessions()[0]["id"]);
    assert_eq!(e["api_request_id"].as_str(), Some(req.response_request_id.as_str()));
    assert_eq!(h.sessions("session", "created"), 1);
    assert_eq!(h.metrics.chatkit_api_duration.with_label_values(&["create"]).get_sample_count(), 1);
    h.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn state_variables_fall_back_to_defaults_and_skip_what_is_missing() {
    let h = start(Setup::default()).await;
    // The tier claim is an object (not a scalar) and there is no x-region header.
    let a = h.call(Endpoint::Session, "", &user("u1", json!({"nested": true}))).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    let body = h.fake.create_requests()[0].body.clone().unwrap();
    assert_eq!(body["workflow"]["state_variables"], json!({ "region": "us-east-1", "plan_version": 3 }));
}

#[tokio::test]
async fn body_and_method_rules() {
    let h = start(Setup::default()).await;
    let u = user("u1", json!("free"));
    let a = h.call_with(Endpoint::Session, Method::GET, HeaderMap::new(), "", &u, "r").await;
    assert_eq!((a.status.as_u16(), a.headers["allow"].to_str().unwrap()), (405, "POST"));
    assert_eq!(h.call(Endpoint::Session, "{oops", &u).await.raw, r#"{"error":"Invalid JSON"}"#);
    assert_eq!(h.call(Endpoint::Session, "[1,2]", &u).await.raw, r#"{"error":"Invalid request"}"#);
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(16 * 1024));
    assert_eq!(h.call(Endpoint::Session, &big, &u).await.status, 413);
    let exactly = format!(r#"{{"pad":"{}"}}"#, "x".repeat(16 * 1024 - 10));
    assert_eq!(exactly.len(), 16 * 1024);
    assert_eq!(h.call(Endpoint::Session, &exactly, &u).await.status, 200);
    for body in ["", "{}", r#"{"token":""}"#, r#"{"token":12}"#] {
        let a = h.call(Endpoint::Refresh, body, &u).await;
        assert_eq!((a.status.as_u16(), a.raw.as_str()), (400, r#"{"error":"Token required"}"#), "{body}");
    }
    assert_eq!(h.call(Endpoint::Refresh, "{", &u).await.raw, r#"{"error":"Invalid JSON"}"#);
    assert_eq!(h.fake.create_count(), 1, "only the valid request reached the API");
}

async fn refresh_own_token_cancels_the_old_session(h: &Harness) {
    let u = user("alice", json!("pro"));
    let old = h.mint(&u).await;
    let old_id = h.fake.session_by_secret(&old).unwrap()["id"].as_str().unwrap().to_string();
    let a = h.call(Endpoint::Refresh, &json!({ "token": old }).to_string(), &u).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    let new = a.body["client_secret"].as_str().unwrap();
    assert_ne!(new, old);
    eventually("the old session cancelled", || h.fake.cancelled_ids() == vec![old_id.clone()]).await;
    assert_eq!(h.fake.session(&old_id).unwrap()["status"], "cancelled");
    let refreshed = h.audit_events("SESSION_REFRESHED").await;
    assert_eq!(refreshed.len(), 1);
    assert_eq!(refreshed[0]["reason"], format!("replaces {old_id}"));
    assert_eq!(h.sessions("refresh", "created"), 1);

    // chatkit-js' field name works too, and the new secret is bound like the first.
    let b = h.call(Endpoint::Refresh, &json!({ "currentClientSecret": new }).to_string(), &u).await;
    assert_eq!(b.status, 200, "{}", b.raw);
    eventually("the second session cancelled", || h.fake.cancelled_ids().len() == 2).await;

    // Replaying the first token: still alice's, already cancelled, so a mint without a cancel.
    let c = h.call(Endpoint::Refresh, &json!({ "token": old }).to_string(), &u).await;
    assert_eq!(c.status, 200, "{}", c.raw);
    h.ck.drain(Duration::from_secs(2)).await;
    assert_eq!(h.fake.cancelled_ids().len(), 2);
    assert_eq!(h.metrics.chatkit_cancel_failures.get(), 0);
    h.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn refresh_with_own_token_cancels_the_old_session_in_memory() {
    let h = start(Setup::default()).await;
    refresh_own_token_cancels_the_old_session(&h).await;
}

#[tokio::test]
async fn refresh_with_own_token_cancels_the_old_session_with_redis() {
    let redis = RedisServer::start();
    let h = start(Setup { redis_url: Some(redis.url()), ..Setup::default() }).await;
    refresh_own_token_cancels_the_old_session(&h).await;
    // The bindings are in Redis (hashed), not in memory.
    let mut con = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("chatkit-gate:secret:*").query_async(&mut con).await.unwrap();
    assert_eq!(keys.len(), 4, "one binding per minted secret");
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert!((290..=300).contains(&ttl), "{ttl}");
}

async fn other_users_token_is_forbidden(h: &Harness) {
    let alice = user("alice", json!("pro"));
    let mallory = user("mallory", json!("free"));
    let token = h.mint(&alice).await;
    let alice_session = h.fake.created_sessions()[0]["id"].clone();
    let a = h
        .call_with(
            Endpoint::Refresh,
            Method::POST,
            HeaderMap::new(),
            &json!({ "token": token }).to_string(),
            &mallory,
            "req-m",
        )
        .await;
    assert_eq!((a.status.as_u16(), a.raw.as_str()), (403, r#"{"error":"Forbidden"}"#));
    assert_eq!(h.fake.create_count(), 1, "nothing minted for mallory");
    assert!(h.fake.cancelled_ids().is_empty(), "alice's session untouched");
    let mismatch = h.audit_events("TOKEN_MISMATCH").await;
    assert_eq!(mismatch.len(), 1);
    assert_eq!(mismatch[0]["user_id"], "mallory");
    assert_eq!(mismatch[0]["request_id"], "req-m");
    assert_eq!(mismatch[0]["session_id"], alice_session);
    h.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn refresh_with_other_users_token_is_forbidden_in_memory() {
    let h = start(Setup::default()).await;
    other_users_token_is_forbidden(&h).await;
}

#[tokio::test]
async fn refresh_with_other_users_token_is_forbidden_with_redis() {
    let redis = RedisServer::start();
    let h = start(Setup { redis_url: Some(redis.url()), ..Setup::default() }).await;
    other_users_token_is_forbidden(&h).await;
}

#[tokio::test]
async fn refresh_with_unknown_token_mints_a_new_session() {
    let h = start(Setup::default()).await;
    let a = h.call(Endpoint::Refresh, r#"{"token":"ek_not_one_of_ours"}"#, &user("bob", json!("pro"))).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(h.fake.created_sessions().len(), 1);
    h.ck.drain(Duration::from_secs(1)).await;
    assert!(h.fake.cancelled_ids().is_empty());
    assert_eq!(h.audit_events("SESSION_REFRESHED").await[0]["reason"], "previous token unknown or expired");
}

#[tokio::test]
async fn a_second_instance_sharing_redis_knows_the_first_ones_tokens() {
    let redis = RedisServer::start();
    let first = start(Setup { redis_url: Some(redis.url()), ..Setup::default() }).await;
    let token = first.mint(&user("alice", json!("pro"))).await;
    let session_id = first.fake.created_sessions()[0]["id"].as_str().unwrap().to_string();
    // Same Redis, same API, another process.
    let second =
        start(Setup { redis_url: Some(redis.url()), api_base: Some(first.fake.api_base()), ..Setup::default() }).await;
    let a = second.call(Endpoint::Refresh, &json!({ "token": token }).to_string(), &user("mallory", json!("x"))).await;
    assert_eq!(a.status, 403, "{}", a.raw);
    assert_eq!(second.audit_events("TOKEN_MISMATCH").await[0]["session_id"], session_id);
    let b = second.call(Endpoint::Refresh, &json!({ "token": token }).to_string(), &user("alice", json!("pro"))).await;
    assert_eq!(b.status, 200, "{}", b.raw);
    assert_eq!(second.audit_events("SESSION_REFRESHED").await[0]["reason"], format!("replaces {session_id}"));
    second.ck.drain(Duration::from_secs(2)).await;
    assert_eq!(first.fake.cancelled_ids(), vec![session_id]);
    // The first instance sees the refreshed secret as alice's too.
    let new = b.body["client_secret"].as_str().unwrap();
    let c = first.call(Endpoint::Refresh, &json!({ "token": new }).to_string(), &user("mallory", json!("x"))).await;
    assert_eq!(c.status, 403, "{}", c.raw);
}

#[tokio::test]
async fn a_failed_cancel_is_logged_and_counted_not_fatal() {
    let redis = RedisServer::start();
    let first = start(Setup { redis_url: Some(redis.url()), ..Setup::default() }).await;
    let u = user("alice", json!("pro"));
    let token = first.mint(&u).await;
    // The second instance's API never heard of that session: its cancel answers 404.
    let second = start(Setup { redis_url: Some(redis.url()), ..Setup::default() }).await;
    let a = second.call(Endpoint::Refresh, &json!({ "token": token }).to_string(), &u).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    second.ck.drain(Duration::from_secs(2)).await;
    assert_eq!(second.metrics.chatkit_cancel_failures.get(), 1);
    assert!(second.logs.text().contains("could not cancel the refreshed ChatKit session"));
    assert_eq!(second.metrics.chatkit_api_duration.with_label_values(&["cancel"]).get_sample_count(), 1);
    second.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn redis_down_falls_back_to_this_replicas_memory() {
    let mut redis = RedisServer::start();
    let h = start(Setup { redis_url: Some(redis.url()), ..Setup::default() }).await;
    redis.kill();
    let alice = user("alice", json!("pro"));
    let token = h.mint(&alice).await;
    let a = h.call(Endpoint::Refresh, &json!({ "token": token }).to_string(), &user("mallory", json!("x"))).await;
    assert_eq!(a.status, 403, "the in-memory fallback still knows the token: {}", a.raw);
    let b = h.call(Endpoint::Refresh, &json!({ "token": token }).to_string(), &alice).await;
    assert_eq!(b.status, 200, "{}", b.raw);
    eventually("the old session cancelled", || h.fake.cancelled_ids().len() == 1).await;
    assert!(h.metrics.redis_errors.get() >= 1);
    assert!(h.logs.text().contains("kept in this replica's memory"));
    h.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn api_failures_map_to_gateway_errors_without_the_apis_message() {
    let h = start(Setup::default()).await;
    let u = user("u1", json!("pro"));
    let cases: [(Mode, u16, &str); 4] = [
        (Mode::Status(401), 502, "api status 401"),
        (Mode::Status(404), 502, "api status 404"),
        (Mode::Status(429), 503, "api status 429"),
        (Mode::Status(500), 502, "api status 500"),
    ];
    for (i, (mode, status, reason)) in cases.into_iter().enumerate() {
        h.fake.set_mode(mode.clone());
        let a = h.call_with(Endpoint::Session, Method::POST, HeaderMap::new(), "", &u, &format!("req-{i}")).await;
        assert_eq!(a.status.as_u16(), status, "{mode:?}: {}", a.raw);
        if status == 502 {
            assert_eq!(a.raw, r#"{"error":"Failed to create session"}"#);
        } else {
            assert_eq!(a.headers["retry-after"], RATE_LIMIT_RETRY_AFTER_SECS.to_string().as_str());
            assert!(!a.raw.contains("Rate limit reached"), "{}", a.raw);
        }
        let failed = h.audit_events("SESSION_FAILED").await;
        let last = failed.last().unwrap();
        assert_eq!(last["reason"], reason);
        assert_eq!(last["request_id"], format!("req-{i}"));
        let api_request_id = h.fake.requests().last().unwrap().response_request_id.clone();
        assert_eq!(last["api_request_id"].as_str(), Some(api_request_id.as_str()));
        // The API's message and its request id are in our log.
        let logs = h.logs.text();
        assert!(logs.contains(api_request_id.as_str()), "{logs}");
    }
    assert!(h.logs.text().contains("Workflow with id"));
    assert!(h.logs.text().contains("Incorrect API key provided: [redacted]"), "{}", h.logs.text());

    h.fake.set_mode(Mode::Hang);
    let started = Instant::now();
    let a = h.call(Endpoint::Session, "", &u).await;
    assert_eq!((a.status.as_u16(), a.raw.as_str()), (504, r#"{"error":"ChatKit API timed out"}"#));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(h.audit_events("SESSION_FAILED").await.last().unwrap()["reason"], "api timed out");

    h.fake.shutdown().await;
    let a = h.call(Endpoint::Session, "", &u).await;
    assert_eq!((a.status.as_u16(), a.raw.as_str()), (502, r#"{"error":"Failed to create session"}"#));
    assert_eq!(h.audit_events("SESSION_FAILED").await.last().unwrap()["reason"], "api unreachable");
    assert_eq!(h.sessions("session", "failed"), 6);
    assert_eq!(h.sessions("session", "created"), 0);
    h.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn missing_key_answers_503_naming_the_file_and_a_new_key_file_is_picked_up() {
    let h = start(Setup { key: None, ..Setup::default() }).await;
    let u = user("u1", json!("pro"));
    let a = h.call(Endpoint::Session, "", &u).await;
    assert_eq!(a.status, 503);
    let path = h.key_dir.path().join("openai-key");
    assert!(
        a.body["error"].as_str().unwrap().starts_with(&format!("ChatKit is not configured: {}", path.display())),
        "{}",
        a.raw
    );
    assert_eq!(h.fake.create_count(), 0);
    assert_eq!(h.audit_events("SESSION_FAILED").await[0]["reason"], "not configured");

    std::fs::write(&path, "sk-wrong-key-0000\n").unwrap();
    assert_eq!(h.call(Endpoint::Session, "", &u).await.status, 502, "wrong key: the API says 401");
    std::fs::write(&path, format!("{TEST_API_KEY}\n")).unwrap();
    assert_eq!(h.call(Endpoint::Session, "", &u).await.status, 200, "rotated key picked up");
    let problems = ChatKit::check(
        &Config::from_toml(&config_text("http://127.0.0.1:9/v1", &h.key_dir.path().join("nope"), None, ""))
            .unwrap()
            .chatkit
            .unwrap(),
    );
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0, "chatkit.api_key_file");
    h.assert_no_secret_leaked().await;
}

#[tokio::test]
async fn https_api_base_with_an_extra_ca() {
    let pki = TestPki::new();
    let fake = FakeChatKit::start(FakeOptions { tls: Some(pki.leaf().clone()), ..FakeOptions::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let extra: &'static str = Box::leak(format!("ca_file = \"{}\"", ca.display()).into_boxed_str());
    let base = fake.api_base();
    assert!(base.starts_with("https://"));
    let h = start(Setup { fake: Some(fake), extra, ..Setup::default() }).await;
    let a = h.call(Endpoint::Session, "", &user("u1", json!("pro"))).await;
    assert_eq!(a.status, 200, "{}", a.raw);

    // Without the CA, the fake's certificate is not trusted: a network error, 502.
    let untrusted =
        start(Setup { fake: Some(FakeChatKit::start_default().await), api_base: Some(base), ..Setup::default() }).await;
    let a = untrusted.call(Endpoint::Session, "", &user("u1", json!("pro"))).await;
    assert_eq!(a.status, 502, "{}", a.raw);

    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let text =
        config_text("https://127.0.0.1:9/v1", &dir.path().join("k"), None, &format!("ca_file = \"{}\"", bad.display()));
    let settings = Config::from_toml(&text).unwrap().chatkit.unwrap();
    let problems = ChatKit::check(&settings);
    assert!(problems.iter().any(|(k, _)| k == "chatkit.ca_file"), "{problems:?}");
    let metrics = Metrics::new().unwrap();
    let (audit, _) = Audit::memory(metrics.clone()).unwrap();
    assert!(ChatKit::new(&settings, None, metrics, audit).is_err());
}

#[test]
fn gate_error_for_not_configured_names_the_variable() {
    let e = GateError::ChatKitNotConfigured("OPENAI_API_KEY is not set".into());
    assert_eq!(e.public_message(), "ChatKit is not configured: OPENAI_API_KEY is not set");
}

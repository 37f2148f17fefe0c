//! Acceptance tests of ChatKit session minting through the real gateway over real TLS: the fake
//! introspection endpoint signs users in, a strict fake ChatKit API mints, a real redis-server
//! holds limits and secret bindings. Every test ends by scanning everything it captured (log
//! lines, audit lines, metrics, error bodies) for client secrets, the API key and cookie values.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::logs::Logs;

use common::eventually;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fake_openai::{FakeChatKit, Mode, RATE_LIMIT_RETRY_AFTER_SECS, TEST_API_KEY, TEST_WORKFLOW_ID};
use common::gate::{GateBuilder, TestGate};
use common::introspection::FakeIntrospection;
use common::redis::RedisServer;
use common::upstream::FakeApp;
use serde_json::{Value, json};

const ALICE_COOKIE: &str = "alice-cookie-3f9a1c77e2b04d5d9e8f";
const BOB_COOKIE: &str = "bob-cookie-8b21d0aa41c94f6e7a3c";

/// Shared pieces of one scenario: identity provider, ChatKit API, app, Redis, key file.
struct World {
    idp: FakeIntrospection,
    api: FakeChatKit,
    app: FakeApp,
    redis: Option<RedisServer>,
    dir: tempfile::TempDir,
    logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
    /// Everything that must never show a secret: error bodies, metrics pages.
    seen: Mutex<Vec<String>>,
    /// Client secrets handed out.
    secrets: Mutex<Vec<String>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Store {
    Redis,
    Memory,
}

impl World {
    async fn new(store: Store) -> World {
        let (logs, guard) = common::logs::capture();
        let idp = FakeIntrospection::start("session").await;
        idp.add_user(ALICE_COOKIE, "user-alice", "Alice", "alice@example.com");
        idp.add_user(BOB_COOKIE, "user-bob", "Bob", "bob@example.com");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("openai-key"), format!("{TEST_API_KEY}\n")).unwrap();
        World {
            idp,
            api: FakeChatKit::start_default().await,
            app: FakeApp::start().await,
            redis: (store == Store::Redis).then(RedisServer::start),
            dir,
            logs,
            _log_guard: guard,
            seen: Mutex::new(Vec::new()),
            secrets: Mutex::new(Vec::new()),
        }
    }

    fn audit_path(&self, instance: usize) -> PathBuf {
        self.dir.path().join(format!("audit-{instance}.jsonl"))
    }

    /// The gate's config; `extra_chatkit` goes into `[chatkit]` (e.g. `rate_limit = ["chatkit"]`).
    fn config(&self, instance: usize, extra_chatkit: &str) -> String {
        let redis = match &self.redis {
            Some(r) => format!("redis_url = \"{}\"\nredis_timeout = \"250ms\"\n", r.url()),
            None => String::new(),
        };
        format!(
            r#"
[auth]
introspection_url = "{idp}"
cookies = ["session"]
[auth.claims]
tier = "/user/tier"

[rate_limit]
{redis}
[rate_limit.policies.chatkit]
algorithm = "sliding_window"
limit = 5
window = "60s"
key = "user"

[chatkit]
api_key_file = "{key}"
api_base = "{api}"
workflow_id = "{TEST_WORKFLOW_ID}"
expires_after = "5m"
timeout = "700ms"
{extra_chatkit}
[chatkit.state_variables]
subscription_tier = {{ claim = "tier" }}
region = {{ header = "x-region", default = "us-east-1" }}
plan = {{ default = "standard" }}

[log]
level = "debug"
audit_file = "{audit}"
"#,
            idp = self.idp.url(),
            key = self.dir.path().join("openai-key").display(),
            api = self.api.api_base(),
            audit = self.audit_path(instance).display(),
        )
    }

    async fn gate(&self) -> TestGate {
        self.gate_n(0, "").await
    }

    async fn gate_n(&self, instance: usize, extra_chatkit: &str) -> TestGate {
        GateBuilder::new(&self.app.url()).rest(&self.config(instance, extra_chatkit)).start().await
    }

    async fn post(&self, gate: &TestGate, path: &str, cookie: Option<&str>, body: Option<&str>) -> Answer {
        self.send(gate, reqwest::Method::POST, path, cookie, body, &[]).await
    }

    async fn send(
        &self,
        gate: &TestGate,
        method: reqwest::Method,
        path: &str,
        cookie: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = gate.client().request(method, gate.url(path));
        if let Some(c) = cookie {
            req = req.header("cookie", format!("theme=dark; session={c}"));
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        if let Some(s) = body["client_secret"].as_str() {
            self.secrets.lock().unwrap().push(s.to_string());
        } else {
            self.seen.lock().unwrap().push(raw.clone());
        }
        Answer { status, headers, body, raw }
    }

    async fn mint(&self, gate: &TestGate, cookie: &str) -> String {
        let a = self.post(gate, "/api/chatkit/session", Some(cookie), None).await;
        assert_eq!(a.status, 200, "{}", a.raw);
        a.body["client_secret"].as_str().unwrap().to_string()
    }

    async fn refresh(&self, gate: &TestGate, cookie: &str, body: &str) -> Answer {
        self.post(gate, "/api/chatkit/refresh", Some(cookie), Some(body)).await
    }

    /// Audit events of `kind` written by instance `instance` (waits for the writer briefly).
    async fn audit(&self, instance: usize, kind: &str) -> Vec<Value> {
        self.audit_within(instance, kind, 1).await
    }

    async fn audit_within(&self, instance: usize, kind: &str, at_least: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = std::fs::read_to_string(self.audit_path(instance)).unwrap_or_default();
            let events: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|e| e["event"] == kind)
                .collect();
            if events.len() >= at_least || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn metric(&self, gate: &TestGate, line_prefix: &str) -> f64 {
        let text = gate.metrics().await;
        self.seen.lock().unwrap().push(text.clone());
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
            .unwrap_or(0.0)
    }

    /// No client secret, API key or cookie value in any log line, audit line, metric or error body.
    async fn assert_no_leaks(&self, gates: &[&TestGate]) {
        for gate in gates {
            let metrics = gate.metrics().await;
            self.seen.lock().unwrap().push(metrics);
        }
        // Let the audit writer catch up.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut haystack = self.logs.text().into_bytes();
        for i in 0..gates.len().max(1) {
            haystack.extend(std::fs::read(self.audit_path(i)).unwrap_or_default());
        }
        for s in self.seen.lock().unwrap().iter() {
            haystack.extend_from_slice(s.as_bytes());
        }
        let haystack = String::from_utf8_lossy(&haystack).into_owned();
        assert!(haystack.contains("\"level\":\"INFO\""), "no log captured");
        let mut needles: Vec<String> = self.secrets.lock().unwrap().clone();
        needles
            .extend(self.api.created_sessions().iter().filter_map(|s| s["client_secret"].as_str().map(String::from)));
        needles.extend([TEST_API_KEY, &TEST_API_KEY[3..], ALICE_COOKIE, BOB_COOKIE].map(String::from));
        for needle in &needles {
            assert!(!haystack.contains(needle.as_str()), "leaked {needle:?}");
        }
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    raw: String,
}

#[tokio::test]
async fn signed_in_post_mints_a_session_for_the_introspected_user() {
    let w = World::new(Store::Redis).await;
    let gate = w.gate().await;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let a = w
        .send(
            &gate,
            reqwest::Method::POST,
            "/api/chatkit/session",
            Some(ALICE_COOKIE),
            Some("{}"),
            &[("x-region", "eu-west-1")],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.body.as_object().unwrap().keys().collect::<Vec<_>>(), ["client_secret", "expires_at"]);
    let expires_at = a.body["expires_at"].as_i64().unwrap();
    assert!((before + 299..=before + 301).contains(&expires_at), "expires_at {expires_at}, now {before}");

    let reqs = w.api.create_requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.header("openai-beta"), Some("chatkit_beta=v1"));
    assert_eq!(req.header("authorization"), Some(format!("Bearer {TEST_API_KEY}").as_str()));
    assert_eq!(req.header("x-request-id"), a.headers["x-request-id"].to_str().ok());
    let body = req.body.as_ref().unwrap();
    assert_eq!(body["user"], "user-alice");
    assert_eq!(body["workflow"]["id"], TEST_WORKFLOW_ID);
    assert_eq!(body["expires_after"], json!({ "anchor": "created_at", "seconds": 300 }));
    assert_eq!(
        body["workflow"]["state_variables"],
        json!({ "subscription_tier": "pro", "region": "eu-west-1", "plan": "standard" })
    );
    // The session is not the app's business: it never saw the request.
    assert_eq!(w.app.count(), 0);

    let created = w.audit(0, "SESSION_CREATED").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["user_id"], "user-alice");
    assert_eq!(created[0]["ip"], "127.0.0.1");
    assert_eq!(created[0]["session_id"], w.api.created_sessions()[0]["id"]);
    assert!(created[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        w.metric(&gate, r#"chatkit_gate_chatkit_sessions_total{endpoint="session",result="created"}"#).await,
        1.0
    );
    assert_eq!(w.metric(&gate, r#"chatkit_gate_chatkit_api_duration_seconds_count{operation="create"}"#).await, 1.0);
    w.assert_no_leaks(&[&gate]).await;
}

#[tokio::test]
async fn not_signed_in_gets_401_json_and_the_api_is_not_called() {
    let w = World::new(Store::Memory).await;
    let gate = w.gate().await;
    for cookie in [None, Some("not-a-session")] {
        for path in ["/api/chatkit/session", "/api/chatkit/refresh"] {
            let a = w
                .send(
                    &gate,
                    reqwest::Method::POST,
                    path,
                    cookie,
                    Some("{}"),
                    &[("accept", "text/html"), ("sec-fetch-mode", "navigate")],
                )
                .await;
            assert_eq!((a.status, a.raw.as_str()), (401, r#"{"error":"Unauthorized"}"#), "{path} {cookie:?}");
            assert_eq!(a.headers["content-type"], "application/json");
        }
    }
    assert_eq!(w.api.requests().len(), 0, "the ChatKit API was called");
    w.assert_no_leaks(&[&gate]).await;
}

#[tokio::test]
async fn sixth_mint_within_a_minute_is_rate_limited() {
    let w = World::new(Store::Redis).await;
    let gate = w.gate_n(0, r#"rate_limit = ["chatkit"]"#).await;
    for _ in 0..5 {
        w.mint(&gate, ALICE_COOKIE).await;
    }
    let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), None).await;
    assert_eq!(a.status, 429, "{}", a.raw);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(a.body["error"], "Too many requests");
    assert_eq!(w.api.create_count(), 5);
    let limited = w.audit(0, "RATE_LIMITED").await;
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0]["user_id"], "user-alice");
    // Another user is not affected.
    w.mint(&gate, BOB_COOKIE).await;
    w.assert_no_leaks(&[&gate]).await;
}

async fn refresh_rules(store: Store) {
    let w = World::new(store).await;
    let gate = w.gate().await;

    let a = w.refresh(&gate, ALICE_COOKIE, "{}").await;
    assert_eq!((a.status, a.raw.as_str()), (400, r#"{"error":"Token required"}"#));
    let a = w.refresh(&gate, ALICE_COOKIE, "{\"token\":").await;
    assert_eq!((a.status, a.raw.as_str()), (400, r#"{"error":"Invalid JSON"}"#));
    let a = w.refresh(&gate, ALICE_COOKIE, "[\"token\"]").await;
    assert_eq!((a.status, a.raw.as_str()), (400, r#"{"error":"Invalid request"}"#));
    assert_eq!(w.api.create_count(), 0);

    // Own token: a new secret, and the old session cancelled at the API.
    let old = w.mint(&gate, ALICE_COOKIE).await;
    let old_id = w.api.session_by_secret(&old).unwrap()["id"].as_str().unwrap().to_string();
    let a = w.refresh(&gate, ALICE_COOKIE, &json!({ "token": old }).to_string()).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    let new = a.body["client_secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    eventually("the old session cancelled", || w.api.cancelled_ids() == vec![old_id.clone()]).await;
    assert_eq!(w.api.session(&old_id).unwrap()["status"], "cancelled");
    let refreshed = w.audit(0, "SESSION_REFRESHED").await;
    assert_eq!(refreshed[0]["user_id"], "user-alice");
    assert_eq!(refreshed[0]["reason"], format!("replaces {old_id}"));

    // Another user's token: 403, TOKEN_MISMATCH, nothing minted or cancelled.
    let creates = w.api.create_count();
    let a = w.refresh(&gate, BOB_COOKIE, &json!({ "currentClientSecret": new }).to_string()).await;
    assert_eq!((a.status, a.raw.as_str()), (403, r#"{"error":"Forbidden"}"#));
    assert_eq!(w.api.create_count(), creates);
    let mismatch = w.audit(0, "TOKEN_MISMATCH").await;
    assert_eq!(mismatch.len(), 1);
    assert_eq!(mismatch[0]["user_id"], "user-bob");
    assert_eq!(mismatch[0]["session_id"], w.api.session_by_secret(&new).unwrap()["id"]);

    // Unknown token: a new secret, nothing cancelled.
    let a = w.refresh(&gate, BOB_COOKIE, r#"{"token":"ek_never_minted_here"}"#).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(w.api.created_sessions().last().unwrap()["user"], "user-bob");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(w.api.cancelled_ids().len(), 1);
    assert_eq!(
        w.metric(&gate, r#"chatkit_gate_chatkit_sessions_total{endpoint="refresh",result="created"}"#).await,
        2.0
    );
    w.assert_no_leaks(&[&gate]).await;
}

#[tokio::test]
async fn refresh_rules_with_redis() {
    refresh_rules(Store::Redis).await;
}

#[tokio::test]
async fn refresh_rules_with_the_in_memory_store() {
    refresh_rules(Store::Memory).await;
}

#[tokio::test]
async fn a_second_gateway_sharing_redis_recognises_tokens_the_first_minted() {
    let w = World::new(Store::Redis).await;
    let first = w.gate_n(0, "").await;
    let second = w.gate_n(1, "").await;
    let token = w.mint(&first, ALICE_COOKIE).await;
    let session_id = w.api.session_by_secret(&token).unwrap()["id"].as_str().unwrap().to_string();

    let a = w.refresh(&second, BOB_COOKIE, &json!({ "token": token }).to_string()).await;
    assert_eq!(a.status, 403, "{}", a.raw);
    assert_eq!(w.audit(1, "TOKEN_MISMATCH").await[0]["session_id"], session_id.as_str());

    let a = w.refresh(&second, ALICE_COOKIE, &json!({ "token": token }).to_string()).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    eventually("the first gateway's session cancelled by the second", || {
        w.api.cancelled_ids() == vec![session_id.clone()]
    })
    .await;
    // And back: the first recognises what the second minted.
    let new = a.body["client_secret"].as_str().unwrap();
    let a = w.refresh(&first, BOB_COOKIE, &json!({ "token": new }).to_string()).await;
    assert_eq!(a.status, 403, "{}", a.raw);
    w.assert_no_leaks(&[&first, &second]).await;
}

#[tokio::test]
async fn api_failures_become_gateway_errors_and_session_failed_events() {
    let w = World::new(Store::Memory).await;
    let gate = w.gate().await;
    let cases: [(Mode, u16); 5] = [
        (Mode::Status(401), 502),
        (Mode::Status(404), 502),
        (Mode::Status(429), 503),
        (Mode::Status(500), 502),
        (Mode::Hang, 504),
    ];
    for (i, (mode, status)) in cases.iter().enumerate() {
        w.api.set_mode(mode.clone());
        let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), None).await;
        assert_eq!(a.status, *status, "{mode:?}: {}", a.raw);
        let expected = match status {
            502 => r#"{"error":"Failed to create session"}"#,
            504 => r#"{"error":"ChatKit API timed out"}"#,
            _ => r#"{"error":"ChatKit is busy, retry later"}"#,
        };
        assert_eq!(a.raw, expected, "{mode:?}");
        if *status == 503 {
            assert_eq!(a.headers["retry-after"], RATE_LIMIT_RETRY_AFTER_SECS.to_string().as_str());
        }
        let failed = w.audit_within(0, "SESSION_FAILED", i + 1).await;
        assert_eq!(failed.len(), i + 1, "{mode:?}");
        let last = failed.last().unwrap();
        assert_eq!(last["user_id"], "user-alice");
        assert_eq!(last["request_id"], a.headers["x-request-id"].to_str().unwrap());
        if let Mode::Status(_) = mode {
            let api_request_id = w.api.requests().last().unwrap().response_request_id.clone();
            assert_eq!(last["api_request_id"], api_request_id.as_str(), "{mode:?}");
        }
    }
    // Refused connections.
    w.api.shutdown().await;
    let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), None).await;
    assert_eq!((a.status, a.raw.as_str()), (502, r#"{"error":"Failed to create session"}"#));
    assert_eq!(w.audit_within(0, "SESSION_FAILED", 6).await.last().unwrap()["reason"], "api unreachable");

    // The browser never saw the API's words; the log has them, with the API's request id.
    let bodies = w.seen.lock().unwrap().join("\n");
    for words in ["Incorrect API key", "Workflow with id", "Rate limit reached", "server had an error"] {
        assert!(!bodies.contains(words), "{words:?} reached the browser");
        assert!(w.logs.text().contains(words), "{words:?} not logged");
    }
    assert_eq!(
        w.metric(&gate, r#"chatkit_gate_chatkit_sessions_total{endpoint="session",result="failed"}"#).await,
        6.0
    );
    w.assert_no_leaks(&[&gate]).await;
}

#[tokio::test]
async fn own_endpoints_enforce_method_and_body_size() {
    let w = World::new(Store::Memory).await;
    let gate = w.gate().await;
    for method in [reqwest::Method::GET, reqwest::Method::PUT, reqwest::Method::DELETE] {
        let a = w.send(&gate, method.clone(), "/api/chatkit/session", Some(ALICE_COOKIE), None, &[]).await;
        assert_eq!(a.status, 405, "{method}");
        assert_eq!(a.headers["allow"], "POST");
    }
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(16 * 1024));
    let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), Some(&big)).await;
    assert_eq!(a.status, 413, "{}", a.raw);
    let fits = format!(r#"{{"pad":"{}"}}"#, "x".repeat(16 * 1024 - 10));
    let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), Some(&fits)).await;
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(w.api.create_count(), 1);
    w.assert_no_leaks(&[&gate]).await;
}

#[tokio::test]
async fn without_a_key_minting_answers_503_naming_the_key_file() {
    let w = World::new(Store::Memory).await;
    let key = w.dir.path().join("openai-key");
    std::fs::remove_file(&key).unwrap();
    let gate = w.gate().await;
    let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), None).await;
    assert_eq!(a.status, 503, "{}", a.raw);
    assert!(
        a.body["error"].as_str().unwrap().starts_with(&format!("ChatKit is not configured: {}", key.display())),
        "{}",
        a.raw
    );
    assert_eq!(w.api.create_count(), 0);
    // The proxy keeps working meanwhile.
    let page = gate
        .client()
        .get(gate.url("/dashboard"))
        .header("cookie", format!("session={ALICE_COOKIE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    // The Secret gets mounted: picked up without a restart.
    std::fs::write(&key, TEST_API_KEY).unwrap();
    w.mint(&gate, ALICE_COOKIE).await;
    w.assert_no_leaks(&[&gate]).await;
}

/// The real binary, logging JSON at debug level and the audit log to stdout: nothing it prints
/// holds a secret, the key or a cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binarys_whole_output_holds_no_secret() {
    let w = World::new(Store::Redis).await;
    let config = w.config(0, "").replace(&format!("audit_file = \"{}\"\n", w.audit_path(0).display()), "");
    let process = GateBuilder::new(&w.app.url()).rest(&config).spawn_process();
    let client = process.client();
    let post = |path: &str, cookie: &str, body: String| {
        client
            .post(process.url(path))
            .header("cookie", format!("session={cookie}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first: Value = post("/api/chatkit/session", ALICE_COOKIE, String::new()).await.unwrap().json().await.unwrap();
    let token = first["client_secret"].as_str().unwrap().to_string();
    let r = post("/api/chatkit/refresh", ALICE_COOKIE, json!({ "token": token }).to_string()).await.unwrap();
    assert_eq!(r.status(), 200);
    let second: Value = r.json().await.unwrap();
    let r = post("/api/chatkit/refresh", BOB_COOKIE, json!({ "token": second["client_secret"] }).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    w.api.set_mode(Mode::Status(401));
    let r = post("/api/chatkit/session", BOB_COOKIE, String::new()).await.unwrap();
    assert_eq!(r.status(), 502);
    eventually("the cancel", || w.api.cancelled_ids().len() == 1).await;

    let deadline = Instant::now() + Duration::from_secs(3);
    let logs = loop {
        let logs = process.logs();
        if (logs.contains("TOKEN_MISMATCH") && logs.contains("SESSION_FAILED")) || Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for event in ["SESSION_CREATED", "SESSION_REFRESHED", "TOKEN_MISMATCH", "SESSION_FAILED"] {
        assert!(logs.contains(event), "{event} missing from:\n{logs}");
    }
    let mut needles: Vec<String> =
        w.api.created_sessions().iter().map(|s| s["client_secret"].as_str().unwrap().to_string()).collect();
    assert_eq!(needles.len(), 2);
    needles.extend([TEST_API_KEY, &TEST_API_KEY[3..], ALICE_COOKIE, BOB_COOKIE].map(String::from));
    for needle in needles {
        assert!(!logs.contains(&needle), "leaked {needle:?} in:\n{logs}");
    }
}

#[tokio::test]
async fn wrong_methods_are_refused_before_they_use_rate_limit_quota() {
    // The chatkit policy admits 5 a minute: ten GETs must leave all five for real mints.
    let w = World::new(Store::Memory).await;
    let gate = w.gate_n(0, "rate_limit = [\"chatkit\"]").await;
    for _ in 0..10 {
        let a = w.send(&gate, reqwest::Method::GET, "/api/chatkit/session", Some(ALICE_COOKIE), None, &[]).await;
        assert_eq!(a.status, 405, "{}", a.raw);
    }
    for i in 0..5 {
        let a = w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), None).await;
        assert_eq!(a.status, 200, "mint {i} after the GETs: {}", a.raw);
    }
    assert_eq!(w.post(&gate, "/api/chatkit/session", Some(ALICE_COOKIE), None).await.status, 429);
    w.assert_no_leaks(&[&gate]).await;
}

#[tokio::test]
async fn concurrent_refreshes_with_one_token_mint_once() {
    let w = World::new(Store::Memory).await;
    let gate = w.gate().await;
    let secret = w.mint(&gate, ALICE_COOKIE).await;
    assert_eq!(w.api.create_count(), 1);
    // Slow the API down so the two refreshes overlap for certain.
    w.api.set_mode(common::fake_openai::Mode::Delay(Duration::from_millis(300)));
    let body = format!(r#"{{"token":"{secret}"}}"#);
    let (a, b) = tokio::join!(w.refresh(&gate, ALICE_COOKIE, &body), w.refresh(&gate, ALICE_COOKIE, &body));
    assert_eq!((a.status, b.status), (200, 200), "{} / {}", a.raw, b.raw);
    assert_eq!(a.body["client_secret"], b.body["client_secret"], "both got the one new session");
    assert_eq!(w.api.create_count(), 2, "one mint for the first session, one for both refreshes");
    common::eventually("the old session cancelled once", || w.api.cancelled_ids().len() == 1).await;
    // Bob cannot join Alice's refresh: his is refused as before.
    let c = w.refresh(&gate, BOB_COOKIE, &body).await;
    assert_eq!(c.status, 403, "{}", c.raw);
    w.assert_no_leaks(&[&gate]).await;
}

//! ChatKit-server routes against the real `openai-chatkit` server (examples/chatkit-server,
//! from PyPI, pinned in tests/requirements.txt), through the gate over TLS: what the server
//! received is asserted, not only the status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::chatkit_server::{ChatKitApp, create, sdk_parses_stream_event};
use common::gate::{GateBuilder, TestGate};
use common::introspection::FakeIntrospection;
use common::redis::RedisServer;
use common::{metric_value, promtool_accepts};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// A ChatKit-server route at /chatkit with every rule on; `store` is the `[rate_limit]` store line.
fn gate_for(app: &ChatKitApp, intro: &FakeIntrospection, store: &str, extra: &str) -> GateBuilder {
    GateBuilder::new(&app.base()).rest(&format!(
        r#"
[auth]
introspection_url = "{intro}"
cookies = ["session"]
[auth.claims]
tier = "/user/tier"

[[routes]]
name = "chatkit"
path = "/chatkit"
[routes.chatkit_server]
max_body_bytes = 16384
max_list_limit = 50
max_message_chars = 200
max_attachments = 2
max_concurrent_streams = 1
{extra}
[routes.chatkit_server.rate_limit]
"threads.create" = ["ck_msg"]
"threads.add_user_message" = ["ck_msg"]
[routes.chatkit_server.models]
claim = "tier"
[routes.chatkit_server.models.allow]
free = ["small"]
pro = ["*"]

[rate_limit]
{store}
[rate_limit.policies.ck_msg]
limit = 3
window = "60s"
key = "user"

[log]
audit_file = "/dev/null"
"#,
        intro = intro.url()
    ))
}

/// A gate is ready before its Redis connection is up (it serves from the in-process fallback
/// meanwhile); tests that count on Redis wait for its connection.
async fn wait_for_gate_connection(redis: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // One connection of ours for the whole wait: any other client is the gate.
    let mut con = redis.connection().await;
    loop {
        let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut con).await.unwrap();
        if clients.lines().count() > 1 {
            return;
        }
        assert!(Instant::now() < deadline, "the gate never connected to redis:\n{clients}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn users() -> FakeIntrospection {
    let intro = FakeIntrospection::start("session").await;
    intro.add_user("tok-alice", "alice", "Alice", "alice@example.com");
    intro.add_user("tok-carol", "carol", "Carol", "carol@example.com");
    intro.set_answer("tok-bob", json!({"user": {"id": "bob", "tier": "free"}}));
    intro
}

async fn post(gate: &TestGate, token: &str, body: &Value) -> reqwest::Response {
    gate.client()
        .post(gate.url("/chatkit"))
        .header("cookie", format!("session={token}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The `data:` events of an SSE body.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
}

fn list() -> Value {
    json!({"type": "threads.list", "params": {"limit": 20, "order": "desc"}})
}

#[tokio::test]
async fn a_message_stream_arrives_event_by_event_over_http1_and_http2() {
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "").start().await;
    for client in [gate.client(), gate.client_h2()] {
        let resp = client
            .post(gate.url("/chatkit"))
            .header("cookie", "session=tok-alice")
            .header("content-type", "application/json")
            .body(create("stream:4:300").to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream; charset=utf-8");
        let started = Instant::now();
        let mut arrivals = Vec::new();
        let mut body = String::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            if String::from_utf8_lossy(&chunk).contains("text_delta") {
                arrivals.push(started.elapsed());
            }
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
        // Four deltas 300 ms apart arrive as they are written, not at the end.
        assert!(arrivals.len() >= 3, "deltas arrived in {} chunks: {arrivals:?}", arrivals.len());
        assert!(arrivals.last().unwrap().saturating_sub(arrivals[0]) >= Duration::from_millis(500), "{arrivals:?}");
        let evs = events(&body);
        assert_eq!(evs.first().unwrap()["type"], "thread.created");
        assert_eq!(evs.last().unwrap()["type"], "thread.item.done");
    }
    let state = app.state().await;
    assert_eq!(state["completed"], 2);
    // The server got the identity from the gate's header.
    assert_eq!(state["requests"][0]["user"], "alice");
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn list_reads_do_not_use_the_message_quota_and_the_next_message_never_reaches_the_server() {
    let redis = RedisServer::start();
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut builder = gate_for(&app, &intro, &format!("redis_url = \"{}\"", redis.url()), "");
    builder.rest = builder.rest.replace("/dev/null", audit.to_str().unwrap());
    let gate = builder.start().await;
    wait_for_gate_connection(&redis).await;
    for _ in 0..6 {
        assert_eq!(post(&gate, "tok-alice", &list()).await.status(), 200);
    }
    for i in 0..3 {
        let resp = post(&gate, "tok-alice", &create("stream:1:1")).await;
        assert_eq!(resp.status(), 200);
        let remaining = resp.headers()["ratelimit"].to_str().unwrap().to_string();
        assert!(remaining.starts_with(&format!("\"ck_msg\";r={};", 2 - i)), "{remaining}");
        assert_eq!(events(&resp.text().await.unwrap()).last().unwrap()["type"], "thread.item.done");
    }
    // The fourth message in the window: an in-thread ChatKit error event, not forwarded.
    let resp = post(&gate, "tok-alice", &create("hello")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert!(resp.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body = resp.text().await.unwrap();
    let evs = events(&body);
    assert_eq!(evs.len(), 1, "{body}");
    assert_eq!(
        (evs[0]["type"].as_str(), evs[0]["code"].as_str(), evs[0]["allow_retry"].as_bool()),
        (Some("error"), Some("custom"), Some(true))
    );
    // The SDK's own types accept the event.
    let data = body.trim().strip_prefix("data: ").unwrap();
    assert_eq!(sdk_parses_stream_event(data), Ok("ErrorEvent".to_string()));
    // Reads still pass; another user has their own quota.
    assert_eq!(post(&gate, "tok-alice", &list()).await.status(), 200);
    assert_eq!(post(&gate, "tok-carol", &create("stream:1:1")).await.status(), 200);

    let types = app.types().await;
    assert_eq!(types.iter().filter(|t| *t == "threads.create").count(), 4, "{types:?}");
    assert_eq!(types.iter().filter(|t| *t == "threads.list").count(), 7, "{types:?}");
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(
            r#"chatkit_gate_chatkit_requests_total{decision="rate_limited",route="chatkit",type="threads.create"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"chatkit_gate_chatkit_requests_total{decision="allowed",route="chatkit",type="threads.list"} 7"#
        ),
        "{metrics}"
    );
    promtool_accepts(&metrics);
    // Decided in Redis: one script call per request, the per-type policy with the route's.
    assert!(
        metrics.contains(
            r#"chatkit_gate_rate_limit_decisions_total{decision="limited",policy="ck_msg",source="redis"} 1"#
        ),
        "{metrics}"
    );
    gate.stop().await.unwrap();
    // One CHATKIT_REQUEST line per request: user, type, decision; never the message text.
    let lines = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ck: Vec<&Value> = events.iter().filter(|e| e["event"] == "CHATKIT_REQUEST").collect();
    // 6 + 1 reads, 3 + 1 messages of alice (the last limited), 1 message of carol.
    assert_eq!(ck.len(), 12, "{lines}");
    assert!(
        ck.iter()
            .any(|e| e["user_id"] == "alice" && e["chatkit_type"] == "threads.create" && e["reason"] == "rate_limited"),
        "{lines}"
    );
    assert!(!lines.contains("hello"), "message content in the audit log: {lines}");
}

/// Stream A holds the user's only stream lease: B is refused, and after A ends or is aborted
/// the next stream is admitted at once.
async fn concurrency_round(gate: &TestGate, app: &ChatKitApp) {
    let limited = |resp: &reqwest::Response| resp.status() == 429;
    // A: a long stream, read until the first delta.
    let a = post(gate, "tok-alice", &create("stream:50:100")).await;
    assert_eq!(a.status(), 200);
    let mut a_stream = a.bytes_stream();
    while let Some(chunk) = a_stream.next().await {
        if String::from_utf8_lossy(&chunk.unwrap()).contains("text_delta") {
            break;
        }
    }
    let b = post(gate, "tok-alice", &create("stream:1:1")).await;
    assert!(limited(&b), "second concurrent stream got {}", b.status());
    assert_eq!(b.headers()["retry-after"], "1");
    assert_eq!(b.json::<Value>().await.unwrap()["error"], "Too many requests");
    // Another user is not affected; a non-streaming read is not a stream.
    assert_eq!(post(gate, "tok-carol", &create("stream:1:1")).await.status(), 200);
    assert_eq!(post(gate, "tok-alice", &list()).await.status(), 200);

    // Abort A: the lease is given back and the server's generator is cancelled.
    let cancelled = app.state().await["cancelled"].as_u64().unwrap();
    drop(a_stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let c = post(gate, "tok-alice", &create("stream:2:50")).await;
        if !limited(&c) {
            break c;
        }
        assert!(Instant::now() < deadline, "the aborted stream's lease was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(c.status(), 200);
    // C runs to its end; right after, D is admitted.
    assert_eq!(events(&c.text().await.unwrap()).last().unwrap()["type"], "thread.item.done");
    let d = post(gate, "tok-alice", &create("stream:1:1")).await;
    assert_eq!(d.status(), 200, "stream right after the previous one ended");
    d.text().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.state().await["cancelled"].as_u64().unwrap() <= cancelled {
        assert!(Instant::now() < deadline, "the server's generator was not cancelled by the abort");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_second_concurrent_stream_is_limited_until_the_first_ends_or_is_aborted_redis() {
    let redis = RedisServer::start();
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let store = format!("redis_url = \"{}\"", redis.url());
    let gate = gate_for(&app, &intro, &store, "limit_response = \"json\"").start().await;
    wait_for_gate_connection(&redis).await;
    concurrency_round(&gate, &app).await;
    // A held lease lives in Redis, hash-tagged on the user, with a TTL; it is gone once released.
    // (carol: alice's 3 messages of the window are used up.)
    let held = post(&gate, "tok-carol", &create("stream:50:100")).await;
    assert_eq!(held.status(), 200, "{:?}", held.headers());
    let mut held = held.bytes_stream();
    held.next().await.unwrap().unwrap();
    let mut con = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*streams*").query_async(&mut con).await.unwrap();
    let all: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut con).await.unwrap();
    assert_eq!(keys.len(), 1, "{all:?}");
    assert!(keys[0].contains("{u:carol}"), "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert!(ttl > 500_000 && ttl <= 600_000, "lease TTL {ttl} ms");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = redis::cmd("ZCARD").arg(&keys[0]).query_async(&mut con).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "lease not released in Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A stream read to its end: the lease is back in Redis before the client sees the end,
    // so a client that starts its next stream at once is never refused.
    let ended = post(&gate, "tok-carol", &create("stream:2:1")).await;
    assert_eq!(ended.status(), 200);
    ended.text().await.unwrap();
    let n: i64 = redis::cmd("ZCARD").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert_eq!(n, 0, "the lease was still held when the client saw the stream's end");
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_concurrent_stream_is_limited_until_the_first_ends_or_is_aborted_in_process() {
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "limit_response = \"json\"").start().await;
    concurrency_round(&gate, &app).await;
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn content_rules_answer_before_the_server_sees_anything() {
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "").start().await;
    let long = create(&"x".repeat(201));
    let cases: Vec<(Value, u16, &str)> = vec![
        (long, 413, "Message too long"),
        (
            json!({"type": "threads.create", "params": {"input": {"content": [], "attachments": ["a", "b", "c"], "inference_options": {}}}}),
            413,
            "Too many attachments",
        ),
        (
            json!({"type": "threads.list", "params": {"limit": 51}}),
            400,
            "params.limit is above this route's max_list_limit",
        ),
        (
            json!({"type": "items.list", "params": {"thread_id": "thr_x", "limit": 100000}}),
            400,
            "params.limit is above this route's max_list_limit",
        ),
        (json!({"type": "threads.drop_tables", "params": {}}), 400, "Unknown ChatKit request type"),
        (json!({"params": {}}), 400, "Invalid ChatKit request"),
        (
            json!({"type": "threads.create", "params": {"input": {"content": [{"type": "input_text", "text": "hi"}], "attachments": [], "inference_options": {"model": "big"}}}}),
            403,
            "Model not allowed",
        ),
    ];
    for (body, status, message) in &cases {
        let resp = post(&gate, "tok-bob", body).await;
        assert_eq!(resp.status().as_u16(), *status, "{body}");
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], *message, "{body}");
    }
    // A whole body over max_body_bytes, a duplicated type, not JSON, not POST.
    let big = json!({"type": "threads.list", "params": {}, "metadata": {"pad": "y".repeat(20_000)}});
    assert_eq!(post(&gate, "tok-bob", &big).await.status(), 413);
    let dup = r#"{"type":"threads.list","type":"threads.create","params":{}}"#;
    let resp = gate
        .client()
        .post(gate.url("/chatkit"))
        .header("cookie", "session=tok-bob")
        .header("content-type", "application/json")
        .body(dup)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = gate
        .client()
        .post(gate.url("/chatkit"))
        .header("cookie", "session=tok-bob")
        .header("content-type", "text/plain")
        .body(list().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let resp = gate.client().get(gate.url("/chatkit")).header("cookie", "session=tok-bob").send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.headers()["allow"].to_str().unwrap()), (405, "POST"));
    // Unauthenticated: 401, nothing forwarded.
    let resp = gate
        .client()
        .post(gate.url("/chatkit"))
        .header("content-type", "application/json")
        .body(list().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(app.types().await, Vec::<String>::new(), "a refused request reached the server");

    // The same user within the rules: a small model, a pro user any model; limit at the cap.
    let ok = json!({"type": "threads.create", "params": {"input": {"content": [{"type": "input_text", "text": "stream:1:1"}], "attachments": [], "inference_options": {"model": "small"}}}});
    assert_eq!(post(&gate, "tok-bob", &ok).await.status(), 200);
    let mut pro = ok.clone();
    pro["params"]["input"]["inference_options"]["model"] = json!("big");
    assert_eq!(post(&gate, "tok-alice", &pro).await.status(), 200);
    assert_eq!(post(&gate, "tok-bob", &json!({"type": "threads.list", "params": {"limit": 50}})).await.status(), 200);
    assert_eq!(app.types().await, vec!["threads.create", "threads.create", "threads.list"]);
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn the_server_receives_exactly_the_bytes_the_client_sent() {
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "").start().await;
    // Odd spacing and key order: a re-serialised body would differ in length.
    let raw = "{ \"params\" : {\"limit\":3,\"order\":\"asc\"},   \"type\":\"threads.list\" ,\"metadata\":{\"a\":\"\\u00e9\"}}";
    let resp = gate
        .client()
        .post(gate.url("/chatkit"))
        .header("cookie", "session=tok-alice")
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let state = app.state().await;
    assert_eq!(state["requests"][0]["bytes"].as_u64().unwrap(), raw.len() as u64);
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn an_aborted_stream_is_logged_and_counted_as_aborted() {
    let (logs, _guard) = common::logs::capture();
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "").start().await;
    let resp = post(&gate, "tok-alice", &create("stream:100:50")).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut deltas = 0;
    while let Some(chunk) = stream.next().await {
        deltas += String::from_utf8_lossy(&chunk.unwrap()).matches("text_delta").count();
        if deltas >= 3 {
            break;
        }
    }
    // Nothing is logged while the stream runs.
    assert!(logs.request_lines().is_empty(), "logged before the body ended: {:?}", logs.request_lines());
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while logs.request_lines().is_empty() {
        assert!(Instant::now() < deadline, "the aborted stream was never logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = &logs.request_lines()[0]["fields"];
    assert_eq!(
        (line["route"].as_str(), line["status"].as_u64(), line["outcome"].as_str()),
        (Some("chatkit"), Some(200), Some("client_aborted")),
        "{line}"
    );
    assert!(line["duration_ms"].as_f64().unwrap() >= 400.0, "{line}");
    let m = gate.metrics().await;
    assert_eq!(
        metric_value(&m, r#"chatkit_gate_stream_duration_seconds_count{outcome="client_aborted",route="chatkit"}"#),
        1.0
    );
    assert_eq!(metric_value(&m, "chatkit_gate_http_requests_in_flight"), 0.0);
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn a_60_second_stream_is_logged_with_its_real_duration() {
    let (logs, _guard) = common::logs::capture();
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "").start().await;
    let started = Instant::now();
    // The test clients time out after 10 s: this one has no overall timeout.
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gate.ca_pem.as_bytes()).unwrap())
        .no_proxy()
        .http1_only()
        .build()
        .unwrap();
    let resp = client
        .post(gate.url("/chatkit"))
        .header("cookie", "session=tok-alice")
        .header("content-type", "application/json")
        .body(create("stream:60:1000").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers_after = started.elapsed();
    let body = resp.text().await.unwrap();
    assert_eq!(events(&body).last().unwrap()["type"], "thread.item.done");
    assert!(started.elapsed() >= Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(5);
    while logs.request_lines().is_empty() {
        assert!(Instant::now() < deadline, "the stream was never logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = &logs.request_lines()[0]["fields"];
    assert_eq!(line["outcome"], "complete", "{line}");
    let ms = line["duration_ms"].as_f64().unwrap();
    assert!((60_000.0..70_000.0).contains(&ms), "logged {ms} ms; headers came after {headers_after:?}");
    assert!(line["stream_ms"].as_f64().unwrap() >= 59_000.0, "{line}");
    let m = gate.metrics().await;
    assert_eq!(
        metric_value(&m, r#"chatkit_gate_stream_duration_seconds_count{outcome="complete",route="chatkit"}"#),
        1.0
    );
    // The request histogram saw a request of at least 60 s (nothing in the 30 s bucket).
    assert_eq!(metric_value(&m, r#"chatkit_gate_http_request_duration_seconds_bucket{route="chatkit",le="30"}"#), 0.0);
    assert_eq!(metric_value(&m, r#"chatkit_gate_http_request_duration_seconds_count{route="chatkit"}"#), 1.0);
    gate.stop().await.unwrap();
}

/// The README's "Protecting a self-hosted ChatKit server" config block, as written.
fn readme_block() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("<!-- chatkit-server-example").expect("README marker");
    let block = &readme[start..readme.find("<!-- /chatkit-server-example -->").unwrap()];
    let toml = block.split("```toml\n").nth(1).unwrap();
    toml[..toml.find("```").unwrap()].to_string()
}

#[tokio::test]
async fn the_readme_example_runs_as_written() {
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let rest = format!(
        "[auth]\nintrospection_url = \"{}\"\ncookies = [\"session\"]\n[auth.claims]\ntier = \"/user/tier\"\n\n{}\n[log]\naudit_file = \"/dev/null\"\n",
        intro.url(),
        readme_block()
    );
    let gate = GateBuilder::new(&app.base()).rest(&rest).start().await;
    for _ in 0..10 {
        let resp = post(&gate, "tok-alice", &create("stream:1:1")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(events(&resp.text().await.unwrap()).last().unwrap()["type"], "thread.item.done");
    }
    // ck_msg: 10 a minute. The 11th is an in-thread error; reads go on.
    let body = post(&gate, "tok-alice", &create("hi")).await.text().await.unwrap();
    assert_eq!(events(&body)[0]["type"], "error", "{body}");
    assert_eq!(post(&gate, "tok-alice", &list()).await.status(), 200);
    // Free tier: the default small model only.
    let mut msg = create("stream:1:1");
    msg["params"]["input"]["inference_options"]["model"] = json!("gpt-4.1");
    assert_eq!(post(&gate, "tok-bob", &msg).await.status(), 403);
    msg["params"]["input"]["inference_options"]["model"] = json!("gpt-4.1-mini");
    assert_eq!(post(&gate, "tok-bob", &msg).await.status(), 200);
    assert_eq!(post(&gate, "tok-bob", &json!({"type": "threads.list", "params": {"limit": 101}})).await.status(), 400);
    let types = app.types().await;
    assert_eq!(types.iter().filter(|t| *t == "threads.create").count(), 11, "{types:?}");
    gate.stop().await.unwrap();
}

async fn ownership_round(gate: &TestGate, app: &ChatKitApp) {
    let body = post(gate, "tok-alice", &create("stream:1:1")).await.text().await.unwrap();
    let evs = events(&body);
    assert_eq!(evs[0]["type"], "thread.created");
    let thread = evs[0]["thread"]["id"].as_str().unwrap().to_string();
    let get = json!({"type": "threads.get_by_id", "params": {"thread_id": thread}});
    let msg = json!({"type": "threads.add_user_message", "params": {"thread_id": thread, "input": {"content": [{"type": "input_text", "text": "stream:1:1"}], "attachments": [], "inference_options": {}}}});
    // The owner is recorded off the stream: wait until it is known.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = post(gate, "tok-carol", &get).await;
        if resp.status() == 403 {
            assert_eq!(resp.json::<Value>().await.unwrap()["error"], "Forbidden");
            break;
        }
        assert!(Instant::now() < deadline, "another user's thread was never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = app.state().await["requests"].as_array().unwrap().len();
    assert_eq!(post(gate, "tok-carol", &get).await.status(), 403);
    assert_eq!(post(gate, "tok-carol", &msg).await.status(), 403);
    assert_eq!(
        post(gate, "tok-carol", &json!({"type": "items.list", "params": {"thread_id": thread}})).await.status(),
        403
    );
    let state = app.state().await;
    let requests = state["requests"].as_array().unwrap();
    assert!(requests[before..].iter().all(|r| r["user"] != "carol"), "carol reached the server: {requests:?}");
    // The owner goes on; a thread the gate never saw created is not refused.
    assert_eq!(post(gate, "tok-alice", &get).await.status(), 200);
    assert_eq!(post(gate, "tok-alice", &msg).await.status(), 200);
    let unknown = json!({"type": "threads.get_by_id", "params": {"thread_id": "thr_unknown"}});
    assert_ne!(post(gate, "tok-carol", &unknown).await.status(), 403);
}

#[tokio::test]
async fn another_users_thread_is_forbidden_redis() {
    let redis = RedisServer::start();
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let store = format!("redis_url = \"{}\"", redis.url());
    let gate = gate_for(&app, &intro, &store, "thread_ownership = true").start().await;
    wait_for_gate_connection(&redis).await;
    ownership_round(&gate, &app).await;
    let mut con = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*:ck:owner:*").query_async(&mut con).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let owner: String = redis::cmd("GET").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert_eq!(owner, "alice");
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query_async(&mut con).await.unwrap();
    assert!(ttl > 29 * 86_400, "owner TTL {ttl}");
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn another_users_thread_is_forbidden_in_process() {
    let app = ChatKitApp::start().await;
    let intro = users().await;
    let gate = gate_for(&app, &intro, "", "thread_ownership = true").start().await;
    ownership_round(&gate, &app).await;
    gate.stop().await.unwrap();
}

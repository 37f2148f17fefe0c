//! Proves the shared test helpers in `tests/common/` work: real Redis (standalone and
//! cluster), the test PKI and TLS clients, and the fake ChatKit API's checks and modes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::certs::{self, TestPki};
use common::fake_openai::{
    FakeChatKit, FakeOptions, Mode, RATE_LIMIT_RETRY_AFTER_SECS, TEST_API_KEY, TEST_WORKFLOW_ID,
};
use common::redis::{RedisCluster, RedisServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

async fn ping(url: &str) -> redis::RedisResult<String> {
    let mut con = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    redis::cmd("PING").query_async(&mut con).await
}

#[tokio::test]
async fn redis_server_starts_kills_and_restarts_on_the_same_port() {
    let mut server = RedisServer::start();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    assert_eq!(ping(&server.url()).await.unwrap(), "PONG");

    let port = server.port();
    server.kill();
    assert!(!server.is_running());
    assert!(ping(&server.url()).await.is_err(), "killed server still answers");

    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(ping(&server.url()).await.unwrap(), "PONG");
}

#[tokio::test]
async fn redis_server_counts_commands_and_flushes() {
    let server = RedisServer::start();
    let mut con = server.connection().await;
    let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
    let n: i64 = script.key("counter").invoke_async(&mut con).await.unwrap();
    assert_eq!(n, 1);
    let n: i64 = script.key("counter").invoke_async(&mut con).await.unwrap();
    assert_eq!(n, 2);
    // invoke_async sends EVALSHA; the first one gets NOSCRIPT (a failed call), then the crate
    // loads the script and retries.
    let stats = server.command_stats("evalsha").await;
    assert_eq!(stats.calls, 3);
    assert_eq!(stats.failed_calls + stats.rejected_calls, 1);
    assert_eq!(server.command_count("EVALSHA").await, 3);
    assert_eq!(server.command_count("incr").await, 2);
    assert_eq!(server.command_count("never_run").await, 0);

    server.reset_stats().await;
    assert_eq!(server.command_count("evalsha").await, 0);

    server.flushall().await;
    let exists: bool = redis::cmd("EXISTS").arg("counter").query_async(&mut con).await.unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn redis_cluster_serves_hash_tagged_keys() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for url in &urls {
        assert_eq!(ping(url).await.unwrap(), "PONG");
    }
    let client = redis::cluster::ClusterClient::new(urls.clone()).unwrap();
    let mut con = client.get_async_connection().await.unwrap();
    // Keys in different slots would be spread; hash tags keep a user's keys together.
    for user in ["alice", "bob", "carol", "dave"] {
        let a = format!("rl:{{{user}}}:a");
        let b = format!("rl:{{{user}}}:b");
        let () = redis::cmd("SET").arg(&a).arg(user).query_async(&mut con).await.unwrap();
        let () = redis::cmd("SET").arg(&b).arg(1).query_async(&mut con).await.unwrap();
        let got: String = redis::cmd("GET").arg(&a).query_async(&mut con).await.unwrap();
        assert_eq!(got, user);
        // A multi-key command only works when both keys share a slot.
        let both: Vec<Option<String>> = redis::cmd("MGET").arg(&a).arg(&b).query_async(&mut con).await.unwrap();
        assert_eq!(both, vec![Some(user.to_string()), Some("1".to_string())]);
    }
    assert!(cluster.command_count("set").await >= 8);
    cluster.flushall().await;
}

// ---------------------------------------------------------------- fake ChatKit API

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

fn valid_body() -> Value {
    json!({
        "user": "user_123",
        "workflow": {
            "id": TEST_WORKFLOW_ID,
            "version": "3",
            "state_variables": { "subscription_tier": "pro", "seats": 5, "beta": true },
            "tracing": { "enabled": false },
        },
        "expires_after": { "anchor": "created_at", "seconds": 300 },
        "rate_limits": { "max_requests_per_1_minute": 20 },
        "chatkit_configuration": {
            "automatic_thread_titling": { "enabled": false },
            "file_upload": { "enabled": true, "max_file_size": 20, "max_files": 3 },
            "history": { "enabled": true, "recent_threads": 5 },
        },
    })
}

async fn post_create(fake: &FakeChatKit, body: &Value) -> reqwest::Response {
    http_client()
        .post(format!("{}/chatkit/sessions", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_cancel(fake: &FakeChatKit, id: &str) -> reqwest::Response {
    http_client()
        .post(format!("{}/chatkit/sessions/{id}/cancel", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .send()
        .await
        .unwrap()
}

/// Asserts the OpenAI error shape and returns the `error` object.
async fn expect_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(request_id.starts_with("req_"), "{request_id}");
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    assert!(error["message"].is_string(), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{body}");
    error
}

#[tokio::test]
async fn fake_creates_a_session_for_a_valid_request() {
    let fake = FakeChatKit::start_default().await;
    assert!(fake.api_base().starts_with("http://127.0.0.1:"));
    assert!(fake.api_base().ends_with("/v1"));
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();

    let response = post_create(&fake, &valid_body()).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["x-request-id"].to_str().unwrap().starts_with("req_"));
    let session: Value = response.json().await.unwrap();
    assert_eq!(session["object"], "chatkit.session");
    assert!(session["id"].as_str().unwrap().starts_with("cksess_"));
    let secret = session["client_secret"].as_str().unwrap();
    assert!(secret.starts_with("ek_") && secret.len() > 40, "{secret}");
    let expires_at = session["expires_at"].as_u64().unwrap();
    assert!((before + 300..=before + 302).contains(&expires_at), "{expires_at} vs {before}");
    assert_eq!(session["status"], "active");
    assert_eq!(session["user"], "user_123");
    assert_eq!(session["workflow"]["id"], TEST_WORKFLOW_ID);
    assert_eq!(session["workflow"]["version"], "3");
    assert_eq!(session["workflow"]["state_variables"]["seats"], 5);
    assert_eq!(session["workflow"]["tracing"]["enabled"], false);
    assert_eq!(session["rate_limits"]["max_requests_per_1_minute"], 20);
    assert_eq!(session["max_requests_per_1_minute"], 20);
    assert_eq!(session["chatkit_configuration"]["file_upload"]["max_files"], 3);
    assert_eq!(session["chatkit_configuration"]["history"]["recent_threads"], 5);

    // Minimal body: documented defaults.
    let response = post_create(&fake, &json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID}})).await;
    assert_eq!(response.status(), 200);
    let minimal: Value = response.json().await.unwrap();
    let expires_at = minimal["expires_at"].as_u64().unwrap();
    assert!((before + 600..=before + 602).contains(&expires_at));
    assert_eq!(minimal["max_requests_per_1_minute"], 10);
    assert_eq!(minimal["workflow"]["tracing"]["enabled"], true);
    assert_eq!(minimal["workflow"]["version"], Value::Null);
    assert_eq!(
        minimal["chatkit_configuration"],
        json!({
            "automatic_thread_titling": {"enabled": true},
            "file_upload": {"enabled": false, "max_file_size": 512, "max_files": 10},
            "history": {"enabled": true, "recent_threads": null},
        })
    );
    assert_ne!(minimal["client_secret"], session["client_secret"]);

    // Recording.
    assert_eq!(fake.create_count(), 2);
    assert_eq!(fake.created_sessions().len(), 2);
    assert_eq!(fake.session_by_secret(secret).unwrap()["id"], session["id"]);
    let recorded = &fake.requests()[0];
    assert_eq!(recorded.method, "POST");
    assert_eq!(recorded.path, "/v1/chatkit/sessions");
    assert_eq!(recorded.header("Authorization").unwrap(), format!("Bearer {TEST_API_KEY}"));
    assert_eq!(recorded.headers["openai-beta"], "chatkit_beta=v1");
    assert_eq!(recorded.headers["content-type"], "application/json");
    assert_eq!(recorded.body.as_ref().unwrap(), &valid_body());
}

#[tokio::test]
async fn fake_rejects_a_request_without_the_beta_header() {
    let fake = FakeChatKit::start_default().await;
    let response = http_client()
        .post(format!("{}/chatkit/sessions", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    let error = expect_error(response, 400).await;
    assert!(error["message"].as_str().unwrap().contains("OpenAI-Beta"));
    assert!(fake.created_sessions().is_empty());
    assert_eq!(fake.create_count(), 1);
}

#[tokio::test]
async fn fake_rejects_a_wrong_or_missing_api_key() {
    let fake = FakeChatKit::start_default().await;
    let response = http_client()
        .post(format!("{}/chatkit/sessions", fake.api_base()))
        .bearer_auth("sk-wrong-key-000000000000")
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    let error = expect_error(response, 401).await;
    assert_eq!(error["code"], "invalid_api_key");
    assert!(!error["message"].as_str().unwrap().contains("sk-wrong-key"), "key echoed");

    let response = http_client()
        .post(format!("{}/chatkit/sessions", fake.api_base()))
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    expect_error(response, 401).await;
    assert!(fake.created_sessions().is_empty());
}

#[tokio::test]
async fn fake_rejects_a_non_json_content_type() {
    let fake = FakeChatKit::start_default().await;
    let response = http_client()
        .post(format!("{}/chatkit/sessions", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .header("Content-Type", "text/plain")
        .body(valid_body().to_string())
        .send()
        .await
        .unwrap();
    expect_error(response, 400).await;
}

#[tokio::test]
async fn fake_rejects_bodies_that_break_the_schema() {
    let fake = FakeChatKit::start_default().await;
    let long_key_param = format!("workflow.state_variables.{}", "k".repeat(65));
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "expires_after.seconds above 600",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID},
                   "expires_after": {"anchor": "created_at", "seconds": 601}}),
            "expires_after.seconds",
            "integer_above_max_value",
        ),
        (
            "expires_after.seconds of 0",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID},
                   "expires_after": {"anchor": "created_at", "seconds": 0}}),
            "expires_after.seconds",
            "integer_below_min_value",
        ),
        (
            "expires_after without anchor",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID},
                   "expires_after": {"seconds": 60}}),
            "expires_after.anchor",
            "missing_required_parameter",
        ),
        (
            "state variable that is an object",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID,
                   "state_variables": {"tier": {"name": "pro"}}}}),
            "workflow.state_variables.tier",
            "invalid_type",
        ),
        (
            "state variable key over 64 chars",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID,
                   "state_variables": {"k".repeat(65): "v"}}}),
            &long_key_param,
            "string_above_max_length",
        ),
        ("missing user", json!({"workflow": {"id": TEST_WORKFLOW_ID}}), "user", "missing_required_parameter"),
        ("empty user", json!({"user": "", "workflow": {"id": TEST_WORKFLOW_ID}}), "user", "empty_string"),
        ("user not a string", json!({"user": 42, "workflow": {"id": TEST_WORKFLOW_ID}}), "user", "invalid_type"),
        ("missing workflow", json!({"user": "u"}), "workflow", "missing_required_parameter"),
        (
            "workflow.version null",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID, "version": null}}),
            "workflow.version",
            "invalid_type",
        ),
        (
            "unknown top-level field",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID}, "metadata": {}}),
            "metadata",
            "unknown_parameter",
        ),
        (
            "unknown nested field",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID, "state": {}}}),
            "workflow.state",
            "unknown_parameter",
        ),
        (
            "max_file_size above 512",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID},
                   "chatkit_configuration": {"file_upload": {"enabled": true, "max_file_size": 513}}}),
            "chatkit_configuration.file_upload.max_file_size",
            "integer_above_max_value",
        ),
        (
            "unknown configuration feature",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID},
                   "chatkit_configuration": {"widgets": {"enabled": true}}}),
            "chatkit_configuration.widgets",
            "unknown_parameter",
        ),
        (
            "rate limit of zero",
            json!({"user": "u", "workflow": {"id": TEST_WORKFLOW_ID},
                   "rate_limits": {"max_requests_per_1_minute": 0}}),
            "rate_limits.max_requests_per_1_minute",
            "integer_below_min_value",
        ),
    ];
    for (what, body, param, code) in cases {
        let response = post_create(&fake, &body).await;
        assert_eq!(response.status(), 400, "{what}");
        let error = expect_error(response, 400).await;
        assert_eq!(error["type"], "invalid_request_error", "{what}");
        assert_eq!(error["param"], param, "{what}: {error}");
        assert_eq!(error["code"], code, "{what}: {error}");
    }
    assert!(fake.created_sessions().is_empty());
}

#[tokio::test]
async fn fake_answers_404_for_an_unknown_workflow_and_url() {
    let fake = FakeChatKit::start_default().await;
    let response = post_create(&fake, &json!({"user": "u", "workflow": {"id": "wf_doesnotexist"}})).await;
    let error = expect_error(response, 404).await;
    assert_eq!(error["param"], "workflow.id");
    assert_eq!(error["message"], "Workflow with id 'wf_doesnotexist' not found.");

    let response = http_client()
        .get(format!("{}/chatkit/sessions", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .send()
        .await
        .unwrap();
    expect_error(response, 404).await;
}

#[tokio::test]
async fn fake_cancels_known_sessions_only() {
    let fake = FakeChatKit::start_default().await;
    let session: Value = post_create(&fake, &valid_body()).await.json().await.unwrap();
    let id = session["id"].as_str().unwrap();

    let response = post_cancel(&fake, id).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["id"], id);
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["client_secret"], session["client_secret"]);
    assert_eq!(fake.cancelled_ids(), vec![id.to_string()]);
    assert_eq!(fake.session(id).unwrap()["status"], "cancelled");

    expect_error(post_cancel(&fake, "cksess_unknown").await, 404).await;

    let response = http_client()
        .post(format!("{}/chatkit/sessions/{id}/cancel", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .send()
        .await
        .unwrap();
    expect_error(response, 400).await; // no beta header
    let response = http_client()
        .post(format!("{}/chatkit/sessions/{id}/cancel", fake.api_base()))
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .send()
        .await
        .unwrap();
    expect_error(response, 401).await; // no key
    assert_eq!(fake.cancelled_ids().len(), 1);
}

#[tokio::test]
async fn fake_modes_answer_errors_hang_and_recover() {
    let fake = FakeChatKit::start_default().await;

    fake.set_mode(Mode::Status(429));
    let response = post_create(&fake, &valid_body()).await;
    assert_eq!(response.headers()["retry-after"].to_str().unwrap(), RATE_LIMIT_RETRY_AFTER_SECS.to_string());
    let error = expect_error(response, 429).await;
    assert_eq!(error["code"], "rate_limit_exceeded");

    fake.set_mode(Mode::Status(500));
    let error = expect_error(post_create(&fake, &valid_body()).await, 500).await;
    assert_eq!(error["type"], "server_error");

    fake.set_mode(Mode::Status(401));
    expect_error(post_create(&fake, &valid_body()).await, 401).await;

    fake.set_mode(Mode::Hang);
    let result = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(format!("{}/chatkit/sessions", fake.api_base()))
        .bearer_auth(TEST_API_KEY)
        .header("OpenAI-Beta", "chatkit_beta=v1")
        .json(&valid_body())
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());

    fake.set_mode(Mode::Delay(Duration::from_millis(50)));
    assert_eq!(post_create(&fake, &valid_body()).await.status(), 200);

    fake.set_mode(Mode::Normal);
    assert_eq!(post_create(&fake, &valid_body()).await.status(), 200);
    assert_eq!(fake.create_count(), 6, "every request is recorded, whatever the mode");
    assert_eq!(fake.created_sessions().len(), 2);
}

#[tokio::test]
async fn fake_shutdown_refuses_connections() {
    let fake = FakeChatKit::start_default().await;
    let client = http_client();
    assert_eq!(post_create(&fake, &valid_body()).await.status(), 200);
    // Keep a hanging request open: shutdown must close it too.
    fake.set_mode(Mode::Hang);
    let hanging = tokio::spawn({
        let request = client
            .post(format!("{}/chatkit/sessions", fake.api_base()))
            .bearer_auth(TEST_API_KEY)
            .header("OpenAI-Beta", "chatkit_beta=v1")
            .json(&valid_body());
        async move { request.send().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    fake.shutdown().await;
    let hung = tokio::time::timeout(Duration::from_secs(5), hanging).await.unwrap().unwrap();
    assert!(hung.is_err(), "hanging request should fail when the fake shuts down");

    let error =
        client.post(format!("{}/chatkit/sessions", fake.api_base())).json(&valid_body()).send().await.unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    assert_eq!(fake.create_count(), 2);
}

// ---------------------------------------------------------------- TLS helpers

#[tokio::test]
async fn tls_server_with_test_leaf_accepts_a_client_trusting_the_ca() {
    let pki = TestPki::new();
    let fake = FakeChatKit::start(FakeOptions { tls: Some(pki.leaf().clone()), ..Default::default() }).await;
    assert!(fake.api_base().starts_with("https://127.0.0.1:"));

    for http2 in [false, true] {
        let client = certs::reqwest_client(&pki.ca_pem(), http2);
        let response = client
            .post(format!("{}/chatkit/sessions", fake.api_base()))
            .bearer_auth(TEST_API_KEY)
            .header("OpenAI-Beta", "chatkit_beta=v1")
            .json(&valid_body())
            .send()
            .await
            .unwrap();
        let expected = if http2 { reqwest::Version::HTTP_2 } else { reqwest::Version::HTTP_11 };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), 200);
        // Also by name: the leaf is valid for localhost.
        let url = fake.api_base().replace("127.0.0.1", "localhost");
        let response = client.post(format!("{url}/chatkit/sessions")).send().await.unwrap();
        assert_eq!(response.status(), 401);
    }

    // A client trusting another CA fails the handshake.
    let other = TestPki::new();
    let error = certs::reqwest_client(&other.ca_pem(), false).get(fake.api_base()).send().await.unwrap_err();
    assert!(error.is_connect(), "{error:?}");

    // The raw handshake helper sees the leaf, and ALPN negotiates as offered.
    assert_eq!(certs::peer_cert_der(fake.addr(), &pki.ca_pem()).await, pki.leaf().cert_der);
    let stream = certs::tls_connect(fake.addr(), "127.0.0.1", &pki.ca_pem(), &["h2"]).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert!(certs::tls_connect(fake.addr(), "localhost", &other.ca_pem(), &[]).await.is_err());
}

#[tokio::test]
async fn test_pki_leaves_are_distinguishable_and_written_as_pem() {
    let pki = TestPki::new();
    let second = pki.leaf_with_cn("second.test");
    assert_eq!(pki.leaf().common_name, "localhost");
    assert_eq!(second.common_name, "second.test");
    assert_ne!(pki.leaf().serial, second.serial);
    assert_ne!(pki.leaf().cert_der, second.cert_der);

    let (_, parsed) = x509_parser::parse_x509_certificate(&second.cert_der).unwrap();
    assert_eq!(parsed.serial.to_bytes_be(), second.serial);
    let cn = parsed.subject().iter_common_name().next().unwrap().as_str().unwrap();
    assert_eq!(cn, "second.test");
    assert_eq!(parsed.validity().not_after.timestamp(), second.not_after_unix);
    assert!(parsed.validity().is_valid());

    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = pki.write_to(dir.path());
    let chain =
        CertificateDer::pem_slice_iter(&std::fs::read(&cert_path).unwrap()).collect::<Result<Vec<_>, _>>().unwrap();
    assert_eq!(chain, vec![pki.leaf().cert_der.clone(), pki.ca_der()]);
    let key = PrivateKeyDer::from_pem_slice(&std::fs::read(&key_path).unwrap()).unwrap();
    assert_eq!(key.secret_der(), pki.leaf().key_der().secret_der());

    // Rotating: the same paths now hold the second leaf, and a server built from it serves it.
    let (cert_path2, _) = second.write_to(dir.path());
    assert_eq!(cert_path2, cert_path);
    assert!(std::fs::read_to_string(&cert_path).unwrap().starts_with(&second.cert_pem));
    let fake = FakeChatKit::start(FakeOptions { tls: Some(second.clone()), ..Default::default() }).await;
    assert_eq!(certs::peer_cert_der(fake.addr(), &pki.ca_pem()).await, second.cert_der);
}

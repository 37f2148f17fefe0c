//! Rate limits through the real gateway: the 429 answer, the `RateLimit*` headers, `/readyz`
//! under `deny`, a shared limit across gateways, and the in-process fallback in `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::gate::{GateBuilder, TestGate, free_port};
use common::introspection::FakeIntrospection;
use common::redis::RedisServer;
use common::upstream::FakeApp;
use tempfile::TempDir;

/// A public `/api/` route limited to `limit` per minute per client IP, and an unlimited `/`.
fn limited(app: &FakeApp, store: &str, limit: u32) -> GateBuilder {
    GateBuilder::new(&app.url()).rest(&format!(
        r#"
[[routes]]
name = "api"
path = "/api/"
auth = "public"
rate_limit = ["chatkit"]

[rate_limit]
{store}
redis_timeout = "50ms"
[rate_limit.policies.chatkit]
limit = {limit}
window = "60s"
key = "ip"

[log]
audit_file = "/dev/null"
"#
    ))
}

async fn get(gate: &TestGate, path: &str) -> reqwest::Response {
    gate.client().get(gate.url(path)).send().await.unwrap()
}

async fn wait_for_readyz(gate: &TestGate, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.admin_get("/readyz").await.0 != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Under `local` and `allow` a gate is ready before its Redis connection is up (it serves
/// degraded meanwhile); tests that count on Redis decisions wait for `gates` connections.
async fn wait_for_connections(redis: &RedisServer, gates: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut con = redis.connection().await;
        let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut con).await.unwrap();
        // Our own connection is one of them.
        if clients.lines().count() > gates {
            return;
        }
        assert!(Instant::now() < deadline, "gates never connected to redis:\n{clients}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn over_the_limit_answers_429_with_retry_after_and_ratelimit_headers() {
    let redis = RedisServer::start();
    let app = FakeApp::start().await;
    let gate = limited(&app, &format!("redis_url = \"{}\"\non_store_error = \"deny\"", redis.url()), 2).start().await;

    for remaining in [1, 0] {
        let r = get(&gate, "/api/hello").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"chatkit\";q=2;w=60");
        let limit = r.headers()["ratelimit"].to_str().unwrap().to_string();
        assert!(limit.starts_with(&format!("\"chatkit\";r={remaining};t=")), "{limit}");
    }

    let r = get(&gate, "/api/hello").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["ratelimit-policy"], "\"chatkit\";q=2;w=60");
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(r.headers()["ratelimit"], format!("\"chatkit\";r=0;t={retry_after}").as_str());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body, serde_json::json!({ "error": "Too many requests", "retryAfter": retry_after }));
    assert_eq!(app.count(), 2, "the rejected request never reached the app");

    // From the deny cache: the same answer, without Redis.
    let r = get(&gate, "/api/hello").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("ratelimit"));

    // A route without policies carries no RateLimit headers.
    let r = get(&gate, "/other").await;
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("ratelimit-policy") && !r.headers().contains_key("ratelimit"));

    let m = gate.metrics().await;
    let decisions = "chatkit_gate_rate_limit_decisions_total{decision=";
    assert_eq!(metric(&m, &format!("{decisions}\"allowed\",policy=\"chatkit\",source=\"redis\"}}")), 2, "{m}");
    assert_eq!(metric(&m, &format!("{decisions}\"limited\",policy=\"chatkit\",source=\"redis\"}}")), 1);
    assert_eq!(metric(&m, &format!("{decisions}\"limited\",policy=\"chatkit\",source=\"cache\"}}")), 1);
}

#[tokio::test]
async fn two_gateways_sharing_one_redis_share_the_limit() {
    let redis = RedisServer::start();
    let app = FakeApp::start().await;
    let store = format!("redis_url = \"{}\"", redis.url());
    let a = limited(&app, &store, 5).start().await;
    let b = limited(&app, &store, 5).start().await;
    wait_for_connections(&redis, 2).await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let gate = if i % 2 == 0 { &a } else { &b };
        statuses.push(get(gate, "/api/x").await.status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 5, "{statuses:?}");
}

#[tokio::test]
async fn deny_answers_503_and_readyz_fails_while_redis_is_dead() {
    let mut redis = RedisServer::start();
    let app = FakeApp::start().await;
    let gate = limited(&app, &format!("redis_url = \"{}\"\non_store_error = \"deny\"", redis.url()), 100).start().await;
    assert_eq!(get(&gate, "/api/x").await.status(), 200);

    redis.kill();
    let r = get(&gate, "/api/x").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"Rate limiting unavailable"}"#);
    wait_for_readyz(&gate, 503).await;
    assert_eq!(get(&gate, "/other").await.status(), 200, "unlimited routes are served");

    redis.restart();
    wait_for_readyz(&gate, 200).await;
    assert_eq!(get(&gate, "/api/x").await.status(), 200);
}

#[tokio::test]
async fn local_fallback_keeps_limiting_while_redis_is_dead() {
    let mut redis = RedisServer::start();
    let app = FakeApp::start().await;
    let gate = limited(&app, &format!("redis_url = \"{}\"", redis.url()), 3).start().await;
    wait_for_connections(&redis, 1).await;
    assert_eq!(get(&gate, "/api/x").await.status(), 200);

    redis.kill();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get(&gate, "/api/x").await.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429], "the in-process limit applies");
    assert_eq!(gate.admin_get("/readyz").await.0, 200, "only deny makes the gate unready");
    let m = gate.metrics().await;
    let decisions = "chatkit_gate_rate_limit_decisions_total{decision=";
    assert_eq!(metric(&m, &format!("{decisions}\"allowed\",policy=\"chatkit\",source=\"local\"}}")), 3, "{m}");
    assert!(metric(&m, "chatkit_gate_redis_errors_total") >= 1);
    assert_eq!(metric(&m, "chatkit_gate_rate_limit_store_degraded"), 1);
}

#[tokio::test]
async fn without_redis_the_in_process_store_limits() {
    let app = FakeApp::start().await;
    let gate = limited(&app, "", 2).start().await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&gate, "/api/x").await.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let m = gate.metrics().await;
    assert_eq!(
        metric(&m, "chatkit_gate_rate_limit_decisions_total{decision=\"allowed\",policy=\"chatkit\",source=\"local\"}"),
        2
    );
    assert_eq!(metric(&m, "chatkit_gate_rate_limit_store_degraded"), 0);
}

/// The real binary against a TLS-only Redis port whose certificate comes from a private CA,
/// trusted through `SSL_CERT_FILE` (read by the system trust store loader).
fn spawn_with_tls_redis(redis_tls_port: u16, ca_file: Option<&std::path::Path>) -> (Child, SocketAddr, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::certs::TestPki::new();
    let (cert, key) = pki.write_to(dir.path());
    let (https, admin) = (free_port(), free_port());
    let text = GateBuilder::new("http://127.0.0.1:9")
        .rest(&format!(
            r#"
[[routes]]
name = "api"
path = "/api/"
auth = "public"
rate_limit = ["chatkit"]
[rate_limit]
redis_url = "rediss://localhost:{redis_tls_port}"
redis_timeout = "250ms"
on_store_error = "deny"
[rate_limit.policies.chatkit]
limit = 2
window = "60s"
key = "ip"
"#
        ))
        .render(https, None, admin, &cert, &key);
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.path().join("gate.log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatkit-gate"));
    cmd.arg("--config").arg(&config).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
    match ca_file {
        Some(ca) => cmd.env("SSL_CERT_FILE", ca),
        None => cmd.env("SSL_CERT_FILE", dir.path().join("empty.pem")),
    };
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    (cmd.spawn().unwrap(), admin, dir)
}

#[tokio::test]
async fn rediss_urls_connect_over_tls_and_verify_the_certificate() {
    let pki = common::certs::TestPki::new();
    let tls_dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.write_to(tls_dir.path());
    let ca = tls_dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let tls_port = free_port().port().to_string();
    let redis = RedisServer::start_with_args(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]);
    let tls_port: u16 = tls_port.parse().unwrap();

    // Without the CA the certificate is refused: never connected, so never ready under deny.
    let (mut untrusting, admin, _dir) = spawn_with_tls_redis(tls_port, None);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(common::gate::admin_get(admin, "/readyz").await.0, 503);
    let _ = untrusting.kill();
    let _ = untrusting.wait();

    let (mut gate, admin, dir) = spawn_with_tls_redis(tls_port, Some(&ca));
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::gate::admin_get(admin, "/readyz").await.0 != 200 {
        let log = std::fs::read_to_string(dir.path().join("gate.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "not ready over rediss://; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut con = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut con).await.unwrap();
    assert!(keys.is_empty());
    // The limited route counts in this Redis (the app is down: 502 after the limiter said yes).
    let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let gate_url = |p: &str| format!("https://127.0.0.1:{}{p}", https_port(&dir));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(client.get(gate_url("/api/x")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, vec![502, 502, 429]);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut con).await.unwrap();
    assert_eq!(keys, vec!["chatkit-gate:rl:{ip:127.0.0.1}:chatkit:sw".to_string()]);
    let _ = gate.kill();
    let _ = gate.wait();
}

/// The HTTPS port the rendered config in `dir` listens on.
fn https_port(dir: &TempDir) -> u16 {
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let listen = text.lines().find(|l| l.starts_with("listen = ")).unwrap();
    listen.trim_end_matches('"').rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn signed_in_users_each_get_their_own_quota_and_the_audit_names_them() {
    let redis = RedisServer::start();
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.add_user("alice-token", "alice", "Alice", "alice@example.com");
    idp.add_user("bob-token", "bob", "Bob", "bob@example.com");
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gate = GateBuilder::new(&app.url())
        .rest(&format!(
            r#"
[auth]
introspection_url = "{idp}"
cookies = ["session"]
[[routes]]
name = "api"
path = "/api/"
auth = "required"
rate_limit = ["chatkit"]
[rate_limit]
redis_url = "{redis}"
[rate_limit.policies.chatkit]
limit = 5
window = "60s"
key = "user"
[log]
audit_file = "{audit}"
"#,
            idp = idp.url(),
            redis = redis.url(),
            audit = audit.display(),
        ))
        .start()
        .await;
    wait_for_connections(&redis, 1).await;
    let client = gate.client();
    let as_user = |token: &str| client.get(gate.url("/api/x")).header("cookie", format!("session={token}")).send();
    for _ in 0..5 {
        assert_eq!(as_user("alice-token").await.unwrap().status(), 200);
    }
    let r = as_user("alice-token").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["retryAfter"], retry_after);
    for remaining in (0..5).rev() {
        let r = as_user("bob-token").await.unwrap();
        assert_eq!(r.status(), 200, "bob is unaffected by alice's limit");
        assert!(r.headers()["ratelimit"].to_str().unwrap().starts_with(&format!("\"chatkit\";r={remaining};")));
    }
    // Signed-out requests are answered by authentication before any limit is spent.
    let r = client.get(gate.url("/api/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let deadline = Instant::now() + Duration::from_secs(5);
    let event = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("RATE_LIMITED")) {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no RATE_LIMITED audit event in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["user_id"], "alice");
    assert_eq!(event["policy"], "chatkit");
    assert_eq!(event["route"], "api");
    assert_eq!(event["ip"], "127.0.0.1");
}

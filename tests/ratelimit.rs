//! Rate limits through the real gateway: the 429 answer, the `RateLimit*` headers, `/readyz`
//! under `deny`, a shared limit across gateways, and the in-process fallback in `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::gate::{GateBuilder, TestGate};
use common::redis::RedisServer;
use common::upstream::FakeApp;

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

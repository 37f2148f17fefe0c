//! Forward authentication end to end: a real gate over real TLS, a real fake introspection
//! endpoint and a real app behind the gate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::certs;
use common::gate::{GateBuilder, TestGate};
use common::introspection::{FakeIntrospection, Mode};
use common::upstream::FakeApp;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ROUTES: &str = r#"
[[routes]]
path = "/login"
auth = "public"
[[routes]]
path = "/public/"
auth = "public"
[[routes]]
path = "/optional/"
auth = "optional"
[[routes]]
name = "api"
path = "/api/"
auth = "required"
unauthenticated = "json"
[[routes]]
name = "account"
path = "/account/"
auth = "required"
unauthenticated = "redirect"
"#;

struct Harness {
    app: FakeApp,
    idp: FakeIntrospection,
    gate: TestGate,
    http: reqwest::Client,
    audit_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// `[auth]` keys as TOML values; `overrides` replace or add keys.
fn auth_toml(url: &str, overrides: &[(&str, &str)]) -> String {
    let url = format!("\"{url}\"");
    let mut keys: Vec<(&str, &str)> = vec![
        ("introspection_url", &url),
        ("timeout", "\"500ms\""),
        ("cookies", "[\"session\"]"),
        ("cache_ttl", "\"1s\""),
        ("negative_cache_ttl", "\"1s\""),
        ("stale_if_error", "\"1s\""),
        ("login_url", "\"/login\""),
    ];
    for (k, v) in overrides {
        match keys.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v,
            None => keys.push((k, v)),
        }
    }
    let mut s = String::from("[auth]\n");
    for (k, v) in keys {
        s.push_str(&format!("{k} = {v}\n"));
    }
    s.push_str("[auth.claims]\ntier = \"/user/tier\"\n");
    s
}

async fn start(overrides: &[(&str, &str)]) -> Harness {
    start_with(overrides, ROUTES).await
}

async fn start_with(overrides: &[(&str, &str)], routes: &str) -> Harness {
    start_on(FakeIntrospection::start("session").await, overrides, routes).await
}

async fn start_on(idp: FakeIntrospection, overrides: &[(&str, &str)], routes: &str) -> Harness {
    let app = FakeApp::start().await;
    idp.add_user("alice-token", "u-alice", "Alice", "alice@example.com");
    let dir = tempfile::tempdir().unwrap();
    let audit_file = dir.path().join("audit.jsonl");
    let rest = format!(
        "{}\n{routes}\n[log]\naudit_file = \"{}\"\nlevel = \"warn\"\n",
        auth_toml(&idp.url(), overrides),
        audit_file.display()
    );
    let gate = GateBuilder::new(&app.url()).rest(&rest).start().await;
    let http = gate.client();
    Harness { app, idp, gate, http, audit_file, _dir: dir }
}

impl Harness {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.http.get(self.gate.url(path));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.send().await.unwrap()
    }

    async fn get_as(&self, path: &str, token: &str) -> reqwest::Response {
        self.get(path, &[("cookie", &format!("session={token}"))]).await
    }

    async fn decisions(&self, result: &str, source: &str) -> u64 {
        let text = self.gate.metrics().await;
        let (r, s) = (format!("result=\"{result}\""), format!("source=\"{source}\""));
        text.lines()
            .find(|l| l.starts_with("chatkit_gate_auth_decisions_total{") && l.contains(&r) && l.contains(&s))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse().unwrap())
    }

    /// Audit lines of one kind, waiting briefly for the writer thread.
    async fn audit(&self, event: &str) -> Vec<serde_json::Value> {
        // The writer is a background thread: wait until some lines are there and two reads
        // 50 ms apart agree.
        let mut found: Vec<serde_json::Value> = Vec::new();
        for _ in 0..60 {
            let text = std::fs::read_to_string(&self.audit_file).unwrap_or_default();
            let now: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v["event"] == event)
                .collect();
            if !now.is_empty() && now.len() == found.len() {
                break;
            }
            found = now;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        found
    }
}

async fn json_of(r: reqwest::Response) -> serde_json::Value {
    r.json().await.unwrap()
}

#[tokio::test]
async fn valid_session_reaches_app_with_identity_and_introspection_sees_only_the_named_cookie() {
    let h = start(&[]).await;
    let r = h
        .http
        .post(h.gate.url("/api/data?q=1"))
        .header("cookie", "theme=dark; session=alice-token; tracking=xyz")
        .header("x-request-id", "req-abc-123")
        .body("a request body the introspection endpoint must never see")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let app = h.app.last();
    assert_eq!(app.headers["x-auth-request-user"], "u-alice");
    assert_eq!(app.headers["x-auth-request-email"], "alice@example.com");
    assert_eq!(app.headers["x-auth-request-name"], "Alice");
    assert_eq!(app.headers["x-auth-request-tier"], "pro");
    assert!(app.body_len > 0, "the app still gets the body");

    assert_eq!(h.idp.count(), 1);
    let seen = h.idp.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, common::introspection::PATH);
    assert_eq!(seen.header("cookie"), Some("session=alice-token"));
    assert_eq!(seen.headers.get_all("cookie").iter().count(), 1);
    assert_eq!(seen.header("x-original-uri"), Some("/api/data?q=1"));
    assert_eq!(seen.header("x-original-method"), Some("POST"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some(format!("127.0.0.1:{}", h.gate.https.port()).as_str()));
    assert_eq!(seen.header("x-request-id"), Some("req-abc-123"));
    assert_eq!(seen.body_len, 0);
    assert!(seen.header("content-length").is_none() && seen.header("transfer-encoding").is_none());
}

#[tokio::test]
async fn missing_or_invalid_cookie_on_api_route_is_401_json() {
    let h = start(&[]).await;
    for cookie in [None, Some("session=forged-token"), Some("other=alice-token")] {
        let mut req = h.http.get(h.gate.url("/api/data"));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        // Even a browser-looking request gets JSON on a `json` route.
        let r = req.header("accept", "text/html").send().await.unwrap();
        assert_eq!(r.status(), 401, "cookie {cookie:?}");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(json_of(r).await, json!({"error": "Unauthorized"}));
    }
    assert_eq!(h.app.count(), 0, "the app is never called");
    assert_eq!(h.idp.count(), 1, "only the request with the session cookie is introspected");
    let denied = h.audit("AUTH_DENIED").await;
    assert_eq!(denied.len(), 3);
    assert_eq!(denied[0]["route"], "api");
    assert_eq!(denied[0]["ip"], "127.0.0.1");
    assert!(denied.iter().all(|d| d.get("user_id").is_none()));
}

#[tokio::test]
async fn browser_navigation_signed_out_redirects_to_login_with_relative_rd() {
    let h = start(&[]).await;
    let nav = [("sec-fetch-mode", "navigate"), ("accept", "text/html")];
    let r = h.get("/original?q=1", &nav).await;
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/login?rd=%2Foriginal%3Fq%3D1");

    // Without Sec-Fetch-Mode, Accept: text/html decides; a fetch() (mode cors) gets 401.
    assert_eq!(h.get("/page", &[("accept", "text/html,*/*")]).await.status(), 302);
    assert_eq!(h.get("/page", &[("sec-fetch-mode", "cors"), ("accept", "text/html")]).await.status(), 401);
    assert_eq!(h.get("/page", &[("accept", "application/json")]).await.status(), 401);
    // A POST is never redirected by `auto`.
    let r = h.http.post(h.gate.url("/page")).header("sec-fetch-mode", "navigate").send().await.unwrap();
    assert_eq!(r.status(), 401);
    // `redirect` routes redirect whatever the client says.
    let r = h.get("/account/settings", &[]).await;
    assert_eq!(r.headers()["location"], "/login?rd=%2Faccount%2Fsettings");

    // A protocol-relative path never becomes an absolute `rd`: repeated slashes are merged
    // before anything else sees the path, so `rd` is the path on this site.
    let r = h.get("//evil.example/x", &nav).await;
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap();
    assert_eq!(location, "/login?rd=%2Fevil.example%2Fx", "got {location}");
    assert_eq!(h.app.count(), 0);
}

#[tokio::test]
async fn login_route_itself_is_served_and_never_redirected() {
    let h = start(&[]).await;
    let nav = [("sec-fetch-mode", "navigate"), ("accept", "text/html")];
    let r = h.get("/login?rd=%2Fx", &nav).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.app.last().uri, "/login?rd=%2Fx");

    // Even when the config forgets to make the login page public, it is not redirected to itself.
    let h = start_with(&[("login_url", "\"/signin?next=1\"")], "").await;
    let r = h.get("/signin", &nav).await;
    assert_eq!(r.status(), 401);
    let r = h.get("/elsewhere", &nav).await;
    assert_eq!(r.headers()["location"], "/signin?next=1&rd=%2Felsewhere");
}

#[tokio::test]
async fn client_sent_identity_header_never_reaches_app() {
    let h = start(&[]).await;
    let spoof = [
        ("X-Auth-Request-User", "admin"),
        ("x-auth-request-email", "admin@example.com"),
        ("x-auth-request-tier", "enterprise"),
        ("x-auth-request-whatever", "1"),
    ];
    let signed_in = [spoof.as_slice(), &[("cookie", "session=alice-token")]].concat();
    for (path, headers, status) in [
        ("/public/x", &spoof[..], 200),
        ("/public/x", &signed_in[..], 200),
        ("/optional/x", &spoof[..], 200),
        ("/optional/x", &signed_in[..], 200),
        ("/api/x", &signed_in[..], 200),
        ("/api/x", &spoof[..], 401),
    ] {
        let before = h.app.count();
        let r = h.get(path, headers).await;
        assert_eq!(r.status(), status, "{path} {headers:?}");
        if status != 200 {
            assert_eq!(h.app.count(), before);
            continue;
        }
        let seen = h.app.last();
        let identity: Vec<_> = seen
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-auth-request-"))
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let signed_in = headers.iter().any(|(k, _)| *k == "cookie") && !path.starts_with("/public/");
        if signed_in {
            assert_eq!(seen.headers["x-auth-request-user"], "u-alice", "{path}");
            assert_eq!(seen.headers["x-auth-request-tier"], "pro", "{path}");
            assert_eq!(seen.headers.get_all("x-auth-request-user").iter().count(), 1);
            assert!(
                identity.iter().all(|(k, v)| !v.contains("admin") && k != "x-auth-request-whatever"),
                "{identity:?}"
            );
        } else {
            assert!(identity.is_empty(), "{path}: {identity:?}");
        }
    }
}

#[tokio::test]
async fn optional_route_passes_either_way_and_forwards_identity_when_signed_in() {
    let h = start(&[]).await;
    let r = h.get("/optional/page", &[("accept", "text/html")]).await;
    assert_eq!(r.status(), 200);
    assert!(h.app.last().headers.get("x-auth-request-user").is_none());
    let r = h.get_as("/optional/page", "expired-token").await;
    assert_eq!(r.status(), 200);
    assert!(h.app.last().headers.get("x-auth-request-user").is_none());
    let r = h.get_as("/optional/page", "alice-token").await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.app.last().headers["x-auth-request-user"], "u-alice");
    assert!(h.audit("AUTH_DENIED").await.is_empty(), "signed out on an optional route is not a denial");
}

async fn assert_unavailable(h: &Harness, token: &str) {
    let before = h.app.count();
    let nav = [("cookie", format!("session={token}")), ("sec-fetch-mode", "navigate".into())];
    let nav: Vec<(&str, &str)> = nav.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for path in ["/api/x", "/page", "/optional/x"] {
        let r = h.get(path, &nav).await;
        assert_eq!(r.status(), 503, "{path}");
        assert!(r.headers().contains_key("retry-after"), "{path}");
        assert!(!r.headers().contains_key("location"));
        assert_eq!(json_of(r).await, json!({"error": "Authentication service unavailable"}));
    }
    assert_eq!(h.app.count(), before, "the app is never called");
}

#[tokio::test]
async fn introspection_error_status_is_503_never_a_redirect_or_pass_through() {
    // No breaker: every request must make (and fail) its own call.
    let h = start(&[("breaker_failures", "0")]).await;
    h.idp.set_mode(Mode::Status(500));
    assert_unavailable(&h, "alice-token").await;
    h.idp.set_mode(Mode::Status(302));
    assert_unavailable(&h, "alice-token").await;
    assert_eq!(h.idp.count(), 6, "errors are never cached");
    let events = h.audit("AUTH_UNAVAILABLE").await;
    assert_eq!(events[0]["reason"], "status 500");
    assert!(h.decisions("error", "introspection").await >= 6);

    h.idp.set_mode(Mode::Normal);
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200, "recovers at once");
}

#[tokio::test]
async fn introspection_hanging_past_timeout_is_503() {
    let h = start(&[("timeout", "\"300ms\"")]).await;
    h.idp.set_mode(Mode::Hang);
    let t = Instant::now();
    let r = h.get_as("/api/x", "alice-token").await;
    let elapsed = t.elapsed();
    assert_eq!(r.status(), 503);
    assert!(elapsed >= Duration::from_millis(280) && elapsed < Duration::from_secs(2), "{elapsed:?}");
    assert_unavailable(&h, "alice-token").await;
    assert_eq!(h.audit("AUTH_UNAVAILABLE").await[0]["reason"], "timeout");
}

#[tokio::test]
async fn introspection_refusing_connections_is_503() {
    let h = start(&[]).await;
    h.idp.shutdown().await;
    assert_unavailable(&h, "alice-token").await;
    assert_eq!(h.audit("AUTH_UNAVAILABLE").await[0]["reason"], "connection failed");
}

#[tokio::test]
async fn hundred_concurrent_requests_with_one_cookie_make_one_introspection_call() {
    // A 2 s timeout: the 300 ms answer must not time out on a loaded CI machine.
    let h = start(&[("cache_ttl", "\"30s\""), ("timeout", "\"2s\"")]).await;
    h.idp.set_delay(Duration::from_millis(300));
    let requests = (0..100).map(|i| h.get_as(if i % 2 == 0 { "/api/a" } else { "/b" }, "alice-token"));
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(h.app.count(), 100);
    assert!(h.app.seen().iter().all(|s| s.headers["x-auth-request-user"] == "u-alice"));
    assert_eq!(h.idp.count(), 2, "concurrent misses share one call per route (decisions are cached per route)");

    h.idp.set_delay(Duration::ZERO);
    for _ in 0..20 {
        assert_eq!(h.get_as("/api/a", "alice-token").await.status(), 200);
    }
    assert_eq!(h.idp.count(), 2, "within cache_ttl no further call");
    assert_eq!(h.decisions("allow", "cache").await, 20);
}

#[tokio::test]
async fn revoked_session_loses_access_within_cache_ttl() {
    let h = start(&[("cache_ttl", "\"1s\""), ("negative_cache_ttl", "\"1s\"")]).await;
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    h.idp.revoke("alice-token");
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200, "still cached");
    assert_eq!(h.idp.count(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Past cache_ttl (within stale_if_error): answered from the cache while one call refreshes.
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200, "stale while revalidating");
    common::eventually("the background refresh", || h.idp.count() == 2).await;
    let mut status = 200;
    for _ in 0..50 {
        status = h.get_as("/api/x", "alice-token").await.status().as_u16();
        if status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 401, "access ends once the refresh has answered");
    assert_eq!(h.idp.count(), 2);

    // Signed out is cached for negative_cache_ttl: signing in again shows after at most that long.
    h.idp.add_user("alice-token", "u-alice", "Alice", "alice@example.com");
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 401);
    assert_eq!(h.idp.count(), 2);
    assert_eq!(h.decisions("deny", "cache").await, 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    assert_eq!(h.idp.count(), 3);
}

#[tokio::test]
async fn cache_control_no_store_and_shorter_max_age_are_honoured() {
    let h = start(&[("cache_ttl", "\"30s\"")]).await;
    h.idp.set_cache_control(Some("private, no-store"));
    for _ in 0..3 {
        assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    }
    assert_eq!(h.idp.count(), 3, "no-store: every request asks");

    h.idp.set_cache_control(Some("max-age=1"));
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    assert_eq!(h.idp.count(), 4);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    assert_eq!(h.idp.count(), 5, "max-age=1 beat cache_ttl=30s");

    // An operator whose app marks everything no-store may choose to ignore it.
    let h = start(&[("cache_ttl", "\"30s\""), ("respect_cache_control", "false")]).await;
    h.idp.set_cache_control(Some("no-store"));
    for _ in 0..3 {
        assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    }
    assert_eq!(h.idp.count(), 1);
}

#[tokio::test]
async fn stale_identity_is_served_while_introspection_is_down_then_503() {
    let h = start(&[("cache_ttl", "\"300ms\""), ("stale_if_error", "\"1s\"")]).await;
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    let first_call = Instant::now();
    h.idp.shutdown().await;

    // A never-seen cookie gets 503 at once.
    assert_eq!(h.get_as("/api/x", "bob-token").await.status(), 503);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = h.get_as("/api/x", "alice-token").await;
    assert_eq!(r.status(), 200, "past cache_ttl, within stale_if_error");
    assert_eq!(h.app.last().headers["x-auth-request-user"], "u-alice");
    assert_eq!(h.decisions("allow", "stale").await, 1);

    let end = first_call + Duration::from_millis(300 + 1000 + 100);
    tokio::time::sleep_until(end.into()).await;
    let r = h.get_as("/api/x", "alice-token").await;
    assert_eq!(r.status(), 503, "past stale_if_error");
    assert_eq!(h.app.count(), 2);
}

#[tokio::test]
async fn websocket_upgrade_on_required_route_is_authenticated_then_tunnelled() {
    let h = start(&[]).await;
    let url = format!("wss://localhost:{}/ws", h.gate.https.port());

    let tls = certs::tls_connect(h.gate.https, "localhost", &h.gate.ca_pem, &["http/1.1"]).await.unwrap();
    let refused = tokio_tungstenite::client_async(url.as_str(), tls).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(h.app.count(), 0);

    let tls = certs::tls_connect(h.gate.https, "localhost", &h.gate.ca_pem, &["http/1.1"]).await.unwrap();
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("cookie", "session=alice-token".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "ping");

    let app = h.app.last();
    assert_eq!(app.headers["upgrade"], "websocket");
    assert_eq!(app.headers["x-auth-request-user"], "u-alice");
    let seen = h.idp.last();
    assert_eq!(seen.header("x-original-uri"), Some("/ws"));
    for hop in ["upgrade", "connection", "sec-websocket-key", "sec-websocket-version"] {
        assert!(seen.header(hop).is_none(), "introspection got {hop}");
    }
}

#[tokio::test]
async fn metrics_show_allow_deny_error_by_source() {
    let h = start(&[("cache_ttl", "\"300ms\""), ("stale_if_error", "\"10s\"")]).await;
    h.get_as("/api/x", "alice-token").await; // allow, introspection
    h.get_as("/api/x", "alice-token").await; // allow, cache
    h.get_as("/api/x", "nobody").await; // deny, introspection
    h.get_as("/api/x", "nobody").await; // deny, cache
    h.get("/api/x", &[]).await; // deny, none (no credentials: no call)
    h.get("/public/x", &[]).await; // no decision at all
    h.idp.set_mode(Mode::Status(500));
    h.get_as("/api/x", "carol").await; // error, introspection
    tokio::time::sleep(Duration::from_millis(350)).await;
    h.get_as("/api/x", "alice-token").await; // allow, stale
    for (result, source, n) in [
        ("allow", "introspection", 1),
        ("allow", "cache", 1),
        ("allow", "stale", 1),
        ("deny", "introspection", 1),
        ("deny", "cache", 1),
        ("deny", "none", 1),
        ("error", "introspection", 1),
        ("error", "cache", 0),
    ] {
        assert_eq!(h.decisions(result, source).await, n, "{result}/{source}");
    }
    let text = h.gate.metrics().await;
    let count = text
        .lines()
        .find(|l| l.starts_with("chatkit_gate_auth_introspection_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap();
    assert_eq!(count, "4", "one observation per introspection call");
    let entries = text.lines().find(|l| l.starts_with("chatkit_gate_auth_cache_entries ")).unwrap();
    assert_eq!(entries, "chatkit_gate_auth_cache_entries 2", "alice and nobody are cached");
    assert!(!text.contains("alice-token"), "no credential in metrics");
}

#[tokio::test]
async fn set_cookie_of_a_signed_in_answer_reaches_the_client_but_is_not_replayed_from_cache() {
    let h = start(&[("cache_ttl", "\"30s\"")]).await;
    h.idp.set_set_cookies(&["session=alice-token; Path=/; HttpOnly; Max-Age=3600", "seen=1; Path=/"]);
    let r = h.get_as("/api/x", "alice-token").await;
    let cookies: Vec<_> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    // Only the forwarded credential cookie: `seen` was never sent to the endpoint.
    assert_eq!(cookies, ["session=alice-token; Path=/; HttpOnly; Max-Age=3600"]);
    let r = h.get_as("/api/x", "alice-token").await;
    assert!(r.headers().get("set-cookie").is_none(), "cached decision replays no cookie");
    let r = h.get_as("/api/x", "stranger").await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none(), "signed-out answers pass no cookie");
}

#[tokio::test]
async fn nextauth_style_200_without_user_is_signed_out_and_bad_ids_are_unavailable() {
    let h = start(&[("cookies", "[]")]).await;
    h.idp.set_signed_out_answer(200, "{}");
    let r = h.get("/api/x", &[("cookie", "session=unknown")]).await;
    assert_eq!(r.status(), 401);
    h.idp.set_answer("numeric", json!({"user": {"id": 42, "email": "n@example.com"}}));
    let r = h.get("/api/x", &[("cookie", "a=b; session=numeric")]).await;
    assert_eq!(r.status(), 200);
    let seen = h.app.last();
    assert_eq!(seen.headers["x-auth-request-user"], "42");
    assert!(seen.headers.get("x-auth-request-name").is_none());
    assert_eq!(h.idp.last().header("cookie"), Some("a=b; session=numeric"), "cookies = [] forwards the whole header");

    for (token, body) in [("empty", json!({"user": {"id": ""}})), ("object", json!({"user": {"id": {"x": 1}}}))] {
        h.idp.set_answer(token, body);
        let r = h.get("/api/x", &[("cookie", &format!("session={token}"))]).await;
        assert_eq!(r.status(), 503, "{token}");
    }
}

#[tokio::test]
async fn identity_values_are_sanitised_before_reaching_the_app() {
    let h = start(&[]).await;
    let long = "x".repeat(5000);
    h.idp.set_answer(
        "t",
        json!({"user": {"id": "u-1", "name": "Eve\r\nX-Auth-Request-User: admin", "email": long, "tier": "gold\u{0}"}}),
    );
    assert_eq!(h.get_as("/api/x", "t").await.status(), 200);
    let seen = h.app.last();
    assert_eq!(seen.headers["x-auth-request-name"], "EveX-Auth-Request-User: admin");
    assert_eq!(seen.headers.get_all("x-auth-request-user").iter().collect::<Vec<_>>(), ["u-1"]);
    assert_eq!(seen.headers["x-auth-request-email"].len(), 1024);
    assert_eq!(seen.headers["x-auth-request-tier"], "gold");
}

#[tokio::test]
async fn forwarded_authorization_header_is_a_credential() {
    let h = start(&[("forward_headers", "[\"authorization\"]")]).await;
    let r = h.get("/api/x", &[("authorization", "Bearer alice-token")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.app.last().headers["x-auth-request-user"], "u-alice");
    let seen = h.idp.last();
    assert_eq!(seen.header("authorization"), Some("Bearer alice-token"));
    assert!(seen.header("cookie").is_none());
}

#[tokio::test]
async fn introspection_connections_are_pooled_and_kept_alive() {
    let h = start(&[]).await;
    for i in 0..10 {
        // Distinct credentials: every request is a cache miss and a call.
        assert_eq!(h.get_as("/api/x", &format!("token-{i}")).await.status(), 401);
        assert_eq!(h.get_as("/optional/x", &format!("other-{i}")).await.status(), 200);
    }
    assert_eq!(h.idp.count(), 20);
    assert_eq!(h.idp.connections(), 1, "sequential calls reuse one keep-alive connection");
}

#[tokio::test]
async fn https_introspection_url_is_verified_against_webpki_roots_plus_ca_file() {
    let pki = certs::TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, pki.ca_pem()).unwrap();

    let ca = format!("{:?}", ca_file.display().to_string());
    let h = start_on(FakeIntrospection::start_tls("session", pki.leaf()).await, &[("ca_file", &ca)], ROUTES).await;
    assert!(h.idp.url().starts_with("https://"));
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 200);
    assert_eq!(h.app.last().headers["x-auth-request-user"], "u-alice");
    assert_eq!(h.idp.last().version, http::Version::HTTP_2, "ALPN h2 is offered and used");

    // Without the CA, the test certificate is not trusted: unavailable, never signed in.
    let h = start_on(FakeIntrospection::start_tls("session", pki.leaf()).await, &[], ROUTES).await;
    assert_eq!(h.get_as("/api/x", "alice-token").await.status(), 503);
    assert_eq!(h.idp.count(), 0);
}

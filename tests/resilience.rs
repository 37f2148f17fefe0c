//! Degrading gracefully, end to end (issue 10): a frozen or failing introspection endpoint,
//! pooled connections closed under the gate, slow and broken uploads, saturation and rolling
//! restarts. Faults are injected for real (a server that never answers, one that closes every
//! reused connection, a client that stalls or sends bad chunked framing) and every test asserts
//! by counts: calls the endpoint received, requests the app received, statuses, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::certs;
use common::flaky::FlakyServer;
use common::gate::{GateBuilder, TestGate};
use common::introspection::{FakeIntrospection, Mode};
use common::upstream::FakeApp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = r#"
[[routes]]
name = "api"
path = "/api/"
auth = "required"
unauthenticated = "json"
[[routes]]
name = "admin"
path = "/admin/"
auth = "required"
unauthenticated = "json"
"#;

/// The value of one sample of `name` whose labels contain every `labels` pair (0 when absent).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

fn auth_section(url: &str, extra: &str) -> String {
    format!(
        "[auth]\nintrospection_url = \"{url}\"\ncookies = [\"session\"]\n{extra}\n{ROUTES}\n[log]\nlevel = \"warn\"\n"
    )
}

async fn gate_with_auth(app: &FakeApp, idp_url: &str, extra: &str) -> TestGate {
    GateBuilder::new(&app.url()).rest(&auth_section(idp_url, extra)).start().await
}

fn client_with_timeout(gate: &TestGate, timeout: Duration) -> reqwest::Client {
    certs::install_crypto_provider();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(gate.ca_pem.as_bytes()).unwrap())
        .no_proxy()
        .http1_only()
        .timeout(timeout)
        .build()
        .unwrap()
}

async fn get_as(
    http: &reqwest::Client,
    gate: &TestGate,
    path: &str,
    token: &str,
) -> Result<reqwest::Response, reqwest::Error> {
    http.get(gate.url(path)).header("cookie", format!("session={token}")).send().await
}

// ---------------------------------------------------------------------------------------------
// Introspection: stale-while-revalidate, breaker, in-flight cap, per-route key, rate limit.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn frozen_introspection_costs_stale_users_nothing_and_makes_one_call_per_credential() {
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    let users = 5;
    for u in 0..users {
        idp.add_user(&format!("tok-{u}"), &format!("u-{u}"), "User", "u@example.com");
    }
    // A call waits up to 30 s: without stale-while-revalidate no stale request could be
    // answered within the client's 3 s.
    let gate =
        gate_with_auth(&app, &idp.url(), "timeout = \"30s\"\ncache_ttl = \"300ms\"\nstale_if_error = \"60s\"").await;
    let http = client_with_timeout(&gate, Duration::from_secs(3));
    for u in 0..users {
        assert_eq!(get_as(&http, &gate, "/api/warm", &format!("tok-{u}")).await.unwrap().status(), 200);
    }
    assert_eq!(idp.count(), users);
    tokio::time::sleep(Duration::from_millis(400)).await; // every entry is now past cache_ttl
    idp.set_mode(Mode::Hang);

    let per_user = 10;
    let mut tasks = Vec::new();
    for u in 0..users {
        for _ in 0..per_user {
            let (http, url) = (http.clone(), gate.url("/api/stale"));
            tasks.push(tokio::spawn(async move {
                let r = http.get(url).header("cookie", format!("session=tok-{u}")).send().await;
                r.map(|r| r.status().as_u16()).unwrap_or(0)
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, users * per_user, "every stale request answered from the cache at once");
    // Each user's requests reached the app with that user's identity.
    let seen = app.seen();
    let stale: Vec<_> = seen.iter().filter(|s| s.uri.starts_with("/api/stale")).collect();
    assert_eq!(stale.len(), users * per_user);
    for u in 0..users {
        let id = format!("u-{u}");
        let n = stale.iter().filter(|s| s.headers.get("x-auth-request-user").unwrap() == id.as_str()).count();
        assert_eq!(n, per_user, "user {id}");
    }
    assert_eq!(idp.count(), users * 2, "one refresh per credential, however many requests");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_auth_introspection_in_flight", &[]), users as f64);
    assert_eq!(
        metric(&m, "chatkit_gate_auth_decisions_total", &[("result", "allow"), ("source", "stale")]),
        (users * per_user) as f64
    );
}

#[tokio::test]
async fn breaker_opens_after_consecutive_timeouts_so_new_users_fail_fast() {
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.set_mode(Mode::Hang);
    let gate =
        gate_with_auth(&app, &idp.url(), "timeout = \"200ms\"\nbreaker_failures = 3\nbreaker_cooldown = \"60s\"").await;
    let http = gate.client();
    for i in 0..10 {
        let r = get_as(&http, &gate, "/api/x", &format!("new-{i}")).await.unwrap();
        assert_eq!(r.status(), 503, "request {i}");
        assert!(r.headers().contains_key("retry-after"));
    }
    assert_eq!(idp.count(), 3, "after 3 timeouts the breaker stops calling a hung endpoint");
    assert_eq!(app.count(), 0, "never a pass-through");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_auth_breaker_open", &[]), 1.0);
    assert_eq!(metric(&m, "chatkit_gate_auth_introspection_rejected_total", &[("reason", "breaker_open")]), 7.0);
}

#[tokio::test]
async fn open_breaker_lets_one_probe_through_after_cooldown_and_closes_on_success() {
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.add_user("alice", "u-alice", "Alice", "a@example.com");
    idp.set_mode(Mode::Status(500));
    let gate =
        gate_with_auth(&app, &idp.url(), "breaker_failures = 2\nbreaker_cooldown = \"300ms\"\ncache_ttl = \"0\"").await;
    let http = gate.client();
    for _ in 0..4 {
        assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 503);
    }
    assert_eq!(idp.count(), 2, "open after two failures");
    idp.set_mode(Mode::Normal);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200, "the probe");
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200, "closed again");
    assert_eq!(idp.count(), 4);
    assert_eq!(metric(&gate.metrics().await, "chatkit_gate_auth_breaker_open", &[]), 0.0);
}

#[tokio::test]
async fn https_introspection_frozen_then_refusing_serves_stale_users_and_fails_new_ones_fast() {
    let pki = certs::TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, pki.ca_pem()).unwrap();
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start_tls("session", pki.leaf()).await;
    idp.add_user("alice", "u-alice", "Alice", "a@example.com");
    let extra = format!(
        "ca_file = {:?}\ntimeout = \"300ms\"\ncache_ttl = \"200ms\"\nstale_if_error = \"60s\"\n\
         breaker_failures = 2\nbreaker_cooldown = \"60s\"",
        ca_file.display().to_string()
    );
    let gate = gate_with_auth(&app, &idp.url(), &extra).await;
    let http = gate.client();
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200);
    assert_eq!(idp.last().version, http::Version::HTTP_2);
    tokio::time::sleep(Duration::from_millis(250)).await;
    idp.set_mode(Mode::Hang);
    // New users: two calls time out (300 ms each), then the breaker answers at once.
    for i in 0..5 {
        assert_eq!(get_as(&http, &gate, "/api/x", &format!("new-{i}")).await.unwrap().status(), 503);
    }
    // The endpoint is now gone altogether: alice is still served from the cache.
    idp.shutdown().await;
    for _ in 0..5 {
        assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200);
    }
    assert_eq!(app.count(), 6);
    assert!(app.seen().iter().all(|s| s.headers["x-auth-request-user"] == "u-alice"));
    assert_eq!(idp.count(), 3, "alice's first call and two timed-out calls; nothing after the breaker opened");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_auth_breaker_open", &[]), 1.0);
    assert_eq!(metric(&m, "chatkit_gate_auth_introspection_errors_total", &[("kind", "timeout")]), 2.0);
}

#[tokio::test]
async fn introspection_calls_beyond_max_in_flight_are_refused_at_once() {
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.set_mode(Mode::Hang);
    let gate = gate_with_auth(&app, &idp.url(), "timeout = \"1s\"\nmax_in_flight = 2\nbreaker_failures = 0").await;
    let http = gate.client();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (http, url) = (http.clone(), gate.url("/api/x"));
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).header("cookie", format!("session=distinct-{i}")).send().await.unwrap();
            (r.status().as_u16(), r.headers().contains_key("retry-after"))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (503, true));
    }
    assert_eq!(idp.count(), 2, "only max_in_flight calls reached the endpoint");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_auth_introspection_rejected_total", &[("reason", "in_flight_limit")]), 4.0);
    assert_eq!(app.count(), 0);
}

#[tokio::test]
async fn a_decision_cached_for_one_route_is_not_reused_on_another() {
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.add_user("alice", "u-alice", "Alice", "a@example.com");
    let gate = gate_with_auth(&app, &idp.url(), "cache_ttl = \"60s\"").await;
    let http = gate.client();
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200);
    idp.revoke("alice");
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200, "cached for api");
    // The introspection call names the original URI: another route asks again.
    assert_eq!(get_as(&http, &gate, "/admin/x", "alice").await.unwrap().status(), 401);
    assert_eq!(idp.count(), 2);
    assert_eq!(idp.last().header("x-original-uri"), Some("/admin/x"));
    assert!(app.seen().iter().all(|s| !s.uri.starts_with("/admin")), "the app never saw /admin");
}

#[tokio::test]
async fn introspection_rate_limit_refuses_cache_misses_past_the_policy_but_not_cached_users() {
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.add_user("alice", "u-alice", "Alice", "a@example.com");
    let extra = "cache_ttl = \"60s\"\nintrospection_rate_limit = \"introspect\"\n\
                 [rate_limit]\n[rate_limit.policies.introspect]\nalgorithm = \"sliding_window\"\nlimit = 3\n\
                 window = \"60s\"\nkey = \"ip\"";
    let gate = gate_with_auth(&app, &idp.url(), extra).await;
    let http = gate.client();
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200);
    for _ in 0..10 {
        assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200, "cache hits are free");
    }
    for i in 0..2 {
        assert_eq!(get_as(&http, &gate, "/api/x", &format!("guess-{i}")).await.unwrap().status(), 401);
    }
    let r = get_as(&http, &gate, "/api/x", "guess-2").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "Too many requests");
    assert_eq!(idp.count(), 3, "the refused miss made no call");
    assert_eq!(get_as(&http, &gate, "/api/x", "alice").await.unwrap().status(), 200, "cached user unaffected");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_auth_introspection_rejected_total", &[("reason", "rate_limited")]), 1.0);
}

// ---------------------------------------------------------------------------------------------
// Pooled connections closed under the gate.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn app_closing_reused_connections_costs_no_idempotent_request() {
    let app = FlakyServer::start("{}").await;
    let gate = GateBuilder::new(&app.url()).upstream("pool_idle_timeout = \"30s\"").start().await;
    let http = gate.client();
    let mut failed = 0;
    for i in 0..20 {
        let r = http.get(gate.url(&format!("/r/{i}"))).send().await.unwrap();
        if r.status() != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0);
    let dropped = app.dropped();
    assert!(dropped >= 5, "the server really dropped reused connections ({dropped})");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_upstream_retries_total", &[("target", "app")]), dropped as f64);
    assert_eq!(metric(&m, "chatkit_gate_upstream_errors_total", &[("kind", "protocol")]), 0.0);
}

#[tokio::test]
async fn the_apps_keep_alive_timeout_expires_pooled_connections_before_the_app_does() {
    // The app announces `Keep-Alive: timeout=1`; the operator left a 30 s pool idle timeout.
    let app = FlakyServer::start_keep_alive("{}", 1).await;
    let gate = GateBuilder::new(&app.url()).upstream("pool_idle_timeout = \"30s\"").start().await;
    let http = gate.client();
    for _ in 0..3 {
        // Each exchange read to its end before the next starts: back to back, not overlapping.
        let r = http.get(gate.url("/quick")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let before = app.connections();
    assert!(app.seen().last().unwrap().nth_on_connection > 0, "back-to-back requests reuse a connection");
    // Idle for 700 ms: past the gate's 500 ms (half the app's 1 s), within the app's 1 s.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(http.get(gate.url("/after-idle")).send().await.unwrap().status(), 200);
    let last = app.seen().last().cloned().unwrap();
    assert_eq!((last.path.as_str(), last.nth_on_connection), ("/after-idle", 0), "a new connection");
    assert_eq!(app.connections(), before + 1);
}

#[tokio::test]
async fn a_post_with_a_body_is_never_replayed_after_a_reused_connection_fails() {
    let app = FlakyServer::start("{}").await;
    let gate = GateBuilder::new(&app.url()).upstream("pool_idle_timeout = \"30s\"").start().await;
    let http = gate.client();
    assert_eq!(http.get(gate.url("/warm")).send().await.unwrap().status(), 200);
    let r = http.post(gate.url("/order")).body("buy one").send().await.unwrap();
    assert_eq!(r.status(), 502, "the app may have acted on it: not sent twice");
    let posts: Vec<_> = app.seen().into_iter().filter(|s| s.method == "POST").collect();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].body_len, 7);
    assert_eq!(metric(&gate.metrics().await, "chatkit_gate_upstream_retries_total", &[("target", "app")]), 0.0);
}

#[tokio::test]
async fn introspection_closing_reused_connections_costs_no_signed_in_request() {
    let idp = FlakyServer::start(r#"{"user":{"id":"u-1"}}"#).await;
    let app = FakeApp::start().await;
    // No caching: every request introspects, on the pooled connection when one is idle.
    let gate = gate_with_auth(&app, &format!("{}/session", idp.url()), "cache_ttl = \"0\"").await;
    let http = gate.client();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get_as(&http, &gate, "/api/x", "t").await.unwrap().status().as_u16());
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let dropped = idp.dropped();
    assert!(dropped >= 5, "the endpoint really dropped reused connections ({dropped})");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_upstream_retries_total", &[("target", "introspection")]), dropped as f64);
    assert_eq!(metric(&m, "chatkit_gate_auth_decisions_total", &[("result", "error")]), 0.0);
    assert_eq!(app.count(), 20);
}

// ---------------------------------------------------------------------------------------------
// Uploads: the timeout clock, body_timeout, malformed bodies.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_upload_slower_than_upstream_timeout_succeeds() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).upstream("timeout = \"500ms\"").start().await;
    let chunks = 8usize;
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024])), i + 1))
    });
    let r = gate.client().post(gate.url("/upload")).body(reqwest::Body::wrap_stream(stream)).send().await.unwrap();
    assert_eq!(r.status(), 200, "1.6 s of upload is not 500 ms of waiting for the app");
    assert_eq!(app.last().body_len, chunks * 64 * 1024);
    assert_eq!(metric(&gate.metrics().await, "chatkit_gate_upstream_errors_total", &[("kind", "timeout")]), 0.0);
}

/// A raw HTTP/1.1 exchange over TLS: send `head` then `body`, read what comes back until the
/// server closes or 5 s pass.
async fn raw_exchange(gate: &TestGate, request: &[u8]) -> String {
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    tls.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_stalled_upload_gets_408_and_the_app_connection_is_released() {
    let app = FakeApp::start().await;
    let gate =
        GateBuilder::new(&app.url()).server("body_timeout = \"300ms\"").upstream("timeout = \"30s\"").start().await;
    let answer = raw_exchange(
        &gate,
        format!("POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000\r\n\r\n{}", "y".repeat(100))
            .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.ends_with(r#"{"error":"Request body timed out"}"#), "{answer}");
    common::eventually("the app to see its request end", || app.count() == 1).await;
    assert_eq!(app.last().body_len, 100, "the app got what was sent, then its connection closed");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_client_body_errors_total", &[("kind", "timeout")]), 1.0);
    assert_eq!(metric(&m, "chatkit_gate_upstream_errors_total", &[("kind", "protocol")]), 0.0);
    assert_eq!(metric(&m, "chatkit_gate_upstream_errors_total", &[("kind", "timeout")]), 0.0);
}

#[tokio::test]
async fn a_malformed_chunked_body_is_400_not_an_upstream_error() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let answer = raw_exchange(
        &gate,
        b"POST /upload HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nbad\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with(r#"{"error":"Bad request"}"#), "{answer}");
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_client_body_errors_total", &[("kind", "malformed")]), 1.0);
    assert_eq!(metric(&m, "chatkit_gate_upstream_errors_total", &[("kind", "protocol")]), 0.0);
    assert_eq!(
        metric(&m, "chatkit_gate_http_requests_total", &[("route", "default"), ("method", "POST"), ("status", "400")]),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Saturation and shutdown.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connections_past_max_connections_are_counted_and_logged() {
    let (logs, _guard) = common::logs::capture();
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("max_connections = 2").start().await;
    let _a = tokio::net::TcpStream::connect(gate.https).await.unwrap();
    let _b = tokio::net::TcpStream::connect(gate.https).await.unwrap();
    let _c = tokio::net::TcpStream::connect(gate.https).await.unwrap(); // waits in the kernel queue
    let mut paused = 0.0;
    for _ in 0..100 {
        paused = metric(&gate.metrics().await, "chatkit_gate_accept_paused", &[]);
        if paused == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(paused, 1.0);
    let m = gate.metrics().await;
    assert!(metric(&m, "chatkit_gate_connection_limit_waits_total", &[]) >= 1.0);
    assert_eq!(metric(&m, "chatkit_gate_connections_open", &[]), 2.0);
    assert!(logs.text().contains("server.max_connections reached"), "{}", logs.text());
}

/// Keep-alive clients send continuously; SIGTERM lands mid-stream. Returns (answered 200,
/// refused at connect after the listener closed, failed any other way: EOF or reset).
async fn shutdown_under_keep_alive_load(delay: &str) -> (usize, usize, usize, Vec<String>) {
    let app = FakeApp::start().await;
    let mut gate = GateBuilder::new(&app.url()).shutdown_delay(delay).server("shutdown_grace = \"5s\"").start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, other) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let http = gate.client();
        let url = gate.url("/echo");
        let (stop, ok, refused, other, errors) =
            (stop.clone(), ok.clone(), refused.clone(), other.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let outcome = match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.map(|_| ()).map_err(|e| format!("body: {e:?}")),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) if e.is_connect() => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        return; // the listener is closed: this client is done
                    }
                    Err(e) => Err(format!("{e:?}")),
                };
                match outcome {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        other.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(e);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.begin_shutdown();
    let mut ready = 200;
    for _ in 0..50 {
        ready = common::gate::admin_get(gate.admin, "/readyz").await.0;
        if ready != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(ready, 200, "readyz while draining");
    let ok_at_sigterm = ok.load(Ordering::Relaxed);
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    assert!(done.is_ok(), "clients still running 10 s after SIGTERM");
    gate.join().await.unwrap();
    let served_after = ok.load(Ordering::Relaxed) - ok_at_sigterm;
    eprintln!(
        "delay {delay}: ok {} (after SIGTERM {served_after}), refused {}, other {}",
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed)
    );
    let errors = errors.lock().unwrap().clone();
    (served_after, refused.load(Ordering::Relaxed), other.load(Ordering::Relaxed), errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_serving_keep_alive_clients_through_shutdown_delay_without_eof() {
    let (served_after_sigterm, refused, other, errors) = shutdown_under_keep_alive_load("1500ms").await;
    assert_eq!(other, 0, "requests answered with EOF or reset: {errors:?}");
    assert!(served_after_sigterm > 0, "requests kept being served during shutdown_delay");
    assert_eq!(refused, 8, "every client ends by finding the listener closed");
}

#[tokio::test]
async fn readyz_is_503_at_once_while_requests_are_still_served_during_the_delay() {
    let app = FakeApp::start().await;
    let mut gate = GateBuilder::new(&app.url()).shutdown_delay("2s").start().await;
    let http = gate.client();
    assert_eq!(gate.admin_get("/readyz").await.0, 200);
    gate.begin_shutdown();
    let mut ready = 200;
    for _ in 0..50 {
        ready = gate.admin_get("/readyz").await.0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503);
    let r = http.get(gate.url("/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200, "still serving during shutdown_delay");
    assert_eq!(r.headers()["connection"], "close", "HTTP/1 clients are asked to reconnect elsewhere");
    let fresh = gate.client();
    assert_eq!(fresh.get(gate.url("/echo")).send().await.unwrap().status(), 200, "new connections accepted");
    assert!(metric(&gate.metrics().await, "chatkit_gate_draining", &[]) == 1.0);
    gate.join().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster failover.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_master_killed_under_load_gives_no_error_but_429_and_comes_back_to_redis() {
    let mut cluster = tokio::task::spawn_blocking(common::redis::RedisCluster::start_with_replicas).await.unwrap();
    let app = FakeApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    let users = 40;
    for u in 0..users {
        idp.add_user(&format!("tok-{u}"), &format!("u-{u}"), "User", "u@example.com");
    }
    let nodes = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let extra = format!(
        "cache_ttl = \"60s\"\n[[routes]]\nname = \"limited\"\npath = \"/limited/\"\nauth = \"required\"\n\
         rate_limit = [\"per_user\"]\n[rate_limit]\nredis_cluster = [{nodes}]\nredis_timeout = \"200ms\"\n\
         on_store_error = \"local\"\n[rate_limit.policies.per_user]\nalgorithm = \"sliding_window\"\nlimit = 4\n\
         window = \"2s\"\nkey = \"user\""
    );
    let gate = gate_with_auth(&app, &idp.url(), &extra).await;
    let http = gate.client();
    let redis_decisions = |m: &str| {
        metric(m, "chatkit_gate_rate_limit_decisions_total", &[("decision", "allowed"), ("source", "redis")])
            + metric(m, "chatkit_gate_rate_limit_decisions_total", &[("decision", "limited"), ("source", "redis")])
    };

    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (http, stop, statuses, url) = (http.clone(), stop.clone(), statuses.clone(), gate.url("/limited/x"));
        tasks.push(tokio::spawn(async move {
            for i in 0..1_000_000usize {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let token = format!("tok-{}", (i * 4 + w) % users);
                let status = match http.get(&url).header("cookie", format!("session={token}")).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = redis_decisions(&gate.metrics().await);
    assert!(before > 0.0, "decisions come from redis before the failover");
    let master = cluster.masters()[0];
    cluster.kill_node(master);
    // The replica takes over (node timeout 1 s); bounded wait.
    let mut promoted = false;
    for _ in 0..150 {
        if cluster.masters().len() == 3 && cluster.is_ok() {
            promoted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(promoted, "a replica was promoted within 15 s");
    // Keep the load on until the gate decides on Redis again (bounded), then a little more.
    let mut back = false;
    for _ in 0..150 {
        let m = gate.metrics().await;
        let now = redis_decisions(&m);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let later = redis_decisions(&gate.metrics().await);
        if metric(&m, "chatkit_gate_rate_limit_store_degraded", &[]) == 0.0 && later > now + 20.0 {
            back = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    let m = gate.metrics().await;
    eprintln!(
        "statuses over the failover: {statuses:?}; decisions local {} redis {}; redis errors {}",
        metric(&m, "chatkit_gate_rate_limit_decisions_total", &[("decision", "allowed"), ("source", "local")])
            + metric(&m, "chatkit_gate_rate_limit_decisions_total", &[("decision", "limited"), ("source", "local")]),
        redis_decisions(&m),
        metric(&m, "chatkit_gate_redis_errors_total", &[]),
    );
    assert!(back, "decisions come from redis again after the failover");
    assert!(statuses.keys().all(|s| *s == 200 || *s == 429), "only 200 and 429: {statuses:?}");
    assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "the limits were enforced throughout");
}

// ---------------------------------------------------------------------------------------------
// ChatKit API pool: a mint POST is never sent twice.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chatkit_mint_on_a_reused_connection_that_fails_is_not_replayed() {
    let expires = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let api = FlakyServer::start(&format!(
        r#"{{"id":"cksess_1","object":"chatkit.session","client_secret":"ek_test_1","expires_at":{expires},"status":"active"}}"#
    ))
    .await;
    let idp = FakeIntrospection::start("session").await;
    idp.add_user("alice", "u-alice", "Alice", "a@example.com");
    let app = FakeApp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-test-resilience\n").unwrap();
    let rest = format!(
        "[auth]\nintrospection_url = \"{}\"\ncookies = [\"session\"]\n[chatkit]\napi_key_file = {:?}\n\
         api_base = \"{}/v1\"\nworkflow_id = \"wf_test\"\n[log]\nlevel = \"warn\"\n",
        idp.url(),
        key.display().to_string(),
        api.url()
    );
    let gate = GateBuilder::new(&app.url()).rest(&rest).start().await;
    let http = gate.client();
    let mint = || http.post(gate.url("/api/chatkit/session")).header("cookie", "session=alice").send();
    assert_eq!(mint().await.unwrap().status(), 200, "first mint on a new connection");
    let second = mint().await.unwrap();
    let posts = api.seen().into_iter().filter(|s| s.method == "POST").count();
    assert_eq!(posts, 2, "the POST that met a closed pooled connection was not sent again");
    assert_eq!(second.status(), 502, "reported as a failed mint, never a second session");
    assert_eq!(metric(&gate.metrics().await, "chatkit_gate_upstream_retries_total", &[]), 0.0);
}

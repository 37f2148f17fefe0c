//! The security suite: every request the gate forwards is one the app can trust. Attacks are
//! sent over raw TLS sockets and raw HTTP/2 frames (the `h2` crate) to a real gate in front of
//! a deliberately permissive app (WSGI-style header names, `new URL()`-style paths, a 101 for
//! any Upgrade); each test asserts what the *app received*, not only the status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::certs;
use common::gate::{GateBuilder, TestGate};
use common::introspection::FakeIntrospection;
use common::permissive_app::{PermissiveApp, resolve};
use common::upstream::FakeApp;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = r#"
[[routes]]
path = "/login"
auth = "public"
[[routes]]
path = "/public/"
auth = "public"
[[routes]]
name = "api"
path = "/api/"
auth = "required"
unauthenticated = "json"
"#;

const ALICE: &str = "session=alice-token";

struct World {
    app: PermissiveApp,
    idp: FakeIntrospection,
    gate: TestGate,
}

async fn world(server: &str) -> World {
    let app = PermissiveApp::start().await;
    let idp = FakeIntrospection::start("session").await;
    idp.add_user("alice-token", "u-alice", "Alice", "alice@example.com");
    let rest = format!(
        "[auth]\nintrospection_url = \"{}\"\ncookies = [\"session\"]\ncache_ttl = \"0s\"\n{ROUTES}\n[log]\nlevel = \"warn\"\n",
        idp.url()
    );
    let gate = GateBuilder::new(&app.url()).server(server).rest(&rest).start().await;
    World { app, idp, gate }
}

/// Send raw bytes over TLS (HTTP/1.1) and read one answer: until the gate closes, or the head
/// and `Content-Length` bytes of body have arrived.
async fn raw(gate: &TestGate, request: &[u8]) -> String {
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    let _ = tls.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end].lines().find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if len.is_some_and(|len| buf.len() >= end + 4 + len) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// An HTTP/2 connection to the gate, driven with raw frames.
async fn h2_client(gate: &TestGate) -> h2::client::SendRequest<Bytes> {
    let tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["h2"]).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

/// One HTTP/2 request without a body; the status, or 0 when the stream or connection failed.
async fn h2_get(gate: &TestGate, req: http::Request<()>) -> u16 {
    let mut client = h2_client(gate).await;
    let Ok((resp, _)) = client.send_request(req, true) else { return 0 };
    match tokio::time::timeout(Duration::from_secs(5), resp).await {
        Ok(Ok(r)) => r.status().as_u16(),
        _ => 0,
    }
}

fn h2_req(gate: &TestGate, path: &str) -> http::request::Builder {
    http::Request::builder().uri(format!("https://localhost:{}{path}", gate.https.port()))
}

/// A path as the permissive app's most trusting reading of it would route it.
fn route_of(path: &str) -> &'static str {
    let under = |p: &str, prefix: &str| p == prefix || p.starts_with(&format!("{prefix}/"));
    if under(path, "/login") || path.starts_with("/public/") { "public" } else { "protected" }
}

// 1. Upgrade tunnels ---------------------------------------------------------------------------

#[tokio::test]
async fn h2c_upgrade_on_a_public_route_is_never_tunnelled() {
    let w = world("").await;
    let mut tls = certs::tls_connect(w.gate.https, "localhost", &w.gate.ca_pem, &["http/1.1"]).await.unwrap();
    tls.write_all(
        b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "no switch to h2c: {head}");
    // What would have been HTTP/2 to the app, asking for a protected path with a forged identity.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /api/secret x-auth-request-user: admin").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = w.app.last();
    assert_eq!(seen.env("upgrade"), None, "the app never saw the Upgrade");
    assert_eq!(seen.env("http2-settings"), None, "the Connection-named header was removed");
    assert!(w.app.tunnelled().is_empty(), "nothing was tunnelled to the app");
    assert!(w.app.seen().iter().all(|s| !s.url_path.starts_with("/api")), "{:?}", w.app.seen());
}

#[tokio::test]
async fn upgrades_outside_the_allow_list_or_answered_with_another_protocol_are_refused() {
    let w = world("").await;
    // Not in server.upgrades (default ["websocket"]): forwarded as a plain request.
    let a =
        raw(&w.gate, b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade, close\r\nUpgrade: foo/1\r\n\r\n")
            .await;
    assert_eq!(status_of(&a), 200, "{a}");
    assert_eq!(w.app.last().env("upgrade"), None);
    // WebSocket asked, the app switches to something else: 502, no tunnel.
    w.app.switch_to("h2c");
    let a = raw(
        &w.gate,
        b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nafter-101-bytes",
    )
    .await;
    assert_eq!(status_of(&a), 502, "{a}");
    assert_eq!(w.app.last().env("upgrade"), Some("websocket"));
    assert!(w.app.tunnelled().is_empty(), "no bytes reached the app through a tunnel");
}

#[tokio::test]
async fn an_upgrade_on_a_protected_route_still_needs_a_session() {
    let w = world("").await;
    let a =
        raw(&w.gate, b"GET /api/ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await;
    assert_eq!(status_of(&a), 401, "{a}");
    assert_eq!(w.app.count(), 0);
}

// 2. Paths: routed and forwarded the same ------------------------------------------------------

const PATH_ATTACKS: &[&str] = &[
    "/login/../api/x",
    "/login/%2e%2e/api/x",
    "/login/.%2e/api/x",
    "/login/%2E%2E/api/x",
    "/public/..%2fapi/x",
    "/public/..%2Fapi/x",
    "/public/%2e%2e%2fapi/x",
    "/public/..%5capi/x",
    "/public/%252e%252e/api/x",
    "/public/./../api/x",
    "/login/..;/api/x",
    "/login;x/../api/x",
    "/loginx/../api/x",
    "//api/x",
    "/public//../api/x",
    "/login%00/../api/x",
    "/%6cogin/../api/x",
    "/public/../../api/x",
];

/// Nothing protected reached the app without an identity, and what reached it is normalised.
fn assert_app_trusts(w: &World, target: &str, status: u16) {
    for seen in w.app.seen() {
        let forwarded = seen.target.split('?').next().unwrap();
        assert_eq!(forwarded, resolve(forwarded), "{target}: forwarded path has dot segments: {forwarded}");
        for bad in ["%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\"] {
            assert!(!forwarded.contains(bad), "{target}: forwarded {forwarded}");
        }
        assert_eq!(seen.url_path, forwarded, "{target}: a URL router reads another path");
        if route_of(&seen.decoded_path) == "protected" || route_of(&seen.url_path) == "protected" {
            assert_eq!(seen.env("x-auth-request-user"), Some("u-alice"), "{target}: protected without identity");
        }
    }
    assert!(matches!(status, 200 | 400 | 401), "{target}: {status}");
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_never_reach_a_protected_handler() {
    let w = world("").await;
    let port = w.gate.https.port();
    for target in PATH_ATTACKS {
        // Origin form, absolute form, and HTTP/2 :path.
        let a =
            raw(&w.gate, format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
        assert_app_trusts(&w, target, status_of(&a));
        let a = raw(
            &w.gate,
            format!("GET https://localhost:{port}{target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_app_trusts(&w, target, status_of(&a));
        let status = match http::Uri::try_from(format!("https://localhost:{port}{target}")) {
            Ok(uri) => h2_get(&w.gate, http::Request::builder().uri(uri).body(()).unwrap()).await,
            Err(_) => 400,
        };
        assert_app_trusts(&w, target, status);
    }
    // The resolved path is what a signed-in request reaches, and what the app is told.
    let a = raw(
        &w.gate,
        format!("GET /login/../api/x HTTP/1.1\r\nHost: localhost\r\nCookie: {ALICE}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&a), 200, "{a}");
    let seen = w.app.last();
    assert_eq!((seen.target.as_str(), seen.env("x-auth-request-user")), ("/api/x", Some("u-alice")));
    // Encoded separators are refused outright.
    let a = raw(&w.gate, b"GET /public/..%2fapi/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&a), 400, "{a}");
    assert!(a.ends_with(r#"{"error":"Bad request"}"#), "{a}");
}

#[tokio::test]
async fn route_prefixes_match_on_segment_boundaries() {
    let w = world("").await;
    for (path, status) in
        [("/login", 200), ("/login/x", 200), ("/login?next=1", 200), ("/loginx", 401), ("/login-admin", 401)]
    {
        let a = raw(&w.gate, format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
        assert_eq!(status_of(&a), status, "{path}: {a}");
    }
    assert_eq!(w.app.count(), 3);
}

// 3. Underscore copies of identity headers ------------------------------------------------------

#[tokio::test]
async fn underscore_identity_headers_never_reach_a_wsgi_app() {
    let w = world("").await;
    for path in ["/login", "/api/x"] {
        let a = raw(
            &w.gate,
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {ALICE}\r\nx_auth_request_user: admin\r\nX_Auth_Request_Email: admin@evil\r\nx-auth-request_user: admin\r\nx_forwarded_for: 6.6.6.6\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&a), 200, "{path}: {a}");
        let seen = w.app.last();
        let expected = if path == "/login" { None } else { Some("u-alice") };
        assert_eq!(seen.env("x-auth-request-user"), expected, "{path}: {:?}", seen.environ);
        assert_eq!(seen.env("x-auth-request-email"), expected.map(|_| "alice@example.com"), "{path}");
        assert_eq!(seen.env("x-forwarded-for"), Some("127.0.0.1"), "{path}");
    }
    // Same over HTTP/2.
    let mut client = h2_client(&w.gate).await;
    let req = h2_req(&w.gate, "/login").header("x_auth_request_user", "admin").body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(w.app.last().env("x-auth-request-user"), None);
}

#[tokio::test]
async fn underscore_headers_can_be_allowed_but_owned_names_still_go() {
    let w = world("allow_underscore_headers = true").await;
    let a = raw(
        &w.gate,
        b"GET /login HTTP/1.1\r\nHost: localhost\r\nx_custom_thing: kept\r\nx_auth_request_user: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&a), 200, "{a}");
    let seen = w.app.last();
    assert_eq!(seen.env("x-custom-thing"), Some("kept"));
    assert_eq!(seen.env("x-auth-request-user"), None);
}

// 4. Connection cannot remove the gate's headers -------------------------------------------------

#[tokio::test]
async fn connection_header_cannot_delete_identity_or_forwarding_headers() {
    let w = world("").await;
    let a = raw(
        &w.gate,
        format!("GET /api/x HTTP/1.1\r\nHost: localhost\r\nCookie: {ALICE}\r\nConnection: x-auth-request-user, x-forwarded-for, x-request-id, x-forwarded-proto, host, close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&a), 200, "{a}");
    let seen = w.app.last();
    assert_eq!(seen.env("x-auth-request-user"), Some("u-alice"));
    assert_eq!(seen.env("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.env("x-forwarded-proto"), Some("https"));
    assert!(seen.env("x-request-id").is_some());
    assert_eq!(seen.host.as_deref(), Some("localhost"));
}

// 5. Host ------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_repeated_or_malformed_host_is_refused() {
    let w = world("").await;
    for req in [
        "GET /login HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /login HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        "GET /login HTTP/1.1\r\nHost: a/evil\r\nConnection: close\r\n\r\n",
        "GET /login HTTP/1.1\r\nHost: user@evil\r\nConnection: close\r\n\r\n",
        "GET /login HTTP/1.1\r\nHost: localhost:99999\r\nConnection: close\r\n\r\n",
    ] {
        let a = raw(&w.gate, req.as_bytes()).await;
        assert_eq!(status_of(&a), 400, "{req:?}: {a}");
    }
    // HTTP/2: a `host` contradicting :authority.
    let req = h2_req(&w.gate, "/login").header("host", "evil.example").body(()).unwrap();
    assert_eq!(h2_get(&w.gate, req).await, 400);
    assert_eq!(w.app.count(), 0, "{:?}", w.app.seen());
    // Agreeing values are fine, and the app gets that host.
    let req = h2_req(&w.gate, "/login").header("host", format!("localhost:{}", w.gate.https.port())).body(()).unwrap();
    assert_eq!(h2_get(&w.gate, req).await, 200);
    assert_eq!(w.app.last().host, Some(format!("localhost:{}", w.gate.https.port())));
}

#[tokio::test]
async fn with_hosts_set_other_hosts_get_421_and_the_app_sees_only_the_validated_host() {
    let w = world("hosts = [\"app.example.com\"]").await;
    let a = raw(&w.gate, b"GET /login HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&a), 421, "{a}");
    assert!(a.ends_with(r#"{"error":"Misdirected request"}"#), "{a}");
    let req = h2_req(&w.gate, "/login").body(()).unwrap(); // :authority localhost:port
    assert_eq!(h2_get(&w.gate, req).await, 421);
    assert_eq!(w.app.count(), 0);
    let a = raw(
        &w.gate,
        b"GET /login HTTP/1.1\r\nHost: APP.example.com:8443\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&a), 200, "{a}");
    let seen = w.app.last();
    assert_eq!(seen.host.as_deref(), Some("APP.example.com:8443"));
    assert_eq!(seen.env("x-forwarded-host"), Some("APP.example.com:8443"));
}

// 6. HTTP/2 cookie crumbs ----------------------------------------------------------------------------

#[tokio::test]
async fn http2_cookie_fields_reach_app_and_introspection_as_one_header() {
    let w = world("").await;
    let mut client = h2_client(&w.gate).await;
    let req = h2_req(&w.gate, "/api/x").header("cookie", "theme=dark").header("cookie", ALICE).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200, "the session cookie in the second crumb was found");
    let seen = w.app.last();
    assert_eq!(seen.cookie_fields, 1);
    assert_eq!(seen.env("cookie"), Some("theme=dark; session=alice-token"));
    assert_eq!(w.idp.last().headers.get_all("cookie").iter().count(), 1);
}

// 7. Client-IP and URL-override headers ----------------------------------------------------------------

#[tokio::test]
async fn client_ip_and_url_override_headers_from_untrusted_peers_are_removed() {
    let w = world("").await;
    let a = raw(
        &w.gate,
        b"GET /login HTTP/1.1\r\nHost: localhost\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nX-Original-URL: /api/admin\r\nX-Rewrite-URL: /api/admin\r\nProxy: http://evil.example:3128\r\nX-Original-Method: DELETE\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&a), 200, "{a}");
    let seen = w.app.last();
    for h in [
        "forwarded",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "proxy",
        "x-original-method",
    ] {
        assert_eq!(seen.env(h), None, "{h} reached the app");
    }
}

// 8. CONNECT -------------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_is_refused_with_405() {
    let w = world("").await;
    let a = raw(&w.gate, b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n").await;
    assert_eq!(status_of(&a), 405, "{a}");
    assert_eq!(w.app.count(), 0);
}

// 9. Resource bounds ---------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_listener_caps_connections_and_times_out_slow_headers() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url())
        .server("header_timeout = \"1s\"")
        .rest("max_connections = 8 # [admin]\n")
        .start()
        .await;
    // Fill it with half-sent requests.
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(gate.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed_at_once = 0;
    for s in &mut held {
        let mut b = [0u8; 1];
        // Closed (EOF, or a reset because our half-request was unread): not held open.
        if matches!(tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await, Ok(Ok(0) | Err(_))) {
            closed_at_once += 1;
        }
    }
    assert!(closed_at_once >= 32, "only {closed_at_once} of 40 refused past a cap of 8");
    // The held ones are cut by the header timeout; /healthz answers again after it.
    let started = Instant::now();
    loop {
        let ok =
            tokio::time::timeout(Duration::from_millis(500), common::gate::admin_get(gate.admin, "/healthz")).await;
        if matches!(ok, Ok((200, _))) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "/healthz did not recover");
    }
    assert!(gate.metrics().await.contains("chatkit_gate_admin_connections_refused_total"));
}

#[tokio::test]
async fn websocket_tunnels_hold_their_connection_slot_and_close_when_idle() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("max_connections = 1\nidle_timeout = \"1500ms\"").start().await;
    let tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    let url = format!("wss://localhost:{}/ws", gate.https.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi")).await.unwrap();
    assert!(ws.next().await.unwrap().unwrap().is_text());
    // The tunnel holds the only slot: a new connection is not even handshaken.
    let second = tokio::time::timeout(
        Duration::from_millis(700),
        certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]),
    )
    .await;
    assert!(second.is_err(), "a second connection was accepted while the tunnel held the slot");
    // No traffic for idle_timeout: the gate closes the tunnel.
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("tunnel still open after 5s");
    assert!(!matches!(&end, Some(Ok(m)) if m.is_text()), "{end:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // And the slot is free again.
    let r = tokio::time::timeout(Duration::from_secs(5), gate.client().get(gate.url("/")).send()).await;
    assert_eq!(r.unwrap().unwrap().status(), 200);
}

// 10. Keep-alive waits honour idle_timeout, heads honour header_timeout ------------------------------

#[tokio::test]
async fn keep_alive_connections_wait_idle_timeout_not_header_timeout() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("header_timeout = \"500ms\"\nidle_timeout = \"5s\"").start().await;
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..2 {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "request {i} on one connection");
        // Longer than header_timeout, shorter than idle_timeout.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // A head started but not finished is still cut at header_timeout.
    tls.write_all(b"GET / HTTP/1.1\r\nHost: local").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(4), tls.read_to_end(&mut rest)).await.expect("cut off");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(app.count(), 2);
}

// 14. Early answers arrive ---------------------------------------------------------------------------------

#[tokio::test]
async fn oversize_headers_get_their_431_every_time_on_both_protocols() {
    let w = world("").await;
    // A client still sending its (200 KiB) head when the gate answers, like curl: the answer must
    // not be lost to a reset.
    let big = "Zq9~".repeat(50 * 1024);
    let mut h1 = 0;
    for _ in 0..10 {
        let tls = certs::tls_connect(w.gate.https, "localhost", &w.gate.ca_pem, &["http/1.1"]).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(tls);
        let request = format!("GET /login HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n").into_bytes();
        let writer = tokio::spawn(async move {
            for chunk in request.chunks(8 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut buf)).await;
        writer.abort();
        if String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 431") {
            h1 += 1;
        }
    }
    let mut h2 = 0;
    for _ in 0..5 {
        let req = h2_req(&w.gate, "/login").header("x-big", big.as_str()).body(()).unwrap();
        if h2_get(&w.gate, req).await == 431 {
            h2 += 1;
        }
    }
    assert_eq!((h1, h2), (10, 5), "431 answers that arrived, HTTP/1.1 and HTTP/2");
    assert_eq!(w.app.count(), 0);
}

#[tokio::test]
async fn a_signed_out_http2_upload_gets_its_401_without_a_reset() {
    let w = world("").await;
    let mut clean = 0;
    for _ in 0..5 {
        let mut client = h2_client(&w.gate).await;
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://localhost:{}/api/upload", w.gate.https.port()))
            .header("content-length", (8 << 20).to_string())
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        let upload = tokio::spawn(async move {
            let mut left = 8usize << 20;
            while left > 0 {
                send.reserve_capacity(left.min(1 << 16));
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(n)) if n > 0 => {
                        let n = n.min(left);
                        left -= n;
                        if send.send_data(Bytes::from(vec![b'x'; n]), left == 0).is_err() {
                            return false;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return false,
                }
            }
            true
        });
        let status = tokio::time::timeout(Duration::from_secs(10), resp).await.unwrap().map(|r| r.status().as_u16());
        let uploaded = tokio::time::timeout(Duration::from_secs(10), upload).await.unwrap().unwrap();
        if status.as_ref().ok() == Some(&401) && uploaded {
            clean += 1;
        }
    }
    assert_eq!(clean, 5, "401s received with the upload finished (no RST_STREAM)");
    assert_eq!(w.app.count(), 0);
}

// Property: the route decided is the route of the path forwarded -----------------------------------

mod property {
    use chatkit_gate::http::path::normalize_path;
    use chatkit_gate::request::routes::RouteTable;
    use proptest::prelude::*;

    use super::common::permissive_app::resolve;

    fn table() -> RouteTable {
        let config = chatkit_gate::Config::from_toml(&format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n[auth]\nintrospection_url = \"http://127.0.0.1:3000/s\"\n{}",
            super::ROUTES
        ))
        .unwrap();
        RouteTable::new(&config)
    }

    fn percent_decode(s: &str) -> String {
        let mut out = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn segment() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "login", "public", "api", "x", "loginx", ".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "", ";",
            "a;b", "..;", ".;x", "%41", "%7e", "%6cogin", "%25", "%252e", "~", "%00", "a%20b",
        ])
        .prop_map(String::from)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
        #[test]
        fn route_decided_is_route_of_forwarded_path(segs in prop::collection::vec(segment(), 0..7), tail in prop::sample::select(vec!["", "?q=1", "?a=/../api", "#frag", "?x=%2e"])) {
            let target = format!("/{}{}", segs.join("/"), tail);
            let Ok(uri) = target.parse::<http::Uri>() else { return Ok(()) };
            let t = table();
            if let Ok(path) = normalize_path(uri.path()) {
                // No dot segment, no encoded separator in what is forwarded.
                prop_assert_eq!(resolve(&path), path.to_string());
                let lower = path.to_ascii_lowercase();
                for bad in ["%2e", "%2f", "%5c", "%00", "\\", "//"] {
                    prop_assert!(!lower.contains(bad), "{} -> {}", target, path);
                }
                // Every reading of the forwarded path lands on the route the gate chose.
                let decided = t.find(&path).name.clone();
                for reading in [resolve(&path.replace("%2e", ".")), resolve(&percent_decode(&path))] {
                    if let Ok(p) = normalize_path(&reading) {
                        prop_assert_eq!(&t.find(&p).name, &decided, "{} forwarded as {} read as {}", target, path, reading);
                    }
                }
            }
        }
    }
}

// 13. A stalled log output never stalls requests ---------------------------------------------------

#[test]
fn a_stalled_stdout_drops_log_lines_instead_of_blocking_requests() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    // One access line per request at info; stdout is a pipe nobody reads (64 KiB, then it is
    // full), so the writer's queue (LOG_BUFFER_LINES) fills and must drop.
    let gate = GateBuilder::new(&app.url()).rest("[log]\nlevel = \"info\"\n").spawn_process_stdout_stalled();
    let lines = chatkit_gate::cli::LOG_BUFFER_LINES + 2000;
    let client = gate.client();
    let url = gate.url("/");
    let ok = rt.block_on(async move {
        let mut ok = 0usize;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                for _ in 0..lines / 4 {
                    if client.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                        n += 1;
                    }
                }
                n
            }));
        }
        for t in tasks {
            ok += t.await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(120));
        ok
    });
    assert_eq!(ok, lines / 4 * 4, "every request answered while stdout was stalled");
    let (status, metrics) = rt.block_on(common::gate::admin_get(gate.admin, "/metrics"));
    assert_eq!(status, 200);
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("chatkit_gate_log_lines_dropped_total"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap());
    assert!(dropped > 0.0, "dropped lines are counted: {dropped}");
}

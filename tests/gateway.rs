//! The gateway core, end to end: real sockets, real TLS, a real app behind the gate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::certs;
use common::gate::GateBuilder;
use common::upstream::FakeApp;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn https_get_reaches_the_app_over_http1_and_http2() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;

    let r = gate.client().get(gate.url("/status/201")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.headers()["strict-transport-security"], "max-age=31536000; includeSubDomains");
    assert_eq!(r.text().await.unwrap(), "status 201");

    let r = gate.client_h2().get(gate.url("/hello?x=1")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello from app");
    let seen = app.last();
    assert_eq!(seen.uri, "/hello?x=1");
    // The app gets the host the client asked for, from :authority.
    assert_eq!(seen.headers["host"], format!("127.0.0.1:{}", gate.https.port()));
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_removed() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let r = gate
        .client()
        .get(gate.url("/echo"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "secret")
        .header("x-request-id", "client-req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-req-1");
    let seen = app.last();
    // Untrusted peer: its X-Forwarded-For is not believed.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-host"], format!("127.0.0.1:{}", gate.https.port()));
    assert_eq!(seen.headers["x-request-id"], "client-req-1");
    assert!(!seen.headers.contains_key("x-client-hop"));

    let r = gate.client().get(gate.url("/hop")).send().await.unwrap();
    assert!(!r.headers().contains_key("x-app-hop"));
    assert!(!r.headers().contains_key("keep-alive"));
}

#[tokio::test]
async fn app_hsts_header_is_kept() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let r = gate.client().get(gate.url("/own-hsts")).send().await.unwrap();
    assert_eq!(r.headers()["strict-transport-security"], "max-age=60");
}

#[tokio::test]
async fn sse_events_arrive_before_the_app_finishes() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let r = gate.client().get(gate.url("/sse")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    // The app holds event two back until we have seen event one: if the gate buffered the
    // stream, this would time out.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("first event in time");
    assert_eq!(&first.unwrap().unwrap()[..], b"data: one\n\n");
    app.release_sse();
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap();
    assert_eq!(&second.unwrap().unwrap()[..], b"data: two\n\n");
    assert!(tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn large_upload_streams_through() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let chunks = futures_util::stream::iter((0..TOTAL / CHUNK).map(|_| Ok::<_, std::io::Error>(vec![7u8; CHUNK])));
    let r = gate
        .client()
        .post(gate.url("/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["bytes"], TOTAL);
    // Streamed in pieces, never as one 100 MB body.
    assert!(v["largest_chunk"].as_u64().unwrap() < 4 * 1024 * 1024, "{v}");
}

#[tokio::test]
async fn websocket_echo_round_trips_through_the_gate() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    let url = format!("wss://localhost:{}/ws", gate.https.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    for msg in ["hello", "second message"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg)).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), msg);
    }
    let seen = app.last();
    assert_eq!(seen.uri, "/ws");
    assert_eq!(seen.headers["upgrade"], "websocket");
}

#[tokio::test]
async fn plain_http_get_redirects_and_post_is_refused() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("https_port = 8443").redirect_listener().start().await;
    let client = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = client.get(gate.plain_url("/a/b?q=1&x=y")).header("host", "app.example.com:8080").send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://app.example.com:8443/a/b?q=1&x=y");
    let r = client.post(gate.plain_url("/login")).body("password=hunter2").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"HTTPS required"}"#);
    assert_eq!(app.count(), 0, "nothing from the plain listener reached the app");
}

#[tokio::test]
async fn trusted_proxy_with_forwarded_https_is_served_untrusted_is_not() {
    let app = FakeApp::start().await;
    let client = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let trusted =
        GateBuilder::new(&app.url()).server("trusted_proxies = [\"127.0.0.1/32\"]").redirect_listener().start().await;
    let r = client
        .get(trusted.plain_url("/echo"))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-for", "198.51.100.7, 127.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["strict-transport-security"], "max-age=31536000; includeSubDomains");
    let seen = app.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.7, 127.0.0.1, 127.0.0.1");

    let untrusted =
        GateBuilder::new(&app.url()).server("trusted_proxies = [\"10.0.0.0/8\"]").redirect_listener().start().await;
    let before = app.count();
    let r = client.get(untrusted.plain_url("/echo")).header("x-forwarded-proto", "https").send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(app.count(), before);
}

#[tokio::test]
async fn upstream_down_is_502_within_connect_timeout() {
    let port = common::gate::free_port();
    let gate = GateBuilder::new(&format!("http://{port}")).upstream("connect_timeout = \"500ms\"").start().await;
    let started = Instant::now();
    let r = gate.client().get(gate.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"Upstream unavailable"}"#);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(gate.metrics().await.contains("chatkit_gate_upstream_errors_total{kind=\"connect\"} 1"));
}

#[tokio::test]
async fn upstream_hanging_is_504_after_timeout() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).upstream("timeout = \"700ms\"").start().await;
    let started = Instant::now();
    let r = gate.client().get(gate.url("/hang")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"Upstream timed out"}"#);
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn slow_headers_are_cut_off_after_header_timeout() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("header_timeout = \"1s\"").start().await;
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The gate must close the connection; we never finish the headers.
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "connection still open after 5s");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(app.count(), 0);
}

#[tokio::test]
async fn oversize_headers_get_431() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    let big = "a".repeat(64 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    let _ = tls.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await.expect("answered, not hung");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(app.count(), 0);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("idle_timeout = \"500ms\"").start().await;
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Keep-alive, no further request (header_timeout is the default 10s): closed by idle_timeout.
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "idle connection still open after 5s");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
}

#[tokio::test]
async fn replaced_certificate_is_served_and_a_broken_one_is_ignored() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).tls("reload_interval = \"100ms\"").start().await;
    let first = certs::peer_cert_der(gate.https, &gate.ca_pem).await;
    assert_eq!(first, gate.pki.leaf().cert_der);

    let second = gate.pki.leaf_with_cn("rotated.localhost");
    second.write_to(gate.dir.path());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if certs::peer_cert_der(gate.https, &gate.ca_pem).await == second.cert_der {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate not served within 5s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    std::fs::write(&gate.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gate.metrics().await.contains("chatkit_gate_tls_reloads_total{result=\"error\"} 1") {
        assert!(Instant::now() < deadline, "broken certificate never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(certs::peer_cert_der(gate.https, &gate.ca_pem).await, second.cert_der);
    let r = gate.client().get(gate.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_requests_by_route_and_status() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url())
        .rest("[[routes]]\nname = \"api\"\npath = \"/api/\"\nauth = \"public\"\n")
        .start()
        .await;
    let client = gate.client();
    for _ in 0..3 {
        client.get(gate.url("/api/x")).send().await.unwrap();
    }
    client.get(gate.url("/status/404")).send().await.unwrap();
    let (status, text) = gate.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("chatkit_gate_http_requests_total{method=\"GET\",route=\"api\",status=\"200\"} 3"), "{text}");
    assert!(text.contains("chatkit_gate_http_requests_total{method=\"GET\",route=\"default\",status=\"404\"} 1"));
    assert!(text.contains("chatkit_gate_build_info{version=\""));
    assert!(text.contains("chatkit_gate_tls_cert_expiry_timestamp_seconds "));
    assert!(text.contains("process_resident_memory_bytes"));

    common::promtool_accepts(&text);
}

#[tokio::test]
async fn readyz_and_healthz_answer_on_the_admin_port_only() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    assert_eq!(gate.admin_get("/healthz").await.0, 200);
    assert_eq!(gate.admin_get("/readyz").await.0, 200);
    // The public port proxies /metrics to the app like any other path.
    let r = gate.client().get(gate.url("/metrics")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello from app");
}

#[tokio::test]
async fn in_process_shutdown_drains_an_in_flight_request() {
    let app = FakeApp::start().await;
    let mut gate = GateBuilder::new(&app.url()).server("shutdown_grace = \"5s\"").start().await;
    let client = gate.client();
    let url = gate.url("/slow?ms=800");
    let req = tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(common::gate::admin_get(gate.admin, "/readyz").await.0, 503);
    assert_eq!(req.await.unwrap(), "slow done");
    let https = gate.https;
    gate.join().await.unwrap();
    assert!(tokio::net::TcpStream::connect(https).await.is_err(), "still accepting after shutdown");
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    let mut gate = GateBuilder::new(&app.url()).server("shutdown_grace = \"10s\"").spawn_process();
    let client = gate.client();
    slow_request_finishes_through_sigterm(&rt, &mut gate, client);
    let logs = gate.logs();
    assert!(logs.contains("shutdown requested"), "{logs}");
    // One access-log line per request, JSON, with the fields operators grep for.
    let line = logs.lines().find(|l| l.contains("\"route\":\"default\"")).expect("access log line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    for key in ["method", "route", "status", "duration_ms", "request_id", "client_ip"] {
        assert!(v.get(key).is_some(), "access log lacks {key}: {line}");
    }
}

/// A 1.5 s request is in flight when the process gets SIGTERM: it is answered whole, and the
/// process then exits 0.
fn slow_request_finishes_through_sigterm(
    rt: &tokio::runtime::Runtime,
    gate: &mut common::gate::GateProcess,
    client: reqwest::Client,
) {
    let url = gate.url("/slow?ms=1500");
    let req = rt.spawn(async move {
        let r = client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    std::thread::sleep(Duration::from_millis(400));
    gate.signal("TERM");
    let (status, body) = rt.block_on(req).unwrap();
    assert_eq!((status, body.as_str()), (200, "slow done"));
    let exit = gate.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "exit {exit:?}; log:\n{}", gate.logs());
}

/// Run the binary with `args` before `--config` (a file holding `text`) and `env` set; the exit
/// code and what it printed to stderr.
fn run_binary(args: &[&str], text: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatkit-gate"))
        .args(args)
        .args(["--config", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Run `chatkit-gate check` on a config text; the exit code and what it printed to stderr.
fn run_check(text: &str) -> (Option<i32>, String) {
    run_binary(&["check"], text, &[])
}

#[test]
fn check_names_every_bad_key_and_exits_1() {
    let (code, stderr) = run_check(
        "[server]\nlisten = \"127.0.0.1:8443\"\nheader_timeout = \"ten seconds\"\nlisten_port = 9\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("server.listen_port: unknown key"), "{stderr}");
    assert!(stderr.contains("server.header_timeout: invalid duration"), "{stderr}");
}

#[test]
fn check_reports_missing_certificate_files() {
    let (code, stderr) = run_check(
        "[server]\nlisten = \"127.0.0.1:8443\"\n[tls]\ncert_file = \"/nonexistent/tls.crt\"\nkey_file = \"/nonexistent/tls.key\"\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("tls.cert_file: cannot read /nonexistent/tls.crt"), "{stderr}");
}

#[test]
fn check_accepts_a_valid_file() {
    let (code, stderr) = run_check(
        "[server]\nlisten = \"127.0.0.1:8443\"\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn example_config_starts_as_is() {
    // The example binds its documented ports (8443 and 8080 on all interfaces, 9090 on loopback).
    // Only when one of them is taken by something else on this machine are the three listen
    // addresses moved to free ports; every other line runs as written.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gate.log");
    let mut example = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
    let mut admin: std::net::SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let taken =
        ["0.0.0.0:8443", "0.0.0.0:8080", "127.0.0.1:9090"].iter().any(|a| std::net::TcpListener::bind(a).is_err());
    if taken {
        let (https, plain) = (common::gate::free_port(), common::gate::free_port());
        admin = common::gate::free_port();
        let text = std::fs::read_to_string(&example)
            .unwrap()
            .replace("\"0.0.0.0:8443\"", &format!("\"{https}\""))
            .replace("\"0.0.0.0:8080\"", &format!("\"{plain}\""))
            .replace("\"127.0.0.1:9090\"", &format!("\"{admin}\""));
        eprintln!("a documented port is taken on this machine; running the example on {https}, {plain}, {admin}");
        example = dir.path().join("config.example.toml");
        std::fs::write(&example, text).unwrap();
    }
    let mut child = common::gate::spawn_binary(&["--config", example.to_str().unwrap()], &log);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ready = false;
    while Instant::now() < deadline {
        if rt.block_on(common::gate::admin_get(admin, "/readyz")).0 == 200 {
            ready = true;
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited {status:?}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    // Read after exit: the log writer flushes on the way out.
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready, "example config never became ready: {logs}");
    assert!(logs.contains("chatkit-gate listening"), "something else answered /readyz: {logs}");
    assert!(logs.contains("self_signed"), "no self-signed warning: {logs}");
    assert!(status.success(), "exit {status:?}");
}

#[tokio::test]
async fn connections_past_max_connections_wait_for_a_free_slot() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).server("max_connections = 1").start().await;
    let mut first = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    first.write_all(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // The second connection is not accepted (so not handshaken) while the first is open.
    let ca = gate.ca_pem.clone();
    let addr = gate.https;
    let second = tokio::spawn(async move { certs::tls_connect(addr, "localhost", &ca, &["http/1.1"]).await.is_ok() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "second connection served past max_connections = 1");
    drop(first);
    let ok = tokio::time::timeout(Duration::from_secs(5), second).await.expect("served once a slot freed").unwrap();
    assert!(ok);
}

#[tokio::test]
async fn content_length_beside_chunked_encoding_never_reaches_the_app() {
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let mut tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
    let req = "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    if text.starts_with("HTTP/1.1 200") {
        let seen = app.last();
        assert!(!seen.headers.contains_key("content-length"), "{:?}", seen.headers);
        assert_eq!(seen.body_len, 5);
    } else {
        // Refusing the ambiguous message outright is fine too; forwarding it is not.
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert_eq!(app.count(), 0);
    }
}

#[test]
fn malformed_and_oversize_requests_are_answered_and_logged() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    let mut gate = GateBuilder::new(&app.url()).spawn_process();
    let (https, ca) = (gate.https, gate.ca_pem.clone());
    let answers = rt.block_on(async move {
        let mut out = Vec::new();
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
        for req in ["GARBAGE\r\n\r\n".to_string(), big] {
            let mut tls = certs::tls_connect(https, "localhost", &ca, &["http/1.1"]).await.unwrap();
            let _ = tls.write_all(req.as_bytes()).await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
            out.push(String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string());
        }
        out
    });
    assert_eq!(answers, ["HTTP/1.1 400 Bad Request", "HTTP/1.1 431 Request Header Fields Too Large"]);
    gate.signal("TERM");
    assert!(gate.wait_exit(Duration::from_secs(10)).success());
    let logs = gate.logs();
    assert!(logs.contains("malformed request: answered 400"), "{logs}");
    assert!(logs.contains("request headers too large: answered 431"), "{logs}");
    assert_eq!(app.count(), 0);
}

/// `server.workers = 1` runs everything on one thread (tokio's current-thread runtime): HTTP/1.1
/// and HTTP/2 are proxied, a slow request in flight at SIGTERM still finishes, and the process
/// exits 0. (The other process tests run with the default, one worker per CPU.)
#[test]
fn one_worker_serves_both_protocols_and_drains_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    let mut gate = spawn_with_workers(&app, 1);
    both_protocols_then_drain(&rt, &mut gate);
    assert_eq!(app.count(), 3);
}

/// Draining asks idle keep-alive connections to finish at once: at SIGTERM (no shutdown delay)
/// an HTTP/1.1 connection that served a request and sits idle is closed by the gate, and an
/// HTTP/2 one is sent GOAWAY and ends, long before `shutdown_grace` (10 s) would cut them; the
/// process then exits 0, before the grace too.
#[test]
fn draining_closes_idle_keep_alive_connections_at_once_not_at_the_grace_deadline() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    let mut gate = spawn_with_workers(&app, 1);
    let (mut h1, h2_ended) = rt.block_on(async {
        let mut h1 = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["http/1.1"]).await.unwrap();
        h1.write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("hello from app") {
            let n = tokio::time::timeout(Duration::from_secs(5), h1.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        let tls = certs::tls_connect(gate.https, "localhost", &gate.ca_pem, &["h2"]).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        let h2_ended = tokio::spawn(conn);
        let req = http::Request::get(gate.url("/hello")).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        let answer = send.send_request(req).await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(http_body_util::BodyExt::collect(answer.into_body()).await.unwrap().to_bytes(), "hello from app");
        (h1, h2_ended)
    });
    gate.signal("TERM");
    rt.block_on(async {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), h1.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the idle HTTP/1.1 connection was not closed within 5 s of SIGTERM");
        let ended = tokio::time::timeout(Duration::from_secs(5), h2_ended).await;
        assert!(ended.is_ok(), "the idle HTTP/2 connection did not end within 5 s of SIGTERM");
    });
    let exit = gate.wait_exit(Duration::from_secs(5));
    assert!(exit.success(), "exit {exit:?}; log:\n{}", gate.logs());
}

/// The binary with `server.workers = workers`, once its start-up line says so.
fn spawn_with_workers(app: &FakeApp, workers: usize) -> common::gate::GateProcess {
    let gate = GateBuilder::new(&app.url())
        .server(&format!("workers = {workers}\nshutdown_grace = \"10s\""))
        .shutdown_delay("0s")
        .spawn_process();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut logs = gate.logs();
    while !logs.contains("chatkit-gate listening") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20)); // lines are written in batches
        logs = gate.logs();
    }
    let listening = logs.lines().find(|l| l.contains("chatkit-gate listening")).expect("start-up line");
    assert!(listening.contains(&format!("\"workers\":{workers}")), "{listening}");
    gate
}

/// HTTP/1.1 and HTTP/2 are proxied (two requests), then a slow request in flight at SIGTERM
/// still finishes and the process exits 0 (one more).
fn both_protocols_then_drain(rt: &tokio::runtime::Runtime, gate: &mut common::gate::GateProcess) {
    let (h1, h2) = (gate.client(), gate.client_h2());
    let (a, b) = rt.block_on(async {
        let a = h1.get(gate.url("/hello")).send().await.unwrap();
        let b = h2.get(gate.url("/hello")).send().await.unwrap();
        ((a.version(), a.text().await.unwrap()), (b.version(), b.text().await.unwrap()))
    });
    assert_eq!(a, (reqwest::Version::HTTP_11, "hello from app".to_string()));
    assert_eq!(b, (reqwest::Version::HTTP_2, "hello from app".to_string()));
    slow_request_finishes_through_sigterm(rt, gate, h1);
}

/// CPU time a thread of process `pid` has run, in nanoseconds, by thread name
/// (`/proc/PID/task/TID/schedstat`).
fn thread_cpu_ns(pid: u32, name: &str) -> Option<u64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim() == name {
            return std::fs::read_to_string(dir.join("schedstat")).ok()?.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// `server.workers = 2`: a second worker thread with its own runtime accepts on the same
/// listener and serves the connections it took (its CPU time grows while clients use them;
/// every request is answered), connections are shared out between the workers; HTTP/1.1 and
/// HTTP/2 are proxied, and a slow request in flight at SIGTERM still finishes before the
/// process exits 0.
#[test]
fn a_second_worker_serves_connections_and_drains_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    let mut gate = spawn_with_workers(&app, 2);
    let pid = gate.child.id();
    // Two keep-alive connections opened together go one to each worker (the first one awake
    // would otherwise take both): each worker serves one, 50 requests. Worker 0 is the main
    // thread, named after the binary. A worker leaves a connection to the other for a moment
    // only, so a machine too busy to run the other in that moment gets up to three tries.
    let mut ran = (0, 0);
    for _ in 0..3 {
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(5);
            while common::metric_value(
                &common::gate::admin_get(gate.admin, "/metrics").await.1,
                "chatkit_gate_connections_open ",
            ) != 0.0
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let main_before = thread_cpu_ns(pid, "chatkit-gate").expect("the main thread");
        let before = thread_cpu_ns(pid, "gate-worker-1").expect("a thread named gate-worker-1");
        let served = rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..2 {
                let (client, url) = (gate.client(), gate.url("/hello"));
                tasks.push(tokio::spawn(async move {
                    let mut ok = 0;
                    for _ in 0..50 {
                        let r = client.get(&url).send().await.unwrap();
                        ok += usize::from(r.status() == 200 && r.text().await.unwrap() == "hello from app");
                    }
                    ok
                }));
            }
            let mut served = 0;
            for t in tasks {
                served += t.await.unwrap();
            }
            served
        });
        assert_eq!(served, 100);
        ran = (
            (thread_cpu_ns(pid, "chatkit-gate").unwrap() - main_before) / 1000,
            (thread_cpu_ns(pid, "gate-worker-1").unwrap() - before) / 1000,
        );
        if ran.0 >= 1000 && ran.1 >= 1000 {
            break;
        }
    }
    assert!(ran.0 >= 1000 && ran.1 >= 1000, "workers 0 and 1 ran {ran:?} µs for two connections");
    // New connections (a TLS handshake each), many at once: both workers are woken for them.
    let before = thread_cpu_ns(pid, "gate-worker-1").unwrap();
    let requests = app.count();
    const CLIENTS: usize = 64;
    let answers = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (client, url) = (gate.client(), gate.url("/hello"));
            tasks.push(tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        answers
    });
    assert!(answers.iter().all(|a| *a == (200, "hello from app".to_string())), "{answers:?}");
    assert_eq!(app.count(), requests + CLIENTS);
    let after = thread_cpu_ns(pid, "gate-worker-1").unwrap();
    assert!(after - before >= 1_000_000, "worker 1 ran {} µs for {CLIENTS} new connections", (after - before) / 1000);
    both_protocols_then_drain(&rt, &mut gate);
    assert_eq!(app.count(), requests + CLIENTS + 3);
}

#[test]
fn an_unusable_worker_count_from_the_environment_is_refused_at_start() {
    // Refused before anything is bound: the two addresses are never opened.
    let (code, stderr) = run_binary(
        &[],
        "[server]\nlisten = \"127.0.0.1:1\"\n[tls]\nself_signed = true\n[upstream]\nurl = \"http://127.0.0.1:3000\"\n[admin]\nlisten = \"127.0.0.1:2\"\n",
        &[("TOKIO_WORKER_THREADS", "0")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("TOKIO_WORKER_THREADS=\"0\": expected a number from 1 to 1024"), "{stderr}");
}

#[test]
fn sigint_also_drains_and_exits_zero() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(FakeApp::start());
    let mut gate = GateBuilder::new(&app.url()).spawn_process();
    gate.signal("INT");
    let exit = gate.wait_exit(Duration::from_secs(10));
    assert!(exit.success(), "exit {exit:?}; log:\n{}", gate.logs());
    assert!(gate.logs().contains("\"signal\":\"SIGINT\""), "{}", gate.logs());
}

//! How the gate reads the app's HTTP/1.1 answers to bodiless requests (the lean exchange,
//! `src/h1.rs`): every framing reaches the client whole, a malformed answer is a 502 or a cut
//! body, and a connection goes back to the pool only when its answer ended exactly where its
//! framing said. Each test asserts what the client received and which app connection each
//! request went out on (so that no answer, or stray byte, of one request can reach another).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::gate::{GateBuilder, TestGate};
use common::scripted::{Script, ScriptedApp};

fn script(path: &str) -> Option<Script> {
    let later = Duration::from_millis(100);
    Some(match path {
        "/length-in-pieces" => {
            Script::pieces(&["HTTP/1.1 200 OK\r\ncontent-", "length: 11\r\nx-app: 1\r\n\r\nhello", " world"])
        }
        "/chunked" => Script::pieces(&[
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            "lo\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n",
            "\r\n",
        ]),
        "/to-close" => Script::pieces(&["HTTP/1.1 200 OK\r\n\r\nuntil ", "the end"]).then_close(),
        "/hints" => Script::pieces(&[
            "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
        ]),
        "/no-content" => Script::answer("HTTP/1.1 204 No Content\r\n\r\n"),
        // To HEAD: the length of the body a GET would get, and no body.
        "/head" => Script::answer("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        "/close-header" => Script::answer("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
        "/http10" => Script::answer("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        "/two-lengths" => Script::answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!"),
        "/bad-chunk" => Script::answer("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX"),
        "/cut-short" => Script::answer("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf").then_close(),
        "/too-long" => Script::answer(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL",
        ),
        "/stray-later" => Script::answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .then_later(later, "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"),
        "/closed-later" => {
            Script::answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").then_later(later, "").then_close()
        }
        _ => return None,
    })
}

async fn start() -> (ScriptedApp, TestGate) {
    let app = ScriptedApp::start(script).await;
    let gate = GateBuilder::new(&app.url()).upstream("pool_idle_timeout = \"30s\"").start().await;
    (app, gate)
}

/// GET `path` and read the whole body: status, body (or the body's error).
async fn get(http: &reqwest::Client, gate: &TestGate, path: &str) -> (u16, Result<String, String>) {
    let r = http.get(gate.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.map_err(|e| format!("{e:?}")))
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn every_framing_reaches_the_client_whole_and_keep_alive_answers_reuse_their_connection() {
    let (app, gate) = start().await;
    for http in [gate.client(), gate.client_h2()] {
        let r = http.get(gate.url("/length-in-pieces")).send().await.unwrap();
        assert_eq!(r.headers()["x-app"], "1");
        assert_eq!(r.text().await.unwrap(), "hello world");
        let r = http.get(gate.url("/chunked")).send().await.unwrap();
        assert!(r.headers().get("x-trailer").is_none(), "trailers are not headers");
        assert_eq!(r.text().await.unwrap(), "hello world");
        assert_eq!(get(&http, &gate, "/hints").await, (200, Ok("final".into())));
        assert_eq!(get(&http, &gate, "/no-content").await, (204, Ok(String::new())));
        let r = http.head(gate.url("/head")).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers()["content-length"].to_str().unwrap()), (200, "5"));
        assert_eq!(r.text().await.unwrap(), "");
        assert_eq!(get(&http, &gate, "/after").await, (200, Ok("ok".into())));
        // All of these on one app connection, one after the other.
        let first = app.seen_at("/length-in-pieces");
        for path in ["/chunked", "/hints", "/no-content", "/head", "/after"] {
            let seen = app.seen_at(path);
            assert_eq!(seen.connection, first.connection, "{path} reused the connection: {:?}", app.seen());
        }
        assert_eq!(app.seen_at("/head").method, "HEAD");
        // Read to the connection's end: the body, and that connection is not used again.
        assert_eq!(get(&http, &gate, "/to-close").await, (200, Ok("until the end".into())));
        assert_eq!(get(&http, &gate, "/next").await, (200, Ok("ok".into())));
        assert_ne!(app.seen_at("/next").connection, app.seen_at("/to-close").connection);
    }
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_upstream_errors_total", "protocol"), 0.0);
}

#[tokio::test]
async fn answers_that_close_or_are_http_1_0_are_not_reused() {
    let (app, gate) = start().await;
    let http = gate.client();
    for path in ["/close-header", "/http10"] {
        assert_eq!(get(&http, &gate, path).await, (200, Ok("ok".into())), "{path}");
        let next = format!("{path}-next");
        assert_eq!(get(&http, &gate, &next).await, (200, Ok("ok".into())));
        assert_ne!(app.seen_at(&next).connection, app.seen_at(path).connection, "after {path}");
    }
}

#[tokio::test]
async fn malformed_answers_are_502_or_a_cut_body_and_their_connection_is_dropped() {
    let (app, gate) = start().await;
    let http = gate.client();
    assert_eq!(get(&http, &gate, "/two-lengths").await.0, 502);
    for path in ["/bad-chunk", "/cut-short"] {
        // The head was fine, so the answer may have begun: the client sees the answer fail
        // (cut before or after its head), never end as if whole.
        let answer = match http.get(gate.url(path)).send().await {
            Ok(r) => r.text().await.map_err(|e| format!("{e:?}")),
            Err(e) => Err(format!("{e:?}")),
        };
        assert!(answer.is_err(), "{path}: the client must see the answer fail, not end: {answer:?}");
    }
    for path in ["/two-lengths", "/bad-chunk", "/cut-short"] {
        let next = format!("{path}-next");
        assert_eq!(get(&http, &gate, &next).await, (200, Ok("ok".into())));
        assert_ne!(app.seen_at(&next).connection, app.seen_at(path).connection, "after {path}");
    }
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_upstream_errors_total", "protocol"), 1.0, "{m}");
}

#[tokio::test]
async fn bytes_past_an_answer_or_on_an_idle_connection_never_reach_another_request() {
    let (app, gate) = start().await;
    let http = gate.client();
    // A second answer glued to the first: the client gets the first; the rest is not read as
    // the next request's answer.
    assert_eq!(get(&http, &gate, "/too-long").await, (200, Ok("ok".into())));
    assert_eq!(get(&http, &gate, "/after-too-long").await, (200, Ok("ok".into())));
    assert_ne!(app.seen_at("/after-too-long").connection, app.seen_at("/too-long").connection);
    // An answer written on the idle connection later, before any request asked for it.
    assert_eq!(get(&http, &gate, "/stray-later").await, (200, Ok("ok".into())));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&http, &gate, "/after-stray").await, (200, Ok("ok".into())));
    assert_ne!(app.seen_at("/after-stray").connection, app.seen_at("/stray-later").connection);
    // Closed by the app while idle: seen at checkout, so nothing needed retrying.
    assert_eq!(get(&http, &gate, "/closed-later").await, (200, Ok("ok".into())));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&http, &gate, "/after-close").await, (200, Ok("ok".into())));
    assert_ne!(app.seen_at("/after-close").connection, app.seen_at("/closed-later").connection);
    let m = gate.metrics().await;
    assert_eq!(metric(&m, "chatkit_gate_upstream_retries_total", "app"), 0.0, "{m}");
    assert!(app.seen().iter().all(|s| !s.path.contains("EVIL")));
}

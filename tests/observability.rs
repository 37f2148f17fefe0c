//! Stream-aware observability on a plain proxied route: the access-log line and the request
//! metrics are written when the response body ends or is dropped, with its outcome.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::gate::GateBuilder;
use common::metric_value;
use common::upstream::FakeApp;
use futures_util::StreamExt;
use serde_json::Value;

async fn wait_lines(logs: &common::logs::Logs, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = logs.request_lines();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "expected {n} request lines, got {lines:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_proxied_stream_is_logged_when_its_body_ends_with_its_outcome() {
    let (logs, _guard) = common::logs::capture();
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;

    // Complete: logged only after the app finished the body, with the time it took.
    let resp = gate.client().get(gate.url("/sse")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    assert_eq!(&body.next().await.unwrap().unwrap()[..], b"data: one\n\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(logs.request_lines().is_empty(), "logged at the headers: {:?}", logs.request_lines());
    app.release_sse();
    while body.next().await.is_some() {}
    let line = wait_lines(&logs, 1).await[0]["fields"].clone();
    assert_eq!((line["status"].as_u64(), line["outcome"].as_str()), (Some(200), Some("complete")), "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() >= 400.0, "{line}");

    // Aborted: the client drops the stream mid-body.
    let resp = gate.client().get(gate.url("/sse")).send().await.unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let line = wait_lines(&logs, 2).await[1]["fields"].clone();
    assert_eq!(line["outcome"], "client_aborted", "{line}");

    // A small answer of the app's own is complete too.
    assert!(!gate.client().get(gate.url("/echo")).send().await.unwrap().text().await.unwrap().is_empty());
    let line = wait_lines(&logs, 3).await[2]["fields"].clone();
    assert_eq!(line["outcome"], "complete", "{line}");

    let m = gate.metrics().await;
    assert_eq!(
        metric_value(&m, r#"chatkit_gate_stream_duration_seconds_count{outcome="complete",route="default"}"#),
        2.0
    );
    assert_eq!(
        metric_value(&m, r#"chatkit_gate_stream_duration_seconds_count{outcome="client_aborted",route="default"}"#),
        1.0
    );
    assert_eq!(metric_value(&m, r#"chatkit_gate_http_requests_total{method="GET",route="default",status="200"}"#), 3.0);
    // The completed stream took >= 400 ms: it is not in the 250 ms bucket.
    assert!(metric_value(&m, r#"chatkit_gate_http_request_duration_seconds_bucket{route="default",le="0.25"}"#) <= 2.0);
    assert_eq!(metric_value(&m, "chatkit_gate_http_requests_in_flight"), 0.0);
    gate.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_before_the_headers_is_logged_as_499() {
    let (logs, _guard) = common::logs::capture();
    let app = FakeApp::start().await;
    let gate = GateBuilder::new(&app.url()).start().await;
    let client = gate.client();
    let url = gate.url("/slow?ms=3000");
    let req = tokio::spawn(async move { client.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    req.abort();
    let line = wait_lines(&logs, 1).await[0]["fields"].clone();
    assert_eq!((line["status"].as_u64(), line["outcome"].as_str()), (Some(499), Some("client_aborted")), "{line}");
    let m = gate.metrics().await;
    assert_eq!(metric_value(&m, r#"chatkit_gate_http_requests_total{method="GET",route="default",status="499"}"#), 1.0);
    gate.stop().await.unwrap();
}

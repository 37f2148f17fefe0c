//! A fake app behind the gate: a real HTTP/1.1 server on 127.0.0.1:0 that records what it saw
//! and offers the endpoints the proxy tests need (echo, status, SSE, slow, upload, WebSocket).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// One request as the app saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

type Body = BoxBody<Bytes, Infallible>;

pub struct FakeApp {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The SSE endpoint sends its second event only when this is notified.
    sse_release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApp {
    pub async fn start() -> FakeApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sse_release = Arc::new(Notify::new());
        let (s, r) = (seen.clone(), sse_release.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, r) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, s.clone(), r.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeApp { addr, seen, sse_release, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().last().cloned().expect("the app saw no request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn release_sse(&self) {
        self.sse_release.notify_one();
    }

    /// Stop listening (connections are refused afterwards).
    pub fn stop(&self) {
        self.task.abort();
    }
}

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

fn query_param(uri: &http::Uri, name: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    sse_release: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mut record = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
        body_len: 0,
    };
    if path == "/ws" {
        seen.lock().unwrap().push(record);
        return Ok(websocket(req));
    }
    let uri = req.uri().clone();
    // Count the body as it streams, never holding it whole.
    let mut body = req.into_body();
    let mut len = 0usize;
    let mut largest_chunk = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(d) = frame.into_data() {
            len += d.len();
            largest_chunk = largest_chunk.max(d.len());
        }
    }
    record.body_len = len;
    seen.lock().unwrap().push(record.clone());
    let resp = match path.as_str() {
        "/echo" => {
            let headers: serde_json::Map<String, serde_json::Value> = record
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_str().unwrap_or("").into())))
                .collect();
            let body =
                serde_json::json!({"method": record.method, "uri": record.uri, "headers": headers, "body_len": len});
            let mut r = full(200, body.to_string());
            r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
        "/upload" => full(200, serde_json::json!({"bytes": len, "largest_chunk": largest_chunk}).to_string()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_param(&uri, "ms").unwrap_or(1000))).await;
            full(200, "slow done")
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            full(200, "never")
        }
        "/sse" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: one\n\n")))).await;
                sse_release.notified().await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: two\n\n")))).await;
            });
            let stream = tokio_stream_from(rx);
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-type", HeaderValue::from_static("text/event-stream"));
            r.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
            r
        }
        "/own-hsts" => {
            let mut r = full(200, "ok");
            r.headers_mut().insert("strict-transport-security", HeaderValue::from_static("max-age=60"));
            r
        }
        "/hop" => {
            let mut r = full(200, "ok");
            r.headers_mut().insert("connection", HeaderValue::from_static("x-app-hop"));
            r.headers_mut().insert("x-app-hop", HeaderValue::from_static("1"));
            r.headers_mut().insert("keep-alive", HeaderValue::from_static("timeout=5"));
            r
        }
        p if p.starts_with("/status/") => full(p[8..].parse().unwrap_or(500), format!("status {}", &p[8..])),
        _ => full(200, "hello from app"),
    };
    Ok(resp)
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Answer a WebSocket upgrade and echo every message back.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(400, "not a websocket request");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert("connection", HeaderValue::from_static("upgrade"));
    r.headers_mut().insert("upgrade", HeaderValue::from_static("websocket"));
    r.headers_mut().insert("sec-websocket-accept", HeaderValue::from_str(&accept).unwrap());
    r
}

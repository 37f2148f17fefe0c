//! A fake introspection endpoint (the app's "who am I"): a real HTTP/1.1 + HTTP/2 server on
//! 127.0.0.1:0 that maps session cookie values (or `Authorization: Bearer` tokens) to users,
//! records every request it gets, and can be switched to fail: an error status, hanging,
//! or shut down so connections are refused.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::certs::Leaf;

/// How every request is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Known token: 200 with its body; unknown or none: the signed-out answer (401 by default).
    Normal,
    /// Answer this status (and a small JSON body) to everything.
    Status(u16),
    /// Read the request, never answer.
    Hang,
}

/// One request as the endpoint saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub version: http::Version,
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

struct State {
    cookie_name: String,
    users: Mutex<HashMap<String, Value>>,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    cache_control: Mutex<Option<String>>,
    set_cookies: Mutex<Vec<String>>,
    signed_out: Mutex<(u16, String)>,
    seen: Mutex<Vec<Seen>>,
    connections: Mutex<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fake introspection endpoint. Dropping it stops it.
pub struct FakeIntrospection {
    pub addr: SocketAddr,
    scheme: &'static str,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

pub const PATH: &str = "/api/auth/session";

impl FakeIntrospection {
    /// Serves [`PATH`]; the session is the cookie named `cookie_name`.
    pub async fn start(cookie_name: &str) -> FakeIntrospection {
        Self::start_inner(cookie_name, None).await
    }

    /// The same over HTTPS (ALPN h2 and http/1.1), presenting `leaf`.
    pub async fn start_tls(cookie_name: &str, leaf: &Leaf) -> FakeIntrospection {
        Self::start_inner(cookie_name, Some(TlsAcceptor::from(leaf.server_config()))).await
    }

    async fn start_inner(cookie_name: &str, tls: Option<TlsAcceptor>) -> FakeIntrospection {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            cookie_name: cookie_name.to_string(),
            users: Mutex::new(HashMap::new()),
            mode: Mutex::new(Mode::Normal),
            delay: Mutex::new(Duration::ZERO),
            cache_control: Mutex::new(None),
            set_cookies: Mutex::new(Vec::new()),
            signed_out: Mutex::new((401, r#"{"error":"not signed in"}"#.to_string())),
            seen: Mutex::new(Vec::new()),
            connections: Mutex::new(0),
        });
        let (shutdown, rx) = watch::channel(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(accept_loop(listener, tls, state.clone(), rx));
        FakeIntrospection { addr, scheme, state, shutdown, task: Mutex::new(Some(task)) }
    }

    /// The value for `auth.introspection_url` (`https://localhost:…` when serving TLS).
    pub fn url(&self) -> String {
        match self.scheme {
            "https" => format!("https://localhost:{}{PATH}", self.addr.port()),
            _ => format!("http://{}{PATH}", self.addr),
        }
    }

    /// Sign in `token` as a user with this id, name and email (and `tier` = "pro").
    pub fn add_user(&self, token: &str, id: &str, name: &str, email: &str) {
        self.set_answer(token, json!({"user": {"id": id, "name": name, "email": email, "tier": "pro"}}));
    }

    /// Answer 200 with exactly `body` for `token`.
    pub fn set_answer(&self, token: &str, body: Value) {
        lock(&self.state.users).insert(token.to_string(), body);
    }

    /// End `token`'s session: from now on it gets the signed-out answer.
    pub fn revoke(&self, token: &str) {
        lock(&self.state.users).remove(token);
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Wait this long before answering (to make concurrent requests overlap).
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.state.delay) = delay;
    }

    /// `Cache-Control` on every answer.
    pub fn set_cache_control(&self, value: Option<&str>) {
        *lock(&self.state.cache_control) = value.map(str::to_string);
    }

    /// `Set-Cookie` headers on every answer.
    pub fn set_set_cookies(&self, values: &[&str]) {
        *lock(&self.state.set_cookies) = values.iter().map(|v| v.to_string()).collect();
    }

    /// The answer for unknown or missing tokens (default 401).
    pub fn set_signed_out_answer(&self, status: u16, body: &str) {
        *lock(&self.state.signed_out) = (status, body.to_string());
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().last().cloned().expect("introspection saw no request")
    }

    pub fn count(&self) -> usize {
        lock(&self.state.seen).len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        *lock(&self.state.connections)
    }

    /// Stop listening and close every connection: from when this returns, connections are refused.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for FakeIntrospection {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        *lock(&state.connections) += 1;
        let state = state.clone();
        let tls = tls.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let serve = async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}

fn token_of(state: &State, headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all("cookie") {
        for pair in value.to_str().unwrap_or("").split(';') {
            if let Some((name, v)) = pair.trim().split_once('=')
                && name == state.cookie_name
            {
                return Some(v.to_string());
            }
        }
    }
    let auth = headers.get("authorization")?.to_str().ok()?;
    auth.strip_prefix("Bearer ").map(str::to_string)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body_len = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    lock(&state.seen).push(Seen {
        version: parts.version,
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len,
    });
    let delay = *lock(&state.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mode = lock(&state.mode).clone();
    let (status, body) = match mode {
        Mode::Hang => std::future::pending().await,
        Mode::Status(s) => (s, json!({"error": "introspection failure"}).to_string()),
        Mode::Normal => match token_of(&state, &parts.headers).and_then(|t| lock(&state.users).get(&t).cloned()) {
            Some(user) => (200, user.to_string()),
            None => lock(&state.signed_out).clone(),
        },
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(cc) = lock(&state.cache_control).as_deref() {
        h.insert("cache-control", HeaderValue::from_str(cc).unwrap());
    }
    for c in lock(&state.set_cookies).iter() {
        h.append("set-cookie", HeaderValue::from_str(c).unwrap());
    }
    resp
}

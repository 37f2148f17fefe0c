//! A session endpoint that behaves like NextAuth v4's `GET /api/auth/session` with JWT sessions:
//! `Cache-Control: private, no-cache, no-store`, a new session cookie on every signed-in answer
//! (sliding expiry), and a fresh CSRF cookie and callback-url cookie whenever the request did not
//! carry them; `200 {}` when signed out. A real HTTP/1.1 server on 127.0.0.1:0 that counts calls.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

pub const SESSION: &str = "__Secure-next-auth.session-token";
pub const CSRF: &str = "__Host-next-auth.csrf-token";
pub const CALLBACK: &str = "__Secure-next-auth.callback-url";

struct State {
    /// Valid session token → user id.
    tokens: Mutex<HashMap<String, String>>,
    calls: AtomicU64,
    next: AtomicU64,
    seen_cookies: Mutex<Vec<String>>,
}

pub struct SlidingSession {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl SlidingSession {
    pub async fn start() -> SlidingSession {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            tokens: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            next: AtomicU64::new(1),
            seen_cookies: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&st, req)) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        SlidingSession { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/auth/session", self.addr)
    }

    /// Sign `user` in: the session token a sign-in would have set.
    pub fn sign_in(&self, user: &str) -> String {
        issue(&self.state, user)
    }

    /// Introspection calls so far.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The `Cookie` header of every call.
    pub fn seen_cookies(&self) -> Vec<String> {
        self.state.seen_cookies.lock().unwrap().clone()
    }
}

impl Drop for SlidingSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn issue(state: &State, user: &str) -> String {
    let n = state.next.fetch_add(1, Ordering::SeqCst);
    let token = format!("jwt-{user}-{n}");
    state.tokens.lock().unwrap().insert(token.clone(), user.to_string());
    token
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all("cookie").iter().flat_map(|v| v.to_str().unwrap_or("").split(';')).find_map(|pair| {
        let (n, v) = pair.trim().split_once('=')?;
        (n == name).then(|| v.to_string())
    })
}

fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let headers = req.headers();
    state.seen_cookies.lock().unwrap().push(
        headers.get_all("cookie").iter().map(|v| v.to_str().unwrap_or("").to_string()).collect::<Vec<_>>().join("; "),
    );
    let mut set = Vec::new();
    if cookie(headers, CSRF).is_none() {
        let n = state.next.fetch_add(1, Ordering::SeqCst);
        set.push(format!("{CSRF}=csrf{n}%7Chash; Path=/; HttpOnly; Secure; SameSite=Lax"));
    }
    if cookie(headers, CALLBACK).is_none() {
        set.push(format!("{CALLBACK}=https%3A%2F%2Flocalhost; Path=/; HttpOnly; Secure; SameSite=Lax"));
    }
    let user = cookie(headers, SESSION).and_then(|t| state.tokens.lock().unwrap().get(&t).cloned());
    let body = match &user {
        Some(user) => {
            let token = issue(state, user);
            set.push(format!("{SESSION}={token}; Path=/; Expires=Fri, 01 Jan 2100 00:00:00 GMT; HttpOnly; Secure"));
            json!({"user": {"id": user, "name": user, "email": format!("{user}@example.com")}, "expires": "2100-01-01"})
        }
        None => json!({}),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("cache-control", HeaderValue::from_static("private, no-cache, no-store"));
    for c in set {
        h.append("set-cookie", HeaderValue::from_str(&c).unwrap());
    }
    resp
}

//! An app as permissive as real ones, to show what reaches them: header names are read the way
//! WSGI/CGI/Rack servers read them (`_` and `-` are the same variable, repeats joined with
//! `,`), the path is resolved the way `new URL()` routers do (`%2e` is a dot, `\` a slash, dot
//! segments resolved) and also fully percent-decoded first (the most trusting reading), and
//! every Upgrade gets a 101 naming whatever the app is told to switch to; bytes that then
//! arrive are recorded as tunnelled.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the permissive app understood it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The request target exactly as received.
    pub target: String,
    /// The path a `new URL()` router serves.
    pub url_path: String,
    /// The path after full percent-decoding and dot-segment resolution.
    pub decoded_path: String,
    /// `HTTP_*` variables the way WSGI builds them.
    pub environ: BTreeMap<String, String>,
    pub host: Option<String>,
    pub cookie_fields: usize,
}

impl Seen {
    /// The WSGI variable for a header name (`x-auth-request-user` → `HTTP_X_AUTH_REQUEST_USER`).
    pub fn env(&self, header: &str) -> Option<&str> {
        self.environ.get(&wsgi_name(header)).map(String::as_str)
    }
}

pub fn wsgi_name(header: &str) -> String {
    format!("HTTP_{}", header.to_ascii_uppercase().replace('-', "_"))
}

struct State {
    seen: Mutex<Vec<Seen>>,
    tunnelled: Mutex<Vec<u8>>,
    /// `Some(p)`: answer every Upgrade with 101 `Upgrade: p`; `None`: echo the asked protocol.
    switch_to: Mutex<Option<String>>,
}

pub struct PermissiveApp {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl PermissiveApp {
    pub async fn start() -> PermissiveApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            seen: Mutex::new(Vec::new()),
            tunnelled: Mutex::new(Vec::new()),
            switch_to: Mutex::new(None),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, st.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        PermissiveApp { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen().last().cloned().expect("the app saw no request")
    }

    pub fn clear(&self) {
        self.state.seen.lock().unwrap().clear();
    }

    pub fn tunnelled(&self) -> Vec<u8> {
        self.state.tunnelled.lock().unwrap().clone()
    }

    /// Answer every upgrade by switching to `protocol`, whatever was asked.
    pub fn switch_to(&self, protocol: &str) {
        *self.state.switch_to.lock().unwrap() = Some(protocol.to_string());
    }
}

async fn handle(mut req: Request<Incoming>, st: Arc<State>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let target = req.uri().to_string();
    let path = req.uri().path().to_string();
    let mut environ: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers() {
        let key = wsgi_name(name.as_str());
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        environ.entry(key).and_modify(|e| *e = format!("{e},{v}")).or_insert(v);
    }
    let seen = Seen {
        method: req.method().to_string(),
        target,
        url_path: resolve(&path.replace('\\', "/").replace("%2e", ".").replace("%2E", ".")),
        decoded_path: resolve(&percent_decode(&path).replace('\\', "/")),
        environ,
        host: req.headers().get("host").map(|h| h.to_str().unwrap_or("").to_string()),
        cookie_fields: req.headers().get_all("cookie").iter().count(),
    };
    st.seen.lock().unwrap().push(seen.clone());
    if let Some(asked) = req.headers().get("upgrade").cloned() {
        let answer = st.switch_to.lock().unwrap().clone().unwrap_or_else(|| asked.to_str().unwrap().to_string());
        let on_upgrade = hyper::upgrade::on(&mut req);
        let st2 = st.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 4096];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                st2.tunnelled.lock().unwrap().extend_from_slice(&buf[..n]);
                let _ = io.write_all(&buf[..n]).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("connection", "upgrade".parse().unwrap());
        r.headers_mut().insert("upgrade", answer.parse().unwrap());
        return Ok(r);
    }
    let _ = req.into_body().collect().await;
    let body = serde_json::json!({"url_path": seen.url_path, "user": seen.env("x-auth-request-user")}).to_string();
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = ((b[i + 1] as char).to_digit(16), (b[i + 2] as char).to_digit(16))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986 §5.2.4 remove_dot_segments, as URL parsers apply it (extra `..` stay at the root).
pub fn resolve(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

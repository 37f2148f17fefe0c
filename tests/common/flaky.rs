//! A keep-alive server that betrays reuse: on 127.0.0.1:0, it answers the first request of each
//! connection (200, keep-alive, a fixed body) and, on any later request of the same connection,
//! reads it whole and closes without answering: what an app does when it closes an idle
//! keep-alive connection just as the gate reuses it, made certain instead of rare.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the server read it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Which request of its connection (0 = the first, answered; later ones are dropped).
    pub nth_on_connection: usize,
    pub body_len: usize,
}

pub struct FlakyServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyServer {
    /// Answers `body` (as `application/json`) to the first request of every connection.
    pub async fn start(body: &str) -> FlakyServer {
        Self::start_with(body, None).await
    }

    /// Answers every request (never drops one), announcing `Keep-Alive: timeout=<secs>`.
    pub async fn start_keep_alive(body: &str, secs: u64) -> FlakyServer {
        Self::start_with(body, Some(secs)).await
    }

    async fn start_with(body: &str, keep_alive: Option<u64>) -> FlakyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0usize));
        let (s, c, body) = (seen.clone(), connections.clone(), body.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                *c.lock().unwrap() += 1;
                tokio::spawn(serve(stream, s.clone(), body.clone(), keep_alive));
            }
        });
        FlakyServer { addr, seen, connections, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }

    /// Requests read on a reused connection and dropped unanswered.
    pub fn dropped(&self) -> usize {
        self.seen().iter().filter(|s| s.nth_on_connection > 0).count()
    }
}

impl Drop for FlakyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, body: String, keep_alive: Option<u64>) {
    let mut buf = Vec::new();
    for nth in 0.. {
        let Some((method, path, body_len)) = read_request(&mut stream, &mut buf).await else { return };
        seen.lock().unwrap().push(Seen { method, path, nth_on_connection: nth, body_len });
        if nth > 0 && keep_alive.is_none() {
            // Read it, then hang up without a byte of answer.
            return;
        }
        let announce = keep_alive.map(|secs| format!("keep-alive: timeout={secs}\r\n")).unwrap_or_default();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{announce}\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(body.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Read one request (head and a `Content-Length` body; chunked bodies are not expected).
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String, usize)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut words = head.split_whitespace();
    let method = words.next()?.to_string();
    let path = words.next()?.to_string();
    let body_len = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head_end + body_len);
    Some((method, path, body_len))
}

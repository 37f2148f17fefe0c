//! An app that answers in raw bytes: on 127.0.0.1:0, each request's path picks a scripted answer
//! (written in pieces, with pauses, possibly malformed or followed by more bytes), so that the
//! gate's reading of the app's HTTP/1.1 can be tested where a well-behaved server never goes.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the app does with one request.
#[derive(Clone, Debug)]
pub struct Script {
    /// Written in turn, each after its pause.
    pub writes: Vec<(Duration, Vec<u8>)>,
    /// Close the connection after the writes.
    pub close: bool,
}

impl Script {
    /// `raw` in one write, the connection kept open.
    pub fn answer(raw: &str) -> Script {
        Script { writes: vec![(Duration::ZERO, raw.as_bytes().to_vec())], close: false }
    }

    /// `pieces` each in a write of its own, 20 ms apart.
    pub fn pieces(pieces: &[&str]) -> Script {
        let writes = pieces.iter().map(|p| (Duration::from_millis(20), p.as_bytes().to_vec())).collect();
        Script { writes, close: false }
    }

    pub fn then_close(mut self) -> Script {
        self.close = true;
        self
    }

    /// After the answer, `later` written on the (then idle) connection after `pause`.
    pub fn then_later(mut self, pause: Duration, later: &str) -> Script {
        self.writes.push((pause, later.as_bytes().to_vec()));
        self
    }
}

/// One request as the app read it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Which connection (0 = the first accepted) and which request on it.
    pub connection: usize,
    pub nth_on_connection: usize,
}

pub struct ScriptedApp {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedApp {
    /// `script(path)` answers each request; an unknown path gets a plain 200 `ok`.
    pub async fn start(script: impl Fn(&str) -> Option<Script> + Send + Sync + 'static) -> ScriptedApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, script) = (seen.clone(), Arc::new(script));
        let task = tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else { return };
                tokio::spawn(serve(stream, connection, s.clone(), script.clone()));
            }
        });
        ScriptedApp { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The request to `path` (the last one there).
    pub fn seen_at(&self, path: &str) -> Seen {
        self.seen().into_iter().rev().find(|s| s.path == path).unwrap_or_else(|| panic!("no request to {path}"))
    }
}

impl Drop for ScriptedApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ScriptFn = dyn Fn(&str) -> Option<Script> + Send + Sync;

async fn serve(mut stream: TcpStream, connection: usize, seen: Arc<Mutex<Vec<Seen>>>, script: Arc<ScriptFn>) {
    let mut buf = Vec::new();
    for nth in 0.. {
        // Bodiless requests only: a head, up to its blank line.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
        seen.lock().unwrap().push(Seen { method, path: path.clone(), connection, nth_on_connection: nth });
        let script = script(&path).unwrap_or_else(|| Script::answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));
        for (pause, bytes) in &script.writes {
            tokio::time::sleep(*pause).await;
            if stream.write_all(bytes).await.is_err() {
                return;
            }
        }
        if script.close {
            return;
        }
    }
}

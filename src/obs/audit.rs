//! The audit log: one JSON line per authentication-relevant event, written off the request
//! path (a bounded queue; a full queue drops and counts rather than blocking a request).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::obs::metrics::Metrics;

/// The kinds of audit events the spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditKind {
    /// One request on a ChatKit-server route: user, type, thread id and decision (never content).
    ChatkitRequest,
    SessionCreated,
    SessionRefreshed,
    SessionFailed,
    AuthDenied,
    AuthUnavailable,
    RateLimited,
    TokenMismatch,
}

/// One audit line. Never holds a secret, a cookie or a key: ids, hashes and reasons only.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub event: AuditKind,
    pub timestamp: String,
    pub request_id: String,
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The `x-request-id` of an OpenAI API answer, to correlate with OpenAI support.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_request_id: Option<String>,
    /// ChatKit request `type` (a known type or `other`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chatkit_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
}

impl AuditEvent {
    pub fn new(event: AuditKind, request_id: &str, ip: IpAddr) -> Self {
        AuditEvent {
            event,
            timestamp: crate::obs::time::rfc3339_millis(SystemTime::now()),
            request_id: request_id.to_string(),
            ip,
            user_id: None,
            session_id: None,
            reason: None,
            route: None,
            policy: None,
            api_request_id: None,
            chatkit_type: None,
            thread_id: None,
        }
    }

    pub fn chatkit(mut self, kind: &'static str, thread_id: Option<&str>) -> Self {
        self.chatkit_type = Some(kind);
        self.thread_id = thread_id.map(str::to_string);
        self
    }

    pub fn user(mut self, user_id: Option<&str>) -> Self {
        self.user_id = user_id.map(str::to_string);
        self
    }

    pub fn session(mut self, session_id: &str) -> Self {
        self.session_id = Some(session_id.to_string());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn route(mut self, route: &str) -> Self {
        self.route = Some(route.to_string());
        self
    }

    pub fn policy(mut self, policy: &str) -> Self {
        self.policy = Some(policy.to_string());
        self
    }

    pub fn api_request_id(mut self, id: Option<&str>) -> Self {
        self.api_request_id = id.map(str::to_string);
        self
    }
}

/// Where audit lines go.
#[derive(Debug, Clone)]
pub enum AuditSink {
    Stdout,
    /// Appended to; re-opened when the file is moved or removed (log rotation).
    File(PathBuf),
    /// Kept in memory (tests).
    Memory(Arc<Mutex<Vec<String>>>),
}

/// What the writer thread receives.
enum Msg {
    Event(Box<AuditEvent>),
    /// Answered once every event queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    metrics: Metrics,
}

const QUEUE: usize = 8192;
/// Most events written per write call (bounds the buffer under sustained load).
const BATCH: u64 = 1024;
/// How often the writer checks whether `audit_file` was rotated away.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// One line as written: the event, tagged so audit lines are easy to pick out of stdout.
#[derive(Serialize)]
struct Line<'a> {
    log: &'static str,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

impl Audit {
    /// Start the writer thread. Opening the file fails here, at startup, not on the first event.
    pub fn start(sink: AuditSink, metrics: Metrics) -> std::io::Result<Audit> {
        let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
        let out = Output::open(sink)?;
        let thread_metrics = metrics.clone();
        // A plain thread: file and stdout writes block, and must never stall the async workers.
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || writer(rx, out, thread_metrics))?;
        Ok(Audit { tx, metrics })
    }

    /// Start with an in-memory sink; returns the lines written (tests).
    pub fn memory(metrics: Metrics) -> std::io::Result<(Audit, Arc<Mutex<Vec<String>>>)> {
        let lines = Arc::new(Mutex::new(Vec::new()));
        Ok((Audit::start(AuditSink::Memory(lines.clone()), metrics)?, lines))
    }

    /// Queue one event; never waits. A full queue drops it and counts
    /// `chatkit_gate_audit_events_dropped_total`.
    pub fn log(&self, event: AuditEvent) {
        if self.tx.try_send(Msg::Event(Box::new(event))).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }

    /// Wait until every event logged before this call is written (shutdown, tests). Not for
    /// the request path: it waits for room in the queue.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

enum Output {
    Stdout,
    File { path: PathBuf, file: std::fs::File, identity: Option<(u64, u64)>, checked: Instant },
    Memory(Arc<Mutex<Vec<String>>>),
}

/// Device and inode of a file, to notice it was replaced (unix only).
fn file_identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

impl Output {
    fn open(sink: AuditSink) -> std::io::Result<Output> {
        Ok(match sink {
            AuditSink::Stdout => Output::Stdout,
            AuditSink::Memory(m) => Output::Memory(m),
            AuditSink::File(path) => {
                let file = open_append(&path)?;
                let identity = file.metadata().ok().as_ref().and_then(file_identity);
                Output::File { path, file, identity, checked: Instant::now() }
            }
        })
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Output::Memory(m) => {
                if let Ok(mut lines) = m.lock() {
                    lines.extend(String::from_utf8_lossy(buf).lines().map(str::to_string));
                }
                Ok(())
            }
            Output::File { path, file, identity, checked } => {
                if checked.elapsed() >= ROTATION_CHECK {
                    *checked = Instant::now();
                    let replaced = match std::fs::metadata(&*path) {
                        Err(_) => true,
                        Ok(meta) => file_identity(&meta) != *identity,
                    };
                    if replaced {
                        // Moved or removed by logrotate: continue in a fresh file at the path.
                        let reopened = open_append(path)?;
                        *identity = reopened.metadata().ok().as_ref().and_then(file_identity);
                        *file = reopened;
                        tracing::info!(file = %path.display(), "audit log re-opened (rotated)");
                    }
                }
                file.write_all(buf)?;
                file.flush()
            }
        }
    }
}

fn writer(mut rx: mpsc::Receiver<Msg>, mut out: Output, metrics: Metrics) {
    let mut buf = Vec::with_capacity(64 * 256);
    let mut flushes = Vec::new();
    let mut failing = false;
    while let Some(first) = rx.blocking_recv() {
        buf.clear();
        let mut events = 0u64;
        let mut next = Some(first);
        // Drain what is queued (up to a batch) and write it in one go.
        while let Some(msg) = next {
            match msg {
                Msg::Event(event) => {
                    if serde_json::to_writer(&mut buf, &Line { log: "audit", event: &event }).is_ok() {
                        buf.push(b'\n');
                        events += 1;
                    }
                }
                Msg::Flush(done) => flushes.push(done),
            }
            next = if events < BATCH { rx.try_recv().ok() } else { None };
        }
        if !buf.is_empty() {
            match out.write(&buf) {
                Ok(()) => {
                    if failing {
                        tracing::info!("audit log writable again");
                        failing = false;
                    }
                }
                Err(e) => {
                    metrics.audit_dropped.inc_by(events);
                    if !failing {
                        tracing::error!(error = %e, events, "audit log write failed; events dropped");
                        failing = true;
                    }
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn events_are_json_lines_with_the_spec_fields() {
        let (audit, lines) = Audit::memory(Metrics::new().unwrap()).unwrap();
        audit.log(
            AuditEvent::new(AuditKind::TokenMismatch, "req-1", "10.1.2.3".parse().unwrap())
                .user(Some("u1"))
                .session("cksess_1")
                .reason("token belongs to another user"),
        );
        audit.flush().await;
        let line = lines.lock().unwrap()[0].clone();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["log"], "audit");
        assert_eq!(v["event"], "TOKEN_MISMATCH");
        assert_eq!(v["user_id"], "u1");
        assert_eq!(v["ip"], "10.1.2.3");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["session_id"], "cksess_1");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("api_request_id").is_none());
    }

    #[tokio::test]
    async fn audit_file_is_appended_and_reopened_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let audit = Audit::start(AuditSink::File(path.clone()), Metrics::new().unwrap()).unwrap();
        let event = |id: &str| AuditEvent::new(AuditKind::SessionCreated, id, "127.0.0.1".parse().unwrap());
        audit.log(event("r1"));
        audit.flush().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("earlier\n{") && text.contains(r#""request_id":"r1""#), "{text}");

        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        std::thread::sleep(ROTATION_CHECK + Duration::from_millis(50));
        audit.log(event("r2"));
        audit.flush().await;
        assert!(!std::fs::read_to_string(&rotated).unwrap().contains("r2"));
        assert!(std::fs::read_to_string(&path).unwrap().contains(r#""request_id":"r2""#));
    }

    #[tokio::test]
    async fn a_stuck_writer_never_blocks_logging() {
        let metrics = Metrics::new().unwrap();
        let (audit, lines) = Audit::memory(metrics.clone()).unwrap();
        let held = lines.lock().unwrap();
        let started = Instant::now();
        for i in 0..QUEUE * 2 + 10 {
            audit.log(AuditEvent::new(AuditKind::RateLimited, &i.to_string(), "127.0.0.1".parse().unwrap()));
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        // The writer took at most one batch before blocking; the queue then filled up.
        assert!(metrics.audit_dropped.get() >= QUEUE as u64 - BATCH, "{}", metrics.audit_dropped.get());
        drop(held);
        audit.flush().await;
        let written = lines.lock().unwrap().len() as u64;
        assert_eq!(written + metrics.audit_dropped.get(), (QUEUE * 2 + 10) as u64);
    }
}

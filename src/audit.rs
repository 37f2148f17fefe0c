//! The audit log: one JSON line per authentication-relevant event, written off the request
//! path (a bounded queue; a full queue drops and counts rather than blocking a request).

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// The kinds of audit events the spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditKind {
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
}

impl AuditEvent {
    pub fn new(event: AuditKind, request_id: &str, ip: IpAddr) -> Self {
        AuditEvent {
            event,
            timestamp: rfc3339_now(),
            request_id: request_id.to_string(),
            ip,
            user_id: None,
            session_id: None,
            reason: None,
            route: None,
            policy: None,
            api_request_id: None,
        }
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
    File(PathBuf),
    /// Kept in memory (tests).
    Memory(Arc<Mutex<Vec<String>>>),
}

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: mpsc::Sender<AuditEvent>,
    metrics: Metrics,
}

const QUEUE: usize = 8192;

impl Audit {
    /// Start the writer task. Opening the file fails here, at startup, not on the first event.
    pub fn start(sink: AuditSink, metrics: Metrics) -> std::io::Result<Audit> {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let mut out: Box<dyn Write + Send> = match &sink {
            AuditSink::Stdout => Box::new(std::io::stdout()),
            AuditSink::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
            AuditSink::Memory(_) => Box::new(std::io::sink()),
        };
        let memory = match &sink {
            AuditSink::Memory(m) => Some(m.clone()),
            _ => None,
        };
        // A plain thread: file and stdout writes block, and must never stall the async workers.
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || {
            let mut buf = Vec::with_capacity(64 * 256);
            while let Some(first) = rx.blocking_recv() {
                buf.clear();
                let mut next = Some(first);
                while let Some(event) = next {
                    if serde_json::to_writer(&mut buf, &event).is_ok() {
                        buf.push(b'\n');
                    }
                    next = rx.try_recv().ok();
                }
                if let Some(m) = &memory {
                    if let Ok(mut lines) = m.lock() {
                        lines.extend(String::from_utf8_lossy(&buf).lines().map(str::to_string));
                    }
                    continue;
                }
                if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                    tracing::error!(error = %e, "audit log write failed");
                }
            }
        })?;
        Ok(Audit { tx, metrics })
    }

    /// Queue one event; never waits.
    pub fn log(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }
}

/// Current time as RFC 3339 UTC with milliseconds, e.g. `2026-11-26T10:09:17.123Z`.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_000_000, 999), "2026-11-18T11:06:40.999Z");
    }

    #[tokio::test]
    async fn events_are_json_lines_with_the_spec_fields() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let audit = Audit::start(AuditSink::Memory(lines.clone()), Metrics::new().unwrap()).unwrap();
        audit.log(
            AuditEvent::new(AuditKind::TokenMismatch, "req-1", "10.1.2.3".parse().unwrap())
                .user(Some("u1"))
                .session("cksess_1")
                .reason("token belongs to another user"),
        );
        for _ in 0..100 {
            if !lines.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let line = lines.lock().unwrap()[0].clone();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "TOKEN_MISMATCH");
        assert_eq!(v["user_id"], "u1");
        assert_eq!(v["ip"], "10.1.2.3");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["session_id"], "cksess_1");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}

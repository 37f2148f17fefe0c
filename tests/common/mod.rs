//! Shared integration-test support: real servers (gate, app, introspection, ChatKit API, Redis)
//! and small helpers.
#![allow(dead_code)]

pub mod certs;
pub mod chatkit_server;
pub mod fake_openai;
pub mod flaky;
pub mod gate;
pub mod introspection;
pub mod logs;
pub mod permissive_app;
pub mod redis;
pub mod scripted;
pub mod sliding_session;
pub mod upstream;

/// The value of the first metrics line starting with `line_start` (name and labels as printed).
pub fn metric_value(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line_start} not in metrics:\n{metrics}"))
}

/// Fail the test unless `promtool check metrics` accepts `text`.
pub fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool not found: apt-get install -y prometheus");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait (up to 5 s, polling every 10 ms) until `check` holds; fail the test naming `what`.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

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
pub mod sliding_session;
pub mod upstream;

/// Wait (up to 5 s, polling every 10 ms) until `check` holds; fail the test naming `what`.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

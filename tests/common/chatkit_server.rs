//! The real `openai-chatkit` server of `examples/chatkit-server/`, run with python3 on a free
//! port. Missing Python packages fail the test, naming the command that installs them.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct ChatKitApp {
    pub addr: SocketAddr,
    child: Child,
}

/// Fail (never skip) when the packages the example needs are not installed.
pub fn require_python_packages() {
    let out = Command::new("python3")
        .args(["-c", "import chatkit, fastapi, uvicorn"])
        .output()
        .expect("python3 must be installed for the ChatKit-server tests");
    assert!(
        out.status.success(),
        "the real openai-chatkit server needs its Python packages: run `pip install -r tests/requirements.txt`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl ChatKitApp {
    pub async fn start() -> ChatKitApp {
        require_python_packages();
        let addr = super::gate::free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/chatkit-server/server.py");
        let child = Command::new("python3")
            .args([script, "--port", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 examples/chatkit-server/server.py");
        let app = ChatKitApp { addr, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(app.url("/_test/state")).await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "the ChatKit example server did not start on {addr}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the server received and did: `requests` (type, user, thread_id, bytes),
    /// `cancelled`, `completed`, `active`.
    pub async fn state(&self) -> Value {
        reqwest::get(self.url("/_test/state")).await.unwrap().json().await.unwrap()
    }

    /// The types the server received, in order.
    pub async fn types(&self) -> Vec<String> {
        self.state().await["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["type"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for ChatKitApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `threads.create` body whose text is `text` (`stream:<chunks>:<ms>` shapes the answer).
pub fn create(text: &str) -> Value {
    serde_json::json!({
        "type": "threads.create",
        "params": {"input": {"content": [{"type": "input_text", "text": text}], "attachments": [], "inference_options": {}}}
    })
}

/// Validate `json` with the SDK's own `ThreadStreamEvent` union; `Err` is pydantic's message.
pub fn sdk_parses_stream_event(json: &str) -> Result<String, String> {
    let code = "import sys\nfrom pydantic import TypeAdapter\nfrom chatkit.types import ThreadStreamEvent\n\
                e = TypeAdapter(ThreadStreamEvent).validate_json(sys.stdin.read())\nprint(type(e).__name__)";
    let mut child = Command::new("python3")
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(json.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

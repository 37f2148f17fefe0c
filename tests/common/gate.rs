//! Start a whole gateway for a test: in-process (`TestGate`, listeners on 127.0.0.1:0, real TLS
//! from a test CA) or as the real binary (`GateProcess`, for signals, exit codes and logs).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::certs::TestPki;

/// What goes into the generated config file, section by section.
pub struct GateBuilder {
    pub upstream_url: String,
    /// Extra lines for `[server]` (e.g. `header_timeout = "1s"`).
    pub server: String,
    /// Extra lines for `[tls]`.
    pub tls: String,
    /// Extra lines for `[upstream]`.
    pub upstream: String,
    /// Everything after (`[auth]`, `[[routes]]`, `[rate_limit]`, `[chatkit]`, `[log]`).
    pub rest: String,
    pub redirect_listener: bool,
    /// `server.shutdown_delay`: "0" unless a test asks (stopping a test gate stays quick).
    pub shutdown_delay: String,
}

impl GateBuilder {
    pub fn new(upstream_url: &str) -> GateBuilder {
        GateBuilder {
            upstream_url: upstream_url.to_string(),
            server: String::new(),
            tls: String::new(),
            upstream: String::new(),
            rest: String::new(),
            redirect_listener: false,
            shutdown_delay: "0".into(),
        }
    }

    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    pub fn tls(mut self, lines: &str) -> Self {
        self.tls.push_str(lines);
        self.tls.push('\n');
        self
    }

    pub fn upstream(mut self, lines: &str) -> Self {
        self.upstream.push_str(lines);
        self.upstream.push('\n');
        self
    }

    pub fn rest(mut self, toml: &str) -> Self {
        self.rest.push_str(toml);
        self.rest.push('\n');
        self
    }

    pub fn shutdown_delay(mut self, delay: &str) -> Self {
        self.shutdown_delay = delay.to_string();
        self
    }

    pub fn redirect_listener(mut self) -> Self {
        self.redirect_listener = true;
        self
    }

    /// The config text with these listen addresses and certificate files.
    pub fn render(
        &self,
        https: SocketAddr,
        plain: Option<SocketAddr>,
        admin: SocketAddr,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> String {
        let redirect = plain.map(|p| format!("redirect_listen = \"{p}\"\n")).unwrap_or_default();
        format!(
            "[server]\nlisten = \"{https}\"\nshutdown_delay = \"{delay}\"\n{redirect}{server}\n[tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n{tls}\n[upstream]\nurl = \"{up}\"\n{upstream}\n[admin]\nlisten = \"{admin}\"\n\n{rest}",
            server = self.server,
            delay = self.shutdown_delay,
            cert = cert.display(),
            key = key.display(),
            tls = self.tls,
            up = self.upstream_url,
            upstream = self.upstream,
            rest = self.rest,
        )
    }

    /// Start in-process.
    pub async fn start(self) -> TestGate {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.write_to(dir.path());
        let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = if self.redirect_listener { Some(TcpListener::bind("127.0.0.1:0").await.unwrap()) } else { None };
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs =
            (https.local_addr().unwrap(), plain.as_ref().map(|p| p.local_addr().unwrap()), admin.local_addr().unwrap());
        let text = self.render(addrs.0, addrs.1, addrs.2, &cert, &key);
        let config =
            chatkit_gate::Config::from_toml(&text).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = chatkit_gate::Listeners { https, plain, admin };
        let task = tokio::spawn(chatkit_gate::run(config, listeners, async move {
            let _ = rx.await;
        }));
        let gate = TestGate {
            https: addrs.0,
            plain: addrs.1,
            admin: addrs.2,
            ca_pem: pki.ca_pem(),
            pki,
            dir,
            cert,
            key,
            shutdown: Some(tx),
            task: Some(task),
        };
        gate.wait_ready().await;
        gate
    }

    /// Start the real binary on free ports; stdout and stderr go to a log file.
    pub fn spawn_process(self) -> GateProcess {
        self.spawn_process_with(false)
    }

    /// Start the real binary with its stdout on a pipe that nobody reads (a stalled log
    /// collector); stderr goes to the log file.
    pub fn spawn_process_stdout_stalled(self) -> GateProcess {
        self.spawn_process_with(true)
    }

    fn spawn_process_with(self, stalled_stdout: bool) -> GateProcess {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.write_to(dir.path());
        let https = free_port();
        let plain = if self.redirect_listener { Some(free_port()) } else { None };
        let admin = free_port();
        let text = self.render(https, plain, admin, &cert, &key);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, &text).unwrap();
        let log_path = dir.path().join("gate.log");
        let child = if stalled_stdout {
            let log = std::fs::File::create(&log_path).unwrap();
            Command::new(env!("CARGO_BIN_EXE_chatkit-gate"))
                .args(["--config", config_path.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .unwrap()
        } else {
            spawn_binary(&["--config", config_path.to_str().unwrap()], &log_path)
        };
        let p = GateProcess { child, https, admin, ca_pem: pki.ca_pem(), log_path, dir };
        p.wait_ready();
        p
    }
}

/// A port that was free a moment ago (for the binary, which binds by itself).
pub fn free_port() -> SocketAddr {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

pub fn spawn_binary(args: &[&str], log_path: &std::path::Path) -> Child {
    let log = std::fs::File::create(log_path).unwrap();
    Command::new(env!("CARGO_BIN_EXE_chatkit-gate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

pub struct TestGate {
    pub https: SocketAddr,
    pub plain: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub ca_pem: String,
    pub pki: TestPki,
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestGate {
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https.port())
    }

    pub fn plain_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.plain.expect("no redirect listener").port())
    }

    /// HTTP/1.1 client trusting the test CA.
    pub fn client(&self) -> reqwest::Client {
        super::certs::reqwest_client(&self.ca_pem, false)
    }

    /// HTTP/2 (ALPN h2) client trusting the test CA.
    pub fn client_h2(&self) -> reqwest::Client {
        super::certs::reqwest_client(&self.ca_pem, true)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path).await
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.admin_get("/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gate not ready within 10s");
    }

    /// Signal shutdown and wait for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    /// Signal shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(mut self) -> anyhow::Result<()> {
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestGate {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Plain-HTTP GET on the admin listener.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap();
    match client.get(format!("http://{addr}{path}")).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

pub struct GateProcess {
    pub child: Child,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub ca_pem: String,
    pub log_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl GateProcess {
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https.port())
    }

    pub fn client(&self) -> reqwest::Client {
        super::certs::reqwest_client(&self.ca_pem, false)
    }

    pub fn client_h2(&self) -> reqwest::Client {
        super::certs::reqwest_client(&self.ca_pem, true)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(self.admin) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gate process not ready within 15s; log:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Wait for the process to exit (at most `within`).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gate process did not exit within {within:?}; log:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Real `redis-server` processes for integration tests: one standalone server, or a
//! three-master Redis Cluster, each on free loopback ports in its own temp dir.
//!
//! Every process runs under a tiny `sh` watchdog holding a pipe from the test process: when
//! the test process dies (even by SIGKILL, e.g. a nextest timeout), the pipe closes and the
//! watchdog kills `redis-server`, so no orphans outlive a test run.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const REDIS_SERVER: &str = "redis-server";
const REDIS_CLI: &str = "redis-cli";
const START_DEADLINE: Duration = Duration::from_secs(10);
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// `sh -c` script: run redis-server in the background, block on our pipe, kill it on EOF.
/// A background job's stdin is /dev/null (no job control), so only `read` sees the pipe.
const WATCHDOG: &str = r#"redis-server "$@" & pid=$!
read -r _ignored
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0"#;

/// One `redis-server` process on 127.0.0.1. Dropping it kills the process.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    process: Option<Watched>,
}

struct Watched {
    child: Child,
    /// Closing this pipe tells the watchdog to kill redis-server.
    pipe: Option<ChildStdin>,
}

impl RedisServer {
    /// Starts a standalone server (`--save "" --appendonly no`) on a free port and waits until it
    /// answers PING. Blocking, typically 10–50 ms. Panics with a clear message if
    /// `redis-server` is not installed.
    pub fn start() -> RedisServer {
        Self::start_with_args(&[])
    }

    /// Like [`RedisServer::start`], with extra `redis-server` arguments (e.g. `["--maxmemory", "1mb"]`).
    pub fn start_with_args(extra_args: &[&str]) -> RedisServer {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        // Another test process can grab the port between our probe and redis' bind: retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::Builder::new()
                .prefix("chatkit-gate-redis-")
                .tempdir()
                .expect("create temp dir for redis-server");
            let mut server = RedisServer { port, dir, extra_args: extra_args.clone(), process: None };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Other(message)) => panic!("{message}"),
            }
        }
        panic!("redis-server could not bind a free port after 5 tries; last log:\n{last_error}");
    }

    fn start_cluster_node(port: u16) -> Result<RedisServer, StartError> {
        Self::start_cluster_node_with_timeout(port, 5000)
    }

    fn start_cluster_node_with_timeout(port: u16, node_timeout_ms: u32) -> Result<RedisServer, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("chatkit-gate-redis-cluster-")
            .tempdir()
            .expect("create temp dir for redis-server");
        let nodes_conf = dir.path().join("nodes.conf");
        let extra_args = vec![
            "--cluster-enabled".to_string(),
            "yes".to_string(),
            "--cluster-config-file".to_string(),
            nodes_conf.display().to_string(),
            "--cluster-node-timeout".to_string(),
            node_timeout_ms.to_string(),
            // Replicas sync at once instead of after 5 s (only clusters with replicas sync).
            "--repl-diskless-sync-delay".to_string(),
            "0".to_string(),
        ];
        let mut server = RedisServer { port, dir, extra_args, process: None };
        server.spawn_and_wait()?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Whether the process was started and not killed since.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Kills the process (SIGKILL, like a crash) and waits for it to exit. The port stays
    /// recorded so [`RedisServer::restart`] comes back on the same address. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut watched) = self.process.take() {
            watched.stop();
        }
    }

    /// Starts the server again on the same port (killing it first if it is running) and waits
    /// for PING. The data set is empty afterwards (nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        // The old process is gone; its port may briefly be held by another test: retry a bit.
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::PortTaken(log)) => {
                    panic!("redis-server could not rebind port {}:\n{log}", self.port)
                }
                Err(StartError::Other(message)) => panic!("{message}"),
            }
        }
    }

    /// Number of calls of `cmd` (case-insensitive, e.g. `"evalsha"`, `"config|resetstat"`)
    /// since start or the last [`RedisServer::reset_stats`], from `INFO commandstats`.
    /// Commands run by Lua scripts count too, and so do failed calls: an EVALSHA answered
    /// NOSCRIPT is a call (see [`CommandStats::failed_calls`]).
    pub async fn command_count(&self, cmd: &str) -> u64 {
        self.command_stats(cmd).await.calls
    }

    /// Full `INFO commandstats` entry for `cmd`; all zero when the command never ran.
    pub async fn command_stats(&self, cmd: &str) -> CommandStats {
        let info: String = self.query(redis::cmd("INFO").arg("commandstats")).await;
        parse_command_stats(&info, cmd)
    }

    /// `CONFIG RESETSTAT`: zeroes the command statistics.
    pub async fn reset_stats(&self) {
        let _: () = self.query(redis::cmd("CONFIG").arg("RESETSTAT")).await;
    }

    /// `FLUSHALL`: deletes every key (does not touch loaded scripts).
    pub async fn flushall(&self) {
        let _: () = self.query(&redis::cmd("FLUSHALL")).await;
    }

    /// `SCRIPT FLUSH`: forgets cached Lua scripts, so the next EVALSHA gets NOSCRIPT.
    pub async fn script_flush(&self) {
        let _: () = self.query(redis::cmd("SCRIPT").arg("FLUSH")).await;
    }

    /// A fresh async connection, for tests that want to look at keys directly.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to redis at {}: {e}", self.url()))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut con = self.connection().await;
        cmd.query_async(&mut con).await.unwrap_or_else(|e| panic!("redis at {}: {e}", self.url()))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        ensure_installed();
        // A fresh log per start, so "address in use" from an earlier run is not misread.
        let _ = std::fs::remove_file(self.log_path());
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            self.log_path().display().to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("redis-watchdog")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sh for redis-server: {e}"));
        let pipe = child.stdin.take();
        let mut watched = Watched { child, pipe };

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if ping(self.port) {
                self.process = Some(watched);
                return Ok(());
            }
            let log = self.read_log();
            if log.contains("Address already in use") {
                watched.stop();
                return Err(StartError::PortTaken(log));
            }
            if Instant::now() > deadline {
                watched.stop();
                return Err(StartError::Other(format!(
                    "redis-server on port {} did not answer PING within {START_DEADLINE:?}; log:\n{log}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Watched {
    fn stop(&mut self) {
        // EOF on the pipe: the watchdog SIGKILLs redis-server, reaps it, and exits.
        drop(self.pipe.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // The watchdog is stuck; kill it (redis-server may then survive as an orphan).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum StartError {
    PortTaken(String),
    Other(String),
}

/// `INFO commandstats` numbers for one command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandStats {
    pub calls: u64,
    pub rejected_calls: u64,
    pub failed_calls: u64,
}

fn parse_command_stats(info: &str, cmd: &str) -> CommandStats {
    let wanted = format!("cmdstat_{}:", cmd.to_ascii_lowercase());
    let mut stats = CommandStats::default();
    let Some(line) = info.lines().find(|l| l.starts_with(&wanted)) else {
        return stats;
    };
    for field in line[wanted.len()..].trim().split(',') {
        let Some((name, value)) = field.split_once('=') else {
            continue;
        };
        let value = value.parse::<u64>().unwrap_or(0);
        match name {
            "calls" => stats.calls = value,
            "rejected_calls" => stats.rejected_calls = value,
            "failed_calls" => stats.failed_calls = value,
            _ => {}
        }
    }
    stats
}

/// Three masters with `--cluster-enabled yes`, slots split by `redis-cli --cluster create`.
/// Dropping it kills every node.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster nodes on free ports (port and bus port = port + 10000 both free),
    /// creates the cluster, and waits until every node reports `cluster_state:ok` and knows all
    /// three nodes. Blocking, typically 1–3 s.
    pub fn start() -> RedisCluster {
        ensure_installed();
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Other(message)) => panic!("{message}"),
            }
        }
        panic!("redis cluster could not bind free ports after 3 tries; last log:\n{last_error}");
    }

    /// Three masters, each with one replica (six nodes), a 1 s node timeout so that a killed
    /// master's replica takes over within a few seconds. Blocking, typically 2–4 s.
    pub fn start_with_replicas() -> RedisCluster {
        ensure_installed();
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start_with(6, 1, 1000) {
                Ok(cluster) => return cluster,
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Other(message)) => panic!("{message}"),
            }
        }
        panic!("redis cluster could not bind free ports after 3 tries; last log:\n{last_error}");
    }

    fn try_start() -> Result<RedisCluster, StartError> {
        Self::try_start_with(3, 0, 5000)
    }

    fn try_start_with(count: usize, replicas: u32, node_timeout_ms: u32) -> Result<RedisCluster, StartError> {
        let ports = free_cluster_ports(count);
        let mut nodes = Vec::with_capacity(ports.len());
        for port in ports {
            nodes.push(RedisServer::start_cluster_node_with_timeout(port, node_timeout_ms)?);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let output = Command::new(REDIS_CLI)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run `{REDIS_CLI} --cluster create` (is redis-tools installed?): {e}"));
        if !output.status.success() {
            return Err(StartError::Other(format!(
                "`redis-cli --cluster create {}` failed ({}):\n{}\n{}",
                addrs.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok()?;
        if replicas > 0 {
            cluster.wait_until_replicas_synced()?;
        }
        Ok(cluster)
    }

    /// A replica that never synced does not take over: wait until every replica's link is up.
    fn wait_until_replicas_synced(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            let synced = self.nodes.iter().all(|n| {
                resp_call(n.port, &["INFO", "replication"])
                    .is_ok_and(|r| r.contains("role:master") || r.contains("master_link_status:up"))
            });
            if synced {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Other(format!("redis replicas not synced within {CLUSTER_DEADLINE:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_until_ok(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        let expected_nodes = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let mut last = String::new();
            let all_ok = self.nodes.iter().all(|node| match resp_call(node.port, &["CLUSTER", "INFO"]) {
                Ok(info) => {
                    let ok = info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_ok:16384")
                        && info.contains(&expected_nodes);
                    if !ok {
                        last = format!("node {}:\n{info}", node.port);
                    }
                    ok
                }
                Err(e) => {
                    last = format!("node {}: {e}", node.port);
                    false
                }
            });
            if all_ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Other(format!(
                    "redis cluster not ok within {CLUSTER_DEADLINE:?}; last answer from {last}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Indexes (into [`RedisCluster::nodes`]) of the nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].is_running()
                    && resp_call(self.nodes[i].port, &["INFO", "replication"]).is_ok_and(|r| r.contains("role:master"))
            })
            .collect()
    }

    /// Kill node `i` (SIGKILL, no goodbye to the cluster).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// True when every running node reports `cluster_state:ok`.
    pub fn is_ok(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .all(|n| resp_call(n.port, &["CLUSTER", "INFO"]).is_ok_and(|info| info.contains("cluster_state:ok")))
    }

    /// `redis://127.0.0.1:PORT` of every node (all masters).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Calls of `cmd` summed over every node (see [`RedisServer::command_count`]).
    pub async fn command_count(&self, cmd: &str) -> u64 {
        let mut total = 0;
        for node in &self.nodes {
            total += node.command_count(cmd).await;
        }
        total
    }

    pub async fn reset_stats(&self) {
        for node in &self.nodes {
            node.reset_stats().await;
        }
    }

    /// `FLUSHALL` on every master.
    pub async fn flushall(&self) {
        for node in &self.nodes {
            node.flushall().await;
        }
    }

    /// An async cluster connection through the redis crate.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to redis cluster {:?}: {e}", self.urls()))
    }
}

fn ensure_installed() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| match Command::new(REDIS_SERVER).arg("--version").stdout(Stdio::null()).status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`{REDIS_SERVER} --version` failed: {status}"),
        Err(e) => panic!(
            "cannot run `{REDIS_SERVER}` ({e}); integration tests need a real Redis: \
                 install it with `apt-get install -y redis-server` (Debian/Ubuntu)"
        ),
    });
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// `count` distinct ports where both `p` and the cluster bus port `p + 10000` are free.
fn free_cluster_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(count);
    // Hold the listeners while choosing, so the ports of one cluster cannot collide.
    let mut held = Vec::new();
    let mut attempts = 0;
    while ports.len() < count {
        attempts += 1;
        assert!(attempts < 10_000, "could not find free ports for a redis cluster");
        let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) else {
            continue;
        };
        let port = listener.local_addr().expect("local addr").port();
        held.push(listener);
        if u32::from(port) + 10_000 > 65_535 || ports.contains(&(port + 10_000)) {
            continue;
        }
        let Ok(bus) = TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)) else {
            continue;
        };
        held.push(bus);
        ports.push(port);
    }
    ports
}

fn ping(port: u16) -> bool {
    matches!(resp_call(port, &["PING"]), Ok(reply) if reply == "PONG")
}

/// Minimal blocking RESP2 client for readiness checks (before the async world is involved).
/// Returns simple strings, bulk strings and integers as text; `-ERR` replies as errors.
fn resp_call(port: u16, args: &[&str]) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
    match line.split_at_checked(1) {
        Some(("+", rest)) | Some((":", rest)) => Ok(rest.to_string()),
        Some(("-", rest)) => Err(std::io::Error::other(rest.to_string())),
        Some(("$", len)) => {
            let len: usize = len.parse().map_err(|_| invalid(format!("bad bulk length {len}")))?;
            let mut buf = vec![0; len + 2];
            reader.read_exact(&mut buf)?;
            buf.truncate(len);
            String::from_utf8(buf).map_err(|e| invalid(e.to_string()))
        }
        _ => Err(invalid(format!("unexpected reply {line:?}"))),
    }
}

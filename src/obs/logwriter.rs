//! The log output: request threads append finished lines to one shared buffer; a writer thread
//! takes the whole buffer every few milliseconds (or as soon as it is large) and writes it with
//! one call. A request thread never waits for stdout and never wakes the writer per line. When
//! stdout stalls and the buffer reaches its bound, lines are dropped and counted
//! (`chatkit_gate_log_lines_dropped_total`), never queued without limit.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::obs::time::{Fraction, push_rfc3339};

/// Lines dropped because the output fell behind (read by the metrics endpoint).
pub static LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// How often the writer thread looks for lines when nobody wakes it.
const FLUSH_INTERVAL: Duration = Duration::from_millis(10);

struct Shared {
    buf: Mutex<Pending>,
    wake: Condvar,
    /// Bytes at which a line wakes the writer at once instead of waiting for the interval.
    eager_bytes: usize,
    /// Lines held at most while the writer is behind; more are dropped.
    max_lines: usize,
    closed: AtomicBool,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
}

/// A `MakeWriter` for tracing-subscriber: each event's line is appended whole.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is left and stops the writer thread when dropped (at exit).
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BatchWriter {
    /// Start the writer thread on `out`. `max_lines` bounds the lines held while `out` stalls.
    pub fn start<W: Write + Send + 'static>(out: W, max_lines: usize) -> std::io::Result<(BatchWriter, BatchGuard)> {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            eager_bytes: 256 * 1024,
            max_lines,
            closed: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new().name("log-writer".into()).spawn(move || run(&worker, out))?;
        Ok((BatchWriter { shared: shared.clone() }, BatchGuard { shared, thread: Some(thread) }))
    }
}

fn run<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut pending = shared.buf.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.bytes.is_empty() && !shared.closed.load(Ordering::Acquire) {
                pending = shared.wake.wait_timeout(pending, FLUSH_INTERVAL).unwrap_or_else(PoisonError::into_inner).0;
            }
            // Take the batch, leave an empty buffer with capacity behind.
            std::mem::swap(&mut pending.bytes, &mut spare);
            pending.lines = 0;
            shared.closed.load(Ordering::Acquire)
        };
        if !spare.is_empty() {
            // A failed write (stdout closed) loses this batch, like any log sink that is gone.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
        }
        if closed && shared.buf.lock().unwrap_or_else(PoisonError::into_inner).bytes.is_empty() {
            return;
        }
    }
}

impl BatchWriter {
    /// Append one whole line (it ends with `\n`), or drop and count it when the writer is
    /// behind by `max_lines`.
    pub fn line(&self, line: &[u8]) {
        let shared = &self.shared;
        let mut pending = shared.buf.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.lines >= shared.max_lines {
            drop(pending);
            LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.bytes.extend_from_slice(line);
        pending.lines += 1;
        let eager = pending.bytes.len() >= shared.eager_bytes;
        drop(pending);
        if eager {
            shared.wake.notify_one();
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.line(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer of the binary's JSON log, for lines written without tracing's formatter (the
/// access log: one line per request, the hot path). Unset in text mode and in tests.
static JSON_SINK: std::sync::OnceLock<BatchWriter> = std::sync::OnceLock::new();

/// Make `writer` the sink of [`json_sink`] (once, by the binary's logging setup).
pub fn set_json_sink(writer: BatchWriter) {
    let _ = JSON_SINK.set(writer);
}

/// Where pre-formatted JSON lines go, when the log is JSON.
pub fn json_sink() -> Option<&'static BatchWriter> {
    JSON_SINK.get()
}

/// A JSON log line being built, in the shape of tracing-subscriber's flattened JSON format:
/// `{"timestamp":…,"level":…,"message":…, fields…, "target":…}`. Values are written by
/// serde_json, which tracing's JSON format uses, so they come out byte for byte the same.
pub struct JsonLine<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> JsonLine<'a> {
    pub fn start(out: &'a mut Vec<u8>, level: &str, message: &str) -> JsonLine<'a> {
        out.clear();
        out.extend_from_slice(b"{\"timestamp\":\"");
        push_rfc3339(out, std::time::SystemTime::now(), Fraction::Micros);
        out.extend_from_slice(b"\",\"level\":\"");
        out.extend_from_slice(level.as_bytes());
        out.push(b'"');
        let mut line = JsonLine { out };
        line.str("message", message);
        line
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_json_str(self.out, value);
        self
    }

    /// An IP address as a string (IPv4 without the formatting machinery).
    pub fn ip(&mut self, key: &str, ip: std::net::IpAddr) -> &mut Self {
        let std::net::IpAddr::V4(v4) = ip else { return self.str(key, &ip.to_string()) };
        self.key(key);
        self.out.push(b'"');
        let mut digits = itoa::Buffer::new();
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            self.out.extend_from_slice(digits.format(octet).as_bytes());
        }
        self.out.push(b'"');
        self
    }

    /// An integer.
    pub fn uint(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, &value);
        self
    }

    /// A float: shortest round-trip digits (`2.0`, not `2`), `null` when not finite.
    pub fn float(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, &value);
        self
    }

    /// End the line with its `target`.
    pub fn finish(&mut self, target: &str) {
        self.str("target", target);
        self.out.extend_from_slice(b"}\n");
    }

    /// Keys are the gate's own field names, which need no escaping.
    fn key(&mut self, key: &str) {
        debug_assert!(!key.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\'), "{key:?}");
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }
}

/// A JSON string (writing to a `Vec` cannot fail).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(out, s);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A sink that can be stalled, recording what it was given.
    #[derive(Clone, Default)]
    struct Sink {
        data: Arc<Mutex<Vec<u8>>>,
        stalled: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _wait = self.stalled.lock().unwrap();
            self.data.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(line: &[u8]) -> &str {
        std::str::from_utf8(line).unwrap()
    }

    #[test]
    fn json_lines_parse_and_carry_a_tracing_style_timestamp() {
        let mut out = Vec::new();
        JsonLine::start(&mut out, "INFO", "request")
            .str("route", "a\"b\\c")
            .uint("status", 200)
            .float("duration_ms", 1.25)
            .ip("client_ip", std::net::IpAddr::from([203, 0, 113, 9]))
            .finish("chatkit_gate::proxy");
        assert!(out.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["route"], "a\"b\\c");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.25);
        assert_eq!(v["client_ip"], "203.0.113.9");
        assert_eq!(v["target"], "chatkit_gate::proxy");
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!((ts.len(), &ts[10..11], &ts[19..20], &ts[26..]), (27, "T", ".", "Z"), "{ts}");
    }

    /// Strings, numbers and addresses come out byte for byte as serde_json (tracing's JSON
    /// format) writes them.
    #[test]
    fn values_are_written_exactly_as_serde_json_writes_them() {
        let strings = ["", "plain", "a\"b\\c", "tab\tnl\ncr\r", "\u{8}\u{c}\u{1}\u{1f}", "é ünï 雪 🚀", "\u{7f}x"];
        for s in strings {
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(text(&out), serde_json::to_string(s).unwrap(), "{s:?}");
        }
        for v in [0.0, 2.0, 1.25, 0.001, 1234.567, 1e-7, 12345678.9, f64::MAX, 0.1 + 0.2] {
            let mut out = Vec::new();
            JsonLine { out: &mut out }.float("v", v);
            assert_eq!(text(&out), format!(",\"v\":{}", serde_json::to_string(&v).unwrap()), "{v}");
        }
        let mut out = Vec::new();
        JsonLine { out: &mut out }.float("v", f64::NAN).uint("n", u64::MAX);
        assert_eq!(text(&out), format!(",\"v\":null,\"n\":{}", u64::MAX));
        for ip in ["0.0.0.0", "255.255.255.255", "10.0.12.7", "::1", "2001:db8::7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            JsonLine { out: &mut out }.ip("ip", ip);
            assert_eq!(text(&out), format!(",\"ip\":\"{ip}\""));
        }
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_the_guard_flushes_the_rest() {
        let sink = Sink::default();
        let (mut w, guard) = BatchWriter::start(sink.clone(), 100).unwrap();
        for i in 0..50 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.data.lock().unwrap().clone()).unwrap();
        let expected: String = (0..50).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_stalled_output_drops_lines_past_the_bound_without_blocking() {
        let sink = Sink::default();
        let stall = sink.stalled.lock().unwrap();
        let (mut w, guard) = BatchWriter::start(sink.clone(), 10).unwrap();
        // The first batch may already be with the stalled writer; the rest waits in the buffer.
        w.write_all(b"first\n").unwrap();
        std::thread::sleep(FLUSH_INTERVAL * 5);
        let before = LINES_DROPPED.load(Ordering::Relaxed);
        for _ in 0..100 {
            w.write_all(b"more\n").unwrap();
        }
        assert!(LINES_DROPPED.load(Ordering::Relaxed) - before >= 90);
        drop(stall);
        drop(guard);
        let text = String::from_utf8(sink.data.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("first\n"), "{text}");
        assert_eq!(text.lines().count(), 11, "{text}");
    }
}

//! The log output: request threads append finished lines to one shared buffer; a writer thread
//! takes the whole buffer every few milliseconds (or as soon as it is large) and writes it with
//! one call. A request thread never waits for stdout and never wakes the writer per line. When
//! stdout stalls and the buffer reaches its bound, lines are dropped and counted
//! (`chatkit_gate_log_lines_dropped_total`), never queued without limit.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

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

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = &self.shared;
        let mut pending = shared.buf.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.lines >= shared.max_lines {
            drop(pending);
            LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        pending.bytes.extend_from_slice(line);
        pending.lines += 1;
        let eager = pending.bytes.len() >= shared.eager_bytes;
        drop(pending);
        if eager {
            shared.wake.notify_one();
        }
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

//! Worker threads: each a single-threaded runtime that accepts and serves its own connections,
//! and the thread-local worker number that per-worker state (the app's idle connections) is
//! looked up by.

use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's worker number: 0 for the thread `run` is called on, 1… for [`Workers`].
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker the current thread is (0 outside [`Workers`]): per-worker state, such as the
/// app's idle connections, is looked up by it.
pub fn worker_index() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// The further workers of `server.workers` > 1. Each is a thread with its own single-threaded
/// runtime that accepts on the gate's listeners and runs the connections it accepted to their
/// end, with the app connections they use (nginx's worker processes, as threads): no
/// work-stealing scheduler and no cross-thread wake-ups on the proxy path. The thread `run` is
/// called on is worker 0 and also runs the admin listener and the background tasks.
pub struct Workers {
    pub(crate) handles: Vec<tokio::runtime::Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// No further workers: everything on the caller's runtime.
    pub fn none() -> Workers {
        Workers { handles: Vec::new(), stop: CancellationToken::new(), threads: Vec::new() }
    }

    /// Start `n` worker threads (numbered 1 to `n`), each with its runtime running.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Workers::none();
        for i in 1..=n {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new().name(format!("gate-worker-{i}")).spawn(move || {
                WORKER.with(|w| w.set(i));
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                // Runs the tasks spawned on this runtime until the gate has finished.
                rt.block_on(stop.cancelled());
            })?;
            workers.threads.push(thread);
            let handle = rx.recv().map_err(|_| std::io::Error::other("worker thread exited at start"))??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Workers in all, the caller's thread included.
    pub fn count(&self) -> usize {
        self.handles.len() + 1
    }
}

impl Drop for Workers {
    /// Stop the worker threads; tasks still on them (connections past `shutdown_grace`) are
    /// dropped with their runtimes, as those of the caller's runtime are when it ends.
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

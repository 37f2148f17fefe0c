//! What every connection of the gate shares ([`ConnCtx`]): the gateway, the HTTP servers, the
//! timeouts, the drain signal, and the connections open on each worker (for fair accepting).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::Gateway;
use crate::server::protocols::Protocols;

/// Shared by every connection, whatever listener and worker accepted it.
pub(crate) struct ConnCtx {
    pub(crate) max_connections: usize,
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) http: Arc<Protocols>,
    pub(crate) drain: CancellationToken,
    pub(crate) idle_timeout: Duration,
    pub(crate) header_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    /// Connections open on each worker, for [`ConnCtx::defer_accept`].
    pub(crate) open_by_worker: Box<[std::sync::atomic::AtomicUsize]>,
}

/// How long a worker that holds more connections than another waits before it accepts anyway
/// (a worker stuck elsewhere must not keep new connections waiting in the queue).
pub(crate) const ACCEPT_DEFER: Duration = Duration::from_millis(1);

impl ConnCtx {
    /// Should `worker` leave the next connection to a worker holding fewer (by more than an
    /// eighth of its own)? Every worker is woken for a new connection on the shared listener, and
    /// the first one awake would otherwise take them all: a client opening 64 connections at
    /// once, or an ingress keeping two, would get one worker.
    pub(crate) fn defer_accept(&self, worker: usize) -> bool {
        let open = &self.open_by_worker;
        if open.len() < 2 {
            return false;
        }
        let mine = open[worker].load(Ordering::Relaxed);
        open.iter().any(|o| mine.saturating_sub(o.load(Ordering::Relaxed)) > mine / 8)
    }
}

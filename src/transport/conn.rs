//! One client connection's state shared with its requests ([`ConnActivity`]: in flight, idle
//! since, header wait) and the monotonic millisecond [`Clock`] the timeouts are read from.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use http::HeaderValue;
use tokio::sync::OwnedSemaphorePermit;

/// Per-connection activity, for the idle timeout: requests in flight (streams included) and
/// when the last one finished.
#[derive(Debug, Default)]
pub struct ConnActivity {
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
    /// HTTP/1: when the first byte of a request head arrived while nothing was in flight
    /// (`NOT_WAITING` otherwise); the header timeout runs from there, not from the last answer.
    head_since_ms: AtomicU64,
    /// HTTP/2 connections have no header wait to time (frames flow while idle).
    multiplexed: std::sync::atomic::AtomicBool,
    /// The connection's `max_connections` slot: held by the connection and by a tunnel that
    /// outlives it (an upgraded connection still counts).
    _permit: Option<OwnedSemaphorePermit>,
    /// The peer's address as a header value, for `X-Forwarded-For` (made once).
    peer_value: std::sync::OnceLock<HeaderValue>,
}

impl ConnActivity {
    /// A new connection: the header timeout runs from now for its first request.
    pub fn new(permit: Option<OwnedSemaphorePermit>, now_ms: u64) -> ConnActivity {
        let c = ConnActivity { _permit: permit, ..ConnActivity::default() };
        c.head_since_ms.store(now_ms, Ordering::Relaxed);
        c.idle_since_ms.store(now_ms, Ordering::Relaxed);
        c
    }

    /// Restart the first request's header clock (after the TLS handshake).
    pub fn first_request_clock(&self, now_ms: u64) {
        self.head_since_ms.store(now_ms, Ordering::Relaxed);
        self.idle_since_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Bytes arrived from the client: between requests on HTTP/1 they start a request head.
    /// The clock is read only then (not on every read).
    pub fn bytes_received(&self, clock: &Clock) {
        if !self.multiplexed.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NOT_WAITING
        {
            self.head_since_ms.store(clock.now_ms(), Ordering::Relaxed);
        }
    }

    /// How long a request head has been arriving, if one is.
    pub fn head_wait_ms(&self, now_ms: u64) -> Option<u64> {
        let since = self.head_since_ms.load(Ordering::Relaxed);
        (since != NOT_WAITING && !self.multiplexed.load(Ordering::Relaxed)).then(|| now_ms.saturating_sub(since))
    }

    /// A request (or an HTTP/2 stream) began: it is in flight until [`ConnActivity::request_ended`].
    pub fn request_started(&self, version: http::Version) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(NOT_WAITING, Ordering::Relaxed);
        if version == http::Version::HTTP_2 {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
    }

    /// A request ended; true when it was the last one in flight (the connection is now idle).
    pub fn request_ended(&self) -> bool {
        self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Milliseconds idle at `now_ms`, or `None` while a request is in flight.
    pub fn idle_ms(&self, now_ms: u64) -> Option<u64> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Acquire)))
    }

    /// The peer's address as a header value (one connection has one peer).
    pub fn peer_value(&self, peer: SocketAddr) -> &HeaderValue {
        self.peer_value.get_or_init(|| crate::http::forwarded::peer_value(peer))
    }

    pub fn touch(&self, now_ms: u64) {
        self.idle_since_ms.store(now_ms, Ordering::Release);
    }
}

const NOT_WAITING: u64 = u64::MAX;

/// A monotonic millisecond clock shared by connections.
#[derive(Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    /// `at` on this clock (what [`Clock::now_ms`] said then).
    pub fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0).as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

//! The introspection circuit breaker: after `breaker_failures` consecutive failed calls it opens
//! and calls fail at once for `breaker_cooldown`; then one probe call is let through (half-open):
//! its success closes the breaker, its failure opens it again. Every change is logged and
//! `chatkit_gate_auth_breaker_open` follows it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

/// What [`Breaker::admit`] allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// Closed: a normal call.
    Call,
    /// Half-open: the one probe call.
    Probe,
}

pub(crate) struct Breaker {
    /// 0 = no breaker.
    threshold: u32,
    cooldown_ms: u64,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls fail fast.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
    epoch: Instant,
    gauge: IntGauge,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration, gauge: IntGauge) -> Breaker {
        gauge.set(0);
        Breaker {
            threshold,
            cooldown_ms: cooldown.as_millis().min(u128::from(u32::MAX)) as u64,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
            gauge,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// May a call be made now? `None` = the breaker is open: fail fast.
    pub fn admit(&self) -> Option<CallKind> {
        if self.threshold == 0 || self.failures.load(Ordering::Acquire) < self.threshold {
            return Some(CallKind::Call);
        }
        if self.now_ms() < self.open_until_ms.load(Ordering::Acquire) {
            return None;
        }
        // Cooled down: exactly one caller probes; the others keep failing fast meanwhile.
        self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| CallKind::Probe)
    }

    /// An admitted probe that was not made after all (no verdict): the next caller probes.
    pub fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// The outcome of an admitted call.
    pub fn record(&self, admit: CallKind, ok: bool) {
        if self.threshold == 0 {
            return;
        }
        if ok {
            let before = self.failures.swap(0, Ordering::AcqRel);
            if admit == CallKind::Probe {
                self.probing.store(false, Ordering::Release);
            }
            if before >= self.threshold {
                self.gauge.set(0);
                tracing::info!("introspection answering again: circuit breaker closed");
            }
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if failures >= self.threshold && (admit == CallKind::Probe || failures == self.threshold) {
            self.open_until_ms.store(self.now_ms() + self.cooldown_ms, Ordering::Release);
            self.gauge.set(1);
            if admit == CallKind::Probe {
                self.probing.store(false, Ordering::Release);
                tracing::warn!(
                    cooldown_ms = self.cooldown_ms,
                    "introspection probe failed: circuit breaker open again"
                );
            } else {
                tracing::warn!(
                    consecutive_failures = failures,
                    cooldown_ms = self.cooldown_ms,
                    "introspection failing: circuit breaker open, calls fail fast until a probe succeeds"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_one_probe_decides() {
        let g = IntGauge::new("b", "test").unwrap();
        let b = Breaker::new(3, Duration::from_millis(30), g.clone());
        for _ in 0..2 {
            let a = b.admit().unwrap();
            b.record(a, false);
        }
        b.record(b.admit().unwrap(), true);
        for _ in 0..3 {
            let a = b.admit().unwrap();
            b.record(a, false);
        }
        assert_eq!(g.get(), 1);
        assert_eq!(b.admit(), None, "open: fail fast");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Some(CallKind::Probe));
        assert_eq!(b.admit(), None, "only one probe at a time");
        b.release_probe();
        assert_eq!(b.admit(), Some(CallKind::Probe), "a probe not made leaves the breaker open for the next");
        b.record(CallKind::Probe, false);
        assert_eq!(b.admit(), None, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().unwrap();
        b.record(probe, true);
        assert_eq!((b.admit(), g.get()), (Some(CallKind::Call), 0));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = Breaker::new(0, Duration::from_secs(1), IntGauge::new("b", "test").unwrap());
        for _ in 0..100 {
            b.record(CallKind::Call, false);
        }
        assert_eq!(b.admit(), Some(CallKind::Call));
    }
}

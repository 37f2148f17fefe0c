//! The in-process store: the embedded default when no Redis is configured, and the
//! `on_store_error = "local"` fallback. Same algorithms and answers as `scripts/check.lua`,
//! on this process's monotonic clock; entries expire like Redis keys do, so memory is bounded
//! by the clients active within a window.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::ratelimit::policy::{Algo, Check, Verdict};

/// Most keys held at once. Past it (after sweeping expired ones), a request on a new key is
/// admitted without being recorded, and that is logged once: better than evicting live counts.
const MAX_KEYS: usize = 1_000_000;
/// Independent parts, each with its own lock, so requests of different clients rarely wait on
/// each other and no sweep or rehash stalls more than a sixteenth of the store.
const SHARDS: usize = 16;
/// How often expired keys are swept (microseconds).
const SWEEP_EVERY_US: i64 = 1_000_000;

#[derive(Debug)]
enum State {
    /// Admission times, oldest first.
    Log(VecDeque<i64>),
    /// GCRA theoretical arrival time.
    Tat(i64),
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// When the entry says nothing any more (like a Redis key's TTL).
    expires_us: i64,
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<String, Entry>,
    next_sweep_us: i64,
}

#[derive(Debug)]
pub(crate) struct LocalStore {
    /// Keys go to a shard by their hash tag, so one client's keys usually share a lock.
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    full_logged: AtomicBool,
    /// Next shard to sweep after a check, so shards no request touches are swept too.
    sweep_cursor: AtomicUsize,
    epoch: Instant,
}

/// Pass-1 reading of one policy.
#[derive(Clone, Copy)]
enum Reading {
    Count(i64),
    Tat(i64),
}

impl LocalStore {
    pub fn new() -> LocalStore {
        LocalStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            full_logged: AtomicBool::new(false),
            sweep_cursor: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    /// `check`, and the time it decided at (what `release` needs to find a lease's entry).
    pub fn check_timed(&self, checks: &[Check<'_>]) -> (Vec<Verdict>, i64) {
        let now = self.now_us();
        (self.check_at(checks, now), now)
    }

    fn now_us(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    /// Remove the sliding-log entry admitted at `admitted_us` (a concurrency lease ending).
    /// Entries are in time order; an entry that already aged out (TTL) is not there any more.
    pub fn release(&self, key: &str, admitted_us: i64) {
        let tag_end = key.find('}').map_or(key.len(), |i| i + 1);
        let shard = self.hasher.hash_one(&key[..tag_end]) as usize % SHARDS;
        let mut shard = self.shards[shard].lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Entry { state: State::Log(log), .. }) = shard.entries.get_mut(key)
            && let Ok(i) = log.binary_search(&admitted_us)
        {
            log.remove(i);
        }
    }

    /// `check` at a given time (microseconds since the store's epoch), so tests control time.
    pub fn check_at(&self, checks: &[Check<'_>], now: i64) -> Vec<Verdict> {
        // Lock every shard the request touches, in index order (no deadlock), for the whole
        // check: the request's policies are decided atomically, as in the Lua script.
        let ids: Vec<usize> = checks.iter().map(|c| self.hasher.hash_one(c.tag()) as usize % SHARDS).collect();
        let mut order = ids.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, self.shards[i].lock().unwrap_or_else(PoisonError::into_inner))).collect();
        for (_, shard) in &mut guards {
            sweep(shard, now);
        }

        // Pass 1: read, dropping what aged out.
        let mut readings = Vec::with_capacity(checks.len());
        let mut admit = true;
        for (i, c) in checks.iter().enumerate() {
            let live = shard_mut(&mut guards, ids[i]).entries.get_mut(c.key.as_str()).filter(|e| e.expires_us > now);
            let reading = match c.policy.algo {
                Algo::SlidingWindow { limit, window_us } => {
                    let count = match live.map(|e| &mut e.state) {
                        Some(State::Log(log)) => {
                            while log.front().is_some_and(|&t| t <= now - window_us) {
                                log.pop_front();
                            }
                            log.len() as i64
                        }
                        _ => 0,
                    };
                    admit &= count < i64::from(limit);
                    Reading::Count(count)
                }
                Algo::Gcra { burst, interval_us } => {
                    let tat = match live.map(|e| &e.state) {
                        Some(State::Tat(tat)) => (*tat).max(now),
                        _ => now,
                    };
                    admit &=
                        tat.saturating_add(interval_us).saturating_sub(i64::from(burst).saturating_mul(interval_us))
                            <= now;
                    Reading::Tat(tat)
                }
            };
            readings.push(reading);
        }

        // Pass 2: consume when every policy admits, and report.
        let mut outcomes = Vec::with_capacity(checks.len());
        for (i, (c, reading)) in checks.iter().zip(readings).enumerate() {
            let inner = shard_mut(&mut guards, ids[i]);
            let outcome = match (c.policy.algo, reading) {
                (Algo::SlidingWindow { limit, window_us }, Reading::Count(count)) => {
                    let limit = i64::from(limit);
                    let allowed = count < limit;
                    let mut count = count;
                    if admit && self.may_record(inner, &c.key, now) {
                        let entry = inner
                            .entries
                            .entry(c.key.clone())
                            .or_insert_with(|| Entry { state: State::Log(VecDeque::new()), expires_us: 0 });
                        if !matches!(entry.state, State::Log(_)) || entry.expires_us <= now {
                            entry.state = State::Log(VecDeque::new());
                        }
                        if let State::Log(log) = &mut entry.state {
                            log.push_back(now);
                        }
                        entry.expires_us = now.saturating_add(window_us);
                        count += 1;
                    }
                    let wait = match inner.entries.get(c.key.as_str()).map(|e| &e.state) {
                        Some(State::Log(log)) if count > 0 => {
                            let idx = usize::try_from((count - limit).max(0)).unwrap_or(0);
                            log.get(idx).map_or(0, |&t| t.saturating_add(window_us).saturating_sub(now).max(0))
                        }
                        _ => 0,
                    };
                    Verdict { allowed, remaining: (limit - count).max(0) as u64, wait: micros(wait) }
                }
                (Algo::Gcra { burst, interval_us }, Reading::Tat(tat)) => {
                    let burst = i64::from(burst);
                    let depth = burst.saturating_mul(interval_us);
                    let allowed = tat.saturating_add(interval_us).saturating_sub(depth) <= now;
                    let mut tat = tat;
                    if admit && self.may_record(inner, &c.key, now) {
                        tat = tat.saturating_add(interval_us);
                        inner.entries.insert(c.key.clone(), Entry { state: State::Tat(tat), expires_us: tat });
                    }
                    let remaining = (now.saturating_add(depth).saturating_sub(tat) / interval_us).clamp(0, burst);
                    let wait = if remaining >= burst {
                        0
                    } else {
                        tat.saturating_sub((burst - remaining - 1).saturating_mul(interval_us)).saturating_sub(now)
                    };
                    Verdict { allowed, remaining: remaining as u64, wait: micros(wait.max(0)) }
                }
                // A reading always matches its policy's algorithm.
                _ => Verdict { allowed: true, remaining: 0, wait: Duration::ZERO },
            };
            outcomes.push(outcome);
        }
        drop(guards);
        let next = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
        if let Ok(mut shard) = self.shards[next].try_lock() {
            sweep(&mut shard, now);
        }
        outcomes
    }

    /// Whether `key` may be written: always for a known key; for a new one, only while its shard
    /// holds fewer than its share of `MAX_KEYS` (after a sweep). Logs once when full.
    fn may_record(&self, shard: &mut Shard, key: &str, now: i64) -> bool {
        if shard.entries.len() < MAX_KEYS / SHARDS || shard.entries.contains_key(key) {
            return true;
        }
        shard.entries.retain(|_, e| e.expires_us > now);
        if shard.entries.len() < MAX_KEYS / SHARDS {
            return true;
        }
        if !self.full_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(max_keys = MAX_KEYS, "in-process rate-limit store full; new clients pass uncounted");
        }
        false
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).entries.len()).sum()
    }
}

/// Drop the shard's expired entries, at most once per `SWEEP_EVERY_US`.
fn sweep(shard: &mut Shard, now: i64) {
    if now >= shard.next_sweep_us {
        shard.entries.retain(|_, e| e.expires_us > now);
        shard.next_sweep_us = now + SWEEP_EVERY_US;
    }
}

/// The locked shard `id` (always among `guards`: they were taken for exactly these ids).
fn shard_mut<'a>(guards: &'a mut [(usize, MutexGuard<'_, Shard>)], id: usize) -> &'a mut Shard {
    let pos = guards.iter().position(|(i, _)| *i == id).unwrap_or(0);
    &mut guards[pos].1
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::{Algorithm, LimitKey, PolicySettings};
    use crate::ratelimit::policy::Policy;

    fn policy(algorithm: Algorithm, limit: u32, window_ms: u64, burst: u32) -> Policy {
        Policy::new(&PolicySettings {
            name: "p".into(),
            algorithm,
            limit,
            window: Duration::from_millis(window_ms),
            burst,
            key: LimitKey::User,
        })
    }

    fn check<'a>(p: &'a Policy, key: &str) -> Check<'a> {
        Check { policy: p, key: key.into(), tag_end: key.len() }
    }

    fn admitted(store: &LocalStore, checks: &[Check<'_>], now_ms: i64) -> bool {
        store.check_at(checks, now_ms * 1000).iter().all(|o| o.allowed)
    }

    #[test]
    fn sliding_window_is_exact_and_rejections_consume_nothing() {
        let store = LocalStore::new();
        let p = policy(Algorithm::SlidingWindow, 5, 60_000, 5);
        let c = [check(&p, "k")];
        for t in 0..5 {
            assert!(admitted(&store, &c, 1000 + t));
        }
        // Rejections, however many, do not push the window out.
        for t in 0..100 {
            let o = store.check_at(&c, (2000 + t) * 1000)[0];
            assert!(!o.allowed);
            assert_eq!(o.remaining, 0);
            assert_eq!(o.wait, Duration::from_micros((61_000 - 2000 - t) as u64 * 1000));
        }
        // The oldest (t=1000ms) ages out at 61000ms exactly: one more, then blocked again.
        assert!(!admitted(&store, &c, 60_999));
        assert!(admitted(&store, &c, 61_000));
        assert!(!admitted(&store, &c, 61_000));
        assert!(admitted(&store, &c, 61_001));
    }

    #[test]
    fn sliding_window_reports_remaining_and_next_unit() {
        let store = LocalStore::new();
        let p = policy(Algorithm::SlidingWindow, 5, 60_000, 5);
        let c = [check(&p, "k")];
        store.check_at(&c, 0);
        store.check_at(&c, 10_000_000);
        let o = store.check_at(&c, 19_000_000)[0];
        assert_eq!((o.allowed, o.remaining, o.wait), (true, 2, Duration::from_secs(41)));
    }

    #[test]
    fn gcra_admits_the_burst_then_the_steady_rate() {
        let store = LocalStore::new();
        // 10 per second (one per 100ms), bucket of 3.
        let p = policy(Algorithm::Gcra, 10, 1000, 3);
        let c = [check(&p, "k")];
        let now = 5_000;
        let remaining: Vec<u64> = (0..3).map(|_| store.check_at(&c, now * 1000)[0].remaining).collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let o = store.check_at(&c, now * 1000)[0];
        assert_eq!((o.allowed, o.wait), (false, Duration::from_millis(100)));
        assert!(!admitted(&store, &c, now + 99));
        assert!(admitted(&store, &c, now + 100));
        assert!(!admitted(&store, &c, now + 150));
        assert!(admitted(&store, &c, now + 200));
        // Idle long enough, the whole burst is back.
        let later = now + 10_000;
        assert_eq!((0..4).filter(|_| admitted(&store, &c, later)).count(), 3);
    }

    #[test]
    fn a_request_is_admitted_only_when_every_policy_admits() {
        let store = LocalStore::new();
        let small = policy(Algorithm::SlidingWindow, 2, 60_000, 2);
        let big = policy(Algorithm::Gcra, 10, 60_000, 10);
        let both = [check(&small, "ip"), check(&big, "user")];
        assert!(admitted(&store, &both, 0));
        assert!(admitted(&store, &both, 0));
        let o = store.check_at(&both, 0);
        assert_eq!((o[0].allowed, o[1].allowed), (false, true));
        // The gcra policy was not charged for the rejected request: 8 left, not 7.
        assert_eq!(o[1].remaining, 8);
    }

    #[test]
    fn expired_keys_are_swept() {
        let store = LocalStore::new();
        let p = policy(Algorithm::SlidingWindow, 5, 1000, 5);
        for i in 0..100 {
            store.check_at(&[check(&p, &format!("k{i}"))], 0);
        }
        assert_eq!(store.len(), 100);
        // Each check sweeps the shards it locks and one more, in turn.
        for _ in 0..SHARDS {
            store.check_at(&[check(&p, "other")], 5_000_000);
        }
        assert_eq!(store.len(), 1);
    }
}

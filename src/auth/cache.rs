//! The decision cache: bounded (least recently used evicted, per shard), keyed by a hash of the
//! forwarded credentials, with single-flight so concurrent misses for one key share one call.
//!
//! Locks are plain `std::sync::Mutex`es held for a few pointer moves, never across an await:
//! a flight's result is published through a `tokio::sync::watch` channel instead.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use prometheus::IntGauge;
use tokio::sync::watch;

/// A SHA-256 of the forwarded credentials (salted per process). Never the credentials.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key(pub [u8; 32]);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly distributed: hand 8 bytes (not the shard-selecting one) to the map.
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[8..16]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

/// Pass-through hasher for [`Key`] (which is already a cryptographic hash).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

/// What a lookup found.
pub(crate) enum Lookup<V: Clone, O: Clone> {
    /// A fresh cached decision.
    Fresh(V),
    /// No fresh decision: wait for `rx`. `lead` is set when this caller must make the call.
    /// `stale` is a cached value past its TTL but within its stale window (for errors).
    Pending { rx: watch::Receiver<Option<O>>, lead: Option<Flight<V, O>>, stale: Option<V> },
}

/// What a finished flight does to the cache.
pub(crate) enum Store<V> {
    /// Cache `value`: fresh until `fresh_until`, usable on errors until `stale_until`.
    Insert { value: V, fresh_until: Instant, stale_until: Instant },
    /// Forget any cached decision for the key (an answer that must not be cached).
    Remove,
    /// Leave the cache as it is (errors are never cached, and keep a stale value usable).
    Keep,
}

struct Entry<V> {
    value: V,
    fresh_until: Instant,
    stale_until: Instant,
}

struct Shard<V, O> {
    lru: Lru<Entry<V>>,
    /// Calls in flight: id of the flight and a receiver to hand to followers.
    inflight: KeyMap<(u64, watch::Receiver<Option<O>>)>,
}

struct Inner<V, O> {
    shards: Box<[Mutex<Shard<V, O>>]>,
    mask: usize,
    next_flight: AtomicU64,
    entries: IntGauge,
}

/// Sharded LRU of decisions plus the single-flight table. Cheap to clone.
pub(crate) struct DecisionCache<V, O> {
    inner: Arc<Inner<V, O>>,
}

impl<V, O> Clone for DecisionCache<V, O> {
    fn clone(&self) -> Self {
        DecisionCache { inner: self.inner.clone() }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V: Clone, O: Clone> DecisionCache<V, O> {
    /// A cache holding at most `max_entries` decisions; `entries` tracks how many it holds.
    pub fn new(max_entries: usize, entries: IntGauge) -> Self {
        let max_entries = max_entries.max(1);
        // Up to 16 shards, never more than entries, so the per-shard bounds add up to at most max.
        let n = max_entries.min(16);
        let shards = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let per_shard = max_entries / shards;
        let shards = (0..shards)
            .map(|_| Mutex::new(Shard { lru: Lru::new(per_shard), inflight: KeyMap::default() }))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let mask = shards.len() - 1;
        DecisionCache { inner: Arc::new(Inner { shards, mask, next_flight: AtomicU64::new(0), entries }) }
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard<V, O>> {
        &self.inner.shards[usize::from(key.0[0]) & self.inner.mask]
    }

    /// A fresh decision, or the flight to wait for (joining one in progress or starting one).
    pub fn lookup(&self, key: Key, now: Instant) -> Lookup<V, O> {
        let mut shard = lock(self.shard(&key));
        let mut stale = None;
        let mut expired = false;
        if let Some(entry) = shard.lru.get(&key) {
            if now < entry.fresh_until {
                return Lookup::Fresh(entry.value.clone());
            }
            if now < entry.stale_until {
                stale = Some(entry.value.clone());
            } else {
                expired = true;
            }
        }
        if expired && shard.lru.remove(&key) {
            self.inner.entries.dec();
        }
        if let Some((_, rx)) = shard.inflight.get(&key) {
            return Lookup::Pending { rx: rx.clone(), lead: None, stale };
        }
        let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        shard.inflight.insert(key, (id, rx.clone()));
        let flight = Flight { cache: self.clone(), key, id, tx: Some(tx) };
        Lookup::Pending { rx, lead: Some(flight), stale }
    }

    /// Cache `value` under `key` outside any flight (the same decision under a credential the
    /// answer rotated to).
    pub fn insert(&self, key: Key, value: V, fresh_until: Instant, stale_until: Instant) {
        let mut shard = lock(self.shard(&key));
        let before = shard.lru.len();
        shard.lru.insert(key, Entry { value, fresh_until, stale_until });
        let after = shard.lru.len();
        drop(shard);
        self.inner.entries.add(after as i64 - before as i64);
    }

    /// How many decisions are held (all shards).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).lru.len()).sum()
    }

    fn end_flight(&self, key: Key, id: u64, store: Store<V>) {
        let mut shard = lock(self.shard(&key));
        if shard.inflight.get(&key).is_some_and(|(f, _)| *f == id) {
            shard.inflight.remove(&key);
        }
        let before = shard.lru.len();
        match store {
            Store::Insert { value, fresh_until, stale_until } => {
                shard.lru.insert(key, Entry { value, fresh_until, stale_until });
            }
            Store::Remove => {
                shard.lru.remove(&key);
            }
            Store::Keep => {}
        }
        let after = shard.lru.len();
        drop(shard);
        self.inner.entries.add(after as i64 - before as i64);
    }
}

/// The right (and duty) to make the call for a key. Finishing it updates the cache and wakes
/// every follower; dropping it unfinished (a panic, a cancelled task) still clears the flight so
/// the next request starts a new one, and followers see a closed channel.
pub(crate) struct Flight<V: Clone, O: Clone> {
    cache: DecisionCache<V, O>,
    key: Key,
    id: u64,
    tx: Option<watch::Sender<Option<O>>>,
}

impl<V: Clone, O: Clone> Flight<V, O> {
    /// Update the cache, then publish `outcome` to everyone waiting.
    pub fn finish(mut self, store: Store<V>, outcome: O) {
        self.cache.end_flight(self.key, self.id, store);
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(outcome));
        }
    }
}

impl<V: Clone, O: Clone> Drop for Flight<V, O> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.cache.end_flight(self.key, self.id, Store::Keep);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A fixed-capacity LRU map: a slab of nodes in a doubly linked recency list plus a key index.
// ---------------------------------------------------------------------------------------------

const NIL: usize = usize::MAX;

struct Node<T> {
    key: Key,
    value: Option<T>,
    prev: usize,
    next: usize,
}

struct Lru<T> {
    index: KeyMap<usize>,
    nodes: Vec<Node<T>>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used: evicted first.
    tail: usize,
    capacity: usize,
}

impl<T> Lru<T> {
    fn new(capacity: usize) -> Self {
        Lru {
            index: KeyMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.max(1),
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        match prev {
            NIL => self.head = next,
            p => self.nodes[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n].prev = prev,
        }
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.nodes[h].prev = i,
        }
        self.head = i;
    }

    /// The value for `key`, marked most recently used.
    fn get(&mut self, key: &Key) -> Option<&T> {
        let i = *self.index.get(key)?;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        self.nodes[i].value.as_ref()
    }

    /// Insert or replace; evicts the least recently used entry when full.
    fn insert(&mut self, key: Key, value: T) {
        if let Some(&i) = self.index.get(&key) {
            self.nodes[i].value = Some(value);
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return;
        }
        if self.index.len() >= self.capacity && self.tail != NIL {
            let victim = self.nodes[self.tail].key;
            self.remove(&victim);
        }
        let node = Node { key, value: Some(value), prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.index.insert(key, i);
        self.push_front(i);
    }

    /// Remove `key`; true when it was there.
    fn remove(&mut self, key: &Key) -> bool {
        let Some(i) = self.index.remove(key) else {
            return false;
        };
        self.unlink(i);
        self.nodes[i].value = None;
        self.free.push(i);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    fn key(n: u8) -> Key {
        let mut k = [0u8; 32];
        k[0] = n;
        k[8] = n;
        Key(k)
    }

    fn gauge() -> IntGauge {
        IntGauge::new("entries", "test").unwrap()
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert(key(1), "a");
        lru.insert(key(2), "b");
        assert_eq!(lru.get(&key(1)), Some(&"a"));
        lru.insert(key(3), "c");
        assert_eq!(lru.get(&key(2)), None, "2 was least recently used");
        assert_eq!(lru.get(&key(1)), Some(&"a"));
        assert_eq!(lru.get(&key(3)), Some(&"c"));
        assert!(lru.remove(&key(1)));
        assert!(!lru.remove(&key(1)));
        lru.insert(key(4), "d");
        lru.insert(key(4), "e");
        assert_eq!((lru.len(), lru.get(&key(4))), (2, Some(&"e")));
    }

    #[test]
    fn cache_never_holds_more_than_its_bound() {
        for max in [1usize, 3, 16, 100] {
            let g = gauge();
            let cache: DecisionCache<u8, u8> = DecisionCache::new(max, g.clone());
            let now = Instant::now();
            for n in 0..=255u8 {
                if let Lookup::Pending { lead: Some(f), .. } = cache.lookup(key(n), now) {
                    let until = now + Duration::from_secs(60);
                    f.finish(Store::Insert { value: n, fresh_until: until, stale_until: until }, n);
                }
            }
            assert!(cache.len() <= max, "max {max}: held {}", cache.len());
            assert_eq!(g.get() as usize, cache.len());
        }
    }

    #[test]
    fn second_miss_joins_the_first_flight_and_sees_its_outcome() {
        let cache: DecisionCache<&str, &str> = DecisionCache::new(10, gauge());
        let now = Instant::now();
        let Lookup::Pending { lead: Some(flight), rx: rx1, .. } = cache.lookup(key(1), now) else { panic!() };
        let Lookup::Pending { lead: None, rx: rx2, .. } = cache.lookup(key(1), now) else { panic!("not joined") };
        let until = now + Duration::from_secs(1);
        flight.finish(Store::Insert { value: "alice", fresh_until: until, stale_until: until }, "done");
        assert_eq!(*rx1.borrow(), Some("done"));
        assert_eq!(*rx2.borrow(), Some("done"));
        assert!(matches!(cache.lookup(key(1), now), Lookup::Fresh("alice")));
    }

    #[test]
    fn expired_entries_are_stale_then_gone_and_a_dropped_flight_frees_the_key() {
        let g = gauge();
        let cache: DecisionCache<&str, &str> = DecisionCache::new(10, g.clone());
        let t0 = Instant::now();
        let Lookup::Pending { lead: Some(f), .. } = cache.lookup(key(1), t0) else { panic!() };
        let (fresh, stale) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(2));
        f.finish(Store::Insert { value: "alice", fresh_until: fresh, stale_until: stale }, "ok");
        let Lookup::Pending { lead: Some(f), stale: Some("alice"), rx } =
            cache.lookup(key(1), t0 + Duration::from_millis(1500))
        else {
            panic!("expected a stale value and a new flight")
        };
        drop(f);
        assert!(rx.has_changed().is_err(), "followers see the flight abandoned");
        let Lookup::Pending { lead: Some(_), stale: None, .. } = cache.lookup(key(1), t0 + Duration::from_secs(3))
        else {
            panic!("past stale_until nothing is usable, and a new flight starts")
        };
        assert_eq!((cache.len(), g.get()), (0, 0));
    }
}

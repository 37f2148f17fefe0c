//! Thread ownership (`thread_ownership = true`): defense in depth for a ChatKit server whose
//! store forgets to scope threads by user. The first event of a `threads.create` stream is
//! `thread.created` with the new thread's id; the gate remembers id → user (Redis, with a TTL,
//! or this process's memory) and answers 403 to another user's `params.thread_id`.
//!
//! A thread the gate never saw created (made before the rule was on, or through another URL)
//! is unknown, and allowed: the rule only ever denies a thread it knows belongs to someone else.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::http::body::{BodyEnd, BodyGuard};
use crate::transport::redis::RedisStore;

/// Most threads remembered in memory; past it the oldest are forgotten (then unknown: allowed).
const MEMORY_CAPACITY: usize = 200_000;
/// The first event of a stream is read up to this size; a larger one is not looked at.
const FIRST_EVENT_MAX: usize = 64 * 1024;

type ThreadKey = [u8; 16];

#[derive(Default)]
struct Memory {
    owners: HashMap<ThreadKey, (String, Instant)>,
    /// Insertion order = expiry order (one TTL for all): expired entries leave from the front.
    expiries: VecDeque<(ThreadKey, Instant)>,
}

pub struct Owners {
    store: Option<RedisStore>,
    prefix: String,
    ttl: Duration,
    memory: Mutex<Memory>,
}

impl Owners {
    pub fn new(store: Option<RedisStore>, prefix: &str, ttl: Duration) -> Owners {
        Owners { store, prefix: prefix.to_string(), ttl, memory: Mutex::new(Memory::default()) }
    }

    fn key(thread_id: &str) -> ThreadKey {
        let digest = Sha256::digest(thread_id.as_bytes());
        let mut k = [0u8; 16];
        k.copy_from_slice(&digest[..16]);
        k
    }

    fn redis_key(&self, key: &ThreadKey) -> String {
        let mut s = String::with_capacity(self.prefix.len() + 12 + 32);
        s.push_str(&self.prefix);
        s.push_str(":ck:owner:");
        for b in key {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// The user a thread belongs to, when known. Redis trouble falls back to memory.
    pub async fn owner(&self, thread_id: &str) -> Option<String> {
        let key = Self::key(thread_id);
        if let Some(store) = &self.store {
            match store.query::<Option<String>>(redis::cmd("GET").arg(self.redis_key(&key))).await {
                Ok(owner) => return owner,
                Err(e) => {
                    tracing::warn!(error = %e, "thread owner lookup failed in redis; using this replica's memory")
                }
            }
        }
        let mut m = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        expire(&mut m, Instant::now());
        m.owners.get(&key).map(|(user, _)| user.clone())
    }

    /// Remember that `thread_id` belongs to `user` (first writer wins).
    pub async fn record(&self, thread_id: &str, user: &str) {
        let key = Self::key(thread_id);
        if let Some(store) = &self.store {
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.redis_key(&key)).arg(user).arg("EX").arg(self.ttl.as_secs().max(1)).arg("NX");
            match store.query::<Option<String>>(&cmd).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not store a thread owner in redis; kept in this replica's memory")
                }
            }
        }
        let now = Instant::now();
        let mut m = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        expire(&mut m, now);
        if m.owners.contains_key(&key) {
            return;
        }
        while m.owners.len() >= MEMORY_CAPACITY {
            let Some((old, _)) = m.expiries.pop_front() else { break };
            m.owners.remove(&old);
        }
        m.owners.insert(key, (user.to_string(), now + self.ttl));
        m.expiries.push_back((key, now + self.ttl));
    }
}

fn expire(m: &mut Memory, now: Instant) {
    while m.expiries.front().is_some_and(|(_, at)| *at <= now) {
        if let Some((key, _)) = m.expiries.pop_front() {
            m.owners.remove(&key);
        }
    }
}

/// Carried by a `threads.create` answer: reads its first SSE event and, when it is
/// `thread.created`, records the new thread's owner (in a spawned task, off the stream).
pub struct FirstEvent {
    owners: Arc<Owners>,
    user: String,
    buf: BytesMut,
    done: bool,
}

impl FirstEvent {
    pub fn new(owners: Arc<Owners>, user: &str) -> FirstEvent {
        FirstEvent { owners, user: user.to_string(), buf: BytesMut::new(), done: false }
    }
}

impl BodyGuard for FirstEvent {
    fn data(&mut self, chunk: &Bytes) {
        if self.done {
            return;
        }
        let room = FIRST_EVENT_MAX.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") else {
            self.done = self.buf.len() >= FIRST_EVENT_MAX;
            return;
        };
        self.done = true;
        if let Some(id) = created_thread_id(&self.buf[..end]) {
            let (owners, user) = (self.owners.clone(), std::mem::take(&mut self.user));
            tokio::spawn(async move { owners.record(&id, &user).await });
        }
        self.buf = BytesMut::new();
    }

    fn finished(&mut self, _: BodyEnd) {}
}

/// `data: {"type":"thread.created","thread":{"id":…}}` → the id.
fn created_thread_id(event: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        thread: Option<Thread>,
    }
    #[derive(serde::Deserialize)]
    struct Thread {
        id: String,
    }
    let data = event.strip_prefix(b"data: ").or_else(|| event.strip_prefix(b"data:"))?;
    let e: Event<'_> = serde_json::from_slice(data).ok()?;
    (e.kind == "thread.created").then_some(e.thread?.id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn reads_the_thread_id_of_a_thread_created_event_only() {
        let ev = br#"data: {"type":"thread.created","thread":{"id":"thr_1","created_at":"2026-01-01T00:00:00","items":{"data":[]}}}"#;
        assert_eq!(created_thread_id(ev).as_deref(), Some("thr_1"));
        assert_eq!(created_thread_id(br#"data: {"type":"thread.updated","thread":{"id":"thr_1"}}"#), None);
        assert_eq!(created_thread_id(b"data: not json"), None);
    }

    #[tokio::test]
    async fn memory_owner_is_first_writer_and_expires() {
        let owners = Owners::new(None, "p", Duration::from_millis(50));
        owners.record("thr_1", "alice").await;
        owners.record("thr_1", "mallory").await;
        assert_eq!(owners.owner("thr_1").await.as_deref(), Some("alice"));
        assert_eq!(owners.owner("thr_2").await, None);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(owners.owner("thr_1").await, None);
    }
}

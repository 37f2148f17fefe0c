//! Which user each minted client secret belongs to: SHA-256 of the secret → session id and user
//! id, in Redis when configured (shared by every replica), else in a bounded in-process map,
//! each entry kept until the secret's `expires_at`.
//!
//! Store failure policy: a Redis error or timeout never fails a mint or a refresh. A binding that
//! cannot be written to Redis is kept in this replica's memory instead (logged, and counted in
//! `chatkit_gate_redis_errors_total`); a lookup that cannot reach Redis consults this replica's
//! memory and otherwise treats the token as unknown, which mints a fresh session for the
//! signed-in user without cancelling anything. Nothing of another user is ever handed out either
//! way; only the `TOKEN_MISMATCH` signal and the old session's early cancellation are lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::transport::redis::RedisStore;

/// Entries the in-process map holds at most (each lives at most 10 minutes).
const MEMORY_CAPACITY: usize = 100_000;
const KEY_PREFIX: &str = "chatkit-gate:secret:";

/// SHA-256 of a client secret: what we store and log instead of the secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> SecretHash {
        SecretHash(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A short prefix for log lines (enough to correlate, useless to an attacker).
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretHash({})", self.short())
    }
}

/// What the gate remembers about one minted secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub session_id: String,
    pub user_id: String,
    /// Unix seconds, from the API's answer.
    pub expires_at: i64,
    /// The session was cancelled on a refresh (a replayed token must not cancel it again).
    #[serde(default)]
    pub cancelled: bool,
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The secret → binding map.
pub struct Bindings {
    store: Option<RedisStore>,
    memory: Mutex<HashMap<SecretHash, Binding>>,
}

impl Bindings {
    pub fn new(store: Option<RedisStore>) -> Bindings {
        Bindings { store, memory: Mutex::new(HashMap::new()) }
    }

    /// Remember `binding` until it expires (best effort, see the module docs).
    pub async fn put(&self, hash: SecretHash, binding: &Binding) {
        let ttl = binding.expires_at - unix_now();
        if ttl <= 0 {
            return;
        }
        if let Some(store) = &self.store {
            let Ok(value) = serde_json::to_string(binding) else { return };
            let mut cmd = redis::cmd("SET");
            cmd.arg(redis_key(hash)).arg(value).arg("EX").arg(ttl);
            match store.query::<()>(&cmd).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    error = %e,
                    secret_hash = %hash.short(),
                    session_id = %binding.session_id,
                    "could not store the session binding in redis; kept in this replica's memory"
                ),
            }
        }
        self.remember(hash, binding.clone());
    }

    /// The binding of a secret, if known and not expired.
    pub async fn get(&self, hash: SecretHash) -> Option<Binding> {
        if let Some(store) = &self.store {
            let cmd = redis::cmd("GET").arg(redis_key(hash)).clone();
            match store.query::<Option<String>>(&cmd).await {
                Ok(Some(json)) => match serde_json::from_str::<Binding>(&json) {
                    Ok(b) if b.expires_at > unix_now() => return Some(b),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, secret_hash = %hash.short(), "unreadable session binding in redis")
                    }
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    secret_hash = %hash.short(),
                    "could not read the session binding from redis; using this replica's memory"
                ),
            }
        }
        self.recall(hash)
    }

    fn remember(&self, hash: SecretHash, binding: Binding) {
        let Ok(mut map) = self.memory.lock() else { return };
        if map.len() >= MEMORY_CAPACITY && !map.contains_key(&hash) {
            let now = unix_now();
            map.retain(|_, b| b.expires_at > now);
            if map.len() >= MEMORY_CAPACITY {
                // Still full of live entries: forget the one closest to expiry.
                if let Some(victim) = map.iter().min_by_key(|(_, b)| b.expires_at).map(|(k, _)| *k) {
                    map.remove(&victim);
                }
            }
        }
        map.insert(hash, binding);
    }

    fn recall(&self, hash: SecretHash) -> Option<Binding> {
        let mut map = self.memory.lock().ok()?;
        match map.get(&hash) {
            Some(b) if b.expires_at > unix_now() => Some(b.clone()),
            Some(_) => {
                map.remove(&hash);
                None
            }
            None => None,
        }
    }

    /// Entries held in memory (for tests and debugging).
    pub fn memory_len(&self) -> usize {
        self.memory.lock().map(|m| m.len()).unwrap_or(0)
    }
}

fn redis_key(hash: SecretHash) -> String {
    format!("{KEY_PREFIX}{}", hash.hex())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn binding(user: &str, ttl: i64) -> Binding {
        Binding { session_id: "cksess_1".into(), user_id: user.into(), expires_at: unix_now() + ttl, cancelled: false }
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(SecretHash::of("abc").hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(SecretHash::of("abc").short(), "ba7816bf8f01");
    }

    #[tokio::test]
    async fn memory_bindings_expire() {
        let b = Bindings::new(None);
        b.put(SecretHash::of("live"), &binding("u1", 60)).await;
        b.put(SecretHash::of("dead"), &binding("u1", 0)).await;
        assert_eq!(b.get(SecretHash::of("live")).await.unwrap().user_id, "u1");
        assert!(b.get(SecretHash::of("dead")).await.is_none());
        assert!(b.get(SecretHash::of("never")).await.is_none());
        let mut stale = binding("u2", 60);
        stale.expires_at = unix_now() - 1;
        b.remember(SecretHash::of("stale"), stale);
        assert!(b.get(SecretHash::of("stale")).await.is_none());
        assert_eq!(b.memory_len(), 1);
    }

    #[test]
    fn memory_is_bounded() {
        let b = Bindings::new(None);
        for i in 0..MEMORY_CAPACITY + 10 {
            b.remember(SecretHash::of(&i.to_string()), binding("u", 60 + i as i64));
        }
        assert_eq!(b.memory_len(), MEMORY_CAPACITY);
        assert!(b.recall(SecretHash::of(&(MEMORY_CAPACITY + 9).to_string())).is_some());
        assert!(b.recall(SecretHash::of("0")).is_none());
    }
}

//! The local deny cache: a key known to be blocked is answered from memory until its retry
//! time, so a client hammering a limit costs no store round trip.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::ratelimit::policy::Check;

/// Most keys remembered at once; past it, expired entries are swept, and if the cache is still
/// full a new block is simply not cached (the store keeps deciding correctly).
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct DenyCache {
    blocked: Mutex<HashMap<String, Instant>>,
}

impl DenyCache {
    pub fn new() -> DenyCache {
        DenyCache::default()
    }

    /// The check (index) blocked the longest, and for how long still; `None` when no key of this
    /// request is known to be blocked.
    pub fn blocked(&self, checks: &[Check<'_>], now: Instant) -> Option<(usize, Duration)> {
        let mut map = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        if map.is_empty() {
            return None;
        }
        let mut found: Option<(usize, Duration)> = None;
        for (i, c) in checks.iter().enumerate() {
            let Some(&until) = map.get(c.key.as_str()) else { continue };
            if until <= now {
                map.remove(c.key.as_str());
                continue;
            }
            let left = until - now;
            if found.is_none_or(|(_, w)| left > w) {
                found = Some((i, left));
            }
        }
        found
    }

    /// Remember that `key` rejects until `until`.
    pub fn insert(&self, key: &str, until: Instant) {
        let mut map = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            let now = Instant::now();
            map.retain(|_, u| *u > now);
            if map.len() >= MAX_ENTRIES {
                return;
            }
        }
        map.insert(key.to_string(), until);
    }
}

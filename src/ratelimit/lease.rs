//! What an admitted request holds: the `RateLimit*` headers and, for a concurrency limit, a
//! [`Lease`] given back when the stream ends; and the refusal ([`Denied`]).

use std::sync::Arc;

use crate::http::error::GateError;
use crate::ratelimit::headers::RateLimitHeaders;
use crate::ratelimit::local::LocalStore;
use crate::ratelimit::policy::{Plan, Policy};
use crate::ratelimit::remote::RedisLimiter;

/// Policies prepared once for one kind of request (a ChatKit-server route's request type):
/// the route's and the type's policies, and optionally a concurrency lease.
#[derive(Debug)]
pub struct PreparedPlan {
    pub(crate) plan: Plan,
    pub(crate) lease: Option<Policy>,
}

/// A refused request: the answer, and whether a concurrency lease (not a quota) refused it.
#[derive(Debug)]
pub struct Denied {
    pub error: GateError,
    pub concurrency: bool,
}

impl Denied {
    pub(crate) fn rate(error: GateError) -> Denied {
        Denied { error, concurrency: false }
    }
}

/// What an admitted request holds: the `RateLimit*` headers and, for a leased request, the
/// lease (released when dropped: when the stream ends, fails or is abandoned).
#[derive(Debug, Default)]
pub struct Admission {
    pub headers: Option<RateLimitHeaders>,
    pub lease: Option<Lease>,
}

/// A held concurrency lease. Dropping it gives it back (Redis: in a spawned task; a lost
/// release is covered by the lease TTL).
pub struct Lease {
    pub(crate) key: String,
    pub(crate) held: Held,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

pub(crate) enum Held {
    Redis { limiter: Arc<RedisLimiter>, nonce: String },
    Local { store: Arc<LocalStore>, admitted_us: i64 },
}

impl Lease {
    /// Give the lease back now. A Redis release runs in a task of its own (it outlives the
    /// caller); its handle lets a stream hold its last frame until the release is through, so
    /// a client that starts its next stream the moment this one ends is never refused.
    pub fn give_back(mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.release()
    }

    /// Whether giving the lease back takes a round trip (see [`Lease::give_back`]).
    pub fn is_remote(&self) -> bool {
        matches!(self.held, Held::Redis { .. })
    }

    fn release(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let key = std::mem::take(&mut self.key);
        if key.is_empty() {
            return None;
        }
        match &self.held {
            Held::Local { store, admitted_us } => {
                store.release(&key, *admitted_us);
                None
            }
            Held::Redis { limiter, nonce } => {
                let (limiter, nonce) = (limiter.clone(), nonce.clone());
                let rt = tokio::runtime::Handle::try_current().ok()?;
                Some(rt.spawn(async move { limiter.release(&key, &nonce).await }))
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropping the handle detaches the task: the release still runs.
        drop(self.release());
    }
}

//! Rate limits in Redis: one `EVALSHA` of `scripts/check.lua` per request for all its policies
//! (the redis crate loads the script again on `NOSCRIPT`), on the shared multiplexed connection.
//!
//! All keys of one script call must share a cluster slot. A request's keys share one hash tag
//! except on a route that mixes `key = "ip"` with user-keyed policies, for a signed-in user: on
//! a single node that is still one call; on Redis Cluster the two tags are checked in parallel
//! (two calls, one round trip of latency) and, when one rejects, what the other consumed is
//! given back (`scripts/refund.lua`), so a rejected request still consumes nothing.

use std::time::Duration;

use redis::Script;

use crate::ratelimit::policy::{Algo, Check, Verdict};
use crate::transport::redis::{RedisStore, StoreError};

pub(crate) struct RedisLimiter {
    store: RedisStore,
    cluster: bool,
    check: Script,
    refund: Script,
}

impl RedisLimiter {
    pub fn new(store: RedisStore, cluster: bool) -> RedisLimiter {
        RedisLimiter {
            store,
            cluster,
            check: Script::new(include_str!("scripts/check.lua")),
            refund: Script::new(include_str!("scripts/refund.lua")),
        }
    }

    pub fn store(&self) -> &RedisStore {
        &self.store
    }

    pub fn healthy(&self) -> bool {
        self.store.healthy()
    }

    /// One outcome per check, in order.
    pub async fn check(&self, checks: &[Check<'_>], nonce: &str) -> Result<Vec<Verdict>, StoreError> {
        let first_tag = checks.first().map(Check::tag).unwrap_or_default();
        if !self.cluster || checks.iter().all(|c| c.tag() == first_tag) {
            let all: Vec<&Check<'_>> = checks.iter().collect();
            return self.run(&all, nonce).await;
        }

        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, c) in checks.iter().enumerate() {
            match groups.iter_mut().find(|g| checks[g[0]].tag() == c.tag()) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        let members: Vec<Vec<&Check<'_>>> = groups.iter().map(|g| g.iter().map(|&i| &checks[i]).collect()).collect();
        let results = futures_util::future::join_all(members.iter().map(|m| self.run(m, nonce))).await;

        let admitted = results.iter().all(|r| r.as_ref().is_ok_and(|o| o.iter().all(|o| o.allowed)));
        let mut outcomes = vec![Verdict { allowed: true, remaining: 0, wait: Duration::ZERO }; checks.len()];
        let mut failure = None;
        for ((group, member), result) in groups.iter().zip(&members).zip(results) {
            match result {
                Ok(mut got) => {
                    let committed = got.iter().all(|o| o.allowed);
                    if committed && !admitted {
                        self.give_back(member, nonce).await;
                        got.iter_mut().for_each(|o| o.remaining += 1);
                    }
                    for (&i, o) in group.iter().zip(got) {
                        outcomes[i] = o;
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    }

    async fn run(&self, checks: &[&Check<'_>], nonce: &str) -> Result<Vec<Verdict>, StoreError> {
        let mut call = self.check.prepare_invoke();
        call.arg(nonce);
        for c in checks {
            call.key(c.key.as_str());
            match c.policy.algo {
                Algo::SlidingWindow { limit, window_us } => call.arg("sw").arg(limit).arg(window_us),
                Algo::Gcra { burst, interval_us } => call.arg("gcra").arg(burst).arg(interval_us),
            };
        }
        let reply: Vec<i64> = self.store.invoke(&call).await?;
        parse(&reply, checks.len())
    }

    /// Give a concurrency lease back (its entry in the sliding log). Best effort: the lease's
    /// TTL expires it anyway.
    /// Off the request path, so a slow Redis gets a few tries: a lost release holds a slot
    /// until the TTL.
    pub async fn release(&self, key: &str, nonce: &str) {
        let mut call = self.refund.prepare_invoke();
        call.arg(nonce).key(key).arg("sw").arg(0);
        for (attempt, pause_ms) in [(1, 50), (2, 250), (3, 0)] {
            match self.store.invoke::<i64>(&call).await {
                Ok(_) => return,
                Err(e) if attempt == 3 => {
                    tracing::debug!(error = %e, "stream lease release failed; its TTL will expire it")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(pause_ms)).await,
            }
        }
    }

    /// Best effort: a failure leaves the request counted, which only errs on the strict side.
    async fn give_back(&self, checks: &[&Check<'_>], nonce: &str) {
        let mut call = self.refund.prepare_invoke();
        call.arg(nonce);
        for c in checks {
            call.key(c.key.as_str());
            match c.policy.algo {
                Algo::SlidingWindow { .. } => call.arg("sw").arg(0),
                Algo::Gcra { interval_us, .. } => call.arg("gcra").arg(interval_us),
            };
        }
        if let Err(e) = self.store.invoke::<i64>(&call).await {
            tracing::debug!(error = %e, "rate-limit refund failed");
        }
    }
}

/// `{ now_us, admitted, (allowed, remaining, wait_us) per policy }`.
fn parse(reply: &[i64], n: usize) -> Result<Vec<Verdict>, StoreError> {
    if reply.len() != 2 + 3 * n {
        return Err(StoreError::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "rate-limit script answered an unexpected shape",
        ))));
    }
    Ok(reply[2..]
        .chunks_exact(3)
        .map(|p| Verdict {
            allowed: p[0] == 1,
            remaining: u64::try_from(p[1]).unwrap_or(0),
            wait: Duration::from_micros(u64::try_from(p[2]).unwrap_or(0)),
        })
        .collect())
}

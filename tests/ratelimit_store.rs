//! `RateLimiter::check` against a real `redis-server` (and a real 3-node Redis Cluster), and
//! against the in-process store: the acceptance of the rate-limit issue that needs no HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chatkit_gate::config::{
    Algorithm, LimitKey, OnStoreError, PolicySettings, RateLimitSettings, RateLimitStore, RouteAuth, Unauthenticated,
};
use chatkit_gate::http::error::GateError;
use chatkit_gate::obs::audit::{Audit, AuditSink};
use chatkit_gate::obs::metrics::Metrics;
use chatkit_gate::ratelimit::{RATELIMIT, RATELIMIT_POLICY, RateLimitHeaders, RateLimiter};
use chatkit_gate::request::context::Identity;
use chatkit_gate::request::context::RequestContext;
use chatkit_gate::request::routes::{Route, RouteKind};
use chatkit_gate::transport::redis::RedisStore;
use common::redis::{RedisCluster, RedisServer};
use http::HeaderValue;

const TIMEOUT: Duration = Duration::from_millis(50);

fn sliding(name: &str, limit: u32, window: Duration, key: LimitKey) -> PolicySettings {
    PolicySettings { name: name.into(), algorithm: Algorithm::SlidingWindow, limit, window, burst: limit, key }
}

fn gcra(name: &str, limit: u32, window: Duration, burst: u32) -> PolicySettings {
    PolicySettings { name: name.into(), algorithm: Algorithm::Gcra, limit, window, burst, key: LimitKey::UserOrIp }
}

fn chatkit_policy(window: Duration) -> PolicySettings {
    sliding("chatkit", 5, window, LimitKey::User)
}

/// Where the limiter keeps its counts.
#[derive(Clone)]
enum Store {
    InProcess,
    Redis(String),
    Cluster(Vec<String>),
}

/// One limiter with its metrics, audit lines and route.
struct Gate {
    limiter: RateLimiter,
    store: Option<RedisStore>,
    metrics: Metrics,
    audit: Arc<Mutex<Vec<String>>>,
    route: Arc<Route>,
}

impl Gate {
    async fn new(store: Store, on_store_error: OnStoreError, policies: Vec<PolicySettings>) -> Gate {
        let names = policies.iter().map(|p| p.name.clone()).collect();
        let settings = RateLimitSettings {
            store: match &store {
                Store::InProcess => RateLimitStore::Local,
                Store::Redis(url) => RateLimitStore::Redis { url: url.clone() },
                Store::Cluster(urls) => RateLimitStore::Cluster { urls: urls.clone() },
            },
            redis_timeout: TIMEOUT,
            on_store_error,
            key_prefix: "test".into(),
            policies: policies.into_iter().map(|p| (p.name.clone(), p)).collect(),
        };
        let route = Arc::new(Route {
            index: 0,
            name: "api".into(),
            path: "/api/".into(),
            auth: RouteAuth::Optional,
            unauthenticated: Unauthenticated::Json,
            rate_limit: names,
            kind: RouteKind::Proxy,
        });
        let metrics = Metrics::new().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let audit = Audit::start(AuditSink::Memory(lines.clone()), metrics.clone()).unwrap();
        let redis = RedisStore::start(&settings.store, TIMEOUT, metrics.clone()).unwrap();
        let limiter =
            RateLimiter::new(&settings, std::slice::from_ref(&route), redis.clone(), metrics.clone(), audit).unwrap();
        let gate = Gate { limiter, store: redis, metrics, audit: lines, route };
        gate.wait_until_healthy(true).await;
        gate
    }

    async fn wait_until_healthy(&self, healthy: bool) {
        let Some(store) = &self.store else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.healthy() != healthy {
            assert!(Instant::now() < deadline, "redis store never became healthy={healthy}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn check(&self, user: Option<&str>, ip: &str) -> Result<Option<RateLimitHeaders>, GateError> {
        let identity = user.map(|id| Identity { id: id.into(), name: None, email: None, claims: Vec::new() });
        let ctx = RequestContext {
            request_id: HeaderValue::from_static("req-test"),
            client_ip: ip.parse::<IpAddr>().unwrap(),
            route: self.route.clone(),
            https: true,
        };
        self.limiter.check(&self.route, identity.as_ref(), &ctx).await
    }

    async fn admitted(&self, user: &str) -> bool {
        match self.check(Some(user), "10.0.0.1").await {
            Ok(_) => true,
            Err(GateError::TooManyRequests { .. }) => false,
            Err(e) => panic!("unexpected answer {e:?}"),
        }
    }

    fn decisions(&self, policy: &str, decision: &str, source: &str) -> u64 {
        self.metrics.rate_limit_decisions.with_label_values(&[policy, decision, source]).get()
    }
}

fn retry_after(result: Result<Option<RateLimitHeaders>, GateError>) -> (u64, http::HeaderMap) {
    match result {
        Err(GateError::TooManyRequests { retry_after, headers }) => (retry_after, headers),
        other => panic!("expected 429, got {other:?}"),
    }
}

async fn redis_and_in_process() -> Vec<(Store, Option<RedisServer>)> {
    let server = RedisServer::start();
    vec![(Store::Redis(server.url()), Some(server)), (Store::InProcess, None)]
}

#[tokio::test]
async fn sixth_request_in_the_window_is_limited_and_other_users_are_not() {
    for (store, _server) in redis_and_in_process().await {
        let gate = Gate::new(store, OnStoreError::Local, vec![chatkit_policy(Duration::from_secs(60))]).await;
        for i in 0..5 {
            let headers = gate.check(Some("alice"), "10.0.0.1").await.unwrap().unwrap();
            assert_eq!(headers.policy, "\"chatkit\";q=5;w=60");
            let limit = headers.limit.to_str().unwrap();
            assert!(limit.starts_with(&format!("\"chatkit\";r={};t=", 4 - i)), "{limit}");
        }
        let (secs, headers) = retry_after(gate.check(Some("alice"), "10.0.0.1").await);
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
        assert_eq!(headers[RATELIMIT_POLICY], "\"chatkit\";q=5;w=60");
        assert_eq!(headers[RATELIMIT], format!("\"chatkit\";r=0;t={secs}").as_str());
        // The body's retryAfter is the same number: GateError renders both from one field.
        let response = GateError::TooManyRequests { retry_after: secs, headers }.to_response();
        assert_eq!(response.headers()[http::header::RETRY_AFTER], secs.to_string().as_str());

        for _ in 0..5 {
            assert!(gate.admitted("bob").await, "a second user is unaffected");
        }
        assert!(!gate.admitted("bob").await);

        let source = if gate.store.is_some() { "redis" } else { "local" };
        assert_eq!(gate.decisions("chatkit", "allowed", source), 10);
        assert!(gate.decisions("chatkit", "limited", source) == 2);

        // One audit line per store decision to reject (the deny cache answers the rest).
        assert!(!gate.admitted("alice").await);
        assert_eq!(gate.decisions("chatkit", "limited", "cache"), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lines = gate.audit.lock().unwrap().clone();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let event: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(event["event"], "RATE_LIMITED");
        assert_eq!(event["user_id"], "alice");
        assert_eq!(event["policy"], "chatkit");
        assert_eq!(event["route"], "api");
        assert_eq!(event["ip"], "10.0.0.1");
    }
}

#[tokio::test]
async fn after_the_oldest_ages_out_exactly_one_more_is_admitted() {
    let server = RedisServer::start();
    futures_util::future::join(
        one_more_after_the_oldest(Store::Redis(server.url())),
        one_more_after_the_oldest(Store::InProcess),
    )
    .await;
}

async fn one_more_after_the_oldest(store: Store) {
    let window = Duration::from_secs(2);
    let gate = Gate::new(store, OnStoreError::Local, vec![chatkit_policy(window)]).await;
    let first = Instant::now();
    assert!(gate.admitted("alice").await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..4 {
        assert!(gate.admitted("alice").await);
    }
    let (secs, _) = retry_after(gate.check(Some("alice"), "10.0.0.1").await);
    assert_eq!(secs, 2, "the oldest frees in ~1.4s");
    // Past the oldest's expiry, before the next four expire.
    tokio::time::sleep_until((first + window + Duration::from_millis(150)).into()).await;
    assert!(gate.admitted("alice").await, "the slot of the oldest is free");
    let (secs, _) = retry_after(gate.check(Some("alice"), "10.0.0.1").await);
    assert_eq!(secs, 1, "the next slot frees within the second");
}

#[tokio::test]
async fn never_more_than_the_limit_in_any_rolling_window() {
    let server = RedisServer::start();
    futures_util::future::join(
        rolling_window_is_exact(Store::Redis(server.url())),
        rolling_window_is_exact(Store::InProcess),
    )
    .await;
}

async fn rolling_window_is_exact(store: Store) {
    let window = Duration::from_secs(2);
    let gate = Gate::new(store, OnStoreError::Local, vec![chatkit_policy(window)]).await;
    // Five at once, then poll every 10ms across more than two window boundaries.
    let start = Instant::now();
    let mut admitted: Vec<(SystemTime, SystemTime)> = Vec::new();
    while start.elapsed() < Duration::from_millis(5000) {
        let sent = SystemTime::now();
        if gate.admitted("alice").await {
            admitted.push((sent, SystemTime::now()));
        }
        if admitted.len() >= 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Admission i+5 is answered at least a window after admission i was sent.
    for i in 0..admitted.len().saturating_sub(5) {
        let gap = admitted[i + 5].1.duration_since(admitted[i].0).unwrap();
        assert!(gap >= window, "6 admitted within {gap:?} (admissions {i}..={})", i + 5);
    }
    // And the limit is reached, not undercut: 5 at 0s, 5 at ~2s, 5 at ~4s.
    assert_eq!(admitted.len(), 15);
}

#[tokio::test]
async fn two_limiters_sharing_one_redis_share_the_limit() {
    let server = RedisServer::start();
    let policies = || vec![chatkit_policy(Duration::from_secs(60))];
    let a = Gate::new(Store::Redis(server.url()), OnStoreError::Deny, policies()).await;
    let b = Gate::new(Store::Redis(server.url()), OnStoreError::Deny, policies()).await;
    let mut admitted = 0;
    for i in 0..10 {
        let gate = if i % 2 == 0 { &a } else { &b };
        admitted += usize::from(gate.admitted("alice").await);
    }
    assert_eq!(admitted, 5);
}

#[tokio::test]
async fn gcra_admits_the_burst_then_the_sustained_rate() {
    for (store, server) in redis_and_in_process().await {
        // 10 per second sustained (one per 100ms), 3 at once.
        let gate = Gate::new(store, OnStoreError::Local, vec![gcra("api", 10, Duration::from_secs(1), 3)]).await;
        let burst: Vec<bool> = futures_util::future::join_all((0..4).map(|_| gate.admitted("alice"))).await;
        assert_eq!(burst.iter().filter(|a| **a).count(), 3, "{burst:?}");
        let (secs, headers) = retry_after(gate.check(Some("alice"), "10.0.0.1").await);
        assert_eq!(secs, 1);
        assert_eq!(headers[RATELIMIT], "\"api\";r=0;t=1");
        assert_eq!(headers[RATELIMIT_POLICY], "\"api\";q=10;w=1");

        let start = Instant::now();
        let mut times = Vec::new();
        while start.elapsed() < Duration::from_millis(1000) {
            if gate.admitted("alice").await {
                times.push(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!((9..=11).contains(&times.len()), "sustained rate: {} in 1s ({times:?})", times.len());
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(90), "admitted too close: {times:?}");
        }

        if let Some(server) = server {
            // The single GCRA key expires by itself once the bucket would be full again.
            let mut con = server.connection().await;
            let keys: Vec<String> = redis::cmd("KEYS").arg("test:rl:*").query_async(&mut con).await.unwrap();
            assert_eq!(keys, vec!["test:rl:{u:alice}:api:gcra".to_string()]);
            let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut con).await.unwrap();
            assert!((1..=300).contains(&ttl), "pttl {ttl}");
        }
    }
}

#[tokio::test]
async fn sliding_window_keys_expire_on_their_own() {
    let server = RedisServer::start();
    let gate =
        Gate::new(Store::Redis(server.url()), OnStoreError::Local, vec![chatkit_policy(Duration::from_secs(60))]).await;
    assert!(gate.admitted("alice").await);
    let mut con = server.connection().await;
    let ttl: i64 = redis::cmd("PTTL").arg("test:rl:{u:alice}:chatkit:sw").query_async(&mut con).await.unwrap();
    assert!((59_000..=60_000).contains(&ttl), "pttl {ttl}");
}

#[tokio::test]
async fn user_keys_fall_back_to_the_client_ip_without_a_signed_in_user() {
    let server = RedisServer::start();
    let policy = sliding("anon", 2, Duration::from_secs(60), LimitKey::User);
    let gate = Gate::new(Store::Redis(server.url()), OnStoreError::Deny, vec![policy]).await;
    assert!(gate.check(None, "192.0.2.1").await.is_ok());
    assert!(gate.check(None, "192.0.2.1").await.is_ok());
    assert!(gate.check(None, "192.0.2.1").await.is_err());
    assert!(gate.check(None, "192.0.2.2").await.is_ok(), "another address has its own quota");
    assert!(gate.check(Some("carol"), "192.0.2.1").await.is_ok(), "a signed-in user is keyed on the user");
    // IPv6 clients are keyed by their /64.
    assert!(gate.check(None, "2001:db8::1").await.is_ok());
    assert!(gate.check(None, "2001:db8::2").await.is_ok());
    assert!(gate.check(None, "2001:db8::3").await.is_err());
}

/// A route with a per-IP and a per-user policy: a rejection by one charges nothing to the other.
async fn mixed_keys_reject_without_consuming(store: Store) {
    let policies = vec![
        sliding("per_ip", 2, Duration::from_secs(60), LimitKey::Ip),
        sliding("per_user", 5, Duration::from_secs(60), LimitKey::User),
    ];
    let gate = Gate::new(store, OnStoreError::Deny, policies).await;
    assert!(gate.check(Some("dave"), "198.51.100.1").await.is_ok());
    let headers = gate.check(Some("dave"), "198.51.100.1").await.unwrap().unwrap();
    assert_eq!(headers.policy, "\"per_ip\";q=2;w=60, \"per_user\";q=5;w=60");
    assert!(headers.limit.to_str().unwrap().starts_with("\"per_ip\";r=0;t=60, \"per_user\";r=3;t="));
    let (_, headers) = retry_after(gate.check(Some("dave"), "198.51.100.1").await);
    assert!(headers[RATELIMIT].to_str().unwrap().contains("\"per_user\";r=3;"), "{:?}", headers[RATELIMIT]);
    // From elsewhere, dave still has 3 of 5: the rejected request was not charged to him.
    let from_elsewhere = ["198.51.100.2", "198.51.100.2", "198.51.100.3", "198.51.100.3"];
    let mut admitted = 0;
    for ip in from_elsewhere {
        admitted += usize::from(gate.check(Some("dave"), ip).await.is_ok());
    }
    assert_eq!(admitted, 3);
}

#[tokio::test]
async fn mixed_ip_and_user_policies_on_one_node() {
    let server = RedisServer::start();
    mixed_keys_reject_without_consuming(Store::Redis(server.url())).await;
    mixed_keys_reject_without_consuming(Store::InProcess).await;
}

#[tokio::test]
async fn redis_cluster_works_with_one_slot_per_request() {
    let cluster = RedisCluster::start();
    let gate = Gate::new(
        Store::Cluster(cluster.urls()),
        OnStoreError::Deny,
        vec![chatkit_policy(Duration::from_secs(60)), gcra("api", 600, Duration::from_secs(60), 100)],
    )
    .await;
    // Users spread over all three masters; each gets exactly 5.
    for n in 0..12 {
        let user = format!("user-{n}");
        let admitted = futures_util::future::join_all((0..7).map(|_| gate.admitted(&user))).await;
        assert_eq!(admitted.iter().filter(|a| **a).count(), 5, "{user}: {admitted:?}");
    }
    assert_eq!(gate.decisions("chatkit", "allowed", "redis"), 60);
    assert_eq!(gate.decisions("chatkit", "allowed", "store_error"), 0);
    let nodes_used = {
        let mut used = 0;
        for node in cluster.nodes() {
            let mut con = node.connection().await;
            let n: i64 = redis::cmd("DBSIZE").query_async(&mut con).await.unwrap();
            used += usize::from(n > 0);
        }
        used
    };
    assert_eq!(nodes_used, 3, "keys should spread over every master");

    mixed_keys_reject_without_consuming(Store::Cluster(cluster.urls())).await;
}

#[tokio::test]
async fn each_limited_request_costs_one_round_trip_and_none_while_denied() {
    let server = RedisServer::start();
    let policies = vec![
        sliding("chatkit", 6, Duration::from_secs(60), LimitKey::User),
        gcra("api", 600, Duration::from_secs(60), 100),
    ];
    let gate = Gate::new(Store::Redis(server.url()), OnStoreError::Deny, policies).await;
    assert!(gate.admitted("warmup").await, "loads the script");
    server.reset_stats().await;

    for _ in 0..6 {
        assert!(gate.admitted("erin").await);
    }
    assert_eq!(server.command_count("evalsha").await, 6, "two policies, one EVALSHA per request");
    assert!(!gate.admitted("erin").await);
    assert_eq!(server.command_count("evalsha").await, 7);
    for _ in 0..50 {
        assert!(!gate.admitted("erin").await);
    }
    assert_eq!(server.command_count("evalsha").await, 7, "the deny cache answers without Redis");
    assert_eq!(gate.decisions("chatkit", "limited", "cache"), 50);
    assert_eq!(server.command_count("eval").await, 0);
    assert_eq!(server.command_count("script|load").await, 0);
}

#[tokio::test]
async fn redis_killed_with_local_fallback_keeps_limiting_and_recovers() {
    let mut server = RedisServer::start();
    let gate =
        Gate::new(Store::Redis(server.url()), OnStoreError::Local, vec![chatkit_policy(Duration::from_secs(60))]).await;
    assert!(gate.admitted("alice").await);
    assert!(gate.admitted("alice").await);
    assert_eq!(gate.decisions("chatkit", "allowed", "redis"), 2);

    server.kill();
    // The in-process store knows nothing of the two above: a fresh 5, then 429.
    let admitted: Vec<bool> = {
        let mut v = Vec::new();
        for _ in 0..7 {
            v.push(gate.admitted("alice").await);
        }
        v
    };
    assert_eq!(admitted, vec![true, true, true, true, true, false, false]);
    assert_eq!(gate.decisions("chatkit", "allowed", "local"), 5);
    assert!(gate.decisions("chatkit", "limited", "local") >= 1);
    assert_eq!(gate.metrics.rate_limit_store_degraded.get(), 1);
    assert!(gate.limiter.ready(), "only deny makes the gate unready");

    server.restart();
    gate.wait_until_healthy(true).await;
    // Readiness probes end the degraded state even before the next request.
    assert!(gate.limiter.ready());
    assert_eq!(gate.metrics.rate_limit_store_degraded.get(), 0);
    assert!(gate.admitted("bob").await);
    assert_eq!(gate.decisions("chatkit", "allowed", "redis"), 3, "back on Redis without a restart");
}

#[tokio::test]
async fn redis_killed_with_allow_lets_requests_through() {
    let mut server = RedisServer::start();
    let gate =
        Gate::new(Store::Redis(server.url()), OnStoreError::Allow, vec![chatkit_policy(Duration::from_secs(60))]).await;
    server.kill();
    for _ in 0..20 {
        assert!(matches!(gate.check(Some("alice"), "10.0.0.1").await, Ok(None)));
    }
    assert_eq!(gate.decisions("chatkit", "allowed", "store_error"), 20);
    assert_eq!(gate.metrics.rate_limit_store_degraded.get(), 1);
    server.restart();
    gate.wait_until_healthy(true).await;
    assert!(gate.check(Some("alice"), "10.0.0.1").await.unwrap().is_some());
    assert_eq!(gate.decisions("chatkit", "allowed", "redis"), 1);
}

#[tokio::test]
async fn redis_killed_with_deny_answers_503_and_is_unready_until_it_returns() {
    let mut server = RedisServer::start();
    let gate =
        Gate::new(Store::Redis(server.url()), OnStoreError::Deny, vec![chatkit_policy(Duration::from_secs(60))]).await;
    assert!(gate.limiter.ready());
    server.kill();
    assert!(matches!(gate.check(Some("alice"), "10.0.0.1").await, Err(GateError::RateLimitUnavailable)));
    // Without any traffic, the background probe notices the dead Redis.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gate.limiter.ready() {
        assert!(Instant::now() < deadline, "still ready with Redis dead");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(gate.check(Some("alice"), "10.0.0.1").await, Err(GateError::RateLimitUnavailable)));
    assert_eq!(gate.decisions("chatkit", "denied", "store_error"), 2);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gate.limiter.ready() {
        assert!(Instant::now() < deadline, "not ready again after Redis came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gate.admitted("alice").await);
}

#[tokio::test]
async fn no_call_waits_longer_than_redis_timeout_once_the_breaker_is_open() {
    let server = RedisServer::start();
    let gate =
        Gate::new(Store::Redis(server.url()), OnStoreError::Local, vec![chatkit_policy(Duration::from_secs(60))]).await;
    assert!(gate.admitted("warmup").await);
    // A hung Redis: connections stay up, answers never come (the worst case: timeouts, not
    // refusals).
    let mut con = server.connection().await;
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(1500).arg("ALL").query_async(&mut con).await.unwrap();
    let paused = Instant::now();
    let mut latencies = Vec::new();
    while paused.elapsed() < Duration::from_millis(1000) {
        let started = Instant::now();
        let _ = gate.check(Some(&format!("u{}", latencies.len())), "10.0.0.1").await;
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let slow = latencies.iter().filter(|l| **l >= TIMEOUT / 2).count();
    let after_open = latencies.iter().skip(slow).max().copied().unwrap_or_default();
    eprintln!(
        "hung redis: {} calls, {slow} waited ~redis_timeout, worst after the breaker opened {after_open:?}",
        latencies.len()
    );
    let worst = latencies.iter().max().unwrap();
    assert!(*worst <= TIMEOUT + Duration::from_millis(30), "a call waited {worst:?}");
    assert!(slow <= 3, "{slow} calls waited on the hung Redis: {latencies:?}");
    assert!(latencies.len() > 50, "calls after the breaker opened should be immediate");
    assert!(gate.decisions("chatkit", "allowed", "local") > 50);
    // Redis answers again: the probe closes the breaker and decisions return to Redis.
    gate.wait_until_healthy(true).await;
    assert!(gate.admitted("after").await);
    assert_eq!(gate.decisions("chatkit", "allowed", "redis"), 2);
}

//! Prometheus metrics, on a registry of our own (tests stay isolated), named per the spec.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds, from sub-millisecond proxying to slow upstreams.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Stream lengths in seconds: from a short JSON answer to a long model run.
const STREAM_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

/// Every metric the gate exports. Cheap to clone (all handles are `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    pub connections_open: IntGauge,
    pub upstream_duration: Histogram,
    pub upstream_errors: IntCounterVec,
    pub auth_decisions: IntCounterVec,
    pub auth_introspection_duration: Histogram,
    pub auth_cache_entries: IntGauge,
    pub rate_limit_decisions: IntCounterVec,
    pub redis_errors: IntCounter,
    pub redis_duration: Histogram,
    pub rate_limit_store_degraded: IntGauge,
    pub chatkit_sessions: IntCounterVec,
    pub chatkit_api_duration: HistogramVec,
    pub chatkit_cancel_failures: IntCounter,
    pub tls_handshake_errors: IntCounter,
    pub tls_cert_expiry: Gauge,
    pub tls_reloads: IntCounterVec,
    pub audit_dropped: IntCounter,
    pub admin_connections_refused: IntCounter,
    pub build_info: GaugeVec,
    pub upstream_retries: IntCounterVec,
    pub auth_introspection_in_flight: IntGauge,
    pub auth_introspection_rejected: IntCounterVec,
    pub auth_introspection_errors: IntCounterVec,
    pub auth_breaker_open: IntGauge,
    pub client_body_errors: IntCounterVec,
    pub connection_limit_waits: IntCounter,
    pub accept_paused: IntGauge,
    pub draining: IntGauge,
    pub stream_duration: HistogramVec,
    pub chatkit_requests: IntCounterVec,
}

/// Exports [`crate::obs::logwriter::LINES_DROPPED`] as `chatkit_gate_log_lines_dropped_total`.
#[derive(Clone)]
struct LogDropped {
    desc: prometheus::core::Desc,
}

impl prometheus::core::Collector for LogDropped {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let dropped = crate::obs::logwriter::LINES_DROPPED.load(std::sync::atomic::Ordering::Relaxed);
        let c = IntCounter::with_opts(Opts::new(
            "chatkit_gate_log_lines_dropped_total",
            "Log lines dropped because the log output fell behind (it never blocks requests).",
        ));
        match c {
            Ok(c) => {
                c.inc_by(dropped);
                c.collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> prometheus::Result<T> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    reg(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn histogram(r: &Registry, name: &str, help: &str) -> prometheus::Result<Histogram> {
    reg(r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))?)
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    reg(r, HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)?)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        r.register(Box::new(LogDropped {
            desc: prometheus::core::Desc::new(
                "chatkit_gate_log_lines_dropped_total".into(),
                "Log lines dropped because the log output fell behind (it never blocks requests).".into(),
                Vec::new(),
                std::collections::HashMap::new(),
            )?,
        }))?;
        let m = Metrics {
            http_requests: counter_vec(
                &r,
                "chatkit_gate_http_requests_total",
                "HTTP requests answered, by route, method and status.",
                &["route", "method", "status"],
            )?,
            http_request_duration: histogram_vec(
                &r,
                "chatkit_gate_http_request_duration_seconds",
                "Time from request to the end of the response body (streams included), by route.",
                &["route"],
            )?,
            http_in_flight: reg(
                &r,
                IntGauge::new("chatkit_gate_http_requests_in_flight", "Requests being served, streams included.")?,
            )?,
            connections_open: reg(
                &r,
                IntGauge::new("chatkit_gate_connections_open", "Client connections open on the public listeners.")?,
            )?,
            upstream_duration: histogram(
                &r,
                "chatkit_gate_upstream_request_duration_seconds",
                "Time for the app to answer with response headers.",
            )?,
            upstream_errors: counter_vec(
                &r,
                "chatkit_gate_upstream_errors_total",
                "Failed requests to the app, by kind (connect, timeout, protocol).",
                &["kind"],
            )?,
            auth_decisions: counter_vec(
                &r,
                "chatkit_gate_auth_decisions_total",
                "Authentication decisions by result (allow, deny, error) and source (introspection, cache, stale).",
                &["result", "source"],
            )?,
            auth_introspection_duration: histogram(
                &r,
                "chatkit_gate_auth_introspection_duration_seconds",
                "Duration of calls to the introspection URL.",
            )?,
            auth_cache_entries: reg(
                &r,
                IntGauge::new("chatkit_gate_auth_cache_entries", "Decisions held in the authentication cache.")?,
            )?,
            rate_limit_decisions: counter_vec(
                &r,
                "chatkit_gate_rate_limit_decisions_total",
                "Rate-limit decisions by policy, decision (allowed, limited) and source (redis, local, cache).",
                &["policy", "decision", "source"],
            )?,
            redis_errors: reg(
                &r,
                IntCounter::new("chatkit_gate_redis_errors_total", "Redis calls that failed or timed out.")?,
            )?,
            redis_duration: histogram(&r, "chatkit_gate_redis_request_duration_seconds", "Duration of Redis calls.")?,
            rate_limit_store_degraded: reg(
                &r,
                IntGauge::new(
                    "chatkit_gate_rate_limit_store_degraded",
                    "1 while the rate-limit store is unreachable and on_store_error applies.",
                )?,
            )?,
            chatkit_sessions: counter_vec(
                &r,
                "chatkit_gate_chatkit_sessions_total",
                "ChatKit sessions by endpoint (session, refresh) and result (created, failed).",
                &["endpoint", "result"],
            )?,
            chatkit_api_duration: histogram_vec(
                &r,
                "chatkit_gate_chatkit_api_duration_seconds",
                "Duration of ChatKit API calls by operation (create, cancel).",
                &["operation"],
            )?,
            chatkit_cancel_failures: reg(
                &r,
                IntCounter::new(
                    "chatkit_gate_chatkit_cancel_failures_total",
                    "Old sessions whose cancellation failed on refresh.",
                )?,
            )?,
            tls_handshake_errors: reg(
                &r,
                IntCounter::new("chatkit_gate_tls_handshake_errors_total", "TLS handshakes that failed or timed out.")?,
            )?,
            tls_cert_expiry: reg(
                &r,
                Gauge::new(
                    "chatkit_gate_tls_cert_expiry_timestamp_seconds",
                    "Expiry (notAfter) of the served certificate, Unix seconds.",
                )?,
            )?,
            tls_reloads: counter_vec(
                &r,
                "chatkit_gate_tls_reloads_total",
                "Certificate reloads by result (success, error).",
                &["result"],
            )?,
            audit_dropped: reg(
                &r,
                IntCounter::new(
                    "chatkit_gate_audit_events_dropped_total",
                    "Audit events dropped because the writer fell behind.",
                )?,
            )?,
            admin_connections_refused: reg(
                &r,
                IntCounter::new(
                    "chatkit_gate_admin_connections_refused_total",
                    "Admin-listener connections closed at once because admin.max_connections were open.",
                )?,
            )?,
            build_info: reg(
                &r,
                GaugeVec::new(Opts::new("chatkit_gate_build_info", "Build information; always 1."), &["version"])?,
            )?,
            upstream_retries: counter_vec(
                &r,
                "chatkit_gate_upstream_retries_total",
                "Requests retried once on a fresh connection after a pooled one failed before answering, \
                 by target (app, introspection).",
                &["target"],
            )?,
            auth_introspection_in_flight: reg(
                &r,
                IntGauge::new("chatkit_gate_auth_introspection_in_flight", "Introspection calls in flight.")?,
            )?,
            auth_introspection_rejected: counter_vec(
                &r,
                "chatkit_gate_auth_introspection_rejected_total",
                "Introspection calls not made, by reason (breaker_open, in_flight_limit, rate_limited).",
                &["reason"],
            )?,
            auth_introspection_errors: counter_vec(
                &r,
                "chatkit_gate_auth_introspection_errors_total",
                "Introspection calls that failed, by kind (timeout, connect, request, status, body, invalid), \
                 background refreshes included.",
                &["kind"],
            )?,
            auth_breaker_open: reg(
                &r,
                IntGauge::new(
                    "chatkit_gate_auth_breaker_open",
                    "1 while the introspection circuit breaker is open (calls fail fast).",
                )?,
            )?,
            client_body_errors: counter_vec(
                &r,
                "chatkit_gate_client_body_errors_total",
                "Proxied requests whose client body failed, by kind (timeout, malformed): answered 408 or 400.",
                &["kind"],
            )?,
            connection_limit_waits: reg(
                &r,
                IntCounter::new(
                    "chatkit_gate_connection_limit_waits_total",
                    "Times an accept loop stopped accepting because server.max_connections were open.",
                )?,
            )?,
            accept_paused: reg(
                &r,
                IntGauge::new(
                    "chatkit_gate_accept_paused",
                    "Accept loops waiting for a server.max_connections slot (new clients queue in the kernel).",
                )?,
            )?,
            draining: reg(
                &r,
                IntGauge::new("chatkit_gate_draining", "1 from SIGTERM/SIGINT until exit (readyz answers 503).")?,
            )?,
            stream_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "chatkit_gate_stream_duration_seconds",
                        "Time from response headers to the end of a streamed response body, by route and outcome (complete, client_aborted, upstream_error).",
                    )
                    .buckets(STREAM_BUCKETS.to_vec()),
                    &["route", "outcome"],
                )?,
            )?,
            chatkit_requests: counter_vec(
                &r,
                "chatkit_gate_chatkit_requests_total",
                "Requests on ChatKit-server routes by route, request type (known types, or other) and decision.",
                &["route", "type", "decision"],
            )?,
            registry: r,
        };
        for target in ["app", "introspection"] {
            m.upstream_retries.with_label_values(&[target]);
        }
        for reason in ["breaker_open", "in_flight_limit", "rate_limited"] {
            m.auth_introspection_rejected.with_label_values(&[reason]);
        }
        for kind in ["timeout", "connect", "request", "status", "body", "invalid"] {
            m.auth_introspection_errors.with_label_values(&[kind]);
        }
        for kind in ["timeout", "malformed"] {
            m.client_body_errors.with_label_values(&[kind]);
        }
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        for kind in ["connect", "timeout", "protocol"] {
            m.upstream_errors.with_label_values(&[kind]);
        }
        for result in ["allow", "deny", "error"] {
            for source in ["introspection", "cache", "stale"] {
                m.auth_decisions.with_label_values(&[result, source]);
            }
        }
        for endpoint in ["session", "refresh"] {
            for result in ["created", "failed"] {
                m.chatkit_sessions.with_label_values(&[endpoint, result]);
            }
        }
        for result in ["success", "error"] {
            m.tls_reloads.with_label_values(&[result]);
        }
        Ok(m)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

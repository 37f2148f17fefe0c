//! The observe phase (pingora's logging phase): an [`Observer`] lives as long as a request and
//! its answer's body, and when that ends, fails or is dropped writes the access-log line and the
//! request metrics, and tells the connection the request is over.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, StatusCode};

use crate::http::body::BodyEnd;
use crate::http::error::GateError;
use crate::obs::metrics::Metrics;
use crate::request::routes::RouteTable;
use crate::transport::conn::{Clock, ConnActivity};

/// The `target` of access-log lines: the module that wrote them before the layering, kept so
/// that log pipelines filtering on it go on working.
const ACCESS_LOG_TARGET: &str = "chatkit_gate::proxy";

/// What the observe phase writes to, shared by every request: the per-route metrics (by route
/// index, then `rejected`, then `https_redirect`), the metrics and the connections' clock.
pub(crate) struct Recorder {
    route_metrics: Vec<RouteMetrics>,
    metrics: Metrics,
    clock: Arc<Clock>,
}

impl Recorder {
    pub(crate) fn new(routes: &RouteTable, metrics: Metrics, clock: Arc<Clock>) -> Recorder {
        let route_metrics = routes
            .all()
            .iter()
            .map(|r| r.name.as_str())
            .chain(["rejected", "https_redirect"])
            .map(|name| RouteMetrics {
                name: name.into(),
                duration: metrics.http_request_duration.with_label_values(&[name]),
                requests: std::sync::RwLock::default(),
                stream_complete: std::sync::OnceLock::new(),
            })
            .collect();
        Recorder { route_metrics, metrics, clock }
    }
}

/// Lives as long as a request and its response body: in-flight accounting, then, when the body
/// ends, fails or is dropped, the access-log line and the request metrics (pingora's logging
/// phase). Dropped before any response (the client left while the gate waited): status 499.
pub(crate) struct Observer {
    recorder: Arc<Recorder>,
    pub(crate) conn: Arc<ConnActivity>,
    /// `None`: the plain-HTTP answer (`https_redirect`).
    pub(crate) route: Option<usize>,
    method: Method,
    /// `None` until there is a response.
    pub(crate) status: Option<StatusCode>,
    request_id: HeaderValue,
    client_ip: std::net::IpAddr,
    pub(crate) error: Option<GateError>,
    started: Instant,
    pub(crate) headers_at: Option<Instant>,
    /// When the answer ended (its body finished, failed or was dropped).
    ended: Option<Instant>,
    pub(crate) streamed: bool,
    done: bool,
    /// Refused by admission (path, Host, method, header size): route label `rejected`.
    pub(crate) rejected: bool,
}

impl Observer {
    /// Start observing a request that arrived at `started` (in flight from now on).
    pub(crate) fn new(
        recorder: Arc<Recorder>,
        conn: Arc<ConnActivity>,
        method: Method,
        request_id: HeaderValue,
        client_ip: std::net::IpAddr,
        started: Instant,
    ) -> Observer {
        Observer {
            recorder,
            conn,
            route: None,
            method,
            status: None,
            request_id,
            client_ip,
            error: None,
            started,
            headers_at: None,
            ended: None,
            streamed: false,
            done: false,
            rejected: false,
        }
    }
}

impl Observer {
    /// The route's index in [`Recorder`]'s per-route metrics.
    fn route_slot(&self) -> usize {
        let n = self.recorder.route_metrics.len() - 2;
        match self.route {
            Some(i) => i,
            None if self.rejected => n,
            None => n + 1,
        }
    }
}

impl crate::http::body::BodyGuard for Observer {
    fn finished(&mut self, end: BodyEnd) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // One clock read for the durations and for the connection's idle clock (see `Drop`).
        let now = Instant::now();
        self.ended = Some(now);
        let m = &self.recorder.metrics;
        let status = self.status.map_or(499, |s| s.as_u16());
        let elapsed = now.saturating_duration_since(self.started);
        let status_label = match &self.status {
            Some(s) => s.as_str(),
            None => "499",
        };
        let slot = &self.recorder.route_metrics[self.route_slot()];
        let route = &*slot.name;
        slot.count(&m.http_requests, route, method_label(&self.method), status, status_label);
        slot.duration.observe(elapsed.as_secs_f64());
        let stream_ms = match (self.streamed, self.headers_at) {
            (true, Some(at)) => {
                let d = now.saturating_duration_since(at);
                slot.observe_stream(&m.stream_duration, route, end, d.as_secs_f64());
                Some(millis(d))
            }
            _ => None,
        };
        let rid = self.request_id.to_str().unwrap_or("-");
        let duration_ms = millis(elapsed);
        let (method, client_ip, outcome) = (&self.method, self.client_ip, end.as_str());
        match &self.error {
            Some(e) if status >= 500 || self.rejected => tracing::warn!(
                target: ACCESS_LOG_TARGET,
                method = %method, route, status, duration_ms, stream_ms, outcome,
                request_id = rid, client_ip = %client_ip, error = %e, "request"
            ),
            _ if end == BodyEnd::UpstreamError => tracing::warn!(
                target: ACCESS_LOG_TARGET,
                method = %method, route, status, duration_ms, stream_ms, outcome,
                request_id = rid, client_ip = %client_ip, "request"
            ),
            _ if !tracing::enabled!(tracing::Level::INFO) => {}
            // The binary's JSON log: the same line as tracing would write, built directly.
            _ => match crate::obs::logwriter::json_sink() {
                Some(sink) => ACCESS_LINE.with_borrow_mut(|buf| {
                    let mut line = crate::obs::logwriter::JsonLine::start(buf, "INFO", "request");
                    line.str("method", method.as_str()).str("route", route).uint("status", u64::from(status));
                    line.float("duration_ms", duration_ms);
                    if let Some(ms) = stream_ms {
                        line.float("stream_ms", ms);
                    }
                    line.str("outcome", outcome).str("request_id", rid).ip("client_ip", client_ip);
                    line.finish(ACCESS_LOG_TARGET);
                    sink.line(buf);
                }),
                None => tracing::info!(
                    target: ACCESS_LOG_TARGET,
                    method = %method, route, status, duration_ms, stream_ms, outcome,
                    request_id = rid, client_ip = %client_ip, "request"
                ),
            },
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if !self.done {
            crate::http::body::BodyGuard::finished(self, BodyEnd::ClientAborted);
        }
        self.recorder.metrics.http_in_flight.dec();
        if self.conn.request_ended() {
            let clock = &self.recorder.clock;
            self.conn.touch(self.ended.map_or_else(|| clock.now_ms(), |at| clock.ms_at(at)));
        }
    }
}

thread_local! {
    /// The access-log line of this worker thread, reused.
    static ACCESS_LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

/// A route's request metrics, resolved once: its duration histogram, and the request counters
/// met so far by method and status (a label lookup hashes three strings on every request; this
/// is a scan of a few entries under a read lock).
struct RouteMetrics {
    /// The `route` label: the route's name, `rejected` or `https_redirect`.
    name: Box<str>,
    duration: prometheus::Histogram,
    requests: std::sync::RwLock<Vec<(&'static str, u16, prometheus::IntCounter)>>,
    /// Its streams that ended complete, resolved at the first (so the series appears only then).
    stream_complete: std::sync::OnceLock<prometheus::Histogram>,
}

/// Request counters kept per route; further method/status pairs are looked up each time.
const ROUTE_COUNTERS_KEPT: usize = 32;

impl RouteMetrics {
    /// Observe a streamed body's duration in `chatkit_gate_stream_duration_seconds`.
    fn observe_stream(&self, vec: &prometheus::HistogramVec, route: &str, end: BodyEnd, secs: f64) {
        if end == BodyEnd::Complete {
            self.stream_complete.get_or_init(|| vec.with_label_values(&[route, end.as_str()])).observe(secs);
        } else {
            vec.with_label_values(&[route, end.as_str()]).observe(secs);
        }
    }

    /// Count one answered request in `chatkit_gate_http_requests_total`.
    fn count(&self, vec: &prometheus::IntCounterVec, route: &str, method: &'static str, status: u16, label: &str) {
        if let Ok(kept) = self.requests.read()
            && let Some((_, _, counter)) = kept.iter().find(|(m, s, _)| *s == status && *m == method)
        {
            counter.inc();
            return;
        }
        let counter = vec.with_label_values(&[route, method, label]);
        counter.inc();
        if let Ok(mut kept) = self.requests.write()
            && kept.len() < ROUTE_COUNTERS_KEPT
            && !kept.iter().any(|(m, s, _)| *s == status && *m == method)
        {
            kept.push((method, status, counter));
        }
    }
}

/// A duration in milliseconds, to the microsecond (as `as_micros() as f64 / 1000.0`, without the
/// 128-bit conversion).
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(d.subsec_micros()))) as f64 / 1000.0
}

/// Bounded method label: the standard methods by name, anything else as `OTHER`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

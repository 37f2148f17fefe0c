//! The HTTP servers a connection can get (hyper's HTTP/1.1, HTTP/2 and auto builders) with
//! the gate's sizes and timers, and the [`Serving`] view of a connection that `drive` runs.

use std::future::Future;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::config::Config;

/// The HTTP servers a connection can get: on TLS, the one ALPN chose (no sniffing of the first
/// bytes); on the plain listener, HTTP/1.1 or HTTP/2 with prior knowledge, told by the preface.
pub(crate) struct Protocols {
    pub(crate) h1: http1::Builder,
    pub(crate) h2: http2::Builder<TokioExecutor>,
    pub(crate) auto: auto::Builder<TokioExecutor>,
}

/// The same settings on hyper's HTTP/1.1 builder and on `auto`'s.
macro_rules! h1_settings {
    ($b:expr, $config:expr) => {
        // hyper's header timer also runs while a keep-alive connection waits for its next
        // request, which would close idle connections at header_timeout: `drive`
        // times heads itself.
        $b.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size($config.server.max_header_bytes.max(8192))
            .keep_alive(true)
    };
}

/// The same settings on hyper's HTTP/2 builder and on `auto`'s.
macro_rules! h2_settings {
    ($b:expr, $config:expr) => {
        // h2 refuses a header block over this size with a GOAWAY (the client never sees an
        // answer), so it is set above max_header_bytes and the gate answers 431 itself.
        // Windows and send buffers are bounded: a stream buffers at most H2_STREAM_WINDOW.
        $b.timer(TokioTimer::new())
            .max_header_list_size(h2_header_list_limit($config.server.max_header_bytes))
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

const H2_MAX_STREAMS: u32 = 250;
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_SEND_BUFFER: usize = 128 * 1024;

impl Protocols {
    pub(crate) fn new(config: &Config) -> Protocols {
        let mut h1 = http1::Builder::new();
        h1_settings!(h1, config);
        h1.writev(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2_settings!(h2, config);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        h1_settings!(auto.http1(), config);
        h2_settings!(auto.http2(), config);
        Protocols { h1, h2, auto }
    }
}

/// A connection being served: run it, or ask it to finish (HTTP/2 GOAWAY, HTTP/1.1 close
/// after the current exchange).
pub(crate) trait Serving: Future<Output = Result<(), Self::Error>> {
    type Error: Into<Box<dyn std::error::Error + Send + Sync>>;
    fn shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Serving for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Serving for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    type Error = hyper::Error;
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Serving for auto::UpgradeableConnection<'_, I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The header-list size hyper's HTTP/2 side accepts: well above `max_header_bytes`, which the
/// gate enforces itself with a 431.
fn h2_header_list_limit(max_header_bytes: usize) -> u32 {
    u32::try_from(max_header_bytes.saturating_mul(8).max(256 * 1024)).unwrap_or(u32::MAX)
}

//! Outbound HTTPS clients (the introspection URL, the ChatKit API): public web PKI roots plus an
//! optional extra CA, ALPN h2/http1.1, one pooled keep-alive client per destination.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A pooled client for `http://` and `https://` URLs.
pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// How a client connects and pools.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions<'a> {
    /// Extra PEM CA certificates trusted on top of the public roots.
    pub ca_file: Option<&'a Path>,
    /// The config key named in errors about `ca_file`, e.g. `auth.ca_file`.
    pub ca_key: &'a str,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

/// Add the PEM certificates of `path`; an unreadable file or one without a usable certificate is
/// an error (in words safe to show).
pub fn load_ca(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{} holds no usable CA certificate", path.display()));
    }
    Ok(added)
}

/// Build the client once, at startup (never per request).
pub fn https_client<B>(opts: ClientOptions<'_>) -> anyhow::Result<HttpsClient<B>>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = opts.ca_file {
        let added = load_ca(&mut roots, path).map_err(|e| anyhow::anyhow!("{}: {e}", opts.ca_key))?;
        tracing::info!(key = opts.ca_key, file = %path.display(), certificates = added, "extra CA loaded");
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS client setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(opts.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(opts.pool_idle_timeout)
        .pool_max_idle_per_host(opts.pool_max_idle_per_host)
        .build(connector))
}

/// Did this request fail because a pooled keep-alive connection was closed by the peer before
/// any response byte arrived (the peer closed it idle just as it was reused)? Such a request may
/// be sent again on a fresh connection when it is safe to replay it.
pub fn is_stale_connection(e: &hyper_util::client::legacy::Error) -> bool {
    !e.is_connect() && closed_before_answer(e)
}

/// Anywhere in `e`'s chain: hyper saw the connection end before a complete answer (or the
/// request was cancelled because it had), or the socket was reset, aborted or hit EOF.
pub(crate) fn closed_before_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(inner) = source {
        if let Some(he) = inner.downcast_ref::<hyper::Error>()
            && (he.is_incomplete_message() || he.is_canceled())
        {
            return true;
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = inner.source();
    }
    false
}

/// A bodiless request's head, kept to send it once more when a pooled connection was closed under
/// it. The headers are a list: one allocation to copy, and a cheap drop, instead of a copy of the
/// map with its index. The map is rebuilt only for a replay, which is rare.
pub struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Replay {
    pub fn of<B>(req: &http::Request<B>) -> Replay {
        Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// The request again, with an empty body; headers in their order, repeated names kept.
    pub fn into_request<B: Default>(self) -> http::Request<B> {
        let mut headers = http::HeaderMap::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        let mut req = http::Request::new(B::default());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = headers;
        req
    }
}

/// Send `req` on the pooled client; when a pooled connection fails before answering and a
/// `replay` copy is given, send that once more on `fresh` (a client that never pools, so the
/// retry cannot meet another stale connection). The HTTPS clients' retry; the app's pool
/// (`pool::AppPool::send`) applies the same rule with the same [`closed_before_answer`].
pub async fn send_with_retry<C, B>(
    pooled: &Client<C, B>,
    fresh: &Client<C, B>,
    req: http::Request<B>,
    replay: Option<Replay>,
    retries: &prometheus::IntCounter,
) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    B: http_body::Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match pooled.request(req).await {
        Err(e) if is_stale_connection(&e) => match replay {
            Some(again) => {
                retries.inc();
                tracing::debug!(error = %e, "pooled connection closed before answering: retrying on a fresh one");
                fresh.request(again.into_request()).await
            }
            None => Err(e),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::http::body::GateBody;
    use http::{HeaderValue, Method, Request, Version};

    fn head(req: &Request<GateBody>) -> (Method, String, Version, Vec<(String, Vec<u8>)>) {
        let headers = req.headers().iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect();
        (req.method().clone(), req.uri().to_string(), req.version(), headers)
    }

    #[test]
    fn a_replay_is_the_request_again_with_every_header_in_order() {
        let mut req = Request::builder()
            .method(Method::DELETE)
            .uri("/items/7?force=1")
            .version(Version::HTTP_11)
            .header("host", "app.example")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-user-id", "u1")
            .header("accept", "text/html")
            .header("accept", "application/json")
            .header("x-request-id", "r-1")
            .body(GateBody::empty())
            .unwrap();
        req.headers_mut().append("x-user-groups", HeaderValue::from_static("a"));
        req.headers_mut().append("x-user-groups", HeaderValue::from_static("b"));
        let again: Request<GateBody> = Replay::of(&req).into_request();
        assert_eq!(head(&again), head(&req));
        assert_eq!(again.headers().get_all("accept").iter().count(), 2);
        assert_eq!(again.headers().get_all("x-user-groups").iter().count(), 2);
        assert!(http_body::Body::is_end_stream(again.body()));
    }
}

//! The forward phase: the request goes to the app with its forwarding headers, both bodies
//! streamed; an upgrade is tunnelled when the app agrees to the protocol the client asked for.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::http::body::GateBody;
use crate::http::error::GateError;
use crate::http::forwarded::{ForwardingHeaders, origin_form, set_forwarding_headers};
use crate::http::headers::remove_hop_by_hop;
use crate::request::hygiene;
use crate::transport::conn::{Clock, ConnActivity};
use crate::transport::tunnel;
use crate::upstream::Upstream;

/// The app behind the gate and the tunnels of upgraded connections.
pub(crate) struct Forwarder {
    pub(crate) upstream: Upstream,
    /// Upgraded (tunnelled) connections, so shutdown can wait for them.
    pub(crate) tunnels: TaskTracker,
    pub(crate) clock: Arc<Clock>,
    /// A tunnel idle this long is closed (`server.idle_timeout`).
    pub(crate) idle_timeout: Duration,
}

impl Forwarder {
    /// Forward to the app, streaming both bodies; tunnel an upgrade when the app agrees to the
    /// protocol the client asked for.
    pub(crate) async fn forward(
        &self,
        parts: &mut http::request::Parts,
        body: GateBody,
        f: &ForwardingHeaders<'_>,
        asked: Option<HeaderValue>,
        conn: &Arc<ConnActivity>,
    ) -> Result<Response<GateBody>, GateError> {
        let client_upgrade = if asked.is_some() { parts.extensions.remove::<OnUpgrade>() } else { None };
        set_forwarding_headers(&mut parts.headers, f);
        parts.uri = origin_form(parts.uri.path_and_query());
        parts.version = http::Version::HTTP_11;
        let mut resp = self.upstream.send(parts, body).await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(asked), Some(client)) = (asked, client_upgrade) else {
                tracing::warn!("app answered 101 to a request that did not ask to upgrade");
                return Err(GateError::UpstreamUnavailable);
            };
            if !hygiene::upgrade_accepted(&asked, resp.headers()) {
                tracing::warn!(
                    asked = asked.to_str().unwrap_or("?"),
                    answered = resp.headers().get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or(""),
                    "app switched to a protocol the client did not ask for; not tunnelled"
                );
                return Err(GateError::UpstreamUnavailable);
            }
            let app = hyper::upgrade::on(&mut resp);
            let idle = self.idle_timeout;
            let (clock, conn) = (self.clock.clone(), conn.clone());
            self.tunnels.spawn(async move {
                match tokio::try_join!(client, app) {
                    Ok((client, app)) => tunnel::run(TokioIo::new(client), TokioIo::new(app), idle, &clock).await,
                    Err(e) => tracing::warn!(error = %e, "upgrade failed"),
                }
                // The connection's max_connections slot is released with the tunnel.
                drop(conn);
            });
            let (mut parts, _) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, GateBody::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(parts, GateBody::from_app(body)))
    }
}

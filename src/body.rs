//! The one response/request body type the gate hands to hyper: a small JSON answer of our own,
//! or a streamed body from the other side, without boxing.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

/// Errors a streamed body can yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    #[project = KindProj]
    enum Kind {
        Empty,
        Full { data: Option<Bytes> },
        Incoming { #[pin] body: Incoming },
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Sent to the end.
    Complete,
    /// Dropped before its end: the client went away (or the connection was cut).
    ClientAborted,
    /// The streamed side failed mid-body.
    UpstreamError,
}

impl BodyEnd {
    /// The `outcome` label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyEnd::Complete => "complete",
            BodyEnd::ClientAborted => "client_aborted",
            BodyEnd::UpstreamError => "upstream_error",
        }
    }
}

/// Carried by a body and told once how it ended (then dropped): the access log, duration
/// metrics, in-flight accounting and concurrency leases end here, not at the headers.
pub trait BodyGuard: Send + Sync {
    /// Each data frame as it passes (most guards ignore them).
    fn data(&mut self, _chunk: &Bytes) {}

    fn finished(&mut self, end: BodyEnd);
}

/// Two guards on one body (e.g. a stream lease under the access-log guard).
struct Both(Box<dyn BodyGuard>, Box<dyn BodyGuard>);

impl BodyGuard for Both {
    fn data(&mut self, chunk: &Bytes) {
        self.0.data(chunk);
        self.1.data(chunk);
    }

    fn finished(&mut self, end: BodyEnd) {
        // Inner first: a lease is given back before the request is logged as finished.
        self.0.finished(end);
        self.1.finished(end);
    }
}

pin_project! {
    /// A body that is empty, one chunk we produced, or streamed from a peer. An optional guard
    /// is told when the body ends, fails or is dropped unfinished.
    pub struct GateBody {
        #[pin]
        kind: Kind,
        guard: Option<Box<dyn BodyGuard>>,
    }

    impl PinnedDrop for GateBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut guard) = this.guard.take() {
                let end = if kind_ended(this.kind.as_ref().get_ref()) { BodyEnd::Complete } else { BodyEnd::ClientAborted };
                guard.finished(end);
            }
        }
    }
}

fn kind_ended(kind: &Kind) -> bool {
    match kind {
        Kind::Empty => true,
        Kind::Full { data } => data.is_none(),
        Kind::Incoming { body } => body.is_end_stream(),
    }
}

impl GateBody {
    pub fn empty() -> Self {
        GateBody { kind: Kind::Empty, guard: None }
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        if data.is_empty() {
            return Self::empty();
        }
        GateBody { kind: Kind::Full { data: Some(data) }, guard: None }
    }

    pub fn incoming(body: Incoming) -> Self {
        GateBody { kind: Kind::Incoming { body }, guard: None }
    }

    /// Streamed from a peer (not an answer of our own).
    pub fn is_streamed(&self) -> bool {
        matches!(self.kind, Kind::Incoming { .. })
    }

    /// Tell `guard` how this body ends. A body that already has a guard keeps it: both are
    /// told, the earlier one first.
    pub fn with_guard(mut self, guard: Box<dyn BodyGuard>) -> Self {
        self.guard = Some(match self.guard.take() {
            Some(first) => Box::new(Both(first, guard)),
            None => guard,
        });
        self
    }
}

impl Body for GateBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Incoming { body } => body.poll_frame(cx).map_err(Into::into),
        };
        if let Some(guard) = this.guard.as_mut() {
            let end = match &polled {
                Poll::Ready(None) => Some(BodyEnd::Complete),
                Poll::Ready(Some(Err(_))) => Some(BodyEnd::UpstreamError),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        guard.data(data);
                    }
                    None
                }
                Poll::Pending => None,
            };
            if let (Some(end), Some(mut guard)) = (end, end.and_then(|_| this.guard.take())) {
                guard.finished(end);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        kind_ended(&self.kind)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Incoming { body } => body.size_hint(),
        }
    }
}

/// Why reading a small body of our own failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadBodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body read failed: {0}")]
    Io(#[from] hyper::Error),
}

/// Collect a request body the gate answers itself, refusing more than `limit` bytes early
/// (a declared Content-Length over the limit is refused before reading anything).
pub async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, ReadBodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadBodyError::TooLarge(limit));
    }
    let mut body = http_body_util::Limited::new(body, limit);
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Err(e) => {
                return Err(match e.downcast::<hyper::Error>() {
                    Ok(e) => ReadBodyError::Io(*e),
                    Err(_) => ReadBodyError::TooLarge(limit),
                });
            }
        }
    }
    Ok(out.freeze())
}

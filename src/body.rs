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

pin_project! {
    /// A body that is empty, one chunk we produced, or streamed from a peer. An optional guard
    /// lives as long as the body does (in-flight accounting ends when the stream ends).
    pub struct GateBody {
        #[pin]
        kind: Kind,
        guard: Option<Box<dyn Send + Sync>>,
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

    /// Keep `guard` alive until the body is dropped (finished or abandoned).
    pub fn with_guard(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self.guard = Some(guard);
        self
    }
}

impl Body for GateBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Incoming { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full { data } => data.is_none(),
            Kind::Incoming { body } => body.is_end_stream(),
        }
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

//! The one response/request body type the gate hands to hyper: a small JSON answer of our own,
//! or a streamed body from the other side, without boxing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Weak;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;

pub use crate::http::h1::BoxError;
pub use crate::http::upload::{UploadFailure, UploadState};

use crate::http::upload::Upload;

/// Where an app connection goes back once its answer's body has ended: the app pool, seen from
/// below (the pool implements it; a body cannot name the pool without an import circle).
pub trait IdleShelf: Send + Sync {
    /// Keep `tx` as an idle connection of `worker`'s (or drop it, when full or closed).
    fn put_idle(&self, worker: usize, tx: hyper::client::conn::http1::SendRequest<GateBody>);
}

/// A connection lent to one exchange; given back with [`Lent::give_back`] once its answer's
/// body has ended, dropped (and so closed) otherwise.
pub struct Lent {
    shelf: Weak<dyn IdleShelf>,
    tx: hyper::client::conn::http1::SendRequest<GateBody>,
    /// The worker whose idle connections it goes back to.
    worker: usize,
}

impl Lent {
    pub fn new(
        shelf: Weak<dyn IdleShelf>,
        tx: hyper::client::conn::http1::SendRequest<GateBody>,
        worker: usize,
    ) -> Lent {
        Lent { shelf, tx, worker }
    }

    pub fn give_back(self) {
        if let Some(shelf) = self.shelf.upgrade() {
            shelf.put_idle(self.worker, self.tx);
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Empty,
        Full { data: Option<Bytes> },
        Incoming { #[pin] body: Incoming },
        // An answer of the app: its connection goes back to the pool when the body has ended.
        App { #[pin] body: AppBody },
        Upload { upload: Upload },
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

    /// True when the body's end must wait for [`BodyGuard::ending`]: the body then never says
    /// it has ended before its end has been polled.
    fn holds_end(&self) -> bool {
        false
    }

    /// Called once when the body has been read to its end, before hyper learns of it: a task
    /// the end is held back for (at most [`ENDING_WAIT`]), e.g. a stream lease's release.
    fn ending(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        None
    }

    fn finished(&mut self, end: BodyEnd);
}

/// The longest a body's end waits for its guard's [`BodyGuard::ending`] task.
pub const ENDING_WAIT: Duration = Duration::from_millis(500);

/// Two guards on one body (e.g. a stream lease under the access-log guard).
struct Both(Box<dyn BodyGuard>, Box<dyn BodyGuard>);

impl BodyGuard for Both {
    fn data(&mut self, chunk: &Bytes) {
        self.0.data(chunk);
        self.1.data(chunk);
    }

    fn holds_end(&self) -> bool {
        self.0.holds_end() || self.1.holds_end()
    }

    fn ending(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        // At most one guard holds a lease; another's task, if any, runs on detached.
        let first = self.0.ending();
        let second = self.1.ending();
        first.or(second)
    }

    fn finished(&mut self, end: BodyEnd) {
        // Inner first: a lease is given back before the request is logged as finished.
        self.0.finished(end);
        self.1.finished(end);
    }
}

pin_project! {
    /// An answer's body from the app: through hyper's client connection, given back to the pool
    /// at the body's end, or read by [`crate::http::h1`], which gives its connection back itself.
    #[project = AppProj]
    pub enum AppBody {
        Hyper { #[pin] body: Incoming, lent: Option<Lent> },
        Lean { body: crate::http::h1::Body },
    }
}

impl AppBody {
    pub fn hyper(body: Incoming, lent: Lent) -> Self {
        AppBody::Hyper { body, lent: Some(lent) }
    }

    /// Dropped at its end without a last poll: the connection still goes back.
    fn give_back_if_ended(self: Pin<&mut Self>) {
        if let AppProj::Hyper { body, lent } = self.project()
            && body.is_end_stream()
            && let Some(lent) = lent.take()
        {
            lent.give_back();
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            AppProj::Hyper { mut body, lent } => {
                let polled = body.as_mut().poll_frame(cx);
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    _ => false,
                };
                if ended && let Some(lent) = lent.take() {
                    lent.give_back();
                }
                polled.map_err(Into::into)
            }
            AppProj::Lean { body } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AppBody::Hyper { body, .. } => body.is_end_stream(),
            AppBody::Lean { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AppBody::Hyper { body, .. } => body.size_hint(),
            AppBody::Lean { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// A body that is empty, one chunk we produced, or streamed from a peer. An optional guard
    /// is told when the body ends, fails or is dropped unfinished.
    pub struct GateBody {
        #[pin]
        kind: Kind,
        guard: Option<Box<dyn BodyGuard>>,
        // Set at the end while the guard's ending task runs.
        ending: Option<Ending>,
    }

    impl PinnedDrop for GateBody {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if let KindProj::App { body } = this.kind.as_mut().project() {
                body.give_back_if_ended();
            }
            if let Some(mut guard) = this.guard.take() {
                let end = if kind_ended(this.kind.as_ref().get_ref()) { BodyEnd::Complete } else { BodyEnd::ClientAborted };
                guard.finished(end);
            }
        }
    }
}

/// A body's end held back for a guard's task (see [`BodyGuard::ending`]).
struct Ending {
    task: tokio::task::JoinHandle<()>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Ending {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if Pin::new(&mut self.task).poll(cx).is_ready() || self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

fn kind_ended(kind: &Kind) -> bool {
    match kind {
        Kind::Empty => true,
        Kind::Full { data } => data.is_none(),
        Kind::Incoming { body } => body.is_end_stream(),
        Kind::App { body } => body.is_end_stream(),
        Kind::Upload { upload } => {
            let end = upload.body.is_end_stream();
            if end {
                // Hyper may not poll again after the last frame: the upload is complete now.
                upload.finish();
            }
            end
        }
    }
}

impl GateBody {
    pub fn empty() -> Self {
        GateBody { kind: Kind::Empty, guard: None, ending: None }
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        if data.is_empty() {
            return Self::empty();
        }
        GateBody { kind: Kind::Full { data: Some(data) }, guard: None, ending: None }
    }

    pub fn incoming(body: Incoming) -> Self {
        GateBody { kind: Kind::Incoming { body }, guard: None, ending: None }
    }

    /// An answer of the app (its connection goes back to the pool once the body has ended).
    pub fn from_app(body: AppBody) -> Self {
        GateBody { kind: Kind::App { body }, guard: None, ending: None }
    }

    /// A client's request body on its way to the app, watched: no progress for `timeout` ends
    /// it with an error, and [`UploadState`] tells the sender when it is sent or why it failed.
    pub fn upload(body: Incoming, timeout: Duration) -> Self {
        // A body that ended before it began (most requests) has nothing to watch: no state to
        // allocate, and the sender waits for nothing.
        let state = (!body.is_end_stream()).then(|| Arc::new(UploadState::default()));
        GateBody {
            kind: Kind::Upload { upload: Upload { body, state, timeout, idle: None, waiting: false } },
            guard: None,
            ending: None,
        }
    }

    /// The upload's state, for a body made by [`GateBody::upload`] that was not empty already.
    pub fn upload_state(&self) -> Option<Arc<UploadState>> {
        match &self.kind {
            Kind::Upload { upload } => upload.state.clone(),
            _ => None,
        }
    }

    /// Streamed from a peer (not an answer of our own).
    pub fn is_streamed(&self) -> bool {
        matches!(self.kind, Kind::Incoming { .. } | Kind::App { .. })
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

impl Default for GateBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl Body for GateBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(ending) = this.ending.as_mut() {
            std::task::ready!(ending.poll(cx));
            *this.ending = None;
            return Poll::Ready(None);
        }
        let polled = match this.kind.project() {
            KindProj::Empty => Poll::Ready(None),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Incoming { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::App { body } => body.poll_frame(cx),
            KindProj::Upload { upload } => upload.poll_frame(cx),
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
                let task = if end == BodyEnd::Complete { guard.ending() } else { None };
                guard.finished(end);
                if let Some(task) = task {
                    let mut ending = Ending { task, deadline: Box::pin(tokio::time::sleep(ENDING_WAIT)) };
                    if ending.poll(cx).is_pending() {
                        *this.ending = Some(ending);
                        return Poll::Pending;
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        kind_ended(&self.kind) && self.ending.is_none() && !self.guard.as_ref().is_some_and(|g| g.holds_end())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Incoming { body } => body.size_hint(),
            Kind::App { body } => body.size_hint(),
            Kind::Upload { upload } => upload.body.size_hint(),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A guard whose ending task sleeps, then marks itself done.
    struct Slow {
        sleep: Duration,
        done: Arc<AtomicBool>,
        finished: Arc<AtomicUsize>,
    }

    impl BodyGuard for Slow {
        fn holds_end(&self) -> bool {
            true
        }

        fn ending(&mut self) -> Option<tokio::task::JoinHandle<()>> {
            let (sleep, done) = (self.sleep, self.done.clone());
            Some(tokio::spawn(async move {
                tokio::time::sleep(sleep).await;
                done.store(true, Ordering::SeqCst);
            }))
        }

        fn finished(&mut self, _: BodyEnd) {
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn slow_body(sleep: Duration) -> (GateBody, Arc<AtomicBool>, Arc<AtomicUsize>) {
        let (done, finished) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let guard = Slow { sleep, done: done.clone(), finished: finished.clone() };
        (GateBody::full("last event").with_guard(Box::new(guard)), done, finished)
    }

    #[tokio::test]
    async fn the_end_waits_for_the_guards_ending_task() {
        let (mut body, done, finished) = slow_body(Duration::from_millis(100));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "last event");
        // Nothing more to send, but the body must not say so before the task is through.
        assert!(!body.is_end_stream());
        assert!(body.frame().await.is_none());
        assert!(done.load(Ordering::SeqCst), "the end was passed on before the ending task finished");
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stuck_ending_task_holds_the_end_back_at_most_the_bound() {
        let (body, done, _) = slow_body(Duration::from_secs(30));
        let collected = tokio::time::timeout(ENDING_WAIT * 10, body.collect()).await;
        assert_eq!(collected.expect("end held past the bound").unwrap().to_bytes(), "last event");
        assert!(!done.load(Ordering::SeqCst));
    }
}

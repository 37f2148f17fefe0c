//! A client body on its way to the app, watched: whether it was sent whole, and why not
//! (too slow, too large, reset), so the answer and the pool know what happened.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::body::Incoming;

use crate::http::h1::BoxError;

/// Why a client's request body did not reach the app whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UploadFailure {
    /// No progress for `server.body_timeout`.
    #[error("request body timed out")]
    Timeout,
    /// The client's framing was invalid (e.g. bad chunked encoding) or it went away mid-body.
    #[error("request body malformed or cut short")]
    Malformed,
}

/// Shared between a request body on its way to the app and the code waiting for the answer.
#[derive(Debug, Default)]
pub struct UploadState {
    sent: AtomicBool,
    notify: tokio::sync::Notify,
    /// 0 = none, 1 = timeout, 2 = malformed.
    failure: AtomicU8,
}

impl UploadState {
    fn finish(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    fn fail(&self, failure: UploadFailure) {
        let code = match failure {
            UploadFailure::Timeout => 1,
            UploadFailure::Malformed => 2,
        };
        let _ = self.failure.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// True once the whole body has been handed to the app's connection.
    pub fn is_sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    /// Resolves once the whole body has been handed to the app's connection.
    pub async fn sent(&self) {
        // One waiter (the sender): `notify_one` keeps a permit if it comes first.
        if !self.is_sent() {
            self.notify.notified().await;
        }
    }

    /// Why the body failed, if it did on the client's side.
    pub fn failure(&self) -> Option<UploadFailure> {
        match self.failure.load(Ordering::Acquire) {
            1 => Some(UploadFailure::Timeout),
            2 => Some(UploadFailure::Malformed),
            _ => None,
        }
    }
}

/// A watched client body (see [`crate::http::body::GateBody::upload`]).
pub(crate) struct Upload {
    pub(crate) body: Incoming,
    /// `None` when the body had ended already when the upload began.
    pub(crate) state: Option<Arc<UploadState>>,
    pub(crate) timeout: Duration,
    /// Runs while waiting on the client (not while the app is slow to read); made once, reset.
    pub(crate) idle: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(crate) waiting: bool,
}

impl Upload {
    pub(crate) fn finish(&self) {
        if let Some(state) = &self.state {
            state.finish();
        }
    }

    fn fail(&self, failure: UploadFailure) {
        if let Some(state) = &self.state {
            state.fail(failure);
        }
    }

    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.fail(UploadFailure::Malformed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + self.timeout;
                let idle = self.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !self.waiting {
                    self.waiting = true;
                    idle.as_mut().reset(deadline);
                }
                if idle.as_mut().poll(cx).is_ready() {
                    self.fail(UploadFailure::Timeout);
                    return Poll::Ready(Some(Err(Box::new(UploadFailure::Timeout))));
                }
                Poll::Pending
            }
        }
    }
}

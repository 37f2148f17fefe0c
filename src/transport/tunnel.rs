//! Upgraded connections (WebSocket): bytes copied both ways until either side closes or no
//! byte has moved for `idle_timeout`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::transport::conn::Clock;

/// An IO that stamps the shared clock whenever bytes move through it.
struct Stamped<'a, T> {
    io: T,
    clock: &'a Clock,
    last: Arc<AtomicU64>,
}

impl<T> Stamped<'_, T> {
    fn touch(&self) {
        self.last.store(self.clock.now_ms(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Copy between the client and the app until one closes or the tunnel is idle for `idle`.
pub async fn run<C, A>(client: C, app: A, idle: Duration, clock: &Clock)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(clock.now_ms()));
    let mut client = Stamped { io: client, clock, last: last.clone() };
    let mut app = Stamped { io: app, clock, last: last.clone() };
    let idle_ms = idle.as_millis() as u64;
    let check_every = (idle / 4).max(Duration::from_millis(50));
    let watch = async {
        loop {
            tokio::time::sleep(check_every).await;
            if clock.now_ms().saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                return;
            }
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut app) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel closed with error");
            }
        }
        () = watch => tracing::info!(idle_ms, "tunnel idle: closed"),
    }
}

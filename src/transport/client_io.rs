//! The client socket as hyper sees it: reads are noted for the header timeout, and a socket
//! hyper lets go of is closed with a bounded lingering read, so an early answer (400, 431, 401)
//! reaches a client that is still sending instead of being lost to a TCP reset.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::transport::conn::{Clock, ConnActivity};

/// Lingering close: stop after this much discarded data, this long without data, or in all.
const LINGER_MAX_BYTES: usize = 4 << 20;
const LINGER_READ_TIMEOUT: Duration = Duration::from_secs(2);
const LINGER_MAX_TIME: Duration = Duration::from_secs(5);

pub struct ClientIo<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    io: Option<T>,
    conn: Arc<ConnActivity>,
    clock: Arc<Clock>,
    /// The client closed its side: nothing to linger for.
    eof: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientIo<T> {
    pub fn new(io: T, conn: Arc<ConnActivity>, clock: Arc<Clock>) -> Self {
        ClientIo { io: Some(io), conn, clock, eof: false }
    }

    fn io(&mut self) -> std::io::Result<&mut T> {
        self.io.as_mut().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for ClientIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let io = match this.io() {
            Ok(io) => io,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let r = Pin::new(io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if buf.filled().len() > before {
                this.conn.bytes_received(&this.clock);
            } else if buf.remaining() > 0 {
                this.eof = true;
            }
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for ClientIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write(cx, data),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for ClientIo<T> {
    fn drop(&mut self) {
        let Some(io) = self.io.take() else { return };
        if self.eof {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        // The connection's max_connections slot stays taken until the socket is really closed.
        let conn = self.conn.clone();
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER_MAX_TIME, linger(io)).await;
            drop(conn);
        });
    }
}

/// Send our FIN, then read and discard what the client still sends until it closes too.
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(mut io: T) {
    let _ = tokio::time::timeout(LINGER_READ_TIMEOUT, io.shutdown()).await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    while let Ok(Ok(n)) = tokio::time::timeout(LINGER_READ_TIMEOUT, io.read(&mut buf)).await {
        total += n;
        if n == 0 || total > LINGER_MAX_BYTES {
            return;
        }
    }
}

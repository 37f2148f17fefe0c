//! Driving one connection: header and idle timeouts, finishing it when the gate drains, and the
//! log line for connections hyper ended with an error.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use crate::server::conn_ctx::ConnCtx;
use crate::server::protocols::Serving;
use crate::transport::conn::ConnActivity;

/// Run a connection until it ends, closing it when idle or too slow with a request head, and
/// asking it to finish when the gate drains.
///
/// The drain and the check timer are polled only when one of them woke the task (see
/// [`SideWake`]): nearly every wake-up is the connection's own, and polling both each time was
/// two timer and token checks per request.
pub(crate) async fn drive<C: Serving>(
    mut conn: std::pin::Pin<&mut C>,
    peer: SocketAddr,
    ctx: &ConnCtx,
    activity: &ConnActivity,
) {
    let idle_ms = ctx.idle_timeout.as_millis() as u64;
    let head_ms = ctx.header_timeout.as_millis() as u64;
    let period =
        (ctx.idle_timeout.min(ctx.header_timeout) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drain = ctx.drain.cancelled();
    let mut drain = std::pin::pin!(drain);
    let side = SideWake::woken();
    let side_waker = std::task::Waker::from(side.clone());
    let mut closing = false;
    let ended = std::future::poll_fn(|cx| {
        loop {
            // The connection first: it is what woke the task nearly every time.
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            // Registered before the flag is read: a side wake-up after the read wakes the task.
            side.task.register(cx.waker());
            if !side.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut side_cx = std::task::Context::from_waker(&side_waker);
            if !closing && drain.as_mut().poll(&mut side_cx).is_ready() {
                closing = true;
                conn.as_mut().shutdown();
                // The connection acts on it when polled; the timer is looked at on that turn.
                side.woken.store(true, Ordering::Relaxed);
                continue;
            }
            if tick.poll_tick(&mut side_cx).is_pending() {
                return Poll::Pending;
            }
            let now = ctx.gateway.clock.now_ms();
            match activity.head_wait_ms(now) {
                // A request head that takes longer than header_timeout (slowloris): cut off.
                Some(ms) if ms >= head_ms => {
                    tracing::info!(client_ip = %peer.ip(), "request headers too slow: connection closed");
                    return Poll::Ready(None);
                }
                None if !closing && activity.idle_ms(now).is_some_and(|ms| ms >= idle_ms) => {
                    closing = true;
                    conn.as_mut().shutdown();
                }
                _ => {}
            }
            // Polled again on the next turn, the timer registers its next tick.
            side.woken.store(true, Ordering::Relaxed);
        }
    })
    .await;
    if let Some(Err(e)) = ended {
        let e: Box<dyn std::error::Error + Send + Sync> = e.into();
        log_connection_error(peer, e.as_ref());
    }
}

/// The waker [`drive`] polls the drain and the check timer with: it notes that one of them woke
/// the task, then wakes the task.
struct SideWake {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl SideWake {
    /// Made woken, so that both are polled (and registered) at the first poll.
    fn woken() -> Arc<SideWake> {
        Arc::new(SideWake {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        })
    }
}

impl std::task::Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Malformed, oversize or too-slow requests never reach the pipeline (hyper answers 400/431 or
/// closes the connection): they get a log line here. Peers hanging up are only debug noise.
fn log_connection_error(peer: SocketAddr, e: &(dyn std::error::Error + 'static)) {
    match e.downcast_ref::<hyper::Error>() {
        Some(he) if he.is_parse_too_large() => {
            tracing::info!(client_ip = %peer.ip(), error = %he, "request headers too large: answered 431");
        }
        Some(he) if he.is_parse() => {
            tracing::info!(client_ip = %peer.ip(), error = %he, "malformed request: answered 400")
        }
        Some(he) if he.is_timeout() => {
            tracing::info!(client_ip = %peer.ip(), error = %he, "request headers too slow: connection closed")
        }
        _ => tracing::debug!(client_ip = %peer.ip(), error = %e, "connection ended with error"),
    }
}

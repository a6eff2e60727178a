//! One HTTPS connection after its TLS handshake: hyper's HTTP/1.1 and HTTP/2 with limits, and
//! a watchdog that closes the connection when it stays silent. A peer must send its first
//! bytes within [`FIRST_BYTE_TIMEOUT`] (hyper has no timer before it knows the protocol), and a
//! connection with no request in flight and no bytes either way for the idle timeout
//! (`--http-idle-timeout`) is closed (HTTP/2 with GOAWAY). A request in flight (a direct method waiting for its device) keeps the
//! connection, however quiet.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The client certificate chain (DER, leaf first) of the HTTPS connection a request came on,
/// as a request extension: an MQTT-over-WebSocket upgrade hands it to the device session, which
/// signs X.509 devices in with it. Absent when the client presented none.
#[derive(Debug, Clone)]
pub struct ClientCertificates(pub Arc<Vec<Vec<u8>>>);

/// Time from the TLS handshake to the first request bytes.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams one connection may have open.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 flow-control windows: what a peer may send before the hub reads it.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 pings on a quiet connection, and how long an answer may take.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a closing connection may take to finish what is in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// What the watchdog watches, shared with the connection's I/O and its service.
struct Activity {
    origin: Instant,
    /// Milliseconds after `origin` of the last byte read or written.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Any bytes read yet.
    started: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The connection's stream, noting activity and handing back the admission permit (the peer
/// counts as unauthenticated until it sends its first bytes).
struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
    admission: Option<OwnedSemaphorePermit>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
            if !self.activity.started.swap(true, Ordering::Relaxed) {
                self.admission = None;
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Counts a request as in flight from its arrival until its response future ends (answered
/// or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serves HTTP on one TLS stream until the peer leaves, the watchdog closes it, or the hub
/// shuts down.
pub async fn serve<S>(
    io: S,
    router: axum::Router,
    idle_timeout: Duration,
    shutdown: CancellationToken,
    admission: Option<OwnedSemaphorePermit>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        origin: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        started: std::sync::atomic::AtomicBool::new(false),
    });
    let io = Watched {
        io,
        activity: activity.clone(),
        admission,
    };
    let counted = {
        let activity = activity.clone();
        tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let guard = InFlight::new(&activity);
            let mut router = router.clone();
            async move {
                let _guard = guard;
                tower::Service::call(&mut router, req).await
            }
        })
    };

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper leaves its HTTP/1 header-read timeout (30 s) off, and a client
    // trickling headers would hold the connection forever.
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(counted));
    tokio::pin!(conn);
    loop {
        let started = activity.started.load(Ordering::Relaxed);
        let deadline = if started {
            activity.last() + idle_timeout
        } else {
            // Look again each second: once bytes arrive the idle timeout applies instead.
            (activity.origin + FIRST_BYTE_TIMEOUT).min(Instant::now() + Duration::from_secs(1))
        };
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("HTTP connection ended: {e}");
                }
                return;
            }
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    // A request is being served: only time without one counts.
                    activity.touch();
                    continue;
                }
                let now_started = activity.started.load(Ordering::Relaxed);
                if !now_started && Instant::now() >= activity.origin + FIRST_BYTE_TIMEOUT {
                    // Not a byte since the handshake: nothing to close gracefully.
                    tracing::debug!("closing an HTTPS connection that sent nothing");
                    metrics::counter!("twinhub_http_idle_closed_total", "phase" => "first_byte").increment(1);
                    return;
                }
                if now_started && activity.last() + idle_timeout <= Instant::now() {
                    metrics::counter!("twinhub_http_idle_closed_total", "phase" => "idle").increment(1);
                    break;
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

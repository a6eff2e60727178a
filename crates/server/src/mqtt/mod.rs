//! The device endpoint: MQTT 3.1.1 over TLS and over WebSockets, both feeding the one session
//! implementation in `session` (generic over the byte stream); `crate::ws` bridges WebSocket
//! frames to a byte stream.

mod c2d;
mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twinhub_core::Hub;

pub use session::run_session;

/// What every session needs from the process.
#[derive(Clone)]
pub struct SessionContext {
    pub hub: Arc<Hub>,
    pub connect_timeout: Duration,
    pub shutdown: CancellationToken,
    /// Shutdown waits for what this tracks (WebSocket sessions run outside the accept loop).
    pub tracker: TaskTracker,
}

/// Serves one MQTT-over-WebSocket connection. `certificates` is the HTTPS connection's client
/// chain (DER, leaf first; empty without one), for X.509 devices. `admission` (the peer's place
/// among unauthenticated connections) goes to the session, which gives it back once the device
/// has authenticated.
pub async fn serve_websocket(
    socket: WebSocket,
    ctx: SessionContext,
    certificates: Vec<Vec<u8>>,
    admission: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let tracker = ctx.tracker.clone();
    crate::ws::bridge(socket, &tracker, move |io| {
        run_session(ctx, io, "websocket".to_string(), certificates, admission)
    })
    .await;
}

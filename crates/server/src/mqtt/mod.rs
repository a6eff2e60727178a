//! The device endpoint: MQTT 3.1.1 over TLS and over WebSockets, both feeding the one session
//! implementation in `session` (generic over the byte stream). The WebSocket path bridges
//! binary frames to a byte stream.

mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Serves one MQTT-over-WebSocket connection: frames in, bytes to the session, and back.
/// `admission` (the peer's place among unauthenticated connections) goes to the session,
/// which gives it back once the device has authenticated.
pub async fn serve_websocket(
    socket: WebSocket,
    ctx: SessionContext,
    admission: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let (session_io, bridge_io) = tokio::io::duplex(64 * 1024);
    let session = ctx.tracker.spawn(run_session(
        ctx.clone(),
        session_io,
        "websocket".to_string(),
        admission,
    ));
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut from_session, mut to_session) = tokio::io::split(bridge_io);
    let inbound = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(bytes) => {
                    if to_session.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                // MQTT travels in binary frames only; pings are answered by axum.
                Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        let _ = to_session.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_session.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if ws_tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    // Either side ending ends the bridge; the session notices its stream closing.
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
    let _ = session.await;
}

//! Bridges a WebSocket's binary frames to a byte stream, so the MQTT session and the AMQP
//! connection (both written over `AsyncRead + AsyncWrite`) serve WebSocket clients unchanged.

use std::future::Future;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Runs `serve` over a byte stream fed from `socket`'s binary frames and answered in binary
/// frames, until either side ends.
pub(crate) async fn bridge<F, Fut>(
    socket: WebSocket,
    tracker: &tokio_util::task::TaskTracker,
    serve: F,
) where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (served_io, bridge_io) = tokio::io::duplex(64 * 1024);
    let served = tracker.spawn(serve(served_io));
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut from_served, mut to_served) = tokio::io::split(bridge_io);
    let inbound = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(bytes) => {
                    if to_served.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                // Both protocols travel in binary frames only; pings are answered by axum.
                Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        let _ = to_served.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_served.read(&mut buf).await {
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
    // Either side ending ends the bridge; the served task notices its stream closing.
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
    let _ = served.await;
}

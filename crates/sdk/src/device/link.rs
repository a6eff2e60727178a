//! One connection to the hub: TCP, TLS (tokio-rustls), optionally a WebSocket upgrade
//! (tokio-tungstenite's client handshake over our TLS stream), then CONNECT and CONNACK with
//! the `twinhub_mqtt` codec. Hands the connection task a [`Link`]: a read half, a write half,
//! and what the hub said about the session.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use twinhub_mqtt::{ConnAck, Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, Packet};

use super::settings::{Settings, Transport};
use crate::error::{Error, Result};

/// The WebSocket path IoT Hub serves MQTT on.
pub(crate) const WEBSOCKET_PATH: &str = "/$iothub/websocket";
/// Largest packet accepted from the hub: IoT Hub's 256 KiB message limit plus headers.
pub(crate) const MAX_PACKET: usize = DEFAULT_MAX_PACKET_SIZE;
const READ_CHUNK: usize = 8 * 1024;
/// Largest WebSocket message accepted: a frame may carry several MQTT packets.
const MAX_WS_MESSAGE: usize = 4 * MAX_PACKET;

type Tls = TlsStream<TcpStream>;

/// The receiving half of a connection.
pub(crate) enum Reader {
    Tls(ReadHalf<Tls>),
    Ws(SplitStream<WebSocketStream<Tls>>),
}

/// The sending half of a connection.
pub(crate) enum Writer {
    Tls(WriteHalf<Tls>),
    Ws(SplitSink<WebSocketStream<Tls>, Message>),
}

impl Reader {
    /// Appends whatever arrives next to `buf`; `Ok(0)` means the hub closed the stream.
    /// Cancel-safe: nothing read is lost if the future is dropped before it completes.
    pub async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Reader::Tls(rd) => {
                buf.reserve(READ_CHUNK);
                rd.read_buf(buf).await
            }
            Reader::Ws(rd) => loop {
                match rd.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                    // MQTT travels in binary frames only (MQTT 3.1.1 §6).
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the hub sent a text WebSocket frame",
                        ));
                    }
                    // Pings are answered by tungstenite; empty frames carry nothing.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(ws_io_error(e)),
                }
            },
        }
    }
}

impl Writer {
    /// Writes one batch of encoded packets (one WebSocket frame on that transport).
    pub async fn write(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            Writer::Tls(wr) => {
                wr.write_all(&data).await?;
                wr.flush().await
            }
            Writer::Ws(wr) => wr.send(Message::Binary(data)).await.map_err(ws_io_error),
        }
    }

    /// Closes the sending side politely (TLS close_notify, WebSocket close frame).
    pub async fn close(&mut self) {
        match self {
            Writer::Tls(wr) => {
                let _ = wr.shutdown().await;
            }
            Writer::Ws(wr) => {
                let _ = wr.close().await;
            }
        }
    }
}

fn ws_io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// An accepted connection.
pub(crate) struct Link {
    pub reader: Reader,
    pub writer: Writer,
    /// Bytes read after CONNACK that belong to the next packets.
    pub inbuf: BytesMut,
    pub session_present: bool,
    /// When the connection's token must be replaced (never for a certificate).
    pub renew_at: Option<Instant>,
}

/// Dials, upgrades, authenticates; one attempt, bounded by the connect timeout.
pub(crate) async fn establish(settings: &Settings) -> Result<Link> {
    match tokio::time::timeout(settings.connect_timeout, attempt(settings)).await {
        Ok(result) => result,
        Err(_) => Err(Error::TimedOut),
    }
}

async fn attempt(settings: &Settings) -> Result<Link> {
    let host = settings.dial_host.as_str();
    let port = settings.port;
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| Error::Unreachable(format!("cannot connect to {host}:{port}: {e}")))?;
    // Small request/answer packets: do not let Nagle hold them back.
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(settings.tls.clone())
        .connect(settings.server_name.clone(), tcp)
        .await
        .map_err(|e| Error::Unreachable(format!("TLS with {host}:{port} failed: {e}")))?;
    let (mut reader, mut writer) = match settings.transport {
        Transport::Mqtt => {
            let (rd, wr) = tokio::io::split(tls);
            (Reader::Tls(rd), Writer::Tls(wr))
        }
        Transport::WebSocket => {
            let ws = websocket(tls, host, port).await?;
            let (wr, rd) = ws.split();
            (Reader::Ws(rd), Writer::Ws(wr))
        }
    };

    let token = settings.sign()?;
    let renew_at = settings.renew_after().map(|after| Instant::now() + after);
    let connect = Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        // IoT Hub keeps subscriptions across connections only for persistent sessions.
        clean_session: false,
        keep_alive: u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX),
        client_id: settings.client_id(),
        will: None,
        username: Some(settings.username()),
        password: token.map(Bytes::from),
    };
    let mut out = BytesMut::with_capacity(512);
    twinhub_mqtt::encode(&Packet::Connect(connect), &mut out)
        .map_err(|e| Error::InvalidArgument(format!("cannot encode CONNECT: {e}")))?;
    writer
        .write(out.freeze())
        .await
        .map_err(|e| Error::Unreachable(format!("sending CONNECT failed: {e}")))?;

    let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
    let ack = loop {
        match twinhub_mqtt::decode(&mut inbuf, MAX_PACKET) {
            Ok(Some(Packet::ConnAck(ack))) => break ack,
            Ok(Some(other)) => {
                return Err(Error::Protocol(format!(
                    "expected CONNACK, got {}",
                    other.packet_type()
                )));
            }
            Ok(None) => {}
            Err(e) => return Err(Error::Protocol(format!("malformed CONNACK: {e}"))),
        }
        match reader.read(&mut inbuf).await {
            Ok(0) => {
                return Err(Error::Unreachable(
                    "the hub closed the connection before CONNACK".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(Error::Unreachable(format!("waiting for CONNACK: {e}"))),
        }
    };
    accepted(ack)?;
    Ok(Link {
        reader,
        writer,
        inbuf,
        session_present: ack.session_present,
        renew_at,
    })
}

/// Maps a CONNACK refusal onto the error the caller can act on.
fn accepted(ack: ConnAck) -> Result<()> {
    match ack.code {
        ConnectReturnCode::Accepted => Ok(()),
        ConnectReturnCode::BadUsernameOrPassword => Err(Error::NotAuthorized(
            "bad user name or password (CONNACK 4)".into(),
        )),
        ConnectReturnCode::NotAuthorized => Err(Error::NotAuthorized(
            "not authorized (CONNACK 5): check the key or certificate and that the identity is enabled".into(),
        )),
        ConnectReturnCode::ServerUnavailable => Err(Error::Unreachable(
            "the hub is unavailable (CONNACK 3)".into(),
        )),
        ConnectReturnCode::UnacceptableProtocolVersion => Err(Error::Protocol(
            "the hub does not accept MQTT 3.1.1 (CONNACK 1)".into(),
        )),
        ConnectReturnCode::IdentifierRejected => Err(Error::Protocol(
            "the hub rejected the client id (CONNACK 2)".into(),
        )),
    }
}

/// Upgrades `tls` to a WebSocket speaking the `mqtt` subprotocol.
async fn websocket(tls: Tls, host: &str, port: u16) -> Result<WebSocketStream<Tls>> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("wss://{authority}{WEBSOCKET_PATH}")
        .into_client_request()
        .map_err(|e| Error::InvalidArgument(format!("cannot build the WebSocket request: {e}")))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_WS_MESSAGE);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tls, Some(config))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Io(e) => {
                Error::Unreachable(format!("WebSocket upgrade with {authority} failed: {e}"))
            }
            tungstenite::Error::Http(resp) => Error::Protocol(format!(
                "the hub refused the WebSocket upgrade with HTTP {}",
                resp.status()
            )),
            other => Error::Protocol(format!("WebSocket upgrade failed: {other}")),
        })?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connack_codes_map_to_actionable_errors() {
        let ack = |code| ConnAck {
            session_present: false,
            code,
        };
        assert!(accepted(ack(ConnectReturnCode::Accepted)).is_ok());
        for code in [
            ConnectReturnCode::BadUsernameOrPassword,
            ConnectReturnCode::NotAuthorized,
        ] {
            assert!(matches!(accepted(ack(code)), Err(Error::NotAuthorized(_))));
        }
        assert!(matches!(
            accepted(ack(ConnectReturnCode::ServerUnavailable)),
            Err(Error::Unreachable(_))
        ));
        assert!(matches!(
            accepted(ack(ConnectReturnCode::IdentifierRejected)),
            Err(Error::Protocol(_))
        ));
    }
}

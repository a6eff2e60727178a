//! A minimal MQTT 3.1.1 client connection over TLS, built on the `twinhub-mqtt` codec: what
//! a simulated device or caller needs (CONNECT, SUBSCRIBE, PUBLISH, reading packets) and
//! nothing more. Workers read everything buffered before acting and write a batch with one
//! flush, as the hub's own session task does, so the load generator is not the bottleneck.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use twinhub_mqtt::{
    Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, Packet, Publish, QoS, Subscribe,
    SubscribeReturnCode, Topic, decode, encode,
};
use twinhub_proto::sas::{device_resource_uri, generate_sas_token};
use twinhub_proto::topic::mqtt_username;

use crate::error::{Error, Result};
use crate::tls;

/// What a client says in CONNECT.
#[derive(Debug, Clone)]
pub struct Login {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
}

impl Login {
    /// A twinhub device authenticating with a SAS token signed by its key, valid until
    /// `expiry_unix`.
    pub fn hub_device(
        hostname: &str,
        device_id: &str,
        key_base64: &str,
        expiry_unix: u64,
        keep_alive: u16,
    ) -> Result<Login> {
        let resource = device_resource_uri(hostname, device_id, None);
        let token = generate_sas_token(&resource, key_base64, None, expiry_unix)
            .map_err(|e| Error::Setup(format!("signing a SAS token for {device_id}: {e}")))?;
        Ok(Login {
            client_id: device_id.to_string(),
            username: Some(mqtt_username(hostname, device_id)),
            password: Some(token),
            keep_alive,
        })
    }

    /// An anonymous client of a plain broker.
    pub fn anonymous(client_id: &str, keep_alive: u16) -> Login {
        Login {
            client_id: client_id.to_string(),
            username: None,
            password: None,
            keep_alive,
        }
    }

    fn packet(&self) -> Packet {
        Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            // Bench clients keep nothing between runs.
            clean_session: true,
            keep_alive: self.keep_alive,
            client_id: self.client_id.clone(),
            will: None,
            username: self.username.clone(),
            password: self.password.clone().map(Bytes::from),
        })
    }
}

/// An open MQTT connection: the TLS stream and its read and write buffers.
pub struct Conn {
    io: TlsStream<TcpStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_pkid: u16,
}

impl Conn {
    /// Connects over TLS, sends CONNECT and waits for an accepting CONNACK, all within
    /// `limit`.
    pub async fn open(
        tls: &tls::Client,
        addr: SocketAddr,
        source: Option<IpAddr>,
        login: &Login,
        limit: Duration,
    ) -> Result<Conn> {
        timeout(limit, async {
            let io = tls.connect(addr, source).await?;
            let mut conn = Conn {
                io,
                rbuf: BytesMut::with_capacity(4096),
                wbuf: BytesMut::with_capacity(1024),
                next_pkid: 0,
            };
            conn.queue(&login.packet())?;
            conn.flush().await?;
            match conn.next_packet().await? {
                Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Accepted => Ok(conn),
                Packet::ConnAck(ack) => Err(Error::Protocol(format!(
                    "CONNECT of '{}' refused: {:?}",
                    login.client_id, ack.code
                ))),
                other => Err(Error::Protocol(format!(
                    "expected CONNACK, got {}",
                    other.packet_type()
                ))),
            }
        })
        .await
        .map_err(|_| Error::timeout(format!("connecting '{}'", login.client_id), limit))?
    }

    /// Encodes a packet into the write buffer; [`Conn::flush`] sends it.
    pub fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode(packet, &mut self.wbuf)?;
        Ok(())
    }

    /// The next packet id (1..=65535, wrapping).
    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    /// Queues a PUBLISH; returns its packet id (0 at QoS 0).
    pub fn publish(&mut self, topic: impl Into<Bytes>, qos: QoS, payload: Bytes) -> Result<u16> {
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            self.pkid()
        };
        self.queue(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: Topic::new(topic)?,
            pkid,
            payload,
        }))?;
        Ok(pkid)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let data = self.wbuf.split();
        self.io
            .write_all(&data)
            .await
            .map_err(|e| Error::io("writing to the broker", e))?;
        // rustls buffers plaintext until flushed.
        self.io
            .flush()
            .await
            .map_err(|e| Error::io("writing to the broker", e))
    }

    /// Reads whatever the socket has; [`Error::Closed`] at end of stream.
    pub async fn read_more(&mut self) -> Result<()> {
        self.rbuf.reserve(4096);
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(Error::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(Error::io("reading from the broker", e)),
        }
    }

    /// The next packet already in the read buffer, if a whole one is there.
    pub fn next_buffered(&mut self) -> Result<Option<Packet>> {
        Ok(decode(&mut self.rbuf, DEFAULT_MAX_PACKET_SIZE)?)
    }

    /// Reads until one whole packet is there.
    pub async fn next_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = self.next_buffered()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Subscribes to `filters` and waits for the SUBACK, within `limit`. Anything else that
    /// arrives first is dropped: callers subscribe before any traffic is addressed to them.
    pub async fn subscribe(&mut self, filters: &[String], qos: QoS, limit: Duration) -> Result<()> {
        let pkid = self.pkid();
        let filters = filters
            .iter()
            .map(|f| Ok((Topic::new(f.clone())?, qos)))
            .collect::<Result<Vec<_>>>()?;
        self.queue(&Packet::Subscribe(Subscribe { pkid, filters }))?;
        timeout(limit, async {
            self.flush().await?;
            loop {
                match self.next_packet().await? {
                    Packet::SubAck(ack) if ack.pkid == pkid => {
                        return if ack.return_codes.contains(&SubscribeReturnCode::Failure) {
                            Err(Error::Protocol("a subscription was refused".into()))
                        } else {
                            Ok(())
                        };
                    }
                    _ => continue,
                }
            }
        })
        .await
        .map_err(|_| Error::timeout("subscribing", limit))?
    }

    /// Says DISCONNECT and closes the TLS session; errors are moot at this point.
    pub async fn close(mut self) {
        if self.queue(&Packet::Disconnect).is_ok() {
            let _ = timeout(Duration::from_secs(2), async {
                let _ = self.flush().await;
                let _ = self.io.shutdown().await;
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_login_carries_the_iot_hub_user_name_and_a_device_token() {
        let key = "dHdpbmh1Yi1iZW5jaC1kZXZpY2Uta2V5LTAwMDAwMDA=";
        let login = Login::hub_device("localhost", "dev-000001", key, 4_000_000_000, 300)
            .expect("a valid key signs");
        assert_eq!(login.client_id, "dev-000001");
        assert_eq!(
            login.username.as_deref(),
            Some("localhost/dev-000001/?api-version=2021-04-12")
        );
        let token = login.password.unwrap_or_default();
        let parsed = twinhub_proto::SasToken::parse(&token).expect("the token parses");
        assert!(parsed.verify(key), "{token}");
        assert_eq!(parsed.resource, "localhost/devices/dev-000001");
        let Packet::Connect(c) = Login::anonymous("x", 7).packet() else {
            panic!("not a CONNECT");
        };
        assert!(c.clean_session && c.username.is_none() && c.keep_alive == 7);
    }

    #[test]
    fn a_key_that_is_not_base64_is_an_error_not_a_panic() {
        assert!(Login::hub_device("localhost", "d", "%%%", 1, 0).is_err());
    }
}

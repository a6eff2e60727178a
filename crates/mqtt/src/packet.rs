//! The MQTT 3.1.1 packet model shared by [`decode`](crate::decode) and
//! [`encode`](crate::encode): one struct or variant per control packet, fields as on the wire.

use std::fmt;

use bytes::Bytes;

use crate::{Error, Topic};

/// Quality of service of a PUBLISH, a will or a subscription (§4.3).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl TryFrom<u8> for QoS {
    type Error = Error;

    fn try_from(value: u8) -> Result<QoS, Error> {
        match value {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            other => Err(Error::InvalidQoS(other)),
        }
    }
}

/// The control packet type in the high nibble of the first byte (§2.2.1).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
}

impl PacketType {
    /// The name the specification uses, for logs and error messages.
    pub fn name(self) -> &'static str {
        match self {
            PacketType::Connect => "CONNECT",
            PacketType::ConnAck => "CONNACK",
            PacketType::Publish => "PUBLISH",
            PacketType::PubAck => "PUBACK",
            PacketType::PubRec => "PUBREC",
            PacketType::PubRel => "PUBREL",
            PacketType::PubComp => "PUBCOMP",
            PacketType::Subscribe => "SUBSCRIBE",
            PacketType::SubAck => "SUBACK",
            PacketType::Unsubscribe => "UNSUBSCRIBE",
            PacketType::UnsubAck => "UNSUBACK",
            PacketType::PingReq => "PINGREQ",
            PacketType::PingResp => "PINGRESP",
            PacketType::Disconnect => "DISCONNECT",
        }
    }

    pub(crate) fn from_nibble(nibble: u8) -> Result<PacketType, Error> {
        Ok(match nibble {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            other => return Err(Error::UnknownPacketType(other)),
        })
    }

    /// The fixed-header flags every type but PUBLISH must carry (§2.2.2).
    pub(crate) fn required_flags(self) -> u8 {
        match self {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A client's request to open a session (§3.1).
///
/// Decoding accepts any protocol name and level so the server can refuse an unsupported
/// version with CONNACK code 1 itself. The payload layout is only known for levels 3 (MQTT 3.1)
/// and 4 (MQTT 3.1.1); for any other level decoding stops after the keep-alive and leaves the
/// client id empty and the will and credentials absent.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    /// `"MQTT"` for 3.1.1.
    pub protocol_name: String,
    /// 4 for 3.1.1.
    pub protocol_level: u8,
    pub clean_session: bool,
    /// Seconds; 0 turns the keep-alive mechanism off.
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    /// Binary data in the protocol; IoT Hub carries a SAS token here.
    pub password: Option<Bytes>,
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password is a credential (a SAS token for IoT Hub): keep it out of logs.
        f.debug_struct("Connect")
            .field("protocol_name", &self.protocol_name)
            .field("protocol_level", &self.protocol_level)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The message the server publishes on the client's behalf if it goes away uncleanly (§3.1.2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: Topic,
    pub message: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// The CONNACK return code (§3.2.2.3).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUsernameOrPassword = 4,
    NotAuthorized = 5,
}

impl TryFrom<u8> for ConnectReturnCode {
    type Error = Error;

    fn try_from(value: u8) -> Result<ConnectReturnCode, Error> {
        Ok(match value {
            0 => ConnectReturnCode::Accepted,
            1 => ConnectReturnCode::UnacceptableProtocolVersion,
            2 => ConnectReturnCode::IdentifierRejected,
            3 => ConnectReturnCode::ServerUnavailable,
            4 => ConnectReturnCode::BadUsernameOrPassword,
            5 => ConnectReturnCode::NotAuthorized,
            other => return Err(Error::InvalidConnectReturnCode(other)),
        })
    }
}

/// The server's answer to CONNECT (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

/// An application message (§3.3).
///
/// `pkid` is 0 and absent on the wire for QoS 0; encoding ignores it there. For QoS 1 and 2 it
/// must be non-zero.
#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: Topic,
    pub pkid: u16,
    pub payload: Bytes,
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Payloads run to 256 KiB of device data: log their size, not their content.
        f.debug_struct("Publish")
            .field("dup", &self.dup)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("topic", &self.topic)
            .field("pkid", &self.pkid)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// One entry of a SUBACK (§3.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscribeReturnCode {
    /// Granted, at this maximum QoS.
    Success(QoS),
    /// Refused; 0x80 on the wire.
    Failure,
}

impl SubscribeReturnCode {
    pub(crate) const FAILURE: u8 = 0x80;

    pub fn to_u8(self) -> u8 {
        match self {
            SubscribeReturnCode::Success(qos) => qos as u8,
            SubscribeReturnCode::Failure => Self::FAILURE,
        }
    }
}

impl TryFrom<u8> for SubscribeReturnCode {
    type Error = Error;

    fn try_from(value: u8) -> Result<SubscribeReturnCode, Error> {
        match value {
            Self::FAILURE => Ok(SubscribeReturnCode::Failure),
            0..=2 => QoS::try_from(value).map(SubscribeReturnCode::Success),
            other => Err(Error::InvalidSubAckReturnCode(other)),
        }
    }
}

/// A request for one or more subscriptions (§3.8). Filters are not checked for wildcard
/// placement; see [`Topic::is_valid_filter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<(Topic, QoS)>,
}

/// The answer to SUBSCRIBE, one return code per requested filter, in order (§3.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    pub return_codes: Vec<SubscribeReturnCode>,
}

/// A request to remove subscriptions (§3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<Topic>,
}

/// Any MQTT 3.1.1 control packet. Acknowledgements carry just their packet identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect => PacketType::Disconnect,
        }
    }
}

impl From<Publish> for Packet {
    fn from(publish: Publish) -> Packet {
        Packet::Publish(publish)
    }
}

impl From<Connect> for Packet {
    fn from(connect: Connect) -> Packet {
        Packet::Connect(connect)
    }
}

impl From<ConnAck> for Packet {
    fn from(connack: ConnAck) -> Packet {
        Packet::ConnAck(connack)
    }
}

impl From<Subscribe> for Packet {
    fn from(subscribe: Subscribe) -> Packet {
        Packet::Subscribe(subscribe)
    }
}

impl From<SubAck> for Packet {
    fn from(suback: SubAck) -> Packet {
        Packet::SubAck(suback)
    }
}

impl From<Unsubscribe> for Packet {
    fn from(unsubscribe: Unsubscribe) -> Packet {
        Packet::Unsubscribe(unsubscribe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_conversions_reject_out_of_range_values() {
        assert_eq!(QoS::try_from(2), Ok(QoS::ExactlyOnce));
        assert_eq!(QoS::try_from(3), Err(Error::InvalidQoS(3)));
        assert_eq!(
            ConnectReturnCode::try_from(5),
            Ok(ConnectReturnCode::NotAuthorized)
        );
        assert_eq!(
            ConnectReturnCode::try_from(6),
            Err(Error::InvalidConnectReturnCode(6))
        );
        assert_eq!(
            SubscribeReturnCode::try_from(0x80),
            Ok(SubscribeReturnCode::Failure)
        );
        assert_eq!(
            SubscribeReturnCode::try_from(3),
            Err(Error::InvalidSubAckReturnCode(3))
        );
        assert_eq!(PacketType::from_nibble(0), Err(Error::UnknownPacketType(0)));
        assert_eq!(
            PacketType::from_nibble(15),
            Err(Error::UnknownPacketType(15))
        );
    }

    #[test]
    fn debug_output_hides_password_and_payload() {
        let connect = Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: false,
            keep_alive: 60,
            client_id: "d1".into(),
            will: None,
            username: Some("hub/d1/?api-version=2019-10-01".into()),
            password: Some(Bytes::from_static(b"SharedAccessSignature sr=secret")),
        };
        let text = format!("{connect:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");

        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: Topic::from_static("t"),
            pkid: 0,
            payload: Bytes::from_static(b"temperature=21"),
        };
        let text = format!("{publish:?}");
        assert!(!text.contains("temperature"), "{text}");
        assert!(text.contains("payload_len: 14"), "{text}");
    }
}

//! Bytes to [`Packet`]: frames one packet off the front of a read buffer and parses it.
//! Called by the server's connection task and the SDK on whatever the socket delivered.

use bytes::{Bytes, BytesMut};

use crate::packet::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PacketType, Publish, QoS, SubAck,
    Subscribe, SubscribeReturnCode, Unsubscribe,
};
use crate::topic::{check_mqtt_str, check_topic_name};
use crate::{Error, Topic};

/// Decodes the first packet in `buf`.
///
/// * `Ok(None)`: `buf` holds only part of a packet. Nothing is consumed; read more and call
///   again. This is ordinary control flow, not an error.
/// * `Ok(Some(packet))`: exactly that packet's bytes were consumed. Topics and payloads share
///   the buffer's memory rather than being copied.
/// * `Err(_)`: the peer sent something malformed, or a frame larger than `max_packet_size`
///   bytes (fixed header included). The size is checked as soon as the fixed header is
///   readable, without waiting for the body, so a hostile length never makes the caller buffer
///   it. After an error the stream cannot be resynchronised and the connection must be closed;
///   the buffer may or may not have been consumed.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, Error> {
    let Some(header) = FixedHeader::parse(buf, max_packet_size)? else {
        return Ok(None);
    };
    let frame_len = header.header_len + header.remaining_len;
    if buf.len() < frame_len {
        return Ok(None);
    }
    // Freeze the frame once; every field below is a slice of it, not a copy.
    let frame = buf.split_to(frame_len).freeze();
    let body = Reader {
        buf: frame.slice(header.header_len..),
    };
    decode_body(header, body).map(Some)
}

struct FixedHeader {
    packet_type: PacketType,
    flags: u8,
    /// First byte plus the 1 to 4 bytes of remaining length.
    header_len: usize,
    remaining_len: usize,
}

impl FixedHeader {
    /// Reads the fixed header, validating everything it alone determines. `Ok(None)` when it
    /// is not complete yet.
    fn parse(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, Error> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        // Type and flags are known from the first byte: reject garbage before waiting for more.
        let packet_type = PacketType::from_nibble(first >> 4)?;
        let flags = first & 0x0F;
        check_flags(packet_type, flags)?;

        let mut remaining_len = 0usize;
        for (index, shift) in [0u32, 7, 14, 21].into_iter().enumerate() {
            let Some(&byte) = buf.get(1 + index) else {
                return Ok(None);
            };
            remaining_len |= usize::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                let header_len = 2 + index;
                let size = header_len + remaining_len;
                if size > max_packet_size {
                    return Err(Error::PacketTooLarge {
                        size,
                        max: max_packet_size,
                    });
                }
                check_fixed_length(packet_type, remaining_len)?;
                return Ok(Some(FixedHeader {
                    packet_type,
                    flags,
                    header_len,
                    remaining_len,
                }));
            }
        }
        Err(Error::MalformedRemainingLength)
    }
}

fn check_flags(packet_type: PacketType, flags: u8) -> Result<(), Error> {
    if packet_type == PacketType::Publish {
        let qos = QoS::try_from((flags >> 1) & 0b11)?;
        if qos == QoS::AtMostOnce && flags & 0b1000 != 0 {
            return Err(Error::DupWithQoS0);
        }
        return Ok(());
    }
    let expected = packet_type.required_flags();
    if flags != expected {
        return Err(Error::InvalidFlags {
            packet: packet_type,
            flags,
            expected,
        });
    }
    Ok(())
}

/// Packets whose size the specification fixes are rejected on their header alone, so a PINGREQ
/// claiming a 200 KiB body is not buffered.
fn check_fixed_length(packet_type: PacketType, remaining_len: usize) -> Result<(), Error> {
    let expected = match packet_type {
        PacketType::ConnAck
        | PacketType::PubAck
        | PacketType::PubRec
        | PacketType::PubRel
        | PacketType::PubComp
        | PacketType::UnsubAck => 2,
        PacketType::PingReq | PacketType::PingResp | PacketType::Disconnect => 0,
        _ => return Ok(()),
    };
    if remaining_len != expected {
        return Err(Error::InvalidRemainingLength {
            packet: packet_type,
            expected,
            actual: remaining_len,
        });
    }
    Ok(())
}

fn decode_body(header: FixedHeader, mut body: Reader) -> Result<Packet, Error> {
    let packet = match header.packet_type {
        PacketType::Connect => Packet::Connect(decode_connect(&mut body)?),
        PacketType::ConnAck => Packet::ConnAck(decode_connack(&mut body)?),
        PacketType::Publish => Packet::Publish(decode_publish(header.flags, &mut body)?),
        PacketType::PubAck => Packet::PubAck(body.pkid(PacketType::PubAck)?),
        PacketType::PubRec => Packet::PubRec(body.pkid(PacketType::PubRec)?),
        PacketType::PubRel => Packet::PubRel(body.pkid(PacketType::PubRel)?),
        PacketType::PubComp => Packet::PubComp(body.pkid(PacketType::PubComp)?),
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(&mut body)?),
        PacketType::SubAck => Packet::SubAck(decode_suback(&mut body)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(&mut body)?),
        PacketType::UnsubAck => Packet::UnsubAck(body.pkid(PacketType::UnsubAck)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect,
    };
    // PUBLISH, SUBSCRIBE, SUBACK and UNSUBSCRIBE read to the end by construction and the
    // fixed-length packets were sized by the header; CONNECT is the one that can overhang.
    if !body.buf.is_empty() {
        return Err(Error::TrailingBytes {
            packet: header.packet_type,
            len: body.buf.len(),
        });
    }
    Ok(packet)
}

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN_SESSION: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_QOS_SHIFT: u8 = 3;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

fn decode_connect(body: &mut Reader) -> Result<Connect, Error> {
    let protocol_name = body.string("CONNECT protocol name")?;
    let protocol_level = body.u8("CONNECT protocol level")?;
    let flags = body.u8("CONNECT flags")?;
    let keep_alive = body.u16("CONNECT keep alive")?;
    let clean_session = flags & FLAG_CLEAN_SESSION != 0;

    if !matches!(protocol_level, 3 | 4) {
        // Other versions lay out flags and payload differently (MQTT 5 inserts properties), so
        // guessing at them could only invent errors. What was read is enough for the server
        // to answer CONNACK 1, unacceptable protocol version.
        body.skip_rest();
        return Ok(Connect {
            protocol_name,
            protocol_level,
            clean_session,
            keep_alive,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
        });
    }

    if flags & FLAG_RESERVED != 0 {
        return Err(Error::ConnectReservedFlag);
    }
    let will_qos_bits = (flags >> FLAG_WILL_QOS_SHIFT) & 0b11;
    let has_will = flags & FLAG_WILL != 0;
    if !has_will && (will_qos_bits != 0 || flags & FLAG_WILL_RETAIN != 0) {
        return Err(Error::InconsistentWillFlags);
    }
    if flags & FLAG_PASSWORD != 0 && flags & FLAG_USERNAME == 0 {
        return Err(Error::PasswordWithoutUsername);
    }

    let client_id = body.string("CONNECT client identifier")?;
    let will = if has_will {
        let qos = QoS::try_from(will_qos_bits)?;
        let topic = body.topic("CONNECT will topic")?;
        check_topic_name(&topic)?;
        let message = body.binary("CONNECT will message")?;
        Some(LastWill {
            topic,
            message,
            qos,
            retain: flags & FLAG_WILL_RETAIN != 0,
        })
    } else {
        None
    };
    let username = if flags & FLAG_USERNAME != 0 {
        Some(body.string("CONNECT user name")?)
    } else {
        None
    };
    let password = if flags & FLAG_PASSWORD != 0 {
        Some(body.binary("CONNECT password")?)
    } else {
        None
    };

    Ok(Connect {
        protocol_name,
        protocol_level,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(body: &mut Reader) -> Result<ConnAck, Error> {
    let flags = body.u8("CONNACK acknowledge flags")?;
    if flags & !0x01 != 0 {
        return Err(Error::InvalidConnAckFlags(flags));
    }
    let code = ConnectReturnCode::try_from(body.u8("CONNACK return code")?)?;
    let session_present = flags & 0x01 != 0;
    // §3.2.2.2: a server refusing the connection has no session to speak of.
    if session_present && code != ConnectReturnCode::Accepted {
        return Err(Error::SessionPresentWithRefusal(code as u8));
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn decode_publish(flags: u8, body: &mut Reader) -> Result<Publish, Error> {
    // The header check already rejected QoS 3, so this conversion cannot fail here.
    let qos = QoS::try_from((flags >> 1) & 0b11)?;
    let topic = body.topic("PUBLISH topic name")?;
    check_topic_name(&topic)?;
    let pkid = match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => body.pkid(PacketType::Publish)?,
    };
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        pkid,
        payload: body.take_rest(),
    })
}

fn decode_subscribe(body: &mut Reader) -> Result<Subscribe, Error> {
    let pkid = body.pkid(PacketType::Subscribe)?;
    // Growth is bounded: each filter takes at least 3 bytes of a size-checked frame.
    let mut filters = Vec::new();
    while !body.buf.is_empty() {
        let filter = body.topic("SUBSCRIBE topic filter")?;
        let options = body.u8("SUBSCRIBE requested QoS")?;
        if options & !0b11 != 0 {
            return Err(Error::InvalidSubscribeOptions(options));
        }
        filters.push((filter, QoS::try_from(options)?));
    }
    if filters.is_empty() {
        return Err(Error::NoTopicFilters(PacketType::Subscribe));
    }
    Ok(Subscribe { pkid, filters })
}

fn decode_suback(body: &mut Reader) -> Result<SubAck, Error> {
    let pkid = body.pkid(PacketType::SubAck)?;
    let return_codes = body
        .take_rest()
        .iter()
        .map(|&code| SubscribeReturnCode::try_from(code))
        .collect::<Result<Vec<_>, _>>()?;
    if return_codes.is_empty() {
        return Err(Error::NoReturnCodes);
    }
    Ok(SubAck { pkid, return_codes })
}

fn decode_unsubscribe(body: &mut Reader) -> Result<Unsubscribe, Error> {
    let pkid = body.pkid(PacketType::Unsubscribe)?;
    let mut filters = Vec::new();
    while !body.buf.is_empty() {
        filters.push(body.topic("UNSUBSCRIBE topic filter")?);
    }
    if filters.is_empty() {
        return Err(Error::NoTopicFilters(PacketType::Unsubscribe));
    }
    Ok(Unsubscribe { pkid, filters })
}

/// A cursor over one packet's body. Every read is bounds-checked against the remaining length,
/// so running off the end is a [`Error::Truncated`], never a panic.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn take(&mut self, len: usize, field: &'static str) -> Result<Bytes, Error> {
        if len > self.buf.len() {
            return Err(Error::Truncated { field });
        }
        Ok(self.buf.split_to(len))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Error> {
        let bytes = self.take(1, field)?;
        Ok(bytes[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, Error> {
        let bytes = self.take(2, field)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn pkid(&mut self, packet: PacketType) -> Result<u16, Error> {
        match self.u16("packet identifier")? {
            0 => Err(Error::ZeroPacketId(packet)),
            pkid => Ok(pkid),
        }
    }

    /// A 16-bit length followed by that many bytes (§1.5.3 strings, §3.1.3 binary fields).
    fn binary(&mut self, field: &'static str) -> Result<Bytes, Error> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, Error> {
        let bytes = self.binary(field)?;
        check_mqtt_str(&bytes, field).map(str::to_owned)
    }

    fn topic(&mut self, field: &'static str) -> Result<Topic, Error> {
        let bytes = self.binary(field)?;
        check_mqtt_str(&bytes, field)?;
        Ok(Topic::from_checked(bytes))
    }

    fn take_rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn skip_rest(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> Result<Option<(usize, usize)>, Error> {
        FixedHeader::parse(bytes, usize::MAX).map(|h| h.map(|h| (h.header_len, h.remaining_len)))
    }

    #[test]
    fn remaining_length_boundaries() {
        // §2.2.3 table: the smallest and largest value of each encoded width.
        assert_eq!(header(&[0x30, 0x00]), Ok(Some((2, 0))));
        assert_eq!(header(&[0x30, 0x7F]), Ok(Some((2, 127))));
        assert_eq!(header(&[0x30, 0x80, 0x01]), Ok(Some((3, 128))));
        assert_eq!(header(&[0x30, 0xFF, 0x7F]), Ok(Some((3, 16_383))));
        assert_eq!(header(&[0x30, 0x80, 0x80, 0x01]), Ok(Some((4, 16_384))));
        assert_eq!(header(&[0x30, 0xFF, 0xFF, 0x7F]), Ok(Some((4, 2_097_151))));
        assert_eq!(
            header(&[0x30, 0x80, 0x80, 0x80, 0x01]),
            Ok(Some((5, 2_097_152)))
        );
        assert_eq!(
            header(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
            Ok(Some((5, 268_435_455)))
        );
    }

    #[test]
    fn remaining_length_waits_then_rejects_a_fifth_byte() {
        assert_eq!(header(&[0x30]), Ok(None));
        assert_eq!(header(&[0x30, 0xFF, 0xFF, 0xFF]), Ok(None));
        assert_eq!(
            header(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(Error::MalformedRemainingLength)
        );
        assert_eq!(
            header(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(Error::MalformedRemainingLength)
        );
    }
}

//! [`Packet`] to bytes: validates a packet against the rules [`decode`](crate::decode) enforces,
//! then appends it to an outgoing buffer with a single reservation. Used by the server's
//! connection task and the SDK before writing to the socket.

use bytes::{BufMut, BytesMut};

use crate::packet::{Connect, ConnectReturnCode, Packet, PacketType, Publish, QoS};
use crate::topic::{check_mqtt_str, check_topic_name};
use crate::{Error, MAX_REMAINING_LENGTH, MAX_STRING_LENGTH};

/// Appends `packet` to `buf`.
///
/// Refuses, leaving `buf` untouched, anything a conforming peer would reject: strings or
/// binary fields over 65535 bytes or containing U+0000, a remaining length over 268435455,
/// a zero packet identifier, a QoS 1 or 2 PUBLISH without one, DUP on QoS 0, a PUBLISH or will
/// topic that is empty or has wildcards, an empty filter or return-code list, a password
/// without a user name, and a refusing CONNACK that claims a session. A QoS 0 PUBLISH's
/// `pkid` is not on the wire and is ignored.
pub fn encode(packet: &Packet, buf: &mut BytesMut) -> Result<(), Error> {
    validate(packet)?;
    let remaining_len = remaining_len(packet);
    if remaining_len > MAX_REMAINING_LENGTH {
        return Err(Error::RemainingLengthTooLarge(remaining_len));
    }
    buf.reserve(1 + varint_len(remaining_len) + remaining_len);
    buf.put_u8(first_byte(packet));
    put_varint(buf, remaining_len);
    write_body(packet, buf);
    Ok(())
}

/// The number of bytes [`encode`] appends for `packet`, computed without encoding it. Only
/// meaningful for packets `encode` accepts.
pub fn encoded_len(packet: &Packet) -> usize {
    let remaining_len = remaining_len(packet);
    1 + varint_len(remaining_len) + remaining_len
}

fn validate(packet: &Packet) -> Result<(), Error> {
    match packet {
        Packet::Connect(connect) => validate_connect(connect),
        Packet::Publish(publish) => validate_publish(publish),
        Packet::PubAck(pkid) => check_pkid(*pkid, PacketType::PubAck),
        Packet::PubRec(pkid) => check_pkid(*pkid, PacketType::PubRec),
        Packet::PubRel(pkid) => check_pkid(*pkid, PacketType::PubRel),
        Packet::PubComp(pkid) => check_pkid(*pkid, PacketType::PubComp),
        Packet::UnsubAck(pkid) => check_pkid(*pkid, PacketType::UnsubAck),
        Packet::Subscribe(subscribe) => {
            check_pkid(subscribe.pkid, PacketType::Subscribe)?;
            if subscribe.filters.is_empty() {
                return Err(Error::NoTopicFilters(PacketType::Subscribe));
            }
            Ok(())
        }
        Packet::SubAck(suback) => {
            check_pkid(suback.pkid, PacketType::SubAck)?;
            if suback.return_codes.is_empty() {
                return Err(Error::NoReturnCodes);
            }
            Ok(())
        }
        Packet::Unsubscribe(unsubscribe) => {
            check_pkid(unsubscribe.pkid, PacketType::Unsubscribe)?;
            if unsubscribe.filters.is_empty() {
                return Err(Error::NoTopicFilters(PacketType::Unsubscribe));
            }
            Ok(())
        }
        Packet::ConnAck(connack) => {
            // Decode rejects this combination (§3.2.2.2), so never put it on the wire.
            if connack.session_present && connack.code != ConnectReturnCode::Accepted {
                return Err(Error::SessionPresentWithRefusal(connack.code as u8));
            }
            Ok(())
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => Ok(()),
    }
}

fn validate_connect(connect: &Connect) -> Result<(), Error> {
    check_mqtt_str(connect.protocol_name.as_bytes(), "CONNECT protocol name")?;
    check_mqtt_str(connect.client_id.as_bytes(), "CONNECT client identifier")?;
    if let Some(will) = &connect.will {
        check_topic_name(&will.topic)?;
        check_binary_len(will.message.len(), "CONNECT will message")?;
    }
    if let Some(username) = &connect.username {
        check_mqtt_str(username.as_bytes(), "CONNECT user name")?;
    }
    if let Some(password) = &connect.password {
        if connect.username.is_none() {
            return Err(Error::PasswordWithoutUsername);
        }
        check_binary_len(password.len(), "CONNECT password")?;
    }
    Ok(())
}

fn validate_publish(publish: &Publish) -> Result<(), Error> {
    check_topic_name(&publish.topic)?;
    match publish.qos {
        QoS::AtMostOnce if publish.dup => Err(Error::DupWithQoS0),
        QoS::AtMostOnce => Ok(()),
        QoS::AtLeastOnce | QoS::ExactlyOnce => check_pkid(publish.pkid, PacketType::Publish),
    }
}

fn check_pkid(pkid: u16, packet: PacketType) -> Result<(), Error> {
    if pkid == 0 {
        return Err(Error::ZeroPacketId(packet));
    }
    Ok(())
}

fn check_binary_len(len: usize, field: &'static str) -> Result<(), Error> {
    if len > MAX_STRING_LENGTH {
        return Err(Error::StringTooLong { field, len });
    }
    Ok(())
}

fn first_byte(packet: &Packet) -> u8 {
    let packet_type = packet.packet_type();
    let flags = match packet {
        Packet::Publish(publish) => {
            (u8::from(publish.dup) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain)
        }
        _ => packet_type.required_flags(),
    };
    ((packet_type as u8) << 4) | flags
}

/// Length of a 16-bit-prefixed string or binary field.
fn prefixed(len: usize) -> usize {
    2 + len
}

fn remaining_len(packet: &Packet) -> usize {
    match packet {
        Packet::Connect(connect) => {
            let will = connect.will.as_ref().map_or(0, |will| {
                prefixed(will.topic.len()) + prefixed(will.message.len())
            });
            prefixed(connect.protocol_name.len())
                + 1 // protocol level
                + 1 // connect flags
                + 2 // keep alive
                + prefixed(connect.client_id.len())
                + will
                + connect.username.as_ref().map_or(0, |u| prefixed(u.len()))
                + connect.password.as_ref().map_or(0, |p| prefixed(p.len()))
        }
        Packet::Publish(publish) => {
            let pkid = if publish.qos == QoS::AtMostOnce { 0 } else { 2 };
            prefixed(publish.topic.len()) + pkid + publish.payload.len()
        }
        Packet::Subscribe(subscribe) => {
            2 + subscribe
                .filters
                .iter()
                .map(|(filter, _)| prefixed(filter.len()) + 1)
                .sum::<usize>()
        }
        Packet::SubAck(suback) => 2 + suback.return_codes.len(),
        Packet::Unsubscribe(unsubscribe) => {
            2 + unsubscribe
                .filters
                .iter()
                .map(|filter| prefixed(filter.len()))
                .sum::<usize>()
        }
        Packet::ConnAck(_)
        | Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::UnsubAck(_) => 2,
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    }
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(buf: &mut BytesMut, mut value: usize) {
    loop {
        // Truncation is the point: the low 7 bits go out, the rest moves down.
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

/// Writes a 16-bit length and the bytes. Lengths were checked by [`validate`] (and a `Topic`
/// cannot exceed the limit), so the saturation never happens.
fn put_prefixed(buf: &mut BytesMut, bytes: &[u8]) {
    buf.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    buf.put_slice(bytes);
}

fn write_body(packet: &Packet, buf: &mut BytesMut) {
    match packet {
        Packet::Connect(connect) => write_connect(connect, buf),
        Packet::ConnAck(connack) => {
            buf.put_u8(u8::from(connack.session_present));
            buf.put_u8(connack.code as u8);
        }
        Packet::Publish(publish) => {
            put_prefixed(buf, publish.topic.as_bytes());
            if publish.qos != QoS::AtMostOnce {
                buf.put_u16(publish.pkid);
            }
            buf.put_slice(&publish.payload);
        }
        Packet::PubAck(pkid)
        | Packet::PubRec(pkid)
        | Packet::PubRel(pkid)
        | Packet::PubComp(pkid)
        | Packet::UnsubAck(pkid) => buf.put_u16(*pkid),
        Packet::Subscribe(subscribe) => {
            buf.put_u16(subscribe.pkid);
            for (filter, qos) in &subscribe.filters {
                put_prefixed(buf, filter.as_bytes());
                buf.put_u8(*qos as u8);
            }
        }
        Packet::SubAck(suback) => {
            buf.put_u16(suback.pkid);
            for code in &suback.return_codes {
                buf.put_u8(code.to_u8());
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            buf.put_u16(unsubscribe.pkid);
            for filter in &unsubscribe.filters {
                put_prefixed(buf, filter.as_bytes());
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
}

fn write_connect(connect: &Connect, buf: &mut BytesMut) {
    let mut flags = 0u8;
    if connect.clean_session {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | ((will.qos as u8) << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if connect.password.is_some() {
        flags |= 0x40;
    }
    if connect.username.is_some() {
        flags |= 0x80;
    }

    put_prefixed(buf, connect.protocol_name.as_bytes());
    buf.put_u8(connect.protocol_level);
    buf.put_u8(flags);
    buf.put_u16(connect.keep_alive);
    put_prefixed(buf, connect.client_id.as_bytes());
    if let Some(will) = &connect.will {
        put_prefixed(buf, will.topic.as_bytes());
        put_prefixed(buf, &will.message);
    }
    if let Some(username) = &connect.username {
        put_prefixed(buf, username.as_bytes());
    }
    if let Some(password) = &connect.password {
        put_prefixed(buf, password);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_widths_match_the_encoding() {
        for value in [
            0,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_REMAINING_LENGTH,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), varint_len(value), "{value}");
        }
        let mut buf = BytesMut::new();
        put_varint(&mut buf, 321);
        assert_eq!(&buf[..], &[0xC1, 0x02]);
    }
}

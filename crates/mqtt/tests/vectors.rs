//! Known byte vectors, written by hand from the MQTT 3.1.1 specification, for every packet
//! type: each must decode to the expected packet and encode back to the same bytes.

use bytes::{Bytes, BytesMut};
use twinhub_mqtt::{
    ConnAck, Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, LastWill, Packet, Publish, QoS,
    SubAck, Subscribe, SubscribeReturnCode, Topic, Unsubscribe, decode, encode, encoded_len,
};

/// Decodes `bytes` as exactly one packet, compares it, and encodes it back.
fn assert_vector(bytes: &[u8], expected: Packet) {
    let mut buf = BytesMut::from(bytes);
    let decoded = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE)
        .unwrap_or_else(|e| panic!("{bytes:02x?} failed to decode: {e}"))
        .unwrap_or_else(|| panic!("{bytes:02x?} decoded as incomplete"));
    assert_eq!(decoded, expected, "decoding {bytes:02x?}");
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());

    let mut out = BytesMut::new();
    encode(&expected, &mut out).unwrap_or_else(|e| panic!("{expected:?} failed to encode: {e}"));
    assert_eq!(&out[..], bytes, "encoding {expected:?}");
    assert_eq!(encoded_len(&expected), bytes.len());
}

fn decode_one(bytes: &[u8]) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE)
        .expect("valid")
        .expect("complete");
    assert!(buf.is_empty());
    packet
}

fn topic(text: &'static str) -> Topic {
    Topic::from_static(text)
}

#[test]
fn connect_with_credentials_as_iot_hub_devices_send_it() {
    // Flags 0xC0: user name and password, CleanSession 0, no will (wire-protocol.md §c.2).
    let bytes = [
        0x10, 0x14, // CONNECT, remaining length 20
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name
        0x04, // level 4
        0xC0, // flags
        0x00, 0x3C, // keep alive 60
        0x00, 0x02, b'd', b'1', // client id
        0x00, 0x01, b'u', // user name
        0x00, 0x01, b'p', // password
    ];
    assert_vector(
        &bytes,
        Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: false,
            keep_alive: 60,
            client_id: "d1".into(),
            will: None,
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"p")),
        }),
    );
}

#[test]
fn connect_with_will_and_empty_client_id() {
    // Flags 0x2E: will retain, will QoS 1, will flag, clean session.
    let bytes = [
        0x10, 0x16, //
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x2E, 0x00, 0x00, //
        0x00, 0x00, // empty client id
        0x00, 0x03, b'w', b'/', b't', // will topic
        0x00, 0x03, b'b', b'y', b'e', // will message
    ];
    assert_vector(
        &bytes,
        Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 4,
            clean_session: true,
            keep_alive: 0,
            client_id: String::new(),
            will: Some(LastWill {
                topic: topic("w/t"),
                message: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
            }),
            username: None,
            password: None,
        }),
    );
}

#[test]
fn connect_with_user_name_only_and_binary_password_field_absent() {
    // Flags 0x80: X.509 devices send a user name and no password.
    let bytes = [
        0x10, 0x11, //
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x80, 0x00, 0x3C, //
        0x00, 0x02, b'd', b'1', //
        0x00, 0x01, b'u',
    ];
    let Packet::Connect(connect) = decode_one(&bytes) else {
        panic!("not a CONNECT");
    };
    assert_eq!(connect.username.as_deref(), Some("u"));
    assert_eq!(connect.password, None);
    assert_vector(&bytes, Packet::Connect(connect));
}

#[test]
fn connect_mqtt_3_1_decodes_fully_so_the_server_can_refuse_it() {
    let bytes = [
        0x10, 0x10, //
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C, //
        0x00, 0x02, b'd', b'1',
    ];
    assert_vector(
        &bytes,
        Packet::Connect(Connect {
            protocol_name: "MQIsdp".into(),
            protocol_level: 3,
            clean_session: true,
            keep_alive: 60,
            client_id: "d1".into(),
            will: None,
            username: None,
            password: None,
        }),
    );
}

#[test]
fn connect_mqtt_5_decodes_its_variable_header_only() {
    // MQTT 5 puts a properties length (here 0) before the payload; 3.1.1 rules do not apply.
    let bytes = [
        0x10, 0x0F, //
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, //
        0x00, // properties length
        0x00, 0x02, b'd', b'1',
    ];
    assert_eq!(
        decode_one(&bytes),
        Packet::Connect(Connect {
            protocol_name: "MQTT".into(),
            protocol_level: 5,
            clean_session: true,
            keep_alive: 60,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
        })
    );
}

#[test]
fn connack() {
    assert_vector(
        &[0x20, 0x02, 0x01, 0x00],
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: ConnectReturnCode::Accepted,
        }),
    );
    let codes = [
        ConnectReturnCode::Accepted,
        ConnectReturnCode::UnacceptableProtocolVersion,
        ConnectReturnCode::IdentifierRejected,
        ConnectReturnCode::ServerUnavailable,
        ConnectReturnCode::BadUsernameOrPassword,
        ConnectReturnCode::NotAuthorized,
    ];
    for (byte, code) in (0u8..).zip(codes) {
        assert_vector(
            &[0x20, 0x02, 0x00, byte],
            Packet::ConnAck(ConnAck {
                session_present: false,
                code,
            }),
        );
    }
}

#[test]
fn publish_qos0_has_no_packet_id() {
    assert_vector(
        &[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic("a/b"),
            pkid: 0,
            payload: Bytes::from_static(b"hi"),
        }),
    );
}

#[test]
fn publish_qos1_with_dup_and_retain() {
    assert_vector(
        &[
            0x3B, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
        ],
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic("a/b"),
            pkid: 10,
            payload: Bytes::from_static(b"hi"),
        }),
    );
}

#[test]
fn publish_qos2_with_empty_payload() {
    assert_vector(
        &[0x34, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0xFF, 0xFF],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: topic("a/b"),
            pkid: u16::MAX,
            payload: Bytes::new(),
        }),
    );
}

#[test]
fn publish_with_two_byte_remaining_length_and_utf8_topic() {
    // Remaining length 2 + 4 + 200 = 206 = 0xCE 0x01; "é" is two bytes in UTF-8.
    let payload = vec![0xA5u8; 200];
    let mut bytes = vec![0x31, 0xCE, 0x01, 0x00, 0x04, b'x', b'/', 0xC3, 0xA9];
    bytes.extend_from_slice(&payload);
    assert_vector(
        &bytes,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: topic("x/é"),
            pkid: 0,
            payload: Bytes::from(payload),
        }),
    );
}

#[test]
fn acknowledgements_carry_only_a_packet_id() {
    assert_vector(&[0x40, 0x02, 0x00, 0x01], Packet::PubAck(1));
    assert_vector(&[0x50, 0x02, 0x12, 0x34], Packet::PubRec(0x1234));
    assert_vector(&[0x62, 0x02, 0x00, 0x07], Packet::PubRel(7));
    assert_vector(&[0x70, 0x02, 0xFF, 0xFF], Packet::PubComp(u16::MAX));
    assert_vector(&[0xB0, 0x02, 0x00, 0x0B], Packet::UnsubAck(11));
}

#[test]
fn subscribe_with_several_filters() {
    assert_vector(
        &[
            0x82, 0x0C, 0x00, 0x0A, // pkid 10
            0x00, 0x03, b'a', b'/', b'+', 0x01, // "a/+" at QoS 1
            0x00, 0x01, b'#', 0x00, // "#" at QoS 0
        ],
        Packet::Subscribe(Subscribe {
            pkid: 10,
            filters: vec![
                (topic("a/+"), QoS::AtLeastOnce),
                (topic("#"), QoS::AtMostOnce),
            ],
        }),
    );
}

#[test]
fn suback_with_grants_and_failure() {
    assert_vector(
        &[0x90, 0x05, 0x00, 0x0A, 0x01, 0x00, 0x80],
        Packet::SubAck(SubAck {
            pkid: 10,
            return_codes: vec![
                SubscribeReturnCode::Success(QoS::AtLeastOnce),
                SubscribeReturnCode::Success(QoS::AtMostOnce),
                SubscribeReturnCode::Failure,
            ],
        }),
    );
    assert_vector(
        &[0x90, 0x03, 0x00, 0x01, 0x02],
        Packet::SubAck(SubAck {
            pkid: 1,
            return_codes: vec![SubscribeReturnCode::Success(QoS::ExactlyOnce)],
        }),
    );
}

#[test]
fn unsubscribe_with_two_filters() {
    assert_vector(
        &[
            0xA2, 0x0A, 0x00, 0x0B, //
            0x00, 0x03, b'a', b'/', b'+', //
            0x00, 0x01, b'#',
        ],
        Packet::Unsubscribe(Unsubscribe {
            pkid: 11,
            filters: vec![topic("a/+"), topic("#")],
        }),
    );
}

#[test]
fn packets_without_a_body() {
    assert_vector(&[0xC0, 0x00], Packet::PingReq);
    assert_vector(&[0xD0, 0x00], Packet::PingResp);
    assert_vector(&[0xE0, 0x00], Packet::Disconnect);
}

#[test]
fn non_minimal_remaining_length_is_accepted() {
    // 3.1.1 does not require the shortest encoding (MQTT 5 does); 0x80 0x00 is zero.
    let mut buf = BytesMut::from(&[0xC0, 0x80, 0x00][..]);
    assert_eq!(
        decode(&mut buf, DEFAULT_MAX_PACKET_SIZE),
        Ok(Some(Packet::PingReq))
    );
    assert!(buf.is_empty());
}

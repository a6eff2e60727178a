//! Every malformed case decode must reject, and every packet encode must refuse, each with the
//! specific error that names the problem.

use bytes::{Bytes, BytesMut};
use twinhub_mqtt::{
    ConnAck, Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, Error, LastWill,
    MAX_REMAINING_LENGTH, Packet, PacketType, Publish, QoS, SubAck, Subscribe, Topic, Unsubscribe,
    decode, encode,
};

fn decode_err(bytes: &[u8]) -> Error {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, DEFAULT_MAX_PACKET_SIZE) {
        Err(error) => error,
        Ok(outcome) => panic!("{bytes:02x?} decoded to {outcome:?}"),
    }
}

/// A CONNECT at level 4 with the given flags and payload after the keep-alive.
fn connect_bytes(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3C];
    body.extend_from_slice(payload);
    let mut bytes = vec![0x10, u8::try_from(body.len()).expect("short test packet")];
    bytes.extend_from_slice(&body);
    bytes
}

#[test]
fn remaining_length_longer_than_four_bytes() {
    assert_eq!(
        decode_err(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),
        Error::MalformedRemainingLength
    );
}

#[test]
fn reserved_packet_types() {
    assert_eq!(decode_err(&[0x00, 0x00]), Error::UnknownPacketType(0));
    assert_eq!(decode_err(&[0xF0, 0x00]), Error::UnknownPacketType(15));
    // Rejected on the first byte, without waiting for the length.
    assert_eq!(decode_err(&[0xF0]), Error::UnknownPacketType(15));
}

#[test]
fn reserved_flags_per_packet_type() {
    let cases: [(u8, PacketType, u8); 14] = [
        (0x11, PacketType::Connect, 0),
        (0x28, PacketType::ConnAck, 0),
        (0x42, PacketType::PubAck, 0),
        (0x51, PacketType::PubRec, 0),
        (0x60, PacketType::PubRel, 0b0010),
        (0x63, PacketType::PubRel, 0b0010),
        (0x74, PacketType::PubComp, 0),
        (0x80, PacketType::Subscribe, 0b0010),
        (0x92, PacketType::SubAck, 0),
        (0xA0, PacketType::Unsubscribe, 0b0010),
        (0xB2, PacketType::UnsubAck, 0),
        (0xC2, PacketType::PingReq, 0),
        (0xDF, PacketType::PingResp, 0),
        (0xE1, PacketType::Disconnect, 0),
    ];
    for (first, packet, expected) in cases {
        assert_eq!(
            decode_err(&[first, 0x00]),
            Error::InvalidFlags {
                packet,
                flags: first & 0x0F,
                expected
            },
            "first byte {first:#04x}"
        );
    }
}

#[test]
fn publish_qos_3_and_dup_on_qos_0() {
    assert_eq!(
        decode_err(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01]),
        Error::InvalidQoS(3)
    );
    assert_eq!(
        decode_err(&[0x38, 0x03, 0x00, 0x01, b't']),
        Error::DupWithQoS0
    );
}

#[test]
fn invalid_utf8_and_null_characters() {
    assert_eq!(
        decode_err(&[0x30, 0x05, 0x00, 0x03, b'a', 0xFF, b'b']),
        Error::InvalidUtf8 {
            field: "PUBLISH topic name"
        }
    );
    // An encoded surrogate (U+D800) is ill-formed UTF-8 (§1.5.3).
    assert_eq!(
        decode_err(&[0x30, 0x05, 0x00, 0x03, 0xED, 0xA0, 0x80]),
        Error::InvalidUtf8 {
            field: "PUBLISH topic name"
        }
    );
    assert_eq!(
        decode_err(&[0x30, 0x05, 0x00, 0x03, b'a', 0x00, b'b']),
        Error::NullCharacter {
            field: "PUBLISH topic name"
        }
    );
    assert_eq!(
        decode_err(&connect_bytes(0x00, &[0x00, 0x02, 0xC3, 0x28])),
        Error::InvalidUtf8 {
            field: "CONNECT client identifier"
        }
    );
    assert_eq!(
        decode_err(&connect_bytes(
            0x80,
            &[0x00, 0x01, b'c', 0x00, 0x02, b'u', 0x00]
        )),
        Error::NullCharacter {
            field: "CONNECT user name"
        }
    );
    assert_eq!(
        decode_err(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 0x80, 0x00]),
        Error::InvalidUtf8 {
            field: "SUBSCRIBE topic filter"
        }
    );
    assert_eq!(
        decode_err(&[0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, 0xFE]),
        Error::InvalidUtf8 {
            field: "UNSUBSCRIBE topic filter"
        }
    );
}

#[test]
fn fields_running_past_the_remaining_length() {
    // Topic length 5 in a body of 3.
    assert_eq!(
        decode_err(&[0x30, 0x03, 0x00, 0x05, b'a']),
        Error::Truncated {
            field: "PUBLISH topic name"
        }
    );
    // QoS 1 PUBLISH with room for only one byte of packet id.
    assert_eq!(
        decode_err(&[0x32, 0x04, 0x00, 0x01, b't', 0x00]),
        Error::Truncated {
            field: "packet identifier"
        }
    );
    // SUBSCRIBE filter without its QoS byte.
    assert_eq!(
        decode_err(&[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'#']),
        Error::Truncated {
            field: "SUBSCRIBE requested QoS"
        }
    );
    // UNSUBSCRIBE with a single stray byte where a length prefix should be.
    assert_eq!(
        decode_err(&[0xA2, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x00]),
        Error::Truncated {
            field: "UNSUBSCRIBE topic filter"
        }
    );
    // CONNECT whose password is announced but missing.
    assert_eq!(
        decode_err(&connect_bytes(0xC0, &[0x00, 0x01, b'c', 0x00, 0x01, b'u'])),
        Error::Truncated {
            field: "CONNECT password"
        }
    );
    // CONNECT cut inside the variable header.
    assert_eq!(
        decode_err(&[0x10, 0x07, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04]),
        Error::Truncated {
            field: "CONNECT flags"
        }
    );
}

#[test]
fn bytes_left_over_after_the_last_field() {
    assert_eq!(
        decode_err(&connect_bytes(0x00, &[0x00, 0x01, b'c', 0xAA, 0xBB])),
        Error::TrailingBytes {
            packet: PacketType::Connect,
            len: 2
        }
    );
}

#[test]
fn fixed_size_packets_with_the_wrong_remaining_length() {
    let cases: [(&[u8], PacketType, usize, usize); 5] = [
        (&[0x40, 0x03, 0x00, 0x01, 0x00], PacketType::PubAck, 2, 3),
        (&[0x20, 0x01, 0x00], PacketType::ConnAck, 2, 1),
        (&[0xB0, 0x00], PacketType::UnsubAck, 2, 0),
        (&[0xC0, 0x01, 0x00], PacketType::PingReq, 0, 1),
        // Refused on the header alone: the 16 KiB body never arrived.
        (&[0xE0, 0x80, 0x80, 0x01], PacketType::Disconnect, 0, 16_384),
    ];
    for (bytes, packet, expected, actual) in cases {
        assert_eq!(
            decode_err(bytes),
            Error::InvalidRemainingLength {
                packet,
                expected,
                actual
            },
            "{bytes:02x?}"
        );
    }
}

#[test]
fn zero_packet_ids() {
    let cases: [(&[u8], PacketType); 8] = [
        (
            &[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00],
            PacketType::Publish,
        ),
        (&[0x40, 0x02, 0x00, 0x00], PacketType::PubAck),
        (&[0x50, 0x02, 0x00, 0x00], PacketType::PubRec),
        (&[0x62, 0x02, 0x00, 0x00], PacketType::PubRel),
        (&[0x70, 0x02, 0x00, 0x00], PacketType::PubComp),
        (
            &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'#', 0x00],
            PacketType::Subscribe,
        ),
        (&[0x90, 0x03, 0x00, 0x00, 0x00], PacketType::SubAck),
        (
            &[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'#'],
            PacketType::Unsubscribe,
        ),
    ];
    for (bytes, packet) in cases {
        assert_eq!(
            decode_err(bytes),
            Error::ZeroPacketId(packet),
            "{bytes:02x?}"
        );
    }
    assert_eq!(
        decode_err(&[0xB0, 0x02, 0x00, 0x00]),
        Error::ZeroPacketId(PacketType::UnsubAck)
    );
}

#[test]
fn empty_filter_and_return_code_lists() {
    assert_eq!(
        decode_err(&[0x82, 0x02, 0x00, 0x01]),
        Error::NoTopicFilters(PacketType::Subscribe)
    );
    assert_eq!(
        decode_err(&[0xA2, 0x02, 0x00, 0x01]),
        Error::NoTopicFilters(PacketType::Unsubscribe)
    );
    assert_eq!(decode_err(&[0x90, 0x02, 0x00, 0x01]), Error::NoReturnCodes);
}

#[test]
fn subscribe_options_and_suback_codes() {
    assert_eq!(
        decode_err(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x04]),
        Error::InvalidSubscribeOptions(0x04)
    );
    assert_eq!(
        decode_err(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x03]),
        Error::InvalidQoS(3)
    );
    assert_eq!(
        decode_err(&[0x90, 0x03, 0x00, 0x01, 0x03]),
        Error::InvalidSubAckReturnCode(0x03)
    );
    assert_eq!(
        decode_err(&[0x90, 0x03, 0x00, 0x01, 0x81]),
        Error::InvalidSubAckReturnCode(0x81)
    );
}

#[test]
fn publish_and_will_topic_names() {
    assert_eq!(
        decode_err(&[0x30, 0x02, 0x00, 0x00]),
        Error::InvalidTopicName("a topic name must not be empty")
    );
    assert_eq!(
        decode_err(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+']),
        Error::InvalidTopicName("a topic name must not contain the wildcards '+' or '#'")
    );
    assert_eq!(
        decode_err(&connect_bytes(
            0x04,
            &[0x00, 0x01, b'c', 0x00, 0x01, b'#', 0x00, 0x00]
        )),
        Error::InvalidTopicName("a topic name must not contain the wildcards '+' or '#'")
    );
}

#[test]
fn connect_flag_rules() {
    let client = [0x00, 0x01, b'c'];
    assert_eq!(
        decode_err(&connect_bytes(0x01, &client)),
        Error::ConnectReservedFlag
    );
    assert_eq!(
        decode_err(&connect_bytes(0x40, &[0x00, 0x01, b'c', 0x00, 0x01, b'p'])),
        Error::PasswordWithoutUsername
    );
    // Will QoS 1 without the will flag, then will retain without it.
    assert_eq!(
        decode_err(&connect_bytes(0x08, &client)),
        Error::InconsistentWillFlags
    );
    assert_eq!(
        decode_err(&connect_bytes(0x20, &client)),
        Error::InconsistentWillFlags
    );
    // Will flag with will QoS 3.
    assert_eq!(
        decode_err(&connect_bytes(
            0x1C,
            &[0x00, 0x01, b'c', 0x00, 0x01, b'w', 0x00, 0x00]
        )),
        Error::InvalidQoS(3)
    );
}

#[test]
fn connect_at_other_levels_is_not_judged_by_3_1_1_flag_rules() {
    // Level 5 with bits that would be malformed at level 4: decoded so the server can send
    // CONNACK 1 instead of dropping the connection.
    let mut bytes = connect_bytes(0x41, &[0xFF, 0xFF, 0xFF]);
    bytes[8] = 0x05;
    let mut buf = BytesMut::from(&bytes[..]);
    let Ok(Some(Packet::Connect(connect))) = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE) else {
        panic!("level 5 CONNECT did not decode");
    };
    assert_eq!(connect.protocol_level, 5);
    assert!(buf.is_empty());
}

#[test]
fn connack_flags_and_return_code() {
    assert_eq!(
        decode_err(&[0x20, 0x02, 0x02, 0x00]),
        Error::InvalidConnAckFlags(0x02)
    );
    assert_eq!(
        decode_err(&[0x20, 0x02, 0x00, 0x06]),
        Error::InvalidConnectReturnCode(6)
    );
}

#[test]
fn connack_refusing_with_a_session_present() {
    // §3.2.2.2: a non-zero return code requires session present 0.
    for code in 1..=5 {
        assert_eq!(
            decode_err(&[0x20, 0x02, 0x01, code]),
            Error::SessionPresentWithRefusal(code)
        );
    }
    let refused = Packet::ConnAck(ConnAck {
        session_present: true,
        code: ConnectReturnCode::NotAuthorized,
    });
    assert_eq!(encode_err(&refused), Error::SessionPresentWithRefusal(5));
}

#[test]
fn bodies_shorter_than_their_first_field() {
    // Bodies too short for their first field.
    for bytes in [
        &[0x10, 0x00][..],
        &[0x10, 0x02, 0xFF, 0xFF],
        &[0x30, 0x00],
        &[0x30, 0x01, 0x00],
        &[0x82, 0x00],
        &[0x82, 0x01, 0x00],
        &[0x90, 0x00],
        &[0xA2, 0x00],
    ] {
        let mut buf = BytesMut::from(bytes);
        assert!(
            decode(&mut buf, DEFAULT_MAX_PACKET_SIZE).is_err(),
            "{bytes:02x?}"
        );
    }
}

// Encoding refuses what decoding would reject, and leaves the buffer as it was.

fn encode_err(packet: &Packet) -> Error {
    let mut buf = BytesMut::from(&b"prefix"[..]);
    let error = encode(packet, &mut buf).expect_err("packet must be refused");
    assert_eq!(&buf[..], b"prefix", "a refused packet must not be written");
    error
}

fn connect() -> Connect {
    Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: true,
        keep_alive: 30,
        client_id: "c".into(),
        will: None,
        username: None,
        password: None,
    }
}

fn publish(qos: QoS, pkid: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Topic::from_static("t"),
        pkid,
        payload: Bytes::new(),
    }
}

#[test]
fn encode_refuses_strings_over_65535_bytes() {
    let mut long_id = connect();
    long_id.client_id = "x".repeat(65_536);
    assert_eq!(
        encode_err(&Packet::Connect(long_id)),
        Error::StringTooLong {
            field: "CONNECT client identifier",
            len: 65_536
        }
    );

    let mut long_password = connect();
    long_password.username = Some("u".into());
    long_password.password = Some(Bytes::from(vec![0u8; 70_000]));
    assert_eq!(
        encode_err(&Packet::Connect(long_password)),
        Error::StringTooLong {
            field: "CONNECT password",
            len: 70_000
        }
    );

    let mut long_will = connect();
    long_will.will = Some(LastWill {
        topic: Topic::from_static("w"),
        message: Bytes::from(vec![0u8; 65_536]),
        qos: QoS::AtMostOnce,
        retain: false,
    });
    assert_eq!(
        encode_err(&Packet::Connect(long_will)),
        Error::StringTooLong {
            field: "CONNECT will message",
            len: 65_536
        }
    );
}

#[test]
fn encode_refuses_null_characters_in_connect_strings() {
    let mut nul = connect();
    nul.username = Some("a\0b".into());
    assert_eq!(
        encode_err(&Packet::Connect(nul)),
        Error::NullCharacter {
            field: "CONNECT user name"
        }
    );
}

#[test]
fn encode_refuses_a_remaining_length_over_the_protocol_maximum() {
    // 4097 filters sharing one 65535-byte topic: over the limit without allocating 256 MiB.
    let topic = Topic::new(vec![b'f'; 65_535]).expect("valid topic");
    let filters = vec![(topic, QoS::AtMostOnce); 4_097];
    let expected = 2 + 4_097 * (2 + 65_535 + 1);
    assert!(expected > MAX_REMAINING_LENGTH);
    assert_eq!(
        encode_err(&Packet::Subscribe(Subscribe { pkid: 1, filters })),
        Error::RemainingLengthTooLarge(expected)
    );
}

#[test]
fn encode_refuses_missing_packet_ids() {
    assert_eq!(
        encode_err(&Packet::Publish(publish(QoS::AtLeastOnce, 0))),
        Error::ZeroPacketId(PacketType::Publish)
    );
    assert_eq!(
        encode_err(&Packet::Publish(publish(QoS::ExactlyOnce, 0))),
        Error::ZeroPacketId(PacketType::Publish)
    );
    assert_eq!(
        encode_err(&Packet::PubAck(0)),
        Error::ZeroPacketId(PacketType::PubAck)
    );
    assert_eq!(
        encode_err(&Packet::Unsubscribe(Unsubscribe {
            pkid: 0,
            filters: vec![Topic::from_static("#")]
        })),
        Error::ZeroPacketId(PacketType::Unsubscribe)
    );
}

#[test]
fn encode_ignores_the_packet_id_of_qos0() {
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(publish(QoS::AtMostOnce, 9)), &mut buf).expect("encodable");
    assert_eq!(&buf[..], &[0x30, 0x03, 0x00, 0x01, b't']);
}

#[test]
fn encode_refuses_other_protocol_violations() {
    let mut dup = publish(QoS::AtMostOnce, 0);
    dup.dup = true;
    assert_eq!(encode_err(&Packet::Publish(dup)), Error::DupWithQoS0);

    let mut wildcard = publish(QoS::AtMostOnce, 0);
    wildcard.topic = Topic::from_static("a/#");
    assert!(matches!(
        encode_err(&Packet::Publish(wildcard)),
        Error::InvalidTopicName(_)
    ));

    let mut password_only = connect();
    password_only.password = Some(Bytes::from_static(b"p"));
    assert_eq!(
        encode_err(&Packet::Connect(password_only)),
        Error::PasswordWithoutUsername
    );

    assert_eq!(
        encode_err(&Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![]
        })),
        Error::NoTopicFilters(PacketType::Subscribe)
    );
    assert_eq!(
        encode_err(&Packet::SubAck(SubAck {
            pkid: 1,
            return_codes: vec![]
        })),
        Error::NoReturnCodes
    );
}

#[test]
fn error_messages_name_the_problem() {
    assert_eq!(
        Error::InvalidFlags {
            packet: PacketType::PubRel,
            flags: 0,
            expected: 2
        }
        .to_string(),
        "invalid fixed header flags 0b0000 for PUBREL: MQTT 3.1.1 §2.2.2 requires 0b0010"
    );
    assert_eq!(
        Error::PacketTooLarge { size: 10, max: 5 }.to_string(),
        "packet of 10 bytes exceeds the limit of 5 bytes"
    );
}

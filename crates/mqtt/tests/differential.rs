//! Differential tests against rumqttc's MQTT 3.1.1 codec, an independent implementation: what
//! we encode it decodes to the same fields, what it encodes we decode to the same fields, and
//! both produce the same bytes. A misreading of the specification shared by our server and our
//! SDK would otherwise go unnoticed.

mod common;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use rumqttc::mqttbytes::v4 as r;
use twinhub_mqtt::{
    ConnAck, Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, LastWill, Packet, Publish, QoS,
    SubAck, Subscribe, SubscribeReturnCode, Topic, Unsubscribe, decode, encode,
};

fn to_r_qos(qos: QoS) -> rumqttc::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_r_qos(qos: rumqttc::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn topic(text: String) -> Topic {
    Topic::try_from(text).expect("rumqttc decoded a valid string")
}

fn to_r_code(code: ConnectReturnCode) -> r::ConnectReturnCode {
    match code {
        ConnectReturnCode::Accepted => r::ConnectReturnCode::Success,
        ConnectReturnCode::UnacceptableProtocolVersion => {
            r::ConnectReturnCode::RefusedProtocolVersion
        }
        ConnectReturnCode::IdentifierRejected => r::ConnectReturnCode::BadClientId,
        ConnectReturnCode::ServerUnavailable => r::ConnectReturnCode::ServiceUnavailable,
        ConnectReturnCode::BadUsernameOrPassword => r::ConnectReturnCode::BadUserNamePassword,
        ConnectReturnCode::NotAuthorized => r::ConnectReturnCode::NotAuthorized,
    }
}

fn from_r_code(code: r::ConnectReturnCode) -> ConnectReturnCode {
    match code {
        r::ConnectReturnCode::Success => ConnectReturnCode::Accepted,
        r::ConnectReturnCode::RefusedProtocolVersion => {
            ConnectReturnCode::UnacceptableProtocolVersion
        }
        r::ConnectReturnCode::BadClientId => ConnectReturnCode::IdentifierRejected,
        r::ConnectReturnCode::ServiceUnavailable => ConnectReturnCode::ServerUnavailable,
        r::ConnectReturnCode::BadUserNamePassword => ConnectReturnCode::BadUsernameOrPassword,
        r::ConnectReturnCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
    }
}

/// Our packet in rumqttc's model. Only packets both models can express reach here: rumqttc
/// always writes protocol "MQTT" level 4 and keeps the password as text, omitting empty ones.
fn to_rumqttc(packet: &Packet) -> r::Packet {
    match packet {
        Packet::Connect(c) => r::Packet::Connect(r::Connect {
            protocol: rumqttc::mqttbytes::Protocol::V4,
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            clean_session: c.clean_session,
            last_will: c.will.as_ref().map(|w| r::LastWill {
                topic: w.topic.as_str().to_owned(),
                message: w.message.clone(),
                qos: to_r_qos(w.qos),
                retain: w.retain,
            }),
            login: c.username.as_ref().map(|username| r::Login {
                username: username.clone(),
                password: c
                    .password
                    .as_ref()
                    .map(|p| String::from_utf8(p.to_vec()).expect("text password"))
                    .unwrap_or_default(),
            }),
        }),
        Packet::ConnAck(c) => r::Packet::ConnAck(r::ConnAck {
            session_present: c.session_present,
            code: to_r_code(c.code),
        }),
        Packet::Publish(p) => r::Packet::Publish(r::Publish {
            dup: p.dup,
            qos: to_r_qos(p.qos),
            retain: p.retain,
            topic: p.topic.as_str().to_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(pkid) => r::Packet::PubAck(r::PubAck { pkid: *pkid }),
        Packet::Subscribe(s) => r::Packet::Subscribe(r::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|(f, q)| r::SubscribeFilter::new(f.as_str().to_owned(), to_r_qos(*q)))
                .collect(),
        }),
        Packet::SubAck(s) => r::Packet::SubAck(r::SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .iter()
                .map(|code| match code {
                    SubscribeReturnCode::Success(q) => {
                        r::SubscribeReasonCode::Success(to_r_qos(*q))
                    }
                    SubscribeReturnCode::Failure => r::SubscribeReasonCode::Failure,
                })
                .collect(),
        }),
        Packet::Unsubscribe(u) => r::Packet::Unsubscribe(r::Unsubscribe {
            pkid: u.pkid,
            topics: u.filters.iter().map(|f| f.as_str().to_owned()).collect(),
        }),
        Packet::PingReq => r::Packet::PingReq,
        Packet::PingResp => r::Packet::PingResp,
        Packet::Disconnect => r::Packet::Disconnect,
        other => panic!("no differential mapping for {other:?}"),
    }
}

fn from_rumqttc(packet: r::Packet) -> Packet {
    match packet {
        r::Packet::Connect(c) => {
            let (username, password) = match c.login {
                Some(login) => {
                    let password = (!login.password.is_empty())
                        .then(|| Bytes::from(login.password.into_bytes()));
                    (Some(login.username), password)
                }
                None => (None, None),
            };
            Packet::Connect(Connect {
                protocol_name: "MQTT".into(),
                protocol_level: match c.protocol {
                    rumqttc::mqttbytes::Protocol::V4 => 4,
                    rumqttc::mqttbytes::Protocol::V5 => 5,
                },
                clean_session: c.clean_session,
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                will: c.last_will.map(|w| LastWill {
                    topic: topic(w.topic),
                    message: w.message,
                    qos: from_r_qos(w.qos),
                    retain: w.retain,
                }),
                username,
                password,
            })
        }
        r::Packet::ConnAck(c) => Packet::ConnAck(ConnAck {
            session_present: c.session_present,
            code: from_r_code(c.code),
        }),
        r::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: from_r_qos(p.qos),
            retain: p.retain,
            topic: topic(p.topic),
            pkid: p.pkid,
            payload: p.payload,
        }),
        r::Packet::PubAck(p) => Packet::PubAck(p.pkid),
        r::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (topic(f.path), from_r_qos(f.qos)))
                .collect(),
        }),
        r::Packet::SubAck(s) => Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .into_iter()
                .map(|code| match code {
                    r::SubscribeReasonCode::Success(q) => {
                        SubscribeReturnCode::Success(from_r_qos(q))
                    }
                    r::SubscribeReasonCode::Failure => SubscribeReturnCode::Failure,
                })
                .collect(),
        }),
        r::Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics.into_iter().map(topic).collect(),
        }),
        r::Packet::PingReq => Packet::PingReq,
        r::Packet::PingResp => Packet::PingResp,
        r::Packet::Disconnect => Packet::Disconnect,
        other => panic!("unexpected rumqttc packet {other:?}"),
    }
}

/// CONNECTs rumqttc can express: "MQTT" level 4, text passwords, and (since it omits empty
/// credentials) a non-empty user name and, if present, a non-empty password.
fn connect() -> impl Strategy<Value = Connect> {
    (
        any::<bool>(),
        any::<u16>(),
        common::mqtt_string(),
        proptest::option::of(common::will()),
        proptest::option::of((
            common::non_empty_mqtt_string(),
            proptest::option::of(common::non_empty_mqtt_string()),
        )),
    )
        .prop_map(|(clean_session, keep_alive, client_id, will, login)| {
            let (username, password) = match login {
                Some((user, pass)) => (Some(user), pass.map(|p| Bytes::from(p.into_bytes()))),
                None => (None, None),
            };
            Connect {
                protocol_name: "MQTT".into(),
                protocol_level: 4,
                clean_session,
                keep_alive,
                client_id,
                will,
                username,
                password,
            }
        })
}

/// The packet types the brief names for differential coverage, plus CONNACK.
fn shared_packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect().prop_map(Packet::Connect),
        common::connack().prop_map(Packet::ConnAck),
        common::publish_with(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)])
            .prop_map(Packet::Publish),
        common::subscribe().prop_map(Packet::Subscribe),
        common::suback().prop_map(Packet::SubAck),
        common::unsubscribe().prop_map(Packet::Unsubscribe),
        common::pkid().prop_map(Packet::PubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn rumqttc_encode(packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    to_rumqttc(packet)
        .write(&mut buf, usize::MAX)
        .expect("rumqttc encodes it");
    buf.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rumqttc_decodes_what_we_encode(packet in shared_packet()) {
        let bytes = common::encode_to_vec(&packet);
        let mut buf = BytesMut::from(&bytes[..]);
        let theirs = r::Packet::read(&mut buf, usize::MAX)
            .map_err(|e| TestCaseError::fail(format!("rumqttc rejected {bytes:02x?}: {e}")))?;
        prop_assert!(buf.is_empty());
        prop_assert_eq!(from_rumqttc(theirs), packet);
    }

    #[test]
    fn we_decode_what_rumqttc_encodes(packet in shared_packet()) {
        let bytes = rumqttc_encode(&packet);
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET_SIZE), Ok(Some(packet)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn both_codecs_write_identical_bytes(packet in shared_packet()) {
        prop_assert_eq!(common::encode_to_vec(&packet), rumqttc_encode(&packet));
    }

    #[test]
    fn streams_of_rumqttc_packets_decode_in_order(packets in vec(shared_packet(), 1..6)) {
        let mut buf = BytesMut::new();
        for packet in &packets {
            buf.extend_from_slice(&rumqttc_encode(packet));
        }
        let mut decoded = Vec::new();
        while let Some(packet) = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
        {
            decoded.push(packet);
        }
        prop_assert_eq!(decoded, packets);
    }
}

#[test]
fn an_iot_hub_style_connect_matches_rumqttc_byte_for_byte() {
    let packet = Packet::Connect(Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: false,
        keep_alive: 60,
        client_id: "device-1".into(),
        will: None,
        username: Some("hub.example/device-1/?api-version=2019-10-01".into()),
        password: Some(Bytes::from_static(
            b"SharedAccessSignature sr=hub.example%2Fdevices%2Fdevice-1&sig=abc&se=1",
        )),
    });
    let mut ours = BytesMut::new();
    encode(&packet, &mut ours).expect("encodable");
    assert_eq!(&ours[..], &rumqttc_encode(&packet)[..]);
    // Remaining length 138 takes two bytes; the flags follow the 6-byte name and the level.
    assert_eq!(&ours[1..3], &[0x8A, 0x01]);
    assert_eq!(ours[3 + 7], 0xC0, "user name and password, CleanSession 0");
}

//! proptest strategies for packets, shared by the round-trip and differential tests.
//! Each test binary uses a different subset, hence the dead-code allowance.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use twinhub_mqtt::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, Publish, QoS, SubAck, Subscribe,
    SubscribeReturnCode, Topic, Unsubscribe, decode, encode,
};

/// Any Unicode text MQTT allows in a topic name: no U+0000, no wildcards, not empty.
pub fn topic_name() -> impl Strategy<Value = Topic> {
    "[^\\x00+#]{1,24}".prop_map(|s| Topic::try_from(s).expect("strategy yields valid topics"))
}

/// Any MQTT string as a filter; decoding does not judge wildcard placement.
pub fn topic_filter() -> impl Strategy<Value = Topic> {
    "[^\\x00]{0,24}".prop_map(|s| Topic::try_from(s).expect("strategy yields valid topics"))
}

pub fn mqtt_string() -> impl Strategy<Value = String> {
    "[^\\x00]{0,24}"
}

pub fn non_empty_mqtt_string() -> impl Strategy<Value = String> {
    "[^\\x00]{1,24}"
}

pub fn binary(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

pub fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

pub fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

pub fn will() -> impl Strategy<Value = LastWill> {
    (topic_name(), binary(32), qos(), any::<bool>()).prop_map(|(topic, message, qos, retain)| {
        LastWill {
            topic,
            message,
            qos,
            retain,
        }
    })
}

/// Credentials as the protocol allows them: a user name alone, or with a password.
pub fn credentials() -> impl Strategy<Value = Option<(String, Option<Bytes>)>> {
    proptest::option::of((mqtt_string(), proptest::option::of(binary(48))))
}

pub fn connect() -> impl Strategy<Value = Connect> {
    let known_level = (
        prop_oneof![Just("MQTT".to_owned()), mqtt_string()],
        prop_oneof![Just(4u8), Just(3u8)],
        any::<bool>(),
        any::<u16>(),
        mqtt_string(),
        proptest::option::of(will()),
        credentials(),
    )
        .prop_map(
            |(protocol_name, protocol_level, clean_session, keep_alive, client_id, will, creds)| {
                let (username, password) = match creds {
                    Some((user, pass)) => (Some(user), pass),
                    None => (None, None),
                };
                Connect {
                    protocol_name,
                    protocol_level,
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                }
            },
        );
    // Other levels decode only up to the keep-alive, so only an empty payload round-trips.
    let other_level = (
        mqtt_string(),
        any::<u8>().prop_filter("levels 3 and 4 have a payload", |l| !matches!(l, 3 | 4)),
        any::<bool>(),
        any::<u16>(),
    )
        .prop_map(
            |(protocol_name, protocol_level, clean_session, keep_alive)| Connect {
                protocol_name,
                protocol_level,
                clean_session,
                keep_alive,
                client_id: String::new(),
                will: None,
                username: None,
                password: None,
            },
        );
    prop_oneof![4 => known_level, 1 => other_level]
}

pub fn connect_return_code() -> impl Strategy<Value = ConnectReturnCode> {
    prop_oneof![
        Just(ConnectReturnCode::Accepted),
        Just(ConnectReturnCode::UnacceptableProtocolVersion),
        Just(ConnectReturnCode::IdentifierRejected),
        Just(ConnectReturnCode::ServerUnavailable),
        Just(ConnectReturnCode::BadUsernameOrPassword),
        Just(ConnectReturnCode::NotAuthorized),
    ]
}

/// A CONNACK as §3.2.2.2 allows it: only an accepted connection may report a session.
pub fn connack() -> impl Strategy<Value = ConnAck> {
    (any::<bool>(), connect_return_code()).prop_map(|(present, code)| ConnAck {
        session_present: present && code == ConnectReturnCode::Accepted,
        code,
    })
}

pub fn publish_with(qos: impl Strategy<Value = QoS>) -> impl Strategy<Value = Publish> {
    (
        qos,
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        pkid(),
        binary(300),
    )
        .prop_map(|(qos, dup, retain, topic, pkid, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Publish {
                // QoS 0 carries neither DUP nor a packet id.
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                pkid: if at_most_once { 0 } else { pkid },
                payload,
            }
        })
}

pub fn subscribe() -> impl Strategy<Value = Subscribe> {
    (pkid(), vec((topic_filter(), qos()), 1..6))
        .prop_map(|(pkid, filters)| Subscribe { pkid, filters })
}

pub fn subscribe_return_code() -> impl Strategy<Value = SubscribeReturnCode> {
    prop_oneof![
        qos().prop_map(SubscribeReturnCode::Success),
        Just(SubscribeReturnCode::Failure)
    ]
}

pub fn suback() -> impl Strategy<Value = SubAck> {
    (pkid(), vec(subscribe_return_code(), 1..6))
        .prop_map(|(pkid, return_codes)| SubAck { pkid, return_codes })
}

pub fn unsubscribe() -> impl Strategy<Value = Unsubscribe> {
    (pkid(), vec(topic_filter(), 1..6)).prop_map(|(pkid, filters)| Unsubscribe { pkid, filters })
}

/// Any packet this crate can encode.
pub fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect().prop_map(Packet::Connect),
        connack().prop_map(Packet::ConnAck),
        publish_with(qos()).prop_map(Packet::Publish),
        pkid().prop_map(Packet::PubAck),
        pkid().prop_map(Packet::PubRec),
        pkid().prop_map(Packet::PubRel),
        pkid().prop_map(Packet::PubComp),
        subscribe().prop_map(Packet::Subscribe),
        suback().prop_map(Packet::SubAck),
        unsubscribe().prop_map(Packet::Unsubscribe),
        pkid().prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

pub fn encode_to_vec(packet: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, &mut buf).expect("strategies only produce encodable packets");
    buf.to_vec()
}

/// Decodes packets until the input is exhausted, incomplete or malformed; never panics.
pub fn decode_all(input: &[u8], max_packet_size: usize) -> Vec<Packet> {
    let mut buf = BytesMut::from(input);
    let mut packets = Vec::new();
    while let Ok(Some(packet)) = decode(&mut buf, max_packet_size) {
        packets.push(packet);
    }
    packets
}

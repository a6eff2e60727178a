//! Framing: partial input is `Ok(None)` and consumes nothing, packets are taken off a stream one
//! at a time, the size limit is enforced from the fixed header alone, and PUBLISH fields share
//! the frame's memory.

use bytes::{BufMut, Bytes, BytesMut};
use twinhub_mqtt::{
    DEFAULT_MAX_PACKET_SIZE, Error, Packet, Publish, QoS, Topic, decode, encode, encoded_len,
};

/// A stream with one packet of every type, including a PUBLISH whose remaining length takes
/// three bytes, so cuts fall inside multi-byte lengths too.
fn stream() -> (Vec<u8>, Vec<Packet>) {
    let big = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Topic::from_static("devices/d1/messages/events/"),
        pkid: 42,
        payload: Bytes::from(vec![7u8; 20_000]),
    };
    let packets: Vec<Packet> = [
        &[
            0x10, 0x14, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC0, 0x00, 0x3C, 0x00, 0x02,
            b'd', b'1', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
        ][..],
        &[0x20, 0x02, 0x00, 0x00],
        &[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
        &[0x40, 0x02, 0x00, 0x01],
        &[0x50, 0x02, 0x00, 0x02],
        &[0x62, 0x02, 0x00, 0x02],
        &[0x70, 0x02, 0x00, 0x02],
        &[0x82, 0x06, 0x00, 0x03, 0x00, 0x01, b'#', 0x01],
        &[0x90, 0x03, 0x00, 0x03, 0x01],
        &[0xA2, 0x05, 0x00, 0x04, 0x00, 0x01, b'#'],
        &[0xB0, 0x02, 0x00, 0x04],
        &[0xC0, 0x00],
        &[0xD0, 0x00],
        &[0xE0, 0x00],
    ]
    .iter()
    .map(|bytes| {
        let mut buf = BytesMut::from(*bytes);
        decode(&mut buf, DEFAULT_MAX_PACKET_SIZE)
            .expect("valid vector")
            .expect("complete vector")
    })
    .chain([Packet::Publish(big)])
    .collect();

    let mut bytes = BytesMut::new();
    for packet in &packets {
        encode(packet, &mut bytes).expect("encodable");
    }
    (bytes.to_vec(), packets)
}

#[test]
fn empty_buffer_is_incomplete() {
    let mut buf = BytesMut::new();
    assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET_SIZE), Ok(None));
}

#[test]
fn every_strict_prefix_of_a_packet_is_incomplete_and_untouched() {
    let (_, packets) = stream();
    for packet in &packets {
        let mut full = BytesMut::new();
        encode(packet, &mut full).expect("encodable");
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(
                decode(&mut buf, DEFAULT_MAX_PACKET_SIZE),
                Ok(None),
                "{:?} cut at {cut}",
                packet.packet_type()
            );
            assert_eq!(&buf[..], &full[..cut], "consumed input on a partial packet");
        }
    }
}

#[test]
fn back_to_back_packets_decode_one_at_a_time() {
    let (bytes, packets) = stream();
    let mut buf = BytesMut::from(&bytes[..]);
    for (index, expected) in packets.iter().enumerate() {
        let before = buf.len();
        let packet = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE)
            .expect("valid stream")
            .expect("complete packet");
        assert_eq!(&packet, expected, "packet {index}");
        assert_eq!(before - buf.len(), encoded_len(expected), "packet {index}");
    }
    assert!(buf.is_empty());
    assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET_SIZE), Ok(None));
}

#[test]
fn a_stream_fed_byte_by_byte_yields_the_same_packets() {
    let (bytes, packets) = stream();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for &byte in &bytes {
        buf.put_u8(byte);
        while let Some(packet) = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE).expect("valid stream") {
            decoded.push(packet);
        }
    }
    assert_eq!(decoded, packets);
    assert!(buf.is_empty());
}

#[test]
fn the_default_limit_is_iot_hubs() {
    assert_eq!(DEFAULT_MAX_PACKET_SIZE, 266_240);
}

#[test]
fn oversized_packets_are_refused_from_the_fixed_header_alone() {
    // A PUBLISH announcing 1 MiB: only the fixed header has arrived.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x40][..]);
    assert_eq!(
        decode(&mut buf, DEFAULT_MAX_PACKET_SIZE),
        Err(Error::PacketTooLarge {
            size: 4 + 1_048_576,
            max: DEFAULT_MAX_PACKET_SIZE
        })
    );
}

#[test]
fn the_limit_counts_the_whole_frame_and_is_inclusive() {
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Topic::from_static("t"),
        pkid: 0,
        payload: Bytes::from(vec![1u8; 1000]),
    });
    let mut bytes = BytesMut::new();
    encode(&publish, &mut bytes).expect("encodable");
    let size = bytes.len();
    assert_eq!(size, 1 + 2 + 3 + 1000);

    let mut at_limit = bytes.clone();
    assert_eq!(decode(&mut at_limit, size), Ok(Some(publish)));

    let mut over_limit = bytes.clone();
    assert_eq!(
        decode(&mut over_limit, size - 1),
        Err(Error::PacketTooLarge {
            size,
            max: size - 1
        })
    );
}

#[test]
fn a_full_size_iot_hub_message_fits_the_default_limit() {
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Topic::from_static(
            "devices/some-device-id/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8",
        ),
        pkid: 1,
        payload: Bytes::from(vec![b'x'; 256 * 1024]),
    });
    let mut buf = BytesMut::new();
    encode(&publish, &mut buf).expect("encodable");
    assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET_SIZE), Ok(Some(publish)));
}

#[test]
fn publish_topic_and_payload_are_slices_of_the_frame() {
    let bytes = [
        0x32, 0x0B, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'd', b'a', b't', b'a',
    ];
    let mut buf = BytesMut::from(&bytes[..]);
    let frame = buf.as_ptr() as usize;
    let Some(Packet::Publish(publish)) = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE).expect("valid")
    else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.topic.as_bytes().as_ptr() as usize, frame + 4);
    assert_eq!(publish.payload.as_ptr() as usize, frame + 9);
    assert_eq!(&publish.payload[..], b"data");
}

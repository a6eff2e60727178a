//! Fuzz target for the MQTT codec: arbitrary bytes go through `decode` packet by packet; every
//! packet that decodes must re-encode and decode to an equal packet.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use twinhub_mqtt::{DEFAULT_MAX_PACKET_SIZE, decode, encode, encoded_len};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Each successful decode consumes at least two bytes, so this ends.
    while let Ok(Some(packet)) = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE) {
        let mut encoded = BytesMut::new();
        if let Err(error) = encode(&packet, &mut encoded) {
            panic!("{packet:?} decoded but does not encode: {error}");
        }
        assert_eq!(encoded.len(), encoded_len(&packet), "encoded_len disagrees");
        match decode(&mut encoded, usize::MAX) {
            Ok(Some(again)) => assert_eq!(again, packet, "re-decoded packet differs"),
            other => panic!("{packet:?} re-encoded to bytes that decode as {other:?}"),
        }
        assert!(encoded.is_empty(), "re-encoding left trailing bytes");
    }
});

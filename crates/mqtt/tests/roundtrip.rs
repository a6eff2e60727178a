//! Property tests: every encodable packet round-trips, streams split anywhere reassemble, and
//! no byte string (random or a corrupted valid frame) makes decode panic or disagree with
//! itself after re-encoding.

mod common;

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use twinhub_mqtt::{DEFAULT_MAX_PACKET_SIZE, Packet, decode, encode, encoded_len};

/// Whatever decodes must re-encode and decode to the same packet: the fuzz target's property.
fn assert_stable(packet: &Packet) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(packet, &mut buf)
        .map_err(|e| TestCaseError::fail(format!("{packet:?} decoded but won't encode: {e}")))?;
    prop_assert_eq!(buf.len(), encoded_len(packet));
    let again = decode(&mut buf, usize::MAX);
    prop_assert_eq!(again, Ok(Some(packet.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn packets_round_trip(packet in common::packet()) {
        let bytes = common::encode_to_vec(&packet);
        prop_assert_eq!(bytes.len(), encoded_len(&packet));
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET_SIZE), Ok(Some(packet)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn streams_split_anywhere_reassemble(
        packets in vec(common::packet(), 1..8),
        chunk in 1usize..64,
    ) {
        let stream: Vec<u8> = packets.iter().flat_map(common::encode_to_vec).collect();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            let before = buf.clone();
            while let Some(packet) = decode(&mut buf, DEFAULT_MAX_PACKET_SIZE)
                .map_err(|e| TestCaseError::fail(e.to_string()))?
            {
                decoded.push(packet);
            }
            // Whatever is left is an incomplete packet that decode left as it was.
            prop_assert!(before.ends_with(&buf));
        }
        prop_assert_eq!(decoded, packets);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(input in vec(any::<u8>(), 0..512), max in 0usize..1024) {
        for packet in common::decode_all(&input, max) {
            assert_stable(&packet)?;
        }
        for packet in common::decode_all(&input, DEFAULT_MAX_PACKET_SIZE) {
            assert_stable(&packet)?;
        }
    }

    #[test]
    fn corrupted_frames_never_panic(
        packet in common::packet(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        // Valid frames with a few bytes overwritten reach far deeper into the parsers than
        // random bytes, which mostly fail on the first byte.
        let mut bytes = common::encode_to_vec(&packet);
        for (index, value) in edits {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        let len = bytes.len();
        for input in [&bytes[..], &bytes[..cut.index(len + 1)]] {
            for decoded in common::decode_all(input, DEFAULT_MAX_PACKET_SIZE) {
                assert_stable(&decoded)?;
            }
        }
    }
}

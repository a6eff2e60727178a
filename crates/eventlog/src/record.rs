//! The on-disk record: how one event is framed in a segment file, and how a frame is checked.
//!
//! A record is, little-endian: `len: u32` (the bytes after the CRC: 16 + data), `crc: u32`
//! (CRC-32/IEEE over the length field and everything after it), `sequence: i64`,
//! `enqueued_ms: i64`, then the data. The offset of a record is not stored: it is the segment's
//! first offset (in its file name) plus the record's position in the file. The memory backend
//! counts the same sizes so that offsets and segment boundaries match the disk backend's.

/// Bytes a record adds to its event's data: length, CRC, sequence number and enqueued time.
pub const RECORD_OVERHEAD: usize = 24;

const HEADER: usize = 8;
const FIXED_BODY: usize = 16;

/// One decoded record, borrowing its data from the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub sequence: i64,
    pub enqueued_ms: i64,
    pub data: &'a [u8],
}

/// The size of the record that frames `data_len` bytes.
pub(crate) fn record_len(data_len: usize) -> u64 {
    (data_len + RECORD_OVERHEAD) as u64
}

/// Appends the record of one event to `buf`.
pub(crate) fn encode(buf: &mut Vec<u8>, sequence: i64, enqueued_ms: i64, data: &[u8]) {
    // Options cap events well below u32::MAX, so the length always fits.
    let len = u32::try_from(FIXED_BODY + data.len()).unwrap_or(u32::MAX);
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&sequence.to_le_bytes());
    buf.extend_from_slice(&enqueued_ms.to_le_bytes());
    buf.extend_from_slice(data);
    let crc = checksum(&buf[start..start + 4], &buf[start + HEADER..]);
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

fn checksum(len: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(body);
    hasher.finalize()
}

/// Decodes the record at the start of `buf`, returning it and its total length, or why the
/// bytes there are not a whole, intact record (too short: a torn write; a bad length or CRC:
/// garbage or damage).
pub(crate) fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), String> {
    let Some((len_bytes, rest)) = buf.split_first_chunk::<4>() else {
        return Err(format!(
            "{} bytes, too short for a record header",
            buf.len()
        ));
    };
    let Some((crc_bytes, rest)) = rest.split_first_chunk::<4>() else {
        return Err(format!(
            "{} bytes, too short for a record header",
            buf.len()
        ));
    };
    let len = u32::from_le_bytes(*len_bytes) as usize;
    if len < FIXED_BODY {
        return Err(format!(
            "record length {len} is below the minimum of {FIXED_BODY}"
        ));
    }
    let Some(body) = rest.get(..len) else {
        return Err(format!(
            "record of {len} bytes is cut short at {} bytes",
            rest.len()
        ));
    };
    let stored = u32::from_le_bytes(*crc_bytes);
    let actual = checksum(len_bytes, body);
    if stored != actual {
        return Err(format!(
            "record CRC mismatch (stored {stored:08x}, computed {actual:08x})"
        ));
    }
    let (sequence, rest) = body.split_first_chunk::<8>().ok_or("short body")?;
    let (enqueued_ms, data) = rest.split_first_chunk::<8>().ok_or("short body")?;
    Ok((
        Record {
            sequence: i64::from_le_bytes(*sequence),
            enqueued_ms: i64::from_le_bytes(*enqueued_ms),
            data,
        },
        HEADER + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_overhead() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 1_700_000_000_000, b"hello");
        encode(&mut buf, 8, 1_700_000_000_001, b"");
        assert_eq!(buf.len() as u64, record_len(5) + record_len(0));
        let (first, used) = decode(&buf).unwrap();
        assert_eq!(used, 5 + RECORD_OVERHEAD);
        assert_eq!(
            first,
            Record {
                sequence: 7,
                enqueued_ms: 1_700_000_000_000,
                data: b"hello"
            }
        );
        let (second, used2) = decode(&buf[used..]).unwrap();
        assert_eq!((second.sequence, second.data, used2), (8, &b""[..], 24));
    }

    #[test]
    fn damage_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 2, b"payload");
        // Every strict prefix is torn.
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "prefix of {cut} bytes");
        }
        // Every single flipped bit is caught by the CRC (or the length check).
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode(&bad).is_err(), "flip of bit {bit} in byte {byte}");
            }
        }
        // Zeroes (a preallocated or torn tail) are not a record.
        assert!(decode(&[0; 64]).is_err());
    }
}

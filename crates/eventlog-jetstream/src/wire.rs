//! How one append (a batch of events) is laid out as one JetStream message: the `Twinhub-Batch`
//! header carrying what the log assigned, the payload framing the events' data, and the
//! offsets derived from the message's stream sequence. Used by the writer (encode), the
//! follower (headers only) and reads (decode).

use bytes::{BufMut, Bytes, BytesMut};
use twinhub_eventlog::RECORD_OVERHEAD;

/// The header naming what a message's batch was assigned.
pub(crate) const BATCH_HEADER: &str = "Twinhub-Batch";
/// The format tag at the start of [`BATCH_HEADER`]'s value.
const VERSION: &str = "1";
/// Bytes the payload spends on each event's length prefix.
pub(crate) const FRAME_OVERHEAD: usize = 4;
/// Offsets are `stream_sequence << OFFSET_SHIFT | 2 * index` (see [`offset`]).
const OFFSET_SHIFT: u32 = 24;
/// The most events one message may carry, so that `2 * index` stays below `1 << OFFSET_SHIFT`.
pub(crate) const MAX_EVENTS_PER_MESSAGE: usize = (1 << (OFFSET_SHIFT - 1)) - 1;

/// What a message's batch was assigned, and where it sits in its partition's segments. Every
/// field follows from the partition's previous message and the batch itself, so every writer
/// computes the same values (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    /// The partition sequence number of the first event.
    pub first_seq: i64,
    /// How many events the message holds (at least one).
    pub count: u32,
    /// The enqueued time of every event of the message.
    pub enqueued_ms: i64,
    /// The events' size as other backends count it: data plus [`RECORD_OVERHEAD`] each.
    pub bytes: u64,
    /// The first sequence number of the segment the message belongs to.
    pub segment: i64,
    /// The bytes of that segment up to and including this message.
    pub segment_bytes: u64,
}

impl Batch {
    /// One past the last sequence number of the batch.
    pub(crate) fn end_seq(&self) -> i64 {
        self.first_seq + i64::from(self.count)
    }

    /// The batch that follows `previous` (the partition's last message, if any) with `count`
    /// events of `bytes` record bytes at `now_ms`: numbering continues, the time never goes
    /// back, and a new segment starts when this batch would take a non-empty one past
    /// `segment_bytes` (as other backends roll segments, at message granularity).
    pub(crate) fn next(
        previous: Option<&Batch>,
        count: u32,
        bytes: u64,
        now_ms: i64,
        segment_bytes: u64,
    ) -> Batch {
        let first_seq = previous.map_or(0, Batch::end_seq);
        let enqueued_ms = previous.map_or(now_ms, |p| p.enqueued_ms.max(now_ms));
        let (segment, segment_bytes) = match previous {
            Some(p) if p.segment_bytes + bytes <= segment_bytes => {
                (p.segment, p.segment_bytes + bytes)
            }
            _ => (first_seq, bytes),
        };
        Batch {
            first_seq,
            count,
            enqueued_ms,
            bytes,
            segment,
            segment_bytes,
        }
    }

    pub(crate) fn header_value(&self) -> String {
        format!(
            "{VERSION} {} {} {} {} {} {}",
            self.first_seq,
            self.count,
            self.enqueued_ms,
            self.bytes,
            self.segment,
            self.segment_bytes
        )
    }

    pub(crate) fn parse(value: &str) -> Option<Batch> {
        let mut fields = value.split_ascii_whitespace();
        if fields.next()? != VERSION {
            return None;
        }
        let mut next_i64 = || fields.next()?.parse::<i64>().ok();
        let batch = Batch {
            first_seq: next_i64()?,
            count: u32::try_from(next_i64()?).ok()?,
            enqueued_ms: next_i64()?,
            bytes: u64::try_from(next_i64()?).ok()?,
            segment: next_i64()?,
            segment_bytes: u64::try_from(next_i64()?).ok()?,
        };
        (batch.first_seq >= 0 && batch.count > 0 && batch.segment <= batch.first_seq)
            .then_some(batch)
    }

    pub(crate) fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Option<Batch> {
        Batch::parse(headers?.get(BATCH_HEADER)?.as_str())
    }
}

/// The offset of the `index`th event of the message at `stream_sequence`. Offsets only need to
/// increase strictly within a partition, and a partition's messages take increasing stream
/// sequences; the factor 2 leaves a gap after every event, so that an offset "between
/// records" exists and resolves to the next one, as the trait describes.
pub(crate) fn offset(stream_sequence: u64, index: u32) -> u64 {
    (stream_sequence << OFFSET_SHIFT) | (u64::from(index) << 1)
}

/// The stream sequence an offset names, and the event index in that message.
pub(crate) fn split_offset(offset: u64) -> (u64, u64) {
    (
        offset >> OFFSET_SHIFT,
        (offset & ((1 << OFFSET_SHIFT) - 1)) >> 1,
    )
}

/// The events' data in a message of this batch (its record bytes less their overhead).
pub(crate) fn data_len(batch: &Batch) -> u64 {
    batch
        .bytes
        .saturating_sub(u64::from(batch.count) * RECORD_OVERHEAD as u64)
}

/// The size other backends give an event of `data_len` bytes.
pub(crate) fn record_len(data_len: usize) -> u64 {
    (data_len + RECORD_OVERHEAD) as u64
}

/// Appends one event's frame (a big-endian `u32` length, then the data) to `buf`.
pub(crate) fn put_event(buf: &mut BytesMut, data: &[u8]) {
    // Events are limited far below 4 GiB by the options and the server's max_payload.
    buf.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    buf.put_slice(data);
}

/// The `count` events of a payload, sharing its buffer.
pub(crate) fn decode(payload: &Bytes, count: u32) -> Result<Vec<Bytes>, String> {
    let mut events = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for i in 0..count {
        let Some(len) = payload.get(at..at + FRAME_OVERHEAD) else {
            return Err(format!("the payload ends inside event {i}'s length"));
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + FRAME_OVERHEAD;
        let Some(end) = start.checked_add(len).filter(|&end| end <= payload.len()) else {
            return Err(format!("event {i} runs past the end of the payload"));
        };
        events.push(payload.slice(start..end));
        at = end;
    }
    if at != payload.len() {
        return Err(format!(
            "{} bytes after the last of {count} events",
            payload.len() - at
        ));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let batch = Batch {
            first_seq: 41,
            count: 3,
            enqueued_ms: 1_700_000_000_000,
            bytes: 99,
            segment: 40,
            segment_bytes: 120,
        };
        assert_eq!(Batch::parse(&batch.header_value()), Some(batch));
        assert_eq!(Batch::parse("2 0 1 0 0 0 0"), None);
        assert_eq!(Batch::parse("1 0 0 0 0 0 0"), None, "no events");
        assert_eq!(Batch::parse("1 0 1 0 0"), None);
    }

    #[test]
    fn batches_follow_each_other() {
        let first = Batch::next(None, 2, 100, 5_000, 150);
        assert_eq!(
            (first.first_seq, first.segment, first.segment_bytes),
            (0, 0, 100)
        );
        let second = Batch::next(Some(&first), 1, 50, 4_000, 150);
        assert_eq!(second.first_seq, 2);
        assert_eq!(second.enqueued_ms, 5_000, "time never goes back");
        assert_eq!((second.segment, second.segment_bytes), (0, 150));
        let third = Batch::next(Some(&second), 1, 10, 6_000, 150);
        assert_eq!(
            (third.first_seq, third.segment, third.segment_bytes),
            (3, 3, 10)
        );
        assert_eq!(third.enqueued_ms, 6_000);
        // A batch above the segment size gets a segment of its own.
        let big = Batch::next(Some(&third), 1, 500, 6_000, 150);
        assert_eq!((big.segment, big.segment_bytes), (4, 500));
    }

    #[test]
    fn offsets_increase_and_split() {
        assert!(offset(1, 0) < offset(1, 1));
        assert!(offset(1, MAX_EVENTS_PER_MESSAGE as u32 - 1) < offset(2, 0));
        assert_eq!(split_offset(offset(7, 5)), (7, 5));
        assert_eq!(split_offset(offset(7, 5) + 1), (7, 5));
    }

    #[test]
    fn payloads_round_trip() {
        let mut buf = BytesMut::new();
        for data in [&b""[..], b"a", &[0xff; 300]] {
            put_event(&mut buf, data);
        }
        let payload = buf.freeze();
        let events = decode(&payload, 3).unwrap();
        assert_eq!(events[0], Bytes::new());
        assert_eq!(events[1], Bytes::from_static(b"a"));
        assert_eq!(events[2].len(), 300);
        assert!(decode(&payload, 2).is_err());
        assert!(decode(&payload, 4).is_err());
        assert!(decode(&payload.slice(..payload.len() - 1), 3).is_err());
    }
}

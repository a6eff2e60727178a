//! A partition's in-memory index, shared by both backends: its segments in order, each with the
//! position and enqueued time of every readable record, from which positions are resolved,
//! reads planned and retention decided without touching the data.
//!
//! A full index costs 12 bytes per event (a `u32` position and an `i64` time; sequence numbers
//! and offsets follow from the segment's first sequence number and first offset), about 12 MiB
//! per million retained events. Lookups by sequence number are direct; by offset or time, a
//! scan over the segments (a few hundred at most) then a binary search inside one.

use std::collections::VecDeque;

use crate::{Error, PartitionInfo, Position, Result};

/// One segment: a run of consecutive sequence numbers starting at `first_seq`, whose records
/// sit back to back from `base_offset` in the partition's offset space. `body` is the backend's
/// handle on the data (a file, or the events themselves).
#[derive(Debug)]
pub(crate) struct Segment<B> {
    pub first_seq: i64,
    pub base_offset: u64,
    positions: Vec<u32>,
    times: Vec<i64>,
    /// The end of the last readable record.
    len: u64,
    pub body: B,
}

impl<B> Segment<B> {
    pub(crate) fn new(first_seq: i64, base_offset: u64, body: B) -> Self {
        Segment {
            first_seq,
            base_offset,
            positions: Vec::new(),
            times: Vec::new(),
            len: 0,
            body,
        }
    }

    /// A segment rebuilt from saved positions and times (see [`Segment::entries`]), or `None`
    /// unless they describe records back to back from position 0 within `len` bytes.
    pub(crate) fn from_entries(
        first_seq: i64,
        base_offset: u64,
        positions: Vec<u32>,
        times: Vec<i64>,
        len: u64,
        body: B,
    ) -> Option<Self> {
        let ordered = positions.first().is_none_or(|&p| p == 0)
            && positions.windows(2).all(|w| w[0] < w[1])
            && positions.last().map_or(len == 0, |&p| u64::from(p) < len);
        (ordered && positions.len() == times.len()).then_some(Segment {
            first_seq,
            base_offset,
            positions,
            times,
            len,
            body,
        })
    }

    /// The position and enqueued time of every readable record.
    pub(crate) fn entries(&self) -> (&[u32], &[i64]) {
        (&self.positions, &self.times)
    }

    /// The same segment over another body.
    pub(crate) fn with_body<C>(self, body: C) -> Segment<C> {
        Segment {
            first_seq: self.first_seq,
            base_offset: self.base_offset,
            positions: self.positions,
            times: self.times,
            len: self.len,
            body,
        }
    }

    /// Readable records.
    pub(crate) fn count(&self) -> usize {
        self.positions.len()
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// One past the last readable sequence number.
    pub(crate) fn end_seq(&self) -> i64 {
        self.first_seq + self.positions.len() as i64
    }

    /// Indexes the next record, `record_len` bytes long, at the segment's current end.
    pub(crate) fn push(&mut self, record_len: u64, enqueued_ms: i64) {
        // Segments are capped well below 4 GiB (`MAX_SEGMENT_BYTES`), and a record only
        // starts below the cap, so its position fits.
        self.positions
            .push(u32::try_from(self.len).unwrap_or(u32::MAX));
        self.times.push(enqueued_ms);
        self.len += record_len;
    }

    /// The position of record `i` in the segment.
    pub(crate) fn position(&self, i: usize) -> u64 {
        self.positions.get(i).map_or(self.len, |&p| u64::from(p))
    }

    pub(crate) fn record_len(&self, i: usize) -> u64 {
        self.position(i + 1) - self.position(i)
    }

    pub(crate) fn time(&self, i: usize) -> i64 {
        self.times[i]
    }

    pub(crate) fn offset(&self, i: usize) -> u64 {
        self.base_offset + self.position(i)
    }

    pub(crate) fn newest_time(&self) -> Option<i64> {
        self.times.last().copied()
    }
}

/// A run of records of one segment to read: indexes `from..to` of `segments[segment]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub segment: usize,
    pub from: usize,
    pub to: usize,
}

/// Whether a record of `record_len` bytes starts a new segment after `count` records taking
/// `len` bytes: only a segment that holds something is sealed, so an oversized record gets a
/// segment of its own.
pub(crate) fn rolls(len: u64, count: usize, record_len: u64, segment_bytes: u64) -> bool {
    count > 0 && len + record_len > segment_bytes
}

#[derive(Debug)]
pub(crate) struct Index<B> {
    // Never empty: the last segment is the active one, which retention never drops.
    segments: VecDeque<Segment<B>>,
    next_seq: i64,
    next_offset: u64,
    /// Offset and time of the event at `next_seq - 1`, when known.
    last: Option<(u64, i64)>,
    /// Readable bytes across all segments, for size-based retention.
    bytes: u64,
}

impl<B> Index<B> {
    /// An index over recovered segments (oldest first, at least one). `next_seq` and
    /// `next_offset` continue the last one; `last` is the newest readable event, if any.
    pub(crate) fn new(segments: Vec<Segment<B>>, last: Option<(u64, i64)>) -> Self {
        let segments = VecDeque::from(segments);
        let (next_seq, next_offset) = segments
            .back()
            .map_or((0, 0), |s| (s.end_seq(), s.base_offset + s.len));
        let bytes = segments.iter().map(Segment::len).sum();
        Index {
            segments,
            next_seq,
            next_offset,
            last,
            bytes,
        }
    }

    pub(crate) fn empty(body: B) -> Self {
        Self::new(vec![Segment::new(0, 0, body)], None)
    }

    pub(crate) fn segments(&self) -> &VecDeque<Segment<B>> {
        &self.segments
    }

    pub(crate) fn begin(&self) -> i64 {
        self.segments.front().map_or(self.next_seq, |s| s.first_seq)
    }

    pub(crate) fn next_seq(&self) -> i64 {
        self.next_seq
    }

    pub(crate) fn last_time(&self) -> Option<i64> {
        self.last.map(|(_, time)| time)
    }

    pub(crate) fn active(&self) -> Option<&Segment<B>> {
        self.segments.back()
    }

    pub(crate) fn info(&self) -> PartitionInfo {
        let begin = self.begin();
        PartitionInfo {
            begin_sequence: begin,
            last_sequence: self.next_seq - 1,
            last_offset: self.last.map(|(offset, _)| offset),
            last_enqueued_ms: self.last.map(|(_, time)| time),
            is_empty: begin >= self.next_seq,
        }
    }

    /// Indexes the next event (sequence `next_seq`), in a new segment when `new_segment` is
    /// given, and returns the segment it went to.
    pub(crate) fn append(
        &mut self,
        record_len: u64,
        enqueued_ms: i64,
        new_segment: Option<B>,
    ) -> &mut Segment<B> {
        if let Some(body) = new_segment {
            self.segments
                .push_back(Segment::new(self.next_seq, self.next_offset, body));
        }
        self.last = Some((self.next_offset, enqueued_ms));
        self.next_seq += 1;
        self.next_offset += record_len;
        self.bytes += record_len;
        let Some(active) = self.segments.back_mut() else {
            unreachable!("an index always has an active segment")
        };
        active.push(record_len, enqueued_ms);
        active
    }

    /// The cursor a position starts at, within `begin()..=next_seq()`.
    pub(crate) fn resolve(&self, from: &Position) -> i64 {
        let begin = self.begin();
        match *from {
            Position::Earliest => begin,
            Position::Latest => self.next_seq,
            Position::Sequence {
                sequence,
                inclusive,
            } => {
                let cursor = if inclusive {
                    sequence
                } else {
                    sequence.saturating_add(1)
                };
                cursor.clamp(begin, self.next_seq)
            }
            Position::Offset { offset, inclusive } => self.first_where(|record_offset, _| {
                if inclusive {
                    record_offset >= offset
                } else {
                    record_offset > offset
                }
            }),
            Position::EnqueuedTime { ms, inclusive } => {
                self.first_where(|_, time| if inclusive { time >= ms } else { time > ms })
            }
        }
    }

    /// The sequence number of the first readable record for which `matches(offset, time)`
    /// holds, or `next_seq` if none does. `matches` must be monotone (false, then true) in
    /// sequence order, as offsets and enqueued times are.
    fn first_where(&self, matches: impl Fn(u64, i64) -> bool) -> i64 {
        for segment in &self.segments {
            let Some(last) = segment.count().checked_sub(1) else {
                continue;
            };
            let offset = |i: usize| segment.base_offset + segment.position(i);
            if !matches(offset(last), segment.times[last]) {
                continue;
            }
            let mut low = 0;
            let mut high = last;
            while low < high {
                let mid = low + (high - low) / 2;
                if matches(offset(mid), segment.times[mid]) {
                    high = mid;
                } else {
                    low = mid + 1;
                }
            }
            return segment.first_seq + low as i64;
        }
        self.next_seq
    }

    /// Which records a read from `next` returns: up to `max_events`, their data (as
    /// `data_len` tells) adding up to at most `max_bytes` except for the first. Starts at the
    /// oldest retained event when `next` is older; stops before unreadable (damaged) records,
    /// and fails with [`Error::Corrupt`] when `next` is one of them.
    pub(crate) fn plan(
        &self,
        next: i64,
        max_events: usize,
        max_bytes: usize,
        data_len: impl Fn(&Segment<B>, usize) -> usize,
    ) -> Result<Vec<Span>> {
        let next = next.max(self.begin());
        let mut spans = Vec::new();
        if max_events == 0 || next >= self.next_seq {
            return Ok(spans);
        }
        // The segment holding `next`: the last one starting at or before it.
        let mut k = self
            .segments
            .partition_point(|s| s.first_seq <= next)
            .saturating_sub(1);
        let Some(segment) = self.segments.get(k) else {
            return Ok(spans);
        };
        if next >= segment.end_seq() {
            let until = self
                .segments
                .get(k + 1)
                .map_or(self.next_seq, |s| s.first_seq);
            return Err(Error::Corrupt(format!(
                "events {next}..{until} are unreadable: their segment (from sequence {}) is damaged",
                segment.first_seq
            )));
        }
        let mut i = (next - segment.first_seq) as usize;
        let (mut events, mut bytes) = (0usize, 0usize);
        while let Some(segment) = self.segments.get(k) {
            let from = i;
            let mut full = false;
            while i < segment.count() {
                let size = data_len(segment, i);
                if events == max_events || (events > 0 && bytes.saturating_add(size) > max_bytes) {
                    full = true;
                    break;
                }
                events += 1;
                bytes = bytes.saturating_add(size);
                i += 1;
            }
            if i > from {
                spans.push(Span {
                    segment: k,
                    from,
                    to: i,
                });
            }
            let contiguous = self
                .segments
                .get(k + 1)
                .is_some_and(|following| following.first_seq == segment.end_seq());
            if full || events == max_events || !contiguous {
                break;
            }
            k += 1;
            i = 0;
        }
        Ok(spans)
    }

    /// How many of the oldest segments retention drops: those (never the active one) whose
    /// newest event is older than `cutoff_ms` (or that hold no readable event), then as many
    /// more as keep the partition above `max_bytes`.
    pub(crate) fn expired(&self, cutoff_ms: i64, max_bytes: Option<u64>) -> usize {
        let mut dropped = 0;
        let mut remaining = self.bytes;
        while dropped + 1 < self.segments.len() {
            let segment = &self.segments[dropped];
            let old = segment
                .newest_time()
                .is_none_or(|newest| newest < cutoff_ms);
            let over = max_bytes.is_some_and(|max| remaining > max);
            if !(old || over) {
                break;
            }
            remaining -= segment.len();
            dropped += 1;
        }
        dropped
    }

    /// Drops the `count` oldest segments (never the active one); returns them and how many
    /// sequence numbers left the retained range.
    pub(crate) fn drop_oldest(&mut self, count: usize) -> (Vec<Segment<B>>, u64) {
        let before = self.begin();
        let count = count.min(self.segments.len().saturating_sub(1));
        let dropped: Vec<Segment<B>> = self.segments.drain(..count).collect();
        self.bytes -= dropped.iter().map(Segment::len).sum::<u64>();
        (dropped, (self.begin() - before) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments of four 10-byte records, times 100, 110, ...
    fn sample() -> Index<()> {
        let mut index = Index::empty(());
        for i in 0..10 {
            let roll = index
                .active()
                .is_some_and(|a| rolls(a.len(), a.count(), 10, 40));
            index.append(10, 100 + 10 * i, roll.then_some(()));
        }
        index
    }

    #[test]
    fn segments_roll_at_the_size() {
        let index = sample();
        let firsts: Vec<i64> = index.segments().iter().map(|s| s.first_seq).collect();
        assert_eq!(firsts, [0, 4, 8]);
        let bases: Vec<u64> = index.segments().iter().map(|s| s.base_offset).collect();
        assert_eq!(bases, [0, 40, 80]);
        assert_eq!(index.next_seq(), 10);
        assert_eq!(index.info().last_offset, Some(90));
        // An oversized record starts its own segment, and the next one another.
        let mut index = Index::empty(());
        index.append(100, 0, None);
        assert!(rolls(100, 1, 1, 40));
        assert!(!rolls(0, 0, 100, 40));
    }

    #[test]
    fn offsets_and_times_resolve_by_search() {
        let index = sample();
        let at = |offset, inclusive| index.resolve(&Position::Offset { offset, inclusive });
        assert_eq!(at(0, true), 0);
        assert_eq!(at(0, false), 1);
        assert_eq!(at(35, true), 4);
        assert_eq!(at(40, true), 4);
        assert_eq!(at(40, false), 5);
        assert_eq!(at(90, false), 10);
        assert_eq!(at(1_000, true), 10);
        let time = |ms, inclusive| index.resolve(&Position::EnqueuedTime { ms, inclusive });
        assert_eq!(time(0, false), 0);
        assert_eq!(time(150, true), 5);
        assert_eq!(time(150, false), 6);
        assert_eq!(time(190, false), 10);
    }

    #[test]
    fn plans_cross_segments_and_respect_limits() {
        let index = sample();
        let ten = |_: &Segment<()>, _: usize| 10;
        let spans = index.plan(2, 100, usize::MAX, ten).unwrap();
        assert_eq!(
            spans,
            [
                Span {
                    segment: 0,
                    from: 2,
                    to: 4
                },
                Span {
                    segment: 1,
                    from: 0,
                    to: 4
                },
                Span {
                    segment: 2,
                    from: 0,
                    to: 2
                },
            ]
        );
        let spans = index.plan(3, 3, usize::MAX, ten).unwrap();
        assert_eq!(spans.iter().map(|s| s.to - s.from).sum::<usize>(), 3);
        // The first event comes whatever its size; then the byte limit holds.
        assert_eq!(index.plan(0, 100, 1, ten).unwrap().len(), 1);
        assert_eq!(index.plan(0, 100, 25, ten).unwrap()[0].to, 2);
        assert!(index.plan(10, 100, 100, ten).unwrap().is_empty());
        assert!(index.plan(0, 0, 100, ten).unwrap().is_empty());
    }

    #[test]
    fn retention_drops_whole_old_segments_but_never_the_active_one() {
        let mut index = sample();
        // Segment 0's newest event is at 130.
        assert_eq!(index.expired(130, None), 0);
        assert_eq!(index.expired(131, None), 1);
        assert_eq!(index.expired(i64::MAX, None), 2);
        // 100 bytes are within a limit of 100; above 99, dropping segment 0 leaves 60.
        assert_eq!(index.expired(0, Some(100)), 0);
        assert_eq!(index.expired(0, Some(99)), 1);
        assert_eq!(index.expired(0, Some(0)), 2);
        let (dropped, events) = index.drop_oldest(2);
        assert_eq!((dropped.len(), events), (2, 8));
        assert_eq!(index.begin(), 8);
        assert_eq!(
            index.resolve(&Position::Sequence {
                sequence: 0,
                inclusive: true
            }),
            8
        );
        assert_eq!(
            index.resolve(&Position::Offset {
                offset: 0,
                inclusive: true
            }),
            8
        );
        let spans = index.plan(0, 100, usize::MAX, |_, _| 10).unwrap();
        assert_eq!(
            spans,
            [Span {
                segment: 0,
                from: 0,
                to: 2
            }]
        );
    }
}

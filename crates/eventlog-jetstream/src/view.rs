//! A partition as this node knows it: one entry per retained message (its stream sequence and
//! [`Batch`]), kept current by this node's writer and by the follower that sees every node's
//! messages; the synchronous `info` and `resolve` answer from it, reads plan from it,
//! retention picks whole segments from it, and it holds the tail cache (the payloads of the
//! newest messages). Watchers of a partition's end are woken through [`Tails`].

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::watch;
use twinhub_eventlog::{Error, PartitionInfo, Position, Result};

use crate::wire::{self, Batch};

/// One retained message of the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub stream_seq: u64,
    pub batch: Batch,
}

impl Entry {
    fn last_offset(&self) -> u64 {
        wire::offset(self.stream_seq, self.batch.count - 1)
    }
}

/// What retention would drop from a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    /// The stream sequence of the oldest message kept: a purge drops the partition's messages
    /// below it.
    pub keep_from: u64,
    /// How many events that drops.
    pub events: u64,
}

#[derive(Debug)]
pub(crate) struct View {
    entries: VecDeque<Entry>,
    /// The newest message ever seen: it outlives retention (which never drops the active
    /// segment anyway) and is what the next append follows.
    last: Option<Entry>,
    /// Record bytes of the retained messages, for size-based retention.
    bytes: u64,
    /// Payloads of the newest messages, oldest first, by stream sequence.
    cache: VecDeque<(u64, Bytes)>,
    cache_bytes: usize,
    cache_limit: usize,
}

impl View {
    pub(crate) fn new(cache_limit: usize) -> Self {
        View {
            entries: VecDeque::new(),
            last: None,
            bytes: 0,
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_limit,
        }
    }

    /// The partition's newest message, which the next append must follow.
    pub(crate) fn last(&self) -> Option<Entry> {
        self.last
    }

    /// The stream sequence of the newest message seen (0: none, JetStream starts at 1).
    pub(crate) fn last_stream_seq(&self) -> u64 {
        self.last.map_or(0, |e| e.stream_seq)
    }

    pub(crate) fn next_seq(&self) -> i64 {
        self.last.map_or(0, |e| e.batch.end_seq())
    }

    fn begin(&self) -> i64 {
        self.entries
            .front()
            .map_or(self.next_seq(), |e| e.batch.first_seq)
    }

    /// Adds a message seen on the stream (from this node's writer or the follower, in stream
    /// order); one already seen is ignored. Returns whether it was new.
    pub(crate) fn insert(&mut self, entry: Entry, payload: Option<Bytes>) -> bool {
        if entry.stream_seq <= self.last_stream_seq() {
            return false;
        }
        if entry.batch.first_seq != self.next_seq() {
            // Writers only publish a batch that follows the partition's last message (the
            // server checks it), so this means a message not written by this log.
            tracing::warn!(
                stream_seq = entry.stream_seq,
                first_seq = entry.batch.first_seq,
                expected = self.next_seq(),
                "event log message out of sequence; taking its numbering"
            );
        }
        self.entries.push_back(entry);
        self.last = Some(entry);
        self.bytes += entry.batch.bytes;
        if let Some(payload) = payload {
            self.cache_payload(entry.stream_seq, payload);
        }
        true
    }

    /// Keeps the payload of a message at the partition's tail, dropping the oldest cached
    /// ones beyond the limit; older messages are not cached (readers far behind go to the
    /// server).
    pub(crate) fn cache_payload(&mut self, stream_seq: u64, payload: Bytes) {
        let newest = self.cache.back().map_or(0, |(seq, _)| *seq);
        if stream_seq <= newest || payload.len() > self.cache_limit {
            return;
        }
        self.cache_bytes += payload.len();
        self.cache.push_back((stream_seq, payload));
        while self.cache_bytes > self.cache_limit {
            match self.cache.pop_front() {
                Some((_, dropped)) => self.cache_bytes -= dropped.len(),
                None => break,
            }
        }
    }

    /// Forgets the messages below `stream_seq` (purged, here or by another node).
    pub(crate) fn trim_before(&mut self, stream_seq: u64) {
        while let Some(front) = self.entries.front() {
            // Never the newest message: retention keeps the active segment, and the view
            // needs it to number the next append.
            if front.stream_seq >= stream_seq || self.entries.len() == 1 {
                break;
            }
            self.bytes -= front.batch.bytes;
            self.entries.pop_front();
        }
        while self.cache.front().is_some_and(|(seq, _)| *seq < stream_seq) {
            if let Some((_, dropped)) = self.cache.pop_front() {
                self.cache_bytes -= dropped.len();
            }
        }
    }

    pub(crate) fn info(&self) -> PartitionInfo {
        let begin = self.begin();
        let next = self.next_seq();
        PartitionInfo {
            begin_sequence: begin,
            last_sequence: next - 1,
            last_offset: self.last.map(|e| e.last_offset()),
            last_enqueued_ms: self.last.map(|e| e.batch.enqueued_ms),
            is_empty: begin >= next,
        }
    }

    pub(crate) fn resolve(&self, from: &Position) -> i64 {
        let begin = self.begin();
        let next = self.next_seq();
        match *from {
            Position::Earliest => begin,
            Position::Latest => next,
            Position::Sequence {
                sequence,
                inclusive,
            } => {
                let cursor = if inclusive {
                    sequence
                } else {
                    sequence.saturating_add(1)
                };
                cursor.clamp(begin, next)
            }
            Position::Offset { offset, inclusive } => {
                let Some(target) = (if inclusive {
                    Some(offset)
                } else {
                    offset.checked_add(1)
                }) else {
                    return next;
                };
                // The first message whose last event is at or past the target holds the
                // first event at or past it.
                let k = self.entries.partition_point(|e| e.last_offset() < target);
                let Some(entry) = self.entries.get(k) else {
                    return next;
                };
                let (stream_seq, index) = wire::split_offset(target);
                let skip = if stream_seq == entry.stream_seq {
                    // An odd offset falls after event `index`: it starts at the next one.
                    index + (target & 1)
                } else {
                    0
                };
                entry.batch.first_seq + skip as i64
            }
            Position::EnqueuedTime { ms, inclusive } => {
                // A message's events share its time, and times never decrease.
                let k = self.entries.partition_point(|e| {
                    if inclusive {
                        e.batch.enqueued_ms < ms
                    } else {
                        e.batch.enqueued_ms <= ms
                    }
                });
                self.entries.get(k).map_or(next, |e| e.batch.first_seq)
            }
        }
    }

    /// Up to `limit` messages holding the events from `next` on (from the oldest retained one
    /// when `next` is older), each with its cached payload if it has one.
    pub(crate) fn from(&self, next: i64, limit: usize) -> Vec<(Entry, Option<Bytes>)> {
        let k = self.entries.partition_point(|e| e.batch.end_seq() <= next);
        self.entries
            .range(k..)
            .take(limit)
            .map(|entry| (*entry, self.cached(entry.stream_seq)))
            .collect()
    }

    /// Whether the view still lists the message at `stream_seq`.
    pub(crate) fn holds(&self, stream_seq: u64) -> bool {
        let k = self.entries.partition_point(|e| e.stream_seq < stream_seq);
        self.entries
            .get(k)
            .is_some_and(|e| e.stream_seq == stream_seq)
    }

    fn cached(&self, stream_seq: u64) -> Option<Bytes> {
        let k = self.cache.partition_point(|(seq, _)| *seq < stream_seq);
        self.cache
            .get(k)
            .filter(|(seq, _)| *seq == stream_seq)
            .map(|(_, payload)| payload.clone())
    }

    /// The whole segments retention drops, oldest first and never the newest (active) one:
    /// those whose newest event is older than `cutoff_ms`, and those that keep the partition
    /// above `max_bytes`.
    pub(crate) fn expired(&self, cutoff_ms: i64, max_bytes: Option<u64>) -> Option<Expired> {
        let active = self.last?.batch.segment;
        let mut remaining = self.bytes;
        let mut events = 0u64;
        let mut k = 0;
        while let Some(first) = self.entries.get(k) {
            let segment = first.batch.segment;
            if segment == active {
                break;
            }
            let end = k + self
                .entries
                .range(k..)
                .take_while(|e| e.batch.segment == segment)
                .count();
            let newest = self.entries[end - 1].batch.enqueued_ms;
            let old = newest < cutoff_ms;
            let over = max_bytes.is_some_and(|max| remaining > max);
            if !(old || over) {
                break;
            }
            for entry in self.entries.range(k..end) {
                remaining -= entry.batch.bytes;
                events += u64::from(entry.batch.count);
            }
            k = end;
        }
        let keep = self.entries.get(k)?;
        (k > 0).then_some(Expired {
            keep_from: keep.stream_seq,
            events,
        })
    }
}

/// Wakes tailing readers: per partition, a watch of the next sequence number to be seen and
/// whether the log closed. Published after the view holds the message, so a woken reader
/// finds it.
#[derive(Debug)]
pub(crate) struct Tails {
    partitions: Vec<watch::Sender<(i64, bool)>>,
}

impl Tails {
    pub(crate) fn new(partitions: u32) -> Self {
        Tails {
            partitions: (0..partitions)
                .map(|_| watch::Sender::new((0, false)))
                .collect(),
        }
    }

    pub(crate) fn publish(&self, partition: u32, next: i64) {
        if let Some(sender) = self.partitions.get(partition as usize) {
            sender.send_if_modified(|(known, _)| {
                let newer = next > *known;
                *known = (*known).max(next);
                newer
            });
        }
    }

    pub(crate) fn close(&self) {
        for sender in &self.partitions {
            sender.send_modify(|(_, closed)| *closed = true);
        }
    }

    pub(crate) async fn wait_for(&self, partition: u32, next: i64) -> Result<()> {
        let Some(sender) = self.partitions.get(partition as usize) else {
            return Err(Error::UnknownPartition(partition));
        };
        let mut receiver = sender.subscribe();
        // The sender lives as long as `self`, so the wait cannot see it dropped.
        let (known, _) = *receiver
            .wait_for(|(known, closed)| *known > next || *closed)
            .await
            .map_err(|_| Error::Closed)?;
        if known > next {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(previous: Option<&Entry>, count: u32, bytes: u64, ms: i64) -> Batch {
        Batch::next(previous.map(|e| &e.batch), count, bytes, ms, 100)
    }

    /// Messages at stream sequences 10, 12, 15, 20 with 2, 1, 3, 1 events of 40 bytes each
    /// message, times 100, 200, 200, 300; segments of 100 bytes: [10, 12], [15, 20].
    fn sample() -> View {
        let mut view = View::new(1_000);
        for (stream_seq, count, ms) in [(10, 2, 100), (12, 1, 200), (15, 3, 200), (20, 1, 300)] {
            let b = batch(view.last().as_ref(), count, 40, ms);
            assert!(view.insert(
                Entry {
                    stream_seq,
                    batch: b
                },
                None
            ));
        }
        view
    }

    #[test]
    fn info_and_numbering() {
        let view = sample();
        let info = view.info();
        assert_eq!((info.begin_sequence, info.last_sequence), (0, 6));
        assert_eq!(info.last_offset, Some(wire::offset(20, 0)));
        assert_eq!(info.last_enqueued_ms, Some(300));
        let mut view = view;
        let again = view.last().unwrap();
        assert!(!view.insert(again, None), "a message seen twice");
    }

    #[test]
    fn resolves_offsets_and_times() {
        let view = sample();
        let at = |offset, inclusive| view.resolve(&Position::Offset { offset, inclusive });
        assert_eq!(at(0, true), 0);
        assert_eq!(at(wire::offset(10, 1), true), 1);
        assert_eq!(at(wire::offset(10, 1), false), 2);
        assert_eq!(at(wire::offset(10, 0) + 1, true), 1);
        assert_eq!(at(wire::offset(11, 0), true), 2);
        assert_eq!(at(wire::offset(15, 2), true), 5);
        assert_eq!(at(wire::offset(15, 2), false), 6);
        assert_eq!(at(wire::offset(20, 0), false), 7);
        assert_eq!(at(u64::MAX, false), 7);
        let time = |ms, inclusive| view.resolve(&Position::EnqueuedTime { ms, inclusive });
        assert_eq!(time(200, true), 2);
        assert_eq!(time(200, false), 6);
        assert_eq!(time(301, true), 7);
    }

    #[test]
    fn retention_drops_whole_segments() {
        let mut view = sample();
        assert_eq!(view.expired(0, None), None);
        assert_eq!(
            view.expired(1_000, None),
            Some(Expired {
                keep_from: 15,
                events: 3
            }),
            "never the active segment"
        );
        assert_eq!(view.expired(0, Some(100)), view.expired(1_000, None));
        assert_eq!(view.expired(0, Some(160)), None);
        view.trim_before(15);
        assert_eq!(view.info().begin_sequence, 3);
        assert_eq!(view.expired(1_000, None), None);
        assert_eq!(view.from(0, 10).len(), 2);
        assert_eq!(view.from(6, 10)[0].0.stream_seq, 20);
    }

    #[test]
    fn tail_cache_is_bounded() {
        let mut view = View::new(10);
        view.cache_payload(1, Bytes::from_static(b"123456"));
        view.cache_payload(2, Bytes::from_static(b"123456"));
        assert!(view.cached(1).is_none());
        assert!(view.cached(2).is_some());
        view.cache_payload(3, Bytes::from_static(b"12345678901"));
        assert!(view.cached(3).is_none(), "larger than the whole cache");
    }
}

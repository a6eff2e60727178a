//! The hub's durable, partitioned, append-only event log behind one [`EventLog`] trait.
//!
//! IoT Hub keeps device-to-cloud telemetry in an Event Hub: partitions, per-partition sequence
//! numbers from 0, byte offsets, enqueued times and retention. This crate is that log, with no
//! sockets: the hub appends encoded messages (opaque bytes) and readers tail partitions from a
//! [`Position`]. Backends: [`DiskLog`] (embedded, on disk, the default) and [`MemoryLog`] (unit
//! tests of other crates). Every backend must pass the one conformance suite in
//! [`conformance`].

mod clock;
mod disk;
mod index;
mod memory;
mod record;
mod tail;

pub mod conformance;

pub use clock::{Clock, ManualClock, SystemClock};
pub use disk::{DiskLog, LogStats};
pub use memory::MemoryLog;
pub use record::RECORD_OVERHEAD;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a writer appends: opaque bytes (the hub encodes the message; the log never looks inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub data: Bytes,
}

impl NewEvent {
    pub fn new(data: impl Into<Bytes>) -> Self {
        NewEvent { data: data.into() }
    }
}

/// What the log assigned to one event on append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub sequence: i64,
    pub offset: u64,
    pub enqueued_ms: i64,
}

/// One event as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub sequence: i64,
    pub offset: u64,
    pub enqueued_ms: i64,
    pub data: Bytes,
}

/// Where a reader starts, resolved to a cursor by [`EventLog::resolve`].
///
/// Every form is clamped to the retained range: a cursor before the oldest retained event
/// starts there, one past the newest waits for the next append (it never skips sequence
/// numbers that have not been assigned yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The oldest retained event.
    Earliest,
    /// Only events appended after the position is resolved.
    Latest,
    /// The event at `offset` (inclusive) or the first after it. An offset that falls between
    /// records starts at the next record either way. Event Hubs' offset `-1` means
    /// [`Position::Earliest`]; the caller maps it.
    Offset { offset: u64, inclusive: bool },
    /// The event with this sequence number (inclusive) or the one after it.
    Sequence { sequence: i64, inclusive: bool },
    /// The first event enqueued after (or at, if inclusive) this time, in ms since the epoch.
    EnqueuedTime { ms: i64, inclusive: bool },
}

/// A partition's retained range, as Event Hubs' partition properties report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The first retained sequence number; the next to be assigned when the partition is empty.
    pub begin_sequence: i64,
    /// The last sequence number assigned; -1 when nothing was ever appended. It stays put when
    /// retention empties the partition.
    pub last_sequence: i64,
    /// The offset of the event at `last_sequence`; `None` when nothing was ever appended (or,
    /// on disk, when that event's segment was lost to a damaged file).
    pub last_offset: Option<u64>,
    /// The enqueued time of the event at `last_sequence`, under the same conditions.
    pub last_enqueued_ms: Option<i64>,
    /// No retained events (`begin_sequence > last_sequence`).
    pub is_empty: bool,
}

/// What can go wrong in an event log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown partition {0}")]
    UnknownPartition(u32),
    /// One event's data is above [`LogOptions::max_event_bytes`]; nothing of its batch was
    /// appended.
    #[error("event of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// I/O failed (a full disk, a failed fsync): the events of the failed append were not
    /// stored, and the hub must refuse the publish rather than acknowledge it. A retry later
    /// may succeed. The text is for logs, not clients.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// The log was closed.
    #[error("event log is closed")]
    Closed,
    /// Stored data cannot be read back (a damaged file). The text is for logs.
    #[error("event log is corrupt: {0}")]
    Corrupt(String),
    /// The directory was made for another number of partitions; partitions cannot be changed
    /// in place because every device's partition would move.
    #[error("the event log has {found} partitions on disk, {expected} were asked for")]
    PartitionMismatch { found: u32, expected: u32 },
    #[error("invalid event log options: {0}")]
    InvalidOptions(String),
}

/// The most partitions a log may have (Event Hubs' standard tier limit).
pub const MAX_PARTITIONS: u32 = 32;

/// How a log is laid out and how long it keeps events.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Number of partitions, 1..=[`MAX_PARTITIONS`]. Fixed for the life of a disk log.
    pub partitions: u32,
    /// Segments whose newest event is older than this are dropped by
    /// [`EventLog::enforce_retention`].
    pub retention: Duration,
    /// Per partition: while a partition's segments hold more bytes than this (records,
    /// [`RECORD_OVERHEAD`] included), its oldest segments are dropped. `None`: no size limit.
    pub retention_bytes: Option<u64>,
    /// A segment is sealed and a new one started when the next record would take it past this
    /// many bytes (a single larger record gets a segment of its own). Retention drops whole
    /// segments, so this is also its granularity.
    pub segment_bytes: u64,
    /// The largest event data accepted; larger ones fail with [`Error::TooLarge`].
    pub max_event_bytes: usize,
    /// Per partition, how many bytes of the newest events a disk log keeps in memory so that
    /// tailing readers are served without touching the disk. 0 turns the cache off.
    pub tail_cache_bytes: usize,
    /// Where enqueued times come from; tests inject a [`ManualClock`].
    pub clock: Arc<dyn Clock>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            partitions: 4,
            retention: Duration::from_secs(24 * 60 * 60),
            retention_bytes: None,
            segment_bytes: 64 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            tail_cache_bytes: 1024 * 1024,
            clock: Arc::new(SystemClock),
        }
    }
}

/// The largest segment size accepted: positions inside a segment are kept as `u32`.
const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// The largest event size accepted: a record's length field is a `u32`.
const MAX_EVENT_BYTES: usize = 256 * 1024 * 1024;

impl LogOptions {
    fn validate(&self) -> Result<()> {
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(Error::InvalidOptions(format!(
                "partitions must be 1..={MAX_PARTITIONS}, not {}",
                self.partitions
            )));
        }
        if !(1..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(Error::InvalidOptions(format!(
                "segment_bytes must be 1..={MAX_SEGMENT_BYTES}, not {}",
                self.segment_bytes
            )));
        }
        if self.max_event_bytes > MAX_EVENT_BYTES {
            return Err(Error::InvalidOptions(format!(
                "max_event_bytes must be at most {MAX_EVENT_BYTES}, not {}",
                self.max_event_bytes
            )));
        }
        Ok(())
    }

    fn retention_ms(&self) -> i64 {
        i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX)
    }

    fn check_sizes(&self, events: &[NewEvent]) -> Result<()> {
        match events
            .iter()
            .find(|event| event.data.len() > self.max_event_bytes)
        {
            Some(event) => Err(Error::TooLarge {
                size: event.data.len(),
                max: self.max_event_bytes,
            }),
            None => Ok(()),
        }
    }
}

/// Durable, partitioned, append-only storage of events.
///
/// Per partition, sequence numbers start at 0 and increase by one per event, offsets strictly
/// increase, and enqueued times never decrease; none of them is reused after a restart.
/// Reads see every event whose `append` has returned.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    fn partition_count(&self) -> u32;

    /// Appends the events, in order and with consecutive sequence numbers, to one partition,
    /// and returns what was assigned to each only once they are durable (fsynced, for a disk
    /// backend). Concurrent appends, to one or several partitions, are group-committed: many
    /// callers share one fsync. Fails as a whole: [`Error::TooLarge`] before anything is
    /// written, [`Error::Unavailable`] when the write did not become durable.
    async fn append(&self, partition: u32, events: Vec<NewEvent>) -> Result<Vec<Appended>>;

    fn info(&self, partition: u32) -> Result<PartitionInfo>;

    /// Resolves a [`Position`] to a cursor: the sequence number of the next event to deliver.
    /// [`Position::Latest`] is the last sequence number + 1 at the time of the call.
    fn resolve(&self, partition: u32, from: &Position) -> Result<i64>;

    /// Up to `max_events` events with sequence >= `next`, in order, without waiting; their
    /// data adds up to at most `max_bytes`, except that the first event is returned whatever
    /// its size. If `next` is older than the retained range, reading starts at the oldest
    /// retained event (the returned sequence numbers say where). Empty when there is nothing
    /// at or after `next` yet.
    async fn read(
        &self,
        partition: u32,
        next: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>>;

    /// Completes with `Ok` when the partition holds an event with sequence >= `next` (at once
    /// if it already does), or with [`Error::Closed`] when the log closes first. Woken by
    /// appends, never by polling.
    async fn wait_for(&self, partition: u32, next: i64) -> Result<()>;

    /// Drops whole old segments, oldest first and never a partition's newest (active) one:
    /// those whose newest event is older than `now_ms - retention`, and those that keep a
    /// partition above `retention_bytes`. Returns how many events were dropped. Readers at
    /// older cursors continue at the oldest retained event.
    async fn enforce_retention(&self, now_ms: i64) -> Result<u64>;

    /// Finishes pending appends, refuses later ones with [`Error::Closed`] and wakes every
    /// `wait_for`. Reads keep working on what was stored.
    async fn close(&self);
}

/// The partition a device's events go to: FNV-1a (32 bit) of the device id's UTF-8 bytes,
/// modulo `partitions` (0 is taken as 1).
///
/// This function must never change: a device's events must land in one partition across
/// restarts and versions, or readers would see them out of order. Its outputs are pinned by
/// a test.
pub fn partition_for(device_id: &str, partitions: u32) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = device_id.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    });
    hash % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_for_is_pinned() {
        // FNV-1a 32 reference values (from the FNV test suite; all below u32::MAX, so the modulo keeps them); if any of these
        // changes, devices move partitions on upgrade.
        assert_eq!(partition_for("", u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_for("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_for("foobar", u32::MAX), 0xbf9c_f968);
        let pinned: Vec<u32> = ["device-1", "device-2", "thermostat-42", "Ωmega", ""]
            .iter()
            .map(|id| partition_for(id, 4))
            .collect();
        assert_eq!(pinned, [1, 0, 1, 2, 1]);
        assert_eq!(partition_for("device-1", 32), 17);
    }

    #[test]
    fn partition_for_stays_in_range() {
        for partitions in 1..=MAX_PARTITIONS {
            for i in 0..200 {
                assert!(partition_for(&format!("dev-{i}"), partitions) < partitions);
            }
        }
        assert_eq!(partition_for("anything", 0), 0);
    }

    #[test]
    fn options_are_validated() {
        let ok = LogOptions::default();
        assert!(ok.validate().is_ok());
        for bad in [
            LogOptions {
                partitions: 0,
                ..LogOptions::default()
            },
            LogOptions {
                partitions: 33,
                ..LogOptions::default()
            },
            LogOptions {
                segment_bytes: 0,
                ..LogOptions::default()
            },
            LogOptions {
                max_event_bytes: MAX_EVENT_BYTES + 1,
                ..LogOptions::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::InvalidOptions(_))));
        }
    }
}

//! The conformance suite: the behaviour every [`EventLog`] backend must show, as reusable cases.
//!
//! Each case is a public async function taking a [`Factory`], which opens a fresh, empty log
//! with the options the case asks for (a case may need small segments, a size limit or a
//! [`ManualClock`]); failures panic, as test code does. A backend crate runs them all with
//! [`eventlog_conformance_tests!`](crate::eventlog_conformance_tests), which expands to one
//! `#[tokio::test]` per case so each is reported (and can be filtered) on its own.
//!
//! ```no_run
//! mod memory {
//!     use std::sync::Arc;
//!     twinhub_eventlog::eventlog_conformance_tests!(|options| async move {
//!         (Arc::new(twinhub_eventlog::MemoryLog::new(options).unwrap()), ())
//!     });
//! }
//! ```
//!
//! The factory returns the log and a guard kept alive for the whole case (a temporary
//! directory, a stream to delete). The invoking crate needs `tokio` (with `macros` and
//! `rt-multi-thread`) among its dev-dependencies.
//!
//! What the suite assumes of retention, so that a backend without segments of its own may
//! pass: a segment holds at most `segment_bytes` of event data, so at most
//! `segment_bytes / size` events of one size; events newer than the retention are never
//! dropped; and a partition over `retention_bytes` keeps at least `retention_bytes -
//! segment_bytes` of event data.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{
    Appended, Error, EventLog, LogOptions, ManualClock, NewEvent, PartitionInfo, Position,
    StoredEvent,
};

/// Opens a fresh, empty log for one case.
pub trait Factory {
    /// The backend under test.
    type Log: EventLog;
    /// Whatever must outlive the log (dropped after it).
    type Guard: Send + 'static;

    fn open(&self, options: LogOptions) -> impl Future<Output = (Arc<Self::Log>, Self::Guard)>;
}

impl<F, Fut, L, G> Factory for F
where
    F: Fn(LogOptions) -> Fut,
    Fut: Future<Output = (Arc<L>, G)>,
    L: EventLog,
    G: Send + 'static,
{
    type Log = L;
    type Guard = G;

    fn open(&self, options: LogOptions) -> impl Future<Output = (Arc<L>, G)> {
        self(options)
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each with the factory `$factory`.
///
/// Invoke it inside its own module per backend: the generated test functions are named after
/// the cases, so two invocations in one module would collide.
#[macro_export]
macro_rules! eventlog_conformance_tests {
    ($factory:expr) => {
        $crate::eventlog_conformance_tests!(@cases $factory;
            numbering_starts_at_zero_per_partition,
            enqueued_time_never_goes_back,
            info_of_empty_and_filled_partitions,
            earliest_and_latest,
            sequence_positions,
            offset_positions,
            enqueued_time_positions,
            reads_respect_limits,
            reads_cross_segments,
            data_round_trips,
            wait_for_returns_at_once_when_an_event_is_there,
            wait_for_wakes_on_append,
            wait_for_wakes_on_close,
            partitions_are_independent,
            unknown_partition_is_refused,
            too_large_events_are_refused_whole,
            empty_append_changes_nothing,
            retention_by_age_drops_old_segments,
            retention_by_bytes_drops_old_segments,
            concurrent_appenders_get_distinct_sequences,
            append_after_close_is_refused,
            close_settles_pending_appends,
        );
    };
    (@cases $factory:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case($factory).await;
            }
        )+
    };
}

/// How long something that must happen may take (generous: CI machines are slow).
const SOON: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(50);
/// A plausible wall-clock time for manual clocks (2023-11-14).
const T0: i64 = 1_700_000_000_000;

fn options() -> LogOptions {
    LogOptions {
        partitions: 4,
        segment_bytes: 4096,
        ..LogOptions::default()
    }
}

fn clocked(clock: &Arc<ManualClock>) -> LogOptions {
    LogOptions {
        clock: Arc::clone(clock) as _,
        ..options()
    }
}

fn events<I, D>(data: I) -> Vec<NewEvent>
where
    I: IntoIterator<Item = D>,
    D: Into<Bytes>,
{
    data.into_iter().map(NewEvent::new).collect()
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<NewEvent> {
    events(range.map(|i| format!("{prefix}-{i}")))
}

fn sized(count: usize, size: usize) -> Vec<NewEvent> {
    events((0..count).map(|i| vec![i as u8; size]))
}

async fn must_append<L: EventLog>(log: &L, partition: u32, events: Vec<NewEvent>) -> Vec<Appended> {
    let count = events.len();
    match log.append(partition, events).await {
        Ok(appended) => {
            assert_eq!(appended.len(), count, "one Appended per event");
            appended
        }
        Err(e) => panic!("append of {count} events to partition {partition} failed: {e}"),
    }
}

async fn must_read<L: EventLog>(
    log: &L,
    partition: u32,
    next: i64,
    max_events: usize,
    max_bytes: usize,
) -> Vec<StoredEvent> {
    match log.read(partition, next, max_events, max_bytes).await {
        Ok(events) => events,
        Err(e) => panic!("read of partition {partition} from {next} failed: {e}"),
    }
}

async fn read_all<L: EventLog>(log: &L, partition: u32, next: i64) -> Vec<StoredEvent> {
    must_read(log, partition, next, usize::MAX, usize::MAX).await
}

fn must_info<L: EventLog>(log: &L, partition: u32) -> PartitionInfo {
    match log.info(partition) {
        Ok(info) => info,
        Err(e) => panic!("info of partition {partition} failed: {e}"),
    }
}

fn must_resolve<L: EventLog>(log: &L, partition: u32, from: Position) -> i64 {
    match log.resolve(partition, &from) {
        Ok(cursor) => cursor,
        Err(e) => panic!("resolve of {from:?} in partition {partition} failed: {e}"),
    }
}

fn sequences(events: &[StoredEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

/// Asserts what was read is what was appended, event for event.
fn assert_matches(read: &[StoredEvent], appended: &[Appended], data: &[NewEvent]) {
    assert_eq!(read.len(), appended.len(), "number of events read back");
    for ((got, want), sent) in read.iter().zip(appended).zip(data) {
        assert_eq!(
            (got.sequence, got.offset, got.enqueued_ms),
            (want.sequence, want.offset, want.enqueued_ms),
            "read back differs from what append assigned"
        );
        assert_eq!(got.data, sent.data, "data of sequence {}", got.sequence);
    }
}

/// Sequence numbers start at 0 in every partition and go up by one per event, within a batch
/// and across batches; offsets strictly increase; enqueued times never decrease; reads return
/// exactly what append assigned.
pub async fn numbering_starts_at_zero_per_partition<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    let first = numbered("p0", 0..3);
    let a = must_append(&*log, 0, first.clone()).await;
    let second = numbered("p1", 0..2);
    let b1 = must_append(&*log, 1, second[..1].to_vec()).await;
    let b2 = must_append(&*log, 1, second[1..].to_vec()).await;
    let third = numbered("p0", 3..5);
    let a2 = must_append(&*log, 0, third.clone()).await;

    let p0: Vec<Appended> = a.iter().chain(&a2).copied().collect();
    let p1: Vec<Appended> = b1.iter().chain(&b2).copied().collect();
    assert_eq!(
        p0.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(p1.iter().map(|a| a.sequence).collect::<Vec<_>>(), [0, 1]);
    for run in [&p0, &p1] {
        for pair in run.windows(2) {
            assert!(
                pair[0].offset < pair[1].offset,
                "offsets must increase: {pair:?}"
            );
            assert!(
                pair[0].enqueued_ms <= pair[1].enqueued_ms,
                "enqueued times must not decrease: {pair:?}"
            );
        }
    }

    let all: Vec<NewEvent> = first.into_iter().chain(third).collect();
    assert_matches(&read_all(&*log, 0, 0).await, &p0, &all);
    assert_matches(&read_all(&*log, 1, 0).await, &p1, &second);
    assert!(read_all(&*log, 2, 0).await.is_empty());
}

/// Enqueued times come from the log's clock at append, but never go below the last one even
/// when the clock steps back; events of one batch share one time.
pub async fn enqueued_time_never_goes_back<F: Factory>(factory: F) {
    let clock = Arc::new(ManualClock::new(T0));
    let (log, _guard) = factory.open(clocked(&clock)).await;
    let a = must_append(&*log, 0, numbered("a", 0..2)).await;
    assert_eq!([a[0].enqueued_ms, a[1].enqueued_ms], [T0, T0]);
    clock.set(T0 - 60_000);
    let b = must_append(&*log, 0, numbered("b", 0..1)).await;
    assert_eq!(
        b[0].enqueued_ms, T0,
        "the clock stepped back; the log must not"
    );
    clock.set(T0 + 5_000);
    let c = must_append(&*log, 0, numbered("c", 0..1)).await;
    assert_eq!(c[0].enqueued_ms, T0 + 5_000);
    // Another partition has its own floor.
    clock.set(T0 - 1_000);
    let d = must_append(&*log, 1, numbered("d", 0..1)).await;
    assert!(d[0].enqueued_ms >= T0 - 1_000);
    let times: Vec<i64> = read_all(&*log, 0, 0)
        .await
        .iter()
        .map(|e| e.enqueued_ms)
        .collect();
    assert_eq!(times, [T0, T0, T0, T0 + 5_000]);
}

/// An empty partition reports begin 0, last -1 and is empty; after appends, the last event.
pub async fn info_of_empty_and_filled_partitions<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    assert_eq!(log.partition_count(), 4);
    for partition in 0..4 {
        assert_eq!(
            must_info(&*log, partition),
            PartitionInfo {
                begin_sequence: 0,
                last_sequence: -1,
                last_offset: None,
                last_enqueued_ms: None,
                is_empty: true,
            },
            "partition {partition}"
        );
    }
    let appended = must_append(&*log, 2, numbered("x", 0..5)).await;
    let last = appended[4];
    assert_eq!(
        must_info(&*log, 2),
        PartitionInfo {
            begin_sequence: 0,
            last_sequence: 4,
            last_offset: Some(last.offset),
            last_enqueued_ms: Some(last.enqueued_ms),
            is_empty: false,
        }
    );
    assert!(must_info(&*log, 3).is_empty);
}

/// Earliest is the oldest retained event; Latest delivers only events appended after it was
/// resolved.
pub async fn earliest_and_latest<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    assert_eq!(must_resolve(&*log, 0, Position::Earliest), 0);
    assert_eq!(must_resolve(&*log, 0, Position::Latest), 0);
    must_append(&*log, 0, numbered("old", 0..3)).await;
    assert_eq!(must_resolve(&*log, 0, Position::Earliest), 0);
    let latest = must_resolve(&*log, 0, Position::Latest);
    assert_eq!(latest, 3);
    assert!(read_all(&*log, 0, latest).await.is_empty());
    let fresh = numbered("new", 0..2);
    let appended = must_append(&*log, 0, fresh.clone()).await;
    assert_matches(&read_all(&*log, 0, latest).await, &appended, &fresh);
    assert_eq!(sequences(&read_all(&*log, 0, 0).await), [0, 1, 2, 3, 4]);
}

/// Sequence positions, inclusive and exclusive; before the start they clamp to the oldest,
/// past the end to the next to be assigned (and the reader waits for it).
pub async fn sequence_positions<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    let at = |sequence, inclusive| Position::Sequence {
        sequence,
        inclusive,
    };
    assert_eq!(must_resolve(&*log, 0, at(0, true)), 0);
    assert_eq!(
        must_resolve(&*log, 0, at(7, true)),
        0,
        "past the end of an empty partition"
    );
    must_append(&*log, 0, numbered("e", 0..5)).await;
    assert_eq!(must_resolve(&*log, 0, at(2, true)), 2);
    assert_eq!(must_resolve(&*log, 0, at(2, false)), 3);
    assert_eq!(must_resolve(&*log, 0, at(0, false)), 1);
    assert_eq!(must_resolve(&*log, 0, at(-5, true)), 0);
    assert_eq!(must_resolve(&*log, 0, at(-1, false)), 0);
    assert_eq!(must_resolve(&*log, 0, at(4, true)), 4);
    assert_eq!(must_resolve(&*log, 0, at(4, false)), 5);
    assert_eq!(must_resolve(&*log, 0, at(100, true)), 5);
    assert_eq!(must_resolve(&*log, 0, at(i64::MAX, false)), 5);

    let cursor = must_resolve(&*log, 0, at(4, false));
    let waiter = {
        let log = Arc::clone(&log);
        tokio::spawn(async move { log.wait_for(0, cursor).await })
    };
    tokio::time::sleep(QUIET).await;
    assert!(
        !waiter.is_finished(),
        "wait_for past the end returned before an append"
    );
    must_append(&*log, 0, numbered("e", 5..6)).await;
    match tokio::time::timeout(SOON, waiter).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("wait_for did not wake on append: {other:?}"),
    }
    let read = read_all(&*log, 0, cursor).await;
    assert_eq!(sequences(&read), [5]);
    assert_eq!(read[0].data, Bytes::from("e-5"));
}

/// Offset positions: the event at an offset (inclusive) or the next; an offset between records
/// starts at the next record; past the end, at the next to be assigned.
pub async fn offset_positions<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    let at = |offset, inclusive| Position::Offset { offset, inclusive };
    assert_eq!(must_resolve(&*log, 0, at(0, true)), 0);
    let appended = must_append(&*log, 0, numbered("event", 0..5)).await;
    let offset = |i: usize| appended[i].offset;
    assert_eq!(must_resolve(&*log, 0, at(offset(0), true)), 0);
    assert_eq!(must_resolve(&*log, 0, at(offset(0), false)), 1);
    assert_eq!(must_resolve(&*log, 0, at(offset(2), true)), 2);
    assert_eq!(must_resolve(&*log, 0, at(offset(2), false)), 3);
    assert_eq!(must_resolve(&*log, 0, at(offset(2) + 1, true)), 3);
    assert_eq!(must_resolve(&*log, 0, at(offset(2) + 1, false)), 3);
    assert_eq!(must_resolve(&*log, 0, at(offset(4), true)), 4);
    assert_eq!(must_resolve(&*log, 0, at(offset(4), false)), 5);
    assert_eq!(must_resolve(&*log, 0, at(u64::MAX, true)), 5);
    if offset(0) > 0 {
        assert_eq!(must_resolve(&*log, 0, at(0, false)), 0);
    }
    // Offsets are per partition: another partition's offsets resolve there on their own.
    let other = must_append(&*log, 1, numbered("other", 0..2)).await;
    assert_eq!(must_resolve(&*log, 1, at(other[1].offset, true)), 1);
    let read = read_all(&*log, 0, must_resolve(&*log, 0, at(offset(3), true))).await;
    assert_eq!(sequences(&read), [3, 4]);
    assert_eq!(read[0].offset, offset(3));
}

/// Enqueued-time positions: before every event, all of them; after every event, none yet;
/// at an event's time, that event (inclusive) or the first later one (exclusive).
pub async fn enqueued_time_positions<F: Factory>(factory: F) {
    let clock = Arc::new(ManualClock::new(T0 + 1_000));
    let (log, _guard) = factory.open(clocked(&clock)).await;
    let at = |ms, inclusive| Position::EnqueuedTime { ms, inclusive };
    assert_eq!(must_resolve(&*log, 0, at(0, true)), 0);
    must_append(&*log, 0, numbered("a", 0..1)).await;
    clock.set(T0 + 2_000);
    must_append(&*log, 0, numbered("b", 0..2)).await;
    clock.set(T0 + 3_000);
    must_append(&*log, 0, numbered("c", 0..1)).await;

    assert_eq!(must_resolve(&*log, 0, at(0, true)), 0, "before all: all");
    assert_eq!(must_resolve(&*log, 0, at(T0, false)), 0);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 1_000, true)), 0);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 1_000, false)), 1);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 1_500, true)), 1);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 1_500, false)), 1);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 2_000, true)), 1);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 2_000, false)), 3);
    assert_eq!(must_resolve(&*log, 0, at(T0 + 3_000, true)), 3);
    assert_eq!(
        must_resolve(&*log, 0, at(T0 + 3_000, false)),
        4,
        "after all: none yet"
    );
    assert_eq!(must_resolve(&*log, 0, at(i64::MAX, true)), 4);

    let cursor = must_resolve(&*log, 0, at(T0 + 9_000, true));
    assert!(read_all(&*log, 0, cursor).await.is_empty());
    clock.set(T0 + 10_000);
    must_append(&*log, 0, numbered("d", 0..1)).await;
    assert_eq!(sequences(&read_all(&*log, 0, cursor).await), [4]);
}

/// Reads return at most `max_events`, and at most `max_bytes` of data except that the first
/// event always comes; nothing at or past the end.
pub async fn reads_respect_limits<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    must_append(&*log, 0, sized(10, 100)).await;
    assert_eq!(
        sequences(&must_read(&*log, 0, 0, 3, usize::MAX).await),
        [0, 1, 2]
    );
    assert_eq!(
        sequences(&must_read(&*log, 0, 4, 3, usize::MAX).await),
        [4, 5, 6]
    );
    assert_eq!(sequences(&must_read(&*log, 0, 0, 100, 250).await), [0, 1]);
    assert_eq!(sequences(&must_read(&*log, 0, 0, 100, 200).await), [0, 1]);
    assert_eq!(sequences(&must_read(&*log, 0, 0, 100, 199).await), [0]);
    assert_eq!(
        sequences(&must_read(&*log, 0, 3, 100, 1).await),
        [3],
        "the first always comes"
    );
    assert_eq!(sequences(&must_read(&*log, 0, 3, 100, 0).await), [3]);
    assert!(must_read(&*log, 0, 0, 0, usize::MAX).await.is_empty());
    assert_eq!(
        sequences(&must_read(&*log, 0, 8, 100, usize::MAX).await),
        [8, 9]
    );
    assert!(must_read(&*log, 0, 10, 100, usize::MAX).await.is_empty());
    assert!(must_read(&*log, 0, 1_000, 100, usize::MAX).await.is_empty());
    assert_eq!(
        sequences(&must_read(&*log, 0, -3, 2, usize::MAX).await),
        [0, 1]
    );

    // Paging with the last sequence seen visits every event once.
    let mut next = 0;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let page = must_read(&*log, 0, next, 3, 250).await;
        let Some(last) = page.last() else { break };
        next = last.sequence + 1;
        seen.extend(sequences(&page));
    }
    assert_eq!(seen, (0..10).collect::<Vec<i64>>());
}

/// Many small segments: reads from any point, of any length, see every event in order.
pub async fn reads_cross_segments<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    let mut sent = Vec::new();
    let mut appended = Vec::new();
    for batch in 0..10 {
        let data: Vec<NewEvent> = (0..7)
            .map(|i| NewEvent::new(format!("{batch}-{i}-{}", "x".repeat(300 + 37 * i))))
            .collect();
        appended.extend(must_append(&*log, 0, data.clone()).await);
        sent.extend(data);
    }
    assert_matches(&read_all(&*log, 0, 0).await, &appended, &sent);
    for start in [0usize, 1, 13, 35, 69] {
        for count in [1usize, 5, 30] {
            let read = must_read(&*log, 0, start as i64, count, usize::MAX).await;
            let end = (start + count).min(sent.len());
            assert_matches(&read, &appended[start..end], &sent[start..end]);
        }
    }
    for (i, a) in appended.iter().enumerate() {
        let from = Position::Offset {
            offset: a.offset,
            inclusive: true,
        };
        assert_eq!(must_resolve(&*log, 0, from), i as i64);
    }
}

/// Event data comes back byte for byte: empty, binary, and as large as allowed.
pub async fn data_round_trips<F: Factory>(factory: F) {
    let (log, _guard) = factory
        .open(LogOptions {
            max_event_bytes: 64 * 1024,
            ..options()
        })
        .await;
    let all_bytes: Vec<u8> = (0..=255).collect();
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let sent = events([
        Vec::new(),
        all_bytes,
        vec![0; 1],
        big.clone(),
        b"tail".to_vec(),
    ]);
    let appended = must_append(&*log, 3, sent.clone()).await;
    assert_matches(&read_all(&*log, 3, 0).await, &appended, &sent);
    let one = must_read(&*log, 3, 3, 1, 1).await;
    assert_eq!(one.len(), 1);
    assert!(one[0].data == big, "a large event did not round-trip");
}

/// `wait_for` completes at once when an event at or after the cursor is already there, and
/// not while there is none.
pub async fn wait_for_returns_at_once_when_an_event_is_there<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    must_append(&*log, 0, numbered("e", 0..2)).await;
    for next in [-1, 0, 1] {
        match tokio::time::timeout(SOON, log.wait_for(0, next)).await {
            Ok(Ok(())) => {}
            other => panic!("wait_for({next}) with an event there: {other:?}"),
        }
    }
    assert!(
        tokio::time::timeout(QUIET, log.wait_for(0, 2))
            .await
            .is_err(),
        "wait_for past the end returned"
    );
    assert!(
        tokio::time::timeout(QUIET, log.wait_for(1, 0))
            .await
            .is_err(),
        "wait_for on an empty partition returned"
    );
}

/// A reader waiting past the end is woken by an append to its partition (not by appends to
/// others) and then reads the event.
pub async fn wait_for_wakes_on_append<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    must_append(&*log, 1, numbered("before", 0..3)).await;
    let cursor = must_resolve(&*log, 1, Position::Latest);
    let reader = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            log.wait_for(1, cursor).await?;
            log.read(1, cursor, 10, usize::MAX).await
        })
    };
    tokio::time::sleep(QUIET).await;
    assert!(
        !reader.is_finished(),
        "the reader woke with nothing appended"
    );
    must_append(&*log, 0, numbered("elsewhere", 0..4)).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        !reader.is_finished(),
        "an append to another partition woke the reader"
    );
    must_append(&*log, 1, numbered("after", 0..1)).await;
    match tokio::time::timeout(SOON, reader).await {
        Ok(Ok(Ok(read))) => {
            assert_eq!(sequences(&read), [3]);
            assert_eq!(read[0].data, Bytes::from("after-0"));
        }
        other => panic!("the reader was not woken by the append: {other:?}"),
    }

    // Many waiters on one partition are all woken by one append.
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.wait_for(2, 0).await })
        })
        .collect();
    tokio::time::sleep(QUIET).await;
    must_append(&*log, 2, numbered("x", 0..1)).await;
    for waiter in waiters {
        match tokio::time::timeout(SOON, waiter).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("a waiter was not woken: {other:?}"),
        }
    }
}

/// Closing the log wakes every waiter with `Closed`; a cursor with an event already there
/// still completes with `Ok`.
pub async fn wait_for_wakes_on_close<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    must_append(&*log, 0, numbered("e", 0..1)).await;
    let waiters: Vec<_> = (0..4u32)
        .map(|partition| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.wait_for(partition, 1).await })
        })
        .collect();
    tokio::time::sleep(QUIET).await;
    assert!(waiters.iter().all(|w| !w.is_finished()));
    match tokio::time::timeout(SOON, log.close()).await {
        Ok(()) => {}
        Err(_) => panic!("close did not finish"),
    }
    for waiter in waiters {
        match tokio::time::timeout(SOON, waiter).await {
            Ok(Ok(Err(Error::Closed))) => {}
            other => panic!("a waiter was not woken with Closed: {other:?}"),
        }
    }
    match tokio::time::timeout(SOON, log.wait_for(0, 5)).await {
        Ok(Err(Error::Closed)) => {}
        other => panic!("wait_for after close: {other:?}"),
    }
    match tokio::time::timeout(SOON, log.wait_for(0, 0)).await {
        Ok(Ok(())) => {}
        other => panic!("wait_for of an event there, after close: {other:?}"),
    }
}

/// Partitions number, store, report and read their events independently.
pub async fn partitions_are_independent<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    let mut sent: Vec<Vec<NewEvent>> = vec![Vec::new(); 4];
    let mut appended: Vec<Vec<Appended>> = vec![Vec::new(); 4];
    for round in 0..6usize {
        for partition in 0..4usize {
            if (round + partition) % 3 == 0 {
                continue;
            }
            let data = numbered(&format!("p{partition}r{round}"), 0..partition + 1);
            appended[partition].extend(must_append(&*log, partition as u32, data.clone()).await);
            sent[partition].extend(data);
        }
    }
    for partition in 0..4usize {
        let p = partition as u32;
        let expected: Vec<i64> = (0..sent[partition].len() as i64).collect();
        let got: Vec<i64> = appended[partition].iter().map(|a| a.sequence).collect();
        assert_eq!(got, expected, "partition {partition}");
        assert_matches(
            &read_all(&*log, p, 0).await,
            &appended[partition],
            &sent[partition],
        );
        assert_eq!(
            must_info(&*log, p).last_sequence,
            sent[partition].len() as i64 - 1
        );
    }
}

/// Every operation on a partition the log does not have fails with `UnknownPartition`.
pub async fn unknown_partition_is_refused<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    for partition in [4, 5, u32::MAX] {
        let unknown = |r: Result<(), Error>, what: &str| match r {
            Err(Error::UnknownPartition(p)) if p == partition => {}
            other => panic!("{what} on partition {partition}: {other:?}"),
        };
        unknown(
            log.append(partition, numbered("x", 0..1)).await.map(drop),
            "append",
        );
        unknown(log.info(partition).map(drop), "info");
        unknown(
            log.resolve(partition, &Position::Earliest).map(drop),
            "resolve",
        );
        unknown(log.read(partition, 0, 1, 1).await.map(drop), "read");
        match tokio::time::timeout(SOON, log.wait_for(partition, 0)).await {
            Ok(r) => unknown(r, "wait_for"),
            Err(_) => panic!("wait_for on partition {partition} waited"),
        }
    }
}

/// An event above `max_event_bytes` fails its whole batch with `TooLarge`; nothing of it is
/// stored and numbering goes on unaffected. The limit itself is allowed.
pub async fn too_large_events_are_refused_whole<F: Factory>(factory: F) {
    let (log, _guard) = factory
        .open(LogOptions {
            max_event_bytes: 1_000,
            ..options()
        })
        .await;
    let batch = events([vec![1; 10], vec![2; 1_001], vec![3; 10]]);
    match log.append(0, batch).await {
        Err(Error::TooLarge { .. }) => {}
        other => panic!("an oversized event: {other:?}"),
    }
    assert_eq!(
        must_info(&*log, 0).last_sequence,
        -1,
        "part of a refused batch was stored"
    );
    let appended = must_append(&*log, 0, events([vec![4; 1_000]])).await;
    assert_eq!(appended[0].sequence, 0);
    assert_eq!(read_all(&*log, 0, 0).await.len(), 1);
}

/// An empty batch succeeds with nothing assigned and changes nothing.
pub async fn empty_append_changes_nothing<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    assert!(must_append(&*log, 0, Vec::new()).await.is_empty());
    assert_eq!(must_info(&*log, 0).last_sequence, -1);
    must_append(&*log, 0, numbered("e", 0..2)).await;
    assert!(must_append(&*log, 0, Vec::new()).await.is_empty());
    let info = must_info(&*log, 0);
    assert_eq!(info.last_sequence, 1);
    assert_eq!(
        must_append(&*log, 0, numbered("e", 2..3)).await[0].sequence,
        2
    );
}

/// Retention by age drops the old events (never the recent ones) and moves `begin_sequence`
/// forward by what it reports; readers at older cursors continue at the oldest retained event;
/// numbering goes on.
pub async fn retention_by_age_drops_old_segments<F: Factory>(factory: F) {
    const SIZE: usize = 1_000;
    let clock = Arc::new(ManualClock::new(T0));
    let options = LogOptions {
        retention: Duration::from_secs(60),
        ..clocked(&clock)
    };
    let per_segment = (options.segment_bytes as usize / SIZE) as i64;
    let (log, _guard) = factory.open(options).await;
    // 20 old events in partition 0, over several segments, and 3 in partition 1.
    for _ in 0..4 {
        must_append(&*log, 0, sized(5, SIZE)).await;
    }
    must_append(&*log, 1, sized(3, SIZE)).await;
    assert_eq!(
        log.enforce_retention(T0 + 30_000).await.ok(),
        Some(0),
        "nothing is older than the retention yet"
    );
    clock.set(T0 + 61_000);
    let recent = must_append(&*log, 0, sized(6, SIZE)).await;
    assert_eq!(recent[0].sequence, 20);

    let dropped = match log.enforce_retention(T0 + 61_500).await {
        Ok(dropped) => dropped,
        Err(e) => panic!("enforce_retention failed: {e}"),
    };
    let p0 = must_info(&*log, 0);
    let p1 = must_info(&*log, 1);
    assert!(
        (20 - per_segment..=20).contains(&p0.begin_sequence),
        "the old events outside the newest segments must go, the recent must stay: {p0:?}"
    );
    assert!((0..=3).contains(&p1.begin_sequence), "{p1:?}");
    assert_eq!(dropped as i64, p0.begin_sequence + p1.begin_sequence);
    assert_eq!(
        p0.last_sequence, 25,
        "retention does not change the last sequence"
    );
    assert_eq!(p0.last_offset, Some(recent[5].offset));
    assert!(!p0.is_empty);

    // Older cursors continue at the oldest retained event.
    let read = read_all(&*log, 0, 0).await;
    assert_eq!(read.first().map(|e| e.sequence), Some(p0.begin_sequence));
    assert_eq!(
        sequences(&read),
        (p0.begin_sequence..26).collect::<Vec<_>>()
    );
    assert_eq!(
        must_resolve(&*log, 0, Position::Earliest),
        p0.begin_sequence
    );
    let from_zero = Position::Sequence {
        sequence: 0,
        inclusive: true,
    };
    assert_eq!(must_resolve(&*log, 0, from_zero), p0.begin_sequence);
    let from_offset = Position::Offset {
        offset: 0,
        inclusive: true,
    };
    assert_eq!(must_resolve(&*log, 0, from_offset), p0.begin_sequence);
    match tokio::time::timeout(SOON, log.wait_for(0, 0)).await {
        Ok(Ok(())) => {}
        other => panic!("wait_for behind the retained range: {other:?}"),
    }

    assert_eq!(
        log.enforce_retention(T0 + 61_500).await.ok(),
        Some(0),
        "idempotent"
    );
    let next = must_append(&*log, 0, sized(1, SIZE)).await;
    assert_eq!(next[0].sequence, 26);
    assert!(next[0].offset > recent[5].offset);
}

/// Retention by size drops the oldest events of a partition above `retention_bytes` (and only
/// of that partition), keeping at least `retention_bytes - segment_bytes` of data.
pub async fn retention_by_bytes_drops_old_segments<F: Factory>(factory: F) {
    const SIZE: usize = 1_000;
    const LIMIT: u64 = 8_192;
    let clock = Arc::new(ManualClock::new(T0));
    let options = LogOptions {
        retention_bytes: Some(LIMIT),
        ..clocked(&clock)
    };
    let segment_bytes = options.segment_bytes;
    let (log, _guard) = factory.open(options).await;
    for _ in 0..4 {
        must_append(&*log, 0, sized(5, SIZE)).await;
    }
    must_append(&*log, 1, sized(2, SIZE)).await;
    let dropped = match log.enforce_retention(T0).await {
        Ok(dropped) => dropped,
        Err(e) => panic!("enforce_retention failed: {e}"),
    };
    let p0 = must_info(&*log, 0);
    let retained = (p0.last_sequence + 1 - p0.begin_sequence) as u64;
    assert!(
        retained * SIZE as u64 <= LIMIT,
        "{retained} events retained: {p0:?}"
    );
    assert!(
        retained * SIZE as u64 >= LIMIT - segment_bytes,
        "too much dropped: {retained} events retained: {p0:?}"
    );
    assert_eq!(dropped as i64, p0.begin_sequence);
    assert_eq!(
        must_info(&*log, 1).begin_sequence,
        0,
        "a small partition keeps everything"
    );
    let read = read_all(&*log, 0, 0).await;
    assert_eq!(
        sequences(&read),
        (p0.begin_sequence..20).collect::<Vec<_>>()
    );
    assert_eq!(log.enforce_retention(T0).await.ok(), Some(0));
}

/// 50 tasks each append 200 events (in batches of 5) to one of four partitions at once:
/// every batch gets consecutive sequence numbers, a task's batches come in its order, no
/// number is given twice or skipped, and every acknowledged event reads back in order.
pub async fn concurrent_appenders_get_distinct_sequences<F: Factory>(factory: F) {
    const TASKS: usize = 50;
    const BATCHES: usize = 40;
    const BATCH: usize = 5;
    let (log, _guard) = factory
        .open(LogOptions {
            segment_bytes: 16 * 1024,
            ..options()
        })
        .await;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let partition = (task % 4) as u32;
                let mut mine = Vec::new();
                for batch in 0..BATCHES {
                    let data = numbered(&format!("t{task}"), batch * BATCH..(batch + 1) * BATCH);
                    let appended = log.append(partition, data).await?;
                    mine.extend(appended);
                }
                Ok::<_, Error>((partition, mine))
            })
        })
        .collect();
    let mut by_partition: Vec<Vec<(usize, usize, Appended)>> = vec![Vec::new(); 4];
    for (task, handle) in tasks.into_iter().enumerate() {
        let (partition, mine) = match tokio::time::timeout(SOON * 6, handle).await {
            Ok(Ok(Ok(result))) => result,
            other => panic!("appender {task} failed: {other:?}"),
        };
        assert_eq!(mine.len(), BATCHES * BATCH);
        for batch in mine.chunks(BATCH) {
            for pair in batch.windows(2) {
                assert_eq!(pair[1].sequence, pair[0].sequence + 1, "a batch was split");
            }
        }
        for pair in mine.windows(2) {
            assert!(
                pair[0].sequence < pair[1].sequence,
                "task {task}'s order was lost"
            );
        }
        for (k, appended) in mine.into_iter().enumerate() {
            by_partition[partition as usize].push((task, k, appended));
        }
    }
    for (partition, mut acked) in by_partition.into_iter().enumerate() {
        acked.sort_by_key(|(_, _, a)| a.sequence);
        let got: Vec<i64> = acked.iter().map(|(_, _, a)| a.sequence).collect();
        assert_eq!(
            got,
            (0..acked.len() as i64).collect::<Vec<_>>(),
            "partition {partition}"
        );
        let read = read_all(&*log, partition as u32, 0).await;
        assert_eq!(read.len(), acked.len(), "partition {partition}");
        for (event, (task, k, appended)) in read.iter().zip(&acked) {
            assert_eq!(
                (event.sequence, event.offset, event.enqueued_ms),
                (appended.sequence, appended.offset, appended.enqueued_ms)
            );
            assert_eq!(event.data, Bytes::from(format!("t{task}-{k}")));
        }
    }
}

/// After `close`, appends (even empty ones) fail with `Closed`; what was stored before reads
/// back (or reads fail with `Closed`).
pub async fn append_after_close_is_refused<F: Factory>(factory: F) {
    let (log, _guard) = factory.open(options()).await;
    let appended = must_append(&*log, 0, numbered("kept", 0..2)).await;
    log.close().await;
    for batch in [numbered("late", 0..1), Vec::new()] {
        match log.append(0, batch).await {
            Err(Error::Closed) => {}
            other => panic!("append after close: {other:?}"),
        }
    }
    // Reads keep working on what was stored.
    let read = must_read(&*log, 0, 0, 10, usize::MAX).await;
    assert_matches(&read, &appended, &numbered("kept", 0..2));
    log.close().await;
}

/// Appends racing with `close` each either succeed (and are stored) or fail with `Closed`
/// (and are not); `close` returns only once the successful ones are readable.
pub async fn close_settles_pending_appends<F: Factory>(factory: F) {
    const TASKS: usize = 64;
    let (log, _guard) = factory.open(options()).await;
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.append(0, numbered(&format!("c{i}"), 0..1)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    if tokio::time::timeout(SOON, log.close()).await.is_err() {
        panic!("close did not finish");
    }
    // Taken before any task is awaited: every append that succeeds must already be there.
    // Reads and info keep working on what was stored after close (the trait's promise).
    let at_close = must_info(&*log, 0);
    let mut stored = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(SOON, task).await {
            Ok(Ok(Ok(appended))) => stored.push((i, appended[0].sequence)),
            Ok(Ok(Err(Error::Closed))) => {}
            other => panic!("append {i} racing close: {other:?}"),
        }
    }
    assert_eq!(
        at_close.last_sequence + 1,
        stored.len() as i64,
        "close returned before every successful append was stored"
    );
    let read = read_all(&*log, 0, 0).await;
    assert_eq!(read.len(), stored.len());
    for (i, sequence) in stored {
        assert_eq!(read[sequence as usize].data, Bytes::from(format!("c{i}-0")));
    }
}

//! JetStream-specific behaviour beyond the conformance suite: two hub nodes (separate clients)
//! sharing one stream, reopening, the stream's partition count, and a server that stops and
//! comes back. Nodes run against this test process's private nats-server.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use twinhub_eventlog::{
    Appended, Error, EventLog, LogOptions, ManualClock, NewEvent, Position, StoredEvent,
};
use twinhub_eventlog_jetstream::{JetStreamLog, JetStreamOptions};
use twinhub_testsvc::nats::{self, NatsServer};

const SOON: Duration = Duration::from_secs(10);
const T0: i64 = 1_700_000_000_000;

fn options() -> LogOptions {
    LogOptions {
        partitions: 4,
        segment_bytes: 4096,
        ..LogOptions::default()
    }
}

async fn node(url: &str, name: &str, options: LogOptions) -> Arc<JetStreamLog> {
    match JetStreamLog::connect(url, name, options).await {
        Ok(log) => Arc::new(log),
        Err(e) => panic!("open {name} on {url}: {e}"),
    }
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<NewEvent> {
    range
        .map(|i| NewEvent::new(format!("{prefix}-{i}")))
        .collect()
}

async fn read_all(log: &JetStreamLog, partition: u32) -> Vec<StoredEvent> {
    match log.read(partition, 0, usize::MAX, usize::MAX).await {
        Ok(events) => events,
        Err(e) => panic!("read partition {partition}: {e}"),
    }
}

/// Waits (bounded) until `log` has seen `count` events in `partition`, through `wait_for`.
async fn wait_until_seen(log: &JetStreamLog, partition: u32, count: i64) {
    match tokio::time::timeout(SOON, log.wait_for(partition, count - 1)).await {
        Ok(Ok(())) => {}
        other => panic!("partition {partition} did not reach {count} events: {other:?}"),
    }
}

/// Two nodes, each with 16 tasks appending batches of 3 to the same partition at once (and
/// with clocks 10 s apart): every batch gets consecutive numbers, no number is given twice or
/// skipped, enqueued times never go back, and both nodes read the same events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_append_to_one_partition() {
    const TASKS: usize = 16;
    const BATCHES: usize = 10;
    const BATCH: usize = 3;
    let server = nats::shared();
    let name = server.unique_name("two-nodes");
    let ahead = Arc::new(ManualClock::new(T0 + 10_000));
    let behind = Arc::new(ManualClock::new(T0));
    let a = node(
        &server.url(),
        &name,
        LogOptions {
            clock: ahead.clone(),
            ..options()
        },
    )
    .await;
    let b = node(
        &server.url(),
        &name,
        LogOptions {
            clock: behind.clone(),
            ..options()
        },
    )
    .await;

    let tasks: Vec<_> = (0..2 * TASKS)
        .map(|task| {
            let log = Arc::clone(if task % 2 == 0 { &a } else { &b });
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for batch in 0..BATCHES {
                    let data = numbered(&format!("t{task}"), batch * BATCH..(batch + 1) * BATCH);
                    let appended = log.append(1, data).await?;
                    mine.push(appended);
                }
                Ok::<_, Error>(mine)
            })
        })
        .collect();
    let mut acked: Vec<(usize, usize, Appended)> = Vec::new();
    for (task, handle) in tasks.into_iter().enumerate() {
        let batches = match tokio::time::timeout(SOON * 6, handle).await {
            Ok(Ok(Ok(batches))) => batches,
            other => panic!("appender {task} failed: {other:?}"),
        };
        let mut last = -1;
        for (k, batch) in batches.iter().enumerate() {
            for (i, appended) in batch.iter().enumerate() {
                assert_eq!(appended.sequence, batch[0].sequence + i as i64, "split");
                acked.push((task, k * BATCH + i, *appended));
            }
            assert!(batch[0].sequence > last, "task {task}'s order was lost");
            last = batch[BATCH - 1].sequence;
        }
    }
    acked.sort_by_key(|(_, _, a)| a.sequence);
    let total = (2 * TASKS * BATCHES * BATCH) as i64;
    assert_eq!(
        acked.iter().map(|(_, _, a)| a.sequence).collect::<Vec<_>>(),
        (0..total).collect::<Vec<_>>(),
        "every number given once"
    );
    for pair in acked.windows(2) {
        assert!(pair[0].2.offset < pair[1].2.offset, "offsets must increase");
        assert!(
            pair[0].2.enqueued_ms <= pair[1].2.enqueued_ms,
            "enqueued times went back across nodes: {pair:?}"
        );
    }

    for log in [&a, &b] {
        wait_until_seen(log, 1, total).await;
        let read = read_all(log, 1).await;
        assert_eq!(read.len(), acked.len());
        for (event, (task, k, appended)) in read.iter().zip(&acked) {
            assert_eq!(
                (event.sequence, event.offset, event.enqueued_ms),
                (appended.sequence, appended.offset, appended.enqueued_ms)
            );
            assert_eq!(event.data, Bytes::from(format!("t{task}-{k}")));
        }
        let info = log.info(1).expect("info");
        assert_eq!(info.last_sequence, total - 1);
        assert_eq!(info.last_offset, Some(acked[acked.len() - 1].2.offset));
    }
    let (sa, sb) = (a.stats(), b.stats());
    eprintln!("node a: {sa:?}; node b: {sb:?}");
    assert_eq!(sa.events + sb.events, total as u64);
    assert!(
        sa.conflicts + sb.conflicts > 0,
        "the nodes never raced for the partition: the test did not test numbering across writers"
    );
    a.close().await;
    b.close().await;
}

/// A reader on one node is woken by an append on the other (not by polling: `wait_for` is
/// parked until the follower delivers), and resolves positions the other node assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sees_the_other_nodes_appends() {
    let server = nats::shared();
    let name = server.unique_name("sees");
    let a = node(&server.url(), &name, options()).await;
    let b = node(&server.url(), &name, options()).await;
    let first = a.append(2, numbered("a", 0..2)).await.expect("append on a");
    wait_until_seen(&b, 2, 2).await;

    let cursor = b.resolve(2, &Position::Latest).expect("resolve");
    assert_eq!(cursor, 2);
    let reader = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            b.wait_for(2, cursor).await?;
            b.read(2, cursor, 10, usize::MAX).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!reader.is_finished(), "woke with nothing appended");
    a.append(3, numbered("elsewhere", 0..1))
        .await
        .expect("append");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!reader.is_finished(), "woken by another partition");
    let second = a.append(2, numbered("a", 2..3)).await.expect("append on a");
    match tokio::time::timeout(SOON, reader).await {
        Ok(Ok(Ok(read))) => {
            assert_eq!(read.len(), 1);
            assert_eq!(read[0].sequence, 2);
            assert_eq!(read[0].offset, second[0].offset);
            assert_eq!(read[0].data, Bytes::from("a-2"));
        }
        other => panic!("b's reader was not woken by a's append: {other:?}"),
    }
    // Offsets and times assigned by a resolve the same on b.
    let at = Position::Offset {
        offset: first[1].offset,
        inclusive: true,
    };
    assert_eq!(b.resolve(2, &at).expect("resolve"), 1);
    let at = Position::EnqueuedTime {
        ms: second[0].enqueued_ms,
        inclusive: true,
    };
    assert!(b.resolve(2, &at).expect("resolve") <= 2);
    assert_eq!(a.info(2).expect("info"), b.info(2).expect("info"));

    // b then appends after a's events, and a sees them.
    let third = b.append(2, numbered("b", 0..2)).await.expect("append on b");
    assert_eq!(third[0].sequence, 3);
    wait_until_seen(&a, 2, 5).await;
    let read = read_all(&a, 2).await;
    let data: Vec<&[u8]> = read.iter().map(|e| &e.data[..]).collect();
    assert_eq!(data, [&b"a-0"[..], b"a-1", b"a-2", b"b-0", b"b-1"]);
}

/// Retention applied by one node moves the other's begin too (the purge notice), and reads
/// there continue at the oldest retained event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_one_node_is_seen_by_the_other() {
    let server = nats::shared();
    let name = server.unique_name("retention");
    let limited = LogOptions {
        retention_bytes: Some(8_192),
        ..options()
    };
    let a = node(&server.url(), &name, limited.clone()).await;
    let b = node(&server.url(), &name, limited).await;
    for _ in 0..4 {
        a.append(0, (0..5).map(|_| NewEvent::new(vec![7u8; 1_000])).collect())
            .await
            .expect("append");
    }
    wait_until_seen(&b, 0, 20).await;
    let dropped = a.enforce_retention(T0).await.expect("retention");
    assert_eq!(dropped, 15);
    assert_eq!(a.info(0).expect("info").begin_sequence, 15);
    let deadline = Instant::now() + SOON;
    while b.info(0).expect("info").begin_sequence != 15 {
        assert!(Instant::now() < deadline, "b never saw the purge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = read_all(&b, 0).await;
    assert_eq!(read.first().map(|e| e.sequence), Some(15));
    assert_eq!(read.len(), 5);
    assert_eq!(b.enforce_retention(T0).await.expect("retention"), 0);
}

/// Closing and opening again (a restarted node) keeps the numbering, offsets and times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_numbering() {
    let server = nats::shared();
    let name = server.unique_name("reopen");
    let clock = Arc::new(ManualClock::new(T0 + 5_000));
    let clocked = LogOptions {
        clock: clock.clone(),
        ..options()
    };
    let first = node(&server.url(), &name, clocked.clone()).await;
    let before = first.append(0, numbered("x", 0..3)).await.expect("append");
    first.append(1, numbered("y", 0..1)).await.expect("append");
    first.close().await;
    assert!(matches!(
        first.append(0, numbered("x", 3..4)).await,
        Err(Error::Closed)
    ));
    drop(first);

    clock.set(T0);
    let again = node(&server.url(), &name, clocked).await;
    let info = again.info(0).expect("info");
    assert_eq!(info.last_sequence, 2);
    assert_eq!(info.last_offset, Some(before[2].offset));
    let after = again.append(0, numbered("x", 3..5)).await.expect("append");
    assert_eq!(after[0].sequence, 3);
    assert!(after[0].offset > before[2].offset);
    assert_eq!(
        after[0].enqueued_ms,
        T0 + 5_000,
        "time went back after reopening"
    );
    assert_eq!(again.info(1).expect("info").last_sequence, 0);
    let read = read_all(&again, 0).await;
    assert_eq!(
        read.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        (0..5)
            .map(|i| Bytes::from(format!("x-{i}")))
            .collect::<Vec<_>>()
    );
}

/// A stream keeps its partition count: opening it with another fails with PartitionMismatch.
/// Names are made into valid stream names without merging distinct endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_keep_their_partitions_and_names() {
    let server = nats::shared();
    let name = server.unique_name("mismatch");
    let log = node(&server.url(), &name, options()).await;
    match JetStreamLog::connect(
        &server.url(),
        &name,
        LogOptions {
            partitions: 8,
            ..options()
        },
    )
    .await
    {
        Err(Error::PartitionMismatch {
            found: 4,
            expected: 8,
        }) => {}
        other => panic!("opening with 8 partitions: {other:?}"),
    }
    assert_eq!(log.stream_name(), format!("twinhub-{name}"));

    let base = server.unique_name("odd");
    let dotted = node(&server.url(), &format!("{base}.a b"), options()).await;
    let underscored = node(&server.url(), &format!("{base}_a_b"), options()).await;
    assert_ne!(dotted.stream_name(), underscored.stream_name());
    dotted.append(0, numbered("d", 0..1)).await.expect("append");
    assert_eq!(underscored.info(0).expect("info").last_sequence, -1);
}

/// With the server stopped, appends fail with Unavailable within the timeout (no hang);
/// once it is back on the same store, appends succeed again and the numbering carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_fail_while_the_server_is_down_and_recover() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let server = NatsServer::start();
    let name = server.unique_name("outage");
    let client = async_nats::ConnectOptions::new()
        .connect(server.url())
        .await
        .expect("connect");
    let log = JetStreamLog::open_with(
        client,
        &name,
        options(),
        JetStreamOptions {
            timeout: TIMEOUT,
            ..JetStreamOptions::default()
        },
    )
    .await
    .expect("open");
    // Another node, to see that its follower comes back after the outage too.
    let other = node(&server.url(), &name, options()).await;
    log.append(0, numbered("before", 0..3))
        .await
        .expect("append");
    wait_until_seen(&other, 0, 3).await;

    server.stop();
    let started = Instant::now();
    match tokio::time::timeout(TIMEOUT * 3, log.append(0, numbered("down", 0..1))).await {
        Ok(Err(Error::Unavailable(_))) => {}
        other => panic!("append with the server down: {other:?}"),
    }
    assert!(
        started.elapsed() < TIMEOUT * 2,
        "took {:?}",
        started.elapsed()
    );
    // Reads of what was cached still work; info is answered from the view.
    assert_eq!(log.info(0).expect("info").last_sequence, 2);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let appended = loop {
        match log.append(0, numbered("after", 0..2)).await {
            Ok(appended) => break appended,
            Err(Error::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("append after the restart: {e}"),
        }
    };
    // The append refused while the server was down may still have been stored (its publish
    // was buffered by the client): numbering carries on after whatever was stored.
    assert!(appended[0].sequence >= 3, "{appended:?}");
    let read = read_all(&log, 0).await;
    let sequences: Vec<i64> = read.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (0..sequences.len() as i64).collect::<Vec<_>>());
    let data: BTreeSet<Bytes> = read.iter().map(|e| e.data.clone()).collect();
    for expected in ["before-0", "before-2", "after-0", "after-1"] {
        assert!(data.contains(expected.as_bytes()), "{expected} missing");
    }
    assert_eq!(read.last().map(|e| e.sequence), Some(appended[1].sequence));
    // The other node's follower resumed: it sees the appends made after the restart.
    wait_until_seen(&other, 0, appended[1].sequence + 1).await;
    let seen = read_all(&other, 0).await;
    assert_eq!(seen, read);
    log.close().await;
    other.close().await;
}

/// What numbering across writers rests on: the server (Debian's 2.9) stores a message only if
/// the subject's last message is the one named in `Nats-Expected-Last-Subject-Sequence`,
/// including 0 for "none yet".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_checks_the_expected_last_subject_sequence() {
    use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
    let server = nats::shared();
    let name = server.unique_name("expected");
    let log = node(&server.url(), &name, options()).await;
    let appended = log.append(0, numbered("x", 0..1)).await.expect("append");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client);
    for stale in ["0", "999999"] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, stale);
        let ack = jetstream
            .publish_with_headers(log.subject(0), headers, "intruder".into())
            .await
            .expect("publish")
            .await;
        assert!(ack.is_err(), "stored with a stale expectation {stale}");
    }
    // The log goes on numbering after its own message.
    let next = log.append(0, numbered("x", 1..2)).await.expect("append");
    assert_eq!(next[0].sequence, appended[0].sequence + 1);
    assert_eq!(log.stats().conflicts, 0);
}

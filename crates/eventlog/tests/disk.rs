//! The disk log beyond the conformance suite: what survives a reopen, a drop without close and
//! an abort; torn and damaged files; the directory's layout, manifest, lock and modes; and
//! (ignored, run by hand) its append throughput.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use twinhub_eventlog::{
    Appended, DiskLog, Error, EventLog, LogOptions, ManualClock, NewEvent, Position,
    RECORD_OVERHEAD, StoredEvent,
};

const T0: i64 = 1_700_000_000_000;

fn options() -> LogOptions {
    LogOptions {
        partitions: 4,
        segment_bytes: 4096,
        ..LogOptions::default()
    }
}

fn open(dir: &Path, options: LogOptions) -> DiskLog {
    match DiskLog::open(dir, options) {
        Ok(log) => log,
        Err(e) => panic!("opening {}: {e}", dir.display()),
    }
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<NewEvent> {
    range
        .map(|i| NewEvent::new(format!("{prefix}-{i}")))
        .collect()
}

async fn append(log: &DiskLog, partition: u32, events: Vec<NewEvent>) -> Vec<Appended> {
    match log.append(partition, events).await {
        Ok(appended) => appended,
        Err(e) => panic!("append to partition {partition}: {e}"),
    }
}

async fn read_all(log: &DiskLog, partition: u32) -> Vec<StoredEvent> {
    match log.read(partition, 0, usize::MAX, usize::MAX).await {
        Ok(events) => events,
        Err(e) => panic!("read of partition {partition}: {e}"),
    }
}

fn sequences(events: &[StoredEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence).collect()
}

/// The segment files of a partition, oldest first.
fn segments(dir: &Path, partition: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(format!("{partition:02}")))
        .expect("list a partition directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).expect("stat a segment").len()
}

/// Everything appended survives a reopen: sequence numbers, offsets, times and data, over
/// several segments and partitions; numbering, offsets and times go on from there, even when
/// the clock is now earlier.
#[tokio::test]
async fn reopen_keeps_everything_and_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("events");
    let clock = Arc::new(ManualClock::new(T0));
    let options = LogOptions {
        clock: Arc::clone(&clock) as _,
        ..options()
    };
    let log = open(&dir, options.clone());
    for round in 0..10 {
        clock.advance(1_000);
        let padded = (0..20).map(|i| NewEvent::new(format!("r{round}-{i}-{}", "x".repeat(100))));
        append(&log, 0, padded.collect()).await;
        append(&log, 3, numbered(&format!("q{round}"), 0..3)).await;
    }
    let before: Vec<Vec<StoredEvent>> = {
        let mut all = Vec::new();
        for partition in 0..4 {
            all.push(read_all(&log, partition).await);
        }
        all
    };
    let infos: Vec<_> = (0..4).map(|p| log.info(p).unwrap()).collect();
    assert!(
        segments(&dir, 0).len() > 3,
        "the test needs several segments"
    );
    log.close().await;

    clock.set(T0 - 50_000);
    let log = open(&dir, options);
    for partition in 0..4u32 {
        assert_eq!(read_all(&log, partition).await, before[partition as usize]);
        assert_eq!(log.info(partition).unwrap(), infos[partition as usize]);
    }
    let last = before[0].last().unwrap();
    let next = append(&log, 0, numbered("after", 0..1)).await[0];
    assert_eq!(next.sequence, 200);
    assert_eq!(
        next.offset,
        last.offset + (last.data.len() + RECORD_OVERHEAD) as u64
    );
    assert_eq!(
        next.enqueued_ms, last.enqueued_ms,
        "times must not go back after a reopen"
    );
    assert_eq!(
        append(&log, 1, numbered("fresh", 0..1)).await[0].sequence,
        0
    );
    log.close().await;
}

/// Dropping the log without `close` (what a crashing task does) keeps every acknowledged
/// event, and the directory can be reopened at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_without_close_keeps_acknowledged_events() {
    let tmp = tempfile::tempdir().unwrap();
    let log = Arc::new(open(tmp.path(), options()));
    let tasks: Vec<_> = (0..20)
        .map(|task| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for k in 0..10 {
                    let data = format!("t{task}-{k}");
                    let appended = log
                        .append(task % 4, vec![NewEvent::new(data.clone())])
                        .await;
                    acked.push((task % 4, appended.unwrap()[0].sequence, data));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    drop(Arc::try_unwrap(log).expect("no other handle"));
    let log = open(tmp.path(), options());
    for (partition, sequence, data) in acked {
        let read = log.read(partition, sequence, 1, usize::MAX).await.unwrap();
        assert_eq!(read[0].sequence, sequence);
        assert_eq!(read[0].data, Bytes::from(data));
    }
}

/// A torn last record (the file cut a few bytes short) is cut off at open, with nothing after
/// it; appends continue from the last whole record and everything reads back.
#[tokio::test]
async fn torn_tail_is_cut_and_appends_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path(), options());
    append(&log, 0, numbered("e", 0..5)).await;
    log.close().await;
    drop(log);
    let active = segments(tmp.path(), 0).pop().unwrap();
    let whole = file_len(&active);
    let file = OpenOptions::new().write(true).open(&active).unwrap();
    file.set_len(whole - 3).unwrap();
    drop(file);

    let log = open(tmp.path(), options());
    assert_eq!(sequences(&read_all(&log, 0).await), [0, 1, 2, 3]);
    assert_eq!(log.info(0).unwrap().last_sequence, 3);
    let last_len = (b"e-4".len() + RECORD_OVERHEAD) as u64;
    assert_eq!(
        file_len(&active),
        whole - last_len,
        "the torn record is gone from the file"
    );
    let again = append(&log, 0, numbered("again", 0..2)).await;
    assert_eq!(again[0].sequence, 4);
    log.close().await;
    drop(log);

    let log = open(tmp.path(), options());
    let read = read_all(&log, 0).await;
    assert_eq!(sequences(&read), [0, 1, 2, 3, 4, 5]);
    assert_eq!(read[4].data, Bytes::from("again-0"));
}

/// Garbage after the last record (a torn header, a wild length, zeroes) is cut at open.
#[tokio::test]
async fn garbage_after_the_tail_is_cut() {
    let garbage: [&[u8]; 4] = [
        &[0x07],
        &[0; 64],
        &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 5, 6, 7, 8],
        b"not a record at all, but long enough to look like one",
    ];
    for junk in garbage {
        let tmp = tempfile::tempdir().unwrap();
        let log = open(tmp.path(), options());
        let appended = append(&log, 0, numbered("e", 0..3)).await;
        log.close().await;
        drop(log);
        let active = segments(tmp.path(), 0).pop().unwrap();
        let whole = file_len(&active);
        let mut file = OpenOptions::new().append(true).open(&active).unwrap();
        file.write_all(junk).unwrap();
        drop(file);

        let log = open(tmp.path(), options());
        assert_eq!(file_len(&active), whole, "garbage {junk:?} was not cut");
        assert_eq!(sequences(&read_all(&log, 0).await), [0, 1, 2]);
        let next = append(&log, 0, numbered("next", 0..1)).await[0];
        assert_eq!(next.sequence, 3);
        assert_eq!(
            next.offset,
            appended[2].offset + (3 + RECORD_OVERHEAD) as u64
        );
        assert_eq!(read_all(&log, 0).await[3].data, Bytes::from("next-0"));
        log.close().await;
    }
}

/// A last record whose CRC no longer matches (a write that landed only partly) is cut at
/// open; so is a damaged record earlier in the active segment, with everything after it (none
/// of it can have been acknowledged... unless the disk lies, and then it is garbage anyway).
#[tokio::test]
async fn records_with_a_broken_crc_in_the_active_segment_are_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path(), options());
    let appended = append(&log, 0, numbered("e", 0..5)).await;
    log.close().await;
    drop(log);
    let active = segments(tmp.path(), 0).pop().unwrap();
    let flip = |at: u64| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&active)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
    };
    // The last byte of the last record's data.
    flip(file_len(&active) - 1);
    let log = open(tmp.path(), options());
    assert_eq!(sequences(&read_all(&log, 0).await), [0, 1, 2, 3]);
    log.close().await;
    drop(log);

    // Record 1's data, in the middle of the active segment.
    flip(appended[1].offset + RECORD_OVERHEAD as u64);
    let log = open(tmp.path(), options());
    assert_eq!(sequences(&read_all(&log, 0).await), [0]);
    assert_eq!(file_len(&active), appended[1].offset);
    assert_eq!(append(&log, 0, numbered("x", 0..1)).await[0].sequence, 1);
    log.close().await;
}

/// 100-byte events make 124-byte records, 33 to a 4096-byte segment.
const PER: usize = 4096 / (100 + RECORD_OVERHEAD);

/// Appends 100 events of 100 bytes to partition 0 (four segments, three sealed) and closes
/// the log; returns what was assigned and the segment files.
async fn sealed_segments(dir: &Path, options: &LogOptions) -> (Vec<Appended>, Vec<PathBuf>) {
    let log = open(dir, options.clone());
    let data: Vec<NewEvent> = (0..100)
        .map(|i| NewEvent::new(vec![i as u8; 100]))
        .collect();
    let appended = append(&log, 0, data).await;
    log.close().await;
    drop(log);
    let files = segments(dir, 0);
    assert_eq!(
        files.len(),
        100usize.div_ceil(PER),
        "the test needs sealed segments"
    );
    (appended, files)
}

/// Overwrites two bytes in the data of `sequence`, in segment file `file` starting at
/// `base` (the offset of its first record).
fn damage(file: &Path, base: u64, record: &Appended) {
    let at = record.offset - base + RECORD_OVERHEAD as u64 + 10;
    let file = OpenOptions::new().write(true).open(file).unwrap();
    file.write_all_at(b"\xde\xad", at).unwrap();
}

/// Damage inside a sealed segment that has its saved index is found by the read's CRC check:
/// that one event fails with `Corrupt` (naming it), reads stop before it, and everything
/// else, in that segment too, still reads. The same holds for damage appearing while the log
/// is open.
#[tokio::test]
async fn damage_in_a_sealed_segment_fails_only_that_event() {
    let tmp = tempfile::tempdir().unwrap();
    let options = LogOptions {
        tail_cache_bytes: 0,
        ..options()
    };
    let (appended, files) = sealed_segments(tmp.path(), &options).await;
    for file in &files[..files.len() - 1] {
        assert!(
            file.with_extension("idx").exists(),
            "sealed {} has no index",
            file.display()
        );
    }
    damage(&files[1], appended[PER].offset, &appended[40]);

    let log = open(tmp.path(), options.clone());
    let read = read_all(&log, 0).await;
    assert_eq!(
        sequences(&read),
        (0..40).collect::<Vec<_>>(),
        "reads stop before the damage"
    );
    match log.read(0, 40, 10, usize::MAX).await {
        Err(Error::Corrupt(why)) => assert!(why.contains("40"), "{why}"),
        other => panic!("reading at the damage: {other:?}"),
    }
    let rest = log.read(0, 41, 1000, usize::MAX).await.unwrap();
    assert_eq!(sequences(&rest), (41..100).collect::<Vec<_>>());
    assert!(rest.iter().all(|e| e.data[..] == [e.sequence as u8; 100]));
    assert_eq!(
        append(&log, 0, numbered("more", 0..1)).await[0].sequence,
        100
    );

    // Damage while open: the index still points at the record, its CRC no longer matches.
    damage(&files[2], appended[2 * PER].offset, &appended[70]);
    let before = log.read(0, 41, 1000, usize::MAX).await.unwrap();
    assert_eq!(sequences(&before), (41..70).collect::<Vec<_>>());
    assert!(matches!(
        log.read(0, 70, 10, usize::MAX).await,
        Err(Error::Corrupt(_))
    ));
    log.close().await;
}

/// Without its saved index, a sealed segment is scanned at open; damage found then is left on
/// disk (not cut, unlike the active segment's tail) and out of the index: from it to the end
/// of its segment, reads fail with `Corrupt`, while the segments around it read, positions
/// skip it, and the log keeps appending. The scan saves a new index.
#[tokio::test]
async fn damage_found_by_a_scan_leaves_the_rest_of_its_segment_unreadable() {
    let tmp = tempfile::tempdir().unwrap();
    let options = LogOptions {
        tail_cache_bytes: 0,
        ..options()
    };
    let (appended, files) = sealed_segments(tmp.path(), &options).await;
    let whole = file_len(&files[1]);
    damage(&files[1], appended[PER].offset, &appended[40]);
    fs::remove_file(files[1].with_extension("idx")).unwrap();
    // A garbage index is as good as none.
    fs::write(files[0].with_extension("idx"), b"garbage").unwrap();

    let log = open(tmp.path(), options.clone());
    assert_eq!(
        file_len(&files[1]),
        whole,
        "a sealed segment must not be cut"
    );
    assert!(
        files[1].with_extension("idx").exists(),
        "the scan saves an index"
    );
    let third = 2 * PER as i64;
    let read = read_all(&log, 0).await;
    assert_eq!(sequences(&read), (0..40).collect::<Vec<_>>());
    for at in [40, 41, third - 1] {
        match log.read(0, at, 10, usize::MAX).await {
            Err(Error::Corrupt(_)) => {}
            other => panic!("reading at {at}, after the damage: {other:?}"),
        }
    }
    let rest = log.read(0, third, 1000, usize::MAX).await.unwrap();
    assert_eq!(sequences(&rest), (third..100).collect::<Vec<_>>());
    let info = log.info(0).unwrap();
    assert_eq!((info.begin_sequence, info.last_sequence), (0, 99));
    let from = Position::Offset {
        offset: appended[45].offset,
        inclusive: true,
    };
    assert_eq!(log.resolve(0, &from).unwrap(), third);
    assert_eq!(
        append(&log, 0, numbered("more", 0..1)).await[0].sequence,
        100
    );
    log.close().await;
    drop(log);

    // The saved indexes (the rebuilt one describes the damaged segment as scanned) give the
    // same answers.
    let log = open(tmp.path(), options);
    assert_eq!(
        sequences(&read_all(&log, 0).await),
        (0..40).collect::<Vec<_>>()
    );
    assert!(matches!(
        log.read(0, 41, 1, 1).await,
        Err(Error::Corrupt(_))
    ));
    assert_eq!(log.read(0, third, 1, 1).await.unwrap()[0].sequence, third);
    log.close().await;
}

/// What a failed append leaves if its rollback truncated the previous segment but could not
/// remove the segment it had created, and the process then stopped: that empty segment is
/// removed at open and numbering continues from the previous one, without a gap.
#[tokio::test]
async fn an_empty_segment_left_by_a_failed_append_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let log = open(tmp.path(), options());
    // 1024-byte records, four to a segment; the fifth starts a second one.
    let appended = append(
        &log,
        0,
        (0..5).map(|_| NewEvent::new(vec![1; 1000])).collect(),
    )
    .await;
    log.close().await;
    drop(log);
    let files = segments(tmp.path(), 0);
    assert_eq!(files.len(), 2);
    let cut = |path: &Path, len: u64| {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    };
    cut(&files[0], appended[3].offset);
    cut(&files[1], 0);

    let log = open(tmp.path(), options());
    assert_eq!(segments(tmp.path(), 0), files[..1]);
    assert_eq!(log.info(0).unwrap().last_sequence, 2);
    let next = append(&log, 0, numbered("next", 0..1)).await[0];
    assert_eq!((next.sequence, next.offset), (3, appended[3].offset));
    assert_eq!(sequences(&read_all(&log, 0).await), [0, 1, 2, 3]);
    log.close().await;
}

/// A directory made for one partition count cannot be opened with another.
#[tokio::test]
async fn a_partition_count_mismatch_fails() {
    let tmp = tempfile::tempdir().unwrap();
    open(tmp.path(), options()).close().await;
    for partitions in [2, 8] {
        match DiskLog::open(
            tmp.path(),
            LogOptions {
                partitions,
                ..options()
            },
        ) {
            Err(Error::PartitionMismatch { found: 4, expected }) => {
                assert_eq!(expected, partitions)
            }
            other => panic!("opening 4 partitions as {partitions}: {other:?}"),
        }
    }
    open(tmp.path(), options()).close().await;
}

/// One log at a time per directory: a second open fails while the first is open, and works
/// once it is closed (in the same process) or dropped.
#[tokio::test]
async fn a_directory_is_open_in_one_log_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let first = open(tmp.path(), options());
    match DiskLog::open(tmp.path(), options()) {
        Err(Error::Unavailable(why)) => assert!(why.contains("another"), "{why}"),
        other => panic!("a second open: {other:?}"),
    }
    first.close().await;
    let second = open(tmp.path(), options());
    drop(second);
    drop(first);
    open(tmp.path(), options()).close().await;
}

/// The layout: a manifest (and no leftover temp file), one 0700 directory per partition, 0600
/// segment files named by their first sequence number and offset.
#[tokio::test]
async fn layout_names_and_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data").join("events").join("telemetry");
    let log = open(&dir, options());
    let appended = append(
        &log,
        1,
        (0..10).map(|_| NewEvent::new(vec![7; 1000])).collect(),
    )
    .await;
    log.close().await;

    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let manifest = fs::read_to_string(dir.join("manifest")).unwrap();
    assert_eq!(manifest, "twinhub-eventlog\nformat 1\npartitions 4\n");
    assert_eq!(mode(&dir.join("manifest")), 0o600);
    assert!(!dir.join("manifest.tmp").exists());
    for partition in 0..4 {
        assert_eq!(mode(&dir.join(format!("{partition:02}"))), 0o700);
    }
    let names: Vec<String> = segments(&dir, 1)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // 1024-byte records, four to a 4096-byte segment.
    let expected: Vec<String> = [0usize, 4, 8]
        .iter()
        .map(|&i| format!("{:020}-{:020}.seg", i, appended[i].offset))
        .collect();
    assert_eq!(names, expected);
    for file in segments(&dir, 1) {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(file_len(&segments(&dir, 1)[0]), 4096);
}

/// Retention removes the dropped segments' files; after a reopen the partition begins where
/// retention left it.
#[tokio::test]
async fn retention_removes_segment_files() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let options = LogOptions {
        clock: Arc::clone(&clock) as _,
        retention: Duration::from_secs(60),
        ..options()
    };
    let log = open(tmp.path(), options.clone());
    append(
        &log,
        0,
        (0..20).map(|_| NewEvent::new(vec![1; 1000])).collect(),
    )
    .await;
    clock.advance(120_000);
    append(&log, 0, numbered("new", 0..2)).await;
    assert_eq!(segments(tmp.path(), 0).len(), 6);
    assert_eq!(log.enforce_retention(T0 + 120_000).await.unwrap(), 20);
    let left = segments(tmp.path(), 0);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].to_string_lossy().contains(&format!("{:020}-", 20)));
    // All that is left is the active segment, which is never dropped.
    clock.advance(1_000_000);
    assert_eq!(log.enforce_retention(T0 + 9_000_000).await.unwrap(), 0);
    log.close().await;
    drop(log);
    let log = open(tmp.path(), options);
    let info = log.info(0).unwrap();
    assert_eq!((info.begin_sequence, info.last_sequence), (20, 21));
    assert_eq!(sequences(&read_all(&log, 0).await), [20, 21]);
    log.close().await;
}

/// Set in the child process of [`acknowledged_events_survive_an_abort`]: the directory to
/// append to.
const CHILD_DIR: &str = "TWINHUB_EVENTLOG_ABORT_DIR";
/// Acknowledgements the child prints before it aborts, with appends still in flight.
const ACKS_BEFORE_ABORT: usize = 3_000;

/// The child: 40 tasks append to all partitions and print each acknowledgement, then the
/// process aborts mid-flight (no destructors, no close, nothing flushed but what was fsynced).
fn abort_child(dir: &Path) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let log = Arc::new(open(dir, options()));
        let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel::<String>();
        for task in 0..40u32 {
            let log = Arc::clone(&log);
            let acks = acks.clone();
            tokio::spawn(async move {
                for k in 0.. {
                    let data = format!("t{task}-{k}");
                    let batch = vec![NewEvent::new(data.clone()), NewEvent::new(data.clone())];
                    let Ok(appended) = log.append(task % 4, batch).await else {
                        return;
                    };
                    let line = format!(
                        "ACK {} {} {} {data}",
                        task % 4,
                        appended[0].sequence,
                        appended[0].offset
                    );
                    if acks.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let mut stdout = std::io::stdout().lock();
        for _ in 0..ACKS_BEFORE_ABORT {
            let Some(line) = acked.recv().await else {
                break;
            };
            writeln!(stdout, "{line}").expect("write to stdout");
        }
        stdout.flush().expect("flush stdout");
        std::process::abort();
    })
}

/// Acknowledged events survive the process aborting: the test binary runs itself as a child
/// that appends and prints every acknowledgement, then aborts; every acknowledged event must
/// be there after reopening, and appends go on.
#[test]
fn acknowledged_events_survive_an_abort() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        abort_child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args([
            "acknowledged_events_survive_an_abort",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("the child's stdout");
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line from the child");
        // The harness prints the test's name without a newline before the test runs.
        let Some(at) = line.find("ACK ") else {
            continue;
        };
        let ack = &line[at + 4..];
        let fields: Vec<&str> = ack.split(' ').collect();
        let [partition, sequence, offset, data] = fields[..] else {
            panic!("bad line {line:?}");
        };
        acked.push((
            partition.parse::<u32>().unwrap(),
            sequence.parse::<i64>().unwrap(),
            offset.parse::<u64>().unwrap(),
            data.to_owned(),
        ));
    }
    let status = child.wait().expect("wait for the child");
    assert!(
        !status.success(),
        "the child should have aborted: {status:?}"
    );
    assert_eq!(acked.len(), ACKS_BEFORE_ABORT, "the child stopped early");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = open(tmp.path(), options());
        for (partition, sequence, offset, data) in &acked {
            let read = log
                .read(*partition, *sequence, 2, usize::MAX)
                .await
                .unwrap();
            assert_eq!(
                sequences(&read),
                [*sequence, sequence + 1],
                "partition {partition}"
            );
            assert_eq!(read[0].offset, *offset);
            assert_eq!(read[0].data, Bytes::from(data.clone()));
            assert_eq!(read[1].data, Bytes::from(data.clone()));
        }
        // Numbering goes on after whatever else made it to disk.
        for partition in 0..4 {
            let info = log.info(partition).unwrap();
            let next = append(&log, partition, numbered("after", 0..1)).await[0];
            assert_eq!(next.sequence, info.last_sequence + 1);
        }
        log.close().await;
    });
}

/// Append throughput with 100 concurrent appenders of 1 KiB events (one event per append),
/// on the machine's temporary directory. Run by hand:
/// `cargo test -p twinhub-eventlog --release --test disk -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test; run by hand"]
async fn append_throughput() {
    const APPENDERS: usize = 100;
    const RUN: Duration = Duration::from_secs(5);
    for partitions in [1u32, 4] {
        let tmp = tempfile::tempdir_in(
            std::env::var_os("EVENTLOG_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
        )
        .unwrap();
        let log = Arc::new(open(
            tmp.path(),
            LogOptions {
                partitions,
                ..LogOptions::default()
            },
        ));
        let started = Instant::now();
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|i| {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let data = Bytes::from(vec![i as u8; 1024]);
                    let mut count = 0u64;
                    while started.elapsed() < RUN {
                        log.append(i as u32 % partitions, vec![NewEvent { data: data.clone() }])
                            .await
                            .expect("append");
                        count += 1;
                    }
                    count
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let stats = log.stats();
        println!(
            "{partitions} partition(s), {APPENDERS} appenders of 1 KiB: {:.0} appends/s ({total} in {elapsed:.1} s), {:.1} appends per group, {} fsyncs",
            total as f64 / elapsed,
            stats.appends as f64 / stats.groups.max(1) as f64,
            stats.fsyncs
        );
        log.close().await;
    }
}

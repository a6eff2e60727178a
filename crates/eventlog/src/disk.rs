//! The embedded, on-disk [`EventLog`] backend: segment files per partition, one writer thread
//! with group commit, reads by positioned I/O.
//!
//! [`files`] lays out the directory and recovers it at open; [`writer`] owns every write. Each
//! partition's [`Index`] (shared with the memory backend) and a small cache of its newest
//! events sit behind one lock per partition: the writer takes it only to publish a durable
//! group or drop expired segments, readers only to plan a read. Reads then run on a blocking
//! task with `read_at` on the segment files, so they never wait for the writer or its fsyncs;
//! tailing readers are usually served from the cache without touching the disk.
//!
//! The log is Unix-only (positioned I/O, file modes, `flock`).

mod files;
mod writer;

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::index::Index;
use crate::record::{self, RECORD_OVERHEAD};
use crate::tail::Tails;
use crate::{
    Appended, Error, EventLog, LogOptions, NewEvent, PartitionInfo, Position, Result, StoredEvent,
};
use writer::{Cursor, PartitionWriter, Request};

/// How many appends may wait for the writer before `append` itself waits (backpressure).
const QUEUE_CAPACITY: usize = 4096;

/// Counters of the writer's work, to observe group commit in tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Write rounds (groups) the writer ran.
    pub groups: u64,
    /// Successful `append` calls; `appends / groups` is the mean group size.
    pub appends: u64,
    /// Events stored.
    pub events: u64,
    /// fsyncs of segment files and directories.
    pub fsyncs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    groups: AtomicU64,
    appends: AtomicU64,
    events: AtomicU64,
    fsyncs: AtomicU64,
}

/// Test hooks making the next writes or fsyncs fail, as a full or failing disk would.
#[derive(Debug, Default)]
struct Faults {
    #[cfg(test)]
    writes: AtomicU64,
    #[cfg(test)]
    syncs: AtomicU64,
    #[cfg(test)]
    truncates: AtomicU64,
}

impl Faults {
    /// Whether the next write fails.
    fn write(&self) -> bool {
        #[cfg(test)]
        {
            take_one(&self.writes)
        }
        #[cfg(not(test))]
        {
            false
        }
    }

    /// An error if the next fsync fails.
    fn sync(&self) -> io::Result<()> {
        #[cfg(test)]
        if take_one(&self.syncs) {
            return Err(io::Error::other("injected fsync failure"));
        }
        Ok(())
    }

    /// An error if the next truncation after a failed write fails.
    fn truncate(&self) -> io::Result<()> {
        #[cfg(test)]
        if take_one(&self.truncates) {
            return Err(io::Error::other("injected truncate failure"));
        }
        Ok(())
    }
}

#[cfg(test)]
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The newest events of a partition, in order and ending at its last published event.
#[derive(Debug, Default)]
struct TailCache {
    events: VecDeque<StoredEvent>,
    bytes: usize,
    capacity: usize,
}

impl TailCache {
    fn push(&mut self, event: StoredEvent) {
        if self.capacity == 0 {
            return;
        }
        self.bytes += event.data.len();
        self.events.push_back(event);
        while self.bytes > self.capacity {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
        }
    }

    fn drop_before(&mut self, begin: i64) {
        while self.events.front().is_some_and(|e| e.sequence < begin) {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }

    /// The read from `next` (already within the retained range), if the cache covers it.
    fn serve(&self, next: i64, max_events: usize, max_bytes: usize) -> Option<Vec<StoredEvent>> {
        let first = self.events.front()?.sequence;
        if next < first {
            return None;
        }
        let mut bytes = 0usize;
        let mut out = Vec::new();
        for event in self.events.range((next - first) as usize..) {
            if out.len() == max_events
                || (!out.is_empty() && bytes.saturating_add(event.data.len()) > max_bytes)
            {
                break;
            }
            bytes = bytes.saturating_add(event.data.len());
            out.push(event.clone());
        }
        Some(out)
    }
}

/// One partition as readers see it.
#[derive(Debug)]
struct Partition {
    index: Index<Arc<File>>,
    cache: TailCache,
}

/// What the writer thread and the readers share.
struct Shared {
    dir: PathBuf,
    options: LogOptions,
    partitions: Vec<RwLock<Partition>>,
    tails: Tails,
    counters: Counters,
    faults: Faults,
}

impl Shared {
    // Nothing under these locks can panic halfway through an update but an allocation
    // failure, which aborts anyway; recovering the guard keeps the log usable.
    fn partition(&self, partition: u32) -> RwLockWriteGuard<'_, Partition> {
        self.partitions[partition as usize]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// An [`EventLog`] in a directory of segment files.
///
/// Every appended event is fsynced before `append` returns, so dropping the log (or the
/// process dying) never loses an acknowledged event. Dropping without `close` lets the writer
/// finish what is already queued and waits for it, so the directory can be reopened right away.
/// If an `append` future is dropped after its events were queued, they may still be stored.
pub struct DiskLog {
    shared: Arc<Shared>,
    // `None` only while dropping, so that the writer sees the channel close.
    requests: Option<mpsc::Sender<Request>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    // The directory's lock, released by `close` so that the same process may reopen it.
    lock: Mutex<Option<File>>,
    // Set by `close`, so a refused send is reported as `Closed` rather than as a dead writer.
    closing: AtomicBool,
}

impl fmt::Debug for DiskLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskLog")
            .field("dir", &self.shared.dir)
            .field("partitions", &self.shared.options.partitions)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl DiskLog {
    /// Opens the log in `dir`, creating it when missing, recovers every partition and starts
    /// the writer thread. Recovery reads each sealed segment's saved index and scans the last
    /// segment, cutting a torn tail off it; a sealed segment without a usable index is scanned
    /// too. Blocking: call it from `spawn_blocking` in async code.
    ///
    /// Fails with [`Error::PartitionMismatch`] when `dir` was made for another partition
    /// count, [`Error::Unavailable`] when another log has it open or I/O fails, and
    /// [`Error::Corrupt`] when its files cannot be made sense of.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<DiskLog> {
        let dir = dir.as_ref().to_path_buf();
        options.validate()?;
        let lock = files::prepare(&dir, options.partitions)?;

        let mut states = Vec::new();
        let mut writers = Vec::new();
        for partition in 0..options.partitions {
            let partition_dir = files::partition_dir(&dir, partition);
            let recovered = files::recover_partition(&partition_dir)?;
            let Some(active) = recovered.index.active() else {
                return Err(Error::Corrupt(format!(
                    "{}: no active segment",
                    partition_dir.display()
                )));
            };
            writers.push(PartitionWriter {
                at: Cursor {
                    active: Arc::clone(&active.body),
                    active_len: recovered.active_len,
                    active_count: recovered.active_count,
                    next_seq: recovered.index.next_seq(),
                    next_offset: active.base_offset + recovered.active_len,
                    last_time: recovered.last_time,
                },
                dir: partition_dir,
                repair: false,
            });
            states.push(recovered.index);
        }

        let shared = Arc::new(Shared {
            tails: Tails::new(states.iter().map(Index::next_seq)),
            partitions: states
                .into_iter()
                .map(|index| {
                    RwLock::new(Partition {
                        index,
                        cache: TailCache {
                            capacity: options.tail_cache_bytes,
                            ..TailCache::default()
                        },
                    })
                })
                .collect(),
            dir: dir.clone(),
            options,
            counters: Counters::default(),
            faults: Faults::default(),
        });
        let (requests, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("twinhub-eventlog-writer".into())
                .spawn(move || writer::run(&shared, writers, queue))
                .map_err(|e| Error::Unavailable(format!("starting the event log writer: {e}")))?
        };
        tracing::debug!(dir = %dir.display(), "event log opened");
        Ok(DiskLog {
            shared,
            requests: Some(requests),
            writer: Mutex::new(Some(writer)),
            lock: Mutex::new(Some(lock)),
            closing: AtomicBool::new(false),
        })
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            groups: c.groups.load(Ordering::Relaxed),
            appends: c.appends.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
        }
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn check(&self, partition: u32) -> Result<&RwLock<Partition>> {
        self.shared
            .partitions
            .get(partition as usize)
            .ok_or(Error::UnknownPartition(partition))
    }

    fn read_partition<T>(&self, partition: u32, f: impl FnOnce(&Partition) -> T) -> Result<T> {
        let state = self
            .check(partition)?
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(f(&state))
    }

    // Why the writer did not take or answer a request.
    fn writer_gone(&self) -> Error {
        if self.closing.load(Ordering::Acquire) {
            Error::Closed
        } else {
            Error::Unavailable("the event log writer thread stopped unexpectedly".into())
        }
    }

    async fn request<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T> {
        let Some(requests) = &self.requests else {
            return Err(Error::Closed);
        };
        let (reply, answer) = oneshot::channel();
        requests
            .send(request(reply))
            .await
            .map_err(|_| self.writer_gone())?;
        answer.await.map_err(|_| self.writer_gone())
    }
}

/// What a read does once planned under the partition's lock.
enum Plan {
    /// Nothing to read, or everything served from the tail cache.
    Done(Vec<StoredEvent>),
    /// Positioned reads of the segment files, on a blocking task.
    Read(Vec<Chunk>),
}

/// One run of records to read from one segment file.
struct Chunk {
    file: Arc<File>,
    /// Byte range in the file.
    start: u64,
    end: u64,
    first_seq: i64,
    /// Offset of the byte at `start`.
    offset: u64,
    count: usize,
}

/// Reads and checks the planned records. Damage stops the read: what came before it is
/// returned, or [`Error::Corrupt`] when the very first record is damaged.
fn read_chunks(partition: u32, chunks: Vec<Chunk>) -> Result<Vec<StoredEvent>> {
    let mut events = Vec::new();
    for chunk in chunks {
        let mut buf = vec![0; (chunk.end - chunk.start) as usize];
        if let Err(e) = chunk.file.read_exact_at(&mut buf, chunk.start) {
            let error = if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::Corrupt(format!(
                    "partition {partition}: the segment holding sequence {} is shorter than indexed",
                    chunk.first_seq
                ))
            } else {
                Error::Unavailable(format!("partition {partition}: reading: {e}"))
            };
            return if events.is_empty() {
                Err(error)
            } else {
                Ok(events)
            };
        }
        let buf = Bytes::from(buf);
        let mut at = 0usize;
        for i in 0..chunk.count {
            let sequence = chunk.first_seq + i as i64;
            let decoded = match record::decode(&buf[at..]) {
                Ok((r, len)) if r.sequence == sequence => Ok((r.enqueued_ms, r.data.len(), len)),
                Ok((r, _)) => Err(format!("found sequence {}", r.sequence)),
                Err(why) => Err(why),
            };
            match decoded {
                Ok((enqueued_ms, data_len, len)) => {
                    let data_at = at + RECORD_OVERHEAD;
                    events.push(StoredEvent {
                        sequence,
                        offset: chunk.offset + at as u64,
                        enqueued_ms,
                        data: buf.slice(data_at..data_at + data_len),
                    });
                    at += len;
                }
                Err(why) => {
                    tracing::error!(partition, sequence, "event log record is damaged: {why}");
                    if events.is_empty() {
                        return Err(Error::Corrupt(format!(
                            "partition {partition}: the record of sequence {sequence} is damaged: {why}"
                        )));
                    }
                    return Ok(events);
                }
            }
        }
    }
    Ok(events)
}

#[async_trait]
impl EventLog for DiskLog {
    fn partition_count(&self) -> u32 {
        self.shared.options.partitions
    }

    async fn append(&self, partition: u32, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        self.check(partition)?;
        self.shared.options.check_sizes(&events)?;
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.request(|reply| Request::Append {
            partition,
            events,
            reply,
        })
        .await?
    }

    fn info(&self, partition: u32) -> Result<PartitionInfo> {
        self.read_partition(partition, |p| p.index.info())
    }

    fn resolve(&self, partition: u32, from: &Position) -> Result<i64> {
        self.read_partition(partition, |p| p.index.resolve(from))
    }

    async fn read(
        &self,
        partition: u32,
        next: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        let plan = self.read_partition(partition, |p| {
            let next = next.max(p.index.begin());
            if max_events == 0 || next >= p.index.next_seq() {
                return Ok(Plan::Done(Vec::new()));
            }
            if let Some(events) = p.cache.serve(next, max_events, max_bytes) {
                return Ok(Plan::Done(events));
            }
            let spans = p
                .index
                .plan(next, max_events, max_bytes, |segment, i| {
                    segment.record_len(i) as usize - RECORD_OVERHEAD
                })
                .map_err(|e| match e {
                    Error::Corrupt(why) => Error::Corrupt(format!("partition {partition}: {why}")),
                    e => e,
                })?;
            let segments = p.index.segments();
            let chunks = spans
                .into_iter()
                .map(|span| {
                    let segment = &segments[span.segment];
                    let start = segment.position(span.from);
                    Chunk {
                        file: Arc::clone(&segment.body),
                        start,
                        end: segment.position(span.to),
                        first_seq: segment.first_seq + span.from as i64,
                        offset: segment.base_offset + start,
                        count: span.to - span.from,
                    }
                })
                .collect();
            Ok(Plan::Read(chunks))
        })??;
        match plan {
            Plan::Done(events) => Ok(events),
            Plan::Read(chunks) => {
                tokio::task::spawn_blocking(move || read_chunks(partition, chunks))
                    .await
                    .map_err(|e| Error::Unavailable(format!("the read task failed: {e}")))?
            }
        }
    }

    async fn wait_for(&self, partition: u32, next: i64) -> Result<()> {
        self.check(partition)?;
        self.shared.tails.wait_for(partition, next).await
    }

    async fn enforce_retention(&self, now_ms: i64) -> Result<u64> {
        self.request(|reply| Request::Retention { now_ms, reply })
            .await
    }

    async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let Some(requests) = &self.requests else {
            return;
        };
        let (reply, done) = oneshot::channel();
        if requests.send(Request::Close { reply }).await.is_ok() {
            // Answered once every append queued before this point is stored; the writer
            // dropping the reply instead means it died, and then nothing is pending either.
            let _ = done.await;
        }
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let joined = tokio::task::spawn_blocking(move || writer.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the event log writer thread panicked");
            }
        }
        // The writer wakes waiters when it stops; this covers a writer that died.
        self.shared.tails.close();
        self.lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

impl Drop for DiskLog {
    fn drop(&mut self) {
        // Closing our end lets the writer drain what is queued and stop; waiting for it means
        // the directory can be reopened at once. Everything it holds was queued by callers
        // that have gone, so this is bounded work.
        drop(self.requests.take());
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("the event log writer thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> LogOptions {
        LogOptions {
            partitions: 2,
            segment_bytes: 4096,
            ..LogOptions::default()
        }
    }

    fn events(count: usize, size: usize, fill: u8) -> Vec<NewEvent> {
        (0..count)
            .map(|_| NewEvent::new(vec![fill; size]))
            .collect()
    }

    fn segment_files(dir: &Path, partition: u32) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(files::partition_dir(dir, partition))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        files
    }

    async fn all(log: &DiskLog, partition: u32) -> Vec<StoredEvent> {
        log.read(partition, 0, usize::MAX, usize::MAX)
            .await
            .unwrap()
    }

    /// After a failed append the partition is as before it, on disk too: the next append
    /// takes the same sequence number and offset, and a reopen finds only whole records.
    async fn refused_then_consistent(fault: impl Fn(&Faults), leftover: bool) {
        let tmp = tempfile::tempdir().unwrap();
        let log = DiskLog::open(tmp.path(), options()).unwrap();
        log.append(0, events(2, 100, 1)).await.unwrap();
        fault(&log.shared.faults);
        let failed = log.append(0, events(3, 100, 2)).await;
        assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
        assert_eq!(log.info(0).unwrap().last_sequence, 1);
        assert_eq!(all(&log, 0).await.len(), 2);
        let record = (100 + RECORD_OVERHEAD) as u64;
        let active = segment_files(tmp.path(), 0).pop().unwrap();
        let len = std::fs::metadata(&active).unwrap().len();
        if leftover {
            assert!(
                len > 2 * record,
                "the injected failure left nothing to repair"
            );
        } else {
            assert_eq!(len, 2 * record, "the failed append was not truncated");
        }
        // The other partition is unaffected.
        log.append(1, events(1, 10, 9)).await.unwrap();

        let next = log.append(0, events(1, 100, 3)).await.unwrap();
        assert_eq!(next[0].sequence, 2);
        assert_eq!(next[0].offset, 2 * (100 + RECORD_OVERHEAD) as u64);
        assert_eq!(std::fs::metadata(&active).unwrap().len(), 3 * record);
        log.close().await;
        drop(log);

        let log = DiskLog::open(tmp.path(), options()).unwrap();
        let read = all(&log, 0).await;
        let fills: Vec<u8> = read.iter().map(|e| e.data[0]).collect();
        assert_eq!(fills, [1, 1, 3]);
        log.close().await;
    }

    #[tokio::test]
    async fn a_failed_write_is_refused_and_leaves_no_half_record() {
        refused_then_consistent(|f| f.writes.store(1, Ordering::SeqCst), false).await;
    }

    #[tokio::test]
    async fn a_failed_fsync_is_refused_and_rolled_back() {
        refused_then_consistent(|f| f.syncs.store(1, Ordering::SeqCst), false).await;
    }

    #[tokio::test]
    async fn a_half_record_that_could_not_be_truncated_is_cut_before_the_next_append() {
        let fault = |f: &Faults| {
            f.writes.store(1, Ordering::SeqCst);
            f.truncates.store(1, Ordering::SeqCst);
        };
        refused_then_consistent(fault, true).await;
    }

    /// A failure after the group created a segment removes that segment again.
    #[tokio::test]
    async fn a_failure_while_rolling_removes_the_new_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let log = DiskLog::open(tmp.path(), options()).unwrap();
        // 1024-byte records: four fill a segment.
        log.append(0, events(4, 1000, 1)).await.unwrap();
        assert_eq!(segment_files(tmp.path(), 0).len(), 1);
        // Six more: the first starts a segment, the fifth another; the write before that fails.
        log.shared.faults.writes.store(1, Ordering::SeqCst);
        let failed = log.append(0, events(6, 1000, 2)).await;
        assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
        assert_eq!(
            segment_files(tmp.path(), 0).len(),
            1,
            "the new segment stayed"
        );
        assert_eq!(log.info(0).unwrap().last_sequence, 3);

        let appended = log.append(0, events(6, 1000, 3)).await.unwrap();
        assert_eq!(appended[0].sequence, 4);
        assert_eq!(appended[0].offset, 4096);
        assert_eq!(segment_files(tmp.path(), 0).len(), 3);
        log.close().await;
        drop(log);
        let log = DiskLog::open(tmp.path(), options()).unwrap();
        let fills: Vec<u8> = all(&log, 0).await.iter().map(|e| e.data[0]).collect();
        assert_eq!(fills, [1, 1, 1, 1, 3, 3, 3, 3, 3, 3]);
        log.close().await;
    }

    /// Concurrent appends share fsyncs: far fewer groups than appends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let log = Arc::new(DiskLog::open(tmp.path(), options()).unwrap());
        let tasks: Vec<_> = (0..64u32)
            .map(|i| {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    for _ in 0..10 {
                        log.append(i % 2, events(1, 100, 0)).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let stats = log.stats();
        assert_eq!((stats.appends, stats.events), (640, 640));
        assert!(
            stats.groups < stats.appends / 4,
            "appends were not grouped: {stats:?}"
        );
        log.close().await;
    }

    #[test]
    fn the_tail_cache_keeps_the_newest_events_within_its_budget() {
        let mut cache = TailCache {
            capacity: 250,
            ..TailCache::default()
        };
        let event = |sequence: i64| StoredEvent {
            sequence,
            offset: sequence as u64 * 124,
            enqueued_ms: 0,
            data: Bytes::from(vec![0; 100]),
        };
        assert!(cache.serve(0, 10, usize::MAX).is_none());
        for sequence in 0..5 {
            cache.push(event(sequence));
        }
        assert!(cache.serve(2, 10, usize::MAX).is_none(), "evicted");
        let served = cache.serve(3, 10, usize::MAX).unwrap();
        assert_eq!(
            served.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(cache.serve(3, 1, usize::MAX).unwrap().len(), 1);
        assert_eq!(cache.serve(3, 10, 150).unwrap().len(), 1);
        assert!(cache.serve(5, 10, usize::MAX).unwrap().is_empty());
        cache.drop_before(4);
        assert!(cache.serve(3, 10, usize::MAX).is_none());
    }
}

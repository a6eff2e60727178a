//! The disk log's single writer thread: group commit of appends, and retention.
//!
//! Callers queue their append on a bounded channel and wait for a reply. The writer drains
//! whatever is queued (a group), writes each partition's records with one positioned write per
//! segment, fsyncs every file it touched once, then publishes the records to readers (index,
//! tail cache, waiters) and answers every caller. Many callers, on one or several partitions,
//! so share one fsync per file.
//!
//! A partition whose write or fsync fails answers its callers [`Error::Unavailable`] and is put
//! back as it was before the group: segment files the group created are removed and the
//! active segment is truncated to its last durable length, retried before the next append if
//! it fails too. Nothing of a failed group is ever published, and no half record stays behind
//! for a later append to bury.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::files::{create_segment, encode_index, index_path, save_index, segment_path, sync_dir};
use super::{Faults, Shared};
use crate::index::rolls;
use crate::record::{self, record_len};
use crate::{Appended, Error, NewEvent, Result, StoredEvent};

/// A group stops growing at this many appends, so one round stays bounded in time...
const MAX_GROUP_APPENDS: usize = 1024;
/// ...and at roughly this many bytes of event data, so it stays bounded in memory.
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;

pub(super) enum Request {
    Append {
        partition: u32,
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<Vec<Appended>>>,
    },
    Retention {
        now_ms: i64,
        reply: oneshot::Sender<u64>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

struct Pending {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// Where a partition's next record goes.
#[derive(Clone)]
pub(super) struct Cursor {
    pub active: Arc<File>,
    /// Durable length of the active segment (in the writer's own view, during a group).
    pub active_len: u64,
    pub active_count: usize,
    pub next_seq: i64,
    pub next_offset: u64,
    pub last_time: Option<i64>,
}

/// The writer's state of one partition.
pub(super) struct PartitionWriter {
    pub dir: PathBuf,
    pub at: Cursor,
    /// The active segment may hold bytes past `at.active_len` (a failed write that could not
    /// be truncated at once): truncate before writing again.
    pub repair: bool,
}

struct StagedRecord {
    new_segment: Option<Arc<File>>,
    len: u64,
    appended: Appended,
    data: Bytes,
}

/// What one partition's share of a group wrote, not yet durable.
#[derive(Default)]
struct Staged {
    records: Vec<StagedRecord>,
    /// Files written and not yet fsynced.
    to_sync: Vec<Arc<File>>,
    /// Segment files created by this group (removed again if it fails).
    created: Vec<PathBuf>,
    end: Option<Cursor>,
}

/// The writer thread's loop: until every sender is gone, or `close` was asked and the queue
/// is drained.
pub(super) fn run(
    shared: &Shared,
    mut partitions: Vec<PartitionWriter>,
    mut queue: mpsc::Receiver<Request>,
) {
    let mut close_replies = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut appends: Vec<Vec<Pending>> = partitions.iter().map(|_| Vec::new()).collect();
        let mut retentions = Vec::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Append {
                    partition,
                    events,
                    reply,
                } => {
                    count += 1;
                    bytes += events.iter().map(|e| e.data.len()).sum::<usize>();
                    // `append` checked the partition before queuing.
                    if let Some(queue) = appends.get_mut(partition as usize) {
                        queue.push(Pending { events, reply });
                    }
                }
                Request::Retention { now_ms, reply } => retentions.push((now_ms, reply)),
                Request::Close { reply } => {
                    // Refuse new sends; what is already queued still arrives and is written,
                    // and `blocking_recv` returns `None` once it is drained.
                    queue.close();
                    close_replies.push(reply);
                }
            }
            if count < MAX_GROUP_APPENDS && bytes < MAX_GROUP_BYTES {
                next = queue.try_recv().ok();
            }
        }
        if count > 0 {
            commit(shared, &mut partitions, appends);
        }
        for (now_ms, reply) in retentions {
            let _ = reply.send(enforce_retention(shared, &partitions, now_ms));
        }
    }
    shared.tails.close();
    for reply in close_replies {
        // The closer may have given up waiting; nothing to tell it then.
        let _ = reply.send(());
    }
    tracing::debug!(dir = %shared.dir.display(), "event log writer stopped");
}

/// Writes, fsyncs, publishes and answers one group.
fn commit(shared: &Shared, partitions: &mut [PartitionWriter], appends: Vec<Vec<Pending>>) {
    let now = shared.options.clock.now_ms();
    let segment_bytes = shared.options.segment_bytes;
    let mut outcomes = Vec::new();
    for (partition, (writer, group)) in partitions.iter_mut().zip(appends).enumerate() {
        if group.is_empty() {
            continue;
        }
        let mut staged = Staged::default();
        let written = writer.stage(&group, now, segment_bytes, &shared.faults, &mut staged);
        outcomes.push((partition, group, staged, written));
    }

    // Every file of the group is fsynced before anyone is answered; partitions sync in
    // parallel, since their files are independent.
    let syncs: Vec<io::Result<u64>> = {
        let sync = |staged: &Staged| sync_staged(staged, &shared.faults);
        let pending: Vec<&Staged> = outcomes
            .iter()
            .filter(|(_, _, _, written)| written.is_ok())
            .map(|(_, _, staged, _)| staged)
            .collect();
        // The writer thread syncs the first partition itself; the others get a thread each.
        match pending.split_first() {
            None => Vec::new(),
            Some((first, rest)) => std::thread::scope(|scope| {
                let handles: Vec<_> = rest
                    .iter()
                    .map(|&staged| scope.spawn(move || sync(staged)))
                    .collect();
                let mut out = Vec::with_capacity(pending.len());
                out.push(sync(first));
                out.extend(handles.into_iter().map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked")))
                }));
                out
            }),
        }
    };
    let mut syncs = syncs.into_iter();

    let counters = &shared.counters;
    counters.groups.fetch_add(1, Ordering::Relaxed);
    for (partition, group, staged, written) in outcomes {
        let writer = &mut partitions[partition];
        let result = match written {
            Ok(()) => match syncs.next() {
                Some(Ok(fsyncs)) => {
                    counters.fsyncs.fetch_add(fsyncs, Ordering::Relaxed);
                    Ok(())
                }
                Some(Err(e)) => Err(format!("fsync failed: {e}")),
                None => Err("internal error: a partition's fsync went missing".into()),
            },
            Err(e) => Err(format!("write failed: {e}")),
        };
        match result {
            Ok(()) => {
                counters
                    .appends
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                counters
                    .events
                    .fetch_add(staged.records.len() as u64, Ordering::Relaxed);
                publish(shared, partition as u32, writer, staged, group);
            }
            Err(reason) => {
                let reason = format!(
                    "partition {partition} of {}: {reason}",
                    shared.dir.display()
                );
                tracing::error!(error = %reason, appends = group.len(), "event log append failed");
                writer.rollback(staged, &shared.faults);
                for pending in group {
                    let _ = pending.reply.send(Err(Error::Unavailable(reason.clone())));
                }
            }
        }
    }
}

/// fsyncs what a partition wrote (and its directory, if segments were created); returns how
/// many fsyncs that took.
fn sync_staged(staged: &Staged, faults: &Faults) -> io::Result<u64> {
    let mut fsyncs = 0;
    for file in &staged.to_sync {
        faults.sync()?;
        file.sync_data()?;
        fsyncs += 1;
    }
    if let Some(dir) = staged.created.first().and_then(|p| p.parent()) {
        sync_dir(dir)?;
        fsyncs += 1;
    }
    Ok(fsyncs)
}

/// Makes a durable group visible to readers and answers its callers.
fn publish(
    shared: &Shared,
    partition: u32,
    writer: &mut PartitionWriter,
    staged: Staged,
    group: Vec<Pending>,
) {
    if let Some(end) = staged.end {
        writer.at = end;
    }
    let mut answers = Vec::with_capacity(staged.records.len());
    let created = staged.created.len();
    let (next, sealed) = {
        let mut state = shared.partition(partition);
        for record in staged.records {
            state
                .index
                .append(record.len, record.appended.enqueued_ms, record.new_segment);
            state.cache.push(StoredEvent {
                sequence: record.appended.sequence,
                offset: record.appended.offset,
                enqueued_ms: record.appended.enqueued_ms,
                data: record.data,
            });
            answers.push(record.appended);
        }
        // The segments this group sealed: the `created` ones before the new active one.
        let segments = state.index.segments();
        let sealed: Vec<(PathBuf, Vec<u8>)> = segments
            .range(segments.len().saturating_sub(created + 1)..segments.len().saturating_sub(1))
            .map(|segment| {
                let path = segment_path(&writer.dir, segment.first_seq, segment.base_offset);
                (index_path(&path), encode_index(segment, segment.len()))
            })
            .collect();
        (state.index.next_seq(), sealed)
    };
    shared.tails.publish(partition, next);
    let mut answers = answers.into_iter();
    for pending in group {
        let mine: Vec<Appended> = answers.by_ref().take(pending.events.len()).collect();
        // A caller whose future was dropped no longer listens; its events are stored anyway.
        let _ = pending.reply.send(Ok(mine));
    }
    // After the answers: nobody waits for an index, which only speeds up the next open.
    for (path, bytes) in sealed {
        if let Err(e) = save_index(&path, &bytes) {
            tracing::warn!(index = %path.display(), "could not save a segment index: {e}");
        }
    }
}

impl PartitionWriter {
    /// Writes a partition's share of a group, rolling segments as they fill. Nothing is
    /// durable or visible yet; on error, `staged` says what to undo.
    fn stage(
        &mut self,
        group: &[Pending],
        now: i64,
        segment_bytes: u64,
        faults: &Faults,
        staged: &mut Staged,
    ) -> io::Result<()> {
        if self.repair {
            self.at.active.set_len(self.at.active_len)?;
            self.at.active.sync_data()?;
            self.repair = false;
            tracing::info!(dir = %self.dir.display(), "event log partition repaired after a failed write");
        }
        let mut at = self.at.clone();
        let enqueued_ms = at.last_time.map_or(now, |last| last.max(now));
        let mut buf = Vec::new();
        let mut buf_at = at.active_len;
        for event in group.iter().flat_map(|pending| &pending.events) {
            let len = record_len(event.data.len());
            let mut new_segment = None;
            if rolls(at.active_len, at.active_count, len, segment_bytes) {
                // The sealed segment is made durable before its successor exists, so after a
                // crash only the last segment can have a torn tail.
                write(faults, &at.active, &buf, buf_at)?;
                faults.sync()?;
                at.active.sync_data()?;
                buf.clear();
                let path = segment_path(&self.dir, at.next_seq, at.next_offset);
                let file = Arc::new(create_segment(&path)?);
                staged.created.push(path);
                at.active = Arc::clone(&file);
                at.active_len = 0;
                at.active_count = 0;
                buf_at = 0;
                new_segment = Some(file);
            }
            record::encode(&mut buf, at.next_seq, enqueued_ms, &event.data);
            staged.records.push(StagedRecord {
                new_segment,
                len,
                appended: Appended {
                    sequence: at.next_seq,
                    offset: at.next_offset,
                    enqueued_ms,
                },
                data: event.data.clone(),
            });
            at.next_seq += 1;
            at.next_offset += len;
            at.active_len += len;
            at.active_count += 1;
        }
        if !buf.is_empty() {
            write(faults, &at.active, &buf, buf_at)?;
            staged.to_sync.push(Arc::clone(&at.active));
        }
        if !staged.records.is_empty() {
            at.last_time = Some(enqueued_ms);
        }
        staged.end = Some(at);
        Ok(())
    }

    /// Puts the partition back as it was before a failed group.
    fn rollback(&mut self, staged: Staged, faults: &Faults) {
        for path in &staged.created {
            if let Err(e) = std::fs::remove_file(path) {
                // Left behind, it is emptied when the segment is created again, or cut as a
                // torn tail at the next open.
                tracing::warn!(segment = %path.display(), "could not remove a segment of a failed append: {e}");
            }
        }
        self.repair = true;
        let truncated = faults
            .truncate()
            .and_then(|()| self.at.active.set_len(self.at.active_len))
            .and_then(|()| self.at.active.sync_data());
        match truncated {
            Ok(()) => self.repair = false,
            Err(e) => tracing::warn!(
                dir = %self.dir.display(),
                "could not truncate a failed append yet (retried before the next one): {e}"
            ),
        }
    }
}

fn write(faults: &Faults, file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    if faults.write() {
        // As a full disk does: part of the buffer lands, then the write fails.
        file.write_all_at(&buf[..buf.len() / 2], at)?;
        return Err(io::Error::other("injected write failure"));
    }
    file.write_all_at(buf, at)
}

/// Drops expired segments from every partition: first from the index (new reads no longer
/// reach them), then their files. A reader already holding a dropped file finishes from it.
fn enforce_retention(shared: &Shared, partitions: &[PartitionWriter], now_ms: i64) -> u64 {
    let cutoff = now_ms.saturating_sub(shared.options.retention_ms());
    let mut total = 0;
    for (partition, writer) in partitions.iter().enumerate() {
        let (segments, events) = {
            let mut state = shared.partition(partition as u32);
            let expired = state.index.expired(cutoff, shared.options.retention_bytes);
            let dropped = state.index.drop_oldest(expired);
            let begin = state.index.begin();
            state.cache.drop_before(begin);
            dropped
        };
        if segments.is_empty() {
            continue;
        }
        for segment in &segments {
            let path = segment_path(&writer.dir, segment.first_seq, segment.base_offset);
            if let Err(e) = std::fs::remove_file(&path) {
                // It comes back (with its events) at the next open, and is dropped again.
                tracing::warn!(segment = %path.display(), "could not remove an expired segment: {e}");
            }
            // A leftover index is removed at the next open.
            let _ = std::fs::remove_file(index_path(&path));
        }
        if let Err(e) = sync_dir(&writer.dir) {
            tracing::warn!(dir = %writer.dir.display(), "could not sync a partition directory: {e}");
        }
        tracing::debug!(
            partition,
            segments = segments.len(),
            events,
            "event log retention"
        );
        total += events;
    }
    total
}

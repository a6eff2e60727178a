//! The disk log's directory: its layout, the manifest, the lock, and recovery at open.
//!
//! ```text
//! <dir>/manifest            format and partition count, replaced atomically
//! <dir>/lock                held (flock) by the one DiskLog that has the directory open
//! <dir>/00/                 one directory per partition
//!     00000000000000000000-00000000000000000000.seg
//!     <first sequence (20 digits)>-<first offset (20 digits)>.seg
//!     <first sequence (20 digits)>-<first offset (20 digits)>.idx   (sealed segments)
//! ```
//!
//! A segment file is records back to back (see [`crate::record`]), nothing else. Files are
//! created 0600 and directories 0700: the events are device data.
//!
//! When a segment is sealed its index (every record's position and enqueued time, see
//! [`encode_index`]) is saved beside it, so that opening the log reads only the `.idx` files
//! and the last segment, not every event. A missing, torn or stale `.idx` (it is not fsynced,
//! and carries a CRC and the segment's length) only costs a scan of its segment, which writes
//! it again.
//!
//! Recovery scans the last (active) segment record by record, checking each CRC and sequence
//! number: the first record that is torn or damaged and everything after it are cut off. They
//! can only be an append that never completed (a sealed segment is fsynced before its
//! successor is created), so they were never acknowledged. A sealed segment is scanned only
//! without a usable `.idx`; damage found then is kept on disk but left out of the index, so
//! the events from there to the next segment are reported as [`Error::Corrupt`] by reads. With
//! a `.idx`, damage is found by the CRC check of every read, which reports that one event as
//! [`Error::Corrupt`] (a reader may skip it). Damaged data is never returned.

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::index::{Index, Segment};
use crate::record;
use crate::{Error, Result};

const MANIFEST: &str = "manifest";
const MANIFEST_TEMP: &str = "manifest.tmp";
const LOCK: &str = "lock";
const MAGIC: &str = "twinhub-eventlog";
const FORMAT: u32 = 1;
const SEGMENT_SUFFIX: &str = ".seg";
const INDEX_EXTENSION: &str = "idx";
const INDEX_MAGIC: &[u8; 8] = b"TWEVIDX1";

fn io_error(context: impl std::fmt::Display, e: io::Error) -> Error {
    Error::Unavailable(format!("{context}: {e}"))
}

pub(super) fn partition_dir(dir: &Path, partition: u32) -> PathBuf {
    dir.join(format!("{partition:02}"))
}

pub(super) fn segment_path(partition_dir: &Path, first_seq: i64, base_offset: u64) -> PathBuf {
    partition_dir.join(format!("{first_seq:020}-{base_offset:020}{SEGMENT_SUFFIX}"))
}

/// The saved index of the segment at `segment_path`.
pub(super) fn index_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension(INDEX_EXTENSION)
}

fn parse_segment_name(name: &str) -> Option<(i64, u64)> {
    parse_name(name.strip_suffix(SEGMENT_SUFFIX)?)
}

fn parse_index_name(name: &str) -> Option<(i64, u64)> {
    parse_name(name.strip_suffix(INDEX_EXTENSION)?.strip_suffix('.')?)
}

fn parse_name(stem: &str) -> Option<(i64, u64)> {
    let (seq, offset) = stem.split_once('-')?;
    if seq.len() != 20 || offset.len() != 20 {
        return None;
    }
    let seq: i64 = seq.parse().ok()?;
    (seq >= 0).then_some(())?;
    Some((seq, offset.parse().ok()?))
}

fn create_dir(path: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| io_error(format_args!("creating {}", path.display()), e))
}

/// Makes a directory's entries (files created, renamed or removed in it) durable.
pub(super) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Opens a new, empty segment file for reading and writing. A leftover file of that name can
/// only be an append that failed before it was acknowledged, so it is emptied.
pub(super) fn create_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates the directory if needed, takes its lock and checks (or writes) the manifest.
/// Returns the lock, held for as long as the file stays open.
pub(super) fn prepare(dir: &Path, partitions: u32) -> Result<File> {
    create_dir(dir)?;
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| io_error(format_args!("opening {}", lock_path.display()), e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(Error::Unavailable(format!(
                "{} is open in another event log (is a hub running on this data dir?)",
                dir.display()
            )));
        }
        Err(TryLockError::Error(e)) => {
            return Err(io_error(format_args!("locking {}", lock_path.display()), e));
        }
    }

    match read_manifest(dir)? {
        Some(found) if found != partitions => {
            return Err(Error::PartitionMismatch {
                found,
                expected: partitions,
            });
        }
        Some(_) => {
            for partition in 0..partitions {
                let path = partition_dir(dir, partition);
                if !path.is_dir() {
                    return Err(Error::Corrupt(format!(
                        "partition directory {} is missing",
                        path.display()
                    )));
                }
            }
        }
        None => {
            // A directory without a manifest is new, or its creation was interrupted before
            // the manifest (written last) landed; partition directories of a larger count
            // would mean it was made for another count.
            if let Some(found) = highest_partition_dir(dir)?
                && found >= partitions
            {
                return Err(Error::PartitionMismatch {
                    found: found + 1,
                    expected: partitions,
                });
            }
            for partition in 0..partitions {
                create_dir(&partition_dir(dir, partition))?;
            }
            write_manifest(dir, partitions)?;
        }
    }
    Ok(lock)
}

fn highest_partition_dir(dir: &Path) -> Result<Option<u32>> {
    let entries =
        fs::read_dir(dir).map_err(|e| io_error(format_args!("listing {}", dir.display()), e))?;
    let mut highest = None;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(format_args!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.parse::<u32>().ok()) {
            highest = highest.max(Some(n));
        }
    }
    Ok(highest)
}

fn read_manifest(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format_args!("reading {}", path.display()), e)),
    };
    let bad = |why: &str| Error::Corrupt(format!("{}: {why}", path.display()));
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad("not an event log manifest"));
    }
    let mut format = None;
    let mut partitions = None;
    for line in lines {
        match line.split_once(' ') {
            Some(("format", value)) => format = value.parse::<u32>().ok(),
            Some(("partitions", value)) => partitions = value.parse::<u32>().ok(),
            _ => {}
        }
    }
    match format {
        Some(FORMAT) => {}
        Some(other) => return Err(bad(&format!("unsupported format {other}"))),
        None => return Err(bad("no format")),
    }
    partitions
        .map(Some)
        .ok_or_else(|| bad("no partition count"))
}

/// Temp file, fsync, rename, fsync the directory: the manifest is either the old one or the
/// whole new one, whenever the machine stops.
fn write_manifest(dir: &Path, partitions: u32) -> Result<()> {
    let temp = dir.join(MANIFEST_TEMP);
    let text = format!("{MAGIC}\nformat {FORMAT}\npartitions {partitions}\n");
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, dir.join(MANIFEST))?;
        sync_dir(dir)
    };
    write().map_err(|e| io_error(format_args!("writing the manifest in {}", dir.display()), e))
}

/// A sealed segment's saved index, little-endian: magic, the segment file's length, the
/// readable length, the record count, every record's `u32` position, every record's `i64`
/// enqueued time, then a CRC-32 of everything before it.
pub(super) fn encode_index<B>(segment: &Segment<B>, file_len: u64) -> Vec<u8> {
    let (positions, times) = segment.entries();
    let mut buf = Vec::with_capacity(36 + positions.len() * 12);
    buf.extend_from_slice(INDEX_MAGIC);
    buf.extend_from_slice(&file_len.to_le_bytes());
    buf.extend_from_slice(&segment.len().to_le_bytes());
    buf.extend_from_slice(&(positions.len() as u64).to_le_bytes());
    for position in positions {
        buf.extend_from_slice(&position.to_le_bytes());
    }
    for time in times {
        buf.extend_from_slice(&time.to_le_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// The segment a saved index describes, if it is intact and made for a file of this length.
fn decode_index(
    bytes: &[u8],
    first_seq: i64,
    base_offset: u64,
    file_len: u64,
) -> Option<Segment<()>> {
    let (body, crc) = bytes.split_last_chunk::<4>()?;
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return None;
    }
    let (magic, rest) = body.split_first_chunk::<8>()?;
    let (stored_file_len, rest) = rest.split_first_chunk::<8>()?;
    let (len, rest) = rest.split_first_chunk::<8>()?;
    let (count, rest) = rest.split_first_chunk::<8>()?;
    let count = usize::try_from(u64::from_le_bytes(*count)).ok()?;
    if magic != INDEX_MAGIC
        || u64::from_le_bytes(*stored_file_len) != file_len
        || rest.len() != count.checked_mul(12)?
    {
        return None;
    }
    let (positions, times) = rest.split_at(count * 4);
    let positions = positions
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let times = times
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Segment::from_entries(
        first_seq,
        base_offset,
        positions,
        times,
        u64::from_le_bytes(*len),
        (),
    )
}

/// Saves a sealed segment's index. Not fsynced: a torn or lost one is rebuilt from the
/// segment at the next open.
pub(super) fn save_index(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// A partition as recovered from its files: the index over every segment, and where the
/// writer continues.
pub(super) struct Recovered {
    pub index: Index<Arc<File>>,
    pub active_len: u64,
    pub active_count: usize,
    /// The newest readable event's enqueued time, which later ones may not go below.
    pub last_time: Option<i64>,
}

/// Reads every segment of one partition, cutting a torn tail off the last one.
pub(super) fn recover_partition(dir: &Path) -> Result<Recovered> {
    let listing = |e| io_error(format_args!("listing {}", dir.display()), e);
    let mut names = Vec::new();
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).map_err(listing)? {
        let entry = entry.map_err(listing)?;
        let name = entry.file_name();
        let name = name.to_str().unwrap_or_default();
        if let Some(segment) = parse_segment_name(name) {
            names.push(segment);
        } else if let Some(segment) = parse_index_name(name) {
            indexes.push((segment, entry.path()));
        } else {
            tracing::debug!(file = %entry.path().display(), "ignoring a file that is not a segment");
        }
    }
    names.sort_unstable();
    // The index of a segment that retention removed (a crash between the two removals).
    for (segment, path) in indexes {
        if names.binary_search(&segment).is_err() {
            let _ = fs::remove_file(path);
        }
    }
    for pair in names.windows(2) {
        if pair[0].0 == pair[1].0 || pair[0].1 >= pair[1].1 {
            return Err(Error::Corrupt(format!(
                "segments in {} overlap: {:?} and {:?}",
                dir.display(),
                pair[0],
                pair[1]
            )));
        }
    }
    if names.is_empty() {
        let path = segment_path(dir, 0, 0);
        create_segment(&path)
            .and_then(|_| sync_dir(dir))
            .map_err(|e| io_error(format_args!("creating {}", path.display()), e))?;
        names.push((0, 0));
    }

    let mut segments = Vec::with_capacity(names.len());
    let last_at = names.len() - 1;
    for (at, &(first_seq, base_offset)) in names.iter().enumerate() {
        let path = segment_path(dir, first_seq, base_offset);
        let segment = recover_segment(&path, first_seq, base_offset, at == last_at)?;
        if let Some(&(next_seq, next_offset)) = names.get(at + 1)
            && (segment.end_seq() > next_seq || base_offset + segment.len() > next_offset)
        {
            return Err(Error::Corrupt(format!(
                "{} holds events past the start of the next segment",
                path.display()
            )));
        }
        segments.push(segment);
    }

    // An empty last segment after a segment cut short: an append that created it failed, its
    // rollback truncated the previous segment but could not remove this one, and the process
    // stopped before the writer reused it. Its name claims sequence numbers that were never
    // assigned; without it the previous segment is the active one again. (A sealed segment
    // that is damaged but whole on disk is not this case, and keeps its successor.)
    if let [.., previous, last] = &segments[..]
        && last.count() == 0
        && previous
            .body
            .metadata()
            .is_ok_and(|m| previous.base_offset + m.len() < last.base_offset)
    {
        let path = segment_path(dir, last.first_seq, last.base_offset);
        tracing::warn!(segment = %path.display(), "removing an empty segment left by a failed append");
        fs::remove_file(&path)
            .and_then(|()| sync_dir(dir))
            .map_err(|e| io_error(format_args!("removing {}", path.display()), e))?;
        return recover_partition(dir);
    }

    let newest = segments
        .iter()
        .rev()
        .find_map(|s| s.count().checked_sub(1).map(|i| (s, i)));
    let next_seq = segments.last().map_or(0, Segment::end_seq);
    // Known only if the newest readable event is the last one assigned.
    let last = newest
        .filter(|(s, i)| s.first_seq + *i as i64 + 1 == next_seq)
        .map(|(s, i)| (s.offset(i), s.time(i)));
    let last_time = newest.map(|(s, i)| s.time(i));
    let (active_len, active_count) = segments.last().map_or((0, 0), |s| (s.len(), s.count()));
    Ok(Recovered {
        index: Index::new(segments, last),
        active_len,
        active_count,
        last_time,
    })
}

fn recover_segment(
    path: &Path,
    first_seq: i64,
    base_offset: u64,
    last: bool,
) -> Result<Segment<Arc<File>>> {
    let shown = path.display();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_error(format_args!("opening {shown}"), e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_error(format_args!("reading {shown}"), e))?
        .len();
    if !last {
        let saved = fs::read(index_path(path))
            .ok()
            .and_then(|bytes| decode_index(&bytes, first_seq, base_offset, file_len));
        if let Some(segment) = saved {
            return Ok(segment.with_body(Arc::new(file)));
        }
    }
    // A whole segment at once: they are bounded by `segment_bytes` (plus one oversized event),
    // and one sequential read is the fastest way through.
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| io_error(format_args!("reading {shown}"), e))?;

    let mut segment = Segment::new(first_seq, base_offset, ());
    let mut damage = None;
    let mut at = 0usize;
    while at < data.len() {
        match record::decode(&data[at..]) {
            Ok((r, len)) if r.sequence == segment.end_seq() => {
                segment.push(len as u64, r.enqueued_ms);
                at += len;
            }
            Ok((r, _)) => {
                damage = Some(format!(
                    "record at byte {at} has sequence {}, expected {}",
                    r.sequence,
                    segment.end_seq()
                ));
                break;
            }
            Err(why) => {
                damage = Some(format!("at byte {at}: {why}"));
                break;
            }
        }
    }
    if let Some(why) = damage {
        let cut = data.len() - at;
        if last {
            tracing::warn!(
                segment = %shown,
                bytes = cut,
                "cutting a torn or damaged tail off the event log ({why}); it was never acknowledged"
            );
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error(format_args!("truncating {shown}"), e))?;
        } else {
            tracing::error!(
                segment = %shown,
                bytes = cut,
                from_sequence = segment.end_seq(),
                "event log segment is damaged ({why}); its events from there on are unreadable"
            );
        }
    }
    if !last {
        let index = index_path(path);
        if let Err(e) = save_index(&index, &encode_index(&segment, file_len)) {
            tracing::warn!(index = %index.display(), "could not save a segment index: {e}");
        }
    }
    Ok(segment.with_body(Arc::new(file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let path = segment_path(Path::new("/x"), 42, 1234);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap();
        assert_eq!(name, "00000000000000000042-00000000000000001234.seg");
        assert_eq!(parse_segment_name(name), Some((42, 1234)));
        for bad in [
            "42-1234.seg",
            "00000000000000000042-00000000000000001234.tmp",
            "lock",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
        let index = index_path(&path);
        let name = index.file_name().and_then(|n| n.to_str()).unwrap();
        assert_eq!(name, "00000000000000000042-00000000000000001234.idx");
        assert_eq!(parse_index_name(name), Some((42, 1234)));
        assert_eq!(parse_segment_name(name), None);
    }

    #[test]
    fn segment_indexes_round_trip_and_refuse_damage() {
        let mut segment = Segment::new(7, 700, ());
        for i in 0..5 {
            segment.push(30 + i, 1_000 + i as i64);
        }
        let bytes = encode_index(&segment, 200);
        let back = decode_index(&bytes, 7, 700, 200).expect("an intact index");
        assert_eq!(back.entries(), segment.entries());
        assert_eq!((back.len(), back.end_seq()), (segment.len(), 12));
        // Made for a file of another length (the segment changed since): refused.
        assert!(decode_index(&bytes, 7, 700, 201).is_none());
        for cut in 0..bytes.len() {
            assert!(
                decode_index(&bytes[..cut], 7, 700, 200).is_none(),
                "cut at {cut}"
            );
        }
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(decode_index(&bad, 7, 700, 200).is_none(), "flip at {at}");
        }
        let empty = Segment::new(0, 0, ());
        assert!(decode_index(&encode_index(&empty, 0), 0, 0, 0).is_some());
    }
}

//! The disk log's directory: its layout, the manifest, the lock, and recovery at open.
//!
//! ```text
//! <dir>/manifest            format and partition count, replaced atomically
//! <dir>/lock                held (flock) by the one DiskLog that has the directory open
//! <dir>/00/                 one directory per partition
//!     00000000000000000000-00000000000000000000.seg
//!     <first sequence (20 digits)>-<first offset (20 digits)>.seg
//! ```
//!
//! A segment file is records back to back (see [`crate::record`]), nothing else. Files are
//! created 0600 and directories 0700: the events are device data.
//!
//! Recovery reads every segment once, sequentially, checking each record's CRC and sequence
//! number, to build the partition's [`Index`]. In the last (active) segment, the first record
//! that is torn or damaged and everything after it are cut off: they can only be an append
//! that never completed, so it was never acknowledged. In an older segment the same damage is
//! kept on disk but left out of the index: the events from there to the next segment are
//! reported as [`Error::Corrupt`] by reads rather than returned as garbage, and retention
//! drops that segment in its turn.

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

fn io_error(context: impl std::fmt::Display, e: io::Error) -> Error {
    Error::Unavailable(format!("{context}: {e}"))
}

pub(super) fn partition_dir(dir: &Path, partition: u32) -> PathBuf {
    dir.join(format!("{partition:02}"))
}

pub(super) fn segment_path(partition_dir: &Path, first_seq: i64, base_offset: u64) -> PathBuf {
    partition_dir.join(format!("{first_seq:020}-{base_offset:020}{SEGMENT_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<(i64, u64)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
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
    for entry in fs::read_dir(dir).map_err(listing)? {
        let entry = entry.map_err(listing)?;
        match entry.file_name().to_str().and_then(parse_segment_name) {
            Some(name) => names.push(name),
            None => tracing::debug!(
                file = %entry.path().display(),
                "ignoring a file that is not a segment"
            ),
        }
    }
    names.sort_unstable();
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
    }
}

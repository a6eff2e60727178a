//! In-memory [`EventLog`] backend for unit tests of the layers above (core, server).
//!
//! Each partition is an [`Index`] whose segments hold the events' data, behind its own lock.
//! Records are sized as on disk, so offsets, segment boundaries and retention behave exactly
//! as [`DiskLog`](crate::DiskLog)'s do; nothing survives the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::index::{Index, rolls};
use crate::record::record_len;
use crate::tail::Tails;
use crate::{
    Appended, Error, EventLog, LogOptions, NewEvent, PartitionInfo, Position, Result, StoredEvent,
};

/// An [`EventLog`] that keeps everything in process memory.
#[derive(Debug)]
pub struct MemoryLog {
    options: LogOptions,
    partitions: Vec<RwLock<Index<Vec<Bytes>>>>,
    tails: Tails,
    closed: AtomicBool,
}

impl MemoryLog {
    /// An empty log; fails only on invalid options.
    pub fn new(options: LogOptions) -> Result<Self> {
        options.validate()?;
        let partitions = (0..options.partitions)
            .map(|_| RwLock::new(Index::empty(Vec::new())))
            .collect();
        Ok(MemoryLog {
            tails: Tails::new((0..options.partitions).map(|_| 0)),
            options,
            partitions,
            closed: AtomicBool::new(false),
        })
    }

    fn partition(&self, partition: u32) -> Result<&RwLock<Index<Vec<Bytes>>>> {
        self.partitions
            .get(partition as usize)
            .ok_or(Error::UnknownPartition(partition))
    }

    // Nothing under these locks can panic halfway through an append but an allocation
    // failure, which aborts anyway; recovering the guard keeps one failed test from poisoning
    // the rest.
    fn read_index(&self, partition: u32) -> Result<RwLockReadGuard<'_, Index<Vec<Bytes>>>> {
        Ok(self
            .partition(partition)?
            .read()
            .unwrap_or_else(PoisonError::into_inner))
    }

    fn write_index(&self, partition: u32) -> Result<RwLockWriteGuard<'_, Index<Vec<Bytes>>>> {
        Ok(self
            .partition(partition)?
            .write()
            .unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    fn partition_count(&self) -> u32 {
        self.options.partitions
    }

    async fn append(&self, partition: u32, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        self.options.check_sizes(&events)?;
        let mut index = self.write_index(partition)?;
        // Checked under the partition's lock: `close` takes every lock after setting the flag,
        // so an append either finishes before `close` returns or is refused.
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let now = self.options.clock.now_ms();
        let enqueued_ms = index.last_time().map_or(now, |last| last.max(now));
        let mut appended = Vec::with_capacity(events.len());
        for event in events {
            let len = record_len(event.data.len());
            let roll = index
                .active()
                .is_some_and(|a| rolls(a.len(), a.count(), len, self.options.segment_bytes));
            let sequence = index.next_seq();
            let segment = index.append(len, enqueued_ms, roll.then(Vec::new));
            let offset = segment.offset(segment.count() - 1);
            segment.body.push(event.data);
            appended.push(Appended {
                sequence,
                offset,
                enqueued_ms,
            });
        }
        let next = index.next_seq();
        drop(index);
        self.tails.publish(partition, next);
        Ok(appended)
    }

    fn info(&self, partition: u32) -> Result<PartitionInfo> {
        Ok(self.read_index(partition)?.info())
    }

    fn resolve(&self, partition: u32, from: &Position) -> Result<i64> {
        Ok(self.read_index(partition)?.resolve(from))
    }

    async fn read(
        &self,
        partition: u32,
        next: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        let index = self.read_index(partition)?;
        let spans = index.plan(next, max_events, max_bytes, |segment, i| {
            segment.body[i].len()
        })?;
        let mut events = Vec::new();
        for span in spans {
            let segment = &index.segments()[span.segment];
            events.extend((span.from..span.to).map(|i| StoredEvent {
                sequence: segment.first_seq + i as i64,
                offset: segment.offset(i),
                enqueued_ms: segment.time(i),
                data: segment.body[i].clone(),
            }));
        }
        Ok(events)
    }

    async fn wait_for(&self, partition: u32, next: i64) -> Result<()> {
        self.partition(partition)?;
        self.tails.wait_for(partition, next).await
    }

    async fn enforce_retention(&self, now_ms: i64) -> Result<u64> {
        let cutoff = now_ms.saturating_sub(self.options.retention_ms());
        let mut dropped = 0;
        for partition in 0..self.options.partitions {
            let mut index = self.write_index(partition)?;
            let expired = index.expired(cutoff, self.options.retention_bytes);
            dropped += index.drop_oldest(expired).1;
        }
        Ok(dropped)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for partition in 0..self.options.partitions {
            // Waits for an append in progress on the partition.
            drop(self.write_index(partition));
        }
        self.tails.close();
    }
}

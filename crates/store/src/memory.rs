//! In-memory [`Store`] backend for unit tests of the layers above (core, server).
//!
//! One ordered map per [`Table`] behind a single lock, so a batch is applied under one write
//! guard and readers never observe half of it. Nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;

use crate::{Error, Result, Store, Table, Write};

/// A [`Store`] that keeps everything in process memory.
///
/// It honours the whole trait contract (atomic batches, byte-ordered keys, `close`) so tests
/// written against it hold for the durable backends too. Reads keep working after `close`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    // `String`'s `Ord` is the byte order of its UTF-8, which is the order the trait promises.
    tables: BTreeMap<Table, BTreeMap<String, Vec<u8>>>,
    closed: bool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock can only come from an allocation failure midway through
    // a batch, which aborts the process anyway; recovering the guard keeps the store usable
    // instead of turning one failed test into a cascade of poison panics.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>> {
        let state = self.read();
        Ok(state
            .tables
            .get(&table)
            .and_then(|entries| entries.get(key))
            .cloned())
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let state = self.read();
        let Some(entries) = state.tables.get(&table) else {
            return Ok(Vec::new());
        };
        let lower = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        Ok(entries
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    async fn count(&self, table: Table) -> Result<u64> {
        let state = self.read();
        let len = state.tables.get(&table).map_or(0, BTreeMap::len);
        // usize always fits u64 on the platforms Rust supports; saturate rather than panic.
        Ok(u64::try_from(len).unwrap_or(u64::MAX))
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let mut state = self.write();
        if state.closed {
            return Err(Error::Closed);
        }
        // Nothing below can fail, so applying in place under the guard is all-or-nothing.
        for write in writes {
            let entries = state.tables.entry(write.table).or_default();
            match write.value {
                Some(value) => {
                    entries.insert(write.key, value);
                }
                None => {
                    entries.remove(&write.key);
                }
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // Taking the write guard waits for any commit in progress, so everything that started
        // before `close` is in, and everything after sees `closed`.
        self.write().closed = true;
        Ok(())
    }
}

//! The embedded, on-disk [`Store`] backend over redb, with group commit.
//!
//! One dedicated writer thread owns every write transaction: callers queue their batch on a
//! bounded channel and wait for a reply; the writer drains whatever is queued, applies it in one
//! fsynced transaction and answers everyone. Reads run on the caller's task in redb read
//! transactions (MVCC snapshots), which never wait for the writer.

use std::fmt;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition, TableError,
    WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result, Store, Table, Write};

/// How many commit requests may wait for the writer before `commit` itself waits (backpressure).
const QUEUE_CAPACITY: usize = 4096;
/// A group stops growing at this many batches, so one transaction stays bounded in time...
const MAX_GROUP_BATCHES: usize = 1024;
/// ...and at roughly this many bytes of keys and values, so it stays bounded in memory.
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// redb's own limits on one key or value, and on a key and value together. Batches over them are
/// refused before they reach the writer, where they would fail the whole group they joined.
const MAX_ITEM_BYTES: usize = 3 * 1024 * 1024 * 1024;
const MAX_PAIR_BYTES: usize = MAX_ITEM_BYTES + 768 * 1024 * 1024;

/// Counters of the writer's work, to observe group commit in tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed (each one fsync).
    pub transactions: u64,
    /// Caller batches committed; `batches / transactions` is the mean group size.
    pub batches: u64,
}

/// A [`Store`] in one redb database file.
///
/// Every committed batch is fsynced before `commit` returns, so dropping the store (or the
/// process dying) never loses a batch whose `commit` returned `Ok`. Dropping without `close`
/// lets the writer finish what is already queued and waits for it to stop, so the same path
/// can be reopened right away.
///
/// If a `commit` future is dropped after its batch was queued, the batch may still be applied:
/// cancellation does not roll back.
pub struct RedbStore {
    // Emptied by `close`, which releases the database file (and its lock) even while other
    // parts of the process still hold the store: a restart in the same process can reopen it.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    // `None` only while dropping, so that the writer sees the channel close.
    requests: Option<mpsc::Sender<Request>>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    // Set by `close`, so a refused send is reported as `Closed` rather than as a dead writer.
    closing: AtomicBool,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("stats", &self.stats())
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    batches: AtomicU64,
}

enum Request {
    Commit {
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<()>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

fn backend(context: impl fmt::Display, err: impl fmt::Display) -> Error {
    Error::Backend(format!("{context}: {err}"))
}

impl RedbStore {
    /// Opens the database file at `path`, creating it (and its tables) when missing, and starts
    /// the writer thread.
    ///
    /// Fails with [`Error::Backend`] when the file cannot be created or opened (missing or
    /// read-only directory, already open elsewhere) or is not a redb database.
    pub fn open(path: &Path) -> Result<RedbStore> {
        let shown = path.display();
        // redb trusts files that look cleanly shut down and panics on some damaged outside
        // redb; a corrupt file must surface as an error to the operator, not abort startup.
        let db = catch_unwind(AssertUnwindSafe(|| {
            let db = Database::create(path)
                .map_err(|e| backend(format_args!("opening redb database {shown}"), e))?;
            create_tables(&db).map_err(|e| {
                backend(format_args!("creating tables in redb database {shown}"), e)
            })?;
            Ok(db)
        }))
        .map_err(|_| {
            Error::Backend(format!(
                "opening redb database {shown}: the file is damaged (redb panicked)"
            ))
        })??;

        let db = Arc::new(db);
        let counters = Arc::new(Counters::default());
        let (requests, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer = {
            let db = Arc::clone(&db);
            let counters = Arc::clone(&counters);
            std::thread::Builder::new()
                .name("twinhub-store-writer".into())
                .spawn(move || run_writer(&db, queue, &counters))
                .map_err(|e| backend("starting the store writer thread", e))?
        };
        tracing::debug!(path = %shown, "redb store opened");

        Ok(RedbStore {
            db: std::sync::RwLock::new(Some(db)),
            requests: Some(requests),
            writer: std::sync::Mutex::new(Some(writer)),
            counters,
            closing: AtomicBool::new(false),
        })
    }

    /// What the writer has committed so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
        }
    }

    // Why the writer did not take or answer a request.
    fn writer_gone(&self) -> Error {
        if self.closing.load(Ordering::Acquire) {
            Error::Closed
        } else {
            Error::Backend("the store writer thread stopped unexpectedly".into())
        }
    }

    fn read_table<T>(
        &self,
        table: Table,
        missing: T,
        read: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> Result<T>,
    ) -> Result<T> {
        let db = self
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(Error::Closed)?;
        let txn = db
            .begin_read()
            .map_err(|e| backend("beginning a read transaction", e))?;
        match txn.open_table(definition(table)) {
            Ok(handle) => read(&handle),
            // Tables are created at open; a missing one can only mean an empty table.
            Err(TableError::TableDoesNotExist(_)) => Ok(missing),
            Err(e) => Err(backend(format_args!("opening table {}", table.name()), e)),
        }
    }
}

fn create_tables(db: &Database) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    for table in Table::ALL {
        txn.open_table(definition(table))
            .map_err(|e| format!("{}: {e}", table.name()))?;
    }
    txn.commit().map_err(|e| e.to_string())
}

fn check_sizes(writes: &[Write]) -> Result<()> {
    for write in writes {
        let key = write.key.len();
        let value = write.value.as_ref().map_or(0, Vec::len);
        if key > MAX_ITEM_BYTES || value > MAX_ITEM_BYTES || key + value > MAX_PAIR_BYTES {
            return Err(Error::Backend(format!(
                "write to {} is too large for redb (key {key} bytes, value {value} bytes)",
                write.table.name()
            )));
        }
    }
    Ok(())
}

fn batch_bytes(writes: &[Write]) -> usize {
    writes
        .iter()
        .map(|w| w.key.len() + w.value.as_ref().map_or(0, Vec::len))
        .sum()
}

type Pending = (Vec<Write>, oneshot::Sender<Result<()>>);

/// The writer thread's loop: group, apply, answer, until every sender is gone or `close` was
/// asked and the queue is drained.
fn run_writer(db: &Database, mut queue: mpsc::Receiver<Request>, counters: &Counters) {
    let mut close_replies = Vec::new();
    let mut group: Vec<Pending> = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Commit { writes, reply } => {
                    bytes += batch_bytes(&writes);
                    group.push((writes, reply));
                }
                Request::Close { reply } => {
                    // Refuse new sends; what is already queued still arrives and is applied,
                    // and `blocking_recv` returns `None` once it is drained.
                    queue.close();
                    close_replies.push(reply);
                }
            }
            if group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
                next = queue.try_recv().ok();
            }
        }
        commit_group(db, &mut group, counters);
    }
    for reply in close_replies {
        // The closer may have given up waiting; nothing to tell it then.
        let _ = reply.send(());
    }
    tracing::debug!("store writer stopped");
}

/// Applies every batch of `group` in one durable transaction and answers each caller.
fn commit_group(db: &Database, group: &mut Vec<Pending>, counters: &Counters) {
    if group.is_empty() {
        return;
    }
    let batches = group.len() as u64;
    let outcome = if group.iter().all(|(writes, _)| writes.is_empty()) {
        // Nothing to make durable; skip the fsync.
        Ok(false)
    } else {
        apply(db, group).map(|()| true)
    };
    match outcome {
        Ok(wrote) => {
            if wrote {
                counters.transactions.fetch_add(1, Ordering::Relaxed);
            }
            counters.batches.fetch_add(batches, Ordering::Relaxed);
            for (_, reply) in group.drain(..) {
                // A caller whose future was dropped no longer listens.
                let _ = reply.send(Ok(()));
            }
        }
        Err(message) => {
            tracing::error!(error = %message, batches, "store group commit failed");
            for (_, reply) in group.drain(..) {
                let _ = reply.send(Err(Error::Backend(message.clone())));
            }
        }
    }
}

fn apply(db: &Database, group: &[Pending]) -> Result<(), String> {
    let mut txn = db
        .begin_write()
        .map_err(|e| format!("beginning a write transaction: {e}"))?;
    if let Err(e) = txn.set_durability(Durability::Immediate) {
        return Err(abort(txn, format!("setting durability: {e}")));
    }
    if let Err(message) = write_all(&txn, group) {
        return Err(abort(txn, message));
    }
    txn.commit()
        .map_err(|e| format!("committing a write transaction: {e}"))
}

fn write_all(txn: &WriteTransaction, group: &[Pending]) -> Result<(), String> {
    // Open each table once per transaction, on first use; there are only a handful.
    let mut open: Vec<(Table, redb::Table<'_, &'static str, &'static [u8]>)> = Vec::new();
    for (writes, _) in group {
        for write in writes {
            let index = match open.iter().position(|(table, _)| *table == write.table) {
                Some(index) => index,
                None => {
                    let handle = txn
                        .open_table(definition(write.table))
                        .map_err(|e| format!("opening table {}: {e}", write.table.name()))?;
                    open.push((write.table, handle));
                    open.len() - 1
                }
            };
            let Some((_, handle)) = open.get_mut(index) else {
                return Err("internal error: table handle vanished".into());
            };
            let result = match &write.value {
                Some(value) => handle
                    .insert(write.key.as_str(), value.as_slice())
                    .map(drop),
                None => handle.remove(write.key.as_str()).map(drop),
            };
            result.map_err(|e| format!("writing to table {}: {e}", write.table.name()))?;
        }
    }
    Ok(())
}

fn abort(txn: WriteTransaction, message: String) -> String {
    match txn.abort() {
        Ok(()) => message,
        Err(e) => format!("{message} (and aborting failed: {e})"),
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>> {
        self.read_table(table, None, |handle| {
            handle
                .get(key)
                .map(|found| found.map(|value| value.value().to_vec()))
                .map_err(|e| backend(format_args!("reading table {}", table.name()), e))
        })
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read_table(table, Vec::new(), |handle| {
            let context = || format!("scanning table {}", table.name());
            let lower = match after {
                Some(after) => Bound::Excluded(after),
                None => Bound::Unbounded,
            };
            let range = handle
                .range::<&str>((lower, Bound::Unbounded))
                .map_err(|e| backend(context(), e))?;
            // `limit` may be "everything" (usize::MAX); do not trust it as a capacity.
            let mut entries = Vec::with_capacity(limit.min(256));
            for entry in range.take(limit) {
                let (key, value) = entry.map_err(|e| backend(context(), e))?;
                entries.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(entries)
        })
    }

    async fn count(&self, table: Table) -> Result<u64> {
        self.read_table(table, 0, |handle| {
            handle
                .len()
                .map_err(|e| backend(format_args!("counting table {}", table.name()), e))
        })
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        check_sizes(&writes)?;
        let Some(requests) = &self.requests else {
            return Err(Error::Closed);
        };
        let (reply, answer) = oneshot::channel();
        requests
            .send(Request::Commit { writes, reply })
            .await
            .map_err(|_| self.writer_gone())?;
        answer.await.map_err(|_| self.writer_gone())?
    }

    async fn close(&self) -> Result<()> {
        self.closing.store(true, Ordering::Release);
        let Some(requests) = &self.requests else {
            return Ok(());
        };
        let (reply, done) = oneshot::channel();
        if requests.send(Request::Close { reply }).await.is_err() {
            // Already closed (or the writer is gone): nothing is pending any more.
            return Ok(());
        }
        // The writer answers once every batch queued before this point has been committed; it
        // dropping the reply instead means it died, and then nothing is pending either.
        let _ = done.await;
        self.release().await;
        Ok(())
    }
}

impl RedbStore {
    /// After `close`: waits for the writer thread to end and drops the database, releasing the
    /// file. Readers that started before keep their own handle until they finish.
    async fn release(&self) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let joined = tokio::task::spawn_blocking(move || writer.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the store writer thread panicked");
            }
        }
        self.db.write().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing our end lets the writer drain what is queued and stop; waiting for it releases
        // its handle on the database file, so the path can be reopened immediately. Every batch
        // it holds was queued by a caller that has already gone, so this is bounded work.
        drop(self.requests.take());
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("the store writer thread panicked");
        }
    }
}

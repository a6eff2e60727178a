//! The embedded, on-disk [`Store`] backend over redb, with group commit.
//!
//! One dedicated writer thread owns every write transaction: callers queue their batch on a
//! bounded channel and wait for a reply; the writer drains whatever is queued, applies it in one
//! fsynced transaction and answers everyone. Reads run on the caller's task in redb read
//! transactions (MVCC snapshots), which never wait for the writer.
//!
//! Faults: redb refuses all work after one failed write or fsync (a full disk, an I/O error)
//! until the database is reopened, and may panic on a damaged page. The writer survives both:
//! it answers the failed group with [`Error::Unavailable`], marks the store unhealthy (see
//! [`Store::health`]), and from then on reopens the file and commits a probe batch every
//! [`RETRY_EVERY`] until one succeeds, refusing batches meanwhile. Nothing committed before
//! the fault is lost: a failed transaction never became durable, and reopening repairs from
//! the last durable one.

use std::fmt;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    CommitError, Database, DatabaseError, Durability, ReadableDatabase, ReadableTableMetadata,
    StorageError, TableDefinition, TableError, TransactionError, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Health, Result, Store, Table, Write};

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
/// While faulty, how often the writer tries to reopen the file and commit a probe.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// The key the recovery probe writes in [`Table::Meta`].
const PROBE_KEY: &str = "store-probe";

/// Counters of the writer's work, to observe group commit in tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed (each one fsync).
    pub transactions: u64,
    /// Caller batches committed; `batches / transactions` is the mean group size.
    pub batches: u64,
    /// Faults seen (failed groups that made the writer reopen the database).
    pub faults: u64,
    /// Times the database was reopened after a fault.
    pub reopens: u64,
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
    shared: Arc<Shared>,
    // `None` only while dropping, so that the writer sees the channel close.
    requests: Option<mpsc::Sender<Request>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    // Set by `close`, so a refused send is reported as `Closed` rather than as a dead writer.
    closing: AtomicBool,
}

/// What the writer and the readers share.
struct Shared {
    path: PathBuf,
    // Emptied by `close`, which releases the database file (and its lock) even while other
    // parts of the process still hold the store: a restart in the same process can reopen it.
    // Also empty while the writer reopens the file after a fault.
    db: RwLock<Option<Arc<Database>>>,
    counters: Counters,
    // The last fault, until a commit succeeds or the store has been open again for
    // [`QUIET`] without failing; `None` when healthy.
    fault: Mutex<Option<Fault>>,
}

struct Fault {
    reason: String,
    last: Instant,
    /// Reopened since the last failure (writes may work again).
    reopened: bool,
}

/// A reopened store whose writes have not failed for this long counts as healthy, even if no
/// caller has written since (an idle hub must not report a fault forever).
pub const QUIET: Duration = Duration::from_secs(5);

impl Shared {
    fn current(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_fault(&self, reason: &str) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(Fault {
            reason: reason.to_string(),
            last: Instant::now(),
            reopened: false,
        });
    }

    fn reopened(&self) {
        if let Some(f) = &mut *self.fault.lock().unwrap_or_else(|e| e.into_inner()) {
            f.reopened = true;
        }
    }

    fn clear_fault(&self) {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if fault.is_some() {
            *fault = None;
        }
    }

    /// The reason the store is faulty, if it is.
    fn fault(&self) -> Option<String> {
        let mut guard = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        let f = guard.as_ref()?;
        if f.reopened && f.last.elapsed() >= QUIET {
            *guard = None;
            return None;
        }
        Some(f.reason.clone())
    }
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.shared.path)
            .field("stats", &self.stats())
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    batches: AtomicU64,
    faults: AtomicU64,
    reopens: AtomicU64,
}

enum Request {
    Commit {
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<()>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Test hook: the writer panics while applying this request's group.
    #[cfg(test)]
    Panic,
}

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

fn backend(context: impl fmt::Display, err: impl fmt::Display) -> Error {
    Error::Backend(format!("{context}: {err}"))
}

impl RedbStore {
    /// Opens the database file at `path`, creating it (and its tables) when missing, and starts
    /// the writer thread. The file is made readable by its owner only: it holds every key.
    ///
    /// Fails with [`Error::Backend`] when the file cannot be created or opened (missing or
    /// read-only directory, already open elsewhere) or is not a redb database.
    pub fn open(path: &Path) -> Result<RedbStore> {
        let db = open_database(path)?;
        restrict_mode(path);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            counters: Counters::default(),
            fault: Mutex::new(None),
        });
        let (requests, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("twinhub-store-writer".into())
                .spawn(move || run_writer(&shared, queue))
                .map_err(|e| backend("starting the store writer thread", e))?
        };
        tracing::debug!(path = %path.display(), "redb store opened");

        Ok(RedbStore {
            shared,
            requests: Some(requests),
            writer: Mutex::new(Some(writer)),
            closing: AtomicBool::new(false),
        })
    }

    /// What the writer has committed so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.counters;
        StoreStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            reopens: c.reopens.load(Ordering::Relaxed),
        }
    }

    /// Checks a database file offline: opens it (refused while a hub holds it), runs redb's
    /// integrity check (repairing what a crash left, as any open would) and returns every
    /// table's entries to `visit` in key order. Returns whether the integrity check passed.
    pub fn check_file(path: &Path, mut visit: impl FnMut(Table, &str, &[u8])) -> Result<bool> {
        let mut db = open_database(path)?;
        let intact = catch_unwind(AssertUnwindSafe(|| db.check_integrity()))
            .map_err(|_| {
                Error::Backend("the integrity check panicked: the file is damaged".into())
            })?
            .map_err(|e| backend("checking integrity", e))?;
        let txn = db
            .begin_read()
            .map_err(|e| backend("beginning a read transaction", e))?;
        for table in Table::ALL {
            let handle = match txn.open_table(definition(table)) {
                Ok(h) => h,
                Err(TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(backend(format_args!("opening table {}", table.name()), e)),
            };
            let range = handle
                .range::<&str>(..)
                .map_err(|e| backend(format_args!("scanning table {}", table.name()), e))?;
            for entry in range {
                let (k, v) = entry
                    .map_err(|e| backend(format_args!("scanning table {}", table.name()), e))?;
                visit(table, k.value(), v.value());
            }
        }
        Ok(intact)
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
        let Some(db) = self.shared.current() else {
            if self.closing.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            return Err(Error::Unavailable(
                self.shared
                    .fault()
                    .unwrap_or_else(|| "the store is being reopened".into()),
            ));
        };
        let txn = db.begin_read().map_err(|e| match e {
            TransactionError::Storage(e) => storage_error("beginning a read transaction", e),
            e => backend("beginning a read transaction", e),
        })?;
        match txn.open_table(definition(table)) {
            Ok(handle) => read(&handle),
            // Tables are created at open; a missing one can only mean an empty table.
            Err(TableError::TableDoesNotExist(_)) => Ok(missing),
            Err(TableError::Storage(e)) => Err(storage_error(
                format_args!("opening table {}", table.name()),
                e,
            )),
            Err(e) => Err(backend(format_args!("opening table {}", table.name()), e)),
        }
    }
}

/// Opens (or creates) the database and its tables; a panic inside redb (a file damaged outside
/// redb) becomes an error.
fn open_database(path: &Path) -> Result<Database> {
    let shown = path.display();
    catch_unwind(AssertUnwindSafe(|| {
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => Error::Backend(format!(
                "{shown} is open in another process (is a hub running on this data dir?)"
            )),
            e => backend(format_args!("opening redb database {shown}"), e),
        })?;
        create_tables(&db)
            .map_err(|e| backend(format_args!("creating tables in redb database {shown}"), e))?;
        Ok(db)
    }))
    .map_err(|_| {
        Error::Backend(format!(
            "opening redb database {shown}: the file is damaged (redb panicked)"
        ))
    })?
}

/// The database holds every device key: owner-only, whatever the umask.
fn restrict_mode(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), "could not make the store owner-only: {e}");
        }
    }
}

/// I/O-class storage errors (the disk, not the data) are [`Error::Unavailable`]: the hub can
/// recover from them.
fn storage_error(context: impl fmt::Display, e: StorageError) -> Error {
    match e {
        StorageError::Io(_) | StorageError::PreviousIo | StorageError::DatabaseClosed => {
            Error::Unavailable(format!("{context}: {e}"))
        }
        e => backend(context, e),
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

/// Why a group failed: a fault of the disk or of redb itself (the writer must reopen), or a
/// refusal that leaves the database usable.
enum Failure {
    Fault(String),
    Refused(String),
}

/// The writer thread's loop: group, apply, answer, until every sender is gone or `close` was
/// asked and the queue is drained. After a fault it recovers before taking more work.
fn run_writer(shared: &Shared, mut queue: mpsc::Receiver<Request>) {
    let mut close_replies = Vec::new();
    let mut group: Vec<Pending> = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut bytes = 0;
        let mut next = Some(first);
        #[cfg(test)]
        let mut panic = false;
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
                #[cfg(test)]
                Request::Panic => panic = true,
            }
            if group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
                next = queue.try_recv().ok();
            }
        }
        #[cfg(test)]
        if panic {
            group.push((Vec::new(), oneshot::channel().0));
            let failed = catch_unwind(AssertUnwindSafe(|| -> Result<(), Failure> {
                panic!("store writer test hook")
            }));
            if failed.is_err() {
                fault(shared, &mut group, "the store writer panicked".into());
                recover(shared, &mut queue);
                continue;
            }
        }
        if let Err(reason) = commit_group(shared, &mut group) {
            fault(shared, &mut group, reason);
            recover(shared, &mut queue);
        }
    }
    for reply in close_replies {
        // The closer may have given up waiting; nothing to tell it then.
        let _ = reply.send(());
    }
    tracing::debug!("store writer stopped");
}

/// Applies every batch of `group` in one durable transaction and answers each caller.
/// Returns the reason of a fault, with the group still unanswered.
fn commit_group(shared: &Shared, group: &mut Vec<Pending>) -> Result<(), String> {
    if group.is_empty() {
        return Ok(());
    }
    let batches = group.len() as u64;
    if group.iter().all(|(writes, _)| writes.is_empty()) {
        // Nothing to make durable; skip the fsync.
        succeed(shared, group, batches);
        return Ok(());
    }
    let Some(db) = shared.current() else {
        return Err("the database is not open".into());
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| apply(&db, group)))
        .unwrap_or_else(|_| Err(Failure::Fault("redb panicked while writing".into())));
    match outcome {
        Ok(()) => {
            shared.clear_fault();
            shared.counters.transactions.fetch_add(1, Ordering::Relaxed);
            succeed(shared, group, batches);
            Ok(())
        }
        Err(Failure::Refused(message)) => {
            tracing::error!(error = %message, batches, "store group commit failed");
            for (_, reply) in group.drain(..) {
                let _ = reply.send(Err(Error::Backend(message.clone())));
            }
            Ok(())
        }
        Err(Failure::Fault(message)) => Err(message),
    }
}

/// Counts a committed group and answers each of its callers.
fn succeed(shared: &Shared, group: &mut Vec<Pending>, batches: u64) {
    shared
        .counters
        .batches
        .fetch_add(batches, Ordering::Relaxed);
    for (_, reply) in group.drain(..) {
        // A caller whose future was dropped no longer listens.
        let _ = reply.send(Ok(()));
    }
}

/// Answers a failed group, marks the store faulty and closes the database.
fn fault(shared: &Shared, group: &mut Vec<Pending>, reason: String) {
    tracing::error!(error = %reason, batches = group.len(), "store fault: refusing writes until the store recovers");
    shared.counters.faults.fetch_add(1, Ordering::Relaxed);
    shared.set_fault(&reason);
    for (_, reply) in group.drain(..) {
        let _ = reply.send(Err(Error::Unavailable(reason.clone())));
    }
    // Readers get `Unavailable` until the reopen; the file is released once the last
    // in-flight read drops its handle.
    shared.db.write().unwrap_or_else(|e| e.into_inner()).take();
}

/// Reopens the database and commits a probe until both succeed, refusing the batches that
/// arrive meanwhile. Returns early when the store is being closed or dropped.
fn recover(shared: &Shared, queue: &mut mpsc::Receiver<Request>) {
    let started = Instant::now();
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        match reopen_and_probe(&shared.path) {
            Ok(db) => {
                *shared.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
                shared.counters.reopens.fetch_add(1, Ordering::Relaxed);
                shared.reopened();
                tracing::info!(
                    attempts,
                    after_ms = started.elapsed().as_millis() as u64,
                    "store recovered: the database was reopened and accepts writes again"
                );
                return;
            }
            Err(reason) => {
                if attempts == 1 || attempts.is_multiple_of(120) {
                    tracing::warn!(attempts, "store still faulty: {reason}");
                }
                shared.set_fault(&reason);
            }
        }
        // Wait, refusing what arrives; a closed or dropped queue ends recovery.
        let until = Instant::now() + RETRY_EVERY;
        while Instant::now() < until {
            loop {
                match queue.try_recv() {
                    Ok(Request::Commit { reply, .. }) => {
                        let reason = shared
                            .fault()
                            .unwrap_or_else(|| "the store is recovering".into());
                        let _ = reply.send(Err(Error::Unavailable(reason)));
                    }
                    Ok(Request::Close { reply }) => {
                        // Nothing queued before the close can be committed now; it has been
                        // refused, so the closer may go on.
                        queue.close();
                        let _ = reply.send(());
                        return;
                    }
                    #[cfg(test)]
                    Ok(Request::Panic) => {}
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn reopen_and_probe(path: &Path) -> Result<Database, String> {
    let db = open_database(path).map_err(|e| e.to_string())?;
    let probe = vec![(
        vec![Write::put(Table::Meta, PROBE_KEY, Vec::new())],
        oneshot::channel().0,
    )];
    match catch_unwind(AssertUnwindSafe(|| apply(&db, &probe))) {
        Ok(Ok(())) => Ok(db),
        Ok(Err(Failure::Fault(m) | Failure::Refused(m))) => Err(m),
        Err(_) => Err("redb panicked while writing the probe".into()),
    }
}

fn apply(db: &Database, group: &[Pending]) -> Result<(), Failure> {
    let mut txn = db.begin_write().map_err(|e| match e {
        TransactionError::Storage(e) => classify("beginning a write transaction", e),
        e => Failure::Fault(format!("beginning a write transaction: {e}")),
    })?;
    if let Err(e) = txn.set_durability(Durability::Immediate) {
        return Err(abort(
            txn,
            Failure::Refused(format!("setting durability: {e}")),
        ));
    }
    if let Err(failure) = write_all(&txn, group) {
        return Err(abort(txn, failure));
    }
    txn.commit().map_err(|e| match e {
        CommitError::Storage(e) => classify("committing a write transaction", e),
        e => Failure::Fault(format!("committing a write transaction: {e}")),
    })
}

/// Storage errors are faults (the database must be reopened) unless they are about one value.
fn classify(context: &str, e: StorageError) -> Failure {
    match e {
        StorageError::ValueTooLarge(_) => Failure::Refused(format!("{context}: {e}")),
        e => Failure::Fault(format!("{context}: {e}")),
    }
}

fn write_all(txn: &WriteTransaction, group: &[Pending]) -> Result<(), Failure> {
    // Open each table once per transaction, on first use; there are only a handful.
    let mut open: Vec<(Table, redb::Table<'_, &'static str, &'static [u8]>)> = Vec::new();
    for (writes, _) in group {
        for write in writes {
            let index = match open.iter().position(|(table, _)| *table == write.table) {
                Some(index) => index,
                None => {
                    let handle = txn.open_table(definition(write.table)).map_err(|e| {
                        let context = format!("opening table {}", write.table.name());
                        match e {
                            TableError::Storage(e) => classify(&context, e),
                            e => Failure::Refused(format!("{context}: {e}")),
                        }
                    })?;
                    open.push((write.table, handle));
                    open.len() - 1
                }
            };
            let Some((_, handle)) = open.get_mut(index) else {
                return Err(Failure::Refused(
                    "internal error: table handle vanished".into(),
                ));
            };
            let result = match &write.value {
                Some(value) => handle
                    .insert(write.key.as_str(), value.as_slice())
                    .map(drop),
                None => handle.remove(write.key.as_str()).map(drop),
            };
            result.map_err(|e| classify(&format!("writing to table {}", write.table.name()), e))?;
        }
    }
    Ok(())
}

fn abort(txn: WriteTransaction, failure: Failure) -> Failure {
    match (txn.abort(), failure) {
        (Ok(()), failure) => failure,
        // An abort that fails leaves redb in doubt: reopen.
        (Err(e), Failure::Fault(m) | Failure::Refused(m)) => {
            Failure::Fault(format!("{m} (and aborting failed: {e})"))
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>> {
        self.read_table(table, None, |handle| {
            handle
                .get(key)
                .map(|found| found.map(|value| value.value().to_vec()))
                .map_err(|e| storage_error(format_args!("reading table {}", table.name()), e))
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
                .map_err(|e| storage_error(context(), e))?;
            // `limit` may be "everything" (usize::MAX); do not trust it as a capacity.
            let mut entries = Vec::with_capacity(limit.min(256));
            for entry in range.take(limit) {
                let (key, value) = entry.map_err(|e| storage_error(context(), e))?;
                entries.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(entries)
        })
    }

    async fn count(&self, table: Table) -> Result<u64> {
        self.read_table(table, 0, |handle| {
            handle
                .len()
                .map_err(|e| storage_error(format_args!("counting table {}", table.name()), e))
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

    fn health(&self) -> Health {
        match self.shared.fault() {
            None => Health::Ok,
            Some(reason) => Health::Faulty(reason),
        }
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
        self.shared
            .db
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Test hook: makes the writer panic in its next group.
    #[cfg(test)]
    async fn inject_panic(&self) {
        if let Some(requests) = &self.requests {
            let _ = requests.send(Request::Panic).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_writer_survives_a_panic_and_keeps_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        store
            .commit(vec![Write::put(Table::Devices, "a", b"1".to_vec())])
            .await
            .unwrap();
        store.inject_panic().await;
        // Recovery reopens the file; writes are accepted again within a few retries.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = store
                .commit(vec![Write::put(Table::Devices, "b", b"2".to_vec())])
                .await;
            if r.is_ok() {
                break;
            }
            assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
            assert!(Instant::now() < deadline, "the store never recovered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store.health(), Health::Ok);
        assert_eq!(store.stats().faults, 1);
        assert!(store.stats().reopens >= 1);
        assert_eq!(
            store.get(Table::Devices, "a").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        store.close().await.unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(RedbStore::open(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

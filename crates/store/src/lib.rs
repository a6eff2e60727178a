//! Durable storage of the hub's state behind one [`Store`] trait.
//!
//! The hub core keeps its documents (device identities with their twins, MQTT sessions,
//! policies, jobs) as opaque byte values under string keys in a few named tables. Backends:
//! [`RedbStore`] (embedded, on disk, the default) and [`MemoryStore`] (unit tests). Every
//! backend must pass the one conformance suite in [`conformance`].

mod memory;
mod redb_store;

pub mod conformance;

pub use memory::MemoryStore;
pub use redb_store::{RedbStore, StoreStats};

use async_trait::async_trait;

/// The named tables the hub keeps. A backend maps each to its own keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Hub-wide settings: access policies, the hub's identity.
    Meta,
    /// One record per device (identity and twin together), keyed by device id.
    Devices,
    /// Persisted MQTT session state (subscriptions) per client id.
    Sessions,
    /// Jobs, keyed by job id.
    Jobs,
    /// Per-device job records, keyed by `{jobId}/{deviceId}`.
    DeviceJobs,
    /// Records that could not be decoded, moved aside as they were, keyed by
    /// `{table}/{key}`.
    Quarantine,
    /// Queued cloud-to-device messages, keyed by `{deviceId}/{sequence number, 16 hex}`.
    CloudMessages,
    /// Delivery feedback records waiting for the service, keyed by `{sequence, 16 hex}`.
    Feedback,
    /// Module identities with their twins, keyed by `{deviceId}/{moduleId}` (ids never hold
    /// a '/'), so a device's modules sort together.
    Modules,
}

impl Table {
    /// Every table, in a stable order.
    pub const ALL: [Table; 9] = [
        Table::Meta,
        Table::Devices,
        Table::Sessions,
        Table::Jobs,
        Table::DeviceJobs,
        Table::Quarantine,
        Table::CloudMessages,
        Table::Feedback,
        Table::Modules,
    ];

    /// The table's stable on-disk name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Devices => "devices",
            Table::Sessions => "sessions",
            Table::Jobs => "jobs",
            Table::DeviceJobs => "device_jobs",
            Table::Quarantine => "quarantine",
            Table::CloudMessages => "c2d",
            Table::Feedback => "c2d_feedback",
            Table::Modules => "modules",
        }
    }
}

/// One change in a [`Store::commit`] batch: put `value` under `key`, or delete `key` when
/// `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Write {
    /// Put `value` under `key`.
    pub fn put(table: Table, key: impl Into<String>, value: Vec<u8>) -> Self {
        Write {
            table,
            key: key.into(),
            value: Some(value),
        }
    }

    /// Delete `key` (deleting a missing key is not an error).
    pub fn delete(table: Table, key: impl Into<String>) -> Self {
        Write {
            table,
            key: key.into(),
            value: None,
        }
    }
}

/// A condition of [`Store::commit_checked`]: `key` in `table` must hold exactly `value`
/// (`None`: must be absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Expect {
    /// `key` must be absent.
    pub fn absent(table: Table, key: impl Into<String>) -> Self {
        Expect {
            table,
            key: key.into(),
            value: None,
        }
    }

    /// `key` must hold exactly `value`.
    pub fn holds(table: Table, key: impl Into<String>, value: Vec<u8>) -> Self {
        Expect {
            table,
            key: key.into(),
            value: Some(value),
        }
    }
}

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store was closed; no further writes are accepted.
    #[error("store is closed")]
    Closed,
    /// The backend cannot do its work for now (disk full, an I/O error, recovering from
    /// one); a retry later may succeed. The text is for logs, not clients.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend failed (database, corruption). The text is for logs, not clients.
    #[error("storage backend failed: {0}")]
    Backend(String),
}

/// Whether a store can do its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Writes fail for now; the reason is for operators.
    Faulty(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Durable key-value storage with atomic, group-committed batches.
///
/// Reads see every batch whose `commit` has returned (read-your-writes). Keys are ordered
/// by their UTF-8 bytes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value under `key`, if any.
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` entries in ascending key order, with keys strictly greater than `after`
    /// (from the first key when `after` is `None`).
    async fn scan(
        &self,
        table: Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>>;

    /// The number of entries in `table`.
    async fn count(&self, table: Table) -> Result<u64>;

    /// Applies every write of the batch atomically (all or none) and returns only once the
    /// batch is durable (committed and fsynced for a disk backend). Batches from concurrent
    /// callers may be committed together in one transaction (group commit); each caller
    /// still gets its own result. Batches are applied in the order their calls started
    /// when they come from one task.
    async fn commit(&self, writes: Vec<Write>) -> Result<()>;

    /// Applies `writes` like [`Store::commit`] only if every condition in `expect` holds at the
    /// moment they are applied; returns whether they were. This is how state shared by several
    /// hub nodes on one store (the cluster's identity, counters) is changed without a lost
    /// update.
    ///
    /// The default reads the conditions and then commits: atomic only against writers of the
    /// same process that serialize on the keys (the embedded stores are opened by one process,
    /// and the hub holds per-key locks). A store shared between processes must override it
    /// with a check inside its transaction.
    async fn commit_checked(&self, expect: Vec<Expect>, writes: Vec<Write>) -> Result<bool> {
        for condition in &expect {
            if self.get(condition.table, &condition.key).await? != condition.value {
                return Ok(false);
            }
        }
        self.commit(writes).await?;
        Ok(true)
    }

    /// Finishes every pending commit, flushes, and refuses later commits with
    /// [`Error::Closed`]. Reads may still work or fail with `Closed`.
    async fn close(&self) -> Result<()>;

    /// Whether the store currently accepts writes (for `/health` and metrics).
    fn health(&self) -> Health {
        Health::Ok
    }
}

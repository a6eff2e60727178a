//! The in-memory twin index: every device's and module's twin as the query language sees it
//! (the service-side twin document), in key order, kept in step with the store so queries
//! never decode or render records.
//!
//! The index follows the store itself rather than each write site: [`IndexedStore`] wraps the
//! hub's store and, after a batch touching `devices` or `modules` has been committed durably,
//! applies the same puts and deletes to the index before `commit` returns. Every writer already
//! holds the identity's lock across its commit, so the index sees one identity's writes in
//! commit order, and anything acknowledged after a commit (a twin PATCH's 200) is in the index
//! before the acknowledgement leaves: read-your-writes holds for queries as for store reads.
//!
//! A put stores the record's bytes only; the document is built the first time a query reads
//! it (`Slot::doc`) and the bytes are then dropped. So a write costs a copy of its bytes and
//! one map insert, and a twin changed many times between queries is rendered once.
//!
//! Live state (`connectionState`, `cloudToDeviceMessageCount`) is not in the record: the
//! documents carry placeholders for it, and `query` fills it in from the directory and the
//! C2D queues for the rows that read or return it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use async_trait::async_trait;
use serde_json::Value;
use twinhub_store::{Expect, Health, Store, Table, Write};

use crate::cluster::ClusterBus;

use crate::record::DeviceRecord;

/// One identity's entry: the record's bytes until a query first needs the document.
pub(crate) struct Slot {
    raw: Mutex<Option<Vec<u8>>>,
    /// `None` when the bytes do not decode (queries skip it, as store scans did).
    doc: OnceLock<Option<Value>>,
}

impl Slot {
    fn from_bytes(bytes: Vec<u8>) -> Slot {
        Slot {
            raw: Mutex::new(Some(bytes)),
            doc: OnceLock::new(),
        }
    }

    fn from_record(rec: &DeviceRecord) -> Slot {
        let doc = OnceLock::new();
        let _ = doc.set(Some(document(rec)));
        Slot {
            raw: Mutex::new(None),
            doc,
        }
    }

    /// The twin document, built from the stored bytes on first use.
    pub(crate) fn doc(&self) -> Option<&Value> {
        self.doc
            .get_or_init(|| {
                let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner()).take()?;
                DeviceRecord::decode(&raw).ok().map(|rec| document(&rec))
            })
            .as_ref()
    }
}

/// The service-side twin of `rec` as JSON, with the live fields as if disconnected and with an
/// empty queue: `query` overwrites them where they matter.
pub(crate) fn document(rec: &DeviceRecord) -> Value {
    let mut twin = rec.to_twin(false);
    twin.cloud_to_device_message_count = Some(0);
    serde_json::to_value(twin).unwrap_or(Value::Null)
}

type Map = BTreeMap<Arc<str>, Arc<Slot>>;

/// The twins of devices and of modules, each in key order (the store's order: UTF-8 bytes).
#[derive(Default)]
pub(crate) struct TwinIndex {
    devices: RwLock<Map>,
    modules: RwLock<Map>,
    /// Set when a commit failed in a way that leaves its outcome unknown and the records it
    /// touched could not be read back: the index may then differ from the store, so queries
    /// read the store until the hub restarts.
    unreliable: AtomicBool,
    /// In a cluster: the identities whose records name a node holding their session, with
    /// that node (connectionState in queries, and the sweep of nodes that are gone).
    presence: RwLock<std::collections::HashMap<Arc<str>, Arc<str>>>,
    /// Whether `presence` is kept (cluster nodes only: it costs a parse per write).
    tracks_presence: AtomicBool,
}

/// The one field of a record `presence` needs.
#[derive(serde::Deserialize)]
struct NodeOnly {
    #[serde(default)]
    node: Option<String>,
}

impl TwinIndex {
    fn map(&self, table: Table) -> Option<&RwLock<Map>> {
        match table {
            Table::Devices => Some(&self.devices),
            Table::Modules => Some(&self.modules),
            _ => None,
        }
    }

    /// Whether queries may trust the index.
    pub(crate) fn reliable(&self) -> bool {
        !self.unreliable.load(Ordering::Acquire)
    }

    /// Keeps the identities' session nodes from now on (a cluster node, before it loads).
    pub(crate) fn track_presence(&self) {
        self.tracks_presence.store(true, Ordering::Release);
    }

    /// The node a record names as holding the identity's session.
    pub(crate) fn node_of(&self, key: &str) -> Option<Arc<str>> {
        self.presence
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Every identity whose record names a session node, with the node.
    pub(crate) fn sessions(&self) -> Vec<(Arc<str>, Arc<str>)> {
        self.presence
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect()
    }

    fn note_presence(&self, key: &str, node: Option<String>) {
        let mut presence = self.presence.write().unwrap_or_else(|e| e.into_inner());
        match node {
            Some(node) => {
                presence.insert(Arc::from(key), Arc::from(node));
            }
            None => {
                presence.remove(key);
            }
        }
    }

    /// Adds a record read at open, rendered at once (the hub has just decoded it anyway).
    pub(crate) fn insert_record(&self, table: Table, key: &str, rec: &DeviceRecord) {
        if rec.node.is_some() {
            self.note_presence(key, rec.node.clone());
        }
        if let Some(map) = self.map(table) {
            map.write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(Arc::from(key), Arc::new(Slot::from_record(rec)));
        }
    }

    /// Takes a record as the store now holds it (one another cluster node changed).
    pub(crate) fn refresh(&self, table: Table, key: String, value: Option<Vec<u8>>) {
        self.apply(table, key, value);
    }

    fn apply(&self, table: Table, key: String, value: Option<Vec<u8>>) {
        let Some(map) = self.map(table) else { return };
        if self.tracks_presence.load(Ordering::Acquire) {
            let node = value
                .as_deref()
                .and_then(|bytes| serde_json::from_slice::<NodeOnly>(bytes).ok())
                .and_then(|n| n.node);
            self.note_presence(&key, node);
        }
        let mut map = map.write().unwrap_or_else(|e| e.into_inner());
        match value {
            Some(bytes) => {
                map.insert(Arc::from(key), Arc::new(Slot::from_bytes(bytes)));
            }
            None => {
                map.remove(key.as_str());
            }
        }
    }

    /// Up to `limit` entries of `table` after `after`, in key order. The map's lock is held
    /// only while the handles are copied, so a long scan never holds up writers.
    pub(crate) fn batch(
        &self,
        table: Table,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<(Arc<str>, Arc<Slot>)> {
        let Some(map) = self.map(table) else {
            return Vec::new();
        };
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        let lower = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        map.range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Entries in `table`.
    #[cfg(test)]
    pub(crate) fn len(&self, table: Table) -> usize {
        self.map(table)
            .map_or(0, |m| m.read().unwrap_or_else(|e| e.into_inner()).len())
    }
}

/// The hub's store with the twin index kept in step (see the module docs). Every other call
/// goes straight to the wrapped store.
pub(crate) struct IndexedStore {
    inner: Arc<dyn Store>,
    index: Arc<TwinIndex>,
    /// In a cluster, the other nodes are told which twins changed, for their indexes.
    cluster: Option<Arc<dyn ClusterBus>>,
}

impl IndexedStore {
    pub(crate) fn new(
        inner: Arc<dyn Store>,
        index: Arc<TwinIndex>,
        cluster: Option<Arc<dyn ClusterBus>>,
    ) -> IndexedStore {
        IndexedStore {
            inner,
            index,
            cluster,
        }
    }
}

fn indexed(table: Table) -> bool {
    matches!(table, Table::Devices | Table::Modules)
}

/// Copies of a batch's twin writes, taken before the batch moves into the store; most batches
/// touch no twin and copy nothing.
fn touched(writes: &[Write]) -> Vec<Write> {
    writes
        .iter()
        .filter(|w| indexed(w.table))
        .cloned()
        .collect()
}

impl IndexedStore {
    /// Brings the index in step with a commit's outcome: `Ok(true)` applied the batch,
    /// `Ok(false)` applied nothing (a checked commit whose condition failed).
    async fn follow(&self, touched: Vec<Write>, outcome: Result<bool, &twinhub_store::Error>) {
        if let Some(bus) = &self.cluster
            && !touched.is_empty()
            && !matches!(outcome, Ok(false))
        {
            // After a failed commit too: it may have reached the store all the same.
            let notice = crate::cluster::Notice::Changed {
                node: bus.node_id().to_owned(),
                keys: crate::cluster::changed_keys(&touched),
            };
            bus.broadcast(&notice).await;
        }
        match outcome {
            Ok(true) => {
                for w in touched {
                    self.index.apply(w.table, w.key, w.value);
                }
            }
            Ok(false) => {}
            Err(_) => {
                // A failed commit may still have reached the disk (the backend reopens and
                // probes): take each touched record as the store now has it. The caller
                // still holds the identities' locks, so nothing else writes them meanwhile.
                for w in touched {
                    match self.inner.get(w.table, &w.key).await {
                        Ok(value) => self.index.apply(w.table, w.key, value),
                        Err(e) => {
                            if !self.index.unreliable.swap(true, Ordering::AcqRel) {
                                tracing::error!(
                                    error = %e,
                                    "a record could not be read back after a failed commit; \
                                     queries read the store until the hub restarts"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Store for IndexedStore {
    async fn get(&self, table: Table, key: &str) -> twinhub_store::Result<Option<Vec<u8>>> {
        self.inner.get(table, key).await
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&str>,
        limit: usize,
    ) -> twinhub_store::Result<Vec<(String, Vec<u8>)>> {
        self.inner.scan(table, after, limit).await
    }

    async fn count(&self, table: Table) -> twinhub_store::Result<u64> {
        self.inner.count(table).await
    }

    async fn commit(&self, writes: Vec<Write>) -> twinhub_store::Result<()> {
        let touched = touched(&writes);
        let result = self.inner.commit(writes).await;
        self.follow(touched, result.as_ref().map(|()| true)).await;
        result
    }

    async fn commit_checked(
        &self,
        expect: Vec<Expect>,
        writes: Vec<Write>,
    ) -> twinhub_store::Result<bool> {
        let touched = touched(&writes);
        let result = self.inner.commit_checked(expect, writes).await;
        self.follow(touched, result.as_ref().copied()).await;
        result
    }

    async fn close(&self) -> twinhub_store::Result<()> {
        self.inner.close().await
    }

    fn health(&self) -> Health {
        self.inner.health()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use twinhub_store::MemoryStore;

    use super::*;

    /// A memory store whose next commit fails: `1` after applying the batch (the outcome a
    /// caller cannot know), `2` without applying it, `3` without applying it and with reads
    /// failing too.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        fail: AtomicU8,
    }

    fn unavailable() -> twinhub_store::Error {
        twinhub_store::Error::Unavailable("test".into())
    }

    #[async_trait]
    impl Store for Flaky {
        async fn get(&self, table: Table, key: &str) -> twinhub_store::Result<Option<Vec<u8>>> {
            if self.fail.load(Ordering::SeqCst) == 3 {
                return Err(unavailable());
            }
            self.inner.get(table, key).await
        }
        async fn scan(
            &self,
            table: Table,
            after: Option<&str>,
            limit: usize,
        ) -> twinhub_store::Result<Vec<(String, Vec<u8>)>> {
            self.inner.scan(table, after, limit).await
        }
        async fn count(&self, table: Table) -> twinhub_store::Result<u64> {
            self.inner.count(table).await
        }
        async fn commit(&self, writes: Vec<Write>) -> twinhub_store::Result<()> {
            match self.fail.load(Ordering::SeqCst) {
                0 => self.inner.commit(writes).await,
                1 => {
                    self.inner.commit(writes).await?;
                    Err(unavailable())
                }
                _ => Err(unavailable()),
            }
        }
        async fn close(&self) -> twinhub_store::Result<()> {
            self.inner.close().await
        }
    }

    fn record(id: &str, module: Option<&str>) -> DeviceRecord {
        let spec = crate::registry::DeviceSpec::default();
        let mut rec = crate::registry::new_record(id, &spec, "2026-01-01T00:00:00Z").unwrap();
        rec.module_id = module.map(str::to_string);
        rec
    }

    fn keys(index: &TwinIndex, table: Table) -> Vec<String> {
        index
            .batch(table, None, usize::MAX)
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect()
    }

    #[tokio::test]
    async fn commits_reach_the_index_and_other_tables_do_not() {
        let index = Arc::new(TwinIndex::default());
        let store = IndexedStore::new(Arc::new(MemoryStore::new()), index.clone(), None);
        let (a, b, m) = (record("a", None), record("b", None), record("a", Some("m")));
        store
            .commit(vec![
                b.write(),
                a.write(),
                m.write(),
                Write::put(Table::Sessions, "a", b"{}".to_vec()),
            ])
            .await
            .unwrap();
        assert_eq!(keys(&index, Table::Devices), ["a", "b"]);
        assert_eq!(keys(&index, Table::Modules), ["a/m"]);
        assert_eq!(index.len(Table::Sessions), 0);
        let doc = index.batch(Table::Modules, None, 1)[0].1.doc().cloned();
        assert_eq!(doc, Some(document(&m)));
        assert_eq!(doc.unwrap()["moduleId"], "m");
        // Batches page after a key, as store scans do.
        let after_a: Vec<_> = index
            .batch(Table::Devices, Some("a"), 10)
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(after_a, ["b"]);

        store
            .commit(vec![
                Write::delete(Table::Devices, "a"),
                Write::delete(Table::Modules, "a/m"),
            ])
            .await
            .unwrap();
        assert_eq!(keys(&index, Table::Devices), ["b"]);
        assert_eq!(index.len(Table::Modules), 0);
        assert!(index.reliable());
    }

    #[tokio::test]
    async fn a_failed_commit_leaves_the_index_as_the_store_is() {
        let flaky = Arc::new(Flaky::default());
        let index = Arc::new(TwinIndex::default());
        let store = IndexedStore::new(flaky.clone(), index.clone(), None);
        store.commit(vec![record("a", None).write()]).await.unwrap();

        // Committed although the caller was told it failed: the index has it.
        flaky.fail.store(1, Ordering::SeqCst);
        assert!(store.commit(vec![record("b", None).write()]).await.is_err());
        assert_eq!(keys(&index, Table::Devices), ["a", "b"]);

        // Not committed: the index does not have it either.
        flaky.fail.store(2, Ordering::SeqCst);
        assert!(
            store
                .commit(vec![
                    record("c", None).write(),
                    Write::delete(Table::Devices, "a")
                ])
                .await
                .is_err()
        );
        assert_eq!(keys(&index, Table::Devices), ["a", "b"]);
        assert!(index.reliable());

        // Nothing can be read back: queries must go to the store from now on.
        flaky.fail.store(3, Ordering::SeqCst);
        assert!(store.commit(vec![record("d", None).write()]).await.is_err());
        assert!(!index.reliable());
    }

    #[test]
    fn bytes_that_do_not_decode_have_no_document() {
        let slot = Slot::from_bytes(b"not a record".to_vec());
        assert!(slot.doc().is_none());
        let rec = record("x", None);
        let slot = Slot::from_bytes(rec.encode());
        assert_eq!(slot.doc(), Some(&document(&rec)));
        // The bytes are dropped once the document is built.
        assert!(slot.raw.lock().unwrap().is_none());
    }
}

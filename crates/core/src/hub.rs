//! The [`Hub`]: one value holding the store, the authorizer, the directory of connected
//! devices and the per-device locks. Its operations live in `registry`, `twins`, `methods`
//! and `sessions`; each read-modify-write of a device record runs under that device's lock
//! and returns only after the store's durable commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use twinhub_proto::model::DeviceStatus;
use twinhub_store::{Store, Table, Write};

use crate::auth::{Authorizer, Policy};
use crate::directory::{CloseReason, Directory, KeyedLocks};
use crate::error::Result;
use crate::record::DeviceRecord;

/// Registry counts kept live so statistics never scan the registry.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub total: AtomicU64,
    pub enabled: AtomicU64,
}

impl Counts {
    pub(crate) fn add(&self, status: DeviceStatus) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if status == DeviceStatus::Enabled {
            self.enabled.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn remove(&self, status: DeviceStatus) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        if status == DeviceStatus::Enabled {
            self.enabled.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn change(&self, from: DeviceStatus, to: DeviceStatus) {
        if from != to {
            self.remove(from);
            self.add(to);
        }
    }
}

/// The hub's domain state and operations.
pub struct Hub {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) auth: Authorizer,
    pub(crate) directory: Directory,
    pub(crate) locks: KeyedLocks,
    pub(crate) counts: Counts,
    pub(crate) jobs: crate::jobs::JobsState,
}

impl Hub {
    /// Opens the hub over `store`, counting the registry once.
    pub async fn open(
        store: Arc<dyn Store>,
        hostname: impl Into<String>,
        policies: Vec<Policy>,
    ) -> Result<Arc<Hub>> {
        let hub = Hub {
            store,
            auth: Authorizer::new(hostname, policies),
            directory: Directory::default(),
            locks: KeyedLocks::default(),
            counts: Counts::default(),
            jobs: Default::default(),
        };
        let mut after: Option<String> = None;
        loop {
            let page = hub
                .store
                .scan(Table::Devices, after.as_deref(), 1000)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (_, bytes) in &page {
                hub.counts.add(DeviceRecord::decode(bytes)?.status);
            }
        }
        let hub = Arc::new(hub);
        hub.resume_jobs().await?;
        Ok(hub)
    }

    pub fn authorizer(&self) -> &Authorizer {
        &self.auth
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) async fn load(&self, device_id: &str) -> Result<Option<DeviceRecord>> {
        match self.store.get(Table::Devices, device_id).await? {
            Some(bytes) => Ok(Some(DeviceRecord::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The device's record, or DeviceNotFound.
    pub(crate) async fn load_existing(&self, device_id: &str) -> Result<DeviceRecord> {
        self.load(device_id)
            .await?
            .ok_or_else(|| crate::error::Error::device_not_found(device_id))
    }

    pub(crate) async fn save(&self, record: &DeviceRecord) -> Result<()> {
        self.store
            .commit(vec![Write::put(
                Table::Devices,
                record.device_id.clone(),
                record.encode(),
            )])
            .await?;
        Ok(())
    }

    /// Closes every connected session (on shutdown).
    pub fn close_all_sessions(&self) {
        for handle in self.directory.all() {
            handle.close.close(CloseReason::Shutdown);
        }
    }
}

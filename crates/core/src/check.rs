//! The offline check of a store (`twinhub check`): every record of every table is decoded as
//! the hub would decode it, and redb's own integrity check runs first. The server adds the
//! data dir's other files; this module knows only the store's contents.

use std::collections::BTreeMap;
use std::path::Path;

use twinhub_store::{RedbStore, Table};

use crate::jobs::{DeviceJob, is_valid_job};
use crate::record::DeviceRecord;
use crate::sessions::PersistedSession;

/// What the check found in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableCheck {
    pub records: u64,
    /// Keys of records that cannot be decoded (the hub would quarantine them at start).
    pub undecodable: Vec<String>,
}

/// What the check found in a store file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCheck {
    /// redb's integrity check passed (a crash left nothing to repair).
    pub intact: bool,
    pub tables: BTreeMap<&'static str, TableCheck>,
}

impl StoreCheck {
    /// Whether every record can be decoded.
    pub fn is_clean(&self) -> bool {
        self.tables.values().all(|t| t.undecodable.is_empty())
    }
}

fn decodes(table: Table, bytes: &[u8]) -> bool {
    match table {
        Table::Devices | Table::Modules => serde_json::from_slice::<DeviceRecord>(bytes).is_ok(),
        Table::Sessions => serde_json::from_slice::<PersistedSession>(bytes).is_ok(),
        Table::Jobs => is_valid_job(bytes),
        Table::DeviceJobs => serde_json::from_slice::<DeviceJob>(bytes).is_ok(),
        Table::CloudMessages => twinhub_proto::c2d::CloudMessage::decode(bytes).is_ok(),
        Table::Feedback => {
            serde_json::from_slice::<twinhub_proto::c2d::FeedbackRecord>(bytes).is_ok()
        }
        // Opaque by design: hub-wide values and what was already set aside.
        Table::Meta | Table::Quarantine => true,
    }
}

/// Checks the store file at `path`. Fails when it cannot be opened (for example while a hub
/// runs on it) or the integrity check cannot run.
pub fn check_store_file(path: &Path) -> twinhub_store::Result<StoreCheck> {
    let mut tables: BTreeMap<&'static str, TableCheck> = Table::ALL
        .iter()
        .map(|t| (t.name(), TableCheck::default()))
        .collect();
    let intact = RedbStore::check_file(path, |table, key, bytes| {
        let entry = tables.entry(table.name()).or_default();
        entry.records += 1;
        if !decodes(table, bytes) {
            entry.undecodable.push(key.to_string());
        }
    })?;
    Ok(StoreCheck { intact, tables })
}

//! The [`Hub`]: one value holding the store, the authorizer, the directory of connected
//! devices and the per-device locks. Its operations live in `registry`, `twins`, `methods`
//! and `sessions`; each read-modify-write of a device record runs under that device's lock
//! and returns only after the store's durable commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use twinhub_proto::model::DeviceStatus;
use twinhub_store::{Store, Table, Write};

use crate::auth::{Authorizer, Policy};
use crate::directory::{CloseReason, Directory, KeyedLocks};
use crate::error::Result;
use crate::record::DeviceRecord;
use crate::redelivery::Redelivery;
use crate::throttle::{ThrottleConfig, Throttles};

/// Registry counts kept live so statistics never scan the registry. Updates saturate: a
/// count never wraps, whatever order effects arrive in.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub total: AtomicU64,
    pub enabled: AtomicU64,
}

fn decrement(counter: &AtomicU64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(1))
    });
}

impl Counts {
    pub(crate) fn add(&self, status: DeviceStatus) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if status == DeviceStatus::Enabled {
            self.enabled.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn remove(&self, status: DeviceStatus) {
        decrement(&self.total);
        if status == DeviceStatus::Enabled {
            decrement(&self.enabled);
        }
    }

    pub(crate) fn change(&self, from: DeviceStatus, to: DeviceStatus) {
        if from != to {
            self.remove(from);
            self.add(to);
        }
    }
}

/// How a hub is set up.
#[derive(Clone)]
pub struct HubOptions {
    /// The hub's name, accepted in SAS `sr`.
    pub hostname: String,
    pub policies: Vec<Policy>,
    pub throttles: ThrottleConfig,
    /// Tokens whose expiry lies further ahead than this are refused.
    pub max_token_lifetime: Duration,
    /// Finished jobs are removed this long after they ended.
    pub job_retention: Duration,
    /// The built-in endpoint's event log; `None` keeps telemetry in memory (tests).
    pub events: Option<Arc<dyn twinhub_eventlog::EventLog>>,
    /// Cloud-to-device queue and feedback rules.
    pub c2d: crate::c2d::C2dOptions,
    /// Routing from the operator's config file, folded into the stored configuration at open.
    pub routing: twinhub_routing::RoutingConfig,
    /// Opens a custom endpoint's event log; `None` keeps them in memory (tests).
    pub endpoint_logs: Option<crate::routing::EndpointLogs>,
    /// The other nodes of a cluster sharing the store; `None` on a single node.
    pub cluster: Option<Arc<dyn crate::cluster::ClusterBus>>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("hostname", &self.hostname)
            .field("throttles", &self.throttles)
            .field("max_token_lifetime", &self.max_token_lifetime)
            .field("job_retention", &self.job_retention)
            .field("events", &self.events.is_some())
            .field("c2d", &self.c2d)
            .field(
                "cluster",
                &self.cluster.as_ref().map(|bus| bus.node_id().to_owned()),
            )
            .finish_non_exhaustive()
    }
}

impl HubOptions {
    pub fn new(hostname: impl Into<String>, policies: Vec<Policy>) -> Self {
        HubOptions {
            hostname: hostname.into(),
            policies,
            throttles: ThrottleConfig::default(),
            max_token_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
            job_retention: crate::jobs::DEFAULT_RETENTION,
            events: None,
            c2d: crate::c2d::C2dOptions::default(),
            routing: twinhub_routing::RoutingConfig::default(),
            endpoint_logs: None,
            cluster: None,
        }
    }
}

/// How often an operation is redone after another cluster node changed its record meanwhile.
const CONFLICT_RETRIES: u32 = 32;

/// The default bound on a SAS token's remaining lifetime: one year.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// The hub's domain state and operations.
pub struct Hub {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) auth: Authorizer,
    pub(crate) directory: Directory,
    pub(crate) locks: KeyedLocks,
    pub(crate) counts: Counts,
    pub(crate) jobs: crate::jobs::JobsState,
    pub(crate) redelivery: Redelivery,
    pub(crate) throttles: Throttles,
    /// Bounds the queries scanning at once.
    pub(crate) query_slots: tokio::sync::Semaphore,
    /// The built-in Event Hub-compatible endpoint.
    pub(crate) events: crate::telemetry::Events,
    /// Cloud-to-device queues and delivery feedback.
    pub(crate) c2d: crate::c2d::CloudMessaging,
    /// Routes, enrichments and the custom endpoints' logs.
    pub(crate) routing: crate::routing::Routing,
    /// The `sequenceNumber` of connection state events.
    pub(crate) connection_sequence: crate::sequence::Reserved,
    /// The CA certificates of `certificateAuthority` identities.
    pub(crate) certificates: crate::certificates::CertificateAuthorities,
    /// Every twin as queries see it, kept in step by the store wrapper (`twin_index`).
    pub(crate) twin_index: Arc<crate::twin_index::TwinIndex>,
    /// The other nodes, when this hub is one node of a cluster.
    pub(crate) cluster: Option<Arc<dyn crate::cluster::ClusterBus>>,
}

impl Hub {
    /// Opens the hub over `store`: counts the registry once, moves records that cannot be
    /// decoded to the quarantine table (with a log line each), and resumes unfinished jobs.
    pub async fn open(store: Arc<dyn Store>, options: HubOptions) -> Result<Arc<Hub>> {
        let c2d = crate::c2d::CloudMessaging::new(options.c2d.clone());
        let routing =
            crate::routing::Routing::new(&options.hostname, options.endpoint_logs.clone())?;
        let mut jobs = crate::jobs::JobsState::default();
        jobs.retention = options.job_retention;
        // Every commit goes through the wrapper, so no write site can leave the index behind.
        let twin_index = Arc::new(crate::twin_index::TwinIndex::default());
        let store: Arc<dyn Store> = Arc::new(crate::twin_index::IndexedStore::new(
            store,
            twin_index.clone(),
            options.cluster.clone(),
        ));
        let hub = Hub {
            store,
            auth: Authorizer::new(options.hostname, options.policies)
                .with_max_token_lifetime(options.max_token_lifetime),
            directory: Directory::default(),
            locks: KeyedLocks::default(),
            counts: Counts::default(),
            jobs,
            redelivery: Redelivery::default(),
            throttles: Throttles::new(&options.throttles),
            query_slots: tokio::sync::Semaphore::new(crate::query::CONCURRENT_QUERIES),
            events: crate::telemetry::Events::new(match options.events {
                Some(log) => log,
                None => Arc::new(
                    twinhub_eventlog::MemoryLog::new(twinhub_eventlog::LogOptions::default())
                        .map_err(|e| {
                            crate::error::Error::new(
                                twinhub_proto::error::ErrorCode::ServerError,
                                format!("the in-memory event log cannot be made: {e}"),
                            )
                        })?,
                ),
            }),
            c2d,
            routing,
            connection_sequence: crate::sequence::Reserved::new(
                crate::hub_events::SEQUENCE_FLOOR_KEY,
                crate::hub_events::FLOOR_RESERVE,
            ),
            certificates: Default::default(),
            twin_index,
            cluster: options.cluster,
        };
        hub.load_consumer_groups().await?;
        hub.load_c2d().await?;
        hub.load_routing(&options.routing).await?;
        hub.load_certificates().await?;
        if hub.cluster.is_some() {
            hub.twin_index.track_presence();
        }
        for table in [Table::Devices, Table::Modules] {
            let mut after: Option<String> = None;
            let mut bad = Vec::new();
            loop {
                let page = hub.store.scan(table, after.as_deref(), 1000).await?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                for (key, bytes) in &page {
                    match DeviceRecord::decode(bytes) {
                        Ok(rec) => {
                            // The registry's counts are of devices; modules are not counted.
                            if table == Table::Devices {
                                hub.counts.add(rec.status);
                            }
                            hub.twin_index.insert_record(table, key, &rec);
                        }
                        Err(_) => bad.push((key.clone(), bytes.clone())),
                    }
                }
            }
            hub.quarantine(table, bad).await?;
        }
        let bad_jobs = crate::jobs::undecodable_jobs(&hub).await?;
        hub.quarantine(Table::Jobs, bad_jobs).await?;
        let hub = Arc::new(hub);
        // This node holds no session yet: records naming it are left from a run that ended
        // without writing its devices' disconnects.
        hub.forget_sessions_of_node(None).await;
        if hub.cluster.is_some() {
            // The node holding the jobs lease resumes them (`jobs_leader`).
            hub.spawn_jobs_leadership();
        } else {
            hub.resume_jobs().await?;
        }
        hub.spawn_retention();
        hub.spawn_c2d_sweep();
        Ok(hub)
    }

    /// Moves records that cannot be decoded out of `table` into [`Table::Quarantine`] (key
    /// `{table}/{key}`, the bytes as they were), so one damaged value cannot keep the hub from
    /// starting and nothing is thrown away.
    pub(crate) async fn quarantine(
        &self,
        table: Table,
        records: Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut writes = Vec::with_capacity(records.len() * 2);
        for (key, bytes) in records {
            tracing::error!(
                table = table.name(),
                key = %crate::logsafe::Shown(&key),
                bytes = bytes.len(),
                "a record cannot be decoded; moved to the quarantine table"
            );
            writes.push(Write::put(
                Table::Quarantine,
                format!("{}/{key}", table.name()),
                bytes,
            ));
            writes.push(Write::delete(table, key));
        }
        self.store.commit(writes).await?;
        Ok(())
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

    pub fn throttles(&self) -> &Throttles {
        &self.throttles
    }

    /// The record of an identity (a device id, or `deviceId/moduleId` for a module).
    pub(crate) async fn load(&self, key: &str) -> Result<Option<DeviceRecord>> {
        match self.store.get(crate::record::table_of(key), key).await? {
            Some(bytes) => {
                let mut rec = DeviceRecord::decode(&bytes)?;
                if self.cluster.is_some() {
                    rec.read_as = crate::record::ReadAs(Some(bytes.into()));
                }
                Ok(Some(rec))
            }
            None => Ok(None),
        }
    }

    /// Hands every entry of `table` to `each`, in key order, reading a page at a time.
    pub(crate) async fn for_each_entry(
        &self,
        table: Table,
        mut each: impl FnMut(String, Vec<u8>),
    ) -> Result<()> {
        let mut after: Option<String> = None;
        loop {
            let page = self.store.scan(table, after.as_deref(), 1000).await?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            for (key, bytes) in page {
                each(key, bytes);
            }
        }
    }

    /// The device's record, or DeviceNotFound.
    pub(crate) async fn load_existing(&self, key: &str) -> Result<DeviceRecord> {
        self.load(key)
            .await?
            .ok_or_else(|| match crate::record::split_identity(key) {
                (device, Some(module)) => crate::error::Error::module_not_found(device, module),
                (device, None) => crate::error::Error::device_not_found(device),
            })
    }

    pub(crate) async fn save(&self, record: &DeviceRecord) -> Result<()> {
        self.commit_record(record, Vec::new()).await
    }

    /// Commits `record` with `more` writes. In a cluster only if the store still holds what
    /// the record was read from (absent, for a new one); otherwise [`Error::conflict`]: another
    /// node changed it meanwhile, and the caller reads it again and redoes its change.
    pub(crate) async fn commit_record(
        &self,
        record: &DeviceRecord,
        more: Vec<Write>,
    ) -> Result<()> {
        let mut writes = Vec::with_capacity(1 + more.len());
        writes.push(record.write());
        writes.extend(more);
        if self.cluster.is_none() {
            self.store.commit(writes).await?;
            return Ok(());
        }
        let key = record.key();
        let table = crate::record::table_of(&key);
        let expect = match &record.read_as.0 {
            Some(bytes) => twinhub_store::Expect::holds(table, key.clone(), bytes.to_vec()),
            None => twinhub_store::Expect::absent(table, key.clone()),
        };
        if self.store.commit_checked(vec![expect], writes).await? {
            Ok(())
        } else {
            // A random pause before the caller reads again, so that writers racing on one
            // record from several nodes fall out of step instead of colliding again.
            let jitter = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                % 4_000;
            tokio::time::sleep(Duration::from_micros(u64::from(jitter) + 200)).await;
            Err(crate::error::Error::conflict(&key))
        }
    }

    /// Whether an operation that failed with `e` is to be done again: it met a record another
    /// cluster node changed between its read and its write ([`Error::conflict`]), and has not
    /// been redone too often. Counts the attempt.
    pub(crate) fn retry_after(&self, e: &crate::error::Error, attempt: &mut u32) -> bool {
        if e.is_conflict() && *attempt < CONFLICT_RETRIES {
            *attempt += 1;
            true
        } else {
            false
        }
    }

    /// Closes every connected session (on shutdown).
    pub fn close_all_sessions(&self) {
        for handle in self.directory.all() {
            handle.close.close(CloseReason::Shutdown);
        }
    }
}

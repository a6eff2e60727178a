//! Which node of a cluster runs the jobs: the holder of a lease kept in the shared store's
//! meta table, renewed every second with a checked commit and taken over by another node once
//! it has lapsed (the holder died or lost the store). The new holder resumes every unfinished
//! job from its per-device records, so devices already done are not done again; devices that
//! were in flight when the old holder died are run once more. A node that cannot renew stops
//! its runners before its lease can lapse. Collaborators: `jobs` (the runners), `cluster`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use twinhub_store::{Expect, Table, Write};

use crate::error::Result;
use crate::hub::Hub;

/// The meta key of the lease.
const KEY: &str = "cluster/jobs-leader";
/// How long a lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(5);
/// How often the holder renews it and the others look at it.
const RENEW: Duration = Duration::from_secs(1);
/// Every this many rounds the holder looks for unfinished jobs it does not run (one created on
/// another node whose notice was lost) and for nodes that are gone with sessions on record.
const RESCAN_ROUNDS: u32 = 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Lease {
    node: String,
    until_ms: i64,
}

impl Hub {
    /// Whether this node does the cluster's one-node work (jobs, webhook delivery, the
    /// cloud-to-device sweep): always true on a single node; in a cluster, while it holds the
    /// lease.
    pub fn leads_cluster_work(&self) -> tokio::sync::watch::Receiver<bool> {
        self.jobs.leading.subscribe()
    }

    /// Starts competing for the jobs lease (cluster nodes only; a single node always leads).
    pub(crate) fn spawn_jobs_leadership(self: &Arc<Self>) {
        self.jobs.leading.send_replace(false);
        let hub = Arc::downgrade(self);
        let mut suspend = self.jobs.suspend.subscribe();
        tokio::spawn(async move {
            let mut round = 0u32;
            // Until when this node's last successful claim holds, by its own clock.
            let mut held_until: Option<tokio::time::Instant> = None;
            loop {
                let Some(hub) = hub.upgrade() else { return };
                let started = tokio::time::Instant::now();
                let held = match hub.claim_jobs_lease().await {
                    Ok(true) => {
                        held_until = Some(started + LEASE);
                        true
                    }
                    Ok(false) => {
                        held_until = None;
                        false
                    }
                    // The store is out of reach: keep leading only while the last claim holds,
                    // with a round to spare so the runners stop before another node may start.
                    Err(e) => {
                        tracing::warn!("renewing the jobs lease failed: {}", e.message());
                        held_until.is_some_and(|until| started + RENEW < until)
                    }
                };
                let was = hub.jobs.leading.send_replace(held);
                if held && (!was || round.is_multiple_of(RESCAN_ROUNDS)) {
                    if !was {
                        tracing::info!("this node now runs the cluster's jobs");
                    }
                    if let Err(e) = hub.resume_jobs().await {
                        tracing::warn!("resuming jobs failed: {}", e.message());
                    }
                    hub.sweep_gone_nodes().await;
                } else if was && !held {
                    tracing::warn!("this node no longer runs the cluster's jobs");
                }
                round = round.wrapping_add(1);
                drop(hub);
                tokio::select! {
                    _ = tokio::time::sleep(RENEW) => {}
                    _ = suspend.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// Takes or renews the lease if it is free, lapsed or this node's; whether it holds it.
    async fn claim_jobs_lease(&self) -> Result<bool> {
        let Some(bus) = self.cluster() else {
            return Ok(true);
        };
        let me = bus.node_id();
        let now = crate::keys::now_millis();
        let stored = self.store.get(Table::Meta, KEY).await?;
        let expect = match &stored {
            Some(bytes) => {
                let current = serde_json::from_slice::<Lease>(bytes).ok();
                if let Some(lease) = &current
                    && lease.node != me
                    && lease.until_ms > now
                {
                    return Ok(false);
                }
                Expect::holds(Table::Meta, KEY, bytes.clone())
            }
            None => Expect::absent(Table::Meta, KEY),
        };
        let lease = Lease {
            node: me.to_owned(),
            until_ms: now + LEASE.as_millis() as i64,
        };
        let bytes = serde_json::to_vec(&lease).unwrap_or_default();
        Ok(self
            .store
            .commit_checked(vec![expect], vec![Write::put(Table::Meta, KEY, bytes)])
            .await?)
    }
}

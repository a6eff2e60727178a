//! The hub's domain under bad data and heavy requests, over the in-memory store: records that
//! cannot be decoded are quarantined instead of stopping the hub, aggregates are bounded,
//! finished jobs are removed after their retention, job pages are bounded, and counts never
//! wrap.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use twinhub_core::{Hub, HubOptions};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{Device, DeviceStatus, JobRequest};
use twinhub_store::{MemoryStore, Store, Table, Write};

async fn hub_over(store: Arc<MemoryStore>, tweak: impl FnOnce(&mut HubOptions)) -> Arc<Hub> {
    let mut options = HubOptions::new("hub.test", Vec::new());
    tweak(&mut options);
    Hub::open(store as Arc<dyn Store>, options)
        .await
        .expect("hub opens")
}

fn device(id: &str) -> Device {
    Device {
        device_id: id.into(),
        status: DeviceStatus::Enabled,
        ..Default::default()
    }
}

#[tokio::test]
async fn undecodable_records_are_quarantined_at_open() {
    let store = Arc::new(MemoryStore::new());
    {
        let hub = hub_over(store.clone(), |_| {}).await;
        hub.put_device("good", &device("good"), None).await.unwrap();
    }
    store
        .commit(vec![
            Write::put(Table::Devices, "bad", b"{not json".to_vec()),
            Write::put(Table::Jobs, "badjob", b"\xff\xfe".to_vec()),
        ])
        .await
        .unwrap();
    let hub = hub_over(store.clone(), |_| {}).await;
    assert_eq!(hub.registry_statistics().total_device_count, 1);
    assert!(store.get(Table::Devices, "bad").await.unwrap().is_none());
    assert_eq!(
        store.get(Table::Quarantine, "devices/bad").await.unwrap(),
        Some(b"{not json".to_vec())
    );
    assert!(
        store
            .get(Table::Quarantine, "jobs/badjob")
            .await
            .unwrap()
            .is_some()
    );
    // The hub works on.
    let page = hub
        .query("SELECT * FROM devices", None, None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
}

#[tokio::test]
async fn group_by_is_bounded_and_aggregates_stream() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(store, |_| {}).await;
    let n = twinhub_core::query::MAX_GROUPS + 1;
    for i in 0..n {
        hub.put_device(&format!("d{i:05}"), &device(&format!("d{i:05}")), None)
            .await
            .unwrap();
    }
    let page = hub
        .query("SELECT COUNT() AS n FROM devices", None, None)
        .await
        .unwrap();
    assert_eq!(page.items, vec![json!({"n": n})]);
    let err = hub
        .query(
            "SELECT deviceId, COUNT() FROM devices GROUP BY deviceId",
            None,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::ArgumentInvalid, "{err}");
    // A continuation token claiming an absurd row count does not overflow.
    let token = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"k": "d00001", "n": u64::MAX}).to_string())
    };
    hub.query("SELECT * FROM devices", Some(10), Some(&token))
        .await
        .unwrap();
}

#[tokio::test]
async fn finished_jobs_are_removed_after_their_retention_and_listed_in_pages() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(store.clone(), |o| o.job_retention = Duration::ZERO).await;
    hub.put_device("d1", &device("d1"), None).await.unwrap();
    for i in 0..5 {
        let req: JobRequest = serde_json::from_value(json!({
            "jobId": format!("j{i}"),
            "type": "scheduleUpdateTwin",
            "updateTwin": {"tags": {"i": i}},
            "queryCondition": "*",
        }))
        .unwrap();
        hub.create_job(&format!("j{i}"), &req).await.unwrap();
    }
    // Pages of two, with continuation tokens, until the end.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let (jobs, next) = hub
            .list_jobs(None, None, Some(2), token.as_deref())
            .await
            .unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.into_iter().map(|j| j.job_id));
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, ["j0", "j1", "j2", "j3", "j4"]);
    // Wait for the jobs to finish, then sweep: with no retention every finished one goes.
    for i in 0..5 {
        for _ in 0..200 {
            if hub.get_job(&format!("j{i}")).await.unwrap().status == "completed" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(hub.sweep_finished_jobs().await.unwrap(), 5);
    assert_eq!(store.count(Table::Jobs).await.unwrap(), 0);
    assert_eq!(store.count(Table::DeviceJobs).await.unwrap(), 0);
    let err = hub.get_job("j0").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::JobNotFound);
}

#[tokio::test]
async fn desired_patches_larger_than_twice_the_section_are_refused() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(store, |_| {}).await;
    hub.put_device("d1", &device("d1"), None).await.unwrap();
    // Nothing but nulls: the result is small, the patch as sent is not.
    let nulls: serde_json::Map<String, serde_json::Value> = (0..10_000)
        .map(|i| (format!("key{i:06}"), serde_json::Value::Null))
        .collect();
    let body = json!({"properties": {"desired": nulls}});
    let err = hub.write_twin("d1", &body, None, false).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ArgumentInvalid, "{err}");
}

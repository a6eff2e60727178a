//! Queries read twins from the in-memory index: after every kind of write (device and module
//! create, update and delete, twin PATCH and PUT of tags and desired properties, reported
//! patches from a session, bulk import and delete, a device delete taking its modules, a
//! reopened hub) the rows a query returns are exactly the twins the twin API returns, and
//! live state (connection state, queue depth) is read at query time.

use std::sync::Arc;

use serde_json::{Value, json};
use twinhub_core::directory::SessionHandle;
use twinhub_core::twins::{PatchOutcome, SessionRef, TwinRequest};
use twinhub_core::{Hub, HubOptions};
use twinhub_proto::model::{Device, ExportImportDevice, ImportMode, Module, TwinProperties};
use twinhub_store::{MemoryStore, Store};

const HOST: &str = "index-hub.azure-devices.net";

async fn hub_over(store: &Arc<MemoryStore>) -> Arc<Hub> {
    Hub::open(
        store.clone() as Arc<dyn Store>,
        HubOptions::new(HOST, Vec::new()),
    )
    .await
    .expect("hub opens")
}

async fn device(hub: &Hub, id: &str) -> Device {
    hub.put_device(
        id,
        &Device {
            device_id: id.into(),
            ..Device::default()
        },
        None,
    )
    .await
    .expect("device created")
}

async fn rows(hub: &Hub, text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = hub
            .query(text, Some(3), token.as_deref())
            .await
            .unwrap_or_else(|e| panic!("{text}: {}", e.message()));
        out.extend(page.items);
        match page.continuation {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| match r.get("moduleId").and_then(Value::as_str) {
            Some(m) => format!("{}/{m}", r["deviceId"].as_str().unwrap_or_default()),
            None => r["deviceId"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// Every twin a query returns is the twin the twin API returns for it, and together they
/// are the registry (`expected` keys, in key order).
async fn agrees(hub: &Hub, from: &str, expected: &[&str]) {
    let all = rows(hub, &format!("SELECT * FROM {from}")).await;
    assert_eq!(ids(&all), expected, "{from}");
    for row in &all {
        let key = ids(std::slice::from_ref(row)).remove(0);
        let twin = serde_json::to_value(hub.get_twin(&key).await.unwrap()).unwrap();
        assert_eq!(row, &twin, "{key}");
    }
}

async fn count(hub: &Hub, text: &str) -> u64 {
    rows(hub, text).await[0]["n"].as_u64().expect("a count")
}

#[tokio::test]
async fn the_index_follows_registry_and_twin_writes() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(&store).await;
    agrees(&hub, "devices", &[]).await;

    for id in ["d1", "d2", "d3", "d4"] {
        device(&hub, id).await;
    }
    agrees(&hub, "devices", &["d1", "d2", "d3", "d4"]).await;

    // PATCH tags and desired properties.
    hub.write_twin(
        "d2",
        &json!({"tags": {"site": "rare", "n": 1}, "properties": {"desired": {"fw": "2.0"}}}),
        None,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        ids(&rows(&hub, "SELECT * FROM devices WHERE tags.site = 'rare'").await),
        ["d2"]
    );
    assert_eq!(
        count(
            &hub,
            "SELECT COUNT() AS n FROM devices WHERE properties.desired.fw = '2.0'"
        )
        .await,
        1
    );
    agrees(&hub, "devices", &["d1", "d2", "d3", "d4"]).await;

    // A PUT replaces tags and desired properties: the old values no longer match.
    hub.write_twin("d2", &json!({"tags": {"site": "common"}}), None, true)
        .await
        .unwrap();
    assert!(
        rows(&hub, "SELECT * FROM devices WHERE tags.site = 'rare'")
            .await
            .is_empty()
    );
    assert_eq!(
        count(
            &hub,
            "SELECT COUNT() AS n FROM devices WHERE IS_DEFINED(properties.desired.fw)"
        )
        .await,
        0
    );

    // An identity update (disable) shows in the twin's status.
    let d3 = hub.get_device("d3").await.unwrap();
    hub.put_device(
        "d3",
        &Device {
            status: twinhub_proto::model::DeviceStatus::Disabled,
            ..d3.clone()
        },
        Some(d3.etag.as_deref().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(
        ids(&rows(&hub, "SELECT * FROM devices WHERE status = 'disabled'").await),
        ["d3"]
    );

    hub.delete_device("d4", None).await.unwrap();
    agrees(&hub, "devices", &["d1", "d2", "d3"]).await;
    assert_eq!(count(&hub, "SELECT COUNT() AS n FROM devices").await, 3);
}

#[tokio::test]
async fn the_index_follows_bulk_import_and_delete() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(&store).await;
    device(&hub, "b0").await;
    let mut reported = serde_json::Map::new();
    reported.insert("fw".into(), json!("1.1"));
    let ops: Vec<ExportImportDevice> = (1..=5)
        .map(|i| ExportImportDevice {
            id: format!("b{i}"),
            import_mode: ImportMode::Create,
            tags: Some(
                json!({"region": format!("r{}", i % 2)})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            properties: Some(TwinProperties {
                desired: serde_json::Map::new(),
                reported: reported.clone(),
            }),
            ..Default::default()
        })
        .collect();
    let result = hub.bulk_devices(&ops).await.unwrap();
    assert!(result.is_successful, "{result:?}");
    agrees(&hub, "devices", &["b0", "b1", "b2", "b3", "b4", "b5"]).await;
    assert_eq!(
        rows(
            &hub,
            "SELECT tags.region AS region, COUNT() AS n FROM devices GROUP BY tags.region"
        )
        .await,
        vec![
            json!({"n": 1}),
            json!({"region": "r1", "n": 3}),
            json!({"region": "r0", "n": 2}),
        ]
    );
    assert_eq!(
        count(
            &hub,
            "SELECT COUNT() AS n FROM devices WHERE properties.reported.fw = '1.1'"
        )
        .await,
        5
    );

    // Update some, delete others, in one call.
    let ops = vec![
        ExportImportDevice {
            id: "b1".into(),
            import_mode: ImportMode::Delete,
            ..Default::default()
        },
        ExportImportDevice {
            id: "b2".into(),
            import_mode: ImportMode::UpdateTwin,
            tags: Some(json!({"region": "r9"}).as_object().unwrap().clone()),
            ..Default::default()
        },
        ExportImportDevice {
            id: "b0".into(),
            import_mode: ImportMode::Delete,
            ..Default::default()
        },
    ];
    let result = hub.bulk_devices(&ops).await.unwrap();
    assert!(result.is_successful, "{result:?}");
    agrees(&hub, "devices", &["b2", "b3", "b4", "b5"]).await;
    assert_eq!(
        ids(&rows(&hub, "SELECT * FROM devices WHERE tags.region = 'r9'").await),
        ["b2"]
    );
}

#[tokio::test]
async fn the_index_follows_modules_and_cascades() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(&store).await;
    device(&hub, "d1").await;
    device(&hub, "d2").await;
    for (d, m) in [("d1", "a"), ("d1", "b"), ("d2", "a")] {
        hub.put_module(d, m, &Module::default(), None)
            .await
            .unwrap();
    }
    agrees(&hub, "devices.modules", &["d1/a", "d1/b", "d2/a"]).await;
    hub.write_twin("d1/b", &json!({"tags": {"role": "edge"}}), None, false)
        .await
        .unwrap();
    assert_eq!(
        ids(&rows(
            &hub,
            "SELECT * FROM devices.modules WHERE tags.role = 'edge'"
        )
        .await),
        ["d1/b"]
    );
    // Module twins never show in `FROM devices`.
    agrees(&hub, "devices", &["d1", "d2"]).await;

    hub.delete_module("d2", "a", None).await.unwrap();
    agrees(&hub, "devices.modules", &["d1/a", "d1/b"]).await;

    // Deleting a device takes its modules out of the index too.
    hub.delete_device("d1", None).await.unwrap();
    agrees(&hub, "devices.modules", &[]).await;
    agrees(&hub, "devices", &["d2"]).await;

    // So does a bulk delete.
    hub.put_module("d2", "c", &Module::default(), None)
        .await
        .unwrap();
    agrees(&hub, "devices.modules", &["d2/c"]).await;
    let result = hub
        .bulk_devices(&[ExportImportDevice {
            id: "d2".into(),
            import_mode: ImportMode::Delete,
            ..Default::default()
        }])
        .await
        .unwrap();
    assert!(result.is_successful);
    agrees(&hub, "devices.modules", &[]).await;
    agrees(&hub, "devices", &[]).await;
}

#[tokio::test]
async fn a_reopened_hub_rebuilds_the_index_from_the_store() {
    let store = Arc::new(MemoryStore::new());
    {
        let hub = hub_over(&store).await;
        for id in ["r1", "r2", "r3"] {
            device(&hub, id).await;
        }
        hub.put_module("r2", "m", &Module::default(), None)
            .await
            .unwrap();
        hub.write_twin("r3", &json!({"tags": {"kept": true}}), None, false)
            .await
            .unwrap();
        hub.delete_device("r1", None).await.unwrap();
    }
    let hub = hub_over(&store).await;
    agrees(&hub, "devices", &["r2", "r3"]).await;
    agrees(&hub, "devices.modules", &["r2/m"]).await;
    assert_eq!(
        ids(&rows(&hub, "SELECT * FROM devices WHERE tags.kept = true").await),
        ["r3"]
    );
}

/// Connects `id` with a session handle of its own, signed with its primary key.
async fn connect(hub: &Hub, device: &Device) -> (SessionHandle, String) {
    let key = device
        .authentication
        .as_ref()
        .and_then(|a| a.symmetric_key.as_ref())
        .and_then(|k| k.primary_key.clone())
        .expect("a SAS device has a key");
    let token = twinhub_proto::sas::generate_sas_token(
        &twinhub_proto::sas::device_resource_uri(HOST, &device.device_id, None),
        &key,
        None,
        twinhub_core::keys::now_unix() + 3600,
    )
    .unwrap();
    let (tx, rx) = twinhub_core::directory::command_queue(8);
    std::mem::forget(rx);
    let handle = SessionHandle::new(tx);
    let start = hub
        .connect_device(
            &device.device_id,
            twinhub_core::sessions::Credentials {
                password: Some(&token),
                certificates: &[],
            },
            true,
            handle.clone(),
        )
        .await
        .expect("device connects");
    (handle, start.generation_id)
}

#[tokio::test]
async fn reported_patches_and_live_state_are_seen_by_queries() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(&store).await;
    let online = device(&hub, "on").await;
    device(&hub, "off").await;
    let (handle, generation_id) = connect(&hub, &online).await;
    let session = SessionRef {
        device_id: "on",
        handle: &handle,
        generation_id: &generation_id,
    };
    let outcome = hub
        .device_patch_reported(
            &session,
            &TwinRequest {
                rid: "1",
                dup: false,
                payload: br#"{"temp": 21}"#,
            },
        )
        .await;
    assert!(
        matches!(&outcome, PatchOutcome::Answer(a) if a.status == 204),
        "{outcome:?}"
    );
    assert_eq!(
        ids(&rows(
            &hub,
            "SELECT * FROM devices WHERE properties.reported.temp = 21"
        )
        .await),
        ["on"]
    );
    // Connection state is not in the record: conditions, projections and whole rows read it
    // as it is now.
    assert_eq!(
        ids(&rows(
            &hub,
            "SELECT * FROM devices WHERE connectionState = 'Connected'"
        )
        .await),
        ["on"]
    );
    assert_eq!(
        rows(
            &hub,
            "SELECT deviceId, ConnectionState FROM devices WHERE deviceId = 'off'"
        )
        .await,
        vec![json!({"deviceId": "off", "connectionState": "Disconnected"})]
    );
    assert_eq!(
        rows(
            &hub,
            "SELECT connectionState, COUNT() AS n FROM devices GROUP BY connectionState"
        )
        .await,
        // Groups come in the order of their first twin: "off" sorts before "on".
        vec![
            json!({"connectionState": "Disconnected", "n": 1}),
            json!({"connectionState": "Connected", "n": 1}),
        ]
    );
    agrees(&hub, "devices", &["off", "on"]).await;

    hub.disconnect_device("on", handle.connection_id, true)
        .await
        .unwrap();
    assert!(
        rows(
            &hub,
            "SELECT * FROM devices WHERE connectionState = 'Connected'"
        )
        .await
        .is_empty()
    );
    agrees(&hub, "devices", &["off", "on"]).await;
}

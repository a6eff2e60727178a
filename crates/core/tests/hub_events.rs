//! The hub's own events over the in-memory store, read back from a stream endpoint's log:
//! twin changes (REST patch and replace, a device's reported patch), device lifecycle (one at a
//! time and in bulk), connection state with strictly increasing sequence numbers (also across
//! a reopened hub and a clock behind the stored floor), job lifecycle, and nothing at all when
//! no enabled route takes a source.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use twinhub_core::directory::SessionHandle;
use twinhub_core::hub_events::SEQUENCE_FLOOR_KEY;
use twinhub_core::twins::{PatchOutcome, SessionRef, TwinRequest};
use twinhub_core::{Hub, HubOptions};
use twinhub_proto::message::Message;
use twinhub_proto::model::{Device, DeviceStatus, ExportImportDevice, JobRequest};
use twinhub_routing::{EndpointKind, EndpointSpec, RouteSpec, Source};
use twinhub_store::{MemoryStore, Store, Table, Write};

const HOST: &str = "events-hub.azure-devices.net";
const ENDPOINT: &str = "hubevents";

async fn hub_over(store: Arc<MemoryStore>) -> Arc<Hub> {
    Hub::open(store as Arc<dyn Store>, HubOptions::new(HOST, Vec::new()))
        .await
        .expect("hub opens")
}

/// A hub with the stream endpoint and, for each of `sources`, an enabled route to it.
async fn hub_routing(store: Arc<MemoryStore>, sources: &[Source]) -> Arc<Hub> {
    let hub = hub_over(store).await;
    hub.add_endpoint(EndpointSpec {
        name: ENDPOINT.into(),
        kind: EndpointKind::Stream,
        url: None,
    })
    .await
    .unwrap();
    for (i, source) in sources.iter().enumerate() {
        route(&hub, &format!("r{i}"), *source, true).await;
    }
    hub
}

async fn route(hub: &Hub, name: &str, source: Source, enabled: bool) {
    hub.add_route(RouteSpec {
        name: name.into(),
        source,
        condition: "true".into(),
        endpoints: vec![ENDPOINT.into()],
        enabled,
    })
    .await
    .unwrap();
}

async fn create(hub: &Hub, id: &str) -> Device {
    hub.put_device(
        id,
        &Device {
            device_id: id.into(),
            status: DeviceStatus::Enabled,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap()
}

/// Every event in the endpoint's log, partition by partition (one device's events keep their
/// order: they share a partition).
async fn events(hub: &Hub) -> Vec<Message> {
    let log = hub.endpoint_log(ENDPOINT).expect("the endpoint has a log");
    let mut out = Vec::new();
    for p in 0..log.partition_count() {
        for e in log.read(p, 0, 10_000, 64 << 20).await.unwrap() {
            out.push(Message::decode(&e.data).expect("a stored event decodes"));
        }
    }
    out
}

fn prop<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.application
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

fn body(m: &Message) -> Value {
    serde_json::from_slice(&m.body).expect("an event body is JSON")
}

/// IoT Hub's common properties, and the category's source, schema and opType.
fn check_common(m: &Message, source: &str, schema: &str, op_type: &str, device: &str) {
    assert_eq!(m.stamp.source, source);
    assert_eq!(m.stamp.device_id, device);
    assert_eq!(m.stamp.module_id, None);
    assert_eq!(m.system.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.system.content_encoding.as_deref(), Some("utf-8"));
    assert_eq!(m.system.user_id.as_deref(), Some("events-hub"));
    let cid = m
        .system
        .correlation_id
        .as_deref()
        .expect("a correlation id");
    assert_eq!(cid.len(), 36, "{cid}");
    assert_eq!(prop(m, "hubName"), Some("events-hub"));
    assert_eq!(prop(m, "opType"), Some(op_type));
    assert_eq!(prop(m, "iothub-message-schema"), Some(schema));
    if device.is_empty() {
        assert_eq!(prop(m, "deviceId"), None);
    } else {
        assert_eq!(prop(m, "deviceId"), Some(device));
    }
    let ts = prop(m, "operationTimestamp").expect("an operation timestamp");
    let fraction = ts
        .strip_suffix('Z')
        .and_then(|t| t.rsplit_once('.'))
        .map(|(_, f)| f.len());
    assert_eq!(fraction, Some(7), "{ts}");
    assert!(twinhub_proto::time::parse_timestamp(ts).is_some(), "{ts}");
}

fn op_types(events: &[Message]) -> Vec<&str> {
    events.iter().filter_map(|m| prop(m, "opType")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_patch_reports_the_change_and_a_replace_the_whole_twin() {
    let hub = hub_routing(Arc::new(MemoryStore::new()), &[Source::TwinChangeEvents]).await;
    create(&hub, "d1").await;
    hub.write_twin(
        "d1",
        &json!({"tags": {"region": "eu"}, "properties": {"desired": {"fw": "1.0", "cfg": {"a": 1, "b": 2}}}}),
        None,
        false,
    )
    .await
    .unwrap();
    let twin = hub
        .write_twin(
            "d1",
            &json!({"properties": {"desired": {"cfg": {"a": 5}, "fw": null}}}),
            None,
            false,
        )
        .await
        .unwrap();

    let got = events(&hub).await;
    assert_eq!(op_types(&got), ["updateTwin", "updateTwin"]);
    for m in &got {
        check_common(
            m,
            "twinChangeEvents",
            "twinChangeNotification",
            "updateTwin",
            "d1",
        );
    }
    let first = body(&got[0]);
    assert_eq!(first["version"], 2);
    assert_eq!(first["tags"], json!({"region": "eu"}));
    let desired = &first["properties"]["desired"];
    assert_eq!(desired["fw"], "1.0");
    assert_eq!(desired["cfg"], json!({"a": 1, "b": 2}));
    assert_eq!(desired["$version"], 2);
    assert_eq!(desired["$metadata"]["$lastUpdatedVersion"], 2);
    assert_eq!(desired["$metadata"]["fw"]["$lastUpdatedVersion"], 2);
    assert_eq!(
        desired["$metadata"]["$lastUpdated"],
        prop(&got[0], "operationTimestamp").unwrap()
    );
    assert!(first["properties"].get("reported").is_none());

    // The second patch: only what it touched, removals as null, no tags.
    let second = body(&got[1]);
    assert_eq!(second["version"], 3);
    assert!(second.get("tags").is_none());
    let desired = &second["properties"]["desired"];
    assert_eq!(desired["cfg"], json!({"a": 5}));
    assert_eq!(desired["fw"], Value::Null);
    assert_eq!(desired["$version"], 3);
    let meta = desired["$metadata"].as_object().unwrap();
    assert!(!meta.contains_key("fw"), "a removed key has no metadata");
    let cfg_meta = meta["cfg"].as_object().unwrap();
    assert!(cfg_meta.contains_key("a") && !cfg_meta.contains_key("b"));
    assert_eq!(cfg_meta["a"]["$lastUpdatedVersion"], 3);
    assert_eq!(twin.properties.as_ref().unwrap().desired["$version"], 3);

    // A replace carries the whole twin, as GET shows it.
    let replaced = hub
        .write_twin(
            "d1",
            &json!({"tags": {"site": "x"}, "properties": {"desired": {"mode": "eco"}}}),
            None,
            true,
        )
        .await
        .unwrap();
    let got = events(&hub).await;
    assert_eq!(got.len(), 3);
    check_common(
        &got[2],
        "twinChangeEvents",
        "twinChangeNotification",
        "replaceTwin",
        "d1",
    );
    let whole = body(&got[2]);
    assert_eq!(whole["deviceId"], "d1");
    assert_eq!(whole["etag"], replaced.etag.clone().unwrap());
    assert_eq!(whole["version"], replaced.version.unwrap());
    assert_eq!(whole["tags"], json!({"site": "x"}));
    let props = replaced.properties.unwrap();
    assert_eq!(whole["properties"]["desired"], Value::Object(props.desired));
    assert_eq!(
        whole["properties"]["reported"],
        Value::Object(props.reported)
    );
}

fn token(device: &Device) -> String {
    let key = device
        .authentication
        .as_ref()
        .and_then(|a| a.symmetric_key.as_ref())
        .and_then(|k| k.primary_key.clone())
        .expect("a SAS device has a key");
    let expiry = twinhub_core::keys::now_unix() + 3600;
    twinhub_proto::sas::generate_sas_token(
        &twinhub_proto::sas::device_resource_uri(HOST, &device.device_id, None),
        &key,
        None,
        expiry,
    )
    .unwrap()
}

/// Connects `device` with a fresh session handle; returns the handle and generation.
async fn connect(hub: &Hub, device: &Device) -> (SessionHandle, String) {
    let (tx, rx) = twinhub_core::directory::command_queue(8);
    // The receiver stays alive for the test's length, as a session task's would.
    std::mem::forget(rx);
    let handle = SessionHandle::new(tx);
    let start = hub
        .connect_device(
            &device.device_id,
            twinhub_core::sessions::Credentials {
                password: Some(&token(device)),
                certificates: &[],
            },
            true,
            handle.clone(),
        )
        .await
        .unwrap();
    (handle, start.generation_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_patch_reports_the_reported_change() {
    let hub = hub_routing(Arc::new(MemoryStore::new()), &[Source::TwinChangeEvents]).await;
    let device = create(&hub, "d1").await;
    let (handle, generation) = connect(&hub, &device).await;
    let session = SessionRef {
        device_id: "d1",
        handle: &handle,
        generation_id: &generation,
    };
    let outcome = hub
        .device_patch_reported(
            &session,
            &TwinRequest {
                rid: "1",
                dup: false,
                payload: br#"{"temp": 21.5, "net": {"ip": "10.0.0.2"}}"#,
            },
        )
        .await;
    let PatchOutcome::Answer(answer) = outcome else {
        panic!("the patch is answered: {outcome:?}");
    };
    assert_eq!(answer.status, 204);

    let got = events(&hub).await;
    assert_eq!(got.len(), 1, "connection events are not routed here");
    check_common(
        &got[0],
        "twinChangeEvents",
        "twinChangeNotification",
        "updateTwin",
        "d1",
    );
    let b = body(&got[0]);
    assert_eq!(b["version"], 2);
    let reported = &b["properties"]["reported"];
    assert_eq!(reported["temp"], 21.5);
    assert_eq!(reported["net"], json!({"ip": "10.0.0.2"}));
    assert_eq!(reported["$version"], answer.version.unwrap());
    assert!(reported["$metadata"]["net"]["ip"]["$lastUpdated"].is_string());
    assert!(b["properties"].get("desired").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_and_deleting_devices_reports_their_lifecycle() {
    let hub = hub_routing(
        Arc::new(MemoryStore::new()),
        &[Source::DeviceLifecycleEvents],
    )
    .await;
    create(&hub, "d1").await;
    // An identity update is no lifecycle event.
    let mut update = hub.get_device("d1").await.unwrap();
    update.status = DeviceStatus::Disabled;
    let etag = update.etag.clone();
    hub.put_device("d1", &update, etag.as_deref())
        .await
        .unwrap();
    hub.write_twin("d1", &json!({"tags": {"t": 1}}), None, false)
        .await
        .unwrap();
    let before_delete = hub.get_twin("d1").await.unwrap();
    hub.delete_device("d1", None).await.unwrap();

    let got = events(&hub).await;
    assert_eq!(
        op_types(&got),
        ["createDeviceIdentity", "deleteDeviceIdentity"]
    );
    check_common(
        &got[0],
        "deviceLifecycleEvents",
        "deviceLifecycleNotification",
        "createDeviceIdentity",
        "d1",
    );
    let created = body(&got[0]);
    assert_eq!(created["deviceId"], "d1");
    assert_eq!(created["etag"], "AAAAAAAAAAE=");
    assert_eq!(created["version"], 1);
    assert!(created.get("tags").is_none());
    assert_eq!(created["properties"]["desired"]["$version"], 1);
    assert!(created["properties"]["desired"]["$metadata"]["$lastUpdated"].is_string());
    assert_eq!(created["properties"]["reported"]["$version"], 1);

    check_common(
        &got[1],
        "deviceLifecycleEvents",
        "deviceLifecycleNotification",
        "deleteDeviceIdentity",
        "d1",
    );
    let deleted = body(&got[1]);
    assert_eq!(deleted["etag"], before_delete.etag.unwrap());
    assert_eq!(deleted["version"], before_delete.version.unwrap());
    assert_eq!(deleted["tags"], json!({"t": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_creates_and_deletes_report_each_device_and_refused_ones_nothing() {
    let hub = hub_routing(
        Arc::new(MemoryStore::new()),
        &[Source::DeviceLifecycleEvents],
    )
    .await;
    create(&hub, "old").await;
    let ops: Vec<ExportImportDevice> = serde_json::from_value(json!([
        {"id": "b1", "importMode": "create", "tags": {"batch": "7"}},
        {"id": "b2", "importMode": "createOrUpdate"},
        {"id": "old", "importMode": "delete"},
        {"id": "missing", "importMode": "delete"},
        {"id": "b3", "importMode": "update"}
    ]))
    .unwrap();
    let result = hub.bulk_devices(&ops).await.unwrap();
    assert_eq!(result.errors.len(), 2);

    let got = events(&hub).await;
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            (
                m.stamp.device_id.clone(),
                prop(m, "opType").unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("b1".to_owned(), "createDeviceIdentity".to_owned()),
            ("b2".to_owned(), "createDeviceIdentity".to_owned()),
            ("old".to_owned(), "createDeviceIdentity".to_owned()),
            ("old".to_owned(), "deleteDeviceIdentity".to_owned()),
        ]
    );
    let b1 = got.iter().find(|m| m.stamp.device_id == "b1").unwrap();
    check_common(
        b1,
        "deviceLifecycleEvents",
        "deviceLifecycleNotification",
        "createDeviceIdentity",
        "b1",
    );
    assert_eq!(body(b1)["tags"], json!({"batch": "7"}));
}

fn sequence(m: &Message) -> String {
    let s = body(m)["sequenceNumber"]
        .as_str()
        .expect("a sequence number")
        .to_owned();
    assert_eq!(s.len(), 64, "{s}");
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
        "{s}"
    );
    s
}

fn assert_increasing(seqs: &[String]) {
    for pair in seqs.windows(2) {
        assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_events_number_strictly_upwards_also_across_a_reopened_hub() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_routing(store.clone(), &[Source::DeviceConnectionStateEvents]).await;
    let d1 = create(&hub, "d1").await;
    let d2 = create(&hub, "d2").await;
    let (h1, _) = connect(&hub, &d1).await;
    let (h2, _) = connect(&hub, &d2).await;
    hub.disconnect_device("d1", h1.connection_id, true)
        .await
        .unwrap();
    let (h1, _) = connect(&hub, &d1).await;
    // A replaced session's end is no disconnection: the new one is current.
    let (h1b, _) = connect(&hub, &d1).await;
    hub.disconnect_device("d1", h1.connection_id, true)
        .await
        .unwrap();
    hub.disconnect_device("d1", h1b.connection_id, true)
        .await
        .unwrap();
    hub.disconnect_device("d2", h2.connection_id, true)
        .await
        .unwrap();

    let got = events(&hub).await;
    let d1_events: Vec<&Message> = got.iter().filter(|m| m.stamp.device_id == "d1").collect();
    assert_eq!(
        d1_events
            .iter()
            .map(|m| prop(m, "opType").unwrap())
            .collect::<Vec<_>>(),
        [
            "deviceConnected",
            "deviceDisconnected",
            "deviceConnected",
            "deviceConnected",
            "deviceDisconnected"
        ]
    );
    for m in &d1_events {
        let op = prop(m, "opType").unwrap();
        check_common(
            m,
            "deviceConnectionStateEvents",
            "deviceConnectionStateNotification",
            op,
            "d1",
        );
        assert_eq!(body(m).as_object().unwrap().len(), 1, "only sequenceNumber");
    }
    assert_increasing(&d1_events.iter().map(|m| sequence(m)).collect::<Vec<_>>());
    // Across devices too: every number is distinct, and the hub's last is the largest.
    let mut all: Vec<String> = got.iter().map(sequence).collect();
    let last = d1_events.last().map(|m| sequence(m)).unwrap();
    let later = sequence(
        got.iter()
            .find(|m| m.stamp.device_id == "d2" && prop(m, "opType") == Some("deviceDisconnected"))
            .unwrap(),
    );
    assert!(last < later, "d2's disconnect came after d1's last event");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), got.len());
    let before_reopen = all.last().unwrap().clone();
    drop(hub);

    // The same store reopened: numbering continues upwards.
    let hub = hub_over(store.clone()).await;
    let (h, _) = connect(&hub, &d1).await;
    hub.disconnect_device("d1", h.connection_id, true)
        .await
        .unwrap();
    let got = events(&hub).await;
    let fresh: Vec<String> = got
        .iter()
        .map(sequence)
        .filter(|s| *s > before_reopen)
        .collect();
    assert_eq!(fresh.len(), 2, "two new events, above every earlier one");
    assert_increasing(&fresh);
    assert!(
        store
            .get(Table::Meta, SEQUENCE_FLOOR_KEY)
            .await
            .unwrap()
            .is_some()
    );
}

/// A copy of `from`'s registry, routing and meta in a new store: the hub's state as a restart
/// finds it, with no clock kept in memory for it.
async fn restarted_copy(from: &MemoryStore) -> Arc<MemoryStore> {
    let to = Arc::new(MemoryStore::new());
    for table in [Table::Devices, Table::Meta] {
        let rows = from.scan(table, None, 10_000).await.unwrap();
        let writes = rows
            .into_iter()
            .map(|(k, v)| Write::put(table, k, v))
            .collect::<Vec<_>>();
        if !writes.is_empty() {
            to.commit(writes).await.unwrap();
        }
    }
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_starts_above_the_stored_floor_even_with_the_clock_behind() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_routing(store.clone(), &[Source::DeviceConnectionStateEvents]).await;
    let d1 = create(&hub, "d1").await;
    let (h, _) = connect(&hub, &d1).await;
    hub.disconnect_device("d1", h.connection_id, true)
        .await
        .unwrap();
    let first: Vec<String> = events(&hub).await.iter().map(sequence).collect();
    assert_increasing(&first);
    drop(hub);

    // As if the clock had run far ahead before the restart and been set right since: the stored
    // floor (2^60 ticks, in the 53rd century) is far above the time now.
    let restarted = restarted_copy(&store).await;
    let far = 1u64 << 60;
    restarted
        .commit(vec![Write::put(
            Table::Meta,
            SEQUENCE_FLOOR_KEY,
            far.to_string().into_bytes(),
        )])
        .await
        .unwrap();
    let hub = hub_over(restarted).await;
    let (h, _) = connect(&hub, &d1).await;
    hub.disconnect_device("d1", h.connection_id, true)
        .await
        .unwrap();
    let next: Vec<String> = events(&hub).await.iter().map(sequence).collect();
    assert_eq!(
        next.len(),
        2,
        "the endpoint's log is the new hub's own (in memory)"
    );
    let floor_text = format!("{:016X}{far:016X}{:032X}", 0, 0);
    assert!(next[0] >= floor_text, "{} below the floor", next[0]);
    assert!(first.last().unwrap() < &next[0]);
    assert_increasing(&next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reports_its_creation_and_its_end() {
    let hub = hub_routing(
        Arc::new(MemoryStore::new()),
        &[Source::DeviceJobLifecycleEvents],
    )
    .await;
    create(&hub, "d1").await;
    let request: JobRequest = serde_json::from_value(json!({
        "jobId": "job1",
        "type": "scheduleUpdateTwin",
        "queryCondition": "*",
        "updateTwin": {"tags": {"updated": true}},
        "maxExecutionTimeInSeconds": 60
    }))
    .unwrap();
    hub.create_job("job1", &request).await.unwrap();
    let mut done = None;
    for _ in 0..200 {
        let job = hub.get_job("job1").await.unwrap();
        if job.status == "completed" {
            done = Some(job);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = done.expect("the job completes");
    // The end event is appended right after the job's final state is committed: a reader
    // that saw the state may look before it lands.
    let mut got = events(&hub).await;
    for _ in 0..100 {
        if got.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        got = events(&hub).await;
    }
    assert_eq!(op_types(&got), ["jobCreated", "jobCompleted"]);
    for m in &got {
        let op = prop(m, "opType").unwrap();
        check_common(
            m,
            "deviceJobLifecycleEvents",
            "deviceJobLifecycleNotification",
            op,
            "",
        );
        assert_eq!(prop(m, "jobId"), Some("job1"));
    }
    let created = body(&got[0]);
    assert_eq!(created["jobId"], "job1");
    assert_eq!(created["type"], "scheduleUpdateTwin");
    assert!(matches!(
        created["status"].as_str(),
        Some("queued" | "scheduled")
    ));
    assert_eq!(body(&got[1]), serde_json::to_value(&done).unwrap());
    assert_eq!(body(&got[1])["deviceJobStatistics"]["succeededCount"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_built_or_appended_when_no_enabled_route_takes_the_source() {
    let store = Arc::new(MemoryStore::new());
    // Device messages go to the endpoint, and each system source has a route, disabled.
    let hub = hub_routing(store.clone(), &[Source::DeviceMessages]).await;
    for (i, source) in [
        Source::TwinChangeEvents,
        Source::DeviceLifecycleEvents,
        Source::DeviceConnectionStateEvents,
        Source::DeviceJobLifecycleEvents,
    ]
    .into_iter()
    .enumerate()
    {
        route(&hub, &format!("off{i}"), source, false).await;
    }
    let d1 = create(&hub, "d1").await;
    hub.write_twin("d1", &json!({"tags": {"a": 1}}), None, false)
        .await
        .unwrap();
    hub.write_twin("d1", &json!({"tags": {"a": 2}}), None, true)
        .await
        .unwrap();
    let (h, generation) = connect(&hub, &d1).await;
    let session = SessionRef {
        device_id: "d1",
        handle: &h,
        generation_id: &generation,
    };
    let outcome = hub
        .device_patch_reported(
            &session,
            &TwinRequest {
                rid: "1",
                dup: false,
                payload: br#"{"r": 1}"#,
            },
        )
        .await;
    assert!(matches!(outcome, PatchOutcome::Answer(ref a) if a.status == 204));
    hub.disconnect_device("d1", h.connection_id, true)
        .await
        .unwrap();
    let ops: Vec<ExportImportDevice> =
        serde_json::from_value(json!([{"id": "b1", "importMode": "create"}])).unwrap();
    hub.bulk_devices(&ops).await.unwrap();
    hub.delete_device("b1", None).await.unwrap();
    let request: JobRequest = serde_json::from_value(json!({
        "jobId": "job1", "type": "scheduleUpdateTwin", "queryCondition": "*",
        "updateTwin": {"tags": {"j": 1}}
    }))
    .unwrap();
    hub.create_job("job1", &request).await.unwrap();
    for _ in 0..200 {
        if hub.get_job("job1").await.unwrap().status == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hub.get_job("job1").await.unwrap().status, "completed");

    assert!(events(&hub).await.is_empty());
    assert!(hub.endpoint_log("events").is_some());
    // No connection sequence number was even taken.
    assert!(
        store
            .get(Table::Meta, SEQUENCE_FLOOR_KEY)
            .await
            .unwrap()
            .is_none()
    );
}

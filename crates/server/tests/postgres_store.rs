//! The hub on a PostgreSQL store (`--store postgres://...`), against a real PostgreSQL started
//! from Debian's binaries on loopback: the seed flow (a device answers `rebootDevice` and
//! reports `rebootTime`; the service invokes it and reads the twin) with the Rust SDK, state
//! kept across a restart, and two nodes on one database sharing the identity (policies and
//! CA), the registry and the twins; `connection-string --store` reads the shared identity.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::TestHub;
use tokio::time::timeout;
use twinhub_sdk::proto::model::CloudToDeviceMethod;
use twinhub_sdk::{DeviceClient, MethodResponse, ServiceClient};

const WAIT: Duration = Duration::from_secs(30);

async fn hub_on(url: &str) -> TestHub {
    let url = url.to_string();
    TestHub::start_with(move |c| c.store = Some(url.clone())).await
}

/// The device side of the device-management seed: answers `rebootDevice` with 200 and reports
/// the reboot time.
fn reboot_handler(device: &DeviceClient) {
    let reporter = device.clone();
    device.set_method_handler(move |request| {
        let reporter = reporter.clone();
        async move {
            if request.name != "rebootDevice" {
                return MethodResponse::new(404, json!({"error": "no such method"}));
            }
            let patch = json!({"iothubDM": {"reboot": {"lastReboot": "2026-12-04T16:00:00Z"}}, "rebootTime": "2026-12-04T16:00:00Z"});
            tokio::spawn(async move {
                // Reported after the answer, as the seed's device does.
                let _ = reporter.patch_reported(&patch).await;
            });
            MethodResponse::new(200, json!({"result": "rebooting"}))
        }
    });
}

async fn invoke_reboot(service: &ServiceClient, id: &str) -> (u16, Value) {
    let result = service
        .invoke_method(
            id,
            &CloudToDeviceMethod {
                method_name: "rebootDevice".into(),
                payload: Some(Value::Null),
                response_timeout_in_seconds: Some(10),
                connect_timeout_in_seconds: Some(10),
            },
        )
        .await
        .expect("the method call succeeds");
    (result.status as u16, result.payload)
}

async fn reported_reboot_time(service: &ServiceClient, id: &str) -> Option<Value> {
    let twin = service.get_twin(id).await.expect("the twin reads");
    twin.properties?.reported.get("rebootTime").cloned()
}

async fn wait_for_reboot_time(service: &ServiceClient, id: &str) -> Value {
    timeout(WAIT, async {
        loop {
            if let Some(time) = reported_reboot_time(service, id).await {
                return time;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("rebootTime shows in the twin in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_runs_on_postgres_and_survives_a_restart() {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let mut hub = hub_on(&database.url()).await;
    let service = hub.owner();
    let key = hub.device("reboot-dev").await;
    let device = support::device_client(&hub, "reboot-dev", &key);
    reboot_handler(&device);
    device.connect().await.expect("the device connects");

    let (status, payload) = invoke_reboot(&service, "reboot-dev").await;
    assert_eq!(status, 200);
    assert_eq!(payload, json!({"result": "rebooting"}));
    assert_eq!(
        wait_for_reboot_time(&service, "reboot-dev").await,
        json!("2026-12-04T16:00:00Z")
    );
    device.close().await;

    // Nothing of the registry or the twin lived in the data dir's embedded store.
    assert!(
        !hub.dir.path().join("store.redb").exists(),
        "no embedded store is created when --store is given"
    );
    hub.restart().await;
    let service = hub.owner();
    assert_eq!(
        reported_reboot_time(&service, "reboot-dev").await,
        Some(json!("2026-12-04T16:00:00Z")),
        "the twin is kept in PostgreSQL across a restart"
    );
    let device = support::device_client(&hub, "reboot-dev", &key);
    reboot_handler(&device);
    device
        .connect()
        .await
        .expect("the same key still signs in after the restart");
    assert_eq!(invoke_reboot(&service, "reboot-dev").await.0, 200);
    device.close().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_share_identity_registry_and_twins() {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let first = hub_on(&database.url()).await;
    let second = hub_on(&database.url()).await;

    // One identity: the same policies (so one connection string's keys work on both) and the
    // same CA, written into each node's data dir.
    let first_policies = &first.server().hub_file.policies;
    assert_eq!(first_policies, &second.server().hub_file.policies);
    assert_eq!(
        std::fs::read(first.ca_pem()).unwrap(),
        std::fs::read(second.ca_pem()).unwrap(),
        "both nodes write the shared CA as tls/ca.pem"
    );
    let bundle = std::fs::read_to_string(second.dir.path().join("tls").join("ca-bundle.pem"))
        .expect("the second node writes the bundle");
    assert!(bundle.contains(std::fs::read_to_string(first.ca_pem()).unwrap().trim()));
    let from_store = twinhub_server::shared_identity::hub_file_from_store(&database.url())
        .await
        .expect("the CLI reads the identity from the store");
    assert_eq!(&from_store.policies, first_policies);
    assert_eq!(
        from_store.connection_string("iothubowner"),
        first.server().hub_file.connection_string("iothubowner"),
        "connection-string --store prints the first node's"
    );

    // A device registered through one node signs in on the other; its reported properties
    // written there read back through the first.
    let key = first.device("shared-dev").await;
    let device = support::device_client(&second, "shared-dev", &key);
    reboot_handler(&device);
    device
        .connect()
        .await
        .expect("a device made on node 1 connects to node 2");
    let (status, _) = invoke_reboot(&second.owner(), "shared-dev").await;
    assert_eq!(status, 200);
    assert_eq!(
        wait_for_reboot_time(&first.owner(), "shared-dev").await,
        json!("2026-12-04T16:00:00Z"),
        "node 1 reads the twin node 2 wrote"
    );
    // A desired patch through node 1 lands in the record node 2 reads.
    first
        .owner()
        .update_twin(
            "shared-dev",
            &json!({"properties": {"desired": {"interval": 5}}}),
            None,
        )
        .await
        .expect("node 1 patches the twin");
    let twin = second.owner().get_twin("shared-dev").await.unwrap();
    assert_eq!(
        twin.properties.unwrap().desired.get("interval"),
        Some(&json!(5))
    );
    device.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_sent_to_either_node_is_read_through_both() {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let nats = twinhub_testsvc::nats::shared().url();
    let node = |db: String, nats: String, name: &'static str| {
        TestHub::start_with(move |c| {
            c.store = Some(db.clone());
            c.cluster = Some(nats.clone());
            c.node_id = Some(name.into());
            // The stream is named after the hub; this is the only test of this process on
            // the shared NATS server, so the default name is this test's own.
        })
    };
    let first = node(database.url(), nats.clone(), "telemetry-1").await;
    let second = node(database.url(), nats, "telemetry-2").await;

    let mut devices = Vec::new();
    for (i, hub) in [&first, &second].into_iter().enumerate() {
        let id = format!("tel-node-{i}");
        let key = first.device(&id).await;
        let device = support::device_client(hub, &id, &key);
        device.connect().await.expect("the device connects");
        for n in 0..3 {
            device
                .send_event(format!("{{\"node\":{i},\"n\":{n}}}"), &[])
                .await
                .expect("the node acknowledges the event");
        }
        devices.push(device);
    }

    for hub in [&first, &second] {
        assert_eq!(
            support::event_bodies(hub, None, 6).await,
            [
                r#"{"node":0,"n":0}"#,
                r#"{"node":0,"n":1}"#,
                r#"{"node":0,"n":2}"#,
                r#"{"node":1,"n":0}"#,
                r#"{"node":1,"n":1}"#,
                r#"{"node":1,"n":2}"#,
            ],
            "every node's endpoint serves the events of devices on every node"
        );
    }
    for device in devices {
        device.close().await;
    }
}

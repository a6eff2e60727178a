//! Two hub nodes sharing one PostgreSQL store and one NATS server (`--store`, `--cluster`),
//! both real and on loopback: a device's direct methods and desired patches reach it through
//! the other node, its connection state and twin changes show on both, a CONNECT on one node
//! closes the identity's session on the other, disabling through one node closes the session
//! on the other, a device connected nowhere is 404103 through either, and a second node under
//! a name in use is refused.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{RawMqtt, TestHub, health};
use tokio::time::timeout;
use twinhub_sdk::proto::model::{CloudToDeviceMethod, ConnectionState, DeviceStatus};
use twinhub_sdk::{DeviceClient, Error, MethodResponse};

const WAIT: Duration = Duration::from_secs(20);

/// Two nodes, `a` and `b`, of one hub on a fresh database.
struct Pair {
    a: TestHub,
    b: TestHub,
    _database: twinhub_testsvc::postgres::PgDatabase,
}

async fn node(database: &str, name: &str) -> TestHub {
    let (database, name) = (database.to_owned(), name.to_owned());
    let nats = twinhub_testsvc::nats::shared().url();
    TestHub::start_with(move |c| {
        c.store = Some(database.clone());
        c.cluster = Some(nats.clone());
        c.node_id = Some(name.clone());
    })
    .await
}

/// The nodes are named after the test, so tests running at once on the shared NATS server
/// never share a node name.
async fn pair(test: &str) -> Pair {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let a = node(&database.url(), &format!("{test}-a")).await;
    let b = node(&database.url(), &format!("{test}-b")).await;
    Pair {
        a,
        b,
        _database: database,
    }
}

fn call(name: &str, connect_timeout: i64) -> CloudToDeviceMethod {
    CloudToDeviceMethod {
        method_name: name.into(),
        payload: Some(json!({"through": "the other node"})),
        response_timeout_in_seconds: Some(10),
        connect_timeout_in_seconds: Some(connect_timeout),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_patches_and_state_reach_a_device_on_the_other_node() {
    let nodes = pair("reach").await;
    let key = nodes.a.device("far-dev").await;
    let device = support::device_client(&nodes.b, "far-dev", &key);
    device.set_method_handler(|request| async move {
        MethodResponse::new(
            200,
            json!({"method": request.name, "echo": request.payload}),
        )
    });
    let mut patches = device.desired_patches();
    device
        .connect()
        .await
        .expect("the device connects to node b");
    let first = timeout(WAIT, patches.recv()).await.unwrap().unwrap();
    assert!(
        first.full,
        "the stream opens with the whole desired document"
    );

    // A method invoked through node a runs on node b's session.
    let service = nodes.a.owner();
    let result = service
        .invoke_method("far-dev", &call("DeviceMethod", 0))
        .await
        .expect("the call through node a succeeds");
    assert_eq!(result.status, 200);
    assert_eq!(
        result.payload,
        json!({"method": "DeviceMethod", "echo": {"through": "the other node"}})
    );

    // A desired patch through node a reaches the device on node b, with its version.
    let twin = service
        .update_twin(
            "far-dev",
            &json!({"properties": {"desired": {"interval": 7}}}),
            None,
        )
        .await
        .expect("node a patches the twin");
    let version = twin
        .properties
        .and_then(|p| p.desired.get("$version").and_then(Value::as_u64))
        .expect("desired $version");
    let patch = timeout(WAIT, patches.recv())
        .await
        .expect("the patch crosses to node b in time")
        .expect("the stream is open");
    assert_eq!(patch.version, version);
    assert_eq!(patch.patch.get("interval"), Some(&json!(7)));

    // Node a shows the device connected, and its queries see what node b wrote.
    let seen = service.get_device("far-dev").await.unwrap();
    assert_eq!(seen.connection_state, Some(ConnectionState::Connected));
    // Queries through either node see it connected.
    for hub in [&nodes.a, &nodes.b] {
        let rows = hub
            .owner()
            .query_all("SELECT deviceId FROM devices WHERE connectionState = 'Connected'")
            .await
            .expect("the query runs");
        assert_eq!(rows, [json!({"deviceId": "far-dev"})]);
    }
    // The statistics are the cluster's, through either node.
    for hub in [&nodes.a, &nodes.b] {
        let owner = hub.owner();
        assert_eq!(
            owner
                .service_statistics()
                .await
                .unwrap()
                .connected_device_count,
            1
        );
        assert_eq!(
            owner
                .registry_statistics()
                .await
                .unwrap()
                .total_device_count,
            1
        );
    }
    device
        .patch_reported(&json!({"firmware": "2.0"}))
        .await
        .expect("node b takes the reported patch");
    let found = timeout(WAIT, async {
        loop {
            let rows = service
                .query_all(
                    "SELECT deviceId FROM devices WHERE properties.reported.firmware = '2.0'",
                )
                .await
                .expect("the query runs on node a");
            if !rows.is_empty() {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("node a's queries see node b's write in time");
    assert_eq!(found, [json!({"deviceId": "far-dev"})]);

    device.close().await;
    // Gone from node b: node a no longer shows it connected.
    let state = timeout(WAIT, async {
        loop {
            let d = service.get_device("far-dev").await.unwrap();
            if d.connection_state == Some(ConnectionState::Disconnected) {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(state.is_ok(), "node a sees the disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_on_one_node_closes_the_session_on_the_other() {
    let nodes = pair("takeover").await;
    let key = nodes.a.device("moving-dev").await;
    let (mut on_a, _) = RawMqtt::device(&nodes.a, "moving-dev", &key, true).await;
    let (_on_b, _) = RawMqtt::device(&nodes.b, "moving-dev", &key, true).await;
    on_a.expect_closed(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_through_one_node_closes_the_session_on_the_other() {
    let nodes = pair("disable").await;
    let key = nodes.a.device("doomed-dev").await;
    let (mut on_b, _) = RawMqtt::device(&nodes.b, "doomed-dev", &key, true).await;
    let service = nodes.a.owner();
    let mut device = service.get_device("doomed-dev").await.unwrap();
    device.status = DeviceStatus::Disabled;
    service
        .update_device(&device, Some("*"))
        .await
        .expect("node a disables the device");
    on_b.expect_closed(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connected_nowhere_is_not_online_through_either_node() {
    let nodes = pair("nowhere").await;
    nodes.a.device("idle-dev").await;
    for hub in [&nodes.a, &nodes.b] {
        match hub
            .owner()
            .invoke_method("idle-dev", &call("anything", 0))
            .await
        {
            Err(Error::Hub { code, .. }) => assert_eq!(code.map(|c| c.code()), Some(404103)),
            other => panic!("expected 404103, got {other:?}"),
        }
    }
    // With a connect timeout, a device that connects to the other node meanwhile is reached.
    let key = nodes.a.device("late-dev").await;
    let service = nodes.a.owner();
    let waiting =
        tokio::spawn(async move { service.invoke_method("late-dev", &call("late", 10)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let device = support::device_client(&nodes.b, "late-dev", &key);
    device.set_method_handler(|_| async { MethodResponse::new(201, json!("late but here")) });
    device
        .connect()
        .await
        .expect("the device connects to node b");
    let result = timeout(WAIT, waiting)
        .await
        .expect("the waiting call ends in time")
        .unwrap()
        .expect("the waiting call reaches the device on node b");
    assert_eq!(result.status, 201);
    device.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_under_a_name_in_use_is_refused() {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let _first = node(&database.url(), "twin-name").await;
    let nats = twinhub_testsvc::nats::shared().url();
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path(), 0, 0);
    config.store = Some(database.url());
    config.cluster = Some(nats);
    config.node_id = Some("twin-name".into());
    let refused = twinhub_server::RunningServer::start(config)
        .await
        .err()
        .expect("the second node is refused");
    assert!(
        refused.to_string().contains("already runs as 'twin-name'"),
        "{refused}"
    );
}

/// The node holding the jobs lease, as the shared store says.
async fn jobs_leader(hub: &TestHub) -> Option<String> {
    let bytes = hub
        .server()
        .hub
        .store()
        .get(twinhub_store::Table::Meta, "cluster/jobs-leader")
        .await
        .expect("the store reads")?;
    let lease: Value = serde_json::from_slice(&bytes).expect("the lease is JSON");
    lease["node"].as_str().map(str::to_owned)
}

async fn wait_for_leader(hub: &TestHub, not: Option<&str>) -> String {
    timeout(WAIT, async {
        loop {
            if let Some(node) = jobs_leader(hub).await
                && Some(node.as_str()) != not
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a node takes the jobs lease in time")
}

/// A device that counts the calls it answers.
fn counting(device: &DeviceClient) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    device.set_method_handler(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { MethodResponse::new(200, json!("done")) }
    });
    calls
}

async fn wait_for_job(service: &twinhub_sdk::ServiceClient, job_id: &str, status: &str) {
    timeout(Duration::from_secs(40), async {
        loop {
            let job = service.get_job(job_id).await.expect("the job reads");
            if job.status == status {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {job_id} did not become {status} in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_job_over_devices_on_both_nodes_runs_once() {
    let nodes = pair("jobonce").await;
    let leader = wait_for_leader(&nodes.a, None).await;
    let mut devices = Vec::new();
    let mut counts = Vec::new();
    for (i, hub) in [&nodes.a, &nodes.b, &nodes.a, &nodes.b]
        .into_iter()
        .enumerate()
    {
        let id = format!("job-dev-{i}");
        let key = nodes.a.device(&id).await;
        let device = support::device_client(hub, &id, &key);
        counts.push(counting(&device));
        device.connect().await.expect("the device connects");
        devices.push(device);
    }
    // Created through the node that does not lead: the leader runs it.
    let through = if leader.ends_with("-a") {
        &nodes.b
    } else {
        &nodes.a
    };
    let service = through.owner();
    service
        .schedule_method_job(
            "once",
            "deviceId IN ['job-dev-0', 'job-dev-1', 'job-dev-2', 'job-dev-3']",
            &call("jobMethod", 0),
            None,
            Some(60),
        )
        .await
        .expect("the job is created");
    wait_for_job(&service, "once", "completed").await;
    let job = nodes.b.owner().get_job("once").await.unwrap();
    let stats = job.device_job_statistics.expect("statistics");
    assert_eq!((stats.device_count, stats.succeeded_count), (4, 4));
    for (i, count) in counts.iter().enumerate() {
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "device {i} was called exactly once"
        );
    }
    for device in devices {
        device.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_on_another_node_when_its_leader_stops() {
    let nodes = pair("jobmove").await;
    let leader = wait_for_leader(&nodes.a, None).await;
    let Pair { a, b, _database } = nodes;
    let (mut leading, survivor, survivor_name) = if leader.ends_with("-a") {
        (a, b, "jobmove-b")
    } else {
        (b, a, "jobmove-a")
    };
    let survivor = &survivor;
    let done_key = survivor.device("done-dev").await;
    let later_key = survivor.device("later-dev").await;
    let done = support::device_client(survivor, "done-dev", &done_key);
    let done_calls = counting(&done);
    done.connect().await.unwrap();
    let service = survivor.owner();
    // `later-dev` is offline: the job waits for it up to the connect timeout.
    service
        .schedule_method_job(
            "moving",
            "deviceId IN ['done-dev', 'later-dev']",
            &call("jobMethod", 60),
            None,
            Some(120),
        )
        .await
        .expect("the job is created");
    timeout(WAIT, async {
        loop {
            let job = service.get_job("moving").await.unwrap();
            if job
                .device_job_statistics
                .is_some_and(|s| s.succeeded_count == 1)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the leader finishes the connected device");

    // The leader goes; the survivor takes the lease and resumes the job.
    leading.stop().await;
    assert_eq!(
        wait_for_leader(survivor, Some(&leader)).await,
        survivor_name
    );
    let later = support::device_client(survivor, "later-dev", &later_key);
    let later_calls = counting(&later);
    later.connect().await.unwrap();
    wait_for_job(&service, "moving", "completed").await;
    assert_eq!(
        done_calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a device finished before the handover is not called again"
    );
    assert_eq!(later_calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let stats = service
        .get_job("moving")
        .await
        .unwrap()
        .device_job_statistics
        .unwrap();
    assert_eq!((stats.device_count, stats.succeeded_count), (2, 2));
    done.close().await;
    later.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_a_node_that_is_gone_is_cleared_on_first_use() {
    let nodes = pair("ghost").await;
    nodes.a.device("orphan-dev").await;
    // As a node killed before it could record its devices' disconnects leaves them.
    let store = nodes.a.server().hub.store().clone();
    let bytes = store
        .get(twinhub_store::Table::Devices, "orphan-dev")
        .await
        .unwrap()
        .expect("the record");
    let mut rec: Value = serde_json::from_slice(&bytes).unwrap();
    rec["node"] = json!("ghost-node");
    store
        .commit(vec![twinhub_store::Write::put(
            twinhub_store::Table::Devices,
            "orphan-dev",
            serde_json::to_vec(&rec).unwrap(),
        )])
        .await
        .unwrap();
    // A node without responders right after (re)connecting to NATS may be resubscribing;
    // only a settled connection takes it as gone.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    // (The lease holder's sweep may clear it first; either way the call finds no session.)
    let service = nodes.b.owner();
    match service
        .invoke_method("orphan-dev", &call("anything", 0))
        .await
    {
        Err(Error::Hub { code, .. }) => assert_eq!(code.map(|c| c.code()), Some(404103)),
        other => panic!("expected 404103, got {other:?}"),
    }
    assert_eq!(
        service
            .get_device("orphan-dev")
            .await
            .unwrap()
            .connection_state,
        Some(ConnectionState::Disconnected),
        "the gone node's session is cleared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_nats_down_and_recovers_by_itself() {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let nats = twinhub_testsvc::nats::NatsServer::start();
    let url = (database.url(), nats.url());
    let hub = TestHub::start_with(move |c| {
        c.store = Some(url.0.clone());
        c.cluster = Some(url.1.clone());
        c.node_id = Some("health-a".into());
    })
    .await;
    assert_eq!(health(&hub).await.0, 200);
    nats.stop();
    let down = timeout(WAIT, async {
        loop {
            let (status, body) = health(&hub).await;
            if status == 503 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("/health turns 503 while NATS is down");
    assert!(down.contains("cluster bus"), "{down}");
    nats.restart();
    timeout(Duration::from_secs(30), async {
        loop {
            if health(&hub).await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("/health recovers once NATS is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_one_twin_through_both_nodes_at_once_are_all_kept() {
    let nodes = pair("race").await;
    let key = nodes.a.device("busy-dev").await;
    let device = support::device_client(&nodes.b, "busy-dev", &key);
    device
        .connect()
        .await
        .expect("the device connects to node b");
    const EACH: usize = 40;
    let reporter = {
        let device = device.clone();
        tokio::spawn(async move {
            for i in 0..EACH {
                device
                    .patch_reported(&json!({ format!("r{i}"): i }))
                    .await
                    .expect("node b acknowledges the reported patch");
            }
        })
    };
    let writers: Vec<_> = [nodes.a.owner(), nodes.b.owner()]
        .into_iter()
        .enumerate()
        .map(|(n, service)| {
            tokio::spawn(async move {
                for i in 0..EACH {
                    service
                        .update_twin(
                            "busy-dev",
                            &json!({"properties": {"desired": { format!("d{n}_{i}"): i }}}),
                            None,
                        )
                        .await
                        .expect("the desired patch is acknowledged");
                }
            })
        })
        .collect();
    reporter.await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let twin = nodes.a.owner().get_twin("busy-dev").await.unwrap();
    let props = twin.properties.expect("properties");
    let missing_reported: Vec<usize> = (0..EACH)
        .filter(|i| props.reported.get(&format!("r{i}")).is_none())
        .collect();
    let missing_desired: Vec<String> = (0..2)
        .flat_map(|n| (0..EACH).map(move |i| format!("d{n}_{i}")))
        .filter(|k| props.desired.get(k).is_none())
        .collect();
    assert!(
        missing_reported.is_empty() && missing_desired.is_empty(),
        "acknowledged writes lost: reported {missing_reported:?}, desired {missing_desired:?}"
    );
    device.close().await;
}

fn c2d_message(device: &str, id: &str) -> twinhub_proto::c2d::CloudMessage {
    twinhub_proto::c2d::CloudMessage {
        message_id: Some(id.into()),
        to: format!("/devices/{device}/messages/devicebound"),
        body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        ..Default::default()
    }
}

async fn next_c2d(messages: &mut twinhub_sdk::CloudToDeviceMessages) -> String {
    let m = timeout(WAIT, messages.recv())
        .await
        .expect("a cloud-to-device message arrives in time")
        .expect("the stream is open");
    m.message_id.expect("a message id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_to_device_messages_sent_through_one_node_reach_a_device_on_the_other() {
    let nodes = pair("c2d").await;
    let key = nodes.a.device("c2d-dev").await;
    // Queued through node a while the device is away...
    let hub_a = &nodes.a.server().hub;
    hub_a
        .send_c2d(c2d_message("c2d-dev", "while-away"))
        .await
        .unwrap();
    // ...then it connects to node b and gets it, and what node a sends next.
    let device = support::device_client(&nodes.b, "c2d-dev", &key);
    let mut messages = device.c2d_messages();
    device
        .connect()
        .await
        .expect("the device connects to node b");
    assert_eq!(next_c2d(&mut messages).await, "while-away");
    let mut asking = c2d_message("c2d-dev", "while-there");
    asking.ack = twinhub_proto::c2d::Ack::Full;
    hub_a.send_c2d(asking).await.unwrap();
    assert_eq!(next_c2d(&mut messages).await, "while-there");
    // Completed on node b, its feedback reaches a feedback receiver on node a.
    let feedback = timeout(WAIT, hub_a.c2d_feedback_next())
        .await
        .expect("node a's feedback receiver gets node b's feedback in time");
    let ids: Vec<_> = feedback
        .records
        .iter()
        .map(|r| r.original_message_id.clone())
        .collect();
    assert_eq!(ids, ["while-there"]);
    hub_a
        .c2d_feedback_complete(&feedback.lock_token)
        .await
        .unwrap();
    // Both were completed on node b: node a sees the queue empty.
    timeout(WAIT, async {
        loop {
            let queued = nodes
                .a
                .owner()
                .get_device("c2d-dev")
                .await
                .unwrap()
                .cloud_to_device_message_count;
            if queued == Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("node a shows the queue empty");
    assert_eq!(
        hub_a.c2d_purge("c2d-dev").await.unwrap(),
        0,
        "nothing left to purge"
    );
    device.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_stream_endpoint_is_shared_by_the_nodes() {
    let database = twinhub_testsvc::postgres::shared().fresh_database();
    let nats = twinhub_testsvc::nats::shared().url();
    let node = |name: &'static str| {
        let (db, nats) = (database.url(), nats.clone());
        TestHub::start_with(move |c| {
            c.store = Some(db.clone());
            c.cluster = Some(nats.clone());
            c.node_id = Some(name.into());
            c.endpoints =
                vec![serde_json::from_value(json!({"name": "alerts", "kind": "stream"})).unwrap()];
            c.routes = vec![
                serde_json::from_value(json!({
                    "name": "hot",
                    "source": "DeviceMessages",
                    "condition": "true",
                    "endpoints": ["alerts"]
                }))
                .unwrap(),
            ];
        })
    };
    let a = node("endpoint-a").await;
    let b = node("endpoint-b").await;
    for (i, hub) in [&a, &b].into_iter().enumerate() {
        let id = format!("routed-{i}");
        let key = a.device(&id).await;
        let device = support::device_client(hub, &id, &key);
        device.connect().await.unwrap();
        device
            .send_event(format!("{{\"from\":{i}}}"), &[])
            .await
            .expect("the node acknowledges the routed event");
        device.close().await;
    }
    for hub in [&a, &b] {
        assert_eq!(
            support::event_bodies(hub, Some("alerts"), 2).await,
            [r#"{"from":0}"#, r#"{"from":1}"#]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_nodes_devices_stop_showing_connected_by_themselves() {
    let nodes = pair("sweep").await;
    nodes.a.device("left-dev").await;
    let store = nodes.a.server().hub.store().clone();
    let bytes = store
        .get(twinhub_store::Table::Devices, "left-dev")
        .await
        .unwrap()
        .expect("the record");
    let mut rec: Value = serde_json::from_slice(&bytes).unwrap();
    rec["node"] = json!("vanished-node");
    store
        .commit(vec![twinhub_store::Write::put(
            twinhub_store::Table::Devices,
            "left-dev",
            serde_json::to_vec(&rec).unwrap(),
        )])
        .await
        .unwrap();
    let service = nodes.b.owner();
    // Nobody calls the device: the lease holder's sweep finds its node gone.
    timeout(Duration::from_secs(40), async {
        loop {
            let state = service
                .get_device("left-dev")
                .await
                .unwrap()
                .connection_state;
            if state == Some(ConnectionState::Disconnected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .expect("the gone node's device shows disconnected by itself");
}

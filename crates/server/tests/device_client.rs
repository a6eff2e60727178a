//! The Rust device client (`twinhub_sdk::DeviceClient`) against a real hub started in this
//! process on ephemeral ports: direct methods (handler and stream styles) over MQTT/TLS and
//! over WebSockets, twin reads and reported patches, desired-property delivery with versions,
//! telemetry, refused credentials, reconnecting across a hub restart, and SAS token renewal
//! under a stream of method calls. Back-end actions go through the SDK's `ServiceClient`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use twinhub_sdk::proto::model::{CloudToDeviceMethod, CloudToDeviceMethodResult};
use twinhub_sdk::{
    ConnectionState, DesiredPatch, DesiredPatches, DeviceClient, Error, MethodResponse, NewDevice,
    ServiceClient, Transport,
};
use twinhub_server::{Config, RunningServer};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

async fn start_server(data_dir: &Path, https_port: u16, mqtt_port: u16) -> RunningServer {
    RunningServer::start(Config {
        data_dir: data_dir.to_path_buf(),
        hostname: "localhost".into(),
        bind: "127.0.0.1".parse().unwrap(),
        https_port,
        mqtt_port,
        amqp_port: 0,
        ..Config::default()
    })
    .await
    .expect("the hub starts")
}

/// A running hub, its data dir and a service client for it.
struct TestHub {
    server: RunningServer,
    dir: TempDir,
    ca: Vec<u8>,
    service: ServiceClient,
}

impl TestHub {
    async fn start() -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let server = start_server(dir.path(), 0, 0).await;
        let ca = std::fs::read(server.ca_pem.as_ref().expect("dev CA")).unwrap();
        let service =
            ServiceClient::builder(&server.connection_string("iothubowner").expect("policy"))
                .extra_ca_pem(ca.clone())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
        TestHub {
            server,
            dir,
            ca,
            service,
        }
    }

    /// Registers `id` and returns its primary key.
    async fn add_device(&self, id: &str) -> String {
        let device = self
            .service
            .create_device(id, NewDevice::default())
            .await
            .unwrap();
        device
            .authentication
            .and_then(|a| a.symmetric_key)
            .and_then(|k| k.primary_key)
            .expect("the hub generated a key")
    }

    /// A builder for device `id`, aimed at this hub's port for `transport`.
    fn device(
        &self,
        id: &str,
        key: &str,
        transport: Transport,
    ) -> twinhub_sdk::DeviceClientBuilder {
        let port = match transport {
            Transport::Mqtt => self.server.mqtt_addr.port(),
            Transport::WebSocket => self.server.https_addr.port(),
        };
        DeviceClient::builder(&format!(
            "HostName=localhost;DeviceId={id};SharedAccessKey={key}"
        ))
        .extra_ca_pem(self.ca.clone())
        .transport(transport)
        .port(port)
        .operation_timeout(WAIT)
    }

    async fn invoke(&self, id: &str, name: &str, payload: Value) -> CloudToDeviceMethodResult {
        self.service
            .invoke_method(
                id,
                &CloudToDeviceMethod {
                    method_name: name.into(),
                    payload: Some(payload),
                    response_timeout_in_seconds: Some(10),
                    // Calls made while the device reconnects wait for it.
                    connect_timeout_in_seconds: Some(10),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("invoking {name} on {id}: {e}"))
    }

    async fn set_desired(&self, id: &str, desired: Value) -> u64 {
        let twin = self
            .service
            .update_twin(id, &json!({"properties": {"desired": desired}}), None)
            .await
            .unwrap();
        twin.properties
            .and_then(|p| p.desired.get("$version").and_then(Value::as_u64))
            .expect("desired $version")
    }
}

async fn next_patch(patches: &mut DesiredPatches) -> DesiredPatch {
    timeout(WAIT, patches.recv())
        .await
        .expect("a desired patch arrives in time")
        .expect("the stream is open")
}

async fn wait_for_state(
    state: &mut watch::Receiver<ConnectionState>,
    what: &str,
    done: impl FnMut(&ConnectionState) -> bool,
) {
    timeout(WAIT, state.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("the client did not become {what} in time"))
        .expect("the client is alive");
}

fn echo_handler(client: &DeviceClient) {
    client.set_method_handler(|request| async move {
        match request.name.as_str() {
            "teapot" => MethodResponse::new(418, json!({"short": "stout"})),
            _ => MethodResponse::new(
                200,
                json!({"method": request.name, "echo": request.payload}),
            ),
        }
    });
}

async fn method_round_trips(transport: Transport) {
    let hub = TestHub::start().await;

    // Handler style.
    let key = hub.add_device("handler-dev").await;
    let handled = hub.device("handler-dev", &key, transport).build().unwrap();
    echo_handler(&handled);
    handled.connect().await.unwrap();
    assert!(handled.connection_state().borrow().is_connected());
    let result = hub.invoke("handler-dev", "hello", json!({"x": 1})).await;
    assert_eq!(result.status, 200);
    assert_eq!(result.payload, json!({"method": "hello", "echo": {"x": 1}}));
    let result = hub.invoke("handler-dev", "teapot", Value::Null).await;
    assert_eq!(result.status, 418);
    assert_eq!(result.payload, json!({"short": "stout"}));

    // Stream style.
    let key = hub.add_device("stream-dev").await;
    let streamed = hub.device("stream-dev", &key, transport).build().unwrap();
    let mut calls = streamed.method_requests();
    streamed.connect().await.unwrap();
    let invoke = {
        let service = hub.service.clone();
        tokio::spawn(async move {
            service
                .invoke_method(
                    "stream-dev",
                    &CloudToDeviceMethod {
                        method_name: "configure".into(),
                        payload: Some(json!({"level": 3})),
                        response_timeout_in_seconds: Some(10),
                        connect_timeout_in_seconds: Some(10),
                    },
                )
                .await
        })
    };
    let request = timeout(WAIT, calls.recv()).await.unwrap().unwrap();
    assert_eq!(request.name, "configure");
    assert_eq!(request.payload, json!({"level": 3}));
    assert!(!request.request_id.is_empty());
    let payload = json!({"applied": request.payload.clone()});
    request.respond(201, payload).await.unwrap();
    let result = invoke.await.unwrap().unwrap();
    assert_eq!(result.status, 201);
    assert_eq!(result.payload, json!({"applied": {"level": 3}}));

    // A request dropped unanswered is answered 500 rather than left to time out.
    let invoke = {
        let service = hub.service.clone();
        tokio::spawn(async move {
            service
                .invoke_method(
                    "stream-dev",
                    &CloudToDeviceMethod {
                        method_name: "ignored".into(),
                        payload: None,
                        response_timeout_in_seconds: Some(10),
                        connect_timeout_in_seconds: Some(10),
                    },
                )
                .await
        })
    };
    let request = timeout(WAIT, calls.recv()).await.unwrap().unwrap();
    assert_eq!(request.payload, Value::Null);
    drop(request);
    let result = timeout(WAIT, invoke).await.unwrap().unwrap().unwrap();
    assert_eq!(result.status, 500);

    handled.close().await;
    streamed.close().await;
    assert!(matches!(
        &*handled.connection_state().borrow(),
        ConnectionState::Disconnected { .. }
    ));
    assert!(timeout(WAIT, calls.recv()).await.unwrap().is_none());
    hub.server.shutdown().await;
}

#[tokio::test]
async fn methods_over_mqtt_tls() {
    method_round_trips(Transport::Mqtt).await;
}

#[tokio::test]
async fn methods_over_websocket() {
    method_round_trips(Transport::WebSocket).await;
}

#[tokio::test]
async fn twin_read_reported_patches_and_desired_delivery() {
    let hub = TestHub::start().await;
    let key = hub.add_device("twin-dev").await;
    let device = hub
        .device("twin-dev", &key, Transport::Mqtt)
        .build()
        .unwrap();
    let mut patches = device.desired_patches();
    device.connect().await.unwrap();

    // The stream opens with the whole desired document.
    let first = next_patch(&mut patches).await;
    assert!(first.full);
    assert!(first.patch.is_empty(), "{:?}", first.patch);
    let twin = device.get_twin().await.unwrap();
    assert_eq!(twin.desired_version, first.version);
    assert!(twin.reported.is_empty());

    let v1 = device
        .patch_reported(&json!({"firmware": "1.0"}))
        .await
        .unwrap();
    assert_eq!(v1, twin.reported_version + 1);
    let v2 = device
        .patch_reported(&json!({"firmware": "1.1", "radio": {"rssi": -40}}))
        .await
        .unwrap();
    assert_eq!(v2, v1 + 1);
    let twin = device.get_twin().await.unwrap();
    assert_eq!(twin.reported_version, v2);
    assert_eq!(
        Value::Object(twin.reported.clone()),
        json!({"firmware": "1.1", "radio": {"rssi": -40}})
    );
    let service_twin = hub.service.get_twin("twin-dev").await.unwrap();
    let reported = service_twin.properties.unwrap().reported;
    assert_eq!(reported.get("firmware"), Some(&json!("1.1")));

    // The hub's refusal comes back as Error::Hub with its status and message.
    match device.patch_reported(&json!(["not", "an", "object"])).await {
        Err(Error::Hub {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(message.contains("object"), "{message}");
        }
        other => panic!("expected a 400 from the hub, got {other:?}"),
    }

    // Desired changes arrive in order, with their versions and without `$version`.
    let d1 = hub
        .set_desired("twin-dev", json!({"mode": "eco", "interval": 5}))
        .await;
    let patch = next_patch(&mut patches).await;
    assert!(!patch.full);
    assert_eq!(patch.version, d1);
    assert_eq!(
        Value::Object(patch.patch),
        json!({"mode": "eco", "interval": 5})
    );
    let d2 = hub.set_desired("twin-dev", json!({"mode": null})).await;
    assert_eq!(d2, d1 + 1);
    let patch = next_patch(&mut patches).await;
    assert_eq!(patch.version, d2);
    assert_eq!(Value::Object(patch.patch), json!({"mode": null}));
    let twin = device.get_twin().await.unwrap();
    assert_eq!(twin.desired_version, d2);
    assert_eq!(Value::Object(twin.desired), json!({"interval": 5}));

    device.close().await;
    assert!(matches!(device.get_twin().await, Err(Error::Closed)));
    hub.server.shutdown().await;
}

/// An application that stops reading its desired stream is not buffered for without bound:
/// past the queue, patches are dropped, and when it reads again the whole document comes
/// (`full`) with the latest version, so nothing it needs is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_desired_stream_is_bounded_and_catches_up_with_the_whole_document() {
    let hub = TestHub::start().await;
    let key = hub.add_device("lag-dev").await;
    let device = hub
        .device("lag-dev", &key, Transport::Mqtt)
        .build()
        .unwrap();
    let mut patches = device.desired_patches();
    device.connect().await.unwrap();
    assert!(next_patch(&mut patches).await.full);
    // Not reading: more changes than the queue holds.
    let mut last = 0;
    for i in 0..(twinhub_sdk::device::DESIRED_QUEUE + 100) {
        last = hub.set_desired("lag-dev", json!({"step": i})).await;
    }
    // Give the client time to receive them all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = 0;
    let full = loop {
        let p = next_patch(&mut patches).await;
        received += 1;
        if p.full {
            break p;
        }
        assert!(
            received <= twinhub_sdk::device::DESIRED_QUEUE,
            "the queue grew past its bound"
        );
    };
    assert_eq!(full.version, last);
    assert_eq!(
        full.patch.get("step"),
        Some(&json!(twinhub_sdk::device::DESIRED_QUEUE + 99))
    );
    // Back in step: the next change arrives as a patch.
    let next = hub.set_desired("lag-dev", json!({"step": -1})).await;
    let p = next_patch(&mut patches).await;
    assert_eq!((p.version, p.full), (next, false));
    device.close().await;
    hub.server.shutdown().await;
}

#[tokio::test]
async fn telemetry_is_acknowledged_over_both_transports() {
    let hub = TestHub::start().await;
    let key = hub.add_device("telemetry-dev").await;
    for transport in [Transport::Mqtt, Transport::WebSocket] {
        let device = hub
            .device("telemetry-dev", &key, transport)
            .build()
            .unwrap();
        device.connect().await.unwrap();
        let properties = vec![
            ("$.ct".to_string(), "application/json".to_string()),
            ("$.ce".to_string(), "utf-8".to_string()),
            ("alert level".to_string(), "high & rising".to_string()),
        ];
        for i in 0..20 {
            let body = format!(r#"{{"seq": {i}}}"#);
            device.send_event(body, &properties).await.unwrap();
        }
        device.send_event(vec![0u8, 255, 7], &[]).await.unwrap();
        // Too large for IoT Hub: refused before it is sent.
        let too_big = vec![b'x'; twinhub_sdk::device::MAX_EVENT_SIZE + 1];
        assert!(matches!(
            device.send_event(too_big, &[]).await,
            Err(Error::InvalidArgument(_))
        ));
        // The hub drops a connection that publishes somewhere it may not; still connected.
        assert!(device.connection_state().borrow().is_connected());
        device.close().await;
    }
    hub.server.shutdown().await;
}

#[tokio::test]
async fn refused_credentials_fail_fast_and_stop_the_client() {
    let hub = TestHub::start().await;
    let key = hub.add_device("locked-dev").await;

    // A wrong key: one attempt, a typed error, nothing keeps running.
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXkh";
    let device = hub
        .device("locked-dev", wrong, Transport::Mqtt)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = device.connect().await.unwrap_err();
    assert!(matches!(err, Error::NotAuthorized(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!device.connection_state().borrow().is_connected());
    let unknown = hub
        .device("no-such-dev", &key, Transport::WebSocket)
        .build()
        .unwrap();
    assert!(matches!(
        unknown.connect().await,
        Err(Error::NotAuthorized(_))
    ));

    // The key changes under a connected client: its next connection is refused, and the
    // client reports Failed and stops instead of retrying.
    let device = hub
        .device("locked-dev", &key, Transport::Mqtt)
        .sas_token_ttl(Duration::from_secs(2))
        .build()
        .unwrap();
    device.connect().await.unwrap();
    let mut state = device.connection_state();
    let mut identity = hub.service.get_device("locked-dev").await.unwrap();
    if let Some(keys) = identity
        .authentication
        .as_mut()
        .and_then(|a| a.symmetric_key.as_mut())
    {
        keys.primary_key = Some("bmV3LXByaW1hcnkta2V5LWZvci10aGUtZGV2aWNlIQ==".into());
        keys.secondary_key = Some("bmV3LXNlY29uZGFyeS1rZXktZm9yLXRoZS1kZXZpY2U=".into());
    }
    hub.service.update_device(&identity, None).await.unwrap();
    wait_for_state(&mut state, "failed", |s| {
        matches!(s, ConnectionState::Failed(Error::NotAuthorized(_)))
    })
    .await;
    let started = Instant::now();
    assert!(matches!(
        device.get_twin().await,
        Err(Error::NotAuthorized(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1), "no retry loop");
    hub.server.shutdown().await;
}

#[tokio::test]
async fn connect_failures_are_typed() {
    let hub = TestHub::start().await;
    let key = hub.add_device("typed-dev").await;
    let cs = format!("HostName=localhost;DeviceId=typed-dev;SharedAccessKey={key}");

    // The hub's certificate is not trusted without its CA.
    let untrusted = DeviceClient::builder(&cs)
        .port(hub.server.mqtt_addr.port())
        .build()
        .unwrap();
    match untrusted.connect().await {
        Err(Error::Unreachable(why)) => assert!(why.contains("TLS"), "{why}"),
        other => panic!("expected Unreachable, got {other:?}"),
    }

    // Nothing listens on the port.
    let closed_port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let nobody = DeviceClient::builder(&cs)
        .port(closed_port)
        .build()
        .unwrap();
    assert!(matches!(nobody.connect().await, Err(Error::Unreachable(_))));

    // Something accepts but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let mute = DeviceClient::builder(&cs)
        .port(silent_port)
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    assert!(matches!(mute.connect().await, Err(Error::TimedOut)));
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);
    hub.server.shutdown().await;
}

/// A device answering methods and watching desired properties, with its first (full)
/// desired document already read.
async fn sturdy_device(hub: &TestHub, id: &str) -> (DeviceClient, DesiredPatches, u64) {
    let key = hub.add_device(id).await;
    let device = hub.device(id, &key, Transport::Mqtt).build().unwrap();
    echo_handler(&device);
    let mut patches = device.desired_patches();
    device.connect().await.unwrap();
    let first = next_patch(&mut patches).await;
    assert!(first.full);
    assert_eq!(hub.invoke(id, "before", json!(1)).await.status, 200);
    (device, patches, first.version)
}

#[tokio::test]
async fn reconnects_after_the_hub_restarts() {
    let hub = TestHub::start().await;
    // One device's session survives the restart; the other's is lost, so it must subscribe
    // again by itself.
    let (kept, mut kept_patches, kept_version) = sturdy_device(&hub, "kept-dev").await;
    let (lost, mut lost_patches, lost_version) = sturdy_device(&hub, "lost-dev").await;

    let TestHub {
        server,
        dir,
        ca,
        service,
    } = hub;
    let (https_port, mqtt_port) = (server.https_addr.port(), server.mqtt_addr.port());
    let mut kept_state = kept.connection_state();
    let mut lost_state = lost.connection_state();
    server.shutdown().await;
    wait_for_state(&mut kept_state, "disconnected", |s| !s.is_connected()).await;
    wait_for_state(&mut lost_state, "disconnected", |s| !s.is_connected()).await;

    // An operation issued while the hub is down waits for the reconnect.
    let pending_patch = {
        let kept = kept.clone();
        tokio::spawn(async move { kept.patch_reported(&json!({"during": "outage"})).await })
    };
    // Changes the devices cannot be told about while they are away.
    let kept_missed = offline(dir.path(), "kept-dev", json!({"mode": "away"}), false).await;
    let lost_missed = offline(dir.path(), "lost-dev", json!({"mode": "gone"}), true).await;
    assert!(kept_missed > kept_version && lost_missed > lost_version);

    let server = start_server(dir.path(), https_port, mqtt_port).await;
    let hub = TestHub {
        server,
        dir,
        ca,
        service,
    };
    wait_for_state(
        &mut kept_state,
        "connected again",
        ConnectionState::is_connected,
    )
    .await;
    wait_for_state(
        &mut lost_state,
        "connected again",
        ConnectionState::is_connected,
    )
    .await;
    let version = timeout(WAIT, pending_patch)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(version >= 1);

    for (id, device, patches, missed, mode) in [
        ("kept-dev", &kept, &mut kept_patches, kept_missed, "away"),
        ("lost-dev", &lost, &mut lost_patches, lost_missed, "gone"),
    ] {
        // The missed change arrives as the whole desired document.
        let resync = next_patch(patches).await;
        assert!(resync.full, "{id}");
        assert_eq!(resync.version, missed, "{id}");
        assert_eq!(Value::Object(resync.patch), json!({"mode": mode}), "{id}");

        // Methods and desired patches flow on the new connection.
        let result = hub.invoke(id, "after", json!({"n": 2})).await;
        assert_eq!(result.status, 200, "{id}");
        assert_eq!(result.payload, json!({"method": "after", "echo": {"n": 2}}));
        let next = hub.set_desired(id, json!({"mode": "home"})).await;
        let patch = next_patch(patches).await;
        assert!(!patch.full, "{id}");
        assert_eq!(patch.version, next, "{id}");
        assert_eq!(Value::Object(patch.patch), json!({"mode": "home"}), "{id}");
        device.close().await;
    }
    hub.server.shutdown().await;
}

/// Changes desired properties straight in the stopped hub's store, as a back end could have
/// while the device was away, and optionally forgets the device's MQTT session. Returns the
/// new desired version.
async fn offline(data_dir: &Path, device_id: &str, desired: Value, forget_session: bool) -> u64 {
    use twinhub_store::{Store, Table, Write};
    let store = Arc::new(
        twinhub_store::RedbStore::open(&data_dir.join("store.redb")).expect("the store reopens"),
    );
    let hub = twinhub_core::Hub::open(
        store.clone() as Arc<dyn Store>,
        twinhub_core::HubOptions::new("localhost", Vec::new()),
    )
    .await
    .unwrap();
    let twin = hub
        .write_twin(
            device_id,
            &json!({"properties": {"desired": desired}}),
            None,
            false,
        )
        .await
        .unwrap();
    if forget_session {
        assert!(
            store
                .get(Table::Sessions, device_id)
                .await
                .unwrap()
                .is_some()
        );
        store
            .commit(vec![Write::delete(Table::Sessions, device_id)])
            .await
            .unwrap();
    }
    drop(hub);
    store.close().await.unwrap();
    twin.properties
        .and_then(|p| p.desired.get("$version").and_then(Value::as_u64))
        .expect("desired $version")
}

#[tokio::test]
async fn token_renewal_under_method_calls_loses_none() {
    let hub = TestHub::start().await;
    let key = hub.add_device("renewing-dev").await;
    let device = hub
        .device("renewing-dev", &key, Transport::Mqtt)
        .sas_token_ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    echo_handler(&device);
    device.connect().await.unwrap();

    // Count connection changes: each renewal is a reconnect.
    let reconnects = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let mut state = device.connection_state();
        let reconnects = reconnects.clone();
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                if state.borrow_and_update().is_connected() {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let hub = Arc::new(hub);
    let until = Instant::now() + Duration::from_secs(8);
    let mut callers = Vec::new();
    for caller in 0..3 {
        let hub = hub.clone();
        callers.push(tokio::spawn(async move {
            let mut calls = 0u32;
            while Instant::now() < until {
                let payload = json!({"caller": caller, "call": calls});
                let result = hub.invoke("renewing-dev", "tick", payload.clone()).await;
                assert_eq!(result.status, 200, "call {calls} of caller {caller}");
                assert_eq!(result.payload, json!({"method": "tick", "echo": payload}));
                calls += 1;
            }
            calls
        }));
    }
    let mut total = 0;
    for caller in callers {
        total += timeout(WAIT, caller).await.unwrap().unwrap();
    }
    assert!(total > 30, "only {total} calls in 8 s");
    // 8 s with a 3 s token renews at least twice.
    let renewals = reconnects.load(Ordering::Relaxed);
    assert!(renewals >= 2, "only {renewals} reconnects");
    device.close().await;
    watcher.abort();
    let hub = Arc::try_unwrap(hub).ok().expect("callers are done");
    hub.server.shutdown().await;
}

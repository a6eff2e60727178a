//! Module identities end to end through the Rust SDK against a real hub on loopback: the
//! registry's module calls (etags, 404010 and 409301), a `ModuleClient` beside its device's
//! `DeviceClient` (each gets only its own methods, twin and desired patches), module telemetry
//! and output messages stamped with the module id (read back over AMQP),
//! `FROM devices.modules`, disabling or deleting a device ending its modules' sessions,
//! tokens that do not cross identities, and both clients signing in with an X.509 certificate
//! instead of a key (self-signed by thumbprint, or issued by a CA verified with the hub).

mod support;

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use support::{RawMqtt, TestHub, connect_packet, now_unix};
use tokio::time::timeout;
use twinhub_core::certificates::sha256_hex;
use twinhub_mqtt::ConnectReturnCode;
use twinhub_proto::ErrorCode;
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, CloudToDeviceMethod, Module, X509Thumbprint,
};
use twinhub_sdk::{
    ConnectionState, DesiredPatches, DeviceClient, Error, EventsClient, MethodResponse,
    ModuleClient, NewModule, StartPosition, Transport,
};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

fn ca(hub: &TestHub) -> Vec<u8> {
    std::fs::read(hub.ca_pem()).unwrap()
}

/// The key the registry generated or kept for `module`.
fn module_key(module: &Module) -> String {
    module
        .authentication
        .as_ref()
        .and_then(|a| a.symmetric_key.as_ref())
        .and_then(|k| k.primary_key.clone())
        .expect("a SAS module has a primary key")
}

/// Registers module `module_id` on `device_id` and returns its primary key.
async fn add_module(hub: &TestHub, device_id: &str, module_id: &str) -> String {
    let module = hub
        .owner()
        .create_module(device_id, module_id, NewModule::default())
        .await
        .unwrap();
    module_key(&module)
}

fn device_client(hub: &TestHub, id: &str, key: &str) -> DeviceClient {
    DeviceClient::builder(&format!(
        "HostName=localhost;DeviceId={id};SharedAccessKey={key}"
    ))
    .extra_ca_pem(ca(hub))
    .port(hub.mqtt.port())
    .operation_timeout(WAIT)
    .build()
    .unwrap()
}

fn module_client(hub: &TestHub, device: &str, module: &str, key: &str) -> ModuleClient {
    ModuleClient::builder(&format!(
        "HostName=localhost;DeviceId={device};ModuleId={module};SharedAccessKey={key}"
    ))
    .extra_ca_pem(ca(hub))
    .port(hub.mqtt.port())
    .operation_timeout(WAIT)
    .build()
    .unwrap()
}

fn call(name: &str, payload: Value) -> CloudToDeviceMethod {
    CloudToDeviceMethod {
        method_name: name.into(),
        payload: Some(payload),
        response_timeout_in_seconds: Some(10),
        // A client's method subscription may still be on its way right after connect.
        connect_timeout_in_seconds: Some(5),
    }
}

fn code(result: Result<impl std::fmt::Debug, Error>) -> Option<ErrorCode> {
    match result {
        Err(e) => e.code(),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

/// The next desired patch, within the wait.
async fn next_desired(stream: &mut DesiredPatches) -> twinhub_sdk::DesiredPatch {
    timeout(WAIT, stream.recv())
        .await
        .expect("a desired patch within the wait")
        .expect("the stream is open")
}

#[tokio::test]
async fn module_crud_with_etags_and_iot_hub_errors() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    hub.device("gw").await;

    let created = svc
        .create_module(
            "gw",
            "filter",
            NewModule {
                managed_by: Some("IotEdge".into()),
                ..NewModule::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (created.device_id.as_str(), created.module_id.as_str()),
        ("gw", "filter")
    );
    assert_eq!(created.managed_by.as_deref(), Some("IotEdge"));
    let generated = created.authentication.clone().unwrap();
    assert_eq!(generated.auth_type, AuthenticationType::Sas);
    let keys = generated.symmetric_key.unwrap();
    assert!(keys.primary_key.is_some() && keys.secondary_key.is_some());
    assert_ne!(keys.primary_key, keys.secondary_key);
    let etag = created.etag.clone().expect("a module has an etag");

    // Given keys are kept as given.
    let primary = "cHJpbWFyeS1rZXktZm9yLXRoZS1tb2R1bGU=";
    let secondary = "c2Vjb25kYXJ5LWtleS1mb3ItdGhlLW1vZHVsZQ==";
    let given = svc
        .create_module(
            "gw",
            "alpha",
            NewModule {
                primary_key: Some(primary.into()),
                secondary_key: Some(secondary.into()),
                ..NewModule::default()
            },
        )
        .await
        .unwrap();
    let keys = given.authentication.unwrap().symmetric_key.unwrap();
    assert_eq!(
        (keys.primary_key.as_deref(), keys.secondary_key.as_deref()),
        (Some(primary), Some(secondary))
    );

    // Creating one that exists: 409301; on a missing device: 404001.
    assert_eq!(
        code(
            svc.create_module("gw", "filter", NewModule::default())
                .await
        ),
        Some(ErrorCode::ModuleAlreadyExistsOnDevice)
    );
    assert_eq!(
        code(
            svc.create_module("nodevice", "m", NewModule::default())
                .await
        ),
        Some(ErrorCode::DeviceNotFound)
    );

    let fetched = svc.get_module("gw", "filter").await.unwrap();
    assert_eq!(fetched.etag.as_deref(), Some(etag.as_str()));
    let listed = svc.list_modules("gw").await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|m| m.module_id.as_str()).collect();
    assert_eq!(ids, ["alpha", "filter"]);
    assert!(listed.iter().all(|m| m.device_id == "gw"));
    assert_eq!(
        code(svc.list_modules("nodevice").await),
        Some(ErrorCode::DeviceNotFound)
    );
    assert_eq!(
        code(svc.get_module("gw", "missing").await),
        Some(ErrorCode::ModuleNotFound)
    );

    // Updates: a stale etag is 412, the current one changes the module and its etag.
    let mut change = fetched.clone();
    change.managed_by = Some("someone-else".into());
    let stale = "\"c3RhbGU=\"";
    let refused = svc.update_module(&change, Some(stale)).await.unwrap_err();
    assert_eq!(refused.status(), Some(412), "{refused}");
    let updated = svc.update_module(&change, Some(&etag)).await.unwrap();
    assert_eq!(updated.managed_by.as_deref(), Some("someone-else"));
    assert_ne!(updated.etag.as_deref(), Some(etag.as_str()));
    let missing = Module {
        module_id: "missing".into(),
        ..change.clone()
    };
    assert_eq!(
        code(svc.update_module(&missing, Some("*")).await),
        Some(ErrorCode::ModuleNotFound)
    );

    // Deletes: a stale etag is 412, then the module is gone (404010), the other one stays.
    let refused = svc
        .delete_module("gw", "filter", Some(&etag))
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(412), "{refused}");
    svc.delete_module("gw", "filter", updated.etag.as_deref())
        .await
        .unwrap();
    assert_eq!(
        code(svc.get_module("gw", "filter").await),
        Some(ErrorCode::ModuleNotFound)
    );
    assert_eq!(
        code(svc.delete_module("gw", "filter", None).await),
        Some(ErrorCode::ModuleNotFound)
    );
    assert_eq!(svc.list_modules("gw").await.unwrap().len(), 1);

    // Module twins have etags of their own: a stale one is 412, the current one applies.
    let twin = svc.get_module_twin("gw", "alpha").await.unwrap();
    let twin_etag = twin.etag.clone().expect("a module twin has an etag");
    let patch = json!({"tags": {"zone": 1}});
    let updated = svc
        .update_module_twin("gw", "alpha", &patch, Some(&twin_etag))
        .await
        .unwrap();
    assert_ne!(updated.etag, twin.etag);
    let stale = svc
        .update_module_twin("gw", "alpha", &patch, Some(&twin_etag))
        .await
        .unwrap_err();
    assert_eq!(stale.status(), Some(412), "{stale}");
    assert_eq!(
        code(svc.get_module_twin("gw", "filter").await),
        Some(ErrorCode::ModuleNotFound)
    );
}

#[tokio::test]
async fn a_module_and_its_device_each_get_their_own_methods_and_twin() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let device_key = hub.device("edge-1").await;
    let key = add_module(&hub, "edge-1", "sensor").await;

    let device = device_client(&hub, "edge-1", &device_key);
    let module = module_client(&hub, "edge-1", "sensor", &key);
    assert_eq!(
        (module.device_id(), module.module_id()),
        ("edge-1", "sensor")
    );
    device.set_method_handler(|request| async move {
        MethodResponse::new(200, json!({"who": "device", "method": request.name}))
    });
    module.set_method_handler(|request| async move {
        MethodResponse::new(201, json!({"who": "module", "method": request.name}))
    });
    let mut device_desired = device.desired_patches();
    let mut module_desired = module.desired_patches();
    // Both sessions live at once: the module's connect must not end the device's.
    device.connect().await.unwrap();
    module.connect().await.unwrap();
    assert!(next_desired(&mut device_desired).await.full);
    assert!(next_desired(&mut module_desired).await.full);

    let to_device = svc
        .invoke_method("edge-1", &call("ping", json!(1)))
        .await
        .unwrap();
    assert_eq!(to_device.status, 200);
    assert_eq!(
        to_device.payload,
        json!({"who": "device", "method": "ping"})
    );
    let to_module = svc
        .invoke_module_method("edge-1", "sensor", &call("ping", json!(2)))
        .await
        .unwrap();
    assert_eq!(to_module.status, 201);
    assert_eq!(
        to_module.payload,
        json!({"who": "module", "method": "ping"})
    );
    assert!(
        device.connection_state().borrow().is_connected()
            && module.connection_state().borrow().is_connected()
    );

    // Reported properties land in the module's twin only, and the reverse.
    let version = module
        .patch_reported(&json!({"reading": 7, "unit": "C"}))
        .await
        .unwrap();
    assert!(version >= 2, "{version}");
    device
        .patch_reported(&json!({"firmware": "1.0"}))
        .await
        .unwrap();
    let module_twin = svc.get_module_twin("edge-1", "sensor").await.unwrap();
    assert_eq!(module_twin.module_id.as_deref(), Some("sensor"));
    let reported = module_twin.properties.unwrap().reported;
    assert_eq!(
        (reported["reading"].clone(), reported["unit"].clone()),
        (json!(7), json!("C"))
    );
    assert!(!reported.contains_key("firmware"));
    let device_twin = svc.get_twin("edge-1").await.unwrap();
    let reported = device_twin.properties.unwrap().reported;
    assert!(reported.contains_key("firmware") && !reported.contains_key("reading"));
    let seen = module.get_twin().await.unwrap();
    assert_eq!(seen.reported["reading"], json!(7));

    // A desired patch to the module twin reaches the module, not the device.
    let twin = svc
        .update_module_twin(
            "edge-1",
            "sensor",
            &json!({"properties": {"desired": {"interval": 5}}}),
            None,
        )
        .await
        .unwrap();
    let desired_version = twin.properties.unwrap().desired["$version"]
        .as_u64()
        .unwrap();
    let patch = next_desired(&mut module_desired).await;
    assert!(!patch.full);
    assert_eq!(patch.version, desired_version);
    assert_eq!(patch.patch["interval"], json!(5));
    // A replace is a desired change too.
    svc.replace_module_twin(
        "edge-1",
        "sensor",
        &json!({"tags": {"site": "north"}, "properties": {"desired": {"interval": 9}}}),
        None,
    )
    .await
    .unwrap();
    let patch = next_desired(&mut module_desired).await;
    assert_eq!(patch.patch["interval"], json!(9));
    assert_eq!(
        svc.get_module_twin("edge-1", "sensor")
            .await
            .unwrap()
            .tags
            .unwrap()["site"],
        json!("north")
    );
    if let Ok(Some(p)) = timeout(Duration::from_millis(500), device_desired.recv()).await {
        panic!("the device got the module's desired patch: {:?}", p.patch);
    }

    // A method for a module that is not connected is 404103, not the device's business.
    let absent = svc
        .invoke_module_method("edge-1", "nobody", &call("ping", json!(null)))
        .await;
    assert_eq!(code(absent), Some(ErrorCode::ModuleNotFound));
    add_module(&hub, "edge-1", "idle").await;
    let not_waiting = CloudToDeviceMethod {
        connect_timeout_in_seconds: Some(0),
        ..call("ping", json!(null))
    };
    let offline = svc
        .invoke_module_method("edge-1", "idle", &not_waiting)
        .await;
    assert_eq!(code(offline), Some(ErrorCode::DeviceNotOnline));

    module.close().await;
    // The device's session outlives its module's.
    let again = svc
        .invoke_method("edge-1", &call("ping", json!(3)))
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    device.close().await;
}

#[tokio::test]
async fn module_telemetry_is_stamped_with_the_module_id() {
    let hub = TestHub::start().await;
    let device_key = hub.device("tel-gw").await;
    let key = add_module(&hub, "tel-gw", "counter").await;
    let events = EventsClient::builder(
        &hub.server()
            .hub_file
            .events_connection_string("service", false)
            .unwrap(),
    )
    .extra_ca_pem(ca(&hub))
    .connect()
    .await
    .unwrap();
    let mut stream = events.receive(None, StartPosition::Earliest).await.unwrap();

    // Over MQTT over WebSockets, where the module's identity travels the same way.
    let module = ModuleClient::builder(&format!(
        "HostName=localhost;DeviceId=tel-gw;ModuleId=counter;SharedAccessKey={key}"
    ))
    .extra_ca_pem(ca(&hub))
    .transport(Transport::WebSocket)
    .port(hub.https.port())
    .operation_timeout(WAIT)
    .build()
    .unwrap();
    module.connect().await.unwrap();
    module
        .send_event(
            r#"{"count":1}"#,
            &[
                ("$.ct".into(), "application/json".into()),
                ("kind".into(), "count".into()),
            ],
        )
        .await
        .unwrap();
    module
        .send_output_event(
            "alerts",
            "to an output",
            &[("$.on".into(), "ignored".into())],
        )
        .await
        .unwrap();
    let device = device_client(&hub, "tel-gw", &device_key);
    device.connect().await.unwrap();
    device.send_event("from the device", &[]).await.unwrap();

    let mut got = Vec::new();
    while got.len() < 3 {
        match timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(e))) => got.push(e),
            other => panic!("expected three events, got {} then {other:?}", got.len()),
        }
    }
    let from_module = got
        .iter()
        .find(|e| e.body == br#"{"count":1}"#)
        .expect("the module's message");
    assert_eq!(from_module.device_id.as_deref(), Some("tel-gw"));
    assert_eq!(from_module.module_id.as_deref(), Some("counter"));
    assert_eq!(
        from_module.annotations.get("iothub-connection-module-id"),
        Some(&json!("counter"))
    );
    assert_eq!(
        from_module.properties.get("kind"),
        Some(&Some("count".to_owned()))
    );
    assert_eq!(from_module.annotations.get("iothub-outputname"), None);
    let output = got
        .iter()
        .find(|e| e.body == b"to an output")
        .expect("the module's output message");
    assert_eq!(output.module_id.as_deref(), Some("counter"));
    assert_eq!(
        output.annotations.get("iothub-outputname"),
        Some(&json!("alerts"))
    );
    let from_device = got
        .iter()
        .find(|e| e.body == b"from the device")
        .expect("the device's message");
    assert_eq!(from_device.device_id.as_deref(), Some("tel-gw"));
    assert_eq!(from_device.module_id, None);
    module.close().await;
    device.close().await;
}

#[tokio::test]
async fn queries_over_devices_modules() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    for device in ["q1", "q2"] {
        hub.device(device).await;
        for module in ["a", "b"] {
            add_module(&hub, device, module).await;
        }
    }
    svc.update_module_twin("q2", "b", &json!({"tags": {"role": "edge"}}), None)
        .await
        .unwrap();

    let all = svc
        .query_all("SELECT * FROM devices.modules")
        .await
        .unwrap();
    let mut ids: Vec<(String, String)> = all
        .iter()
        .map(|row| {
            (
                row["deviceId"].as_str().unwrap().to_owned(),
                row["moduleId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ids.sort();
    let expected: Vec<(String, String)> = [("q1", "a"), ("q1", "b"), ("q2", "a"), ("q2", "b")]
        .iter()
        .map(|(d, m)| (d.to_string(), m.to_string()))
        .collect();
    assert_eq!(ids, expected);

    let tagged = svc
        .query_all("SELECT * FROM devices.modules WHERE tags.role = 'edge'")
        .await
        .unwrap();
    assert_eq!(tagged.len(), 1);
    assert_eq!(
        (tagged[0]["deviceId"].clone(), tagged[0]["moduleId"].clone()),
        (json!("q2"), json!("b"))
    );
    let by_id = svc
        .query_all("SELECT deviceId FROM devices.modules WHERE moduleId = 'a'")
        .await
        .unwrap();
    assert_eq!(by_id.len(), 2);
    let counted = svc
        .query_all("SELECT COUNT() AS n FROM devices.modules WHERE deviceId = 'q1'")
        .await
        .unwrap();
    assert_eq!(counted, [json!({"n": 2})]);
    // Device queries see devices only.
    let devices = svc.query_all("SELECT * FROM devices").await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .all(|d| d.get("moduleId").is_none_or(Value::is_null))
    );
}

#[tokio::test]
async fn disabling_the_device_ends_its_modules_sessions_and_refuses_them() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    hub.device("off").await;
    let key = add_module(&hub, "off", "m").await;
    let module = module_client(&hub, "off", "m", &key);
    module.connect().await.unwrap();
    let mut state = module.connection_state();

    let mut device = svc.get_device("off").await.unwrap();
    device.status = twinhub_proto::model::DeviceStatus::Disabled;
    svc.update_device(&device, None).await.unwrap();
    let failed = timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Failed(_))),
    )
    .await
    .expect("the module's client gives up within the wait")
    .map(|s| s.clone())
    .unwrap();
    assert!(
        matches!(failed, ConnectionState::Failed(Error::NotAuthorized(_))),
        "{failed:?}"
    );
    // The module itself is still registered, and signs in again once its device is enabled.
    svc.get_module("off", "m").await.unwrap();
    let mut device = svc.get_device("off").await.unwrap();
    device.status = twinhub_proto::model::DeviceStatus::Enabled;
    svc.update_device(&device, None).await.unwrap();
    let again = module_client(&hub, "off", "m", &key);
    again.connect().await.unwrap();
    again.close().await;
}

#[tokio::test]
async fn deleting_the_device_deletes_its_modules_and_ends_their_sessions() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    hub.device("doomed").await;
    let key = add_module(&hub, "doomed", "m").await;
    add_module(&hub, "doomed", "other").await;
    let module = module_client(&hub, "doomed", "m", &key);
    module.connect().await.unwrap();
    let mut state = module.connection_state();

    svc.delete_device("doomed", None).await.unwrap();
    // The session ends; reconnecting is refused, so the client gives up.
    let failed = timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Failed(_))),
    )
    .await
    .expect("the module's client gives up within the wait")
    .map(|s| s.clone())
    .unwrap();
    assert!(
        matches!(failed, ConnectionState::Failed(Error::NotAuthorized(_))),
        "{failed:?}"
    );
    assert_eq!(
        code(svc.get_module("doomed", "m").await),
        Some(ErrorCode::ModuleNotFound)
    );
    assert_eq!(
        code(svc.list_modules("doomed").await),
        Some(ErrorCode::DeviceNotFound)
    );
    // A device of the same id starts without modules.
    hub.device("doomed").await;
    assert!(svc.list_modules("doomed").await.unwrap().is_empty());
    let rows = svc
        .query_all("SELECT * FROM devices.modules WHERE deviceId = 'doomed'")
        .await
        .unwrap();
    assert!(rows.is_empty(), "{rows:?}");
}

/// A token for `resource` under `localhost`, signed with `key`.
fn token(resource: &str, key: &str) -> String {
    twinhub_proto::sas::generate_sas_token(
        &format!("localhost/{resource}"),
        key,
        None,
        now_unix() + 600,
    )
    .unwrap()
}

/// The CONNACK code of a CONNECT as `client_id` with `password`.
async fn connack(hub: &TestHub, client_id: &str, password: &str) -> ConnectReturnCode {
    let mut m = RawMqtt::open(hub).await;
    m.connect(connect_packet(client_id, Some(password), true, 60))
        .await
        .0
}

#[tokio::test]
async fn tokens_do_not_cross_device_and_module_identities() {
    let hub = TestHub::start().await;
    let device_key = hub.device("iso").await;
    let m1 = add_module(&hub, "iso", "m1").await;
    let m2 = add_module(&hub, "iso", "m2").await;
    let module_token = token("devices/iso/modules/m1", &m1);
    let device_token = token("devices/iso", &device_key);

    // Each identity with its own token is admitted.
    assert_eq!(
        connack(&hub, "iso/m1", &module_token).await,
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        connack(&hub, "iso", &device_token).await,
        ConnectReturnCode::Accepted
    );
    // A module's token cannot act for its device or for another module...
    for client_id in ["iso", "iso/m2"] {
        assert_eq!(
            connack(&hub, client_id, &module_token).await,
            ConnectReturnCode::NotAuthorized,
            "the module's token as {client_id}"
        );
    }
    // ...even when it names the other identity's resource but is signed with its own key...
    assert_eq!(
        connack(&hub, "iso", &token("devices/iso", &m1)).await,
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        connack(&hub, "iso/m2", &token("devices/iso/modules/m2", &m1)).await,
        ConnectReturnCode::NotAuthorized
    );
    // ...and a device's token cannot act for its modules.
    assert_eq!(
        connack(&hub, "iso/m1", &device_token).await,
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        connack(
            &hub,
            "iso/m1",
            &token("devices/iso/modules/m1", &device_key)
        )
        .await,
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        connack(&hub, "iso/m2", &token("devices/iso/modules/m2", &m2)).await,
        ConnectReturnCode::Accepted
    );

    // The SDK says so too: a module client with its device's key is not authorized.
    let wrong = module_client(&hub, "iso", "m1", &device_key);
    assert!(
        matches!(wrong.connect().await, Err(Error::NotAuthorized(_))),
        "a module client with the device's key"
    );
}

/// A self-signed certificate for `cn` (PEM) with its key (PEM), and its SHA-256 thumbprint.
fn self_signed(cn: &str, days_from: i64, days_to: i64) -> (String, String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(days_from);
    params.not_after = now + time::Duration::days(days_to);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), sha256_hex(cert.der()))
}

fn x509_auth(thumbprint: &str) -> AuthenticationMechanism {
    AuthenticationMechanism {
        symmetric_key: None,
        x509_thumbprint: Some(X509Thumbprint {
            primary_thumbprint: Some(thumbprint.to_owned()),
            secondary_thumbprint: None,
        }),
        auth_type: AuthenticationType::SelfSigned,
    }
}

#[tokio::test]
async fn device_and_module_clients_sign_in_with_certificates() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let (device_cert, device_key, device_print) = self_signed("cert-dev", -1, 30);
    svc.create_x509_device("cert-dev", &device_print, None)
        .await
        .unwrap();
    let (module_cert, module_key, module_print) = self_signed("cert-mod", -1, 30);
    svc.create_module(
        "cert-dev",
        "cert-mod",
        NewModule {
            authentication: Some(x509_auth(&module_print)),
            ..NewModule::default()
        },
    )
    .await
    .unwrap();

    // The device over MQTT/TLS and over WebSockets, the module over MQTT/TLS.
    for (transport, port) in [
        (Transport::Mqtt, hub.mqtt.port()),
        (Transport::WebSocket, hub.https.port()),
    ] {
        let device = DeviceClient::x509_builder(
            "localhost",
            "cert-dev",
            device_cert.clone(),
            device_key.clone(),
        )
        .extra_ca_pem(ca(&hub))
        .transport(transport)
        .port(port)
        .operation_timeout(WAIT)
        .build()
        .unwrap();
        device.set_method_handler(|_| async { MethodResponse::new(200, json!("cert")) });
        device.connect().await.unwrap();
        let answer = svc
            .invoke_method("cert-dev", &call("who", json!(null)))
            .await
            .unwrap();
        assert_eq!(
            (answer.status, answer.payload),
            (200, json!("cert")),
            "{transport:?}"
        );
        device
            .patch_reported(&json!({"transport": format!("{transport:?}")}))
            .await
            .unwrap();
        device.close().await;
    }
    let module = ModuleClient::x509_builder(
        "localhost",
        "cert-dev",
        "cert-mod",
        module_cert.clone(),
        module_key.clone(),
    )
    .extra_ca_pem(ca(&hub))
    .port(hub.mqtt.port())
    .operation_timeout(WAIT)
    .build()
    .unwrap();
    module.connect().await.unwrap();
    module
        .patch_reported(&json!({"signed": "in"}))
        .await
        .unwrap();
    let twin = svc.get_module_twin("cert-dev", "cert-mod").await.unwrap();
    assert_eq!(twin.properties.unwrap().reported["signed"], json!("in"));
    module.close().await;

    // The module's certificate is not the device's, and the reverse; an expired one is refused
    // with CONNACK 5 (the TLS handshake takes any certificate; the hub judges it after CONNECT).
    let crossed = DeviceClient::x509_builder("localhost", "cert-dev", module_cert, module_key)
        .extra_ca_pem(ca(&hub))
        .port(hub.mqtt.port())
        .build()
        .unwrap();
    assert!(
        matches!(crossed.connect().await, Err(Error::NotAuthorized(_))),
        "the module's certificate for the device"
    );
    let crossed =
        ModuleClient::x509_builder("localhost", "cert-dev", "cert-mod", device_cert, device_key)
            .extra_ca_pem(ca(&hub))
            .port(hub.mqtt.port())
            .build()
            .unwrap();
    assert!(
        matches!(crossed.connect().await, Err(Error::NotAuthorized(_))),
        "the device's certificate for the module"
    );
    let (old_cert, old_key, old_print) = self_signed("old", -30, -1);
    svc.create_x509_device("old", &old_print, None)
        .await
        .unwrap();
    let expired = DeviceClient::x509_builder("localhost", "old", old_cert, old_key)
        .extra_ca_pem(ca(&hub))
        .port(hub.mqtt.port())
        .build()
        .unwrap();
    let refused = expired.connect().await;
    assert!(
        matches!(refused, Err(Error::NotAuthorized(_))),
        "an expired certificate: {refused:?}"
    );
}

/// Parameters for a certificate for `cn` valid from yesterday for a month.
fn cert_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    params
}

/// A leaf for `cn` signed by `issuer`: its PEM and its key's PEM.
fn issued(cn: &str, issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = cert_params(cn).signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn a_module_signs_in_with_a_certificate_from_a_verified_ca() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    // A CA registered with the hub and verified by proof of possession.
    let ca_key = KeyPair::generate().unwrap();
    let mut params = cert_params("Modules Root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let added = svc
        .add_certificate("modules-root", &ca_cert.pem())
        .await
        .unwrap();
    let with_code = svc
        .generate_verification_code("modules-root", Some(&added.etag))
        .await
        .unwrap();
    let code_text = with_code.properties.verification_code.unwrap();
    let (proof, _) = issued(&code_text, &issuer);
    svc.verify_certificate("modules-root", &proof, None)
        .await
        .unwrap();

    svc.create_ca_device("ca-gw").await.unwrap();
    let ca_auth = AuthenticationMechanism {
        symmetric_key: None,
        x509_thumbprint: None,
        auth_type: AuthenticationType::CertificateAuthority,
    };
    svc.create_module(
        "ca-gw",
        "ca-mod",
        NewModule {
            authentication: Some(ca_auth),
            ..NewModule::default()
        },
    )
    .await
    .unwrap();
    let module_client = |cert: String, key: String| {
        ModuleClient::x509_builder("localhost", "ca-gw", "ca-mod", cert, key)
            .extra_ca_pem(ca(&hub))
            .port(hub.mqtt.port())
            .operation_timeout(WAIT)
            .build()
            .unwrap()
    };

    // CN `deviceId/moduleId` signs the module in; methods flow.
    let (cert, key) = issued("ca-gw/ca-mod", &issuer);
    let module = module_client(cert, key);
    module.set_method_handler(|_| async { MethodResponse::new(200, json!("ca")) });
    module.connect().await.unwrap();
    let answer = svc
        .invoke_module_method("ca-gw", "ca-mod", &call("who", json!(null)))
        .await
        .unwrap();
    assert_eq!((answer.status, answer.payload), (200, json!("ca")));
    module.close().await;
    // A bare module id would admit a module of that name on any device: refused.
    let (cert, key) = issued("ca-mod", &issuer);
    assert!(matches!(
        module_client(cert, key).connect().await,
        Err(Error::NotAuthorized(_))
    ));
    // The device's certificate (CN = device id) does not sign in as the module, nor the
    // module's as the device.
    let (cert, key) = issued("ca-gw", &issuer);
    assert!(matches!(
        module_client(cert.clone(), key.clone()).connect().await,
        Err(Error::NotAuthorized(_))
    ));
    let device = DeviceClient::x509_builder("localhost", "ca-gw", cert, key)
        .extra_ca_pem(ca(&hub))
        .port(hub.mqtt.port())
        .build()
        .unwrap();
    device.connect().await.unwrap();
    device.close().await;
    let (cert, key) = issued("ca-gw/ca-mod", &issuer);
    let device = DeviceClient::x509_builder("localhost", "ca-gw", cert, key)
        .extra_ca_pem(ca(&hub))
        .port(hub.mqtt.port())
        .build()
        .unwrap();
    assert!(matches!(
        device.connect().await,
        Err(Error::NotAuthorized(_))
    ));
}

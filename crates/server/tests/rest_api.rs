//! The registry, twin and statistics REST API through the SDK's ServiceClient against a real
//! in-process hub: success shapes and codes, IoT Hub error codes, authorization per policy,
//! and persistence across a restart.

mod support;

use std::time::Duration;

use serde_json::json;
use support::TestHub;
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{DeviceStatus, ExportImportDevice, ImportMode};
use twinhub_sdk::{Error, NewDevice, ServiceClient};

fn code(e: &Error) -> (Option<u16>, Option<ErrorCode>) {
    (e.status(), e.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn device_crud_and_errors() {
    let hub = TestHub::start().await;
    let svc = hub.owner();

    let d = svc
        .create_device("dev-1", NewDevice::default())
        .await
        .unwrap();
    assert_eq!(d.device_id, "dev-1");
    assert_eq!(d.status, DeviceStatus::Enabled);
    assert_eq!(d.generation_id.as_ref().unwrap().len(), 18);
    let keys = d
        .authentication
        .as_ref()
        .unwrap()
        .symmetric_key
        .clone()
        .unwrap();
    assert!(keys.primary_key.is_some() && keys.secondary_key.is_some());

    let dup = svc
        .create_device("dev-1", NewDevice::default())
        .await
        .unwrap_err();
    assert_eq!(
        code(&dup),
        (Some(409), Some(ErrorCode::DeviceAlreadyExists))
    );

    let missing = svc.get_device("nope").await.unwrap_err();
    assert_eq!(code(&missing), (Some(404), Some(ErrorCode::DeviceNotFound)));

    let bad_id = svc
        .create_device(&"x".repeat(129), NewDevice::default())
        .await
        .unwrap_err();
    assert_eq!(code(&bad_id), (Some(400), Some(ErrorCode::ArgumentInvalid)));
    let bad_char = svc
        .create_device("has space", NewDevice::default())
        .await
        .unwrap_err();
    assert_eq!(bad_char.status(), Some(400));

    // Update with the right etag, then a stale one.
    let mut upd = d.clone();
    upd.status = DeviceStatus::Disabled;
    let after = svc.update_device(&upd, d.etag.as_deref()).await.unwrap();
    assert_eq!(after.status, DeviceStatus::Disabled);
    assert_ne!(after.etag, d.etag);
    assert_ne!(after.status_updated_time, d.status_updated_time);
    // Keys survive an update that does not name them.
    assert_eq!(
        after
            .authentication
            .unwrap()
            .symmetric_key
            .unwrap()
            .primary_key,
        keys.primary_key
    );
    let stale = svc
        .update_device(&upd, d.etag.as_deref())
        .await
        .unwrap_err();
    assert_eq!(
        code(&stale),
        (Some(412), Some(ErrorCode::PreconditionFailed))
    );
    let stale_delete = svc
        .delete_device("dev-1", d.etag.as_deref())
        .await
        .unwrap_err();
    assert_eq!(stale_delete.status(), Some(412));

    let stats = svc.registry_statistics().await.unwrap();
    assert_eq!(
        (
            stats.total_device_count,
            stats.enabled_device_count,
            stats.disabled_device_count
        ),
        (1, 0, 1)
    );

    svc.create_device(
        "dev-2",
        NewDevice {
            primary_key: Some(twinhub_core::keys::generate_key()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let all = svc.list_devices(None).await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(),
        ["dev-1", "dev-2"]
    );
    assert_eq!(svc.list_devices(Some(1)).await.unwrap().len(), 1);

    svc.delete_device("dev-1", after.etag.as_deref())
        .await
        .unwrap();
    svc.delete_device("dev-2", None).await.unwrap();
    let gone = svc.delete_device("dev-2", None).await.unwrap_err();
    assert_eq!(gone.status(), Some(404));
    assert_eq!(
        svc.registry_statistics().await.unwrap().total_device_count,
        0
    );
    assert_eq!(
        svc.service_statistics()
            .await
            .unwrap()
            .connected_device_count,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_per_policy() {
    let hub = TestHub::start().await;
    hub.device("d").await;

    let read = hub.service("registryRead");
    assert!(read.get_device("d").await.is_ok());
    let denied = read
        .create_device("e", NewDevice::default())
        .await
        .unwrap_err();
    assert_eq!(
        code(&denied),
        (Some(401), Some(ErrorCode::IotHubUnauthorizedAccess))
    );
    assert_eq!(read.get_twin("d").await.unwrap_err().status(), Some(401));

    let rw = hub.service("registryReadWrite");
    assert!(rw.create_device("e", NewDevice::default()).await.is_ok());
    assert_eq!(rw.get_twin("e").await.unwrap_err().status(), Some(401));

    let service = hub.service("service");
    assert!(service.get_twin("e").await.is_ok());
    assert_eq!(
        service.get_device("e").await.unwrap_err().status(),
        Some(401)
    );

    // The device policy grants DeviceConnect only.
    assert_eq!(
        hub.service("device")
            .get_device("e")
            .await
            .unwrap_err()
            .status(),
        Some(401)
    );

    // A wrong key, and a token already expired when sent.
    let cs = hub.service_cs("iothubowner");
    let forged = cs.rsplit_once("SharedAccessKey=").unwrap().0.to_string()
        + "SharedAccessKey="
        + &twinhub_core::keys::generate_key();
    let forged = ServiceClient::builder(&forged)
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .build()
        .unwrap();
    assert_eq!(
        forged.get_device("d").await.unwrap_err().status(),
        Some(401)
    );
    let expired = ServiceClient::builder(&cs)
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .token_ttl(Duration::ZERO)
        .build()
        .unwrap();
    assert_eq!(
        expired.get_device("d").await.unwrap_err().status(),
        Some(401)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twin_patch_replace_and_limits() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    hub.device("t").await;

    let t0 = svc.get_twin("t").await.unwrap();
    assert_eq!(t0.version, Some(1));
    assert_eq!(t0.etag.as_deref(), Some("AAAAAAAAAAE="));
    let props = t0.properties.clone().unwrap();
    assert_eq!(props.desired["$version"], 1);
    assert_eq!(props.reported["$version"], 1);
    assert!(props.desired["$metadata"]["$lastUpdated"].is_string());

    let t1 = svc
        .update_twin("t", &json!({"tags": {"site": {"b": 1}}, "properties": {"desired": {"fw": "1.0", "x": {"y": 1}}}}), None)
        .await
        .unwrap();
    let d1 = t1.properties.clone().unwrap().desired;
    assert_eq!(
        (d1["fw"].clone(), d1["$version"].clone()),
        (json!("1.0"), json!(2))
    );
    assert_eq!(d1["$metadata"]["x"]["y"]["$lastUpdatedVersion"], 2);
    assert_eq!(t1.tags.clone().unwrap()["site"], json!({"b": 1}));

    // null deletes; a stale etag is refused.
    let t2 = svc
        .update_twin(
            "t",
            &json!({"properties": {"desired": {"x": null}}}),
            t1.etag.as_deref(),
        )
        .await
        .unwrap();
    assert!(t2.properties.clone().unwrap().desired.get("x").is_none());
    let stale = svc
        .update_twin("t", &json!({"tags": {"a": 1}}), t1.etag.as_deref())
        .await
        .unwrap_err();
    assert_eq!(
        code(&stale),
        (Some(412), Some(ErrorCode::PreconditionFailed))
    );

    // Replace with the document as read, edited: read-only fields are ignored.
    let mut doc = serde_json::to_value(&t2).unwrap();
    doc["tags"] = json!({"only": true});
    doc["properties"]["desired"]["fw"] = json!("2.0");
    let t3 = svc.replace_twin("t", &doc, None).await.unwrap();
    assert_eq!(
        t3.tags.clone().unwrap(),
        json!({"only": true}).as_object().unwrap().clone()
    );
    assert_eq!(t3.properties.clone().unwrap().desired["fw"], "2.0");
    assert_eq!(t3.properties.unwrap().desired["$version"], 4);

    for bad in [
        json!({"properties": {"desired": {"a.b": 1}}}),
        json!({"properties": {"desired": {"$x": 1}}}),
        json!({"tags": {"a b": 1}}),
        json!({"properties": {"desired": {"big": "x".repeat(5000)}}}),
        json!({"properties": {"desired": "not an object"}}),
    ] {
        let e = svc.update_twin("t", &bad, None).await.unwrap_err();
        assert_eq!(
            code(&e),
            (Some(400), Some(ErrorCode::ArgumentInvalid)),
            "{bad}"
        );
    }
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let e = svc
        .update_twin("t", &json!({"properties": {"desired": deep}}), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    let mut big = serde_json::Map::new();
    for i in 0..9 {
        big.insert(format!("k{i}"), json!("x".repeat(4000)));
    }
    let e = svc
        .update_twin("t", &json!({"properties": {"desired": big}}), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "desired over 32 KiB must be refused");
    assert_eq!(svc.get_twin("nope").await.unwrap_err().status(), Some(404));
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_import() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let op = |id: &str, mode: ImportMode| ExportImportDevice {
        id: id.into(),
        import_mode: mode,
        ..Default::default()
    };
    let r = svc
        .bulk(&[op("b1", ImportMode::Create), op("b2", ImportMode::Create)])
        .await
        .unwrap();
    assert!(r.is_successful, "{r:?}");
    let r = svc
        .bulk(&[op("b1", ImportMode::Create), op("b3", ImportMode::Create)])
        .await
        .unwrap();
    assert!(!r.is_successful);
    assert_eq!(r.errors.len(), 1);
    assert_eq!(r.errors[0].device_id, "b1");
    assert_eq!(r.errors[0].error_code, "DeviceAlreadyExists");
    assert!(
        svc.get_device("b3").await.is_ok(),
        "the valid part of a batch is applied"
    );
    let r = svc
        .bulk(&[
            op("b1", ImportMode::Delete),
            op("b2", ImportMode::Delete),
            op("zz", ImportMode::Delete),
        ])
        .await
        .unwrap();
    assert_eq!(r.errors.len(), 1);
    assert_eq!(
        svc.registry_statistics().await.unwrap().total_device_count,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn state_survives_restart() {
    let mut hub = TestHub::start().await;
    let key = hub.device("keep").await;
    hub.owner()
        .update_twin(
            "keep",
            &json!({"tags": {"t": 1}, "properties": {"desired": {"d": 2}}}),
            None,
        )
        .await
        .unwrap();
    let cs_before = hub.service_cs("iothubowner");
    let ca_before = std::fs::read(hub.ca_pem()).unwrap();

    hub.restart().await;

    assert_eq!(hub.service_cs("iothubowner"), cs_before);
    assert_eq!(std::fs::read(hub.ca_pem()).unwrap(), ca_before);
    let svc = hub.owner();
    let d = svc.get_device("keep").await.unwrap();
    assert_eq!(
        d.authentication
            .unwrap()
            .symmetric_key
            .unwrap()
            .primary_key
            .unwrap(),
        key
    );
    let t = svc.get_twin("keep").await.unwrap();
    assert_eq!(t.tags.unwrap()["t"], 1);
    assert_eq!(t.properties.unwrap().desired["d"], 2);
    assert_eq!(
        svc.registry_statistics().await.unwrap().total_device_count,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn error_body_header_health_and_metrics() {
    let hub = TestHub::start().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest_client(&hub);
    let base = format!("https://localhost:{}", hub.https.port());

    let health = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // No token at all: 401 with the IoT Hub body and header.
    let resp = http
        .get(format!("{base}/devices/x?api-version=2021-04-12"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["iothub-errorcode"],
        "IotHubUnauthorizedAccess"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    let detail: serde_json::Value =
        serde_json::from_str(body["Message"].as_str().unwrap()).unwrap();
    assert_eq!(detail["errorCode"], 401002);
    assert!(detail["trackingId"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(detail["timestampUtc"].is_string());
    assert_eq!(body["ExceptionMessage"], "");

    // Malformed JSON bodies are a 400 with the IoT Hub body, never a panic.
    let svc = hub.owner();
    svc.get_device("x").await.unwrap_err();
    let token = twinhub_proto::sas::generate_sas_token(
        &format!("localhost:{}", hub.https.port()),
        &hub.server().hub_file.policies[0].primary_key,
        Some("iothubowner"),
        support::now_unix() + 60,
    )
    .unwrap();
    for body in ["{", "[]", "\"x\"", "{\"status\": 7}"] {
        let resp = http
            .put(format!("{base}/devices/bad?api-version=2021-04-12"))
            .header("Authorization", &token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        assert_eq!(resp.headers()["iothub-errorcode"], "ArgumentInvalid");
    }

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("twinhub_http_requests_total"), "{metrics}");
    assert!(metrics.contains("route=\"/devices/{id}\""), "{metrics}");
}

fn reqwest_client(hub: &TestHub) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(hub.ca_pem()).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap()
}

//! Module identities over the in-memory store: create, update with etags, the per-device cap,
//! module twins apart from the device's, `FROM devices.modules`, deleting a device (alone and in
//! bulk) taking its modules along, a module key never reachable through a device route, and
//! module records surviving a reopened hub while the registry counts only devices.

use std::sync::Arc;

use serde_json::json;
use twinhub_core::modules::MAX_MODULES_PER_DEVICE;
use twinhub_core::{Hub, HubOptions};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{Device, ExportImportDevice, ImportMode, Module};
use twinhub_store::{MemoryStore, Store, Table};

const HOST: &str = "modules-hub.azure-devices.net";

async fn hub_over(store: Arc<MemoryStore>) -> Arc<Hub> {
    Hub::open(store as Arc<dyn Store>, HubOptions::new(HOST, Vec::new()))
        .await
        .expect("hub opens")
}

async fn device(hub: &Hub, id: &str) {
    hub.put_device(
        id,
        &Device {
            device_id: id.into(),
            ..Device::default()
        },
        None,
    )
    .await
    .expect("device created");
}

async fn module(hub: &Hub, d: &str, m: &str) -> Module {
    hub.put_module(d, m, &Module::default(), None)
        .await
        .expect("module created")
}

#[tokio::test]
async fn modules_have_their_own_keys_etags_and_twins() {
    let hub = hub_over(Arc::new(MemoryStore::new())).await;
    assert_eq!(
        hub.put_module("nodev", "m1", &Module::default(), None)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::DeviceNotFound
    );
    device(&hub, "d1").await;
    let m = module(&hub, "d1", "m1").await;
    assert_eq!((m.device_id.as_str(), m.module_id.as_str()), ("d1", "m1"));
    let keys = m.authentication.unwrap().symmetric_key.unwrap();
    assert!(keys.primary_key.is_some() && keys.secondary_key.is_some());
    let device_keys = hub
        .get_device("d1")
        .await
        .unwrap()
        .authentication
        .unwrap()
        .symmetric_key
        .unwrap();
    assert_ne!(keys.primary_key, device_keys.primary_key);

    let again = hub.put_module("d1", "m1", &Module::default(), None).await;
    assert_eq!(
        again.unwrap_err().code(),
        ErrorCode::ModuleAlreadyExistsOnDevice
    );
    let stale = hub
        .put_module("d1", "m1", &Module::default(), Some("\"bm90LWl0\""))
        .await;
    assert_eq!(stale.unwrap_err().code(), ErrorCode::PreconditionFailed);
    let updated = hub
        .put_module(
            "d1",
            "m1",
            &Module {
                managed_by: Some("iotEdge".into()),
                ..Module::default()
            },
            m.etag.as_deref(),
        )
        .await
        .unwrap();
    assert_eq!(updated.managed_by.as_deref(), Some("iotEdge"));
    assert_ne!(updated.etag, m.etag);
    assert_eq!(
        hub.get_module("d1", "absent").await.unwrap_err().code(),
        ErrorCode::ModuleNotFound
    );

    // The module's twin is its own: a patch to it leaves the device's alone.
    hub.write_twin(
        "d1/m1",
        &json!({"properties": {"desired": {"speed": 3}}}),
        None,
        false,
    )
    .await
    .unwrap();
    let mt = hub.get_twin("d1/m1").await.unwrap();
    assert_eq!(mt.module_id.as_deref(), Some("m1"));
    // Capabilities and scopes are the device's: a module twin has none (as in IoT Hub).
    assert!(mt.capabilities.is_none() && mt.parent_scopes.is_none());
    assert_eq!(mt.properties.unwrap().desired["speed"], 3);
    let dt = hub.get_twin("d1").await.unwrap();
    assert!(dt.module_id.is_none());
    assert!(dt.capabilities.is_some() && dt.parent_scopes.is_some());
    assert!(dt.properties.unwrap().desired.get("speed").is_none());

    // A device route never names a module.
    assert_eq!(
        hub.get_device("d1/m1").await.unwrap_err().code(),
        ErrorCode::ArgumentInvalid
    );
    // Modules are not devices in the registry's counts.
    assert_eq!(hub.registry_statistics().total_device_count, 1);
}

#[tokio::test]
async fn a_device_holds_at_most_the_module_cap() {
    let hub = hub_over(Arc::new(MemoryStore::new())).await;
    device(&hub, "d1").await;
    for i in 0..MAX_MODULES_PER_DEVICE {
        module(&hub, "d1", &format!("m{i:02}")).await;
    }
    let over = hub
        .put_module("d1", "one-more", &Module::default(), None)
        .await;
    assert_eq!(over.unwrap_err().code(), ErrorCode::TooManyModulesOnDevice);
    assert_eq!(
        hub.list_modules("d1").await.unwrap().len(),
        MAX_MODULES_PER_DEVICE
    );
}

#[tokio::test]
async fn queries_read_modules_apart_from_devices() {
    let hub = hub_over(Arc::new(MemoryStore::new())).await;
    device(&hub, "d1").await;
    device(&hub, "d2").await;
    module(&hub, "d1", "edge").await;
    module(&hub, "d2", "edge").await;
    module(&hub, "d2", "other").await;
    let page = hub
        .query("SELECT * FROM devices.modules", None, None)
        .await
        .unwrap();
    assert_eq!(page.item_type, "twin");
    assert_eq!(page.items.len(), 3);
    let page = hub
        .query(
            "SELECT deviceId FROM devices.modules WHERE moduleId = 'edge'",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        page.items,
        vec![json!({"deviceId": "d1"}), json!({"deviceId": "d2"})]
    );
    let devices = hub
        .query("SELECT COUNT() AS n FROM devices", None, None)
        .await
        .unwrap();
    assert_eq!(devices.items, vec![json!({"n": 2})]);
}

#[tokio::test]
async fn deleting_a_device_deletes_its_modules_only() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(store.clone()).await;
    // "d1-x" sorts between "d1" and "d1/..." keys' neighbours: it must keep its modules.
    for d in ["d1", "d1-x", "d10"] {
        device(&hub, d).await;
        module(&hub, d, "m").await;
    }
    module(&hub, "d1", "n").await;
    hub.delete_device("d1", None).await.unwrap();
    assert_eq!(
        hub.get_module("d1", "m").await.unwrap_err().code(),
        ErrorCode::ModuleNotFound
    );
    assert!(hub.get_module("d1-x", "m").await.is_ok());
    assert!(hub.get_module("d10", "m").await.is_ok());

    let bulk = hub
        .bulk_devices(&[ExportImportDevice {
            id: "d10".into(),
            import_mode: ImportMode::Delete,
            ..ExportImportDevice::default()
        }])
        .await
        .unwrap();
    assert!(bulk.is_successful);
    assert!(hub.get_module("d10", "m").await.is_err());
    assert_eq!(store.count(Table::Modules).await.unwrap(), 1);

    // A re-created device starts with no modules.
    device(&hub, "d1").await;
    assert!(hub.list_modules("d1").await.unwrap().is_empty());

    drop(hub);
    let reopened = hub_over(store).await;
    assert!(reopened.get_module("d1-x", "m").await.is_ok());
    assert_eq!(reopened.registry_statistics().total_device_count, 2);
}

#[tokio::test]
async fn a_method_on_a_missing_module_is_module_not_found() {
    let hub = hub_over(Arc::new(MemoryStore::new())).await;
    device(&hub, "d1").await;
    let call = || twinhub_core::methods::MethodCall {
        method_name: "ping".into(),
        payload: bytes::Bytes::from_static(b"null"),
        response_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::ZERO,
    };
    let missing = hub.invoke_method("d1/nosuch", call()).await.unwrap_err();
    assert_eq!(missing.code(), ErrorCode::ModuleNotFound);
    module(&hub, "d1", "m1").await;
    let offline = hub.invoke_method("d1/m1", call()).await.unwrap_err();
    assert_eq!(offline.code(), ErrorCode::DeviceNotOnline);
    let no_device = hub.invoke_method("d2", call()).await.unwrap_err();
    assert_eq!(no_device.code(), ErrorCode::DeviceNotFound);
}

/// Connects module `d/m` with a session handle of its own, signed with the module's key.
async fn connect_module(hub: &Hub, module: &Module) -> twinhub_core::directory::SessionHandle {
    let key = module
        .authentication
        .as_ref()
        .and_then(|a| a.symmetric_key.as_ref())
        .and_then(|k| k.primary_key.clone())
        .expect("a SAS module has a key");
    let token = twinhub_proto::sas::generate_sas_token(
        &twinhub_proto::sas::device_resource_uri(HOST, &module.device_id, Some(&module.module_id)),
        &key,
        None,
        twinhub_core::keys::now_unix() + 3600,
    )
    .unwrap();
    let (tx, rx) = twinhub_core::directory::command_queue(8);
    std::mem::forget(rx);
    let handle = twinhub_core::directory::SessionHandle::new(tx);
    hub.connect_device(
        &format!("{}/{}", module.device_id, module.module_id),
        twinhub_core::sessions::Credentials {
            password: Some(&token),
            certificates: &[],
        },
        true,
        handle.clone(),
    )
    .await
    .expect("module connects");
    handle
}

#[tokio::test]
async fn disabling_a_device_closes_its_modules_sessions() {
    let hub = hub_over(Arc::new(MemoryStore::new())).await;
    for d in ["d1", "d1-x", "d2"] {
        device(&hub, d).await;
    }
    let m1 = connect_module(&hub, &module(&hub, "d1", "m1").await).await;
    let neighbour = connect_module(&hub, &module(&hub, "d1-x", "m1").await).await;
    let other = connect_module(&hub, &module(&hub, "d2", "m1").await).await;

    let disabled = |id: &str| Device {
        device_id: id.into(),
        status: twinhub_proto::model::DeviceStatus::Disabled,
        ..Device::default()
    };
    hub.put_device("d1", &disabled("d1"), Some("*"))
        .await
        .unwrap();
    assert!(
        m1.close.is_closed(),
        "a module of a disabled device stays connected"
    );
    assert!(!neighbour.close.is_closed() && !other.close.is_closed());

    let bulk = hub
        .bulk_devices(&[ExportImportDevice {
            id: "d2".into(),
            import_mode: ImportMode::Update,
            status: Some(twinhub_proto::model::DeviceStatus::Disabled),
            ..ExportImportDevice::default()
        }])
        .await
        .unwrap();
    assert!(bulk.is_successful, "{bulk:?}");
    assert!(
        other.close.is_closed(),
        "bulk: a module of a disabled device stays connected"
    );
    assert!(!neighbour.close.is_closed());
}

#[tokio::test]
async fn a_bulk_entry_naming_a_module_never_acts_on_its_device() {
    let hub = hub_over(Arc::new(MemoryStore::new())).await;
    device(&hub, "d1").await;
    module(&hub, "d1", "m1").await;
    device(&hub, "d2").await;
    let entry = |id: &str, mode| ExportImportDevice {
        id: id.into(),
        module_id: Some("m1".into()),
        import_mode: mode,
        ..ExportImportDevice::default()
    };
    let res = hub
        .bulk_devices(&[
            entry("d1", ImportMode::Delete),
            entry("d2", ImportMode::Update),
        ])
        .await
        .unwrap();
    assert!(!res.is_successful);
    let failed: Vec<_> = res.errors.iter().map(|e| e.device_id.as_str()).collect();
    assert_eq!(failed, ["d1", "d2"]);
    assert!(
        res.errors.iter().all(|e| e.error_code == "ArgumentInvalid"),
        "{res:?}"
    );
    assert!(
        hub.get_device("d1").await.is_ok(),
        "a module entry deleted its device"
    );
    assert!(hub.get_module("d1", "m1").await.is_ok());
    assert!(hub.get_device("d2").await.is_ok());
}

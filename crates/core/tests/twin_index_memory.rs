//! What the twin index holds per twin: a hub opened over 20,000 stored twins of the bench's
//! shape (SAS keys, two tags, one reported property) builds their query documents, and this
//! process's resident memory grows by about that much. Run with `--nocapture` to see the
//! figure; the bound keeps it from growing unnoticed.

use std::sync::Arc;

use serde_json::json;
use twinhub_core::{Hub, HubOptions};
use twinhub_proto::model::{ExportImportDevice, ImportMode, TwinProperties};
use twinhub_store::{MemoryStore, Store, Write};

const HOST: &str = "memory-hub.azure-devices.net";
const TWINS: usize = 20_000;

/// Resident bytes of this process (Linux), if readable.
fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::test(flavor = "current_thread")]
async fn the_index_costs_a_few_kib_per_twin() {
    // One twin made by the hub, copied under other ids straight into a store.
    let template = {
        let hub = Hub::open(
            Arc::new(MemoryStore::new()) as Arc<dyn Store>,
            HubOptions::new(HOST, Vec::new()),
        )
        .await
        .unwrap();
        let op = ExportImportDevice {
            id: "q-000000".into(),
            import_mode: ImportMode::Create,
            tags: json!({"region": "region-0", "site": "common"})
                .as_object()
                .cloned(),
            properties: Some(TwinProperties {
                desired: Default::default(),
                reported: json!({"fw": "1.2"}).as_object().cloned().unwrap(),
            }),
            ..Default::default()
        };
        assert!(hub.bulk_devices(&[op]).await.unwrap().is_successful);
        hub.device_record("q-000000").await.unwrap().unwrap()
    };
    let store = Arc::new(MemoryStore::new());
    let mut writes = Vec::with_capacity(TWINS);
    for i in 0..TWINS {
        let mut rec = template.clone();
        rec.device_id = format!("q-{i:06}");
        rec.twin
            .tags
            .insert("region".into(), json!(format!("region-{}", i % 10)));
        writes.push(Write::put(
            twinhub_store::Table::Devices,
            rec.device_id.clone(),
            rec.encode(),
        ));
    }
    store.commit(writes).await.unwrap();

    let Some(before) = resident() else { return };
    let hub = Hub::open(
        store.clone() as Arc<dyn Store>,
        HubOptions::new(HOST, Vec::new()),
    )
    .await
    .unwrap();
    let Some(after) = resident() else { return };
    let per_twin = after.saturating_sub(before) as f64 / TWINS as f64;
    println!(
        "twin index: {per_twin:.0} resident bytes per twin (the stored record is {} bytes of \
         JSON)",
        template.encode().len()
    );
    let n = hub
        .query("SELECT COUNT() AS n FROM devices", None, None)
        .await
        .unwrap();
    assert_eq!(n.items, vec![json!({"n": TWINS})]);
    assert!(per_twin < 8192.0, "{per_twin} bytes per twin");
}

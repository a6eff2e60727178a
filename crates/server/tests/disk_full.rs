//! A hub whose data dir fills up (a small tmpfs mounted by the test; root is needed, as for the
//! rest of the suite): writes are refused with IoT Hub's 503 codes, `/health` says why, devices
//! are told "server unavailable" (never "not authorized"), and once space is freed the hub
//! recovers by itself with every acknowledged write intact, also across a restart.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use twinhub_mqtt::{ConnectReturnCode, QoS};

struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5Au8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0]).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_refused_with_503_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(dir.path())
        .output()
        .expect("running mount");
    assert!(
        out.status.success(),
        "mounting a tmpfs failed (this test needs root, as scripts/test runs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mounted = Mounted(dir.path().to_path_buf());
    let mut hub = TestHub::start_in(dir, |_| {}).await;
    let svc = hub.owner();
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;

    // Acknowledged writes, before and during the fault: (counter, $version) of each 204.
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut n = 0u64;
    let filler_value = "z".repeat(1500);
    let send = async |m: &mut RawMqtt, n: u64| -> String {
        m.publish(
            &format!("$iothub/twin/PATCH/properties/reported/?$rid=r{n}"),
            json!({"n": n, "pad": filler_value}).to_string().as_bytes(),
            QoS::AtLeastOnce,
            (n % 60_000) as u16 + 1,
            false,
        )
        .await;
        m.next_publish().await.topic.as_str().to_string()
    };
    for _ in 0..20 {
        n += 1;
        let topic = send(&mut m, n).await;
        let version = topic.rsplit_once("$version=").unwrap().1.parse().unwrap();
        acked.push((n, version));
    }

    let filler = fill(hub.dir.path());
    // New devices with large tags make the store grow: one of these writes must fail, with
    // IoT Hub's ServiceUnavailable; patches meanwhile are applied or refused with 503.
    let tags: serde_json::Map<String, Value> = (0..4)
        .map(|i| (format!("t{i}"), json!("q".repeat(1500))))
        .collect();
    let mut created = Vec::new();
    let mut rest_503 = false;
    for batch in 0..500 {
        let ops: Vec<twinhub_proto::model::ExportImportDevice> = (0..20)
            .map(|i| {
                serde_json::from_value(json!({
                    "id": format!("full-{batch}-{i}"),
                    "importMode": "create",
                    "tags": tags,
                }))
                .unwrap()
            })
            .collect();
        match svc.bulk(&ops).await {
            Ok(r) => {
                assert!(r.is_successful, "{r:?}");
                created.extend(ops.into_iter().map(|o| o.id));
            }
            Err(e) => {
                assert_eq!(e.status(), Some(503), "{e}");
                assert_eq!(
                    e.code(),
                    Some(twinhub_proto::error::ErrorCode::ServiceUnavailable),
                    "{e}"
                );
                rest_503 = true;
                break;
            }
        }
    }
    assert!(rest_503, "no write failed on a full disk");
    // Right after a failure the hub says it is unhealthy, and why.
    let (status, text) = health(&hub).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("store"), "{text}");
    for _ in 0..20 {
        n += 1;
        let topic = send(&mut m, n).await;
        if topic.starts_with("$iothub/twin/res/204/") {
            let version = topic.rsplit_once("$version=").unwrap().1.parse().unwrap();
            acked.push((n, version));
        } else {
            assert_eq!(topic, format!("$iothub/twin/res/503/?$rid=r{n}"));
        }
    }
    // A CONNECT is never "not authorized" because of the disk.
    for _ in 0..5 {
        let (c, code) = RawMqtt::connack(&hub, "d1", &key).await;
        assert!(
            matches!(
                code,
                ConnectReturnCode::Accepted | ConnectReturnCode::ServerUnavailable
            ),
            "{code:?}"
        );
        if code == ConnectReturnCode::Accepted {
            m = c;
            m.subscribe(&["$iothub/twin/res/#"]).await;
        }
    }

    // Space comes back: the hub recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        let topic = send(&mut m, n).await;
        if topic.starts_with("$iothub/twin/res/204/") {
            let version = topic.rsplit_once("$version=").unwrap().1.parse().unwrap();
            acked.push((n, version));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hub did not recover: {topic}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while health(&hub).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "health stayed 503 after recovery"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every acknowledged write is there: the last one's value and version, now and after a
    // restart.
    let (last_n, last_version) = *acked.last().unwrap();
    let check = |r: &Value| {
        assert_eq!(r["n"], last_n, "{r}");
        assert!(r["$version"].as_u64().unwrap() >= last_version, "{r}");
    };
    check(&Value::Object(
        svc.get_twin("d1")
            .await
            .unwrap()
            .properties
            .unwrap()
            .reported,
    ));
    drop(m);
    hub.restart().await;
    check(&Value::Object(
        hub.owner()
            .get_twin("d1")
            .await
            .unwrap()
            .properties
            .unwrap()
            .reported,
    ));
    // Every device created before the failure is there.
    let svc = hub.owner();
    for id in created.iter().step_by(7) {
        svc.get_device(id).await.unwrap();
    }
    // Versions only grew: no acknowledged write was rolled back.
    assert!(acked.windows(2).all(|w| w[0].1 < w[1].1));
    hub.stop().await;
}

//! The redb store on a real full disk: a small tmpfs mounted for the test (root is needed, as
//! for the rest of the suite). Filling it makes commits fail with `Unavailable` and the store
//! report itself faulty; freeing space lets it recover by itself, keeping every batch it
//! acknowledged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use twinhub_store::{Error, Health, RedbStore, Store, Table, Write};

/// A tmpfs of a given size, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (this test needs root, as scripts/test runs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the disk with a file until writes fail; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // Byte by byte for the last partial chunk.
    while f.write_all(&[0]).is_ok() {}
    let _ = f.sync_all();
    path
}

fn put(key: &str, value: &[u8]) -> Vec<Write> {
    vec![Write::put(Table::Devices, key, value.to_vec())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_survived() {
    let disk = SmallDisk::mount("8m");
    let path = disk.path().join("store.redb");
    let store = RedbStore::open(&path).expect("open");
    let value = vec![7u8; 2048];
    let mut acked = Vec::new();
    for i in 0..50 {
        let key = format!("before-{i:03}");
        store.commit(put(&key, &value)).await.expect("commit");
        acked.push(key);
    }
    assert_eq!(store.health(), Health::Ok);

    let filler = fill(disk.path());
    // Keep writing: some commits may still fit in space redb already holds, but the disk is
    // full, so soon one fails, and then the store refuses writes and says why.
    let mut failed = None;
    for i in 0..10_000 {
        let key = format!("during-{i:05}");
        match store.commit(put(&key, &value)).await {
            Ok(()) => acked.push(key),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let failed = failed.expect("no commit failed on a full disk");
    assert!(matches!(failed, Error::Unavailable(_)), "{failed:?}");
    match store.health() {
        Health::Faulty(reason) => assert!(!reason.is_empty()),
        Health::Ok => panic!("a faulty store reports itself healthy"),
    }
    assert!(store.stats().faults >= 1);

    // Space comes back: the store recovers by itself.
    std::fs::remove_file(&filler).expect("remove filler");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if store.commit(put("after", &value)).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    acked.push("after".into());
    assert_eq!(store.health(), Health::Ok);
    for key in &acked {
        assert_eq!(
            store
                .get(Table::Devices, key)
                .await
                .expect("get")
                .as_deref(),
            Some(&value[..]),
            "acknowledged {key} lost"
        );
    }
    store.close().await.expect("close");
    drop(store);

    // And after a reopen from disk.
    let reopened = RedbStore::open(&path).expect("reopen");
    for key in &acked {
        assert!(
            reopened
                .get(Table::Devices, key)
                .await
                .expect("get")
                .is_some(),
            "acknowledged {key} lost after reopen"
        );
    }
    reopened.close().await.expect("close");
}

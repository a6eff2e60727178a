//! Behaviour specific to the redb backend: durability across drop, reopen and SIGKILL, group
//! commit under concurrency, and clean errors for paths it cannot use.

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use twinhub_store::{Error, RedbStore, Store, Table, Write};

fn open(path: &Path) -> RedbStore {
    match RedbStore::open(path) {
        Ok(store) => store,
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

#[tokio::test]
async fn data_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.redb");

    let store = open(&path);
    store
        .commit(vec![
            Write::put(Table::Devices, "dev-1", b"twin".to_vec()),
            Write::put(Table::Meta, "hub", b"name".to_vec()),
        ])
        .await
        .expect("commit");
    store
        .commit(vec![
            Write::delete(Table::Meta, "hub"),
            Write::put(Table::Jobs, "job-1", b"j".to_vec()),
        ])
        .await
        .expect("commit");
    // No close: a plain drop must neither lose committed data nor keep the file locked.
    drop(store);

    let store = open(&path);
    assert_eq!(
        store.get(Table::Devices, "dev-1").await.expect("get"),
        Some(b"twin".to_vec())
    );
    assert_eq!(store.get(Table::Meta, "hub").await.expect("get"), None);
    assert_eq!(
        store.get(Table::Jobs, "job-1").await.expect("get"),
        Some(b"j".to_vec())
    );
    store
        .commit(vec![Write::put(Table::Sessions, "c", b"s".to_vec())])
        .await
        .expect("commit");
    store.close().await.expect("close");
    drop(store);

    let store = open(&path);
    assert_eq!(store.count(Table::Devices).await.expect("count"), 1);
    assert_eq!(store.count(Table::Sessions).await.expect("count"), 1);
    assert_eq!(store.count(Table::Meta).await.expect("count"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_are_grouped() {
    const COMMITS: u64 = 1000;
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Arc::new(open(&dir.path().join("store.redb")));

    let tasks: Vec<_> = (0..COMMITS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .commit(vec![Write::put(
                        Table::Devices,
                        format!("dev-{i:04}"),
                        i.to_le_bytes().to_vec(),
                    )])
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task finished").expect("commit");
    }

    let stats = store.stats();
    assert_eq!(stats.batches, COMMITS);
    assert_eq!(store.count(Table::Devices).await.expect("count"), COMMITS);
    // One fsync per commit would be 1000 transactions; while one transaction is being synced
    // the others queue up and go together into the next.
    assert!(
        stats.transactions < COMMITS / 4,
        "no group commit: {stats:?}"
    );
    assert!(stats.transactions >= 1, "{stats:?}");
}

#[tokio::test]
async fn sequential_commits_use_one_transaction_each() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = open(&dir.path().join("store.redb"));
    for i in 0..5u8 {
        store
            .commit(vec![Write::put(Table::Jobs, format!("job-{i}"), vec![i])])
            .await
            .expect("commit");
    }
    // Empty batches need no transaction (nothing to make durable) but still count as batches.
    store.commit(Vec::new()).await.expect("empty commit");
    let stats = store.stats();
    assert_eq!(stats.transactions, 5, "{stats:?}");
    assert_eq!(stats.batches, 6, "{stats:?}");
}

#[tokio::test]
async fn close_is_idempotent_and_releases_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.redb");
    let store = open(&path);
    store
        .commit(vec![Write::put(Table::Meta, "k", b"v".to_vec())])
        .await
        .expect("commit");
    store.close().await.expect("close");
    store.close().await.expect("second close");
    assert!(matches!(
        store.commit(vec![Write::delete(Table::Meta, "k")]).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        store.get(Table::Meta, "k").await,
        Err(Error::Closed)
    ));
    // The closed store is still alive (others may hold it), yet the file can be reopened.
    let reopened = open(&path);
    assert_eq!(
        reopened
            .get(Table::Meta, "k")
            .await
            .expect("get after reopen"),
        Some(b"v".to_vec())
    );
    drop(store);
}

#[test]
fn open_in_a_missing_directory_fails() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("no").join("such").join("store.redb");
    let result = RedbStore::open(&path);
    assert!(
        matches!(result, Err(Error::Backend(_))),
        "opening {} gave {result:?}",
        path.display()
    );
}

#[test]
fn open_in_a_read_only_directory_fails() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::tempdir().expect("temporary directory");
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).expect("create directory");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).expect("chmod");

    // A privileged user (root in a container) ignores directory permissions; then use a
    // directory that refuses file creation to everyone, so the case is still exercised.
    let probe = locked.join("probe");
    let read_only = if std::fs::write(&probe, b"").is_ok() {
        Path::new("/proc").to_path_buf()
    } else {
        locked.clone()
    };
    let path = read_only.join("store.redb");
    let result = RedbStore::open(&path);
    assert!(
        matches!(result, Err(Error::Backend(_))),
        "opening {} gave {result:?}",
        path.display()
    );

    // Let the temporary directory clean itself up.
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn open_of_a_file_that_is_not_redb_fails() {
    let dir = tempfile::tempdir().expect("temporary directory");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a database\n".repeat(1000)).expect("write");
    let result = RedbStore::open(&text);
    assert!(matches!(result, Err(Error::Backend(_))), "{result:?}");

    // Pseudo-random bytes, several pages of them.
    let noise = dir.path().join("noise.bin");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&noise, bytes).expect("write");
    let result = RedbStore::open(&noise);
    assert!(matches!(result, Err(Error::Backend(_))), "{result:?}");

    // A directory where the file should be.
    let result = RedbStore::open(dir.path());
    assert!(matches!(result, Err(Error::Backend(_))), "{result:?}");
}

#[tokio::test]
async fn open_of_a_damaged_database_fails_without_panicking() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.redb");
    {
        let store = open(&path);
        for i in 0..100u8 {
            store
                .commit(vec![Write::put(
                    Table::Devices,
                    format!("dev-{i}"),
                    vec![i; 3000],
                )])
                .await
                .expect("commit");
        }
        store.close().await.expect("close");
    }
    // Keep the header (and its magic number) intact, scramble the pages behind it, as a disk
    // fault or a stray write from another program would.
    let mut bytes = std::fs::read(&path).expect("read the database file");
    assert!(bytes.len() > 16 * 1024, "database unexpectedly small");
    for byte in &mut bytes[8192..] {
        *byte = byte.wrapping_add(0x5a);
    }
    std::fs::write(&path, &bytes).expect("write the damaged file");

    let result = std::panic::catch_unwind(|| RedbStore::open(&path));
    match result {
        Ok(Err(Error::Backend(_))) => {}
        Ok(other) => panic!("opening a damaged database gave {other:?}"),
        Err(_) => panic!("opening a damaged database panicked"),
    }
}

#[test]
fn a_second_open_of_the_same_file_fails() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.redb");
    let _first = open(&path);
    let second = RedbStore::open(&path);
    assert!(matches!(second, Err(Error::Backend(_))), "{second:?}");
}

/// Set in the child process of [`committed_batch_survives_sigkill`]: the store path to use.
const CRASH_CHILD_ENV: &str = "TWINHUB_STORE_CRASH_CHILD_PATH";

fn crash_batch() -> Vec<Write> {
    vec![
        Write::put(Table::Devices, "dev-crash", vec![7; 4096]),
        Write::put(Table::DeviceJobs, "job-1/dev-crash", b"running".to_vec()),
        Write::delete(Table::Meta, "before"),
    ]
}

#[tokio::test]
async fn committed_batch_survives_sigkill() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.redb");
    {
        let store = open(&path);
        store
            .commit(vec![Write::put(Table::Meta, "before", b"x".to_vec())])
            .await
            .expect("commit");
    }

    // Re-run this test binary, selecting only the helper below, in helper mode.
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--ignored", "--nocapture"])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut seen = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        if line.trim() == "committed" {
            seen = true;
            break;
        }
    }
    // Kill right after the commit returned: no close, no drop, no chance to flush anything.
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(seen, "the child never reported its commit (exit: {status})");
    assert!(!status.success(), "the child exited on its own: {status}");

    let store = open(&path);
    assert_eq!(
        store.get(Table::Devices, "dev-crash").await.expect("get"),
        Some(vec![7; 4096])
    );
    assert_eq!(
        store
            .get(Table::DeviceJobs, "job-1/dev-crash")
            .await
            .expect("get"),
        Some(b"running".to_vec())
    );
    assert_eq!(store.get(Table::Meta, "before").await.expect("get"), None);
}

/// The child half of [`committed_batch_survives_sigkill`]; does nothing unless run by it.
#[tokio::test]
#[ignore = "helper process for committed_batch_survives_sigkill"]
async fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let store = open(Path::new(&path));
    tokio::time::timeout(Duration::from_secs(60), store.commit(crash_batch()))
        .await
        .expect("commit in time")
        .expect("commit");
    let mut out = std::io::stdout().lock();
    writeln!(out, "committed").expect("write to stdout");
    out.flush().expect("flush stdout");
    drop(out);
    // Wait to be killed; give up eventually so an orphan cannot linger.
    tokio::time::sleep(Duration::from_secs(120)).await;
    panic!("the parent never killed this helper");
}

/// The conformance cases cannot read a closed redb store (close releases the file), so the
/// guarantees of `close` are checked here on the reopened file: every commit that returned Ok
/// is in it, and no commit refused with Closed was applied.
#[tokio::test(flavor = "multi_thread")]
async fn close_settles_racing_commits_as_the_reopened_file_shows() {
    const TASKS: usize = 64;
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("store.redb");
    let store = Arc::new(open(&path));
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .commit(vec![Write::put(
                        Table::Sessions,
                        format!("c{i:02}"),
                        vec![i as u8],
                    )])
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    store.close().await.expect("close");
    let mut committed = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("commit task finished") {
            Ok(()) => committed.push(true),
            Err(Error::Closed) => committed.push(false),
            Err(e) => panic!("commit {i} failed with {e}, not Ok or Closed"),
        }
    }
    let late = store
        .commit(vec![Write::put(Table::Meta, "late", b"x".to_vec())])
        .await;
    assert!(
        matches!(late, Err(Error::Closed)),
        "commit after close returned {late:?}"
    );

    let reopened = open(&path);
    let succeeded = committed.iter().filter(|c| **c).count() as u64;
    assert_eq!(
        reopened.count(Table::Sessions).await.expect("count"),
        succeeded
    );
    for (i, ok) in committed.iter().enumerate() {
        let value = reopened
            .get(Table::Sessions, &format!("c{i:02}"))
            .await
            .expect("get");
        assert_eq!(value.is_some(), *ok, "commit {i} reported committed={ok}");
    }
    assert_eq!(
        reopened.get(Table::Meta, "late").await.expect("get"),
        None,
        "a refused commit was applied"
    );
}

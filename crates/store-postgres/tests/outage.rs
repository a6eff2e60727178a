//! The store while PostgreSQL is down: operations fail soon with `Unavailable` (they do not
//! hang), health turns `Faulty`, and both recover by themselves once the server is back. Runs
//! its own cluster, since it stops it.

use std::time::{Duration, Instant};

use twinhub_store::{Error, Health, Store, Table, Write};
use twinhub_store_postgres::{PostgresOptions, PostgresStore};
use twinhub_testsvc::postgres::PgServer;

/// Polls `health` until `want` says yes, for at most `within`.
async fn wait_for_health(
    store: &PostgresStore,
    within: Duration,
    want: impl Fn(&Health) -> bool,
) -> Health {
    let started = Instant::now();
    loop {
        let health = store.health();
        if want(&health) {
            return health;
        }
        assert!(
            started.elapsed() < within,
            "health stayed {health:?} for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_while_the_server_is_down_and_recovers_after() {
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let db = server.fresh_database();
    let options = PostgresOptions {
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        ..PostgresOptions::default()
    };
    let store = PostgresStore::connect(&db.url(), options).await.unwrap();
    store
        .commit(vec![Write::put(Table::Devices, "before", b"1".to_vec())])
        .await
        .unwrap();
    assert_eq!(store.health(), Health::Ok);

    server.stop();
    let started = Instant::now();
    let refused = store
        .commit(vec![Write::put(Table::Devices, "during", b"2".to_vec())])
        .await;
    assert!(
        matches!(refused, Err(Error::Unavailable(_))),
        "commit while down returned {refused:?}"
    );
    let read = store.get(Table::Devices, "before").await;
    assert!(
        matches!(read, Err(Error::Unavailable(_))),
        "get while down returned {read:?}"
    );
    let counted = store.count(Table::Devices).await;
    assert!(
        matches!(counted, Err(Error::Unavailable(_))),
        "count while down returned {counted:?}"
    );
    let scanned = store.scan(Table::Devices, None, 10).await;
    assert!(
        matches!(scanned, Err(Error::Unavailable(_))),
        "scan while down returned {scanned:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failing took {:?}",
        started.elapsed()
    );
    assert!(matches!(store.health(), Health::Faulty(_)));

    server.restart();
    // No operation needed: the store notices by itself.
    wait_for_health(&store, Duration::from_secs(15), |h| *h == Health::Ok).await;
    store
        .commit(vec![Write::put(Table::Devices, "after", b"3".to_vec())])
        .await
        .unwrap();
    assert_eq!(
        store.get(Table::Devices, "before").await.unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(store.get(Table::Devices, "during").await.unwrap(), None);
    assert_eq!(
        store.get(Table::Devices, "after").await.unwrap(),
        Some(b"3".to_vec())
    );

    // An idle store notices an outage by itself too, and its end.
    server.stop();
    wait_for_health(&store, Duration::from_secs(15), |h| {
        matches!(h, Health::Faulty(_))
    })
    .await;
    server.restart();
    wait_for_health(&store, Duration::from_secs(15), |h| *h == Health::Ok).await;
    assert_eq!(store.count(Table::Devices).await.unwrap(), 2);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_stopped_server_is_unavailable() {
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.url("postgres");
    server.stop();
    let started = Instant::now();
    match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(twinhub_store_postgres::ConnectError::Unavailable(_)) => {}
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("connected to a stopped server"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A server that hangs (its processes stopped, connections open, nothing answering) makes
/// operations fail with `Unavailable` after the client's timeouts, not hang; once it answers
/// again the store recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_times_out_and_recovers() {
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let db = server.fresh_database();
    let options = PostgresOptions {
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(2),
        ..PostgresOptions::default()
    };
    let store = PostgresStore::connect(&db.url(), options).await.unwrap();
    store
        .commit(vec![Write::put(Table::Devices, "before", b"1".to_vec())])
        .await
        .unwrap();
    assert!(store.get(Table::Devices, "before").await.unwrap().is_some());

    server.freeze();
    // statement_timeout + 2 s of client slack per step: well under this bound.
    const BOUND: Duration = Duration::from_secs(12);
    let started = Instant::now();
    let commit = store
        .commit(vec![Write::put(Table::Devices, "frozen", b"2".to_vec())])
        .await;
    let commit_took = started.elapsed();
    let started = Instant::now();
    let read = store.get(Table::Devices, "before").await;
    let read_took = started.elapsed();
    println!("while hung: commit failed after {commit_took:?}, get after {read_took:?}");
    assert!(
        matches!(commit, Err(Error::Unavailable(_))),
        "commit while hung returned {commit:?}"
    );
    assert!(
        matches!(read, Err(Error::Unavailable(_))),
        "get while hung returned {read:?}"
    );
    assert!(commit_took < BOUND && read_took < BOUND);
    assert!(matches!(store.health(), Health::Faulty(_)));

    server.thaw();
    wait_for_health(&store, Duration::from_secs(20), |h| *h == Health::Ok).await;
    store
        .commit(vec![Write::put(Table::Devices, "after", b"3".to_vec())])
        .await
        .unwrap();
    assert_eq!(
        store.get(Table::Devices, "before").await.unwrap(),
        Some(b"1".to_vec())
    );
    store.close().await.unwrap();
}

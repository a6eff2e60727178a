//! What the PostgreSQL store promises beyond the conformance suite, on the process's private
//! cluster: group commit really groups, migrations are idempotent and safe to race, and a
//! database migrated by a newer build is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use twinhub_store::{Expect, Health, Store, Table, Write};
use twinhub_store_postgres::{ConnectError, PostgresOptions, PostgresStore, SCHEMA_VERSION};
use twinhub_testsvc::postgres::{self, PgDatabase};

async fn connect(db: &PgDatabase) -> PostgresStore {
    PostgresStore::connect(&db.url(), PostgresOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", db.url()))
}

fn migrations_applied(db: &PgDatabase) -> String {
    postgres::shared()
        .execute(
            db.name(),
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM twinhub_schema_migrations",
        )
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_share_transactions() {
    const CALLERS: usize = 256;
    let db = postgres::shared().fresh_database();
    let store = Arc::new(connect(&db).await);
    let before = store.stats();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .commit(vec![
                        Write::put(Table::Devices, format!("dev-{i}"), vec![1; 200]),
                        Write::put(Table::Sessions, format!("dev-{i}"), vec![2; 50]),
                    ])
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("commit");
    }
    let after = store.stats();
    let transactions = after.transactions - before.transactions;
    let batches = after.batches - before.batches;
    println!("{CALLERS} concurrent callers -> {transactions} transactions");
    assert_eq!(batches, CALLERS as u64);
    assert!(
        transactions * 4 <= CALLERS as u64,
        "{CALLERS} concurrent commits took {transactions} transactions: not grouped"
    );
    assert_eq!(after.failed_groups, 0);
    assert_eq!(store.count(Table::Devices).await.unwrap(), CALLERS as u64);
    assert_eq!(store.count(Table::Sessions).await.unwrap(), CALLERS as u64);
}

/// Commits per second for one caller committing in a loop against 64 concurrent callers, on
/// the loopback server with fsync on. Printed (run with --nocapture); the assertion is only
/// that grouping helps at all, as the machine may be busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_throughput_one_caller_and_many() {
    const RUN_FOR: Duration = Duration::from_millis(1500);
    let db = postgres::shared().fresh_database();
    let store = Arc::new(connect(&db).await);

    let rate = |callers: usize| {
        let store = Arc::clone(&store);
        async move {
            let before = store.stats();
            let started = Instant::now();
            let tasks: Vec<_> = (0..callers)
                .map(|c| {
                    let store = Arc::clone(&store);
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while started.elapsed() < RUN_FOR {
                            let key = format!("caller-{c}-{}", n % 100);
                            store
                                .commit(vec![Write::put(Table::Devices, key, vec![7; 300])])
                                .await
                                .expect("commit");
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut commits = 0;
            for task in tasks {
                commits += task.await.expect("task");
            }
            let seconds = started.elapsed().as_secs_f64();
            let after = store.stats();
            let transactions = after.transactions - before.transactions;
            println!(
                "{callers} caller(s): {commits} commits in {seconds:.2}s = {:.0} commits/s, \
                 {transactions} transactions ({:.1} batches each)",
                commits as f64 / seconds,
                commits as f64 / transactions.max(1) as f64
            );
            commits as f64 / seconds
        }
    };
    let one = rate(1).await;
    let many = rate(64).await;
    assert!(
        many > one,
        "64 concurrent callers ({many:.0}/s) did no better than one ({one:.0}/s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent() {
    let db = postgres::shared().fresh_database();
    let first = connect(&db).await;
    first
        .commit(vec![Write::put(Table::Meta, "kept", b"v".to_vec())])
        .await
        .unwrap();
    first.close().await.unwrap();
    drop(first);

    let second = connect(&db).await;
    assert_eq!(
        second.get(Table::Meta, "kept").await.unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(migrations_applied(&db), SCHEMA_VERSION.to_string());
    assert_eq!(second.health(), Health::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_on_a_fresh_database_all_succeed() {
    let db = postgres::shared().fresh_database();
    let url = db.url();
    let connects: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { PostgresStore::connect(&url, PostgresOptions::default()).await },
            )
        })
        .collect();
    let mut stores = Vec::new();
    for connect in connects {
        stores.push(connect.await.expect("task").expect("connect"));
    }
    assert_eq!(migrations_applied(&db), SCHEMA_VERSION.to_string());
    // They share one database: a write through one is read through another.
    stores[0]
        .commit(vec![Write::put(Table::Devices, "d", b"1".to_vec())])
        .await
        .unwrap();
    assert_eq!(
        stores[3].get(Table::Devices, "d").await.unwrap(),
        Some(b"1".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let db = postgres::shared().fresh_database();
    connect(&db).await.close().await.unwrap();
    let newer = SCHEMA_VERSION + 1;
    postgres::shared().execute(
        db.name(),
        &format!(
            "INSERT INTO twinhub_schema_migrations (version, description) \
             VALUES ({newer}, 'from a newer twinhub')"
        ),
    );
    match PostgresStore::connect(&db.url(), PostgresOptions::default()).await {
        Err(ConnectError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (newer, SCHEMA_VERSION));
        }
        Err(e) => panic!("connect failed, but not as SchemaTooNew: {e}"),
        Ok(_) => panic!("connected to a database with a newer schema"),
    }
    // Nothing was changed by the refused node.
    assert_eq!(migrations_applied(&db), format!("{SCHEMA_VERSION},{newer}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_refused_not_unavailable() {
    let server = postgres::shared();
    let url = server.url("no_such_database");
    match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(ConnectError::Rejected(message)) => {
            assert!(message.contains("no_such_database"), "{message}")
        }
        Err(e) => panic!("expected Rejected, got {e}"),
        Ok(_) => panic!("connected to a database that does not exist"),
    }
}

/// Several stores on one database (as several hub nodes) race, without any lock of their own,
/// to create the same key: exactly one checked commit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_commits_from_several_nodes_claim_a_key_once() {
    const NODES: usize = 6;
    let db = postgres::shared().fresh_database();
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        nodes.push(Arc::new(connect(&db).await));
    }
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let node = Arc::clone(node);
            tokio::spawn(async move {
                node.commit_checked(
                    vec![Expect::absent(Table::Meta, "cluster-identity")],
                    vec![
                        Write::put(Table::Meta, "cluster-identity", format!("node-{i}").into()),
                        Write::put(Table::Meta, format!("winner-side-effect-{i}"), vec![1]),
                    ],
                )
                .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if task.await.expect("task").expect("commit_checked") {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let identity = nodes[0].get(Table::Meta, "cluster-identity").await.unwrap();
    assert_eq!(identity, Some(format!("node-{}", winners[0]).into_bytes()));
    // Only the winner's batch was applied; no placeholder is left behind.
    assert_eq!(nodes[1].count(Table::Meta).await.unwrap(), 2);
}

/// Several nodes increment one counter with checked commits, no lock between them: every
/// successful step moves it by exactly one (no lost update), and some steps are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_counter_across_nodes_loses_no_update() {
    const NODES: usize = 4;
    const TASKS_PER_NODE: usize = 4;
    const STEPS: usize = 15;
    let db = postgres::shared().fresh_database();
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        nodes.push(Arc::new(connect(&db).await));
    }
    nodes[0]
        .commit(vec![Write::put(Table::Meta, "counter", b"0".to_vec())])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..TASKS_PER_NODE {
            let node = Arc::clone(node);
            tasks.push(tokio::spawn(async move {
                let mut applied = 0u64;
                for _ in 0..STEPS {
                    let now = node
                        .get(Table::Meta, "counter")
                        .await
                        .unwrap()
                        .expect("counter");
                    let n: u64 = std::str::from_utf8(&now).unwrap().parse().unwrap();
                    if node
                        .commit_checked(
                            vec![Expect::holds(Table::Meta, "counter", now)],
                            vec![Write::put(
                                Table::Meta,
                                "counter",
                                (n + 1).to_string().into_bytes(),
                            )],
                        )
                        .await
                        .unwrap()
                    {
                        applied += 1;
                    }
                }
                applied
            }));
        }
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    let last = nodes[2].get(Table::Meta, "counter").await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&last).unwrap(), total.to_string());
    assert!(total > 0);
    println!(
        "{} checked increments from {NODES} nodes: {total} applied",
        NODES * TASKS_PER_NODE * STEPS
    );
}

/// A key a checked commit expected absent but did not write stays absent (its claim is not
/// left behind), and a refused checked commit applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_commit_leaves_no_claim_behind() {
    let db = postgres::shared().fresh_database();
    let store = connect(&db).await;
    let applied = store
        .commit_checked(
            vec![Expect::absent(Table::Jobs, "lock")],
            vec![Write::put(Table::Jobs, "job-1", b"j".to_vec())],
        )
        .await
        .unwrap();
    assert!(applied);
    assert_eq!(store.get(Table::Jobs, "lock").await.unwrap(), None);
    assert_eq!(store.count(Table::Jobs).await.unwrap(), 1);
    let refused = store
        .commit_checked(
            vec![
                Expect::absent(Table::Jobs, "lock"),
                Expect::absent(Table::Jobs, "job-1"),
            ],
            vec![Write::put(Table::Jobs, "job-2", b"j".to_vec())],
        )
        .await
        .unwrap();
    assert!(!refused);
    assert_eq!(store.count(Table::Jobs).await.unwrap(), 1);
    // Two different conditions on one key cannot both hold.
    let contradictory = store
        .commit_checked(
            vec![
                Expect::absent(Table::Jobs, "x"),
                Expect::holds(Table::Jobs, "x", b"v".to_vec()),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert!(!contradictory);
    assert!(store.stats().checked >= 2);
}

/// When one batch in a group is refused by the database (here a trigger rejects one key), the
/// other batches of its group still commit: the group is retried batch by batch, and only the
/// guilty caller gets the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_does_not_fail_its_group() {
    const CALLERS: usize = 128;
    let db = postgres::shared().fresh_database();
    let store = Arc::new(connect(&db).await);
    postgres::shared().execute(
        db.name(),
        "CREATE FUNCTION reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.key = convert_to('poison', 'UTF8') THEN RAISE EXCEPTION 'poisoned key'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER reject_poison BEFORE INSERT OR UPDATE ON twinhub_kv
           FOR EACH ROW EXECUTE FUNCTION reject_poison();",
    );
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let key = if i == CALLERS / 2 {
                    "poison".to_string()
                } else {
                    format!("good-{i}")
                };
                store
                    .commit(vec![Write::put(Table::Devices, key, vec![1])])
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.expect("task");
        if i == CALLERS / 2 {
            assert!(
                matches!(outcome, Err(twinhub_store::Error::Backend(_))),
                "the poisoned batch returned {outcome:?}"
            );
        } else {
            outcome.unwrap_or_else(|e| panic!("innocent batch {i} failed: {e}"));
        }
    }
    assert_eq!(
        store.count(Table::Devices).await.unwrap(),
        CALLERS as u64 - 1
    );
    let stats = store.stats();
    println!("a group with a refused batch: {stats:?}");
    assert_eq!(
        store.health(),
        Health::Ok,
        "a refused batch is not an outage"
    );
}

//! The conformance suite: the behaviour every [`Store`] backend must show, as reusable cases.
//!
//! Each case is a public async function taking the store under test; failures panic, as test
//! code does. A backend crate runs them all with [`store_conformance_tests!`](crate::store_conformance_tests),
//! which expands to one `#[tokio::test]` per case so each is reported (and can be filtered)
//! on its own; a single `run_all` would stop at the first failing case and hide the rest.
//!
//! ```no_run
//! mod memory {
//!     use std::sync::Arc;
//!     twinhub_store::store_conformance_tests!(Arc::new(twinhub_store::MemoryStore::new()));
//! }
//! ```
//!
//! The expression is evaluated once per case inside the async test, so it may `.await`. It
//! yields a [`Fixture`]: an `Arc` of the store, or a pair of that `Arc` and a guard kept alive
//! for the whole case (a temporary directory, a database schema). The invoking crate needs
//! `tokio` (with `macros` and `rt-multi-thread`) among its dev-dependencies.

use std::sync::Arc;

use crate::{Error, Expect, Store, Table, Write};

/// What a conformance case runs against: the store, and whatever must outlive it.
pub trait Fixture: Send + 'static {
    /// The backend under test.
    type Store: Store;

    /// A handle on the store under test.
    fn store(&self) -> Arc<Self::Store>;
}

impl<S: Store> Fixture for Arc<S> {
    type Store = S;

    fn store(&self) -> Arc<S> {
        Arc::clone(self)
    }
}

/// A store plus a guard (for example a `tempfile::TempDir`) dropped after the store.
impl<S: Store, G: Send + 'static> Fixture for (Arc<S>, G) {
    type Store = S;

    fn store(&self) -> Arc<S> {
        Arc::clone(&self.0)
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh fixture from `$make`.
///
/// Invoke it inside its own module per backend: the generated test functions are named after
/// the cases, so two invocations in one module would collide.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@cases $make;
            get_of_missing_key,
            put_then_get,
            overwrite,
            delete,
            writes_within_a_batch_apply_in_order,
            batch_across_tables_is_visible_after_commit,
            empty_batch,
            scan_pages_in_key_byte_order,
            count_is_per_table,
            concurrent_commits_are_all_visible,
            large_values,
            commit_after_close_fails,
            close_settles_every_pending_commit,
            checked_commit_applies_only_when_conditions_hold,
            checked_commits_racing_on_one_key_apply_once,
        );
    };
    (@cases $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $make;
                let store = $crate::conformance::Fixture::store(&fixture);
                $crate::conformance::$case(store).await;
                drop(fixture);
            }
        )+
    };
}

async fn must_get<S: Store>(store: &S, table: Table, key: &str) -> Option<Vec<u8>> {
    match store.get(table, key).await {
        Ok(value) => value,
        Err(e) => panic!("get({table:?}, {key:?}) failed: {e}"),
    }
}

async fn must_count<S: Store>(store: &S, table: Table) -> u64 {
    match store.count(table).await {
        Ok(count) => count,
        Err(e) => panic!("count({table:?}) failed: {e}"),
    }
}

async fn must_scan<S: Store>(
    store: &S,
    table: Table,
    after: Option<&str>,
    limit: usize,
) -> Vec<(String, Vec<u8>)> {
    match store.scan(table, after, limit).await {
        Ok(entries) => entries,
        Err(e) => panic!("scan({table:?}, {after:?}, {limit}) failed: {e}"),
    }
}

async fn must_commit<S: Store>(store: &S, writes: Vec<Write>) {
    if let Err(e) = store.commit(writes).await {
        panic!("commit failed: {e}");
    }
}

/// A missing key reads as `None`, in an empty table and next to other keys.
pub async fn get_of_missing_key<S: Store>(store: Arc<S>) {
    assert_eq!(must_get(&*store, Table::Devices, "absent").await, None);
    must_commit(
        &*store,
        vec![Write::put(Table::Devices, "present", b"x".to_vec())],
    )
    .await;
    assert_eq!(must_get(&*store, Table::Devices, "absent").await, None);
    assert_eq!(must_get(&*store, Table::Devices, "presen").await, None);
    assert_eq!(must_get(&*store, Table::Devices, "present!").await, None);
    assert_eq!(must_get(&*store, Table::Meta, "present").await, None);
}

/// A committed put reads back byte for byte, an empty value included (which is not "missing").
pub async fn put_then_get<S: Store>(store: Arc<S>) {
    let value: Vec<u8> = (0..=255).collect();
    must_commit(
        &*store,
        vec![
            Write::put(Table::Devices, "dev-1", value.clone()),
            Write::put(Table::Devices, "empty", Vec::new()),
        ],
    )
    .await;
    assert_eq!(
        must_get(&*store, Table::Devices, "dev-1").await,
        Some(value)
    );
    assert_eq!(
        must_get(&*store, Table::Devices, "empty").await,
        Some(Vec::new())
    );
    assert_eq!(must_count(&*store, Table::Devices).await, 2);
}

/// A later put replaces the value, shorter or longer, without adding an entry.
pub async fn overwrite<S: Store>(store: Arc<S>) {
    must_commit(
        &*store,
        vec![Write::put(Table::Jobs, "job", b"first".to_vec())],
    )
    .await;
    must_commit(
        &*store,
        vec![Write::put(Table::Jobs, "job", b"2nd".to_vec())],
    )
    .await;
    assert_eq!(
        must_get(&*store, Table::Jobs, "job").await,
        Some(b"2nd".to_vec())
    );
    must_commit(
        &*store,
        vec![Write::put(Table::Jobs, "job", b"the third value".to_vec())],
    )
    .await;
    assert_eq!(
        must_get(&*store, Table::Jobs, "job").await,
        Some(b"the third value".to_vec())
    );
    assert_eq!(must_count(&*store, Table::Jobs).await, 1);
}

/// A delete removes the entry; deleting a missing key (or one twice) succeeds and changes
/// nothing.
pub async fn delete<S: Store>(store: Arc<S>) {
    must_commit(
        &*store,
        vec![
            Write::put(Table::Sessions, "a", b"1".to_vec()),
            Write::put(Table::Sessions, "b", b"2".to_vec()),
        ],
    )
    .await;
    must_commit(&*store, vec![Write::delete(Table::Sessions, "a")]).await;
    assert_eq!(must_get(&*store, Table::Sessions, "a").await, None);
    assert_eq!(
        must_get(&*store, Table::Sessions, "b").await,
        Some(b"2".to_vec())
    );
    assert_eq!(must_count(&*store, Table::Sessions).await, 1);

    must_commit(&*store, vec![Write::delete(Table::Sessions, "never-there")]).await;
    must_commit(&*store, vec![Write::delete(Table::Sessions, "a")]).await;
    must_commit(&*store, vec![Write::delete(Table::Meta, "b")]).await;
    assert_eq!(must_count(&*store, Table::Sessions).await, 1);
    assert_eq!(
        must_get(&*store, Table::Sessions, "b").await,
        Some(b"2".to_vec())
    );
}

/// Writes to one key inside a batch apply in order: the last one wins.
pub async fn writes_within_a_batch_apply_in_order<S: Store>(store: Arc<S>) {
    must_commit(
        &*store,
        vec![Write::put(Table::Meta, "gone", b"old".to_vec())],
    )
    .await;
    must_commit(
        &*store,
        vec![
            Write::put(Table::Meta, "twice", b"1".to_vec()),
            Write::put(Table::Meta, "twice", b"2".to_vec()),
            Write::delete(Table::Meta, "back"),
            Write::put(Table::Meta, "back", b"3".to_vec()),
            Write::put(Table::Meta, "short-lived", b"4".to_vec()),
            Write::delete(Table::Meta, "short-lived"),
            Write::delete(Table::Meta, "gone"),
        ],
    )
    .await;
    assert_eq!(
        must_get(&*store, Table::Meta, "twice").await,
        Some(b"2".to_vec())
    );
    assert_eq!(
        must_get(&*store, Table::Meta, "back").await,
        Some(b"3".to_vec())
    );
    assert_eq!(must_get(&*store, Table::Meta, "short-lived").await, None);
    assert_eq!(must_get(&*store, Table::Meta, "gone").await, None);
    assert_eq!(must_count(&*store, Table::Meta).await, 2);
}

/// One batch touching every table (puts and a delete) is entirely visible once committed.
pub async fn batch_across_tables_is_visible_after_commit<S: Store>(store: Arc<S>) {
    must_commit(
        &*store,
        vec![Write::put(Table::Sessions, "stale", b"s".to_vec())],
    )
    .await;
    let mut batch: Vec<Write> = Table::ALL
        .iter()
        .map(|&table| Write::put(table, "k", table.name().as_bytes().to_vec()))
        .collect();
    batch.push(Write::put(
        Table::DeviceJobs,
        "job-1/dev-1",
        b"rec".to_vec(),
    ));
    batch.push(Write::delete(Table::Sessions, "stale"));
    must_commit(&*store, batch).await;

    for table in Table::ALL {
        assert_eq!(
            must_get(&*store, table, "k").await,
            Some(table.name().as_bytes().to_vec()),
            "table {table:?}"
        );
    }
    assert_eq!(
        must_get(&*store, Table::DeviceJobs, "job-1/dev-1").await,
        Some(b"rec".to_vec())
    );
    assert_eq!(must_get(&*store, Table::Sessions, "stale").await, None);
    assert_eq!(must_count(&*store, Table::DeviceJobs).await, 2);
    assert_eq!(must_count(&*store, Table::Sessions).await, 1);
}

/// An empty batch succeeds and changes nothing.
pub async fn empty_batch<S: Store>(store: Arc<S>) {
    must_commit(&*store, Vec::new()).await;
    for table in Table::ALL {
        assert_eq!(must_count(&*store, table).await, 0, "table {table:?}");
    }
    must_commit(
        &*store,
        vec![Write::put(Table::Devices, "d", b"v".to_vec())],
    )
    .await;
    must_commit(&*store, Vec::new()).await;
    assert_eq!(must_count(&*store, Table::Devices).await, 1);
    assert_eq!(
        must_get(&*store, Table::Devices, "d").await,
        Some(b"v".to_vec())
    );
}

/// Keys that order differently by bytes than by characters, UTF-16 units or numbers.
fn awkward_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "",
        "a",
        "ab",
        "abc",
        "a-b",
        "a/b",
        "A",
        "Z",
        "zz",
        "~",
        "é",
        "e\u{301}",
        "Ωmega",
        "日本",
        "日本語",
        // U+FF61 sorts before U+1F600 by UTF-8 bytes but after it by UTF-16 code units.
        "\u{FF61}",
        "\u{1F600}",
        "\u{1F600}\u{1F600}",
    ]
    .iter()
    .map(|key| (*key).to_owned())
    .collect();
    // "dev-1" is a prefix of "dev-10" and "dev-100"; numeric order differs from byte order.
    keys.extend((0..150).map(|i| format!("dev-{i}")));
    keys
}

/// Scans return ascending byte order, strictly after `after`, at most `limit` entries, and
/// paging with the last key seen visits every entry exactly once.
pub async fn scan_pages_in_key_byte_order<S: Store>(store: Arc<S>) {
    let keys = awkward_keys();
    let value_of = |key: &str| format!("value of {key}").into_bytes();
    // Insert in a scrambled order (11 is prime and does not divide the count) over a few batches, so that
    // the backend cannot return insertion order by accident.
    let n = keys.len();
    assert_ne!(
        n % 11,
        0,
        "the scramble below needs a count coprime with 11"
    );
    let scrambled: Vec<&String> = (0..n).map(|i| &keys[(i * 11) % n]).collect();
    for chunk in scrambled.chunks(40) {
        let batch = chunk
            .iter()
            .map(|key| Write::put(Table::Devices, key.as_str(), value_of(key)))
            .collect();
        must_commit(&*store, batch).await;
    }
    // Noise in another table must not show up.
    must_commit(
        &*store,
        vec![Write::put(Table::Jobs, "dev-5x", b"j".to_vec())],
    )
    .await;

    let mut expected: Vec<String> = keys.clone();
    expected.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let position = |key: &str| expected.iter().position(|k| k == key);
    assert!(
        position("\u{FF61}") < position("\u{1F600}"),
        "the suite's own expectation must be byte order"
    );

    // Everything at once.
    let all = must_scan(&*store, Table::Devices, None, usize::MAX).await;
    let all_keys: Vec<&str> = all.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(all_keys, expected, "full scan is not in key byte order");
    for (key, value) in &all {
        assert_eq!(*value, value_of(key), "value of {key:?}");
    }

    // Page by page.
    const PAGE: usize = 7;
    let mut paged: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = must_scan(&*store, Table::Devices, after.as_deref(), PAGE).await;
        let remaining = expected.len() - paged.len();
        assert_eq!(page.len(), remaining.min(PAGE), "page after {after:?}");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        paged.extend(page.into_iter().map(|(key, _)| key));
    }
    assert_eq!(paged, expected, "paging lost, repeated or reordered keys");

    // `after` need not be a stored key; the scan starts at the next greater one.
    for probe in ["", "dev-", "dev-1", "b", "e", "日", "\u{10FFFF}"] {
        let page = must_scan(&*store, Table::Devices, Some(probe), 3).await;
        let want: Vec<&String> = expected
            .iter()
            .filter(|key| key.as_bytes() > probe.as_bytes())
            .take(3)
            .collect();
        let got: Vec<&String> = page.iter().map(|(key, _)| key).collect();
        assert_eq!(got, want, "scan after {probe:?}");
    }

    assert!(
        must_scan(&*store, Table::Devices, None, 0).await.is_empty(),
        "limit 0 must return nothing"
    );
    assert!(
        must_scan(&*store, Table::Sessions, None, 10)
            .await
            .is_empty(),
        "an empty table scans empty"
    );
}

/// Each table counts and holds only its own entries, even under identical keys.
pub async fn count_is_per_table<S: Store>(store: Arc<S>) {
    let mut batch = Vec::new();
    for (i, table) in Table::ALL.iter().enumerate() {
        batch.push(Write::put(
            *table,
            "shared",
            table.name().as_bytes().to_vec(),
        ));
        for j in 0..i {
            batch.push(Write::put(*table, format!("own-{j}"), vec![j as u8]));
        }
    }
    must_commit(&*store, batch).await;

    for (i, table) in Table::ALL.iter().enumerate() {
        assert_eq!(
            must_count(&*store, *table).await,
            i as u64 + 1,
            "table {table:?}"
        );
        assert_eq!(
            must_get(&*store, *table, "shared").await,
            Some(table.name().as_bytes().to_vec()),
            "table {table:?}"
        );
        let entries = must_scan(&*store, *table, None, usize::MAX).await;
        assert_eq!(entries.len(), i + 1, "scan of table {table:?}");
    }

    must_commit(&*store, vec![Write::delete(Table::Devices, "shared")]).await;
    assert_eq!(must_get(&*store, Table::Devices, "shared").await, None);
    for table in Table::ALL {
        if table != Table::Devices {
            assert_eq!(
                must_get(&*store, table, "shared").await,
                Some(table.name().as_bytes().to_vec()),
                "a delete in Devices leaked into {table:?}"
            );
        }
    }
    let devices_index = Table::ALL
        .iter()
        .position(|t| *t == Table::Devices)
        .unwrap_or_default();
    assert_eq!(
        must_count(&*store, Table::Devices).await,
        devices_index as u64
    );
}

/// 200 tasks commit their own two-table batch at once; every batch lands whole.
pub async fn concurrent_commits_are_all_visible<S: Store>(store: Arc<S>) {
    const TASKS: usize = 200;
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let device = format!("device-{i:03}");
                store
                    .commit(vec![
                        Write::put(Table::Devices, device.as_str(), i.to_be_bytes().to_vec()),
                        Write::put(
                            Table::DeviceJobs,
                            format!("job/{device}"),
                            device.clone().into_bytes(),
                        ),
                    ])
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("commit of task {i} failed: {e}"),
            Err(e) => panic!("task {i} did not finish: {e}"),
        }
    }

    assert_eq!(must_count(&*store, Table::Devices).await, TASKS as u64);
    assert_eq!(must_count(&*store, Table::DeviceJobs).await, TASKS as u64);
    for i in 0..TASKS {
        let device = format!("device-{i:03}");
        assert_eq!(
            must_get(&*store, Table::Devices, &device).await,
            Some(i.to_be_bytes().to_vec())
        );
        assert_eq!(
            must_get(&*store, Table::DeviceJobs, &format!("job/{device}")).await,
            Some(device.into_bytes())
        );
    }
}

/// Values of 1 MiB round-trip intact through get and scan, and can shrink again.
pub async fn large_values<S: Store>(store: Arc<S>) {
    const MIB: usize = 1024 * 1024;
    // Distinct, position-dependent patterns catch truncation, mixing and page-boundary bugs.
    let pattern = |seed: u8| -> Vec<u8> {
        (0..MIB)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    };
    let (a, b, c) = (pattern(1), pattern(2), pattern(3));
    must_commit(
        &*store,
        vec![
            Write::put(Table::Devices, "big-a", a.clone()),
            Write::put(Table::Devices, "big-b", b.clone()),
        ],
    )
    .await;
    must_commit(
        &*store,
        vec![Write::put(Table::Devices, "big-c", c.clone())],
    )
    .await;

    for (key, want) in [("big-a", &a), ("big-b", &b), ("big-c", &c)] {
        let got = must_get(&*store, Table::Devices, key).await;
        assert!(got.as_ref() == Some(want), "{key} did not round-trip");
    }
    let entries = must_scan(&*store, Table::Devices, Some("big-a"), 10).await;
    assert_eq!(entries.len(), 2);
    assert!(entries[0].0 == "big-b" && entries[0].1 == b);
    assert!(entries[1].0 == "big-c" && entries[1].1 == c);

    must_commit(
        &*store,
        vec![Write::put(Table::Devices, "big-a", b"small".to_vec())],
    )
    .await;
    assert_eq!(
        must_get(&*store, Table::Devices, "big-a").await,
        Some(b"small".to_vec())
    );
}

/// After `close`, commits (even empty ones) fail with `Closed`; what was committed before is
/// kept, and reads either still see it or fail with `Closed`.
pub async fn commit_after_close_fails<S: Store>(store: Arc<S>) {
    must_commit(
        &*store,
        vec![Write::put(Table::Meta, "kept", b"v".to_vec())],
    )
    .await;
    if let Err(e) = store.close().await {
        panic!("close failed: {e}");
    }
    let refused = store
        .commit(vec![Write::put(Table::Meta, "late", b"x".to_vec())])
        .await;
    assert!(
        matches!(refused, Err(Error::Closed)),
        "commit after close returned {refused:?}"
    );
    let refused = store.commit(Vec::new()).await;
    assert!(
        matches!(refused, Err(Error::Closed)),
        "empty commit after close returned {refused:?}"
    );
    match store.get(Table::Meta, "kept").await {
        Ok(value) => assert_eq!(value, Some(b"v".to_vec())),
        Err(Error::Closed) => {}
        Err(e) => panic!("read after close failed with {e}"),
    }
    match store.get(Table::Meta, "late").await {
        Ok(value) => assert_eq!(value, None, "a refused commit was applied"),
        Err(Error::Closed) => {}
        Err(e) => panic!("read after close failed with {e}"),
    }
}

/// Commits racing with `close` each either succeed (and are kept) or fail with `Closed` (and
/// are not applied); `close` returns only once the successful ones are in.
pub async fn close_settles_every_pending_commit<S: Store>(store: Arc<S>) {
    const TASKS: usize = 64;
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .commit(vec![Write::put(
                        Table::Sessions,
                        format!("client-{i:02}"),
                        vec![i as u8],
                    )])
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    if let Err(e) = store.close().await {
        panic!("close failed: {e}");
    }
    // Taken before any task is awaited: every commit that succeeds must already be counted.
    let count_at_close = match store.count(Table::Sessions).await {
        Ok(count) => Some(count),
        Err(Error::Closed) => None,
        Err(e) => panic!("count after close failed with {e}"),
    };
    let mut outcomes = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok(())) => outcomes.push((i, true)),
            Ok(Err(Error::Closed)) => outcomes.push((i, false)),
            Ok(Err(e)) => panic!("commit {i} failed with {e}, not Ok or Closed"),
            Err(e) => panic!("task {i} did not finish: {e}"),
        }
    }
    if let Some(count) = count_at_close {
        let succeeded = outcomes.iter().filter(|(_, ok)| *ok).count() as u64;
        assert_eq!(
            count, succeeded,
            "close returned before every successful commit was applied"
        );
    }
    for (i, committed) in outcomes {
        match store.get(Table::Sessions, &format!("client-{i:02}")).await {
            Ok(value) => assert_eq!(
                value.is_some(),
                committed,
                "commit {i} reported committed={committed}"
            ),
            Err(Error::Closed) => {}
            Err(e) => panic!("read after close failed with {e}"),
        }
    }
}

async fn must_commit_checked<S: Store>(store: &S, expect: Vec<Expect>, writes: Vec<Write>) -> bool {
    match store.commit_checked(expect, writes).await {
        Ok(applied) => applied,
        Err(e) => panic!("commit_checked failed: {e}"),
    }
}

/// A checked commit applies its writes when every condition holds (absent keys and exact
/// values), and applies none of them when any condition fails.
pub async fn checked_commit_applies_only_when_conditions_hold<S: Store>(store: Arc<S>) {
    let first = must_commit_checked(
        &*store,
        vec![Expect::absent(Table::Meta, "identity")],
        vec![Write::put(Table::Meta, "identity", b"one".to_vec())],
    )
    .await;
    assert!(
        first,
        "a condition on an absent key holds on an empty store"
    );
    let second = must_commit_checked(
        &*store,
        vec![Expect::absent(Table::Meta, "identity")],
        vec![
            Write::put(Table::Meta, "identity", b"two".to_vec()),
            Write::put(Table::Devices, "side-effect", b"x".to_vec()),
        ],
    )
    .await;
    assert!(!second, "the key is no longer absent");
    assert_eq!(
        must_get(&*store, Table::Meta, "identity").await,
        Some(b"one".to_vec())
    );
    assert_eq!(
        must_get(&*store, Table::Devices, "side-effect").await,
        None,
        "a failed condition applies none of the batch"
    );
    let wrong_value = must_commit_checked(
        &*store,
        vec![Expect::holds(Table::Meta, "identity", b"on".to_vec())],
        vec![Write::put(Table::Meta, "identity", b"three".to_vec())],
    )
    .await;
    assert!(!wrong_value, "a prefix of the value is not the value");
    let swapped = must_commit_checked(
        &*store,
        vec![
            Expect::holds(Table::Meta, "identity", b"one".to_vec()),
            Expect::absent(Table::Meta, "other"),
        ],
        vec![
            Write::put(Table::Meta, "identity", b"four".to_vec()),
            Write::delete(Table::Meta, "other"),
        ],
    )
    .await;
    assert!(swapped);
    assert_eq!(
        must_get(&*store, Table::Meta, "identity").await,
        Some(b"four".to_vec())
    );
    assert!(
        must_commit_checked(&*store, Vec::new(), Vec::new()).await,
        "no conditions always hold"
    );
}

/// Many tasks each try to move one counter from the value they read to the next: every
/// successful step moves it by exactly one, so the final value equals the number of
/// successes (no lost update). Serialized by a lock here, as the hub's callers are, so that
/// the default implementation is held to what it promises.
pub async fn checked_commits_racing_on_one_key_apply_once<S: Store>(store: Arc<S>) {
    must_commit(
        &*store,
        vec![Write::put(Table::Meta, "counter", b"0".to_vec())],
    )
    .await;
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = Arc::clone(&store);
        let lock = Arc::clone(&lock);
        tasks.push(tokio::spawn(async move {
            let mut applied = 0u32;
            for _ in 0..10 {
                let _held = lock.lock().await;
                let now = must_get(&*store, Table::Meta, "counter")
                    .await
                    .expect("counter");
                let n: u32 = std::str::from_utf8(&now).unwrap().parse().unwrap();
                let next = (n + 1).to_string().into_bytes();
                if must_commit_checked(
                    &*store,
                    vec![Expect::holds(Table::Meta, "counter", now)],
                    vec![Write::put(Table::Meta, "counter", next)],
                )
                .await
                {
                    applied += 1;
                }
            }
            applied
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    let last = must_get(&*store, Table::Meta, "counter")
        .await
        .expect("counter");
    assert_eq!(std::str::from_utf8(&last).unwrap(), total.to_string());
    assert_eq!(total, 160, "serialized checked commits all apply");
}

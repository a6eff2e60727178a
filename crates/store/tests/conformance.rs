//! Runs the shared conformance suite against both in-crate backends: the in-memory store and
//! the redb store, each case on a fresh store (redb in a fresh temporary directory).

mod memory {
    use std::sync::Arc;

    use twinhub_store::MemoryStore;

    twinhub_store::store_conformance_tests!(Arc::new(MemoryStore::new()));
}

mod redb {
    use std::sync::Arc;

    use twinhub_store::RedbStore;

    twinhub_store::store_conformance_tests!({
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let store = RedbStore::open(&dir.path().join("store.redb")).expect("open a redb store");
        (Arc::new(store), dir)
    });
}

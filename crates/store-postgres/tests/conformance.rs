//! The shared conformance suite, unchanged, against PostgreSQL: each case connects a fresh
//! store to a fresh database of the process's private cluster (dropped after the case).

use std::sync::Arc;

use twinhub_store_postgres::{PostgresOptions, PostgresStore};

twinhub_store::store_conformance_tests!({
    let db = twinhub_testsvc::postgres::shared().fresh_database();
    let store = PostgresStore::connect(&db.url(), PostgresOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", db.url()));
    (Arc::new(store), db)
});

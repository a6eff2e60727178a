//! The database schema and its migrations, applied by every node at connect.
//!
//! Migrations are a numbered list; the versions applied are rows of
//! `twinhub_schema_migrations`. A node applies the missing ones in one transaction holding a
//! transaction-scoped advisory lock, so nodes starting together take turns (the second finds the
//! work done) and a failed migration leaves nothing half-applied. A database already at a
//! version newer than this build knows is refused: its data may mean something this code would
//! misread or overwrite.
//!
//! The data is one table, `twinhub_kv (tbl smallint, key bytea, value bytea)`, rather than a
//! table per [`Table`]: a commit group touching several tables is still two statements (one
//! upsert, one delete, each over arrays), and a new `Table` variant needs an id here, not a
//! migration. Keys are `bytea`, whose ordering is plain byte comparison, so scans come back in
//! UTF-8 byte order whatever the database's encoding and collation (a `text` key would need
//! `COLLATE "C"` and a UTF-8 database to promise the same).

use deadpool_postgres::Client;
use twinhub_store::Table;

use crate::ConnectError;
use crate::error::{describe, is_transient};

/// The newest schema version this build knows (the last migration's number).
pub const SCHEMA_VERSION: i32 = 1;

/// The advisory lock key migrations hold: "twinhub!" in ASCII, fits an i64.
const MIGRATION_LOCK: i64 = 0x7477_696e_6875_6221;

/// One schema change, applied once per database.
struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in version order. Never edit an applied one: add the next.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "twinhub_kv: every table's entries, keyed by (table id, key bytes)",
    sql: "CREATE TABLE twinhub_kv (
              tbl   smallint NOT NULL,
              key   bytea    NOT NULL,
              value bytea    NOT NULL,
              PRIMARY KEY (tbl, key)
          )",
}];

/// The stable id of each table in `twinhub_kv.tbl`. Never reuse or renumber one: rows carry it.
pub(crate) fn table_id(table: Table) -> i16 {
    match table {
        Table::Meta => 1,
        Table::Devices => 2,
        Table::Sessions => 3,
        Table::Jobs => 4,
        Table::DeviceJobs => 5,
        Table::Quarantine => 6,
        Table::CloudMessages => 7,
        Table::Feedback => 8,
        Table::Modules => 9,
    }
}

/// Brings the database's schema to [`SCHEMA_VERSION`], or refuses a newer one.
pub(crate) async fn migrate(client: &mut Client) -> Result<(), ConnectError> {
    debug_assert!(
        MIGRATIONS
            .iter()
            .enumerate()
            .all(|(i, m)| m.version == i as i32 + 1)
            && MIGRATIONS.last().map(|m| m.version) == Some(SCHEMA_VERSION)
    );
    let fail = |what: &str, e: tokio_postgres::Error| {
        let text = format!("{what}: {}", describe(&e));
        if is_transient(&e) {
            ConnectError::Unavailable(text)
        } else {
            ConnectError::Migration(text)
        }
    };
    let tx = client
        .transaction()
        .await
        .map_err(|e| fail("beginning the migration transaction", e))?;
    // Taken before anything is read, held until commit or rollback.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| fail("taking the migration lock", e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS twinhub_schema_migrations (
             version     integer PRIMARY KEY,
             description text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| fail("creating twinhub_schema_migrations", e))?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM twinhub_schema_migrations",
            &[],
        )
        .await
        .map_err(|e| fail("reading the schema version", e))?
        .get(0);
    if found > SCHEMA_VERSION {
        // Dropping the transaction rolls it back and releases the lock.
        return Err(ConnectError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > found) {
        let what = format!(
            "migration {} ({})",
            migration.version, migration.description
        );
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| fail(&what, e))?;
        tx.execute(
            "INSERT INTO twinhub_schema_migrations (version, description) VALUES ($1, $2)",
            &[&migration.version, &migration.description],
        )
        .await
        .map_err(|e| fail(&what, e))?;
        tracing::info!(
            version = migration.version,
            "applied PostgreSQL schema migration: {}",
            migration.description
        );
    }
    tx.commit()
        .await
        .map_err(|e| fail("committing the migrations", e))
}

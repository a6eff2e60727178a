//! The [`twinhub_store::Store`] trait on PostgreSQL: the state several hub nodes share when the
//! hub scales out (issue 15).
//!
//! [`PostgresStore::connect`] parses the connection URL and its TLS settings (module `config`),
//! builds a deadpool of tokio-postgres connections, brings the schema up to date (`schema`)
//! and starts the group-commit writer (`writer`). Reads run on pooled connections; every
//! commit goes through the writer, which applies whatever batches are waiting in one
//! transaction. Errors are sorted into the store's `Unavailable` (the database cannot be
//! reached now: the hub answers 503) and `Backend` in `error`.
//!
//! The store has no persistent identity of its own: several hub nodes may connect to the same
//! database at once, and every one of them sees the others' committed writes;
//! [`Store::commit_checked`](twinhub_store::Store::commit_checked) is atomic across them.
//!
//! # TLS
//!
//! Chosen by the URL's `sslmode` (libpq's names; tokio-postgres itself knows only three and
//! never verifies certificates, so the store takes `sslmode` and `sslrootcert` out of the URL
//! and sets up rustls itself):
//!
//! * absent, `disable`, `allow`, `prefer`: plaintext (no opportunistic, unverified TLS);
//! * `require`, `verify-ca`, `verify-full`: TLS with rustls (ring), always verifying the
//!   server's chain and host name, so all three behave as libpq's `verify-full`.
//!
//! The CA: the PEM file named by `sslrootcert=` in the URL (percent-encoded if need be), else
//! [`PostgresOptions::ca_file`], else the system's roots (`sslrootcert=system` asks for those
//! explicitly). For example
//! `postgres://hub@db.example:5432/twinhub?sslmode=verify-full&sslrootcert=/etc/twinhub/pg-ca.pem`.
//! A `key=value` connection string is passed to tokio-postgres unchanged (its
//! `sslmode=require` then uses the CA option or the system roots).
//!
//! # Schema
//!
//! One table, `twinhub_kv (tbl smallint, key bytea, value bytea)`, plus
//! `twinhub_schema_migrations`, in the connection's default schema: the database user needs
//! the right to create tables there the first time (PostgreSQL 15 and later grant that on
//! `public` only to the database owner).

mod config;
mod error;
mod schema;
mod store;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use error::ConnectError;
pub use schema::SCHEMA_VERSION;
pub use store::{PostgresStats, PostgresStore};

/// How [`PostgresStore::connect`] sets up its pool and connections.
///
/// TLS is chosen by the URL's `sslmode` (see [`PostgresStore::connect`]); the CA that signs the
/// server's certificate comes from the URL's `sslrootcert=` or, when the URL names none, from
/// [`PostgresOptions::ca_file`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The most connections this node opens (reads share them; the writer holds one while it
    /// commits). At least 2: one for the writer, one for reads.
    pub pool_size: usize,
    /// A PEM file with the CA certificate(s) to trust for the server's certificate, used when
    /// the URL asks for TLS and has no `sslrootcert=`. With neither, the system's roots.
    pub ca_file: Option<PathBuf>,
    /// How long opening one connection (TCP, TLS, authentication) may take, unless the URL
    /// sets `connect_timeout`.
    pub connect_timeout: Duration,
    /// How long one statement may run on the server (`statement_timeout`); the client also
    /// gives up on a statement a little after this, so no operation waits forever.
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(15),
        }
    }
}

//! This crate's one error type ([`ConnectError`], for connecting) and the sorting of
//! tokio-postgres and pool errors into the store's `Unavailable` and `Backend`, which the hub
//! maps to 503 / CONNACK 3 and to 500.

use std::error::Error as _;
use std::fmt::Write as _;

use deadpool_postgres::PoolError;
use twinhub_store::Error as StoreError;

/// Why [`PostgresStore::connect`](crate::PostgresStore::connect) failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection URL or the options are not usable.
    #[error("invalid PostgreSQL configuration: {0}")]
    Config(String),
    /// The TLS setup failed (unreadable or empty CA file, no usable roots).
    #[error("PostgreSQL TLS setup: {0}")]
    Tls(String),
    /// The database could not be reached (refused, timed out, TLS handshake failed); a retry
    /// later may succeed.
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    /// The server refused the session for good (authentication, a missing database, no
    /// permission): a retry will not help until the configuration changes.
    #[error("PostgreSQL refused the connection: {0}")]
    Rejected(String),
    /// The database's schema is newer than this build knows: a newer twinhub has migrated it.
    #[error(
        "the database schema is at version {found}, newer than this twinhub knows ({known}): \
         upgrade this node before connecting it to the database"
    )]
    SchemaTooNew { found: i32, known: i32 },
    /// Applying a schema migration failed.
    #[error("PostgreSQL schema migration failed: {0}")]
    Migration(String),
}

impl From<ConnectError> for StoreError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Unavailable(_) => StoreError::Unavailable(e.to_string()),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

/// A tokio-postgres error with its causes: its own `Display` is only the kind ("db error").
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Whether a tokio-postgres error means "the database cannot be reached or cannot work right
/// now" rather than "this request is wrong".
pub(crate) fn is_transient(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") // connection exception
            || code.starts_with("53") // insufficient resources: too many connections, disk full
            || code.starts_with("57") // operator intervention: shutdown, statement timeout
            || code.starts_with("58") // system error: I/O
            || code.starts_with("40") // serialization failure, deadlock: retry
            || code == "55P03" // lock not available
            || code == "25006"; // read-only transaction: a standby after a failover
    }
    if e.is_closed() {
        return true;
    }
    let mut source = e.source();
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    // Kinds without a public accessor: connect timeouts and TLS handshake failures.
    let text = e.to_string();
    text.starts_with("timeout")
        || text.starts_with("error connecting")
        || text.starts_with("error performing TLS")
        || text.starts_with("error communicating")
}

/// A tokio-postgres error as the store reports it.
pub(crate) fn store_error(context: &str, e: &tokio_postgres::Error) -> StoreError {
    let text = format!("{context}: {}", describe(e));
    if is_transient(e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Backend(text)
    }
}

/// A failure to get a pooled connection as the store reports it.
pub(crate) fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Closed => StoreError::Closed,
        PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("no PostgreSQL connection in time ({kind:?})"))
        }
        PoolError::Backend(e) => store_error("connecting to PostgreSQL", &e),
        e => StoreError::Backend(format!("PostgreSQL connection pool: {e}")),
    }
}

/// A client-side timeout: the server did not answer in time.
pub(crate) fn timed_out(context: &str) -> StoreError {
    StoreError::Unavailable(format!("{context}: PostgreSQL did not answer in time"))
}

/// The same error again, for the next caller of a failed group (the store's error is not
/// `Clone`).
pub(crate) fn duplicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::Closed => StoreError::Closed,
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
    }
}

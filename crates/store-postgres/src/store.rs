//! [`PostgresStore`]: the [`Store`] trait over a pool of PostgreSQL connections.
//!
//! Reads take a pooled connection each and run one prepared statement; commits are queued for
//! the group-commit writer ([`crate::writer`]). A background task probes the database while
//! the store is faulty (and now and then while it is healthy), so [`Store::health`] turns
//! `Faulty` when the database becomes unreachable and `Ok` again by itself once it is back;
//! the pool replaces dead connections on its own.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_postgres::NoTls;
use twinhub_store::{Error, Expect, Health, Result, Store, Table, Write};

use crate::error::{ConnectError, describe, is_transient, pool_error, store_error, timed_out};
use crate::schema::{migrate, table_id};
use crate::writer::{self, Request};
use crate::{PostgresOptions, config};

/// How many commit requests may wait for the writer before `commit` itself waits (backpressure).
const QUEUE_CAPACITY: usize = 4096;
/// Slack the client allows beyond the server's statement timeout before it gives up itself.
const CLIENT_SLACK: Duration = Duration::from_secs(2);
/// While faulty, how often the database is probed, so health recovers soon after it is back.
const PROBE_WHILE_FAULTY: Duration = Duration::from_millis(500);
/// While healthy, how often an otherwise idle store checks that the database is still there.
const PROBE_WHILE_HEALTHY: Duration = Duration::from_secs(5);

/// Counters of the writer's work, to observe group commit in tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostgresStats {
    /// Transactions committed (each one a durable COMMIT).
    pub transactions: u64,
    /// Caller batches committed; `batches / transactions` is the mean group size.
    pub batches: u64,
    /// Groups whose combined transaction failed.
    pub failed_groups: u64,
    /// Batches retried alone after their group's transaction failed for a reason other than
    /// the database being unreachable.
    pub retried_alone: u64,
    /// Checked commits decided (applied or refused because a condition did not hold); each
    /// runs in a transaction of its own.
    pub checked: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) failed_groups: AtomicU64,
    pub(crate) retried_alone: AtomicU64,
    pub(crate) checked: AtomicU64,
}

/// What the store, its writer and its health monitor share.
pub(crate) struct Shared {
    pub(crate) pool: Pool,
    /// The longest the client waits for one step (a connection, a statement) of an operation.
    pub(crate) op_timeout: Duration,
    pub(crate) counters: Counters,
    /// Why the database is unreachable, until an operation or a probe succeeds again.
    fault: Mutex<Option<String>>,
}

impl Shared {
    /// A pooled connection; dead ones are replaced by the pool.
    pub(crate) async fn client(&self) -> Result<Object> {
        // The pool's own wait, create and recycle timeouts bound this.
        self.pool.get().await.map_err(pool_error)
    }

    /// Records what an operation's outcome says about the database's reachability.
    pub(crate) fn note<T>(&self, outcome: &Result<T>) {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(_) => {
                if fault.take().is_some() {
                    tracing::info!("PostgreSQL is reachable again");
                }
            }
            Err(Error::Unavailable(reason)) => {
                if fault.is_none() {
                    tracing::warn!(error = %reason, "PostgreSQL is unreachable");
                }
                *fault = Some(reason.clone());
            }
            // A refused statement or a closed store says nothing about reachability.
            Err(Error::Backend(_) | Error::Closed) => {}
        }
    }

    fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn probe(&self) -> Result<()> {
        let client = self.client().await?;
        match timeout(self.op_timeout, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(store_error("probing PostgreSQL", &e)),
            Err(_) => {
                discard(client);
                Err(timed_out("probing PostgreSQL"))
            }
        }
    }
}

/// Closes a connection whose state is unknown (a statement timed out on it) instead of
/// returning it to the pool.
pub(crate) fn discard(client: Object) {
    drop(Object::take(client));
}

/// A [`Store`] in a PostgreSQL database, shareable by several hub nodes.
///
/// Every commit returns after PostgreSQL's COMMIT did, with `synchronous_commit = on` (unless
/// the URL's `options` set another level), so a batch whose `commit` returned `Ok` is durable
/// and visible to every node. When a commit fails with [`Error::Unavailable`] because the
/// connection broke or timed out during COMMIT, the batch may or may not have been applied;
/// it is never reported as committed when it was not.
///
/// If a `commit` future is dropped after its batch was queued, the batch may still be applied:
/// cancellation does not roll back.
pub struct PostgresStore {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    // Set by `close`, so later commits are refused with `Closed`.
    closing: AtomicBool,
    monitor: JoinHandle<()>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.shared.pool.status())
            .field("stats", &self.stats())
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, applies the schema migrations this build knows
    /// (refusing a database migrated by a newer build) and starts the writer.
    ///
    /// `url` is a `postgres://user[:password]@host[:port]/database[?params]` URL (or a
    /// tokio-postgres `key=value` string). TLS: `sslmode=require`, `verify-ca` or
    /// `verify-full` connect over TLS, always verifying the server's chain and host name,
    /// against the PEM CA named by `sslrootcert=` or else [`PostgresOptions::ca_file`], or
    /// else the system's roots; without one of those modes the connection is plaintext (see
    /// the crate documentation).
    ///
    /// Fails with [`ConnectError::Unavailable`] when the server cannot be reached (a caller may
    /// retry), [`ConnectError::Rejected`] when it refuses the session (authentication, no such
    /// database), [`ConnectError::SchemaTooNew`] when a newer build has migrated the database.
    ///
    /// Must be called within a tokio runtime (it spawns the writer and the health monitor).
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, ConnectError> {
        if options.pool_size < 2 {
            return Err(ConnectError::Config(format!(
                "pool_size must be at least 2 (one connection for the writer, one for reads), not {}",
                options.pool_size
            )));
        }
        let target = config::parse(url, &options)?;
        let manager_config = ManagerConfig {
            // Dead connections are noticed by their closed state; a broken one that slipped
            // through fails one statement, which reads and the writer retry once.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match target.tls {
            Some(tls) => Manager::from_config(target.pg, tls, manager_config),
            None => Manager::from_config(target.pg, NoTls, manager_config),
        };
        let op_timeout = options.statement_timeout + CLIENT_SLACK;
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(op_timeout))
            .create_timeout(Some(options.connect_timeout + CLIENT_SLACK))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| ConnectError::Config(format!("building the connection pool: {e}")))?;

        let mut client = pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) if !is_transient(&e) => {
                ConnectError::Rejected(describe(&e))
            }
            e => ConnectError::Unavailable(pool_error(e).to_string()),
        })?;
        // The lock wait and each migration statement are bounded by statement_timeout on the
        // server; this bounds the whole on the client.
        let migrations = timeout(op_timeout * 2, migrate(&mut client)).await;
        match migrations {
            Ok(outcome) => outcome?,
            Err(_) => {
                discard(client);
                return Err(ConnectError::Unavailable(
                    "the schema migrations did not finish in time".into(),
                ));
            }
        }
        drop(client);

        let shared = Arc::new(Shared {
            pool,
            op_timeout,
            counters: Counters::default(),
            fault: Mutex::new(None),
        });
        let (requests, queue) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(writer::run(Arc::clone(&shared), queue));
        let monitor = tokio::spawn(monitor(Arc::downgrade(&shared)));
        tracing::debug!("PostgreSQL store connected");
        Ok(PostgresStore {
            shared,
            requests,
            closing: AtomicBool::new(false),
            monitor,
        })
    }

    /// What the writer has committed so far.
    pub fn stats(&self) -> PostgresStats {
        let c = &self.shared.counters;
        PostgresStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_groups: c.failed_groups.load(Ordering::Relaxed),
            retried_alone: c.retried_alone.load(Ordering::Relaxed),
            checked: c.checked.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The writer stops by itself once the queue's sender is gone and it has drained it.
        self.monitor.abort();
    }
}

/// Runs one read: a pooled connection, the statement under the client timeout, one retry with
/// another connection when the first one turns out dead. Records reachability.
macro_rules! read {
    ($self:ident, $what:expr, |$client:ident| $body:expr) => {{
        let shared = &$self.shared;
        let mut retried = false;
        let outcome = loop {
            let $client = match shared.client().await {
                Ok(client) => client,
                Err(e) => break Err(e),
            };
            match timeout(shared.op_timeout, async { $body }).await {
                Ok(Ok(value)) => break Ok(value),
                Ok(Err(e)) if e.is_closed() && !retried => retried = true,
                Ok(Err(e)) => break Err(store_error($what, &e)),
                Err(_) => {
                    discard($client);
                    break Err(timed_out($what));
                }
            }
        };
        shared.note(&outcome);
        outcome
    }};
}

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>> {
        let id = table_id(table);
        let key = key.as_bytes();
        read!(self, "reading a key", |client| {
            let statement = client
                .prepare_cached("SELECT value FROM twinhub_kv WHERE tbl = $1 AND key = $2")
                .await?;
            let row = client.query_opt(&statement, &[&id, &key]).await?;
            Ok::<_, tokio_postgres::Error>(row.map(|row| row.get::<_, Vec<u8>>(0)))
        })
    }

    async fn scan(
        &self,
        table: Table,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let id = table_id(table);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = read!(self, "scanning a table", |client| {
            match after {
                Some(after) => {
                    let statement = client
                        .prepare_cached(
                            "SELECT key, value FROM twinhub_kv WHERE tbl = $1 AND key > $2 \
                             ORDER BY key LIMIT $3",
                        )
                        .await?;
                    client
                        .query(&statement, &[&id, &after.as_bytes(), &limit])
                        .await
                }
                None => {
                    let statement = client
                        .prepare_cached(
                            "SELECT key, value FROM twinhub_kv WHERE tbl = $1 \
                             ORDER BY key LIMIT $2",
                        )
                        .await?;
                    client.query(&statement, &[&id, &limit]).await
                }
            }
        })?;
        rows.into_iter()
            .map(|row| {
                let key: Vec<u8> = row.get(0);
                let key = String::from_utf8(key).map_err(|e| {
                    Error::Backend(format!(
                        "a key in table {} is not UTF-8 (written by something else?): {e}",
                        table.name()
                    ))
                })?;
                Ok((key, row.get(1)))
            })
            .collect()
    }

    async fn count(&self, table: Table) -> Result<u64> {
        let id = table_id(table);
        let count: i64 = read!(self, "counting a table", |client| {
            let statement = client
                .prepare_cached("SELECT count(*) FROM twinhub_kv WHERE tbl = $1")
                .await?;
            let row = client.query_one(&statement, &[&id]).await?;
            Ok::<_, tokio_postgres::Error>(row.get(0))
        })?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if writes.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        if self
            .requests
            .send(Request::Commit { writes, reply })
            .await
            .is_err()
        {
            return Err(self.writer_gone());
        }
        answer.await.unwrap_or_else(|_| Err(self.writer_gone()))
    }

    /// Checked inside the transaction that applies the writes, with the conditions' rows
    /// locked (see the writer), so it holds across processes: of several nodes racing on one
    /// key, exactly one sees its condition hold.
    async fn commit_checked(&self, expect: Vec<Expect>, writes: Vec<Write>) -> Result<bool> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if expect.is_empty() && writes.is_empty() {
            return Ok(true);
        }
        let (reply, answer) = oneshot::channel();
        let request = Request::Checked {
            expect,
            writes,
            reply,
        };
        if self.requests.send(request).await.is_err() {
            return Err(self.writer_gone());
        }
        answer.await.unwrap_or_else(|_| Err(self.writer_gone()))
    }

    async fn close(&self) -> Result<()> {
        self.closing.store(true, Ordering::Release);
        let (reply, done) = oneshot::channel();
        // The writer answers every batch queued before this, then `done`; if it is already
        // gone (an earlier close), there is nothing left to settle.
        if self.requests.send(Request::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
        self.monitor.abort();
        // Later reads fail with `Closed`; idle connections are closed now.
        self.shared.pool.close();
        Ok(())
    }

    fn health(&self) -> Health {
        match self.shared.fault() {
            Some(reason) => Health::Faulty(reason),
            None => Health::Ok,
        }
    }
}

impl PostgresStore {
    /// Why the writer did not take or answer a request.
    fn writer_gone(&self) -> Error {
        if self.closing.load(Ordering::Acquire) {
            Error::Closed
        } else {
            Error::Backend("the PostgreSQL store writer stopped unexpectedly".into())
        }
    }
}

/// Probes the database now and then, and often while it is unreachable, until the store is
/// dropped or closed.
async fn monitor(shared: Weak<Shared>) {
    loop {
        let pause = match shared.upgrade() {
            Some(s) if s.fault().is_some() => PROBE_WHILE_FAULTY,
            Some(_) => PROBE_WHILE_HEALTHY,
            None => return,
        };
        tokio::time::sleep(pause).await;
        let Some(s) = shared.upgrade() else { return };
        if s.pool.is_closed() {
            return;
        }
        let outcome = s.probe().await;
        s.note(&outcome);
    }
}

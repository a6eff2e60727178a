//! The group-commit writer: one task that takes every commit request waiting in its queue and
//! applies them in one PostgreSQL transaction, so many devices' writes share one COMMIT (and
//! one WAL flush), then answers each caller with its own result.
//!
//! The design is the redb backend's (one writer draining a bounded queue), on a tokio task
//! since the work is network round trips. A group's writes collapse to the last one per key
//! (what applying them in order would leave), sorted by table and key, and go to the server as
//! one upsert and one delete over arrays: two statements per group whatever its size, and two
//! nodes' groups lock rows in the same order, so they do not deadlock each other.
//!
//! When a group's transaction fails because the database is unreachable, everyone in it gets
//! `Unavailable`. When it fails for another reason (a statement refused), one batch may be to
//! blame: each batch is retried alone once, so innocent batches still commit. A failed
//! `BEGIN` on a dead pooled connection, a deadlock or a serialization failure rolled nothing
//! in, so the group is tried once more before anyone is answered.
//!
//! Checked commits ([`Store::commit_checked`](twinhub_store::Store::commit_checked)) go
//! through the same queue, so they keep their place among a task's commits and `close` settles
//! them too, but each runs in a transaction of its own: the group gathered before it is
//! committed first. Inside that transaction every condition's row is read `FOR UPDATE` in
//! (table, key) order, and a key that must be absent is claimed with a plain `INSERT` of a
//! placeholder (removed again unless the batch writes the key): a concurrent writer of the same
//! key, on this node or another, waits for us, and a concurrent checked commit that claimed it
//! first makes our `INSERT` fail with a unique violation, which means the key is no longer
//! absent. So no two nodes both see their condition hold, and a plain writer cannot slip in
//! between check and write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_postgres::error::SqlState;
use twinhub_store::{Error, Expect, Result, Write};

use crate::error::{duplicate, store_error, timed_out};
use crate::schema::table_id;
use crate::store::{Shared, discard};

/// A group stops growing at this many batches, so one transaction stays bounded in time...
const MAX_GROUP_BATCHES: usize = 1024;
/// ...at roughly this many bytes of keys and values, so it stays bounded in memory...
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// ...and at this many writes, so the statements' arrays stay reasonable. A single batch
/// larger than these still goes alone.
const MAX_GROUP_WRITES: usize = 20_000;

const UPSERT: &str = "INSERT INTO twinhub_kv (tbl, key, value) \
                      SELECT * FROM unnest($1::int2[], $2::bytea[], $3::bytea[]) \
                      ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value";
/// Reads a condition's row and locks it until the transaction ends.
const LOCK_ROW: &str = "SELECT value FROM twinhub_kv WHERE tbl = $1 AND key = $2 FOR UPDATE";
/// Claims an absent key with a placeholder no other transaction sees; a concurrent inserter of
/// the same key waits for us, or we for it.
const CLAIM: &str = "INSERT INTO twinhub_kv (tbl, key, value) VALUES ($1, $2, ''::bytea)";
const DELETE: &str = "DELETE FROM twinhub_kv AS kv \
                      USING unnest($1::int2[], $2::bytea[]) AS gone(tbl, key) \
                      WHERE kv.tbl = gone.tbl AND kv.key = gone.key";

pub(crate) enum Request {
    Commit {
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<()>>,
    },
    Checked {
        expect: Vec<Expect>,
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<bool>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

type Pending = (Vec<Write>, oneshot::Sender<Result<()>>);

/// The writer's loop: group, apply, answer, until every sender is gone or `close` was asked and
/// the queue is drained.
pub(crate) async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Request>) {
    let mut close_replies = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut group: Vec<Pending> = Vec::new();
        let (mut bytes, mut writes) = (0, 0);
        let mut next = Some(first);
        // A checked commit ends the group: it runs alone, after the group.
        let mut checked = None;
        while let Some(request) = next.take() {
            match request {
                Request::Commit {
                    writes: batch,
                    reply,
                } => {
                    bytes += batch
                        .iter()
                        .map(|w| w.key.len() + w.value.as_ref().map_or(0, Vec::len))
                        .sum::<usize>();
                    writes += batch.len();
                    group.push((batch, reply));
                }
                Request::Checked {
                    expect,
                    writes,
                    reply,
                } => {
                    checked = Some((expect, writes, reply));
                    break;
                }
                Request::Close { reply } => {
                    // Refuse new sends; what is already queued still arrives and is applied,
                    // and `recv` returns `None` once it is drained.
                    queue.close();
                    close_replies.push(reply);
                }
            }
            if group.len() < MAX_GROUP_BATCHES
                && bytes < MAX_GROUP_BYTES
                && writes < MAX_GROUP_WRITES
            {
                next = queue.try_recv().ok();
            }
        }
        commit_group(&shared, group).await;
        if let Some((expect, writes, reply)) = checked {
            let outcome = apply_checked(&shared, &expect, &writes).await;
            shared.note(&outcome);
            if outcome.is_ok() {
                shared.counters.checked.fetch_add(1, Ordering::Relaxed);
            }
            if matches!(outcome, Ok(true)) {
                shared.counters.transactions.fetch_add(1, Ordering::Relaxed);
                shared.counters.batches.fetch_add(1, Ordering::Relaxed);
            }
            let _ = reply.send(outcome);
        }
    }
    for reply in close_replies {
        // The closer may have given up waiting; nothing to tell it then.
        let _ = reply.send(());
    }
    tracing::debug!("PostgreSQL store writer stopped");
}

/// Applies `group` in one transaction and answers every caller; on a failure that is not the
/// database's absence, retries each batch alone.
async fn commit_group(shared: &Shared, group: Vec<Pending>) {
    if group.is_empty() {
        return;
    }
    let batches: Vec<&[Write]> = group.iter().map(|(writes, _)| writes.as_slice()).collect();
    let outcome = apply(shared, &batches).await;
    shared.note(&outcome);
    let counters = &shared.counters;
    match outcome {
        Ok(()) => {
            counters.transactions.fetch_add(1, Ordering::Relaxed);
            counters
                .batches
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            for (_, reply) in group {
                // A caller whose future was dropped no longer listens.
                let _ = reply.send(Ok(()));
            }
        }
        Err(Error::Backend(reason)) if group.len() > 1 => {
            counters.failed_groups.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = %reason,
                batches = group.len(),
                "a group commit failed; retrying each batch alone"
            );
            for (writes, reply) in group {
                counters.retried_alone.fetch_add(1, Ordering::Relaxed);
                let alone = apply(shared, &[writes.as_slice()]).await;
                shared.note(&alone);
                if alone.is_ok() {
                    counters.transactions.fetch_add(1, Ordering::Relaxed);
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                }
                let _ = reply.send(alone);
            }
        }
        Err(e) => {
            counters.failed_groups.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, batches = group.len(), "PostgreSQL group commit failed");
            for (_, reply) in group {
                let _ = reply.send(Err(duplicate(&e)));
            }
        }
    }
}

/// Where a transaction failed, for deciding whether it may be tried again.
enum Failed {
    /// Nothing was applied: BEGIN failed, or the server rolled back a deadlock or a
    /// serialization failure.
    Retryable(tokio_postgres::Error),
    Other(tokio_postgres::Error),
}

/// The net effect of writes applied in order: the last write per key wins. Sorted by (table,
/// key), so transactions lock rows in one global order.
#[derive(Default)]
struct Changes<'a> {
    last: BTreeMap<(i16, &'a [u8]), Option<&'a [u8]>>,
}

impl<'a> Changes<'a> {
    fn of(batches: &[&'a [Write]]) -> Self {
        let mut changes = Changes::default();
        for write in batches.iter().flat_map(|batch| batch.iter()) {
            changes.last.insert(
                (table_id(write.table), write.key.as_bytes()),
                write.value.as_deref(),
            );
        }
        changes
    }

    /// Runs the upsert and the delete for these changes in `tx`.
    async fn write(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), Failed> {
        let (mut put_tables, mut put_keys, mut put_values) = (Vec::new(), Vec::new(), Vec::new());
        let (mut gone_tables, mut gone_keys) = (Vec::new(), Vec::new());
        for (&(table, key), value) in &self.last {
            match value {
                Some(value) => {
                    put_tables.push(table);
                    put_keys.push(key);
                    put_values.push(*value);
                }
                None => {
                    gone_tables.push(table);
                    gone_keys.push(key);
                }
            }
        }
        if !put_keys.is_empty() {
            let statement = tx.prepare_cached(UPSERT).await.map_err(failed)?;
            tx.execute(&statement, &[&put_tables, &put_keys, &put_values])
                .await
                .map_err(failed)?;
        }
        if !gone_keys.is_empty() {
            let statement = tx.prepare_cached(DELETE).await.map_err(failed)?;
            tx.execute(&statement, &[&gone_tables, &gone_keys])
                .await
                .map_err(failed)?;
        }
        Ok(())
    }
}

/// A failed statement inside a transaction: deadlocks and serialization failures rolled
/// everything back and may be tried again.
fn failed(e: tokio_postgres::Error) -> Failed {
    let code = e.code().map(|c| c.code());
    if matches!(code, Some("40001" | "40P01")) {
        Failed::Retryable(e)
    } else {
        Failed::Other(e)
    }
}

/// Applies `batches`, in order, in one durable transaction.
async fn apply(shared: &Shared, batches: &[&[Write]]) -> Result<()> {
    let changes = Changes::of(batches);
    if changes.last.is_empty() {
        return Ok(());
    }
    let mut tried_again = false;
    loop {
        let mut client = shared.client().await?;
        let attempt = timeout(shared.op_timeout, async {
            let tx = client.transaction().await.map_err(Failed::Retryable)?;
            changes.write(&tx).await?;
            // Durable once this returns: synchronous_commit is on for the session.
            tx.commit().await.map_err(Failed::Other)
        })
        .await;
        match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(Failed::Retryable(e))) if !tried_again => {
                tracing::debug!(error = %crate::error::describe(&e), "retrying a group commit");
                tried_again = true;
            }
            Ok(Err(Failed::Retryable(e) | Failed::Other(e))) => {
                return Err(store_error("committing to PostgreSQL", &e));
            }
            Err(_) => {
                // The connection is in an unknown state (perhaps mid-COMMIT): close it. The
                // batch may or may not have been applied; the caller hears it was not
                // confirmed.
                discard(client);
                return Err(timed_out("committing to PostgreSQL"));
            }
        }
    }
}

/// Applies `writes` in one durable transaction if every condition of `expect` holds inside it;
/// returns whether it did.
async fn apply_checked(shared: &Shared, expect: &[Expect], writes: &[Write]) -> Result<bool> {
    // One condition per key; two different ones on the same key cannot both hold.
    let mut conditions: BTreeMap<(i16, &[u8]), Option<&[u8]>> = BTreeMap::new();
    for condition in expect {
        let key = (table_id(condition.table), condition.key.as_bytes());
        let want = condition.value.as_deref();
        if conditions
            .insert(key, want)
            .is_some_and(|before| before != want)
        {
            return Ok(false);
        }
    }
    let mut tried_again = false;
    loop {
        let mut client = shared.client().await?;
        let attempt = timeout(shared.op_timeout, async {
            let tx = client.transaction().await.map_err(Failed::Retryable)?;
            let read = tx.prepare_cached(LOCK_ROW).await.map_err(failed)?;
            let claim = tx.prepare_cached(CLAIM).await.map_err(failed)?;
            let mut changes = Changes::of(&[writes]);
            for (&(table, key), want) in &conditions {
                let row = tx.query_opt(&read, &[&table, &key]).await.map_err(failed)?;
                let have: Option<Vec<u8>> = row.map(|row| row.get(0));
                let holds = match (&have, want) {
                    (None, None) => match tx.execute(&claim, &[&table, &key]).await {
                        Ok(_) => {
                            // Claimed; unless the batch writes the key, it goes again.
                            changes.last.entry((table, key)).or_insert(None);
                            true
                        }
                        // Another transaction inserted it and committed: no longer absent.
                        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                            return Ok(false);
                        }
                        Err(e) => return Err(failed(e)),
                    },
                    (Some(have), Some(want)) => have.as_slice() == *want,
                    _ => false,
                };
                if !holds {
                    tx.rollback().await.map_err(Failed::Other)?;
                    return Ok(false);
                }
            }
            changes.write(&tx).await?;
            tx.commit().await.map_err(Failed::Other)?;
            Ok(true)
        })
        .await;
        match attempt {
            Ok(Ok(applied)) => return Ok(applied),
            Ok(Err(Failed::Retryable(e))) if !tried_again => {
                tracing::debug!(error = %crate::error::describe(&e), "retrying a checked commit");
                tried_again = true;
            }
            Ok(Err(Failed::Retryable(e) | Failed::Other(e))) => {
                return Err(store_error("committing to PostgreSQL", &e));
            }
            Err(_) => {
                discard(client);
                return Err(timed_out("committing to PostgreSQL"));
            }
        }
    }
}

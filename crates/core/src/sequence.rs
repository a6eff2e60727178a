//! Numbers that only ever increase, across restarts too, at the cost of one store commit per
//! many values: before a value reaches the limit recorded in the `meta` table, a new limit
//! further on is committed, and a reopened hub starts at the recorded limit. Cloud-to-device
//! sequence numbers (`c2d`) and connection-state sequence numbers (`hub_events`) use it.
//! Blocks are claimed with a checked commit, so hub nodes sharing one store never issue the
//! same value.

use twinhub_proto::error::ErrorCode;
use twinhub_store::{Expect, Store, Table, Write};

use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    /// The last value issued or observed (0 before any).
    last: u64,
    /// The limit committed in the store; `None` until read.
    limit: Option<u64>,
}

/// One such sequence, its limit kept under `key` in the meta table.
#[derive(Debug)]
pub(crate) struct Reserved {
    key: &'static str,
    /// How far past a value the next committed limit lies.
    reserve: u64,
    state: tokio::sync::Mutex<State>,
}

impl Reserved {
    pub(crate) fn new(key: &'static str, reserve: u64) -> Reserved {
        Reserved {
            key,
            reserve,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Makes later values larger than `value` (one the store already holds).
    pub(crate) async fn observe(&self, value: u64) {
        let mut state = self.state.lock().await;
        state.last = state.last.max(value);
    }

    /// The next value: above every value issued before, and at least `at_least`.
    pub(crate) async fn next(&self, store: &dyn Store, at_least: u64) -> Result<u64> {
        let mut state = self.state.lock().await;
        let limit = match state.limit {
            Some(limit) => limit,
            None => {
                let stored = self.stored(store).await?.map_or(0, |(n, _)| n);
                state.last = state.last.max(stored.saturating_sub(1));
                state.limit = Some(stored);
                stored
            }
        };
        let mut value = at_least.max(state.last.saturating_add(1));
        if value >= limit {
            // A block is claimed by moving the stored limit from what it holds now, so that
            // hub nodes sharing one store never hand out the same block: one that lost the
            // race reads the winner's limit and claims past it.
            loop {
                let stored = self.stored(store).await?;
                let expect = match &stored {
                    Some((n, bytes)) => {
                        value = value.max(*n);
                        Expect::holds(Table::Meta, self.key, bytes.clone())
                    }
                    None => Expect::absent(Table::Meta, self.key),
                };
                let next = value.saturating_add(self.reserve);
                let claim = Write::put(Table::Meta, self.key, next.to_string().into_bytes());
                if store.commit_checked(vec![expect], vec![claim]).await? {
                    state.limit = Some(next);
                    break;
                }
            }
        }
        state.last = value;
        Ok(value)
    }

    /// The limit the store holds now, with its bytes (for a checked commit).
    async fn stored(&self, store: &dyn Store) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(bytes) = store.get(Table::Meta, self.key).await? else {
            return Ok(None);
        };
        let limit = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::ServerError,
                    format!("the stored limit {} cannot be read", self.key),
                )
            })?;
        Ok(Some((limit, bytes)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use twinhub_store::MemoryStore;

    use super::*;

    #[tokio::test]
    async fn values_increase_within_and_across_restarts_with_one_commit_per_block() {
        let store = Arc::new(MemoryStore::new());
        let first = Reserved::new("k", 100);
        let mut last = 0;
        for _ in 0..150 {
            let v = first.next(store.as_ref(), 0).await.unwrap();
            assert!(v > last);
            last = v;
        }
        let limit: u64 = String::from_utf8(store.get(Table::Meta, "k").await.unwrap().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            limit > last,
            "the committed limit is above every value issued"
        );
        // A restarted sequence starts at the limit, whatever it issued last.
        let second = Reserved::new("k", 100);
        assert_eq!(second.next(store.as_ref(), 0).await.unwrap(), limit);
        // `at_least` and observed values push it further.
        assert_eq!(
            second.next(store.as_ref(), limit + 50).await.unwrap(),
            limit + 50
        );
        second.observe(limit + 1000).await;
        assert_eq!(second.next(store.as_ref(), 0).await.unwrap(), limit + 1001);
    }

    #[tokio::test]
    async fn two_nodes_on_one_store_never_issue_the_same_value() {
        let store = Arc::new(MemoryStore::new());
        let a = Reserved::new("k", 10);
        let b = Reserved::new("k", 10);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..100 {
            let (first, second) = if i % 3 == 0 { (&a, &b) } else { (&b, &a) };
            for node in [first, second] {
                let v = node.next(store.as_ref(), 0).await.unwrap();
                assert!(seen.insert(v), "value {v} was issued twice");
            }
        }
    }

    #[tokio::test]
    async fn an_unreadable_limit_is_an_error_not_a_restart_from_zero() {
        let store = Arc::new(MemoryStore::new());
        store
            .commit(vec![Write::put(Table::Meta, "k", b"soon".to_vec())])
            .await
            .unwrap();
        let err = Reserved::new("k", 10)
            .next(store.as_ref(), 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ServerError);
    }
}

//! Numbers that only ever increase, across restarts too, at the cost of one store commit per
//! many values: before a value reaches the limit recorded in the `meta` table, a new limit
//! further on is committed, and a reopened hub starts at the recorded limit. Cloud-to-device
//! sequence numbers (`c2d`) and connection-state sequence numbers (`hub_events`) use it.

use twinhub_proto::error::ErrorCode;
use twinhub_store::{Store, Table, Write};

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
                let stored = match store.get(Table::Meta, self.key).await? {
                    Some(bytes) => std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .ok_or_else(|| {
                            Error::new(
                                ErrorCode::ServerError,
                                format!("the stored limit {} cannot be read", self.key),
                            )
                        })?,
                    None => 0,
                };
                state.last = state.last.max(stored.saturating_sub(1));
                state.limit = Some(stored);
                stored
            }
        };
        let value = at_least.max(state.last.saturating_add(1));
        if value >= limit {
            let next = value.saturating_add(self.reserve);
            store
                .commit(vec![Write::put(
                    Table::Meta,
                    self.key,
                    next.to_string().into_bytes(),
                )])
                .await?;
            state.limit = Some(next);
        }
        state.last = value;
        Ok(value)
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

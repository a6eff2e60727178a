//! Twin queries (`POST /devices/query`): runs an IoT Hub query over the committed registry
//! (so every write acknowledged before the query is visible), one page at a time. The
//! language itself (parsing, matching, projection, aggregation) is `twinhub-query`.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use twinhub_query::{From, Query, Select};
use twinhub_store::Table;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::record::DeviceRecord;

/// Default and maximum page sizes (`x-ms-max-item-count`).
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Records read from the store per scan step.
const SCAN_BATCH: usize = 512;
/// How long one query request may scan before it is refused as throttled (its caller can
/// page with a narrower condition or retry later).
pub const QUERY_BUDGET: Duration = Duration::from_secs(10);
/// Queries scanning at once; more wait their turn (within the budget).
pub const CONCURRENT_QUERIES: usize = 4;
/// Most groups a GROUP BY may produce.
pub const MAX_GROUPS: usize = 10_000;

/// One page of results.
#[derive(Debug, Clone)]
pub struct QueryPage {
    pub items: Vec<Value>,
    /// Pass back as `x-ms-continuation` for the next page; `None` on the last page.
    pub continuation: Option<String>,
    /// `x-ms-item-type`: `twin`, `deviceJob` or `raw`.
    pub item_type: &'static str,
}

/// Where the previous page stopped: the last key read and how many rows were returned so far
/// (for `TOP`). Opaque to clients (base64 of JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    #[serde(rename = "k")]
    after: Option<String>,
    #[serde(rename = "n")]
    returned: u64,
}

impl Cursor {
    fn decode(token: &str) -> Result<Cursor> {
        let bad = || Error::invalid("The continuation token is not valid");
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| bad())?;
        serde_json::from_slice(&raw).map_err(|_| bad())
    }

    fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Parses a query, turning syntax errors into 400s that say where and what was expected.
pub fn parse_query(text: &str) -> Result<Query> {
    twinhub_query::parse(text).map_err(|e| Error::invalid(format!("Invalid query: {e}")))
}

impl Hub {
    /// Runs `text` and returns the page after `continuation` with at most `page_size` items.
    pub async fn query(
        &self,
        text: &str,
        page_size: Option<usize>,
        continuation: Option<&str>,
    ) -> Result<QueryPage> {
        let query = parse_query(text)?;
        let deadline = Instant::now() + QUERY_BUDGET;
        let _permit = tokio::time::timeout_at(deadline, self.query_slots.acquire())
            .await
            .map_err(|_| over_budget())?
            .map_err(|_| Error::internal())?;
        let page_size = page_size.unwrap_or(DEFAULT_PAGE);
        if page_size == 0 || page_size > MAX_PAGE {
            return Err(Error::invalid(format!(
                "x-ms-max-item-count must be between 1 and {MAX_PAGE}"
            )));
        }
        let cursor = continuation
            .map(Cursor::decode)
            .transpose()?
            .unwrap_or_default();
        let table = match query.from {
            From::Devices => Table::Devices,
            From::DevicesJobs => Table::DeviceJobs,
            From::DevicesModules => Table::Modules,
        };
        let item_type = match (&query.from, &query.select) {
            _ if query.is_aggregate() => "raw",
            (From::Devices, Select::All) | (From::DevicesModules, Select::All) => "twin",
            (From::DevicesJobs, Select::All) => "deviceJob",
            _ => "raw",
        };
        if let Some(mut aggregation) = query.aggregation() {
            // Aggregates see every document, one at a time; their rows are few and fit one
            // page.
            let mut too_many = false;
            self.scan_documents(table, None, deadline, |_, doc| {
                aggregation.add(&doc);
                too_many = aggregation.groups() > MAX_GROUPS;
                !too_many
            })
            .await?;
            if too_many {
                return Err(Error::invalid(format!(
                    "The query makes more than {MAX_GROUPS} groups; group by fewer distinct values"
                )));
            }
            return Ok(QueryPage {
                items: aggregation.finish(),
                continuation: None,
                item_type,
            });
        }
        let limit = query.top.map(|t| t.saturating_sub(cursor.returned));
        let want = limit.map_or(page_size, |l| page_size.min(l as usize));
        let mut items = Vec::new();
        let mut last_key = None;
        let more = if want == 0 {
            false
        } else {
            self.scan_documents(table, cursor.after.clone(), deadline, |key, doc| {
                if query.matches(&doc) {
                    items.push(query.project(&doc));
                }
                last_key = Some(key.to_string());
                items.len() < want
            })
            .await?
        };
        let returned = cursor.returned.saturating_add(items.len() as u64);
        let top_reached = query.top.is_some_and(|t| returned >= t);
        let continuation = (more && !top_reached).then(|| {
            Cursor {
                after: last_key,
                returned,
            }
            .encode()
        });
        Ok(QueryPage {
            items,
            continuation,
            item_type,
        })
    }

    /// Feeds every document of `table` after `after` to `visit` in key order until it
    /// returns false. Returns whether documents may remain. Past `deadline` the scan stops
    /// with IoT Hub's throttling error; records that cannot be decoded are skipped.
    async fn scan_documents(
        &self,
        table: Table,
        mut after: Option<String>,
        deadline: Instant,
        mut visit: impl FnMut(&str, Value) -> bool,
    ) -> Result<bool> {
        loop {
            if Instant::now() >= deadline {
                return Err(over_budget());
            }
            let batch = self.store.scan(table, after.as_deref(), SCAN_BATCH).await?;
            let full = batch.len() == SCAN_BATCH;
            for (key, bytes) in &batch {
                let doc = match table {
                    Table::Devices | Table::Modules => match DeviceRecord::decode(bytes) {
                        Ok(rec) => {
                            serde_json::to_value(self.render_twin(&rec)).unwrap_or(Value::Null)
                        }
                        Err(_) => continue,
                    },
                    _ => match serde_json::from_slice(bytes) {
                        Ok(doc) => doc,
                        Err(_) => continue,
                    },
                };
                if !visit(key, doc) {
                    // Stopped early: more may follow unless this was the very last key.
                    let last = batch.last().map(|(k, _)| k.as_str()) == Some(key.as_str());
                    return Ok(full || !last);
                }
            }
            match batch.last() {
                Some((k, _)) if full => after = Some(k.clone()),
                _ => return Ok(false),
            }
            // Scans read the store on this task: let other tasks on this worker run.
            tokio::task::yield_now().await;
        }
    }
}

fn over_budget() -> Error {
    Error::new(
        twinhub_proto::error::ErrorCode::ThrottlingException,
        format!(
            "The query did not finish within {} seconds; narrow it or retry later",
            QUERY_BUDGET.as_secs()
        ),
    )
}

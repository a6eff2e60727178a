//! Twin queries (`POST /devices/query`): runs an IoT Hub query over the committed registry
//! (so every write acknowledged before the query is visible), one page at a time. Twins are
//! read from the in-memory twin index (`twin_index`), which holds each one's query document;
//! device jobs from the store. The language itself (parsing, matching, projection,
//! aggregation) is `twinhub-query`.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use twinhub_proto::model::ConnectionState;
use twinhub_query::{Expr, From, Path, Query, Segment, Select};
use twinhub_store::Table;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::record::{DeviceRecord, split_identity};

/// Default and maximum page sizes (`x-ms-max-item-count`).
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Records read from the store per scan step.
const SCAN_BATCH: usize = 512;
/// Twins taken from the index per scan step: the index's lock is held while their handles
/// are copied, and the scan yields to other tasks between steps.
const INDEX_BATCH: usize = 1024;
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
            self.scan_documents(table, &query, None, deadline, |_, doc, _| {
                aggregation.add(doc);
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
            let whole = matches!(query.select, Select::All);
            let twins = indexed(table);
            self.scan_documents(
                table,
                &query,
                cursor.after.clone(),
                deadline,
                |key, doc, full| {
                    if !query.matches(doc) {
                        return true;
                    }
                    if whole {
                        // A whole twin shows its live state, read now.
                        let mut row = full.clone();
                        if twins {
                            self.fill_live(key, &mut row);
                        }
                        items.push(row);
                    } else {
                        items.push(query.project(doc));
                    }
                    // The scan stops only right after a row, so this is where the page ends.
                    last_key = Some(key.to_string());
                    items.len() < want
                },
            )
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
    /// with IoT Hub's throttling error. `visit` gets the document to evaluate `query` over and
    /// the whole document (for `SELECT *` rows): the same one, except for twins when the
    /// query reads live state (see [`LiveUse`]). Twins come from the in-memory index.
    async fn scan_documents(
        &self,
        table: Table,
        query: &Query,
        after: Option<String>,
        deadline: Instant,
        visit: impl FnMut(&str, &Value, &Value) -> bool,
    ) -> Result<bool> {
        if indexed(table) && self.twin_index.reliable() {
            self.scan_index(table, LiveUse::of(query), after, deadline, visit)
                .await
        } else {
            self.scan_store(table, after, deadline, visit).await
        }
    }

    /// [`scan_documents`](Hub::scan_documents) over the twin index: no decoding, no
    /// rendering, and nothing copied unless the query reads live state.
    async fn scan_index(
        &self,
        table: Table,
        live: LiveUse,
        mut after: Option<String>,
        deadline: Instant,
        mut visit: impl FnMut(&str, &Value, &Value) -> bool,
    ) -> Result<bool> {
        loop {
            if Instant::now() >= deadline {
                return Err(over_budget());
            }
            let batch = self.twin_index.batch(table, after.as_deref(), INDEX_BATCH);
            let full = batch.len() == INDEX_BATCH;
            for (i, (key, slot)) in batch.iter().enumerate() {
                // A record that cannot be decoded is skipped, as the store scan skips it.
                let Some(doc) = slot.doc() else { continue };
                let go_on = match &live {
                    LiveUse::None => visit(key, doc, doc),
                    LiveUse::Members(names) => {
                        // Only the members the query names, so the copy stays small.
                        let mut part = match doc {
                            Value::Object(fields) => Value::Object(
                                fields
                                    .iter()
                                    .filter(|(k, _)| {
                                        names.iter().any(|n| n.eq_ignore_ascii_case(k))
                                    })
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect(),
                            ),
                            other => other.clone(),
                        };
                        self.fill_live(key, &mut part);
                        visit(key, &part, doc)
                    }
                    LiveUse::Whole => {
                        let mut whole = doc.clone();
                        self.fill_live(key, &mut whole);
                        visit(key, &whole, doc)
                    }
                };
                if !go_on {
                    // Stopped early: more may follow unless this was the very last key.
                    return Ok(full || i + 1 < batch.len());
                }
            }
            match batch.last() {
                Some((k, _)) if full => after = Some(k.to_string()),
                _ => return Ok(false),
            }
            // A long scan shares its worker with other tasks.
            tokio::task::yield_now().await;
        }
    }

    /// Sets a twin document's `connectionState` and `cloudToDeviceMessageCount` to what they
    /// are now: the record does not hold them, the directory and the C2D queues do.
    fn fill_live(&self, key: &str, doc: &mut Value) {
        let Value::Object(fields) = doc else { return };
        if let Some(state) = fields.get_mut("connectionState") {
            let now = if self.directory.is_connected(key)
                || (self.cluster.is_some() && self.twin_index.node_of(key).is_some())
            {
                ConnectionState::Connected
            } else {
                ConnectionState::Disconnected
            };
            *state = serde_json::to_value(now).unwrap_or(Value::Null);
        }
        if let Some(count) = fields.get_mut("cloudToDeviceMessageCount") {
            // Cloud-to-device queues are a device's; a module has none.
            *count = Value::from(match split_identity(key) {
                (device, None) => self.c2d.depth(device),
                (_, Some(_)) => 0,
            });
        }
    }

    /// [`scan_documents`](Hub::scan_documents) over the store: device jobs, and twins while
    /// the index cannot be trusted. Records that cannot be decoded are skipped.
    async fn scan_store(
        &self,
        table: Table,
        mut after: Option<String>,
        deadline: Instant,
        mut visit: impl FnMut(&str, &Value, &Value) -> bool,
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
                if !visit(key, &doc, &doc) {
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

/// Whether a table's documents are twins (kept in the index, with live state).
fn indexed(table: Table) -> bool {
    matches!(table, Table::Devices | Table::Modules)
}

/// Top-level twin members that are not in the record but live: the directory's connection
/// state and the C2D queue depth.
const LIVE_FIELDS: [&str; 2] = ["connectionState", "cloudToDeviceMessageCount"];

/// Whether evaluating a query (WHERE, GROUP BY, the selected values) reads live state, and
/// so needs it filled in on every twin it looks at. `SELECT *` rows get it separately, only
/// for the rows returned.
enum LiveUse {
    /// No path names a live field: the stored documents serve as they are.
    None,
    /// The query's paths start at these top-level members (some live): each twin is
    /// evaluated over a copy of just those members, live ones filled in.
    Members(Vec<String>),
    /// A path that does not start at a member: the whole twin, filled in.
    Whole,
}

impl LiveUse {
    fn of(query: &Query) -> LiveUse {
        let mut names: Vec<String> = Vec::new();
        let mut whole = false;
        let mut look = |path: &Path| match path.segments.first() {
            Some(Segment::Field(first)) => {
                if !names.iter().any(|n| n == first) {
                    names.push(first.clone());
                }
            }
            _ => whole = true,
        };
        if let Some(filter) = &query.where_ {
            visit_paths(filter, &mut look);
        }
        if let Select::Items(items) = &query.select {
            for item in items {
                visit_paths(&item.expr, &mut look);
            }
        }
        for path in &query.group_by {
            look(path);
        }
        // Names match ignoring ASCII case, as the evaluator's do.
        let live = names
            .iter()
            .any(|n| LIVE_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(n)));
        match (whole, live) {
            (true, _) => LiveUse::Whole,
            (false, true) => LiveUse::Members(names),
            (false, false) => LiveUse::None,
        }
    }
}

/// Calls `f` with every path in `expr`.
fn visit_paths(expr: &Expr, f: &mut impl FnMut(&Path)) {
    match expr {
        Expr::Literal(_) => {}
        Expr::Path(path) => f(path),
        Expr::Array(items) | Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
            for e in items {
                visit_paths(e, f);
            }
        }
        Expr::Unary(_, e) => visit_paths(e, f),
        Expr::Binary(_, l, r) => {
            visit_paths(l, f);
            visit_paths(r, f);
        }
        Expr::In { expr, list, .. } => {
            visit_paths(expr, f);
            for e in list {
                visit_paths(e, f);
            }
        }
        Expr::Aggregate(_, arg) => {
            if let Some(e) = arg {
                visit_paths(e, f);
            }
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

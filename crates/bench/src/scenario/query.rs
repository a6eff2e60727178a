//! `query`: twin queries over a large fleet, on a hub of its own. Registers the twins in bulk
//! (100 per call, several calls at once) with their tags and a reported property in the
//! import, then times, each several times: the first page of a selective
//! `SELECT * ... WHERE tags.site = 'rare'` (1 twin in 100, the default page size), a full
//! `SELECT COUNT()`, a `GROUP BY tags.region` (10 values), and a query sent right after a
//! twin PATCH, which must see the patch (read-your-writes; a miss is an error, not a slow
//! sample). There is no Mosquitto equivalent: the figures are absolute times against the
//! issue's aims. The hub's resident memory is read before and after registering and after
//! the queries, so an index's cost per twin shows.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use twinhub_proto::model::{ExportImportDevice, TwinProperties};
use twinhub_sdk::ServiceClient;

use super::Ctx;
use crate::error::{Error, Result};
use crate::hub::{self, Hub, Launch};
use crate::machine::rss_bytes;
use crate::report::TargetCheck;

/// Devices per bulk call (the hub's and IoT Hub's limit).
const BULK_CHUNK: usize = 100;
/// One twin in this many gets `tags.site = 'rare'`.
const RARE_EVERY: usize = 100;
/// Distinct `tags.region` values.
pub const REGIONS: usize = 10;
/// Distinct `properties.reported.fw` values.
const FIRMWARES: usize = 4;

/// The hub's page size when a query names none (`x-ms-max-item-count` absent).
const DEFAULT_PAGE: usize = 100;

/// The aims, in milliseconds.
pub const SELECTIVE_PAGE_AIM_MS: f64 = 20.0;
pub const AGGREGATE_AIM_MS: f64 = 100.0;

pub const SELECTIVE: &str = "SELECT * FROM devices WHERE tags.site = 'rare'";
pub const COUNT: &str = "SELECT COUNT() AS n FROM devices";
pub const GROUP_BY: &str =
    "SELECT tags.region AS region, COUNT() AS n FROM devices GROUP BY tags.region";

/// How the phase is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub twins: usize,
    /// Timed runs of each query.
    pub repetitions: usize,
    /// Bulk calls in flight while registering.
    pub bulk_concurrency: usize,
}

/// Times of one query over its repetitions, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub runs: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Every run in order, so a reader sees warm-up or drift.
    pub samples_ms: Vec<f64>,
}

impl Timing {
    fn of(samples: &[Duration]) -> Timing {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank: with few runs p99 is the slowest one.
        let rank = |p: f64| -> f64 {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i]
        };
        Timing {
            runs: ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            min_ms: sorted.first().copied().unwrap_or(0.0),
            max_ms: sorted.last().copied().unwrap_or(0.0),
            samples_ms: ms,
        }
    }
}

/// What the query phase measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryRun {
    pub twins: usize,
    /// Twins with `tags.site = 'rare'`.
    pub rare: usize,
    pub regions: usize,
    pub registration_seconds: f64,
    pub registration_per_second: f64,
    /// The first query after the import (a full COUNT): whatever the hub defers from its
    /// writes to its first read shows here.
    pub first_query_ms: f64,
    pub selective_first_page: Timing,
    /// Rows of the selective first page (the default page size, 100).
    pub selective_rows: usize,
    pub count: Timing,
    pub group_by: Timing,
    /// A PATCH of one twin's tags, then at once a query that must return that twin.
    pub read_your_writes: Timing,
    /// The PATCHes themselves.
    pub patch: Timing,
    /// Queries right after a PATCH that did not see it. Must be 0.
    pub read_your_writes_misses: usize,
    pub server_rss_before: Option<u64>,
    pub server_rss_registered: Option<u64>,
    pub server_rss_after: Option<u64>,
    /// (after the queries - before registering) / twins: everything the hub keeps per twin
    /// (store cache included), not only a query index.
    pub server_rss_per_twin: Option<f64>,
}

fn query_device(i: usize) -> String {
    format!("q-{i:06}")
}

fn region(i: usize) -> String {
    format!("region-{}", i % REGIONS)
}

fn import_op(i: usize) -> ExportImportDevice {
    let mut tags = Map::new();
    tags.insert("region".into(), Value::from(region(i)));
    let site = if i.is_multiple_of(RARE_EVERY) {
        "rare"
    } else {
        "common"
    };
    tags.insert("site".into(), Value::from(site));
    let mut reported = Map::new();
    reported.insert("fw".into(), Value::from(format!("1.{}", i % FIRMWARES)));
    ExportImportDevice {
        tags: Some(tags),
        properties: Some(TwinProperties {
            desired: Map::new(),
            reported,
        }),
        ..hub::create_with_shared_key(query_device(i))
    }
}

/// Imports twins `0..count` with their tags and reported property, `concurrency` bulk calls
/// at a time.
async fn import(
    service: &ServiceClient,
    count: usize,
    concurrency: usize,
    ctx: &Ctx,
) -> Result<Duration> {
    let started = Instant::now();
    let bar = ctx.progress.bar("query: importing twins", count as u64);
    let mut chunks = (0..count).step_by(BULK_CHUNK);
    let mut calls = JoinSet::new();
    loop {
        while calls.len() < concurrency.max(1) {
            let Some(first) = chunks.next() else { break };
            let ops: Vec<_> = (first..count.min(first + BULK_CHUNK))
                .map(import_op)
                .collect();
            let service = service.clone();
            calls.spawn(async move {
                let result = service.bulk(&ops).await?;
                match result.errors.first() {
                    None if result.is_successful => Ok(ops.len()),
                    first => Err(Error::Setup(format!(
                        "importing {} twins failed ({} errors; first {:?})",
                        ops.len(),
                        result.errors.len(),
                        first.map(|e| (&e.device_id, &e.error_code))
                    ))),
                }
            });
        }
        let Some(done) = calls.join_next().await else {
            break;
        };
        let n = done.map_err(|e| Error::Setup(format!("an import task failed: {e}")))??;
        bar.inc(n as u64);
    }
    bar.finish();
    Ok(started.elapsed())
}

/// One page of `text` with the default page size, timed.
async fn page(service: &ServiceClient, text: &str) -> Result<(Duration, Vec<Value>)> {
    let started = Instant::now();
    let page = service.query(text).next_page().await?;
    let took = started.elapsed();
    Ok((took, page.map(|p| p.items).unwrap_or_default()))
}

fn count_of(rows: &[Value]) -> Option<u64> {
    rows.first()?.get("n")?.as_u64()
}

/// Runs the phase on a hub of its own under `dir`.
pub async fn run(
    launch: &Launch,
    dir: &std::path::Path,
    ctx: &Ctx,
    shape: Shape,
) -> Result<QueryRun> {
    ctx.progress.note("query: starting a hub of its own");
    let hub = Hub::start_with_options(launch, dir, &hub::Options::default()).await?;
    let outcome = measure(&hub, ctx, shape).await;
    hub.stop().await;
    outcome
}

async fn measure(hub: &Hub, ctx: &Ctx, shape: Shape) -> Result<QueryRun> {
    let service = hub.service()?;
    let rss = || hub.pid().and_then(rss_bytes);
    let twins = shape.twins.max(1);
    let mut run = QueryRun {
        twins,
        rare: (0..twins).filter(|i| i.is_multiple_of(RARE_EVERY)).count(),
        regions: REGIONS.min(twins),
        server_rss_before: rss(),
        ..QueryRun::default()
    };
    let took = import(&service, twins, shape.bulk_concurrency, ctx).await?;
    run.registration_seconds = took.as_secs_f64();
    run.registration_per_second = twins as f64 / took.as_secs_f64().max(1e-9);
    run.server_rss_registered = rss();

    let (first, rows) = page(&service, COUNT).await?;
    run.first_query_ms = first.as_secs_f64() * 1000.0;
    check_count(&rows, twins as u64, "the first COUNT()")?;

    let reps = shape.repetitions.max(1);
    ctx.progress.note(&format!(
        "query: {reps} runs of each query over {twins} twins"
    ));
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (t, rows) = page(&service, SELECTIVE).await?;
        let want = run.rare.min(DEFAULT_PAGE);
        if rows.len() != want
            || rows
                .iter()
                .any(|r| r.pointer("/tags/site").and_then(Value::as_str) != Some("rare"))
        {
            return Err(Error::Setup(format!(
                "the selective page has {} rows, {want} expected, or a row without the tag",
                rows.len()
            )));
        }
        run.selective_rows = rows.len();
        samples.push(t);
    }
    run.selective_first_page = Timing::of(&samples);

    samples.clear();
    for _ in 0..reps {
        let (t, rows) = page(&service, COUNT).await?;
        check_count(&rows, twins as u64, "COUNT()")?;
        samples.push(t);
    }
    run.count = Timing::of(&samples);

    samples.clear();
    for _ in 0..reps {
        let (t, rows) = page(&service, GROUP_BY).await?;
        let total: u64 = rows
            .iter()
            .filter_map(|r| r.get("n").and_then(Value::as_u64))
            .sum();
        if rows.len() != run.regions || total != twins as u64 {
            return Err(Error::Setup(format!(
                "GROUP BY tags.region gave {} groups over {total} twins, {} groups over {twins} \
                 expected",
                rows.len(),
                run.regions
            )));
        }
        samples.push(t);
    }
    run.group_by = Timing::of(&samples);

    // Read-your-writes: each PATCH gives one twin a fresh tag value, and the query sent the
    // moment the 200 arrives must find exactly that twin.
    let mut patches = Vec::with_capacity(reps);
    samples.clear();
    for r in 0..reps {
        let id = query_device((r * 7919 + 1) % twins);
        let value = format!("probe-{r}-{}", std::process::id());
        let started = Instant::now();
        service
            .update_twin(&id, &json!({"tags": {"probe": value}}), None)
            .await?;
        patches.push(started.elapsed());
        let (t, rows) = page(
            &service,
            &format!("SELECT * FROM devices WHERE tags.probe = '{value}'"),
        )
        .await?;
        let seen =
            rows.len() == 1 && rows[0].get("deviceId").and_then(Value::as_str) == Some(id.as_str());
        if !seen {
            run.read_your_writes_misses += 1;
        }
        samples.push(t);
    }
    run.read_your_writes = Timing::of(&samples);
    run.patch = Timing::of(&patches);
    run.server_rss_after = rss();
    run.server_rss_per_twin = match (run.server_rss_before, run.server_rss_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / twins as f64),
        _ => None,
    };
    if run.read_your_writes_misses > 0 {
        ctx.progress.note(&format!(
            "query: {} of {reps} queries right after a PATCH did not see it",
            run.read_your_writes_misses
        ));
    }
    Ok(run)
}

/// The phase's lines for the printed table (absolute figures: there is no peer).
pub fn table(q: &QueryRun) -> String {
    let mut out = format!(
        "query: {} twins on a hub of their own ({} with tags.site = 'rare', {} regions), \
         imported in {:.1} s ({:.0} twins/s); median and p99 of {} runs each\n",
        q.twins, q.rare, q.regions, q.registration_seconds, q.registration_per_second, q.count.runs
    );
    let mut row = |what: &str, t: &Timing, aim: Option<f64>| {
        let aim = aim.map_or(String::new(), |a| format!("aim <= {a:.0} ms"));
        out.push_str(&format!(
            "  {what:<44} p50 {:>9.3} ms  p99 {:>9.3} ms  {aim}\n",
            t.p50_ms, t.p99_ms
        ));
    };
    row(
        "selective first page (100 rows)",
        &q.selective_first_page,
        Some(SELECTIVE_PAGE_AIM_MS),
    );
    row("SELECT COUNT()", &q.count, Some(AGGREGATE_AIM_MS));
    row("GROUP BY tags.region", &q.group_by, Some(AGGREGATE_AIM_MS));
    row("twin PATCH", &q.patch, None);
    row("query right after the PATCH", &q.read_your_writes, None);
    out.push_str(&format!(
        "  {:<44} {:.3} ms\n  {:<44} {}\n",
        "first query after the import (COUNT)",
        q.first_query_ms,
        "queries that missed the PATCH before them",
        q.read_your_writes_misses
    ));
    if let (Some(b), Some(r), Some(a)) = (
        q.server_rss_before,
        q.server_rss_registered,
        q.server_rss_after,
    ) {
        let mib = |x: u64| x as f64 / (1024.0 * 1024.0);
        out.push_str(&format!(
            "  {:<44} {:.0} -> {:.0} -> {:.0} MiB ({:.0} bytes per twin)\n",
            "hub RSS: empty -> imported -> after queries",
            mib(b),
            mib(r),
            mib(a),
            q.server_rss_per_twin.unwrap_or(0.0)
        ));
    }
    out
}

/// The aims, judged at the fleet size measured (named in the goal).
pub fn targets(q: &QueryRun) -> Vec<TargetCheck> {
    let check = |goal: String, t: &Timing, aim: f64| TargetCheck {
        goal,
        measured: format!("p50 {:.3} ms, p99 {:.3} ms", t.p50_ms, t.p99_ms),
        met: Some(t.p50_ms <= aim),
    };
    vec![
        check(
            format!(
                "selective query first page over {} twins p50 <= {SELECTIVE_PAGE_AIM_MS} ms",
                q.twins
            ),
            &q.selective_first_page,
            SELECTIVE_PAGE_AIM_MS,
        ),
        check(
            format!(
                "COUNT() over {} twins p50 <= {AGGREGATE_AIM_MS} ms",
                q.twins
            ),
            &q.count,
            AGGREGATE_AIM_MS,
        ),
        check(
            format!(
                "GROUP BY over {} twins p50 <= {AGGREGATE_AIM_MS} ms",
                q.twins
            ),
            &q.group_by,
            AGGREGATE_AIM_MS,
        ),
        TargetCheck {
            goal: "a query right after a twin PATCH's 200 sees it (read-your-writes)".into(),
            measured: format!(
                "{} of {} missed",
                q.read_your_writes_misses, q.read_your_writes.runs
            ),
            met: Some(q.read_your_writes_misses == 0 && q.read_your_writes.runs > 0),
        },
    ]
}

fn check_count(rows: &[Value], want: u64, what: &str) -> Result<()> {
    match count_of(rows) {
        Some(n) if n == want => Ok(()),
        got => Err(Error::Setup(format!(
            "{what} gave {got:?}, {want} expected (rows {rows:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let t = Timing::of(&[3, 1, 2, 10].map(Duration::from_millis));
        assert_eq!(t.runs, 4);
        assert_eq!(t.p50_ms, 2.0);
        assert_eq!(t.p99_ms, 10.0);
        assert_eq!(t.min_ms, 1.0);
        assert_eq!(t.max_ms, 10.0);
        assert_eq!(t.samples_ms, vec![3.0, 1.0, 2.0, 10.0]);
    }

    #[test]
    fn the_fleet_is_spread_as_documented() {
        let ops: Vec<_> = (0..1000).map(import_op).collect();
        let rare = ops
            .iter()
            .filter(|o| o.tags.as_ref().unwrap()["site"] == "rare")
            .count();
        assert_eq!(rare, 10);
        let regions: std::collections::BTreeSet<_> = ops
            .iter()
            .map(|o| o.tags.as_ref().unwrap()["region"].to_string())
            .collect();
        assert_eq!(regions.len(), REGIONS);
    }
}

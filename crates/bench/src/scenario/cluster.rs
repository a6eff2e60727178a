//! `cluster`: what sharing state costs. Starts a private PostgreSQL and a private nats-server
//! (twinhub-testsvc: Debian's binaries on loopback, stopped and removed at the end), then
//!
//! 1. one node on PostgreSQL (`--store`, no `--cluster`) against one node on the embedded
//!    store, same settings, in alternating phases: the `methods` closed loop at each of
//!    `concurrency`, and the `twin` durable reported-patch loop;
//! 2. a two-node cluster (`--store` on a fresh database of the same server, `--cluster`, node
//!    ids `a` and `b`) with every device's session on node a: the methods loop with the REST
//!    callers on node a (same node) and on node b (cross node: b forwards each call to a over
//!    NATS request/reply), alternating, at each of `latency_concurrency`.
//!
//! Every window reads the CPU (utime + stime from /proc) of each hub process, of PostgreSQL
//! (the postmaster and its backends) and of nats-server, so each figure comes with its CPU per
//! operation on each process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::{Ctx, Flavor, Target, Watched, methods, twin, wait_quiet};
use crate::error::{Error, Result};
use crate::hub::{self, Hub, Launch};
use crate::stats::Throughput;
use crate::tls;
use twinhub_testsvc::nats::NatsServer;
use twinhub_testsvc::postgres::PgServer;

/// Names of the watched processes in the report.
pub const NODE_A: &str = "node a";
pub const NODE_B: &str = "node b";
pub const HUB: &str = "hub";
pub const POSTGRES: &str = "postgresql";
pub const NATS: &str = "nats-server";

/// How the scenario is shaped.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Devices answering methods.
    pub devices: usize,
    pub caller_conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Callers of the single-node methods phases (PostgreSQL against embedded).
    pub concurrency: Vec<usize>,
    /// Callers of the same-node / cross-node phases.
    pub latency_concurrency: Vec<usize>,
    pub twin_devices: usize,
    pub twin_inflight: usize,
    pub twin_duration: Duration,
    pub partitions: u32,
    /// Longest wait for other load on the machine to pass before each phase.
    pub quiet_wait: Duration,
}

/// Two figures of the same phase and their ratio.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Compared {
    /// Callers (methods) or devices (twin).
    pub concurrency: usize,
    /// PostgreSQL node (part 1) or cross node (part 2).
    pub first: Option<Throughput>,
    /// Embedded node (part 1) or same node (part 2).
    pub second: Option<Throughput>,
    pub ratios: Ratios,
}

/// first / second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    pub per_second: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// The CPU per operation of every watched process together.
    pub cpu_us_per_op: Option<f64>,
}

impl Compared {
    fn new(concurrency: usize, first: Option<Throughput>, second: Option<Throughput>) -> Self {
        let r = |f: fn(&Throughput) -> Option<f64>| {
            let (a, b) = (f(first.as_ref()?)?, f(second.as_ref()?)?);
            (b > 0.0).then(|| a / b)
        };
        let ratios = Ratios {
            per_second: r(|t| Some(t.per_second)),
            p50: r(|t| Some(t.latency.p50_us as f64)),
            p99: r(|t| Some(t.latency.p99_us as f64)),
            cpu_us_per_op: r(total_us_per_op),
        };
        Compared {
            concurrency,
            first,
            second,
            ratios,
        }
    }
}

/// CPU microseconds per operation of every watched process together.
pub fn total_us_per_op(t: &Throughput) -> Option<f64> {
    if t.processes.is_empty() {
        return None;
    }
    t.processes.iter().map(|p| p.us_per_op).sum()
}

/// Everything the scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterRun {
    pub postgresql: Option<String>,
    pub nats_server: Option<String>,
    pub devices: usize,
    pub twin_devices: usize,
    pub twin_inflight: usize,
    pub caller_conns: usize,
    /// Part 1, methods: `first` = the node on PostgreSQL, `second` = the embedded node.
    pub single_methods: Vec<Compared>,
    /// Part 1, durable reported patches: `first` = PostgreSQL, `second` = embedded.
    pub single_twin: Option<Compared>,
    /// Part 2, methods on a two-node cluster: `first` = cross node (callers on node b, devices
    /// on node a), `second` = same node (callers and devices on node a).
    pub nodes: Vec<Compared>,
}

/// A started hub with what the bench needs to drive it.
struct Node {
    hub: Hub,
    ctx: Ctx,
    services: Vec<twinhub_sdk::ServiceClient>,
}

impl Node {
    async fn start(
        launch: &Launch,
        dir: &Path,
        options: &hub::Options,
        caller_conns: usize,
        ctx: &Ctx,
    ) -> Result<Node> {
        let hub = Hub::start_with_options(launch, dir, options).await?;
        let services = (0..caller_conns.max(1))
            .map(|_| hub.service())
            .collect::<Result<Vec<_>>>()?;
        let ctx = Ctx {
            tls: tls::Client::new(hub.ca_pem.as_bytes())?,
            progress: ctx.progress.clone(),
        };
        Ok(Node { hub, ctx, services })
    }

    /// A target whose devices connect to this node and whose callers call `callers`.
    fn target(&self, name: &'static str, callers: &Node, watch: &[Watched]) -> Target {
        Target {
            name,
            mqtt_addr: self.hub.mqtt_addr,
            pid: callers.hub.pid(),
            flavor: Flavor::Hub {
                services: callers.services.clone(),
            },
            watch: watch.to_vec(),
        }
    }

    fn watched(&self, name: &str) -> Option<Watched> {
        Some(Watched {
            name: name.into(),
            pid: self.hub.pid()?,
            tree: false,
        })
    }
}

/// Runs a blocking test-service call off the runtime; its panics become errors.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        let why = e
            .try_into_panic()
            .ok()
            .and_then(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
            })
            .unwrap_or_else(|| "it failed".into());
        Error::Setup(format!("{what}: {why}"))
    })
}

/// The postmaster of the testsvc cluster listening on `port`, from its `postmaster.pid`
/// (pid on line 1, port on line 4) under the temp dirs testsvc uses.
fn postmaster_pid(port: u16) -> Option<u32> {
    let mut bases = vec![PathBuf::from("/tmp"), std::env::temp_dir()];
    bases.dedup();
    for base in bases {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("twinhub-pg-")
            {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path().join("data/postmaster.pid")) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            if lines.get(3).and_then(|l| l.trim().parse::<u16>().ok()) == Some(port) {
                return lines.first().and_then(|l| l.trim().parse().ok());
            }
        }
    }
    None
}

/// The nats-server process started with `dir/nats.conf`.
fn nats_pid(dir: &Path) -> Option<u32> {
    let conf = dir.join("nats.conf");
    let conf = conf.to_str()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "nats-server" {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg == conf.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn nats_version(pid: u32) -> Option<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|v| !v.is_empty())
}

async fn settle(shape: &Shape, ctx: &Ctx, notes: &mut Vec<String>, phase: &str) {
    if shape.quiet_wait.is_zero() {
        return;
    }
    if let Some(busy) = wait_quiet(&ctx.progress, shape.quiet_wait).await {
        notes.push(format!(
            "cluster {phase}: the machine was still {busy:.2} cores busy with other work \
             before the phase; see the 'other+steal cores' rows"
        ));
    }
}

/// One methods phase at `c` callers; an error becomes a note and an empty side.
async fn methods_at(
    ctx: &Ctx,
    target: &Target,
    shape: &Shape,
    c: usize,
    notes: &mut Vec<String>,
) -> Option<Throughput> {
    let m = methods::Shape {
        devices: shape.devices.max(1),
        concurrency: c,
        caller_conns: shape.caller_conns.max(1),
        warmup: shape.warmup,
        duration: shape.duration,
    };
    match methods::run(ctx, target, m, &[c]).await {
        Ok(mut rows) => rows.pop().map(|(_, t)| t),
        Err(e) => {
            notes.push(format!("cluster {} methods C={c} failed: {e}", target.name));
            None
        }
    }
}

/// Runs the scenario in `work_dir`; the services and hubs it starts are stopped before it
/// returns.
pub async fn run(
    launch: &Launch,
    work_dir: &Path,
    ctx: &Ctx,
    shape: &Shape,
    notes: &mut Vec<String>,
) -> Result<ClusterRun> {
    ctx.progress
        .note("cluster: starting PostgreSQL and nats-server");
    let pg = blocking("starting PostgreSQL (testsvc)", PgServer::start).await?;
    let nats = match blocking("starting nats-server (testsvc)", NatsServer::start).await {
        Ok(n) => n,
        Err(e) => {
            blocking("stopping PostgreSQL", move || drop(pg)).await?;
            return Err(e);
        }
    };
    let outcome = with_services(launch, work_dir, ctx, shape, notes, &pg, &nats).await;
    blocking("stopping nats-server and PostgreSQL", move || {
        drop(nats);
        drop(pg);
    })
    .await?;
    outcome
}

async fn with_services(
    launch: &Launch,
    work_dir: &Path,
    ctx: &Ctx,
    shape: &Shape,
    notes: &mut Vec<String>,
    pg: &PgServer,
    nats: &NatsServer,
) -> Result<ClusterRun> {
    let mut run = ClusterRun {
        devices: shape.devices,
        twin_devices: shape.twin_devices,
        twin_inflight: shape.twin_inflight,
        caller_conns: shape.caller_conns,
        ..ClusterRun::default()
    };
    run.postgresql = Some(
        pg.execute("postgres", "SHOW server_version")
            .trim()
            .to_string(),
    );
    let pg_watch = postmaster_pid(pg.port()).map(|pid| Watched {
        name: POSTGRES.into(),
        pid,
        tree: true,
    });
    if pg_watch.is_none() {
        notes.push("cluster: PostgreSQL's postmaster was not found: no PostgreSQL CPU".into());
    }
    let nats_pid = nats_pid(nats.dir());
    run.nats_server = nats_pid.and_then(nats_version);
    let nats_watch = nats_pid.map(|pid| Watched {
        name: NATS.into(),
        pid,
        tree: false,
    });
    if nats_watch.is_none() {
        notes.push("cluster: the nats-server process was not found: no NATS CPU".into());
    }
    let registered = shape.devices.max(shape.twin_devices).max(1);

    // Part 1: one node on PostgreSQL against one node on the embedded store.
    let db = pg.fresh_database();
    let base = hub::Options {
        partitions: Some(shape.partitions),
        ..hub::Options::default()
    };
    ctx.progress
        .note("cluster: starting a hub on the embedded store");
    let embedded = Node::start(
        launch,
        &work_dir.join("cluster-embedded"),
        &base,
        shape.caller_conns,
        ctx,
    )
    .await?;
    ctx.progress.note("cluster: starting a hub on PostgreSQL");
    let on_pg = match Node::start(
        launch,
        &work_dir.join("cluster-postgres"),
        &hub::Options {
            store: Some(db.url()),
            ..base.clone()
        },
        shape.caller_conns,
        ctx,
    )
    .await
    {
        Ok(n) => n,
        Err(e) => {
            embedded.hub.stop().await;
            return Err(e);
        }
    };
    let part1 = async {
        for node in [&embedded, &on_pg] {
            hub::register_devices(&node.services[0], registered, &ctx.progress).await?;
        }
        let watch = |n: &Node| {
            n.watched(HUB)
                .into_iter()
                .chain(pg_watch.clone())
                .collect::<Vec<_>>()
        };
        let t_emb = embedded.target("embedded", &embedded, &watch(&embedded));
        let t_pg = on_pg.target("postgres", &on_pg, &watch(&on_pg));
        for &c in &shape.concurrency {
            settle(shape, ctx, notes, &format!("embedded methods C={c}")).await;
            let e = methods_at(&embedded.ctx, &t_emb, shape, c, notes).await;
            settle(shape, ctx, notes, &format!("postgres methods C={c}")).await;
            let p = methods_at(&on_pg.ctx, &t_pg, shape, c, notes).await;
            run.single_methods.push(Compared::new(c, p, e));
        }
        let tw = twin::Shape {
            devices: shape.twin_devices.max(1),
            inflight: shape.twin_inflight.max(1),
            warmup: shape.warmup,
            duration: shape.twin_duration,
        };
        settle(shape, ctx, notes, "embedded twin").await;
        let e = twin::run(&embedded.ctx, &t_emb, tw).await;
        settle(shape, ctx, notes, "postgres twin").await;
        let p = twin::run(&on_pg.ctx, &t_pg, tw).await;
        for (name, r) in [("embedded", &e), ("postgres", &p)] {
            if let Err(err) = r {
                notes.push(format!("cluster {name} twin failed: {err}"));
            }
        }
        run.single_twin = Some(Compared::new(tw.devices, p.ok(), e.ok()));
        Ok::<_, Error>(())
    }
    .await;
    embedded.hub.stop().await;
    on_pg.hub.stop().await;
    drop(db);
    part1?;

    // Part 2: two nodes sharing a fresh database and NATS; devices on node a.
    let db = pg.fresh_database();
    let node_options = |id: &str| hub::Options {
        store: Some(db.url()),
        cluster: Some(nats.url()),
        node_id: Some(id.into()),
        ..base.clone()
    };
    ctx.progress.note("cluster: starting nodes a and b");
    let a = Node::start(
        launch,
        &work_dir.join("cluster-node-a"),
        &node_options("a"),
        shape.caller_conns,
        ctx,
    )
    .await?;
    let b = match Node::start(
        launch,
        &work_dir.join("cluster-node-b"),
        &node_options("b"),
        shape.caller_conns,
        ctx,
    )
    .await
    {
        Ok(n) => n,
        Err(e) => {
            a.hub.stop().await;
            return Err(e);
        }
    };
    let part2 = async {
        hub::register_devices(&a.services[0], shape.devices.max(1), &ctx.progress).await?;
        let watch: Vec<Watched> = a
            .watched(NODE_A)
            .into_iter()
            .chain(b.watched(NODE_B))
            .chain(pg_watch.clone())
            .chain(nats_watch.clone())
            .collect();
        let same = a.target("same-node", &a, &watch);
        let cross = a.target("cross-node", &b, &watch);
        let settle_wait = Duration::from_secs(30);
        for &c in &shape.latency_concurrency {
            settle(shape, ctx, notes, &format!("same-node methods C={c}")).await;
            let s = methods_at(&a.ctx, &same, shape, c, notes).await;
            if let Err(e) = hub::wait_disconnected(&a.services[0], settle_wait).await {
                notes.push(format!("cluster: after same-node C={c}: {e}"));
            }
            settle(shape, ctx, notes, &format!("cross-node methods C={c}")).await;
            let x = methods_at(&a.ctx, &cross, shape, c, notes).await;
            if let Err(e) = hub::wait_disconnected(&a.services[0], settle_wait).await {
                notes.push(format!("cluster: after cross-node C={c}: {e}"));
            }
            run.nodes.push(Compared::new(c, x, s));
        }
        Ok::<_, Error>(())
    }
    .await;
    a.hub.stop().await;
    b.hub.stop().await;
    drop(db);
    part2?;
    Ok(run)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(String::new, |r| format!("{r:.2}x"))
}

/// The scenario's table: PostgreSQL against embedded, cross node against same node.
pub fn table(r: &ClusterRun) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster: PostgreSQL {}, {}; {} devices answer methods, callers over {} HTTP/2 \
         connections; us/op = CPU microseconds of the process per operation over the window \
         (postgresql: the postmaster and its backends)",
        r.postgresql.as_deref().unwrap_or("?"),
        r.nats_server.as_deref().unwrap_or("nats-server ?"),
        r.devices,
        r.caller_conns
    );
    type Pick = fn(&Throughput) -> Option<f64>;
    let rows =
        |out: &mut String, label: &str, c: &Compared, picks: &[(&str, Pick, usize, bool)]| {
            for (i, (name, pick, digits, with_ratio)) in picks.iter().enumerate() {
                let a = c.first.as_ref().and_then(pick);
                let b = c.second.as_ref().and_then(pick);
                let rt = match (a, b) {
                    (Some(a), Some(b)) if *with_ratio && b > 0.0 => ratio(Some(a / b)),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {:<12} {:<24} {:>12} {:>12} {:>9}",
                    if i == 0 { label } else { "" },
                    name,
                    cell(a, *digits),
                    cell(b, *digits),
                    rt
                );
            }
        };
    let other: Pick = |t| {
        let c = t.cpu?;
        Some(c.other_cores()? + c.steal_cores.unwrap_or(0.0))
    };
    let proc_us = |name: &'static str| -> Pick {
        match name {
            HUB => |t| t.process(HUB)?.us_per_op,
            NODE_A => |t| t.process(NODE_A)?.us_per_op,
            NODE_B => |t| t.process(NODE_B)?.us_per_op,
            POSTGRES => |t| t.process(POSTGRES)?.us_per_op,
            _ => |t| t.process(NATS)?.us_per_op,
        }
    };
    if !r.single_methods.is_empty() || r.single_twin.is_some() {
        let _ = writeln!(
            out,
            "\none node on PostgreSQL (--store, group commit) against one node on the embedded \
             store, same settings\n  {:<12} {:<24} {:>12} {:>12} {:>9}",
            "", "", "postgres", "embedded", "ratio"
        );
        let single: Vec<(&str, Pick, usize, bool)> = vec![
            ("ops/s", |t| Some(t.per_second), 0, true),
            ("p50 ms", |t| Some(ms(t.latency.p50_us)), 3, true),
            ("p99 ms", |t| Some(ms(t.latency.p99_us)), 3, true),
            ("hub CPU us/op", proc_us(HUB), 1, true),
            ("postgresql CPU us/op", proc_us(POSTGRES), 1, false),
            ("all CPU us/op", total_us_per_op, 1, true),
            ("bench CPU cores", |t| t.cpu?.client_cores, 2, false),
            ("other+steal cores", other, 2, false),
            ("errors", |t| Some(t.errors as f64), 0, false),
        ];
        for c in &r.single_methods {
            rows(
                &mut out,
                &format!("methods C={}", c.concurrency),
                c,
                &single,
            );
        }
        if let Some(c) = &r.single_twin {
            rows(&mut out, &format!("twin x{}", r.twin_devices), c, &single);
        }
    }
    if !r.nodes.is_empty() {
        let _ = writeln!(
            out,
            "\ntwo-node cluster (PostgreSQL + NATS), devices' sessions on node a; callers on \
             node b (cross node: forwarded over NATS) or node a (same node)\n  {:<12} {:<24} \
             {:>12} {:>12} {:>9}",
            "", "", "cross node", "same node", "ratio"
        );
        let picks: Vec<(&str, Pick, usize, bool)> = vec![
            ("calls/s", |t| Some(t.per_second), 0, true),
            ("p50 ms", |t| Some(ms(t.latency.p50_us)), 3, true),
            ("p90 ms", |t| Some(ms(t.latency.p90_us)), 3, true),
            ("p99 ms", |t| Some(ms(t.latency.p99_us)), 3, true),
            ("p99.9 ms", |t| Some(ms(t.latency.p999_us)), 3, true),
            ("node a (devices) us/op", proc_us(NODE_A), 1, true),
            ("node b (callers) us/op", proc_us(NODE_B), 1, false),
            ("postgresql us/op", proc_us(POSTGRES), 1, false),
            ("nats-server us/op", proc_us(NATS), 1, false),
            ("all CPU us/op", total_us_per_op, 1, true),
            ("bench CPU cores", |t| t.cpu?.client_cores, 2, false),
            ("other+steal cores", other, 2, false),
            ("errors", |t| Some(t.errors as f64), 0, false),
        ];
        for c in &r.nodes {
            rows(&mut out, &format!("C={}", c.concurrency), c, &picks);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ProcessCpu;

    #[test]
    fn ratios_are_first_over_second_and_cpu_sums_every_process() {
        let t = |per_second: f64, p50_us: u64, us: &[f64]| Throughput {
            per_second,
            latency: crate::stats::Latency {
                p50_us,
                p99_us: p50_us * 2,
                ..Default::default()
            },
            processes: us
                .iter()
                .enumerate()
                .map(|(i, u)| ProcessCpu {
                    name: format!("p{i}"),
                    cores: 0.5,
                    us_per_op: Some(*u),
                })
                .collect(),
            ..Default::default()
        };
        let c = Compared::new(
            1,
            Some(t(500.0, 2000, &[100.0, 50.0])),
            Some(t(1000.0, 1000, &[75.0])),
        );
        assert_eq!(c.ratios.per_second, Some(0.5));
        assert_eq!(c.ratios.p50, Some(2.0));
        assert_eq!(c.ratios.p99, Some(2.0));
        assert_eq!(c.ratios.cpu_us_per_op, Some(2.0));
        let text = table(&ClusterRun {
            nodes: vec![c],
            ..ClusterRun::default()
        });
        assert!(text.contains("cross node"), "{text}");
        assert!(text.contains("0.50x"), "{text}");
    }

    #[test]
    fn a_process_tree_counts_its_children() {
        let me = std::process::id();
        let alone = Watched {
            name: "me".into(),
            pid: me,
            tree: false,
        };
        let tree = Watched {
            tree: true,
            ..alone.clone()
        };
        let (a, t) = (alone.cpu_seconds(), tree.cpu_seconds());
        assert!(a.is_some() && t.is_some());
        assert!(t >= a);
    }
}

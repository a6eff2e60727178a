//! One bench run: settings for quick and full mode, starting the targets (twinhub, Mosquitto,
//! the TLS echo floor), registering devices, running the chosen scenarios against each target
//! in a fixed order, and collecting every figure into a [`Report`].

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::echo::{self, EchoServer};
use crate::error::{Error, Result};
use crate::hub::{self, Hub, Launch};
use crate::machine::{self, Machine};
use crate::mosquitto::{self, Mosquitto};
use crate::progress::Progress;
use crate::report::{MethodsRow, Pair, Report, RoutingReport, TelemetryReport, Versions};
use crate::scenario::{
    self, Ctx, Flavor, Target, c2d, cluster, connect, fanout, methods, query, routing, telemetry,
    twin,
};
use crate::tls;

/// Open files the bench keeps for itself besides the connection scenario's sockets.
const FD_RESERVE: u64 = 512;

/// Quick (under a minute in all) or full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Quick,
    Full,
}

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Methods,
    Twin,
    Connect,
    DesiredFanout,
    Telemetry,
    C2d,
    Routing,
    Query,
    /// Not in [`Scenario::ALL`]: it needs PostgreSQL and nats-server installed
    /// (`scripts/debian-services.sh`), so it runs only when named.
    Cluster,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Methods,
        Scenario::Twin,
        Scenario::Connect,
        Scenario::DesiredFanout,
        Scenario::Telemetry,
        Scenario::C2d,
        Scenario::Routing,
        Scenario::Query,
    ];
}

/// Whether and where to find Mosquitto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Look on PATH and in /usr/sbin; skip the peer (with a note) if it is missing.
    Auto,
    Off,
    Bin(PathBuf),
}

/// Everything a run is shaped by.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub mode: Mode,
    pub scenarios: Vec<Scenario>,
    pub methods_devices: usize,
    pub concurrency: Vec<usize>,
    pub caller_conns: usize,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub twin_devices: usize,
    pub twin_inflight: usize,
    pub twin_duration_secs: f64,
    pub connections: usize,
    pub connect_concurrency: usize,
    pub source_addrs: usize,
    pub fanout_devices: usize,
    pub fanout_concurrency: usize,
    /// Devices publishing telemetry (ingest and end to end).
    pub telemetry_devices: usize,
    /// QoS 1 telemetry publishes each device keeps unacknowledged during ingest.
    pub telemetry_inflight: usize,
    /// Bytes of every telemetry payload.
    pub telemetry_payload: usize,
    /// Measured window of the ingest phase, seconds.
    pub telemetry_duration_secs: f64,
    /// Messages per second over all devices in the end-to-end phase.
    pub telemetry_rate: f64,
    /// Measured window of the end-to-end phase, seconds.
    pub telemetry_latency_secs: f64,
    /// Events in the catch-up backlog (0: skip the catch-up).
    pub backlog_events: usize,
    /// Devices filling the backlog, and QoS 1 publishes each keeps unacknowledged.
    pub backlog_devices: usize,
    pub backlog_inflight: usize,
    /// Event partitions of the hubs (`twinhub serve --partitions`).
    pub partitions: u32,
    /// Connected devices the cloud-to-device messages go to.
    pub c2d_devices: usize,
    /// Sends the one C2D sender keeps in flight in the throughput phase.
    pub c2d_inflight: usize,
    /// Bytes of every C2D message body.
    pub c2d_payload: usize,
    /// Measured window of the C2D throughput phase, seconds (0 skips it).
    pub c2d_duration_secs: f64,
    /// Messages per second in the C2D latency phase (0 skips it).
    pub c2d_rate: f64,
    /// Measured window of the C2D latency phase, seconds.
    pub c2d_latency_secs: f64,
    /// `twinhub serve --c2d-max-queue-depth` for the bench's hub (`None`: the hub's 50).
    pub c2d_max_queue_depth: Option<usize>,
    /// Devices publishing in the routing scenario (routing cost and webhook).
    pub routing_devices: usize,
    /// QoS 1 publishes each of them keeps unacknowledged (routing cost, webhook backlog).
    pub routing_inflight: usize,
    /// Bytes of every routed message's body.
    pub routing_payload: usize,
    /// Measured window of each routing-cost round on each hub, seconds (0 skips the phase).
    pub routing_duration_secs: f64,
    /// Alternating rounds on the unrouted and the routed hub.
    pub routing_rounds: usize,
    /// Messages published to the webhook hub as fast as it takes them (0 skips the phase).
    pub webhook_backlog: usize,
    /// Messages per second in the webhook lag phase (0 skips it).
    pub webhook_rate: f64,
    /// Measured window of the webhook lag phase, seconds.
    pub webhook_latency_secs: f64,
    /// A `twinhub serve --config` file whose routing replaces the routed hub's built-in
    /// configuration (10 routes, 3 enrichments).
    pub routing_config: Option<PathBuf>,
    /// Twins the query scenario imports on its hub (the issue's aims are at 100,000).
    pub query_twins: usize,
    /// Timed runs of each query.
    pub query_repetitions: usize,
    /// Bulk import calls in flight while the query scenario registers its twins.
    pub query_bulk_concurrency: usize,
    /// Callers of the cluster scenario's single-node phases (PostgreSQL against embedded).
    pub cluster_concurrency: Vec<usize>,
    /// Callers of the cluster scenario's same-node / cross-node phases.
    pub cluster_latency_concurrency: Vec<usize>,
    pub floor: bool,
    /// How long to wait, before each phase, for other load on the machine to pass.
    pub quiet_wait_secs: f64,
    #[serde(skip)]
    pub hub: Launch,
    #[serde(skip)]
    pub mosquitto: Peer,
    /// The binary that serves `echo-server` (this one); `None` serves the floor in-process.
    #[serde(skip)]
    pub echo_exe: Option<PathBuf>,
    #[serde(skip)]
    pub work_dir: Option<PathBuf>,
    #[serde(skip)]
    pub keep_work_dir: bool,
}

impl Settings {
    /// Under a minute in all on a 2-core machine.
    pub fn quick(hub: Launch) -> Settings {
        Settings {
            mode: Mode::Quick,
            scenarios: Scenario::ALL.to_vec(),
            methods_devices: 16,
            concurrency: vec![1, 16, 256],
            caller_conns: 4,
            warmup_secs: 0.3,
            duration_secs: 1.5,
            twin_devices: 64,
            twin_inflight: 1,
            twin_duration_secs: 2.0,
            connections: 2_000,
            connect_concurrency: 64,
            source_addrs: 4,
            fanout_devices: 500,
            fanout_concurrency: 32,
            telemetry_devices: 100,
            telemetry_inflight: 16,
            telemetry_payload: 1024,
            telemetry_duration_secs: 2.0,
            telemetry_rate: 1_000.0,
            telemetry_latency_secs: 3.0,
            backlog_events: 100_000,
            // The hub appends one message per device connection at a time, so many devices
            // fill the backlog faster than a deep window per device.
            backlog_devices: 400,
            backlog_inflight: 16,
            partitions: 4,
            // Connecting 1,000 devices takes about a second: quick mode keeps the issue's
            // fleet and shortens the windows only.
            c2d_devices: 1_000,
            c2d_inflight: 256,
            c2d_payload: 128,
            c2d_duration_secs: 3.0,
            c2d_rate: 1_000.0,
            c2d_latency_secs: 3.0,
            c2d_max_queue_depth: None,
            routing_devices: 100,
            routing_inflight: 16,
            routing_payload: 1024,
            routing_duration_secs: 3.0,
            routing_rounds: 2,
            webhook_backlog: 50_000,
            webhook_rate: 1_000.0,
            webhook_latency_secs: 3.0,
            routing_config: None,
            query_twins: 100_000,
            query_repetitions: 10,
            query_bulk_concurrency: 8,
            cluster_concurrency: vec![16, 64],
            cluster_latency_concurrency: vec![1, 4, 16],
            floor: true,
            quiet_wait_secs: 15.0,
            hub,
            mosquitto: Peer::Auto,
            echo_exe: None,
            work_dir: None,
            keep_work_dir: false,
        }
    }

    /// Longer windows and the full scales (connections up to 100,000, as far as the
    /// open-file limit allows).
    pub fn full(hub: Launch) -> Settings {
        Settings {
            mode: Mode::Full,
            methods_devices: 100,
            warmup_secs: 2.0,
            duration_secs: 10.0,
            twin_devices: 1_000,
            twin_duration_secs: 15.0,
            connections: 100_000,
            // Mosquitto listens with a backlog of 100: more handshakes at once overflow it
            // and cost the broker 1 s SYN retransmits.
            connect_concurrency: 64,
            fanout_devices: 10_000,
            fanout_concurrency: 64,
            telemetry_duration_secs: 15.0,
            telemetry_latency_secs: 20.0,
            backlog_events: 1_000_000,
            c2d_duration_secs: 15.0,
            c2d_latency_secs: 20.0,
            routing_duration_secs: 10.0,
            routing_rounds: 3,
            webhook_backlog: 300_000,
            webhook_latency_secs: 15.0,
            query_repetitions: 30,
            quiet_wait_secs: 300.0,
            ..Settings::quick(hub)
        }
    }

    fn runs(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    /// How many registered devices the chosen scenarios need.
    fn devices_needed(&self) -> usize {
        [
            (Scenario::Methods, self.methods_devices),
            (Scenario::Twin, self.twin_devices),
            (Scenario::Connect, self.connections),
            (Scenario::DesiredFanout, self.fanout_devices),
            (Scenario::Telemetry, self.telemetry_devices),
            (Scenario::C2d, self.c2d_devices),
        ]
        .iter()
        .filter(|(s, _)| self.runs(*s))
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
    }

    fn telemetry_shape(&self) -> telemetry::Shape {
        telemetry::Shape {
            devices: self.telemetry_devices.max(1),
            inflight: self.telemetry_inflight.max(1),
            payload: self.telemetry_payload,
            warmup: secs(self.warmup_secs.max(1.0)),
            duration: secs(self.telemetry_duration_secs),
            rate: self.telemetry_rate,
            latency_duration: secs(self.telemetry_latency_secs),
        }
    }

    fn c2d_shape(&self) -> c2d::Shape {
        c2d::Shape {
            devices: self.c2d_devices.max(1),
            inflight: self.c2d_inflight.max(1),
            payload: self.c2d_payload,
            warmup: secs(self.warmup_secs.max(1.0)),
            duration: secs(self.c2d_duration_secs),
            rate: self.c2d_rate,
            latency_duration: secs(self.c2d_latency_secs),
            drain_limit: Duration::from_secs(if self.mode == Mode::Full { 120 } else { 30 }),
        }
    }

    fn routing_shape(&self) -> routing::Shape {
        routing::Shape {
            devices: self.routing_devices.max(1),
            inflight: self.routing_inflight.max(1),
            payload: self.routing_payload,
            warmup: secs(self.warmup_secs.max(1.0)),
            duration: secs(self.routing_duration_secs),
        }
    }

    fn webhook_shape(&self) -> routing::WebhookShape {
        routing::WebhookShape {
            devices: self.routing_devices.max(1),
            inflight: self.routing_inflight.max(1),
            payload: self.routing_payload,
            backlog: self.webhook_backlog,
            rate: self.webhook_rate,
            warmup: secs(self.warmup_secs.max(1.0)),
            latency_duration: secs(self.webhook_latency_secs),
            drain_limit: Duration::from_secs(if self.mode == Mode::Full { 600 } else { 120 }),
        }
    }

    fn backlog_shape(&self) -> telemetry::BacklogShape {
        telemetry::BacklogShape {
            events: self.backlog_events,
            devices: self.backlog_devices.max(1),
            inflight: self.backlog_inflight.max(1),
            payload: self.telemetry_payload,
            limit: Duration::from_secs(if self.mode == Mode::Full { 900 } else { 180 }),
        }
    }

    fn cluster_shape(&self) -> cluster::Shape {
        cluster::Shape {
            devices: self.methods_devices.max(1),
            caller_conns: self.caller_conns.max(1),
            warmup: secs(self.warmup_secs),
            duration: secs(self.duration_secs),
            concurrency: self.cluster_concurrency.clone(),
            latency_concurrency: self.cluster_latency_concurrency.clone(),
            twin_devices: self.twin_devices.max(1),
            twin_inflight: self.twin_inflight.max(1),
            twin_duration: secs(self.twin_duration_secs),
            partitions: self.partitions,
            quiet_wait: secs(self.quiet_wait_secs),
        }
    }

    fn methods_shape(&self) -> methods::Shape {
        methods::Shape {
            devices: self.methods_devices.max(1),
            concurrency: 1,
            caller_conns: self.caller_conns.max(1),
            warmup: secs(self.warmup_secs),
            duration: secs(self.duration_secs),
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Everything started for a run, stopped together at the end.
struct Targets {
    hub: Hub,
    hub_target: Target,
    mosquitto: Option<Mosquitto>,
    broker_target: Option<Target>,
    echo: Option<EchoServer>,
}

impl Targets {
    async fn stop(self) {
        if let Some(m) = self.mosquitto {
            m.stop().await;
        }
        if let Some(e) = self.echo {
            e.stop().await;
        }
        self.hub.stop().await;
    }
}

/// Runs the bench as `settings` says. Setup failures of the hub are errors; a peer or a
/// scenario that cannot run leaves its figures empty and a note in the report.
pub async fn run(mut settings: Settings, progress: Progress) -> Result<Report> {
    let started = Instant::now();
    let started_unix = unix_now();
    let nofile = machine::raise_nofile_limit();
    let machine = Machine::read();
    let mut notes = Vec::new();

    let max_conns = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if settings.runs(Scenario::Connect) && settings.connections > max_conns {
        notes.push(format!(
            "connect: {} connections requested, {max_conns} run: the open-file limit is {nofile} \
             (hard limit {}); the hub and Mosquitto inherit it. Raise the hard limit \
             (`ulimit -Hn`, needs CAP_SYS_RESOURCE) to go further.",
            settings.connections, machine.nofile_hard
        ));
        settings.connections = max_conns;
    }

    let work_dir = settings.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "twinhub-bench-{}-{started_unix}",
            std::process::id()
        ))
    });
    std::fs::create_dir_all(&work_dir)
        .map_err(|e| Error::io(format!("creating {}", work_dir.display()), e))?;
    progress.note(&format!("work dir: {}", work_dir.display()));

    let outcome = run_in(&settings, &progress, &work_dir, &mut notes).await;
    if !settings.keep_work_dir {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    let (versions, results) = outcome?;
    let mut report = Report {
        tool: "twinhub-bench",
        started_unix,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        machine,
        versions,
        settings,
        methods: results.methods,
        twin: results.twin,
        connect: results.connect,
        desired_fanout: results.fanout,
        telemetry: results.telemetry,
        c2d: results.c2d,
        routing: results.routing,
        query: results.query,
        cluster: results.cluster,
        registration: results.registration,
        targets: Vec::new(),
        notes,
    };
    report.targets = report.check_targets();
    Ok(report)
}

#[derive(Default)]
struct Results {
    registration: Option<crate::report::Registration>,
    methods: Vec<MethodsRow>,
    twin: Option<Pair<crate::stats::Throughput>>,
    connect: Option<Pair<connect::ConnectResult>>,
    fanout: Option<Pair<fanout::Fanout>>,
    telemetry: Option<TelemetryReport>,
    c2d: Option<crate::report::C2dReport>,
    routing: Option<RoutingReport>,
    query: Option<query::QueryRun>,
    cluster: Option<cluster::ClusterRun>,
}

async fn start_targets(
    settings: &Settings,
    progress: &Progress,
    work_dir: &std::path::Path,
    notes: &mut Vec<String>,
) -> Result<(Targets, Ctx, Versions)> {
    progress.note("starting twinhub");
    let options = hub::Options {
        partitions: Some(settings.partitions),
        c2d_max_queue_depth: settings.c2d_max_queue_depth,
        ..hub::Options::default()
    };
    let hub = Hub::start_with_options(&settings.hub, &work_dir.join("hub"), &options).await?;
    if let Some(pid) = hub.pid() {
        progress.note(&format!(
            "twinhub pid {pid} (profile with `perf record -g -p {pid}`)"
        ));
    }
    let services = (0..settings.caller_conns.max(1))
        .map(|_| hub.service())
        .collect::<Result<Vec<_>>>()?;
    let ctx = Ctx {
        tls: tls::Client::new(hub.ca_pem.as_bytes())?,
        progress: progress.clone(),
    };
    let hub_target = Target {
        name: "twinhub",
        mqtt_addr: hub.mqtt_addr,
        pid: hub.pid(),
        flavor: Flavor::Hub { services },
        watch: Vec::new(),
    };
    let peer_cert = tls::issue_server_cert(&hub.ca_pem, &hub.ca_key_pem)?;

    let bin = match &settings.mosquitto {
        Peer::Off => None,
        Peer::Auto => {
            let found = mosquitto::find(None);
            if found.is_none() {
                notes.push(
                    "Mosquitto is not installed (bench/run.sh installs it: apt-get install -y \
                     mosquitto); its columns are empty"
                        .into(),
                );
            }
            found
        }
        Peer::Bin(p) => Some(
            mosquitto::find(Some(p))
                .ok_or_else(|| Error::Setup(format!("no Mosquitto binary at {}", p.display())))?,
        ),
    };
    let mut mosquitto = None;
    if let Some(bin) = bin {
        progress.note("starting mosquitto");
        match Mosquitto::start(
            &bin,
            &work_dir.join("mosquitto"),
            &peer_cert,
            &hub.ca_pem,
            &ctx.tls,
        )
        .await
        {
            Ok(m) => mosquitto = Some(m),
            Err(e) => notes.push(format!("Mosquitto did not start: {e}")),
        }
    }
    let broker_target = mosquitto.as_ref().map(|m| Target {
        name: "mosquitto",
        mqtt_addr: m.addr,
        pid: Some(m.pid()),
        flavor: Flavor::Broker,
        watch: Vec::new(),
    });

    let mut echo = None;
    if settings.floor && settings.runs(Scenario::Methods) {
        let started = match &settings.echo_exe {
            Some(exe) => EchoServer::start_child(exe, work_dir, &peer_cert).await,
            None => EchoServer::start_in_process(&peer_cert).await,
        };
        match started {
            Ok(e) => echo = Some(e),
            Err(e) => notes.push(format!("the TLS echo floor did not start: {e}")),
        }
    }
    let versions = Versions {
        twinhub: hub.version.clone(),
        bench: format!("twinhub-bench {}", env!("CARGO_PKG_VERSION")),
        mosquitto: mosquitto.as_ref().map(|m| m.version.clone()),
        client_stack: "tokio, rustls 0.23 with ring (TLS 1.3, no resumption), twinhub-mqtt codec"
            .into(),
        rest_client: format!(
            "twinhub-sdk ServiceClient (reqwest, HTTP/2 negotiated by ALPN): {} clients, one \
             connection each, calls multiplexed; HTTP/1.1 rows: one ServiceClient with \
             http1_only, a keep-alive connection per caller",
            settings.caller_conns.max(1)
        ),
    };
    Ok((
        Targets {
            hub,
            hub_target,
            mosquitto,
            broker_target,
            echo,
        },
        ctx,
        versions,
    ))
}

async fn run_in(
    settings: &Settings,
    progress: &Progress,
    work_dir: &std::path::Path,
    notes: &mut Vec<String>,
) -> Result<(Versions, Results)> {
    let (targets, ctx, versions) = start_targets(settings, progress, work_dir, notes).await?;
    let outcome = scenarios(settings, &ctx, &targets, work_dir, notes).await;
    targets.stop().await;
    Ok((versions, outcome?))
}

/// Lets other load on the machine pass before a phase (bounded), noting it if it never did.
async fn settle_machine(settings: &Settings, ctx: &Ctx, notes: &mut Vec<String>, phase: &str) {
    if settings.quiet_wait_secs <= 0.0 {
        return;
    }
    let limit = secs(settings.quiet_wait_secs);
    if let Some(busy) = scenario::wait_quiet(&ctx.progress, limit).await {
        notes.push(format!(
            "{phase}: the machine was still {busy:.2} cores busy with other work before the \
             phase; see the 'other+steal cores' rows"
        ));
    }
}

/// Records a phase's error as a note and yields its figures, if any.
fn keep<T>(notes: &mut Vec<String>, what: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("{what} failed: {e}"));
            None
        }
    }
}

async fn scenarios(
    settings: &Settings,
    ctx: &Ctx,
    targets: &Targets,
    work_dir: &std::path::Path,
    notes: &mut Vec<String>,
) -> Result<Results> {
    let mut results = Results::default();
    let hub_t = &targets.hub_target;
    let broker_t = targets.broker_target.as_ref();
    let service = hub_t
        .services()?
        .first()
        .cloned()
        .ok_or_else(|| Error::Setup("no service client".into()))?;
    let settle_wait = Duration::from_secs(120);

    let needed = settings.devices_needed();
    let took = hub::register_devices(&service, needed, &ctx.progress).await?;
    results.registration = Some(crate::report::Registration {
        devices: needed,
        seconds: took.as_secs_f64(),
        per_second: needed as f64 / took.as_secs_f64().max(1e-9),
    });

    // Connect first: the servers' memory baseline is cleanest before other load.
    if settings.runs(Scenario::Connect) {
        let shape = connect::Shape {
            connections: settings.connections,
            concurrency: settings.connect_concurrency,
            source_addrs: settings.source_addrs,
            settle: Duration::from_secs(2),
            limit: Duration::from_secs(if settings.mode == Mode::Full { 900 } else { 60 }),
        };
        settle_machine(settings, ctx, notes, "connect").await;
        let hub_r = connect::run(ctx, hub_t, shape).await;
        keep(
            notes,
            "waiting for the hub after connect",
            hub::wait_disconnected(&service, settle_wait).await,
        );
        if broker_t.is_some() {
            settle_machine(settings, ctx, notes, "connect (mosquitto)").await;
        }
        let broker_r = match broker_t {
            Some(b) => Some(connect::run(ctx, b, shape).await),
            None => None,
        };
        results.connect = Some(Pair {
            twinhub: Some(hub_r),
            mosquitto: broker_r,
        });
    }

    if settings.runs(Scenario::Methods) {
        let shape = settings.methods_shape();
        let levels = &settings.concurrency;
        settle_machine(settings, ctx, notes, "methods").await;
        let hub_r = keep(
            notes,
            "twinhub methods",
            methods::run(ctx, hub_t, shape, levels).await,
        );
        keep(
            notes,
            "waiting for the hub after methods",
            hub::wait_disconnected(&service, settle_wait).await,
        );
        // The official Python and Node SDKs call REST over HTTP/1.1 with keep-alive: the
        // same calls again through one HTTP/1.1 client, a pooled connection per caller.
        settle_machine(settings, ctx, notes, "methods (HTTP/1.1)").await;
        let hub_h1 = match targets.hub.service_http1() {
            Ok(client) => {
                let h1_target = Target {
                    name: "twinhub-http1",
                    flavor: Flavor::Hub {
                        services: vec![client],
                    },
                    ..hub_t.clone()
                };
                let r = keep(
                    notes,
                    "twinhub methods over HTTP/1.1",
                    methods::run(ctx, &h1_target, shape, levels).await,
                );
                keep(
                    notes,
                    "waiting for the hub after methods over HTTP/1.1",
                    hub::wait_disconnected(&service, settle_wait).await,
                );
                r
            }
            Err(e) => {
                notes.push(format!("the HTTP/1.1 service client failed: {e}"));
                None
            }
        };
        if broker_t.is_some() {
            settle_machine(settings, ctx, notes, "methods (mosquitto)").await;
        }
        let broker_r = match broker_t {
            Some(b) => keep(
                notes,
                "mosquitto request/response",
                methods::run(ctx, b, shape, levels).await,
            ),
            None => None,
        };
        for &c in levels {
            let find = |r: &Option<Vec<(usize, crate::stats::Throughput)>>| {
                r.as_ref()
                    .and_then(|v| v.iter().find(|(l, _)| *l == c).map(|(_, t)| t.clone()))
            };
            let floor = match &targets.echo {
                Some(e) => keep(
                    notes,
                    "TLS echo floor",
                    echo::round_trips(
                        ctx,
                        e.addr,
                        e.pid(),
                        methods::Shape {
                            concurrency: c,
                            ..shape
                        },
                    )
                    .await,
                ),
                None => None,
            };
            results.methods.push(MethodsRow {
                concurrency: c,
                twinhub: find(&hub_r),
                twinhub_http1: find(&hub_h1),
                mosquitto: find(&broker_r),
                floor,
            });
        }
    }

    if settings.runs(Scenario::Twin) {
        let shape = twin::Shape {
            devices: settings.twin_devices.max(1),
            inflight: settings.twin_inflight.max(1),
            warmup: secs(settings.warmup_secs),
            duration: secs(settings.twin_duration_secs),
        };
        settle_machine(settings, ctx, notes, "twin").await;
        let hub_r = keep(notes, "twinhub twin", twin::run(ctx, hub_t, shape).await);
        keep(
            notes,
            "waiting for the hub after twin",
            hub::wait_disconnected(&service, settle_wait).await,
        );
        if broker_t.is_some() {
            settle_machine(settings, ctx, notes, "twin (mosquitto)").await;
        }
        let broker_r = match broker_t {
            Some(b) => keep(notes, "mosquitto QoS 1", twin::run(ctx, b, shape).await),
            None => None,
        };
        results.twin = Some(Pair {
            twinhub: hub_r,
            mosquitto: broker_r,
        });
    }

    if settings.runs(Scenario::DesiredFanout) {
        let shape = fanout::Shape {
            devices: settings.fanout_devices.max(1),
            concurrency: settings.fanout_concurrency.max(1),
            limit: Duration::from_secs(if settings.mode == Mode::Full { 600 } else { 60 }),
        };
        settle_machine(settings, ctx, notes, "desired-fanout").await;
        let hub_r = keep(
            notes,
            "twinhub desired fan-out",
            fanout::run(ctx, hub_t, shape).await,
        );
        keep(
            notes,
            "waiting for the hub after fan-out",
            hub::wait_disconnected(&service, settle_wait).await,
        );
        if broker_t.is_some() {
            settle_machine(settings, ctx, notes, "desired-fanout (mosquitto)").await;
        }
        let broker_r = match broker_t {
            Some(b) => keep(notes, "mosquitto fan-out", fanout::run(ctx, b, shape).await),
            None => None,
        };
        results.fanout = Some(Pair {
            twinhub: hub_r,
            mosquitto: broker_r,
        });
    }

    if settings.runs(Scenario::Telemetry) {
        results.telemetry =
            Some(telemetry_phases(settings, ctx, targets, work_dir, &service, notes).await);
    }

    if settings.runs(Scenario::C2d) {
        let shape = settings.c2d_shape();
        // A client of its own: its one AMQP connection carries the phase's sends only.
        let sender = targets.hub.service()?;
        settle_machine(settings, ctx, notes, "c2d").await;
        let hub_r = keep(
            notes,
            "twinhub c2d",
            c2d::run(ctx, hub_t, shape, Some(&sender)).await,
        );
        keep(
            notes,
            "waiting for the hub after c2d",
            hub::wait_disconnected(&service, settle_wait).await,
        );
        if broker_t.is_some() {
            settle_machine(settings, ctx, notes, "c2d (mosquitto)").await;
        }
        let broker_r = match broker_t {
            Some(b) => keep(notes, "mosquitto c2d", c2d::run(ctx, b, shape, None).await),
            None => None,
        };
        for (name, r) in [("twinhub", &hub_r), ("mosquitto", &broker_r)] {
            if let Some(r) = r {
                c2d_notes(notes, name, r);
            }
        }
        results.c2d = Some(crate::report::C2dReport::new(hub_r, broker_r));
    }

    if settings.runs(Scenario::Routing) {
        results.routing = Some(routing_phases(settings, ctx, work_dir, notes).await);
    }

    if settings.runs(Scenario::Query) {
        let shape = query::Shape {
            twins: settings.query_twins,
            repetitions: settings.query_repetitions,
            bulk_concurrency: settings.query_bulk_concurrency,
        };
        settle_machine(settings, ctx, notes, "query").await;
        let dir = work_dir.join("query-hub");
        results.query = keep(
            notes,
            "query",
            query::run(&settings.hub, &dir, ctx, shape).await,
        );
        if let Some(q) = &results.query
            && q.twins < 100_000
        {
            notes.push(format!(
                "query: {} twins, not the aims' 100,000 (--query-twins)",
                q.twins
            ));
        }
    }
    if settings.runs(Scenario::Cluster) {
        let shape = settings.cluster_shape();
        let outcome = cluster::run(&settings.hub, work_dir, ctx, &shape, notes).await;
        results.cluster = keep(notes, "cluster", outcome);
    }
    Ok(results)
}

/// The routing scenario: the routing cost on two hubs of its own (no routes; 10 routes and 3
/// enrichments), in alternating rounds, then webhook delivery on a third.
async fn routing_phases(
    settings: &Settings,
    ctx: &Ctx,
    work_dir: &std::path::Path,
    notes: &mut Vec<String>,
) -> RoutingReport {
    let config = match &settings.routing_config {
        None => routing::routed_config(),
        Some(path) => {
            match twinhub_server::Config::load(Some(path), &twinhub_server::Overrides::default()) {
                Ok(c) => c.routing(),
                Err(e) => {
                    notes.push(format!("routing: {}: {e}", path.display()));
                    return RoutingReport::new(
                        settings,
                        &routing::routed_config(),
                        routing::Copies::default(),
                    );
                }
            }
        }
    };
    let copies = match routing::expected_copies(
        &config,
        settings.routing_devices.max(1),
        settings.routing_payload,
    ) {
        Ok(c) => c,
        Err(e) => {
            notes.push(format!("routing: {e}"));
            routing::Copies::default()
        }
    };
    let mut report = RoutingReport::new(settings, &config, copies);
    if settings.routing_duration_secs > 0.0 && settings.routing_rounds > 0 {
        let outcome = routing_cost(settings, ctx, work_dir, &config, notes).await;
        if let Some((unrouted, routed)) = keep(notes, "routing cost", outcome) {
            report.set_ingest(unrouted, routed);
        }
    }
    if settings.webhook_backlog > 0 || settings.webhook_rate > 0.0 {
        match webhook_phases(settings, ctx, work_dir, notes).await {
            Ok(Ok(run)) => report.webhook = Some(run),
            Ok(Err(skipped)) => {
                notes.push(format!("routing webhook: skipped: {skipped}"));
                report.webhook_skipped = Some(skipped);
            }
            Err(e) => notes.push(format!("routing webhook failed: {e}")),
        }
    }
    report
}

/// Starts the unrouted and the routed hub side by side and runs the ingest rounds on them in
/// turn.
async fn routing_cost(
    settings: &Settings,
    ctx: &Ctx,
    work_dir: &std::path::Path,
    config: &twinhub_routing::RoutingConfig,
    notes: &mut Vec<String>,
) -> Result<(routing::IngestFigures, routing::IngestFigures)> {
    let shape = settings.routing_shape();
    let devices = shape.devices;
    let unrouted = routing::ScenarioHub::start(
        &settings.hub,
        &work_dir.join("hub-unrouted"),
        "twinhub-unrouted",
        settings.partitions,
        None,
        devices,
        ctx,
    )
    .await?;
    let routed = match routing::ScenarioHub::start(
        &settings.hub,
        &work_dir.join("hub-routed"),
        "twinhub-routed",
        settings.partitions,
        Some(config.clone()),
        devices,
        ctx,
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            unrouted.stop().await;
            return Err(e);
        }
    };
    let mut rounds: [Vec<routing::Round>; 2] = [Vec::new(), Vec::new()];
    let mut failed = None;
    'rounds: for round in 1..=settings.routing_rounds {
        for (k, hub) in [&unrouted, &routed].into_iter().enumerate() {
            let label = format!("{} ingest, round {round}", hub.target.name);
            settle_machine(settings, ctx, notes, &label).await;
            match routing::ingest_round(hub, shape, &label).await {
                Ok(r) => rounds[k].push(r),
                Err(e) => {
                    failed = Some(Error::Setup(format!("{label}: {e}")));
                    break 'rounds;
                }
            }
        }
    }
    unrouted.stop().await;
    routed.stop().await;
    if let Some(e) = failed {
        return Err(e);
    }
    let [u, r] = rounds;
    Ok((
        routing::IngestFigures::from_rounds(u),
        routing::IngestFigures::from_rounds(r),
    ))
}

/// The webhook phases on a hub of their own; `Ok(Err(why))` when the hub delivers nothing to
/// webhooks (a build without webhook delivery).
async fn webhook_phases(
    settings: &Settings,
    ctx: &Ctx,
    work_dir: &std::path::Path,
    notes: &mut Vec<String>,
) -> Result<std::result::Result<routing::WebhookRun, String>> {
    let shape = settings.webhook_shape();
    let hook = crate::hook::HookServer::start().await?;
    let hub = routing::ScenarioHub::start(
        &settings.hub,
        &work_dir.join("hub-webhook"),
        "twinhub-webhook",
        settings.partitions,
        Some(routing::webhook_config(&hook.url())),
        shape.devices,
        ctx,
    )
    .await?;
    let outcome = async {
        let probe = Duration::from_secs(15);
        if !routing::webhook_probe(&hub, &hook, probe).await? {
            return Ok(Err(format!(
                "the hub delivered no message to the webhook within {probe:?} (does this \
                 build deliver webhook endpoints?)"
            )));
        }
        let mut run = routing::WebhookRun {
            receiver: format!(
                "{}, a raw tokio HTTP/1.1 server in the bench answering 200 with no body",
                hook.url()
            ),
            ..routing::WebhookRun::default()
        };
        if shape.backlog > 0 {
            settle_machine(settings, ctx, notes, "webhook backlog").await;
            let b = routing::webhook_backlog(&hub, &hook, shape).await?;
            if !b.complete {
                notes.push(format!(
                    "routing webhook: {} of {} messages reached the receiver within {:?}",
                    b.delivered, b.backlog, shape.drain_limit
                ));
            }
            run.backlog = Some(b);
        }
        if shape.rate > 0.0 {
            settle_machine(settings, ctx, notes, "webhook lag").await;
            let l = routing::webhook_lag(&hub, &hook, shape).await?;
            if l.received < l.sent {
                notes.push(format!(
                    "routing webhook: {} of {} messages sent at a fixed rate reached the \
                     receiver",
                    l.received, l.sent
                ));
            }
            run.lag = Some(l);
        }
        run.untimed = hook.untimed();
        Ok(Ok(run))
    }
    .await;
    hub.stop().await;
    outcome
}

/// What a c2d run should say aloud: refusals for a full queue, messages never delivered,
/// device connections that failed.
fn c2d_notes(notes: &mut Vec<String>, name: &str, r: &c2d::C2dRun) {
    if let Some(t) = &r.throughput {
        if t.queue_full > 0 {
            notes.push(format!(
                "c2d {name}: {} sends were refused because the device's queue was full \
                 (DeviceMaximumQueueDepthExceeded); deliveries fell behind accepted sends by {} \
                 when the window closed",
                t.queue_full, t.backlog_at_end
            ));
        }
        if t.drain_seconds.is_none() {
            notes.push(format!(
                "c2d {name}: {} of {} accepted messages reached the devices within the drain \
                 limit",
                t.delivered_total, t.accepted_total
            ));
        }
    }
    if let Some(l) = &r.latency
        && l.received < l.sent
    {
        notes.push(format!(
            "c2d {name}: {} of {} messages sent at a fixed rate reached the devices",
            l.received, l.sent
        ));
    }
    if let Some(e) = &r.first_device_error {
        notes.push(format!(
            "c2d {name}: {} device connections failed; first: {e}",
            r.device_errors
        ));
    }
}

/// The telemetry scenario: ingest and end to end on twinhub and Mosquitto, then the catch-up
/// on a hub of its own (so its log holds the backlog and nothing else).
async fn telemetry_phases(
    settings: &Settings,
    ctx: &Ctx,
    targets: &Targets,
    work_dir: &std::path::Path,
    service: &twinhub_sdk::ServiceClient,
    notes: &mut Vec<String>,
) -> TelemetryReport {
    let hub_t = &targets.hub_target;
    let broker_t = targets.broker_target.as_ref();
    let settle_wait = Duration::from_secs(120);
    let shape = settings.telemetry_shape();
    let endpoint = telemetry::Endpoint {
        connection_string: targets.hub.events_connection_string.clone(),
        ca_pem: targets.hub.ca_pem.clone(),
        port: targets.hub.amqp_addr.port(),
    };

    let ingest = settings.telemetry_duration_secs > 0.0;
    let hub_ingest = if ingest {
        settle_machine(settings, ctx, notes, "telemetry ingest").await;
        let r = keep(
            notes,
            "twinhub telemetry ingest",
            telemetry::ingest(ctx, hub_t, shape).await,
        );
        keep(
            notes,
            "waiting for the hub after telemetry ingest",
            hub::wait_disconnected(service, settle_wait).await,
        );
        r
    } else {
        None
    };
    if hub_ingest.as_ref().is_some_and(|i| i.log.is_none()) && hub_t.pid.is_some() {
        notes.push(
            "telemetry ingest: no fdatasync counts (they need `perf` and the syscall \
             tracepoints: `apt-get install linux-perf`, `mount -t tracefs nodev \
             /sys/kernel/tracing`, as root)"
                .into(),
        );
    }
    let broker_ingest = match broker_t.filter(|_| ingest) {
        Some(b) => {
            settle_machine(settings, ctx, notes, "telemetry ingest (mosquitto)").await;
            keep(
                notes,
                "mosquitto telemetry ingest",
                telemetry::ingest(ctx, b, shape).await,
            )
        }
        None => None,
    };

    let e2e = settings.telemetry_rate > 0.0;
    let hub_e2e = if e2e {
        settle_machine(settings, ctx, notes, "telemetry end to end").await;
        let r = keep(
            notes,
            "twinhub telemetry end to end",
            telemetry::end_to_end(ctx, hub_t, shape, telemetry::Consumer::Events(&endpoint)).await,
        );
        keep(
            notes,
            "waiting for the hub after telemetry end to end",
            hub::wait_disconnected(service, settle_wait).await,
        );
        r
    } else {
        None
    };
    let disk_floor = if e2e {
        settle_machine(settings, ctx, notes, "telemetry disk floor").await;
        keep(
            notes,
            "the fdatasync floor",
            telemetry::disk_floor(work_dir, shape).await,
        )
    } else {
        None
    };
    let broker_e2e = match broker_t.filter(|_| e2e) {
        Some(b) => {
            settle_machine(settings, ctx, notes, "telemetry end to end (mosquitto)").await;
            keep(
                notes,
                "mosquitto telemetry end to end",
                telemetry::end_to_end(ctx, b, shape, telemetry::Consumer::Subscriber).await,
            )
        }
        None => None,
    };

    let catch_up = if settings.backlog_events > 0 {
        let outcome = catch_up_phase(settings, ctx, work_dir, notes).await;
        keep(notes, "telemetry catch-up", outcome)
    } else {
        None
    };
    TelemetryReport {
        ingest: Pair {
            twinhub: hub_ingest,
            mosquitto: broker_ingest,
        },
        end_to_end: Pair {
            twinhub: hub_e2e,
            mosquitto: broker_e2e,
        },
        disk_floor,
        catch_up,
    }
}

/// Starts a hub of its own for the backlog, fills it and reads it back, and stops it.
async fn catch_up_phase(
    settings: &Settings,
    ctx: &Ctx,
    work_dir: &std::path::Path,
    notes: &mut Vec<String>,
) -> Result<telemetry::CatchUp> {
    let shape = settings.backlog_shape();
    ctx.progress
        .note("starting a second twinhub for the telemetry backlog");
    let hub = Hub::start_with(
        &settings.hub,
        &work_dir.join("hub-backlog"),
        Some(settings.partitions),
    )
    .await?;
    if let Some(pid) = hub.pid() {
        ctx.progress.note(&format!("backlog twinhub pid {pid}"));
    }
    let outcome = async {
        // A fresh data dir has its own dev CA.
        let ctx = &Ctx {
            tls: tls::Client::new(hub.ca_pem.as_bytes())?,
            progress: ctx.progress.clone(),
        };
        let service = hub.service()?;
        hub::register_devices(&service, shape.devices, &ctx.progress).await?;
        let target = Target {
            name: "twinhub-backlog",
            mqtt_addr: hub.mqtt_addr,
            pid: hub.pid(),
            flavor: Flavor::Hub {
                services: vec![service.clone()],
            },
            watch: Vec::new(),
        };
        let endpoint = telemetry::Endpoint {
            connection_string: hub.events_connection_string.clone(),
            ca_pem: hub.ca_pem.clone(),
            port: hub.amqp_addr.port(),
        };
        settle_machine(settings, ctx, notes, "telemetry backlog fill").await;
        let filled = telemetry::fill_backlog(ctx, &target, shape).await?;
        hub::wait_disconnected(&service, Duration::from_secs(120)).await?;
        settle_machine(settings, ctx, notes, "telemetry catch-up read").await;
        telemetry::read_backlog(ctx, &target, &endpoint, shape, filled).await
    }
    .await;
    hub.stop().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_mode_scales_up_and_devices_cover_every_scenario() {
        let quick = Settings::quick(Launch::InProcess);
        let full = Settings::full(Launch::InProcess);
        assert!(full.duration_secs > quick.duration_secs);
        assert!(full.connections > quick.connections);
        assert_eq!(full.concurrency, vec![1, 16, 256]);
        assert_eq!(quick.devices_needed(), 2_000);
        let only_methods = Settings {
            scenarios: vec![Scenario::Methods],
            ..quick
        };
        assert_eq!(only_methods.devices_needed(), 16);
        // The routing scenario registers its devices on hubs of its own.
        let only_routing = Settings {
            scenarios: vec![Scenario::Routing],
            ..Settings::quick(Launch::InProcess)
        };
        assert_eq!(only_routing.devices_needed(), 0);
        assert!(full.routing_rounds >= quick.routing_rounds);
    }
}

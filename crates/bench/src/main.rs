//! `twinhub-bench`: parses the command line, runs the bench (see the library) and writes the
//! table to stdout and the JSON report to a file. `echo-server` is the TLS echo floor the run
//! starts as its own child process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use twinhub_bench::hub::Launch;
use twinhub_bench::progress::Progress;
use twinhub_bench::run::{Mode, Peer, Scenario, Settings};

#[derive(Parser)]
#[command(
    name = "twinhub-bench",
    version,
    about = "Benchmarks twinhub side by side with Mosquitto and a raw TLS echo floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scenarios and print the side-by-side table
    Run(Box<RunArgs>),
    /// Serve the TLS echo floor on a loopback port (started by `run`)
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// quick: under a minute in all; full: longer windows and full scale
    #[arg(long, value_enum, default_value = "quick")]
    mode: Mode,
    /// Scenarios to run (comma-separated) [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Where to write the JSON report
    #[arg(long, default_value = "twinhub-bench.json")]
    json: PathBuf,
    /// Run the hub inside the bench process instead of as a child (no server memory figures)
    #[arg(long)]
    in_process: bool,
    /// The twinhub binary [default: `twinhub` next to this binary]
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// RUST_LOG for the hub child process
    #[arg(long, default_value = "warn")]
    hub_log: String,
    /// The Mosquitto binary [default: PATH, then /usr/sbin/mosquitto]
    #[arg(long)]
    mosquitto_bin: Option<PathBuf>,
    /// Skip the Mosquitto peer
    #[arg(long)]
    no_mosquitto: bool,
    /// Skip the TLS echo floor
    #[arg(long)]
    no_floor: bool,
    /// Devices answering methods
    #[arg(long)]
    methods_devices: Option<usize>,
    /// Concurrent callers, one phase per value (comma-separated)
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Connections the callers share (HTTP/2 to twinhub, MQTT to Mosquitto, TLS to the floor)
    #[arg(long)]
    caller_conns: Option<usize>,
    /// Warm-up before each measured window, seconds
    #[arg(long)]
    warmup: Option<f64>,
    /// Measured window of each methods phase, seconds
    #[arg(long)]
    duration: Option<f64>,
    /// Devices patching reported properties
    #[arg(long)]
    twin_devices: Option<usize>,
    /// Reported patches each device keeps in flight
    #[arg(long)]
    twin_inflight: Option<usize>,
    /// Measured window of the twin phase, seconds
    #[arg(long)]
    twin_duration: Option<f64>,
    /// Idle connections to ramp to (capped by the open-file limit)
    #[arg(long)]
    connections: Option<usize>,
    /// Handshakes in flight during the ramp
    #[arg(long)]
    connect_concurrency: Option<usize>,
    /// Client source addresses 127.0.0.1.. to spread sockets over
    #[arg(long)]
    source_addrs: Option<usize>,
    /// Devices in the desired fan-out
    #[arg(long)]
    fanout_devices: Option<usize>,
    /// Desired patches in flight during the fan-out
    #[arg(long)]
    fanout_concurrency: Option<usize>,
    /// Devices publishing telemetry (ingest and end to end)
    #[arg(long)]
    telemetry_devices: Option<usize>,
    /// QoS 1 telemetry publishes each device keeps unacknowledged during ingest
    #[arg(long)]
    telemetry_inflight: Option<usize>,
    /// Bytes of every telemetry payload
    #[arg(long)]
    telemetry_payload: Option<usize>,
    /// Measured window of the telemetry ingest phase, seconds (0 skips it)
    #[arg(long)]
    telemetry_duration: Option<f64>,
    /// Messages per second (over all devices) in the end-to-end latency phase (0 skips it)
    #[arg(long)]
    telemetry_rate: Option<f64>,
    /// Measured window of the end-to-end latency phase, seconds
    #[arg(long)]
    telemetry_latency_duration: Option<f64>,
    /// Events in the catch-up backlog (0 skips the catch-up)
    #[arg(long)]
    backlog: Option<usize>,
    /// Devices filling the backlog
    #[arg(long)]
    backlog_devices: Option<usize>,
    /// QoS 1 publishes each backlog device keeps unacknowledged
    #[arg(long)]
    backlog_inflight: Option<usize>,
    /// Event partitions of the hubs (`twinhub serve --partitions`)
    #[arg(long)]
    partitions: Option<u32>,
    /// Connected devices the cloud-to-device messages go to
    #[arg(long)]
    c2d_devices: Option<usize>,
    /// C2D sends the one sender keeps in flight in the throughput phase
    #[arg(long)]
    c2d_inflight: Option<usize>,
    /// Bytes of every C2D message body
    #[arg(long)]
    c2d_payload: Option<usize>,
    /// Measured window of the C2D throughput phase, seconds (0 skips it)
    #[arg(long)]
    c2d_duration: Option<f64>,
    /// C2D messages per second in the latency phase (0 skips it)
    #[arg(long)]
    c2d_rate: Option<f64>,
    /// Measured window of the C2D latency phase, seconds
    #[arg(long)]
    c2d_latency_duration: Option<f64>,
    /// `twinhub serve --c2d-max-queue-depth` for the bench's hub [default: the hub's 50]
    #[arg(long)]
    c2d_max_queue_depth: Option<usize>,
    /// Devices publishing in the routing scenario
    #[arg(long)]
    routing_devices: Option<usize>,
    /// QoS 1 publishes each routing device keeps unacknowledged
    #[arg(long)]
    routing_inflight: Option<usize>,
    /// Bytes of every routed message's body
    #[arg(long)]
    routing_payload: Option<usize>,
    /// Measured window of each routing-cost round on each hub, seconds (0 skips the phase)
    #[arg(long)]
    routing_duration: Option<f64>,
    /// Alternating routing-cost rounds on the unrouted and the routed hub
    #[arg(long)]
    routing_rounds: Option<usize>,
    /// Messages published to the webhook hub as fast as it takes them (0 skips the phase)
    #[arg(long)]
    webhook_backlog: Option<usize>,
    /// Messages per second in the webhook lag phase (0 skips it)
    #[arg(long)]
    webhook_rate: Option<f64>,
    /// Measured window of the webhook lag phase, seconds
    #[arg(long)]
    webhook_latency_duration: Option<f64>,
    /// A `twinhub serve --config` file whose routing the routed hub gets instead of the
    /// bench's 10 routes and 3 enrichments
    #[arg(long)]
    routing_config: Option<PathBuf>,
    /// Twins the query scenario imports on its own hub (the aims are at 100,000)
    #[arg(long)]
    query_twins: Option<usize>,
    /// Timed runs of each query in the query scenario
    #[arg(long)]
    query_repetitions: Option<usize>,
    /// Bulk import calls in flight while the query scenario registers its twins
    #[arg(long)]
    query_bulk_concurrency: Option<usize>,
    /// Callers of the cluster scenario's PostgreSQL-against-embedded phases (comma-separated)
    #[arg(long, value_delimiter = ',')]
    cluster_concurrency: Vec<usize>,
    /// Callers of the cluster scenario's same-node / cross-node phases (comma-separated)
    #[arg(long, value_delimiter = ',')]
    cluster_latency_concurrency: Vec<usize>,
    /// Seconds to wait before each phase for other load on the machine to pass (0: don't)
    #[arg(long)]
    quiet_wait: Option<f64>,
    /// Directory for the hub's data, certificates and logs [default: a new temp dir]
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the work dir (logs, store) after the run
    #[arg(long)]
    keep_work_dir: bool,
}

fn settings(args: RunArgs) -> Result<Settings> {
    let me = std::env::current_exe().context("finding this binary")?;
    let hub = if args.in_process {
        Launch::InProcess
    } else {
        let bin = args.hub_bin.unwrap_or_else(|| me.with_file_name("twinhub"));
        Launch::Process {
            bin,
            log_filter: args.hub_log,
        }
    };
    let mut s = match args.mode {
        Mode::Quick => Settings::quick(hub),
        Mode::Full => Settings::full(hub),
    };
    if !args.scenarios.is_empty() {
        s.scenarios = args.scenarios;
    }
    if !args.concurrency.is_empty() {
        s.concurrency = args.concurrency;
    }
    if !args.cluster_concurrency.is_empty() {
        s.cluster_concurrency = args.cluster_concurrency;
    }
    if !args.cluster_latency_concurrency.is_empty() {
        s.cluster_latency_concurrency = args.cluster_latency_concurrency;
    }
    macro_rules! set {
        ($($field:ident = $value:expr),* $(,)?) => {
            $(if let Some(v) = $value { s.$field = v; })*
        };
    }
    set!(
        methods_devices = args.methods_devices,
        caller_conns = args.caller_conns,
        warmup_secs = args.warmup,
        duration_secs = args.duration,
        twin_devices = args.twin_devices,
        twin_inflight = args.twin_inflight,
        twin_duration_secs = args.twin_duration,
        connections = args.connections,
        connect_concurrency = args.connect_concurrency,
        source_addrs = args.source_addrs,
        fanout_devices = args.fanout_devices,
        fanout_concurrency = args.fanout_concurrency,
        telemetry_devices = args.telemetry_devices,
        telemetry_inflight = args.telemetry_inflight,
        telemetry_payload = args.telemetry_payload,
        telemetry_duration_secs = args.telemetry_duration,
        telemetry_rate = args.telemetry_rate,
        telemetry_latency_secs = args.telemetry_latency_duration,
        backlog_events = args.backlog,
        backlog_devices = args.backlog_devices,
        backlog_inflight = args.backlog_inflight,
        partitions = args.partitions,
        c2d_devices = args.c2d_devices,
        c2d_inflight = args.c2d_inflight,
        c2d_payload = args.c2d_payload,
        c2d_duration_secs = args.c2d_duration,
        c2d_rate = args.c2d_rate,
        c2d_latency_secs = args.c2d_latency_duration,
        routing_devices = args.routing_devices,
        routing_inflight = args.routing_inflight,
        routing_payload = args.routing_payload,
        routing_duration_secs = args.routing_duration,
        routing_rounds = args.routing_rounds,
        webhook_backlog = args.webhook_backlog,
        webhook_rate = args.webhook_rate,
        webhook_latency_secs = args.webhook_latency_duration,
        quiet_wait_secs = args.quiet_wait,
        query_twins = args.query_twins,
        query_repetitions = args.query_repetitions,
        query_bulk_concurrency = args.query_bulk_concurrency,
    );
    if args.routing_config.is_some() {
        s.routing_config = args.routing_config;
    }
    if args.c2d_max_queue_depth.is_some() {
        s.c2d_max_queue_depth = args.c2d_max_queue_depth;
    }
    s.mosquitto = match (args.no_mosquitto, args.mosquitto_bin) {
        (true, _) => Peer::Off,
        (false, Some(p)) => Peer::Bin(p),
        (false, None) => Peer::Auto,
    };
    s.floor = !args.no_floor;
    s.echo_exe = Some(me);
    s.work_dir = args.work_dir;
    s.keep_work_dir = args.keep_work_dir;
    Ok(s)
}

async fn run(args: RunArgs) -> Result<()> {
    let json = args.json.clone();
    let settings = settings(args)?;
    let report = twinhub_bench::run(settings, Progress::for_stderr()).await?;
    print!("{}", report.table());
    std::fs::write(&json, report.to_json() + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!("wrote {}", json.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::EchoServer { cert, key } => twinhub_bench::echo::serve_main(&cert, &key)
                .await
                .map_err(anyhow::Error::from),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

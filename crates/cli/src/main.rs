//! The `twinhub` binary: `serve` runs the hub; the other commands manage a hub through its
//! REST API with the SDK's `ServiceClient` (the same client Rust programs use): devices, modules,
//! twins, direct methods, twin queries, scheduled jobs and message routing.

use std::io::Write as _;
mod c2d;
mod ca;
mod demo;
mod interrupt;
mod module;
mod monitor;
mod routing;
mod trust;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use twinhub_sdk::proto::connection_string::ConnectionString;
use twinhub_sdk::proto::model::{CloudToDeviceMethod, DeviceStatus, JobResponse};
use twinhub_sdk::{NewDevice, ServiceClient};
use twinhub_server::{Config, HubFile, Overrides, RunningServer};

#[derive(Parser)]
#[command(
    name = "twinhub",
    version,
    about = "A self-hosted hub that speaks Azure IoT Hub's protocols"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reboot scenario end to end on a throwaway hub, and tell the story
    Demo(demo::DemoArgs),
    /// Run the hub (HTTPS REST + MQTT over WebSockets, and MQTT over TLS)
    Serve(ServeArgs),
    /// Verify a data dir offline (while no hub runs on it): the store's integrity and every
    /// record, hub.json, the TLS files. Exits non-zero if anything is wrong
    Check {
        #[arg(long, env = "TWINHUB_DATA_DIR", default_value = "./twinhub-data")]
        data_dir: PathBuf,
    },
    /// Print a service connection string read from the data dir; with --events, the built-in
    /// endpoint's Event Hub-compatible one (for the Event Hubs SDKs), or with --entity a custom
    /// stream endpoint's
    ConnectionString {
        /// Shared access policy to use [default: iothubowner; service with --events]
        #[arg(long)]
        policy: Option<String>,
        /// The Event Hub-compatible connection string of the built-in endpoint
        #[arg(long)]
        events: bool,
        /// With --events: the emulator form for the plaintext AMQP port (--amqp-plain-port)
        #[arg(long, requires = "events")]
        plain: bool,
        /// With --events: a custom stream endpoint's (EntityPath=NAME) instead of the built-in one
        #[arg(long, requires = "events", value_name = "NAME")]
        entity: Option<String>,
        #[arg(long, env = "TWINHUB_DATA_DIR", default_value = "./twinhub-data")]
        data_dir: PathBuf,
        /// Read the cluster's shared identity from its PostgreSQL store instead of --data-dir
        #[arg(long, env = "TWINHUB_STORE", value_name = "URL")]
        store: Option<String>,
    },
    /// Manage device identities
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage the hub's X.509 CA certificates and their proof of possession
    Ca {
        #[command(subcommand)]
        command: ca::CaCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Issue development certificates (device, proof of possession) from a CA key you hold
    Cert {
        #[command(subcommand)]
        command: ca::CertCommand,
    },
    /// Read and update device twins
    Twin {
        #[command(subcommand)]
        command: TwinCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage module identities (identities under a device with their own keys and twin)
    Module {
        #[command(subcommand)]
        command: module::ModuleCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Invoke direct methods on devices and modules
    Method {
        #[command(subcommand)]
        command: module::MethodCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage custom routing endpoints (streams hosted by twinhub, webhooks)
    Endpoint {
        #[command(subcommand)]
        command: routing::EndpointCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage message routes, test them, and switch the fallback route
    Route {
        #[command(subcommand)]
        command: routing::RouteCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage message enrichments (application properties added per endpoint)
    Enrichment {
        #[command(subcommand)]
        command: routing::EnrichmentCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Manage the consumer groups of the built-in events endpoint
    ConsumerGroup {
        #[command(subcommand)]
        command: ConsumerGroupCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Send cloud-to-device messages, read their delivery feedback, purge a device's queue
    C2d(c2d::C2dArgs),
    /// Print device-to-cloud messages as they arrive on the built-in events endpoint (AMQP),
    /// one JSON object per line
    MonitorEvents(monitor::MonitorArgs),
    /// Make clients trust the hub's development CA (like `mkcert -install`); without flags,
    /// prints what it would do
    Trust(trust::TrustArgs),
    /// Run a twin query and print every row of every page
    Query {
        #[command(flatten)]
        args: QueryArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Schedule, inspect and cancel jobs that call a method or update twins on many devices
    Job {
        #[command(subcommand)]
        command: JobCommand,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
struct QueryArgs {
    /// The query, e.g. "SELECT * FROM devices WHERE tags.plant = 'Redmond43'"
    query: String,
    /// Rows per request (x-ms-max-item-count, 1 to 1000) [default: the hub's, 100]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    page_size: Option<u16>,
    /// Print an aligned table (one column per property) instead of JSON lines
    #[arg(long)]
    table: bool,
}

/// When a job starts and how long it may run.
#[derive(Args)]
struct JobTiming {
    /// Start time, RFC 3339 (e.g. 2030-01-01T00:00:00Z) [default: now]
    #[arg(long)]
    start: Option<String>,
    /// Seconds the whole job may run before the rest of its devices fail [default: 3600]
    #[arg(long)]
    max_execution: Option<u64>,
}

#[derive(Subcommand)]
enum JobCommand {
    /// Call a direct method on every device matching a condition
    ScheduleMethod {
        /// The new job's id
        id: String,
        /// Which devices: a WHERE condition (e.g. "tags.building = '43'"), or "*" for all
        #[arg(long)]
        condition: String,
        /// The method's name
        #[arg(long)]
        method: String,
        /// The method's payload, any JSON [default: null]
        #[arg(long)]
        payload: Option<String>,
        /// Seconds to wait for each device's answer (5 to 300) [default: 30]
        #[arg(long)]
        response_timeout: Option<i64>,
        /// Seconds to wait for an offline device to connect (0 to 300) [default: 0]
        #[arg(long)]
        connect_timeout: Option<i64>,
        #[command(flatten)]
        timing: JobTiming,
    },
    /// Patch desired properties and/or tags on every device matching a condition
    ScheduleTwin {
        /// The new job's id
        id: String,
        /// Which devices: a WHERE condition, or "*" for all
        #[arg(long)]
        condition: String,
        /// Desired properties patch, a JSON object (null deletes a key)
        #[arg(long)]
        desired: Option<String>,
        /// Tags patch, a JSON object (null deletes a key)
        #[arg(long)]
        tags: Option<String>,
        #[command(flatten)]
        timing: JobTiming,
    },
    /// Show a job's status and device statistics as JSON
    Show {
        id: String,
        /// Poll until the job has completed, failed or been cancelled
        #[arg(long)]
        wait: bool,
    },
    /// List jobs as a JSON array
    List {
        /// Only jobs of this type (scheduleDeviceMethod, scheduleUpdateTwin)
        #[arg(long = "type")]
        job_type: Option<String>,
        /// Only jobs in this status (scheduled, running, completed, failed, cancelled)
        #[arg(long)]
        status: Option<String>,
    },
    /// Cancel a job that has not finished
    Cancel { id: String },
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML file with settings (keys as the flags, with underscores)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the store, TLS material and policies live [default: ./twinhub-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL database shared by the nodes of a cluster (postgres://user:password@host/db)
    /// instead of the embedded store in --data-dir
    #[arg(long)]
    store: Option<String>,
    /// The NATS server (with JetStream) of a cluster, nats://host:port; needs --store
    #[arg(long)]
    cluster: Option<String>,
    /// This node's name in the cluster [default: the machine's hostname]
    #[arg(long)]
    node_id: Option<String>,
    /// The hub's name in connection strings and SAS tokens [default: localhost]
    #[arg(long)]
    hostname: Option<String>,
    /// Address to listen on [default: 127.0.0.1]
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// HTTPS port: REST API and MQTT over WebSockets [default: 443]
    #[arg(long)]
    https_port: Option<u16>,
    /// MQTT over TLS port [default: 8883]
    #[arg(long)]
    mqtt_port: Option<u16>,
    /// Your own certificate chain (PEM) instead of the development CA
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Seconds a new MQTT connection has to send CONNECT [default: 10]
    #[arg(long)]
    mqtt_connect_timeout: Option<u64>,
    /// Open connections on both ports together [default: the open-file limit less 128]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections still authenticating (TLS handshake, first request, MQTT CONNECT) [default: 1024]
    #[arg(long)]
    max_unauthenticated: Option<usize>,
    /// Refuse SAS tokens that expire more than this many seconds ahead [default: 31536000, a year]
    #[arg(long)]
    max_token_lifetime: Option<u64>,
    /// MQTT connects per second per device, 0 for no limit [default: 5]
    #[arg(long)]
    throttle_device_connects: Option<f64>,
    /// Reported-property patches per second per device, 0 for no limit [default: 0]
    #[arg(long)]
    throttle_device_twin_writes: Option<f64>,
    /// Device-to-cloud messages per second per device (acks are delayed past it), 0 for no limit [default: 0]
    #[arg(long)]
    throttle_device_d2c: Option<f64>,
    /// REST operations per second for the whole hub, 0 for no limit [default: 0]
    #[arg(long)]
    throttle_rest: Option<f64>,
    /// Seconds an HTTPS connection may stay silent with no request in flight [default: 120]
    #[arg(long)]
    http_idle_timeout: Option<u64>,
    /// AMQP over TLS port: the Event Hub-compatible endpoint [default: 5671]
    #[arg(long)]
    amqp_port: Option<u16>,
    /// Also serve AMQP without TLS on this port, for the Event Hubs SDKs' emulator mode (loopback binds only)
    #[arg(long)]
    amqp_plain_port: Option<u16>,
    /// Partitions of the built-in events endpoint, 1 to 32; fixed once telemetry was stored [default: 4]
    #[arg(long)]
    partitions: Option<u32>,
    /// Seconds telemetry is kept on the built-in endpoint [default: 86400, a day]
    #[arg(long)]
    retention: Option<u64>,
    /// Bytes of telemetry kept per partition, oldest dropped first [default: no bound]
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Cloud-to-device messages a device's queue holds, 1 to 5000 [default: 50, as IoT Hub]
    #[arg(long)]
    c2d_max_queue_depth: Option<usize>,
    /// Seconds a cloud-to-device message lives when its sender sets no expiry, 60 to 172800 [default: 3600]
    #[arg(long)]
    c2d_default_ttl: Option<u64>,
    /// Abandons after which a cloud-to-device message is dead-lettered, 1 to 100 [default: 10]
    #[arg(long)]
    c2d_max_delivery_count: Option<u32>,
    /// Milliseconds between feedback messages unless 64 records wait [default: 15000, as IoT Hub]
    #[arg(long)]
    c2d_feedback_interval_ms: Option<u64>,
}

/// Which hub a management command talks to.
#[derive(Args)]
struct Target {
    /// A service connection string (else read from --data-dir)
    #[arg(
        long,
        global = true,
        env = "TWINHUB_CONNECTION_STRING",
        hide_env_values = true
    )]
    connection_string: Option<String>,
    /// A local hub's data dir, for its connection string and CA
    #[arg(
        long,
        global = true,
        env = "TWINHUB_DATA_DIR",
        default_value = "./twinhub-data"
    )]
    data_dir: PathBuf,
    /// A CA certificate (PEM) to trust besides the system roots
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConsumerGroupCommand {
    /// Create a consumer group (creating one that exists is not an error)
    Create { name: String },
    /// List the consumer groups, one per line
    List,
    /// Delete a consumer group ($Default cannot be deleted)
    Delete { name: String },
}

async fn consumer_group(command: ConsumerGroupCommand, target: &Target) -> Result<()> {
    let (client, _) = client(target)?;
    match command {
        ConsumerGroupCommand::Create { name } => {
            let name = client.create_consumer_group(&name).await?;
            println!("{name}");
        }
        ConsumerGroupCommand::List => {
            for name in client.list_consumer_groups().await? {
                println!("{name}");
            }
        }
        ConsumerGroupCommand::Delete { name } => {
            client.delete_consumer_group(&name).await?;
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device with generated SAS keys, or an X.509 one (--auth selfSigned|ca)
    Create {
        id: String,
        #[arg(long)]
        disabled: bool,
        /// Mark it as an IoT Edge device
        #[arg(long)]
        edge: bool,
        /// How it signs in: SAS keys, a certificate by thumbprint, or one from a verified CA
        #[arg(long, default_value = "sas", value_parser = ["sas", "selfSigned", "ca"])]
        auth: String,
        /// With --auth selfSigned: the certificate (PEM) whose thumbprint to register
        #[arg(long)]
        cert: Option<PathBuf>,
        /// With --auth selfSigned: a second certificate (the secondary thumbprint)
        #[arg(long, requires = "cert")]
        secondary_cert: Option<PathBuf>,
    },
    /// Show a device identity as JSON
    Show { id: String },
    /// List devices as a JSON array
    List {
        #[arg(long)]
        top: Option<usize>,
    },
    /// Change a device's status
    Update {
        id: String,
        #[arg(long, value_parser = ["enabled", "disabled"])]
        status: String,
        #[arg(long)]
        status_reason: Option<String>,
    },
    /// Delete a device
    Delete { id: String },
    /// Print the device's connection string
    ConnectionString { id: String },
}

#[derive(Subcommand)]
enum TwinCommand {
    /// Show a device twin as JSON
    Show {
        id: String,
        /// The twin of this module of the device instead
        #[arg(long)]
        module: Option<String>,
    },
    /// Patch tags and/or desired properties (null deletes a key)
    Update {
        id: String,
        /// Patch the twin of this module of the device instead
        #[arg(long)]
        module: Option<String>,
        /// Desired properties patch, a JSON object
        #[arg(long)]
        desired: Option<String>,
        /// Tags patch, a JSON object
        #[arg(long)]
        tags: Option<String>,
    },
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Check { data_dir } => {
            let report = twinhub_server::check::check_data_dir(&data_dir);
            println!("twinhub check: {}", absolute(&data_dir).display());
            for line in &report.lines {
                println!("  {line}");
            }
            if report.is_clean() {
                println!("no problems found");
                Ok(())
            } else {
                bail!("{} problem(s) found", report.problems)
            }
        }
        Command::ConnectionString {
            policy,
            events,
            plain,
            entity,
            data_dir,
            store,
        } => {
            let (file, source) = match &store {
                Some(url) => (
                    twinhub_server::shared_identity::hub_file_from_store(url).await?,
                    "the cluster's store".to_string(),
                ),
                None => (HubFile::read(&data_dir)?, data_dir.display().to_string()),
            };
            let policy =
                policy.unwrap_or_else(|| if events { "service" } else { "iothubowner" }.into());
            if !file.policies.iter().any(|p| p.name == policy) {
                bail!("no policy named '{policy}' in {source}");
            }
            let cs = if events {
                let found = match &entity {
                    Some(name) => file.entity_connection_string(&policy, plain, name),
                    None => file.events_connection_string(&policy, plain),
                };
                found.ok_or_else(|| {
                    if plain {
                        anyhow!("the hub last ran without --amqp-plain-port; start it with one")
                    } else {
                        anyhow!("the hub has not run with the events endpoint yet; start it once")
                    }
                })?
            } else {
                file.connection_string(&policy)
                    .ok_or_else(|| anyhow!("no policy named '{policy}'"))?
            };
            println!("{cs}");
            Ok(())
        }
        Command::Device { command, target } => device(command, &target).await,
        Command::Ca { command, target } => ca::ca(command, &target).await,
        Command::Cert { command } => ca::cert(command).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Twin { command, target } => twin(command, &target).await,
        Command::Module { command, target } => module::module(command, &target).await,
        Command::Method { command, target } => module::method(command, &target).await,
        Command::Query { args, target } => query(args, &target).await,
        Command::ConsumerGroup { command, target } => consumer_group(command, &target).await,
        Command::Endpoint { command, target } => routing::endpoint(command, &target).await,
        Command::Route { command, target } => routing::route(command, &target).await,
        Command::Enrichment { command, target } => routing::enrichment(command, &target).await,
        Command::Trust(args) => trust::run(args),
        Command::MonitorEvents(args) => monitor::run(args).await,
        Command::C2d(args) => c2d::run(args).await,
        Command::Job { command, target } => job(command, &target).await,
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(args: ServeArgs) -> Result<()> {
    init_logs();
    let overrides = Overrides {
        data_dir: args.data_dir,
        store: args.store,
        cluster: args.cluster,
        node_id: args.node_id,
        hostname: args.hostname,
        bind: args.bind,
        https_port: args.https_port,
        mqtt_port: args.mqtt_port,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        mqtt_connect_timeout: args.mqtt_connect_timeout,
        max_connections: args.max_connections,
        max_unauthenticated: args.max_unauthenticated,
        max_token_lifetime: args.max_token_lifetime,
        throttle_device_connects: args.throttle_device_connects,
        throttle_device_twin_writes: args.throttle_device_twin_writes,
        throttle_device_d2c: args.throttle_device_d2c,
        throttle_rest: args.throttle_rest,
        http_idle_timeout: args.http_idle_timeout,
        amqp_port: args.amqp_port,
        amqp_plain_port: args.amqp_plain_port,
        partitions: args.partitions,
        retention: args.retention,
        retention_bytes: args.retention_bytes,
        c2d_max_queue_depth: args.c2d_max_queue_depth,
        c2d_default_ttl: args.c2d_default_ttl,
        c2d_max_delivery_count: args.c2d_max_delivery_count,
        c2d_feedback_interval_ms: args.c2d_feedback_interval_ms,
        // The webhook retry schedule is set in the config file or the environment only.
        ..Default::default()
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    // Before the banner, so a signal sent as soon as it shows still shuts down gracefully.
    let mut interrupt = interrupt::Interrupt::install().context("installing signal handlers")?;
    let server = RunningServer::start(config).await?;
    print_banner(&server);
    interrupt.wait().await;
    tracing::info!("shutting down (a second Ctrl-C or SIGTERM stops at once)");
    tokio::select! {
        _ = server.shutdown() => {}
        _ = interrupt.wait() => {
            // Acknowledged writes are durable already; only in-flight requests are cut.
            eprintln!("stopping at once");
            std::process::exit(130);
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn print_banner(server: &RunningServer) {
    let c = &server.config;
    println!(
        "twinhub {} is serving hub '{}'",
        env!("CARGO_PKG_VERSION"),
        c.hostname
    );
    println!(
        "  HTTPS (REST API, MQTT over WebSockets): https://{}",
        server.https_addr
    );
    println!(
        "  Web console:                            https://{}/",
        server.https_addr
    );
    println!(
        "  MQTT over TLS:                          mqtts://{}",
        server.mqtt_addr
    );
    println!(
        "  AMQP over TLS (Event Hub-compatible):   amqps://{}/{}",
        server.amqp_addr,
        server
            .hub_file
            .event_hub_name
            .as_deref()
            .unwrap_or_default()
    );
    if let Some(plain) = server.amqp_plain_addr {
        println!("  AMQP without TLS (emulator mode):       amqp://{plain}");
    }
    println!(
        "  data dir:                               {}",
        absolute(&c.data_dir).display()
    );
    println!();
    // The owner key grants everything: show it to a person at a terminal, never to a log
    // (stdout under a service manager ends up in the journal).
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        if let Some(cs) = server.connection_string("iothubowner") {
            println!("Service connection string (policy iothubowner):");
            println!("  {cs}");
            println!();
        }
    } else {
        println!("Service connection string: not printed (stdout is not a terminal); run");
        println!(
            "  twinhub connection-string --data-dir {}",
            absolute(&c.data_dir).display()
        );
        println!();
    }
    if let Some(bundle) = &server.ca_bundle {
        let bundle = absolute(bundle);
        println!("Make the official SDKs trust the development CA:");
        println!(
            "  export REQUESTS_CA_BUNDLE={}   # service SDK (HTTPS)",
            bundle.display()
        );
        println!(
            "  export SSL_CERT_FILE={}        # device SDK (MQTT/TLS)",
            bundle.display()
        );
        println!();
    }
    if server.https_addr.port() != 443 || server.mqtt_addr.port() != 8883 {
        println!(
            "Note: the official device SDKs only dial ports 8883 (MQTT) and 443 (WebSockets)."
        );
        println!();
    }
    println!("Next: twinhub device create my-device && twinhub device connection-string my-device");
}

/// A client for the target hub, and its host name for device connection strings.
fn client(target: &Target) -> Result<(ServiceClient, String)> {
    client_with_timeout(target, Duration::from_secs(100))
}

/// [`client`] with a request timeout other than the SDK's 100 s (a method call waits inside it).
fn client_with_timeout(target: &Target, timeout: Duration) -> Result<(ServiceClient, String)> {
    let (cs, default_ca) = match &target.connection_string {
        Some(cs) => (cs.clone(), None),
        None => {
            let file = HubFile::read(&target.data_dir)
                .context("no --connection-string given and no local hub data dir found")?;
            let cs = file
                .connection_string("iothubowner")
                .ok_or_else(|| anyhow!("the data dir has no iothubowner policy"))?;
            (cs, Some(target.data_dir.join("tls").join("ca.pem")))
        }
    };
    let parsed: ConnectionString = cs
        .parse()
        .map_err(|e| anyhow!("invalid connection string: {e}"))?;
    let mut builder = ServiceClient::builder(&cs).timeout(timeout);
    let ca = target.ca.clone().or(default_ca.filter(|p| p.exists()));
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.extra_ca_pem(pem);
    }
    // Device connection strings carry the bare host: the device SDK cannot take a port.
    let host = parsed
        .host_name
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(parsed.host_name.clone(), |(h, _)| h.to_string());
    Ok((builder.build()?, host))
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    print_line(&serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// Prints `text` and a newline on stdout; `false` when the reader has gone away
/// (`twinhub device list | head`), which is not an error and must not panic as `println!` does.
pub(crate) fn print_line(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        other => other.map(|()| true).map_err(Into::into),
    }
}

/// The twin patch `--desired` and `--tags` describe: `{"tags": .., "properties": {"desired": ..}}`.
fn twin_patch(desired: Option<&str>, tags: Option<&str>) -> Result<Value> {
    if desired.is_none() && tags.is_none() {
        bail!("give --desired and/or --tags");
    }
    let mut patch = serde_json::Map::new();
    if let Some(t) = tags {
        patch.insert("tags".into(), parse_object("tags", t)?);
    }
    if let Some(d) = desired {
        patch.insert(
            "properties".into(),
            serde_json::json!({ "desired": parse_object("desired", d)? }),
        );
    }
    Ok(Value::Object(patch))
}

fn parse_object(flag: &str, text: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("--{flag} is not valid JSON"))?;
    if !v.is_object() {
        bail!("--{flag} must be a JSON object");
    }
    Ok(v)
}

async fn device(command: DeviceCommand, target: &Target) -> Result<()> {
    let (svc, host) = client(target)?;
    match command {
        DeviceCommand::Create {
            id,
            disabled,
            edge,
            auth,
            cert,
            secondary_cert,
        } => {
            if auth != "sas" {
                if disabled || edge {
                    bail!("--disabled and --edge are for SAS devices here");
                }
                return ca::create_device(
                    &svc,
                    &id,
                    &auth,
                    cert.as_deref(),
                    secondary_cert.as_deref(),
                )
                .await;
            }
            let new = NewDevice {
                status: Some(if disabled {
                    DeviceStatus::Disabled
                } else {
                    DeviceStatus::Enabled
                }),
                iot_edge: edge,
                ..Default::default()
            };
            print_json(&svc.create_device(&id, new).await?)
        }
        DeviceCommand::Show { id } => print_json(&svc.get_device(&id).await?),
        DeviceCommand::List { top } => print_json(&svc.list_devices(top).await?),
        DeviceCommand::Update {
            id,
            status,
            status_reason,
        } => {
            let mut device = svc.get_device(&id).await?;
            device.status = if status == "disabled" {
                DeviceStatus::Disabled
            } else {
                DeviceStatus::Enabled
            };
            device.status_reason = status_reason;
            let etag = device.etag.clone();
            print_json(&svc.update_device(&device, etag.as_deref()).await?)
        }
        DeviceCommand::Delete { id } => {
            svc.delete_device(&id, None).await?;
            eprintln!("deleted device {id}");
            Ok(())
        }
        DeviceCommand::ConnectionString { id } => {
            let device = svc.get_device(&id).await?;
            let key = device
                .authentication
                .and_then(|a| a.symmetric_key)
                .and_then(|k| k.primary_key)
                .ok_or_else(|| anyhow!("device {id} does not use SAS keys"))?;
            println!("{}", ConnectionString::device(&host, &id, &key));
            Ok(())
        }
    }
}

async fn twin(command: TwinCommand, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    match command {
        TwinCommand::Show {
            id,
            module: Some(m),
        } => module::show_twin(&svc, &id, &m).await,
        TwinCommand::Show { id, module: None } => print_json(&svc.get_twin(&id).await?),
        TwinCommand::Update {
            id,
            module,
            desired,
            tags,
        } => {
            let patch = twin_patch(desired.as_deref(), tags.as_deref())?;
            match module {
                Some(m) => module::update_twin(&svc, &id, &m, &patch).await,
                None => print_json(&svc.update_twin(&id, &patch, None).await?),
            }
        }
    }
}

async fn query(args: QueryArgs, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    let mut pages = svc.query(args.query);
    if let Some(n) = args.page_size {
        pages = pages.page_size(usize::from(n));
    }
    let mut out = std::io::stdout().lock();
    if args.table {
        let mut rows = Vec::new();
        while let Some(page) = pages.next_page().await? {
            rows.extend(page.items);
        }
        return ignore_closed_pipe(out.write_all(render_table(&rows)?.as_bytes()));
    }
    // JSON lines as the pages arrive, so a large result starts printing at once.
    while let Some(page) = pages.next_page().await? {
        for row in &page.items {
            ignore_closed_pipe(writeln!(out, "{}", serde_json::to_string(row)?))?;
        }
        ignore_closed_pipe(out.flush())?;
    }
    Ok(())
}

/// A reader that stopped reading (`twinhub query ... | head`) is not an error.
fn ignore_closed_pipe(result: std::io::Result<()>) -> Result<()> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Renders flat rows (JSON objects) as a left-aligned table, one column per property in order
/// of first appearance. Strings print bare; other values, nested ones included, as compact JSON.
fn render_table(rows: &[Value]) -> Result<String> {
    if rows.is_empty() {
        return Ok(String::new());
    }
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        let Value::Object(fields) = row else {
            bail!("--table needs rows that are JSON objects; got {row}");
        };
        for key in fields.keys() {
            if !columns.contains(&key.as_str()) {
                columns.push(key);
            }
        }
    }
    let cell = |row: &Value, column: &str| match row.get(column) {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|c| cell(row, c)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: &[String]| {
        let mut text = String::new();
        for (i, (value, width)) in values.iter().zip(&widths).enumerate() {
            if i + 1 == values.len() {
                text.push_str(value);
            } else {
                let pad = width.saturating_sub(value.chars().count());
                text.push_str(value);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        // Empty trailing cells would leave padding at the end of the line.
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let header: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let mut table = line(&header);
    table.push_str(&line(&rule));
    for row in &cells {
        table.push_str(&line(row));
    }
    Ok(table)
}

fn is_finished(job: &JobResponse) -> bool {
    matches!(job.status.as_str(), "completed" | "failed" | "cancelled")
}

async fn job(command: JobCommand, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    match command {
        JobCommand::ScheduleMethod {
            id,
            condition,
            method,
            payload,
            response_timeout,
            connect_timeout,
            timing,
        } => {
            let payload = payload
                .map(|p| serde_json::from_str::<Value>(&p).context("--payload is not valid JSON"))
                .transpose()?;
            let call = CloudToDeviceMethod {
                method_name: method,
                payload,
                response_timeout_in_seconds: response_timeout,
                connect_timeout_in_seconds: connect_timeout,
            };
            let created = svc
                .schedule_method_job(&id, &condition, &call, timing.start, timing.max_execution)
                .await?;
            print_json(&created)
        }
        JobCommand::ScheduleTwin {
            id,
            condition,
            desired,
            tags,
            timing,
        } => {
            let patch = twin_patch(desired.as_deref(), tags.as_deref())?;
            let created = svc
                .schedule_twin_job(&id, &condition, &patch, timing.start, timing.max_execution)
                .await?;
            print_json(&created)
        }
        JobCommand::Show { id, wait } => {
            let mut state = svc.get_job(&id).await?;
            while wait && !is_finished(&state) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                state = svc.get_job(&id).await?;
            }
            print_json(&state)
        }
        JobCommand::List { job_type, status } => print_json(
            &svc.list_jobs(job_type.as_deref(), status.as_deref())
                .await?,
        ),
        JobCommand::Cancel { id } => print_json(&svc.cancel_job(&id).await?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use serde_json::json;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn table_aligns_columns_in_first_seen_order() {
        let rows = [
            json!({"deviceId": "d1", "n": 3}),
            json!({"deviceId": "device-22", "fw": "1.2", "nested": {"a": [1]}}),
        ];
        let table = render_table(&rows).unwrap();
        let expected = "\
deviceId   n  fw   nested
---------  -  ---  ---------
d1         3
device-22     1.2  {\"a\":[1]}
";
        assert_eq!(table, expected);
    }

    #[test]
    fn table_refuses_rows_that_are_not_objects() {
        assert!(render_table(&[json!(1)]).is_err());
        assert_eq!(render_table(&[]).unwrap(), "");
    }

    #[test]
    fn job_commands_parse() {
        let cli = Cli::try_parse_from([
            "twinhub",
            "job",
            "schedule-method",
            "j1",
            "--condition",
            "tags.building = '43'",
            "--method",
            "lockDoor",
            "--payload",
            "{\"x\":1}",
            "--max-execution",
            "60",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Job {
                command: JobCommand::ScheduleMethod { .. },
                ..
            }
        ));
        assert!(Cli::try_parse_from(["twinhub", "query", "SELECT *", "--page-size", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["twinhub", "job", "schedule-method", "j", "--method", "m"])
                .is_err()
        );
    }
}

//! The `twinhub` binary: `serve` runs the hub; the other commands manage a hub through its
//! REST API with the SDK's `ServiceClient` (the same client Rust programs use).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use twinhub_sdk::proto::connection_string::ConnectionString;
use twinhub_sdk::proto::model::DeviceStatus;
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
    /// Run the hub (HTTPS REST + MQTT over WebSockets, and MQTT over TLS)
    Serve(ServeArgs),
    /// Print a service connection string read from the data dir
    ConnectionString {
        /// Shared access policy to use
        #[arg(long, default_value = "iothubowner")]
        policy: String,
        #[arg(long, env = "TWINHUB_DATA_DIR", default_value = "./twinhub-data")]
        data_dir: PathBuf,
    },
    /// Manage device identities
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Read and update device twins
    Twin {
        #[command(subcommand)]
        command: TwinCommand,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML file with settings (keys as the flags, with underscores)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the store, TLS material and policies live [default: ./twinhub-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
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
enum DeviceCommand {
    /// Register a device with generated SAS keys
    Create {
        id: String,
        #[arg(long)]
        disabled: bool,
        /// Mark it as an IoT Edge device
        #[arg(long)]
        edge: bool,
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
    Show { id: String },
    /// Patch tags and/or desired properties (null deletes a key)
    Update {
        id: String,
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
        Command::ConnectionString { policy, data_dir } => {
            let file = HubFile::read(&data_dir)?;
            let cs = file
                .connection_string(&policy)
                .ok_or_else(|| anyhow!("no policy named '{policy}' in {}", data_dir.display()))?;
            println!("{cs}");
            Ok(())
        }
        Command::Device { command, target } => device(command, &target).await,
        Command::Twin { command, target } => twin(command, &target).await,
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
        hostname: args.hostname,
        bind: args.bind,
        https_port: args.https_port,
        mqtt_port: args.mqtt_port,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        mqtt_connect_timeout: args.mqtt_connect_timeout,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let server = RunningServer::start(config).await?;
    print_banner(&server);
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
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
        "  MQTT over TLS:                          mqtts://{}",
        server.mqtt_addr
    );
    println!(
        "  data dir:                               {}",
        absolute(&c.data_dir).display()
    );
    println!();
    if let Some(cs) = server.connection_string("iothubowner") {
        println!("Service connection string (policy iothubowner):");
        println!("  {cs}");
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

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A client for the target hub, and its host name for device connection strings.
fn client(target: &Target) -> Result<(ServiceClient, String)> {
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
    let mut builder = ServiceClient::builder(&cs);
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
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
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
        DeviceCommand::Create { id, disabled, edge } => {
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
        TwinCommand::Show { id } => print_json(&svc.get_twin(&id).await?),
        TwinCommand::Update { id, desired, tags } => {
            if desired.is_none() && tags.is_none() {
                bail!("give --desired and/or --tags");
            }
            let mut patch = serde_json::Map::new();
            if let Some(t) = tags {
                patch.insert("tags".into(), parse_object("tags", &t)?);
            }
            if let Some(d) = desired {
                patch.insert(
                    "properties".into(),
                    serde_json::json!({ "desired": parse_object("desired", &d)? }),
                );
            }
            print_json(&svc.update_twin(&id, &Value::Object(patch), None).await?)
        }
    }
}

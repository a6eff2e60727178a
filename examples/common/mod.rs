//! What every example program shares: the command-line and environment settings of device and
//! service programs (as Azure's own samples read them), building the SDK clients from them,
//! bounding a run for tests, stopping on Ctrl-C, and timestamps for reported properties.
//!
//! Nothing here is twinhub-specific: the same programs run against Azure IoT Hub.

// Each example uses its own subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use twinhub_sdk::device::BuiltClient;
use twinhub_sdk::proto::model::{CloudToDeviceMethod, CloudToDeviceMethodResult};
use twinhub_sdk::{
    ClientBuilder, ConnectionState, DeviceClient, MethodRequests, ModuleClient, ServiceClient,
    Transport,
};

// One implementation of "stop on Ctrl-C or SIGTERM" for the hub and the programs alike.
#[path = "../../crates/cli/src/interrupt.rs"]
mod interrupt;
pub use interrupt::Interrupt;

/// Installs the Ctrl-C and SIGTERM handlers; call it before the program says it is ready.
pub fn interrupt() -> Result<Interrupt> {
    Interrupt::install().context("installing signal handlers")
}

/// The answer text of the seed devices (`{"Response": ...}`).
pub const DEVICE_RESPONSE: &str = "This is the response from the device";

/// How a device program reaches its hub.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// The device connection string (HostName=..;DeviceId=..;SharedAccessKey=..)
    #[arg(long, env = "IOTHUB_DEVICE_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: String,
    /// MQTT over TLS (port 8883) or MQTT over WebSockets (port 443)
    #[arg(long, value_enum, env = "IOTHUB_DEVICE_TRANSPORT", default_value_t = TransportArg::Mqtt)]
    pub transport: TransportArg,
    /// Dial this port instead of the transport's standard one (8883 or 443)
    #[arg(long)]
    pub port: Option<u16>,
    /// Trust this CA certificate (PEM) too; the system roots, or the bundle named by
    /// SSL_CERT_FILE when it is set, are always trusted
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    #[command(flatten)]
    pub bounds: Bounds,
}

/// How a module program reaches its hub.
#[derive(Debug, Args)]
pub struct ModuleArgs {
    /// The module connection string (HostName=..;DeviceId=..;ModuleId=..;SharedAccessKey=..)
    #[arg(long, env = "IOTHUB_MODULE_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: String,
    /// MQTT over TLS (port 8883) or MQTT over WebSockets (port 443)
    #[arg(long, value_enum, env = "IOTHUB_DEVICE_TRANSPORT", default_value_t = TransportArg::Mqtt)]
    pub transport: TransportArg,
    /// Dial this port instead of the transport's standard one (8883 or 443)
    #[arg(long)]
    pub port: Option<u16>,
    /// Trust this CA certificate (PEM) too; the system roots, or the bundle named by
    /// SSL_CERT_FILE when it is set, are always trusted
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    #[command(flatten)]
    pub bounds: Bounds,
}

impl ModuleArgs {
    /// A module client for the hub, not yet connected.
    pub fn client(&self) -> Result<ModuleClient> {
        let builder = ModuleClient::builder(&self.connection_string);
        Ok(configure(builder, self.transport, self.port, self.ca.as_deref())?.build()?)
    }
}

/// Applies the transport, port and CA options a device or module program takes.
fn configure<C: BuiltClient>(
    builder: ClientBuilder<C>,
    transport: TransportArg,
    port: Option<u16>,
    ca: Option<&std::path::Path>,
) -> Result<ClientBuilder<C>> {
    let mut builder = builder.transport(transport.transport());
    if let Some(port) = port {
        builder = builder.port(port);
    }
    if let Some(ca) = ca {
        builder = builder.extra_ca_pem(read_ca(ca)?);
    }
    Ok(builder)
}

/// The two transports, as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// MQTT 3.1.1 over TLS
    Mqtt,
    /// MQTT 3.1.1 over WebSockets
    #[value(alias = "websockets", alias = "ws")]
    Websocket,
}

impl TransportArg {
    pub fn transport(self) -> Transport {
        match self {
            TransportArg::Mqtt => Transport::Mqtt,
            TransportArg::Websocket => Transport::WebSocket,
        }
    }

    /// The protocol name the seed programs print.
    pub fn label(self) -> &'static str {
        match self {
            TransportArg::Mqtt => "MQTT",
            TransportArg::Websocket => "MQTT_WS",
        }
    }
}

/// Bounds on how long a device program serves, so tests and scripts can run it to an end.
#[derive(Debug, Clone, Copy, Args)]
pub struct Bounds {
    /// Exit after handling this many requests (default: serve until Ctrl-C)
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Exit after this many seconds; with --max-requests, having handled fewer is an error
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<Duration>,
}

/// How a service program reaches its hub and which device it drives.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The hub's service connection string (HostName=..;SharedAccessKeyName=..;SharedAccessKey=..)
    #[arg(long, env = "IOTHUB_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: String,
    /// The device to call
    #[arg(long, env = "IOTHUB_DEVICE_ID")]
    pub device_id: String,
    /// Trust this CA certificate (PEM) too; the system roots, or the bundle named by
    /// SSL_CERT_FILE when it is set, are always trusted
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Seconds the hub waits for the device to answer a method (5-300)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(i64).range(5..=300))]
    pub response_timeout: i64,
    /// Seconds the hub waits for the device to come online (0-300)
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(i64).range(0..=300))]
    pub connect_timeout: i64,
}

impl ServiceArgs {
    /// A service client for the hub whose requests outlast the method timeouts.
    pub fn client(&self) -> Result<ServiceClient> {
        let mut builder = ServiceClient::builder(&self.connection_string).timeout(
            Duration::from_secs(self.response_timeout.unsigned_abs())
                + Duration::from_secs(self.connect_timeout.unsigned_abs())
                + Duration::from_secs(30),
        );
        if let Some(ca) = &self.ca {
            builder = builder.extra_ca_pem(read_ca(ca)?);
        }
        Ok(builder.build()?)
    }

    /// Invokes `method` on the device with `payload` and the timeouts given.
    pub async fn invoke(
        &self,
        service: &ServiceClient,
        method: &str,
        payload: Value,
    ) -> Result<CloudToDeviceMethodResult> {
        let call = CloudToDeviceMethod {
            method_name: method.to_string(),
            payload: Some(payload),
            response_timeout_in_seconds: Some(self.response_timeout),
            connect_timeout_in_seconds: Some(self.connect_timeout),
        };
        service
            .invoke_method(&self.device_id, &call)
            .await
            .with_context(|| format!("invoking {method} on device '{}' failed", self.device_id))
    }

    /// The banner lines the seed service programs print.
    pub fn print_banner(&self, sample: &str) {
        println!("Starting the IoT Hub Service Client {sample} Rust sample...");
        println!(
            "    Connection string = {}",
            redacted(&self.connection_string)
        );
        println!("    Device ID         = {}", self.device_id);
    }
}

/// The process exit for a program's result: the error and its causes on one stderr line, as
/// the `twinhub` binary prints them.
pub fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a non-negative number of seconds such as `5` or `0.25`.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{text}' is not a usable duration"))
}

fn read_ca(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the CA file {}", path.display()))
}

impl DeviceArgs {
    /// A device client for the hub, not yet connected.
    pub fn client(&self) -> Result<DeviceClient> {
        let builder = DeviceClient::builder(&self.connection_string);
        Ok(configure(builder, self.transport, self.port, self.ca.as_deref())?.build()?)
    }
}

/// The connection string with its key replaced, for the banner the seed programs print.
pub fn redacted(connection_string: &str) -> String {
    connection_string
        .split(';')
        .map(|part| match part.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("SharedAccessKey") => {
                format!("{name}=<hidden>")
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Now, in RFC 3339 UTC, as reported properties carry times.
pub fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// Logs connection changes on stderr, so a user sees the client ride out a hub restart.
pub fn log_connection_changes(client: &DeviceClient) {
    let mut state = client.connection_state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let line = match &*state.borrow_and_update() {
                ConnectionState::Connected => "connected".to_string(),
                ConnectionState::Reconnecting => "reconnecting...".to_string(),
                ConnectionState::Disconnected { reason } => format!("disconnected: {reason}"),
                ConnectionState::Failed(e) => format!("gave up: {e}"),
            };
            eprintln!("[connection] {line}");
        }
    });
}

/// Why a device's stream of method calls ended: the hub refused the credentials, or the
/// client was closed.
pub fn calls_ended(client: &DeviceClient) -> anyhow::Error {
    match &*client.connection_state().borrow() {
        ConnectionState::Failed(e) => anyhow::anyhow!("the connection to the hub failed: {e}"),
        _ => anyhow::anyhow!("the client stopped delivering method calls"),
    }
}

/// How a bounded run ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// The work finished by itself.
    Finished(T),
    /// Ctrl-C (or SIGTERM) arrived first.
    Interrupted,
    /// The `--timeout` passed first.
    TimedOut(Duration),
}

/// Runs `work` until it finishes, the user interrupts it, or `timeout` passes.
pub async fn run_bounded<T>(
    interrupt: &mut Interrupt,
    timeout: Option<Duration>,
    work: impl Future<Output = Result<T>>,
) -> Result<Ended<T>> {
    let deadline = async {
        match timeout {
            Some(limit) => {
                tokio::time::sleep(limit).await;
                limit
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = work => result.map(Ended::Finished),
        () = interrupt.wait() => Ok(Ended::Interrupted),
        limit = deadline => Ok(Ended::TimedOut(limit)),
    }
}

/// Counts handled requests against `--max-requests`.
#[derive(Debug)]
pub struct RequestBudget {
    handled: u64,
    max: Option<u64>,
}

impl RequestBudget {
    pub fn new(bounds: &Bounds) -> RequestBudget {
        RequestBudget {
            handled: 0,
            max: bounds.max_requests,
        }
    }

    /// Records one handled request; `true` once the budget is spent.
    pub fn record(&mut self) -> bool {
        self.handled += 1;
        self.exhausted()
    }

    pub fn exhausted(&self) -> bool {
        self.max.is_some_and(|max| self.handled >= max)
    }

    pub fn handled(&self) -> u64 {
        self.handled
    }
}

/// Turns how a device program's run ended into its exit: a timeout is only a failure when
/// `--max-requests` asked for more than was handled.
pub fn device_exit(ended: &Ended<()>, bounds: &Bounds, stopped_line: &str) -> Result<()> {
    match ended {
        Ended::Finished(()) => Ok(()),
        Ended::Interrupted => {
            println!("{stopped_line}");
            Ok(())
        }
        Ended::TimedOut(limit) => match bounds.max_requests {
            Some(max) => anyhow::bail!(
                "timed out after {:.1} s before handling {max} request(s)",
                limit.as_secs_f64()
            ),
            None => {
                println!("{stopped_line}");
                Ok(())
            }
        },
    }
}

/// Serves a long-running device operation started by the direct method `method` (a
/// firmware update, a factory reset): each call is answered at once and the operation runs
/// in the background, one at a time, reporting its progress through reported properties.
///
/// `start` checks the call's payload and returns the operation, or the reason it cannot run
/// (answered 400). A call while one runs is answered 409, other methods 404. Finished
/// operations count against `--max-requests`.
pub async fn serve_operations<F, Op>(
    client: &DeviceClient,
    requests: &mut MethodRequests,
    bounds: &Bounds,
    method: &str,
    accepted: &str,
    mut start: F,
) -> Result<()>
where
    F: FnMut(Value) -> Result<Op, String>,
    Op: Future<Output = ()> + Send + 'static,
{
    let mut budget = RequestBudget::new(bounds);
    if budget.exhausted() {
        return Ok(());
    }
    // Holds at most one operation; dropping it (Ctrl-C, timeout) cancels the operation.
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else {
                    return Err(calls_ended(client));
                };
                let (status, message) = if request.name != method {
                    (404, format!("Unknown method '{}'", request.name))
                } else if !running.is_empty() {
                    (409, format!("A {method} is already in progress"))
                } else {
                    match start(json_payload(request.payload.clone())) {
                        Ok(operation) => {
                            running.spawn(operation);
                            (200, accepted.to_string())
                        }
                        Err(why) => (400, why),
                    }
                };
                if let Err(e) = request.respond(status, json!({"Response": message})).await {
                    eprintln!("Answering a method call failed: {e}");
                }
            }
            Some(finished) = running.join_next(), if !running.is_empty() => {
                if let Err(e) = finished {
                    eprintln!("The {method} task ended abnormally: {e}");
                }
                if budget.record() {
                    return Ok(());
                }
            }
        }
    }
}

/// A payload sent as a JSON string holding JSON (as the Python service SDK's samples do),
/// read as the JSON it holds.
pub fn json_payload(payload: Value) -> Value {
    match payload {
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        other => other,
    }
}

/// Reports one stage of a device-management operation as IoT Hub's device-management
/// patterns do: `{"iothubDM": {<operation>: {"status": .., ..fields}}}` merged into the
/// reported properties, plus `extra` top-level reported properties.
pub async fn report_stage(
    client: &DeviceClient,
    operation: &str,
    status: &str,
    fields: Value,
    extra: Value,
) -> Result<()> {
    let mut state = Map::new();
    state.insert("status".into(), Value::String(status.to_string()));
    if let Value::Object(fields) = fields {
        state.extend(fields);
    }
    let mut patch = Map::new();
    if let Value::Object(extra) = extra {
        patch.extend(extra);
    }
    let dm = patch
        .entry("iothubDM")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(dm) = dm {
        dm.insert(operation.to_string(), Value::Object(state));
    }
    client
        .patch_reported(&Value::Object(patch))
        .await
        .with_context(|| format!("reporting {operation} status '{status}' failed"))?;
    println!("{operation} status: {status}");
    Ok(())
}

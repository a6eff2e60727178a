//! The twinhub under test: started as a child process (`twinhub serve`, the default, so its
//! resident memory can be read from /proc and its CPU is not mixed with the load generator's)
//! or in-process through `twinhub_server::RunningServer` (for tests). Also registers the
//! bench's devices in bulk with keys the bench chooses, so it never has to read them back.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::process::Command;
use tokio::task::JoinSet;
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, ExportImportDevice, ImportMode, SymmetricKey,
};
use twinhub_routing::RoutingConfig;
use twinhub_sdk::ServiceClient;
use twinhub_server::config::Fallback;
use twinhub_server::{Config, HubFile, RunningServer};

use crate::child::ChildProcess;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Every bench device shares this primary key (base64 of 32 bytes); each device's SAS token
/// still differs because it signs the device's own resource URI.
pub const DEVICE_KEY: &str = "dHdpbmh1Yi1iZW5jaC1kZXZpY2Uta2V5LTAwMDAwMDA=";
/// The hub's name, in its certificate, connection strings and device user names.
pub const HOSTNAME: &str = "localhost";
/// The registry's bulk call takes at most this many devices.
const BULK_CHUNK: usize = 100;
/// Bulk calls in flight while registering.
const BULK_CONCURRENCY: usize = 4;
/// How long the hub may take to come up.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The id of bench device `i`.
pub fn device_id(i: usize) -> String {
    format!("dev-{i:06}")
}

/// How to run the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// `twinhub serve` from this binary, as a child process.
    Process { bin: PathBuf, log_filter: String },
    /// `RunningServer` inside the bench process.
    InProcess,
}

enum Running {
    Child(ChildProcess),
    InProcess(Box<RunningServer>),
}

/// Settings of `twinhub serve` the bench may change; `None` keeps the hub's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Event partitions (`--partitions`).
    pub partitions: Option<u32>,
    /// Cloud-to-device messages a device's queue holds (`--c2d-max-queue-depth`).
    pub c2d_max_queue_depth: Option<usize>,
    /// Routing endpoints, routes, enrichments and the fallback switch: written to a TOML file
    /// beside the data dir and passed as `--config` (in-process: set on the `Config`).
    pub routing: Option<RoutingConfig>,
    /// A PostgreSQL store shared by the nodes of a cluster (`--store postgres://...`) instead
    /// of the embedded store in the data dir.
    pub store: Option<String>,
    /// The cluster's NATS server (`--cluster nats://...`); needs `store`.
    pub cluster: Option<String>,
    /// This node's name in the cluster (`--node-id`).
    pub node_id: Option<String>,
}

/// The policy the bench reads telemetry as (ServiceConnect only, as a back end would).
pub const EVENTS_POLICY: &str = "service";

/// A started hub and what clients need to reach it.
pub struct Hub {
    pub https_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// The Event Hub-compatible endpoint (AMQP over TLS).
    pub amqp_addr: SocketAddr,
    pub connection_string: String,
    /// The Event Hub-compatible connection string of the built-in endpoint.
    pub events_connection_string: String,
    /// The dev CA (PEM) that signed the hub's certificate.
    pub ca_pem: String,
    /// The dev CA's private key (PEM), to sign the peers' certificates.
    pub ca_key_pem: String,
    pub data_dir: PathBuf,
    pub version: String,
    running: Running,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

impl Hub {
    /// Starts a hub with a fresh store in `data_dir` on loopback, on ports the system picks,
    /// with the hub's default number of event partitions.
    pub async fn start(launch: &Launch, data_dir: &Path) -> Result<Hub> {
        Self::start_with(launch, data_dir, None).await
    }

    /// [`Hub::start`] with `partitions` event partitions (`--partitions`) when given.
    pub async fn start_with(
        launch: &Launch,
        data_dir: &Path,
        partitions: Option<u32>,
    ) -> Result<Hub> {
        let options = Options {
            partitions,
            ..Options::default()
        };
        Self::start_with_options(launch, data_dir, &options).await
    }

    /// [`Hub::start`] with the settings in `options`.
    pub async fn start_with_options(
        launch: &Launch,
        data_dir: &Path,
        options: &Options,
    ) -> Result<Hub> {
        let partitions = options.partitions;
        std::fs::create_dir_all(data_dir)
            .map_err(|e| Error::io(format!("creating {}", data_dir.display()), e))?;
        let loopback = IpAddr::from([127, 0, 0, 1]);
        match launch {
            Launch::InProcess => {
                let defaults = Config::default();
                let server = RunningServer::start(Config {
                    data_dir: data_dir.to_path_buf(),
                    hostname: HOSTNAME.into(),
                    bind: loopback,
                    https_port: 0,
                    mqtt_port: 0,
                    amqp_port: 0,
                    partitions: partitions.unwrap_or(defaults.partitions),
                    c2d_max_queue_depth: options
                        .c2d_max_queue_depth
                        .unwrap_or(defaults.c2d_max_queue_depth),
                    endpoints: options
                        .routing
                        .as_ref()
                        .map(|r| r.endpoints.clone())
                        .unwrap_or_default(),
                    routes: options
                        .routing
                        .as_ref()
                        .map(|r| r.routes.clone())
                        .unwrap_or_default(),
                    enrichments: options
                        .routing
                        .as_ref()
                        .map(|r| r.enrichments.clone())
                        .unwrap_or_default(),
                    fallback: options.routing.as_ref().map(|r| Fallback {
                        enabled: r.fallback_enabled,
                    }),
                    store: options.store.clone(),
                    cluster: options.cluster.clone(),
                    node_id: options.node_id.clone(),
                    ..defaults
                })
                .await?;
                let connection_string = server
                    .connection_string("iothubowner")
                    .ok_or_else(|| Error::Setup("the hub has no iothubowner policy".into()))?;
                let events_connection_string = server
                    .hub_file
                    .events_connection_string(EVENTS_POLICY, false)
                    .ok_or_else(|| Error::Setup("the hub has no events endpoint".into()))?;
                let tls = data_dir.join("tls");
                Ok(Hub {
                    https_addr: server.https_addr,
                    mqtt_addr: server.mqtt_addr,
                    amqp_addr: server.amqp_addr,
                    connection_string,
                    events_connection_string,
                    ca_pem: read_text(&tls.join("ca.pem"))?,
                    ca_key_pem: read_text(&tls.join("ca-key.pem"))?,
                    data_dir: data_dir.to_path_buf(),
                    version: format!("twinhub {} (in-process)", env!("CARGO_PKG_VERSION")),
                    running: Running::InProcess(Box::new(server)),
                })
            }
            Launch::Process { bin, log_filter } => {
                Self::start_child(bin, log_filter, data_dir, loopback, options).await
            }
        }
    }

    async fn start_child(
        bin: &Path,
        log_filter: &str,
        data_dir: &Path,
        loopback: IpAddr,
        options: &Options,
    ) -> Result<Hub> {
        if !bin.is_file() {
            return Err(Error::Setup(format!(
                "no twinhub binary at {}: build it with `cargo build --release -p twinhub` \
                 or pass --hub-bin",
                bin.display()
            )));
        }
        let version = Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "twinhub (version unknown)".into());
        let log_path = data_dir.join("hub.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--hostname", HOSTNAME, "--bind", &loopback.to_string()])
            .args(["--https-port", "0", "--mqtt-port", "0", "--amqp-port", "0"]);
        if let Some(p) = options.partitions {
            command.args(["--partitions", &p.to_string()]);
        }
        if let Some(depth) = options.c2d_max_queue_depth {
            command.args(["--c2d-max-queue-depth", &depth.to_string()]);
        }
        if let Some(routing) = &options.routing {
            let path = data_dir.with_extension("toml");
            std::fs::write(&path, routing_toml(routing))
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            command.arg("--config").arg(&path);
        }
        if let Some(url) = &options.store {
            command.args(["--store", url]);
        }
        if let Some(url) = &options.cluster {
            command.args(["--cluster", url]);
        }
        if let Some(node) = &options.node_id {
            command.args(["--node-id", node]);
        }
        let mut child = ChildProcess::spawn(
            command
                .env("RUST_LOG", log_filter)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log)),
            &bin.display().to_string(),
        )?;

        // hub.json is written with the bound ports early in startup; the hub is ready when
        // a REST call with its connection string succeeds.
        let started = Instant::now();
        loop {
            if let Some(status) = child.exited() {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = tail.lines().rev().take(10).collect::<Vec<_>>().join(" | ");
                return Err(Error::Setup(format!("the hub exited ({status}): {tail}")));
            }
            if started.elapsed() > START_LIMIT {
                return Err(Error::timeout("starting the hub", START_LIMIT));
            }
            if let Some(found) = Self::probe(data_dir, loopback, &version).await {
                return Ok(found.with(Running::Child(child)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything needed to talk to a child hub, once it answers.
    async fn probe(data_dir: &Path, loopback: IpAddr, version: &str) -> Option<Probed> {
        let file = HubFile::read(data_dir).ok()?;
        let amqp_port = file.amqp_port.unwrap_or(0);
        if file.https_port == 0 || file.mqtt_port == 0 || amqp_port == 0 {
            return None;
        }
        let tls = data_dir.join("tls");
        let ca_pem = std::fs::read_to_string(tls.join("ca.pem")).ok()?;
        let ca_key_pem = std::fs::read_to_string(tls.join("ca-key.pem")).ok()?;
        let connection_string = file.connection_string("iothubowner")?;
        let events_connection_string = file.events_connection_string(EVENTS_POLICY, false)?;
        let service = ServiceClient::builder(&connection_string)
            .extra_ca_pem(ca_pem.clone())
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        service.registry_statistics().await.ok()?;
        Some(Probed {
            https_addr: SocketAddr::new(loopback, file.https_port),
            mqtt_addr: SocketAddr::new(loopback, file.mqtt_port),
            amqp_addr: SocketAddr::new(loopback, amqp_port),
            connection_string,
            events_connection_string,
            ca_pem,
            ca_key_pem,
            data_dir: data_dir.to_path_buf(),
            version: version.to_string(),
        })
    }

    /// The hub's process id when it runs as a child (its memory is then the hub's alone).
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Child(child) => Some(child.id()),
            Running::InProcess(_) => None,
        }
    }

    /// A service client with its own connections to the hub (HTTPS, and AMQP for
    /// cloud-to-device messages once it sends one).
    pub fn service(&self) -> Result<ServiceClient> {
        Ok(ServiceClient::builder(&self.connection_string)
            .extra_ca_pem(self.ca_pem.clone())
            .amqp_port(self.amqp_addr.port())
            .timeout(Duration::from_secs(60))
            .build()?)
    }

    /// A service client speaking HTTP/1.1 with keep-alive only, as the official Python and
    /// Node SDKs call REST: each call in flight holds a pooled connection of its own.
    pub fn service_http1(&self) -> Result<ServiceClient> {
        Ok(ServiceClient::builder(&self.connection_string)
            .extra_ca_pem(self.ca_pem.clone())
            .amqp_port(self.amqp_addr.port())
            .timeout(Duration::from_secs(60))
            .http1_only()
            .build()?)
    }

    /// Stops the hub: SIGTERM and a bounded wait for its graceful shutdown, then SIGKILL.
    pub async fn stop(self) {
        match self.running {
            Running::InProcess(server) => server.shutdown().await,
            // The hub flushes and closes its store on SIGTERM.
            Running::Child(child) => child.terminate(Duration::from_secs(30)).await,
        }
    }
}

/// A TOML string (basic, escaped).
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", items.join(", "))
}

/// `routing` as the `twinhub serve --config` file takes it: `[[endpoints]]`, `[[routes]]`,
/// `[[enrichments]]` and `[fallback]`.
pub fn routing_toml(routing: &RoutingConfig) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("# Written by twinhub-bench for its routing scenario.\n");
    for e in &routing.endpoints {
        let kind = match e.kind {
            twinhub_routing::EndpointKind::Stream => "stream",
            twinhub_routing::EndpointKind::Webhook => "webhook",
        };
        let _ = write!(
            out,
            "\n[[endpoints]]\nname = {}\nkind = {}\n",
            toml_str(&e.name),
            toml_str(kind)
        );
        if let Some(url) = &e.url {
            let _ = writeln!(out, "url = {}", toml_str(url));
        }
    }
    for r in &routing.routes {
        let _ = write!(
            out,
            "\n[[routes]]\nname = {}\nsource = {}\ncondition = {}\nendpoints = {}\nenabled = {}\n",
            toml_str(&r.name),
            toml_str(r.source.as_str()),
            toml_str(&r.condition),
            toml_list(&r.endpoints),
            r.enabled
        );
    }
    for e in &routing.enrichments {
        let _ = write!(
            out,
            "\n[[enrichments]]\nkey = {}\nvalue = {}\nendpoints = {}\n",
            toml_str(&e.key),
            toml_str(&e.value),
            toml_list(&e.endpoints)
        );
    }
    let _ = write!(
        out,
        "\n[fallback]\nenabled = {}\n",
        routing.fallback_enabled
    );
    out
}

/// A [`Hub`] without its process, as found by [`Hub::probe`].
struct Probed {
    https_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    amqp_addr: SocketAddr,
    connection_string: String,
    events_connection_string: String,
    ca_pem: String,
    ca_key_pem: String,
    data_dir: PathBuf,
    version: String,
}

impl Probed {
    fn with(self, running: Running) -> Hub {
        let Probed {
            https_addr,
            mqtt_addr,
            amqp_addr,
            connection_string,
            events_connection_string,
            ca_pem,
            ca_key_pem,
            data_dir,
            version,
        } = self;
        Hub {
            https_addr,
            mqtt_addr,
            amqp_addr,
            connection_string,
            events_connection_string,
            ca_pem,
            ca_key_pem,
            data_dir,
            version,
            running,
        }
    }
}

/// The bulk entry creating bench device `i` with the shared key.
fn create_op(i: usize) -> ExportImportDevice {
    create_with_shared_key(device_id(i))
}

/// The bulk entry creating device `id` with the bench's shared SAS key.
pub(crate) fn create_with_shared_key(id: String) -> ExportImportDevice {
    ExportImportDevice {
        id,
        import_mode: ImportMode::Create,
        authentication: Some(AuthenticationMechanism {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some(DEVICE_KEY.into()),
                secondary_key: Some(DEVICE_KEY.into()),
            }),
            x509_thumbprint: None,
            auth_type: AuthenticationType::Sas,
        }),
        ..Default::default()
    }
}

/// Registers devices `0..count` in bulk calls of 100, a few at a time. Returns how long it
/// took.
pub async fn register_devices(
    service: &ServiceClient,
    count: usize,
    progress: &Progress,
) -> Result<Duration> {
    let started = Instant::now();
    let bar = progress.bar("registering devices", count as u64);
    let mut chunks = (0..count).step_by(BULK_CHUNK);
    let mut calls = JoinSet::new();
    loop {
        while calls.len() < BULK_CONCURRENCY {
            let Some(first) = chunks.next() else { break };
            let ops: Vec<_> = (first..count.min(first + BULK_CHUNK))
                .map(create_op)
                .collect();
            let service = service.clone();
            calls.spawn(async move {
                let n = ops.len();
                let result = service.bulk(&ops).await?;
                if result.is_successful {
                    Ok(n)
                } else {
                    let first = result
                        .errors
                        .first()
                        .map(|e| format!("{}: {}", e.device_id, e.error_code))
                        .unwrap_or_default();
                    Err(Error::Setup(format!(
                        "registering {} devices failed ({} errors; first {first})",
                        n,
                        result.errors.len()
                    )))
                }
            });
        }
        let Some(done) = calls.join_next().await else {
            break;
        };
        let n = done.map_err(|e| Error::Setup(format!("a registration task failed: {e}")))??;
        bar.inc(n as u64);
    }
    bar.finish();
    Ok(started.elapsed())
}

/// Waits until the hub reports no connected device, so one scenario's teardown does not
/// run into the next one's measurement.
pub async fn wait_disconnected(service: &ServiceClient, limit: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let stats = service.service_statistics().await?;
        if stats.connected_device_count == 0 {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(Error::timeout(
                format!(
                    "waiting for {} devices to disconnect",
                    stats.connected_device_count
                ),
                limit,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_sort_in_creation_order_and_keys_decode() {
        assert_eq!(device_id(7), "dev-000007");
        assert!(device_id(9) < device_id(10));
        let op = create_op(3);
        assert_eq!(op.id, "dev-000003");
        assert_eq!(op.import_mode, ImportMode::Create);
        // The key must sign, or every CONNECT would be refused.
        assert!(
            twinhub_proto::generate_sas_token("localhost/devices/dev-000003", DEVICE_KEY, None, 1)
                .is_ok()
        );
    }

    #[test]
    fn the_routing_file_reads_back_as_the_hub_reads_it() {
        use twinhub_routing::{EndpointKind, EndpointSpec, EnrichmentSpec, RouteSpec, Source};
        let routing = RoutingConfig {
            endpoints: vec![
                EndpointSpec {
                    name: "alerts".into(),
                    kind: EndpointKind::Stream,
                    url: None,
                },
                EndpointSpec {
                    name: "hook".into(),
                    kind: EndpointKind::Webhook,
                    url: Some("http://127.0.0.1:9/x".into()),
                },
            ],
            routes: vec![RouteSpec {
                name: "hot".into(),
                source: Source::DeviceMessages,
                condition: "level = 'critical' AND $body.note = \"a\\\\b\"".into(),
                endpoints: vec!["alerts".into(), "events".into()],
                enabled: false,
            }],
            enrichments: vec![EnrichmentSpec {
                key: "region".into(),
                value: "$twin.tags.region".into(),
                endpoints: vec!["alerts".into()],
            }],
            fallback_enabled: false,
        };
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, routing_toml(&routing)).expect("written");
        let config = Config::load(Some(&path), &twinhub_server::Overrides::default())
            .unwrap_or_else(|e| panic!("{e}\n{}", routing_toml(&routing)));
        assert_eq!(config.routing(), routing);
    }
}

//! twinhub's process: it binds the HTTPS, MQTT and AMQP ports, prepares TLS and the data dir,
//! opens the store, the event log and the hub, and runs one accept loop per port (REST, MQTT
//! and AMQP over WebSockets on HTTPS; MQTT on the MQTT port; the Event Hub-compatible endpoint
//! on the AMQP port, and in plaintext on loopback if asked) until shutdown. The only crate
//! that knows sockets.

pub mod admission;
pub mod amqp;
pub mod check;
pub mod config;
pub mod console;
pub mod error;
mod http_conn;
pub mod hub_file;
pub mod mqtt;
pub mod rest;
pub mod shared_identity;
pub mod tls;
pub mod webhook;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twinhub_core::{Hub, HubOptions};
use twinhub_eventlog::{DiskLog, EventLog, LogOptions};
use twinhub_store::{RedbStore, Store};

use admission::Admission;

pub use config::{Config, Overrides};
pub use error::ServerError;
pub use hub_file::HubFile;

use mqtt::SessionContext;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often recorded histogram samples are folded into their buckets. The exporter keeps
/// every sample until then (or until a scrape), so without it a hub nobody scrapes grows by
/// each request it serves.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight work before giving up on it (a session closes within
/// its 5-second finish; an HTTP connection within its 10-second grace).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// A started hub.
pub struct RunningServer {
    pub https_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// AMQP over TLS (the Event Hub-compatible endpoint).
    pub amqp_addr: SocketAddr,
    /// Plaintext AMQP on loopback, when enabled.
    pub amqp_plain_addr: Option<SocketAddr>,
    pub hub: Arc<Hub>,
    pub hub_file: HubFile,
    pub ca_pem: Option<PathBuf>,
    pub ca_bundle: Option<PathBuf>,
    pub config: Config,
    pub admission: Arc<Admission>,
    /// The web console's state (its open telemetry streams).
    pub console: Arc<console::Console>,
    store: Arc<dyn Store>,
    events: Arc<dyn EventLog>,
    endpoint_logs: EndpointLogs,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// A cluster node's name when none is given: the machine's hostname, as a NATS subject token.
fn default_node_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "node".into());
    let mut id = twinhub_cluster_nats::token(raw.trim());
    id.truncate(64);
    if id.is_empty() { "node".into() } else { id }
}

/// Opens the PostgreSQL store at `url`, shared by the nodes of a cluster.
pub async fn open_shared_store(url: &str) -> Result<Arc<dyn Store>, ServerError> {
    let store = twinhub_store_postgres::PostgresStore::connect(
        url,
        twinhub_store_postgres::PostgresOptions::default(),
    )
    .await
    .map_err(|e| ServerError::Config(format!("the store at --store cannot be used: {e}")))?;
    Ok(Arc::new(store))
}

/// How often the event log's retention is enforced.
const RETENTION_SWEEP: Duration = Duration::from_secs(60);

fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (an embedding program): keep ours unregistered.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

async fn bind(addr: SocketAddr, flag: &'static str, alt: u16) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => ServerError::AddrInUse { addr, flag },
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            ServerError::PrivilegedPort { addr, flag, alt }
        }
        _ => ServerError::Listen { addr, source: e },
    })
}

impl RunningServer {
    /// Starts a hub with `config`. Returns once both ports accept connections.
    pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
        let open_files = admission::raise_open_file_limit();
        let max_connections = config
            .max_connections
            .unwrap_or_else(|| admission::default_max_connections(open_files));
        tracing::info!(
            open_files = open_files.map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
            max_connections,
            max_unauthenticated = config.max_unauthenticated,
            "connection limits"
        );
        let admission = Arc::new(Admission::new(max_connections, config.max_unauthenticated));
        hub_file::ensure_data_dir(&config.data_dir)?;
        let https = bind(
            SocketAddr::new(config.bind, config.https_port),
            "https-port",
            8443,
        )
        .await?;
        let mqtt = bind(
            SocketAddr::new(config.bind, config.mqtt_port),
            "mqtt-port",
            8883,
        )
        .await?;
        let amqp = bind(
            SocketAddr::new(config.bind, config.amqp_port),
            "amqp-port",
            5671,
        )
        .await?;
        let amqp_plain = match config.amqp_plain_port {
            Some(port) => {
                Some(bind(SocketAddr::new(config.bind, port), "amqp-plain-port", 5672).await?)
            }
            None => None,
        };
        let local = |l: &TcpListener, port: u16| {
            l.local_addr().map_err(|e| ServerError::Listen {
                addr: SocketAddr::new(config.bind, port),
                source: e,
            })
        };
        let amqp_addr = local(&amqp, config.amqp_port)?;
        let amqp_plain_addr = match &amqp_plain {
            Some(l) => Some(local(l, config.amqp_plain_port.unwrap_or(0))?),
            None => None,
        };
        let https_addr = https.local_addr().map_err(|e| ServerError::Listen {
            addr: SocketAddr::new(config.bind, config.https_port),
            source: e,
        })?;
        let mqtt_addr = mqtt.local_addr().map_err(|e| ServerError::Listen {
            addr: SocketAddr::new(config.bind, config.mqtt_port),
            source: e,
        })?;

        let mut hub_file = HubFile::load_or_create(
            &config,
            hub_file::Ports {
                https: https_addr.port(),
                mqtt: mqtt_addr.port(),
                amqp: amqp_addr.port(),
                amqp_plain: amqp_plain_addr.map(|a| a.port()),
            },
        )?;
        let store: Arc<dyn Store> = match &config.store {
            None => Arc::new(RedbStore::open(&config.data_dir.join("store.redb"))?),
            Some(url) => {
                let store = open_shared_store(url).await?;
                let candidate = shared_identity::SharedIdentity {
                    hub: hub_file.clone(),
                    ca: tls::dev_ca_pair(&config)?,
                };
                let shared = shared_identity::adopt(&*store, candidate).await?;
                hub_file.adopt_policies(&config.data_dir, shared.hub.policies)?;
                if let (Some(ca), None) = (&shared.ca, &config.tls_cert) {
                    tls::install_dev_ca(&config, ca)?;
                }
                store
            }
        };
        let tls = tls::prepare(&config)?;
        let events: Arc<dyn EventLog> = match &config.cluster {
            None => Arc::new(
                DiskLog::open(config.data_dir.join("events"), log_options(&config))
                    .map_err(|e| ServerError::Events(e.to_string()))?,
            ),
            Some(url) => {
                // One stream per hub, so that one NATS server can serve several hubs.
                let name = format!(
                    "{}-events",
                    twinhub_proto::connection_string::hub_name(&config.hostname)
                );
                Arc::new(
                    twinhub_eventlog_jetstream::JetStreamLog::connect(
                        url,
                        &name,
                        log_options(&config),
                    )
                    .await
                    .map_err(|e| ServerError::Events(format!("JetStream at --cluster: {e}")))?,
                )
            }
        };
        let endpoint_logs = EndpointLogs::new(config.data_dir.join("endpoints"), &config);
        let bus = match &config.cluster {
            Some(url) => {
                let node = config.node_id.clone().unwrap_or_else(default_node_id);
                let hub_name = twinhub_proto::connection_string::hub_name(&config.hostname);
                let bus = twinhub_cluster_nats::NatsBus::connect(url, &hub_name, &node)
                    .await
                    .map_err(|e| ServerError::Config(format!("--cluster: {e}")))?;
                tracing::info!(node, "joined the cluster");
                Some(bus)
            }
            None => None,
        };
        let mut options = HubOptions::new(config.hostname.clone(), hub_file.policies.clone());
        options.cluster = bus
            .clone()
            .map(|b| b as Arc<dyn twinhub_core::cluster::ClusterBus>);
        options.routing = config.routing();
        options.endpoint_logs = Some(endpoint_logs.opener());
        options.throttles = config.throttles();
        options.max_token_lifetime = Duration::from_secs(config.max_token_lifetime);
        options.events = Some(events.clone());
        options.c2d = config.c2d();
        let hub = Hub::open(store.clone(), options).await?;
        // The hub folds in only a file's `enabled = false` (its configuration cannot tell an
        // absent [fallback] from `true`); an explicit `true` is the operator's word as well.
        if config.fallback.is_some_and(|f| f.enabled) && !hub.routing().config().fallback_enabled {
            hub.set_fallback(true).await?;
        }

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let Some(bus) = &bus {
            bus.serve(hub.clone(), shutdown.clone(), &tracker)
                .await
                .map_err(|e| ServerError::Config(format!("--cluster: {e}")))?;
        }
        webhook::start(
            hub.clone(),
            config.webhook(),
            tls.ca_pem.as_deref(),
            &shutdown,
            &tracker,
        );
        let sessions = SessionContext {
            hub: hub.clone(),
            connect_timeout: Duration::from_secs(config.mqtt_connect_timeout),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        let metrics = metrics_handle();
        tracker.spawn({
            let metrics = metrics.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(METRICS_UPKEEP) => metrics.run_upkeep(),
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        });
        tracker.spawn({
            let events = events.clone();
            let endpoint_logs = endpoint_logs.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(RETENTION_SWEEP) => {
                            match events.enforce_retention(twinhub_core::keys::now_millis()).await {
                                Ok(0) => {}
                                Ok(n) => tracing::info!(events = n, "telemetry past its retention dropped"),
                                Err(e) => tracing::warn!("enforcing the event log's retention failed: {e}"),
                            }
                            endpoint_logs.enforce_retention().await;
                        }
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        });
        let amqp_ctx = amqp::AmqpContext {
            hub: hub.clone(),
            entity: twinhub_proto::connection_string::hub_name(&config.hostname),
            redirect_host: config.hostname.clone(),
            redirect_port: amqp_addr.port(),
            owners: Arc::new(amqp::Owners::default()),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        let console = Arc::new(console::Console::new(console::HubFacts {
            host_name: hub_file.hostname.clone(),
            hub_name: twinhub_proto::connection_string::hub_name(&hub_file.hostname),
            https_port: hub_file.https_port,
            mqtt_port: hub_file.mqtt_port,
            amqp_port: hub_file.amqp_port,
            amqp_plain_port: hub_file.amqp_plain_port,
            event_hub_name: hub_file.event_hub_name.clone(),
            node_id: config
                .cluster
                .as_ref()
                .map(|_| config.node_id.clone().unwrap_or_else(default_node_id)),
        }));
        let router = rest::router(rest::AppState {
            hub: hub.clone(),
            metrics,
            sessions: sessions.clone(),
            amqp: amqp_ctx.clone(),
            admission: admission.clone(),
            console: console.clone(),
        });

        tracker.spawn(accept_loop(
            https,
            Some(TlsAcceptor::from(tls.https)),
            Listener::Https(router, Duration::from_secs(config.http_idle_timeout)),
            admission.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        tracker.spawn(accept_loop(
            mqtt,
            Some(TlsAcceptor::from(tls.mqtt.clone())),
            Listener::Mqtt(sessions),
            admission.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        tracker.spawn(accept_loop(
            amqp,
            Some(TlsAcceptor::from(tls.amqp)),
            Listener::Amqp(amqp_ctx.clone()),
            admission.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        if let Some(plain) = amqp_plain {
            tracker.spawn(accept_loop(
                plain,
                None,
                Listener::Amqp(amqp_ctx),
                admission.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        Ok(RunningServer {
            https_addr,
            mqtt_addr,
            amqp_addr,
            amqp_plain_addr,
            hub,
            hub_file,
            ca_pem: tls.ca_pem,
            ca_bundle: tls.ca_bundle,
            config,
            admission,
            console,
            store,
            events,
            endpoint_logs,
            shutdown,
            tracker,
        })
    }

    /// A service connection string for `policy` (default `iothubowner`).
    pub fn connection_string(&self, policy: &str) -> Option<String> {
        self.hub_file.connection_string(policy)
    }

    /// Stops accepting, closes device sessions, lets in-flight requests finish (bounded),
    /// then flushes and closes the store.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        // Jobs first: their in-flight calls must not be recorded as failures of closing
        // sessions; unfinished devices resume at the next start.
        self.hub.suspend_jobs();
        self.hub.close_all_sessions();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
        }
        self.events.close().await;
        self.endpoint_logs.close().await;
        if let Err(e) = self.store.close().await {
            tracing::error!("closing the store failed: {e}");
        }
    }
}

/// Opens a custom endpoint's JetStream stream from the hub's synchronous endpoint opener,
/// which runs inside the server's multi-threaded runtime.
fn open_endpoint_stream(
    url: &str,
    name: &str,
    options: LogOptions,
) -> Result<twinhub_eventlog_jetstream::JetStreamLog, String> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| "no runtime to open a JetStream endpoint log on".to_string())?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err("a JetStream endpoint log needs the multi-threaded runtime".into());
    }
    tokio::task::block_in_place(|| {
        handle.block_on(twinhub_eventlog_jetstream::JetStreamLog::connect(
            url, name, options,
        ))
    })
    .map_err(|e| format!("JetStream stream {name}: {e}"))
}

/// The layout and retention of the built-in log, which custom stream endpoints share.
fn log_options(config: &Config) -> LogOptions {
    LogOptions {
        partitions: config.partitions,
        retention: Duration::from_secs(config.retention),
        retention_bytes: config.retention_bytes,
        ..LogOptions::default()
    }
}

/// The logs of custom endpoints, opened when the hub first needs one and kept open until
/// shutdown: on one node, disk logs in `<data-dir>/endpoints/<lower-cased name>`; in a cluster,
/// JetStream streams every node shares. Kept even after an endpoint is removed: a reader may
/// still hold the log, and a `DiskLog` locks its directory, so adding the endpoint again must
/// get the same log rather than a second one on the same files.
#[derive(Clone)]
struct EndpointLogs {
    dir: PathBuf,
    options: LogOptions,
    /// In a cluster: the NATS URL and the hub's name, which prefixes the streams.
    jetstream: Option<(String, String)>,
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<dyn EventLog>>>>,
}

impl EndpointLogs {
    fn new(dir: PathBuf, config: &Config) -> EndpointLogs {
        EndpointLogs {
            dir,
            options: log_options(config),
            jetstream: config.cluster.clone().map(|url| {
                (
                    url,
                    twinhub_proto::connection_string::hub_name(&config.hostname),
                )
            }),
            open: Arc::default(),
        }
    }

    fn opened(&self) -> Vec<(String, Arc<dyn EventLog>)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// What the hub calls to get an endpoint's log. Names match without case in routing, so
    /// the directory (or stream) is the lower-cased name. Opening recovers the log's files in
    /// place, or connects to JetStream, blocking like the built-in log's open at start: fine
    /// for the rare endpoint change.
    fn opener(&self) -> twinhub_core::routing::EndpointLogs {
        let this = self.clone();
        Arc::new(move |name: &str| {
            let key = name.to_ascii_lowercase();
            let mut open = this.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(log) = open.get(&key) {
                return Ok(log.clone());
            }
            let log: Arc<dyn EventLog> = match &this.jetstream {
                None => Arc::new(
                    DiskLog::open(this.dir.join(&key), this.options.clone())
                        .map_err(|e| e.to_string())?,
                ),
                Some((url, hub)) => Arc::new(open_endpoint_stream(
                    url,
                    &format!("{hub}-endpoint-{key}"),
                    this.options.clone(),
                )?),
            };
            open.insert(key, log.clone());
            Ok(log)
        })
    }

    async fn enforce_retention(&self) {
        for (endpoint, log) in self.opened() {
            match log
                .enforce_retention(twinhub_core::keys::now_millis())
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(events = n, %endpoint, "endpoint messages past their retention dropped")
                }
                Err(e) => {
                    tracing::warn!(%endpoint, "enforcing an endpoint log's retention failed: {e}")
                }
            }
        }
    }

    async fn close(&self) {
        for (_, log) in self.opened() {
            log.close().await;
        }
    }
}

enum Listener {
    /// The REST router and the idle timeout of its connections.
    Https(axum::Router, Duration),
    Mqtt(SessionContext),
    Amqp(amqp::AmqpContext),
}

async fn accept_loop(
    listener: TcpListener,
    // `None`: plaintext (the loopback AMQP listener only).
    acceptor: Option<TlsAcceptor>,
    kind: Listener,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let kind = Arc::new(kind);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(mut admitted) = admission.admit(peer) else {
            // Dropping the socket closes it: a full hub costs a refused peer nothing more.
            continue;
        };
        admission::tune_socket(&tcp);
        let acceptor = acceptor.clone();
        let kind = kind.clone();
        let shutdown = shutdown.clone();
        // The task's future is as large as its largest state, and an idle device connection
        // keeps its task for hours: the handshake and each listener's serving future are
        // boxed, so a task holds pointers instead of room for the biggest of them (the
        // handshake's TLS state, the AMQP and HTTPS futures) beside the one it runs.
        tracker.spawn(async move {
            let unauthenticated = admitted.unauthenticated.take();
            let Some(acceptor) = acceptor else {
                if let Listener::Amqp(ctx) = &*kind {
                    Box::pin(amqp::serve_connection(
                        ctx.clone(),
                        tcp,
                        peer.to_string(),
                        unauthenticated,
                    ))
                    .await;
                }
                drop(admitted);
                return;
            };
            let handshake = Box::pin(acceptor.accept(tcp));
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            match &*kind {
                Listener::Mqtt(ctx) => {
                    let certificates = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|chain| chain.iter().map(|c| c.as_ref().to_vec()).collect())
                        .unwrap_or_default();
                    Box::pin(mqtt::run_session(
                        ctx.clone(),
                        tls,
                        peer.to_string(),
                        certificates,
                        unauthenticated,
                    ))
                    .await
                }
                Listener::Amqp(ctx) => {
                    Box::pin(amqp::serve_connection(
                        ctx.clone(),
                        tls,
                        peer.to_string(),
                        unauthenticated,
                    ))
                    .await
                }
                Listener::Https(router, idle) => {
                    // The connection's client certificates go with each of its requests, for
                    // the X.509 devices that upgrade to MQTT over WebSockets.
                    let router =
                        match tls.get_ref().1.peer_certificates() {
                            Some(chain) if !chain.is_empty() => {
                                let chain = chain.iter().map(|c| c.as_ref().to_vec()).collect();
                                router.clone().layer(axum::Extension(
                                    http_conn::ClientCertificates(Arc::new(chain)),
                                ))
                            }
                            _ => router.clone(),
                        };
                    Box::pin(http_conn::serve(
                        tls,
                        router,
                        *idle,
                        shutdown,
                        unauthenticated,
                    ))
                    .await
                }
            }
            drop(admitted);
        });
    }
}

//! The one `Config` of `twinhub serve`: defaults, then an optional TOML file, then `TWINHUB_*`
//! environment variables, then command-line flags (the CLI passes those in as overrides).
//! Message routing (`[[endpoints]]`, `[[routes]]`, `[[enrichments]]`, `[fallback]`) comes from
//! the file only: it is checked here with `twinhub_routing`'s rules, and the hub folds it into
//! the routing configuration it keeps in its store.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use twinhub_core::throttle::ThrottleConfig;
use twinhub_routing::{EndpointSpec, EnrichmentSpec, RouteSpec, Router, RoutingConfig};

use crate::error::ServerError;

/// Every setting of the hub process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the store, TLS material and policies live.
    pub data_dir: PathBuf,
    /// The store: `None` for the embedded one in `data_dir`, or a `postgres://` URL for a
    /// PostgreSQL database shared by the nodes of a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The NATS server (`nats://host:port`) of a cluster: the built-in events endpoint is kept
    /// in a JetStream stream every node reads and writes. Needs a shared `store`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// This node's name in the cluster (default: the machine's hostname).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The hub's name: put into connection strings and accepted in SAS `sr`.
    pub hostname: String,
    /// The address both listeners bind.
    pub bind: IpAddr,
    /// HTTPS (REST and MQTT over WebSockets).
    pub https_port: u16,
    /// MQTT over TLS.
    pub mqtt_port: u16,
    /// An operator's own certificate chain (PEM); the dev PKI is used when absent.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Seconds a new MQTT connection has to send CONNECT.
    pub mqtt_connect_timeout: u64,
    /// Open connections on both ports together; `None`: what the open-file limit allows.
    pub max_connections: Option<usize>,
    /// Connections not yet authenticated (in the TLS handshake, before the first HTTP
    /// request or before MQTT CONNECT is accepted).
    pub max_unauthenticated: usize,
    /// Seconds ahead a SAS token's expiry may lie; longer-lived tokens are refused.
    pub max_token_lifetime: u64,
    /// MQTT CONNECTs per second per device (0: no limit).
    pub throttle_device_connects: f64,
    /// Reported-property patches per second per device (0: no limit).
    pub throttle_device_twin_writes: f64,
    /// Device-to-cloud messages per second per device; past it acks are delayed (0: no limit).
    pub throttle_device_d2c: f64,
    /// REST operations per second for the whole hub (0: no limit).
    pub throttle_rest: f64,
    /// Seconds an HTTPS connection may stay silent with no request in flight.
    pub http_idle_timeout: u64,
    /// AMQP over TLS: the Event Hub-compatible endpoint (0: any free port).
    pub amqp_port: u16,
    /// Plaintext AMQP for the Event Hubs SDKs' emulator mode (`UseDevelopmentEmulator=true`);
    /// off unless given, and only on a loopback `bind`.
    pub amqp_plain_port: Option<u16>,
    /// Partitions of the built-in endpoint (1 to 32). Fixed once the event log exists.
    pub partitions: u32,
    /// Seconds telemetry is kept on the built-in endpoint.
    pub retention: u64,
    /// Bytes of telemetry kept per partition; the oldest segments go first (none: no bound).
    pub retention_bytes: Option<u64>,
    /// Cloud-to-device messages a device's queue holds (IoT Hub: 50).
    pub c2d_max_queue_depth: usize,
    /// Seconds a cloud-to-device message lives when its sender sets no expiry (IoT Hub: 3600).
    pub c2d_default_ttl: u64,
    /// Abandons after which a cloud-to-device message is dead-lettered (IoT Hub: 10).
    pub c2d_max_delivery_count: u32,
    /// Milliseconds between feedback messages unless 64 records wait (IoT Hub: 15000).
    pub c2d_feedback_interval_ms: u64,
    /// Attempts per message before a webhook gives up and dead-letters it.
    pub webhook_max_attempts: u32,
    /// Milliseconds before a webhook's first retry; doubled for each further one.
    pub webhook_initial_backoff_ms: u64,
    /// The longest wait in milliseconds between two attempts.
    pub webhook_max_backoff_ms: u64,
    /// Seconds after a message's first attempt past which no retry starts.
    pub webhook_max_retry_secs: u64,
    /// Every webhook option at once, for programs that embed the hub (tests): when set, it
    /// replaces the `webhook_*` settings. Not a file or environment setting.
    #[serde(skip)]
    pub webhook_tuning: Option<crate::webhook::WebhookOptions>,
    /// Custom routing endpoints (`[[endpoints]]`: name, kind, url).
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// Routes (`[[routes]]`: name, source, condition, endpoints, enabled).
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Enrichments (`[[enrichments]]`: key, value, endpoints).
    #[serde(default)]
    pub enrichments: Vec<EnrichmentSpec>,
    /// The fallback route (`[fallback] enabled = ...`); absent: IoT Hub's default, on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// The `[fallback]` table of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub enabled: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./twinhub-data"),
            store: None,
            cluster: None,
            node_id: None,
            hostname: "localhost".into(),
            bind: IpAddr::from([127, 0, 0, 1]),
            https_port: 443,
            mqtt_port: 8883,
            tls_cert: None,
            tls_key: None,
            mqtt_connect_timeout: 10,
            max_connections: None,
            max_unauthenticated: 1024,
            max_token_lifetime: twinhub_core::hub::DEFAULT_MAX_TOKEN_LIFETIME.as_secs(),
            throttle_device_connects: ThrottleConfig::default().device_connects,
            throttle_device_twin_writes: ThrottleConfig::default().device_twin_writes,
            throttle_device_d2c: ThrottleConfig::default().device_d2c,
            throttle_rest: ThrottleConfig::default().rest,
            http_idle_timeout: 120,
            amqp_port: 5671,
            amqp_plain_port: None,
            partitions: 4,
            retention: 86_400,
            retention_bytes: None,
            c2d_max_queue_depth: 50,
            c2d_default_ttl: 3600,
            c2d_max_delivery_count: 10,
            c2d_feedback_interval_ms: 15_000,
            webhook_max_attempts: 8,
            webhook_initial_backoff_ms: 1_000,
            webhook_max_backoff_ms: 60_000,
            webhook_max_retry_secs: 600,
            webhook_tuning: None,
            endpoints: Vec::new(),
            routes: Vec::new(),
            enrichments: Vec::new(),
            fallback: None,
        }
    }
}

/// Settings given on the command line; `None` means "not given".
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_connect_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unauthenticated: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_token_lifetime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_device_connects: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_device_twin_writes: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_device_d2c: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_rest: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_idle_timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_plain_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c2d_max_queue_depth: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c2d_default_ttl: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c2d_max_delivery_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c2d_feedback_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_initial_backoff_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_max_backoff_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_max_retry_secs: Option<u64>,
}

const KEYS: [&str; 32] = [
    "data_dir",
    "store",
    "cluster",
    "node_id",
    "hostname",
    "bind",
    "https_port",
    "mqtt_port",
    "tls_cert",
    "tls_key",
    "mqtt_connect_timeout",
    "max_connections",
    "max_unauthenticated",
    "max_token_lifetime",
    "throttle_device_connects",
    "throttle_device_twin_writes",
    "throttle_device_d2c",
    "throttle_rest",
    "http_idle_timeout",
    "amqp_port",
    "amqp_plain_port",
    "partitions",
    "retention",
    "retention_bytes",
    "c2d_max_queue_depth",
    "c2d_default_ttl",
    "c2d_max_delivery_count",
    "c2d_feedback_interval_ms",
    "webhook_max_attempts",
    "webhook_initial_backoff_ms",
    "webhook_max_backoff_ms",
    "webhook_max_retry_secs",
];

impl Config {
    /// The webhook delivery these settings give (retry schedule; the rest as built in).
    pub fn webhook(&self) -> crate::webhook::WebhookOptions {
        if let Some(tuning) = &self.webhook_tuning {
            return tuning.clone();
        }
        crate::webhook::WebhookOptions {
            max_attempts: self.webhook_max_attempts,
            initial_backoff: std::time::Duration::from_millis(self.webhook_initial_backoff_ms),
            max_backoff: std::time::Duration::from_millis(self.webhook_max_backoff_ms),
            max_retry_time: std::time::Duration::from_secs(self.webhook_max_retry_secs),
            ..Default::default()
        }
    }

    /// The routing configuration of the file, as the hub takes it.
    pub fn routing(&self) -> RoutingConfig {
        RoutingConfig {
            endpoints: self.endpoints.clone(),
            routes: self.routes.clone(),
            enrichments: self.enrichments.clone(),
            fallback_enabled: self.fallback.is_none_or(|f| f.enabled),
        }
    }

    /// The cloud-to-device rules these settings give.
    pub fn c2d(&self) -> twinhub_core::c2d::C2dOptions {
        twinhub_core::c2d::C2dOptions {
            max_queue_depth: self.c2d_max_queue_depth,
            default_ttl: std::time::Duration::from_secs(self.c2d_default_ttl),
            max_delivery_count: self.c2d_max_delivery_count,
            feedback_interval: std::time::Duration::from_millis(self.c2d_feedback_interval_ms),
            ..Default::default()
        }
    }

    /// Resolves the settings: defaults < `file` < `TWINHUB_*` environment < `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ServerError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ServerError::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        // Only the known keys: other TWINHUB_* variables (the CLI's connection string, test
        // settings) are not hub settings.
        fig = fig.merge(Env::prefixed("TWINHUB_").only(&KEYS));
        fig = fig.merge(Serialized::defaults(overrides));
        let config: Config = fig
            .extract()
            .map_err(|e| ServerError::Config(e.to_string().replace('\n', "; ")))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ServerError> {
        if let Some(url) = &self.store
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ServerError::Config(
                "store must be a postgres:// (or postgresql://) URL; leave it out for the embedded store in data_dir".into(),
            ));
        }
        if let Some(url) = &self.cluster {
            if !url.starts_with("nats://") {
                return Err(ServerError::Config(
                    "cluster must be a nats:// URL (the NATS server with JetStream the nodes share)".into(),
                ));
            }
            if self.store.is_none() {
                return Err(ServerError::Config(
                    "cluster needs a shared store: give store = postgres://... too".into(),
                ));
            }
            if let Some(node) = &self.node_id {
                twinhub_cluster_nats::validate_node_id(node)
                    .map_err(|e| ServerError::Config(e.to_string()))?;
            }
        }
        if self.hostname.is_empty() || self.hostname.contains(['/', ' ', ':']) {
            return Err(ServerError::Config(format!(
                "hostname '{}' must be a bare host name or IP address",
                self.hostname
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ServerError::Config(
                "tls_cert and tls_key must be given together".into(),
            ));
        }
        if self.https_port == self.mqtt_port && self.https_port != 0 {
            return Err(ServerError::Config(
                "https_port and mqtt_port must differ".into(),
            ));
        }
        if self.mqtt_connect_timeout == 0 {
            return Err(ServerError::Config(
                "mqtt_connect_timeout must be at least 1 second".into(),
            ));
        }
        if self.max_connections == Some(0) || self.max_unauthenticated == 0 {
            return Err(ServerError::Config(
                "max_connections and max_unauthenticated must be at least 1".into(),
            ));
        }
        if self.http_idle_timeout == 0 {
            return Err(ServerError::Config(
                "http_idle_timeout must be at least 1 second".into(),
            ));
        }
        if self.max_token_lifetime == 0 {
            return Err(ServerError::Config(
                "max_token_lifetime must be at least 1 second".into(),
            ));
        }
        if !(1..=32).contains(&self.partitions) {
            return Err(ServerError::Config(
                "partitions must be between 1 and 32".into(),
            ));
        }
        if self.retention == 0 {
            return Err(ServerError::Config(
                "retention must be at least 1 second".into(),
            ));
        }
        if !(1..=5000).contains(&self.c2d_max_queue_depth) {
            return Err(ServerError::Config(
                "c2d_max_queue_depth must be between 1 and 5000".into(),
            ));
        }
        // IoT Hub's range for defaultTtlAsIso8601: one minute to two days.
        if !(60..=172_800).contains(&self.c2d_default_ttl) {
            return Err(ServerError::Config(
                "c2d_default_ttl must be between 60 and 172800 seconds (IoT Hub's range)".into(),
            ));
        }
        if !(1..=100).contains(&self.c2d_max_delivery_count) {
            return Err(ServerError::Config(
                "c2d_max_delivery_count must be between 1 and 100 (IoT Hub's range)".into(),
            ));
        }
        if self.webhook_max_attempts == 0
            || self.webhook_initial_backoff_ms == 0
            || self.webhook_max_backoff_ms < self.webhook_initial_backoff_ms
        {
            return Err(ServerError::Config(
                "webhook_max_attempts and webhook_initial_backoff_ms must be at least 1, and webhook_max_backoff_ms at least webhook_initial_backoff_ms".into(),
            ));
        }
        if self.c2d_feedback_interval_ms == 0 {
            return Err(ServerError::Config(
                "c2d_feedback_interval_ms must be at least 1".into(),
            ));
        }
        if self.amqp_plain_port.is_some() && !self.bind.is_loopback() {
            return Err(ServerError::Config(format!(
                "amqp_plain_port serves AMQP without TLS, so it is only allowed on a loopback bind (bind is {})",
                self.bind
            )));
        }
        let ports = [
            Some(self.https_port),
            Some(self.mqtt_port),
            Some(self.amqp_port),
            self.amqp_plain_port,
        ];
        for (i, a) in ports.iter().enumerate() {
            for b in &ports[i + 1..] {
                if let (Some(a), Some(b)) = (a, b)
                    && a == b
                    && *a != 0
                {
                    return Err(ServerError::Config(format!(
                        "port {a} is given to two listeners; each needs its own"
                    )));
                }
            }
        }
        self.throttles().validate().map_err(ServerError::Config)?;
        self.validate_routing()
    }

    /// The file's routing must stand on its own: names, limits, conditions that parse, and
    /// routes and enrichments naming `events` or an endpoint of the file. Checked before
    /// anything is opened, so `serve` stops with the reason instead of starting half-routed.
    fn validate_routing(&self) -> Result<(), ServerError> {
        let routing = self.routing();
        let entity = twinhub_proto::connection_string::hub_name(&self.hostname);
        if let Some(e) = routing
            .endpoints
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(&entity))
        {
            // Readers name a stream by EntityPath, and this one is the built-in endpoint's.
            return Err(ServerError::Config(format!(
                "routing: endpoint name {:?} is the built-in endpoint's Event Hub name; choose another",
                e.name
            )));
        }
        Router::compile(routing, &self.hostname)
            .map(|_| ())
            .map_err(|e| ServerError::Config(format!("routing: {e}")))
    }

    /// The throttles as the hub takes them.
    pub fn throttles(&self) -> ThrottleConfig {
        ThrottleConfig {
            device_connects: self.throttle_device_connects,
            device_twin_writes: self.throttle_device_twin_writes,
            device_d2c: self.throttle_device_d2c,
            rest: self.throttle_rest,
        }
    }
}

#[cfg(test)]
// figment's test jail returns its own large error type; fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn precedence_defaults_file_env_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "hub.toml",
                "hostname = \"file.local\"\nhttps_port = 8443\nmqtt_port = 9883\n",
            )?;
            jail.set_env("TWINHUB_HTTPS_PORT", "9443");
            jail.set_env("TWINHUB_CONNECTION_STRING", "not a hub setting");
            let overrides = Overrides {
                mqtt_port: Some(10883),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("hub.toml")), &overrides).unwrap();
            assert_eq!(c.hostname, "file.local");
            assert_eq!(c.https_port, 9443);
            assert_eq!(c.mqtt_port, 10883);
            assert_eq!(c.data_dir, PathBuf::from("./twinhub-data"));
            Ok(())
        });
    }

    #[test]
    fn store_and_cluster_urls_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TWINHUB_STORE", "postgres://hub@db.local/hub");
            jail.set_env("TWINHUB_CLUSTER", "nats://nats.local:4222");
            jail.set_env("TWINHUB_NODE_ID", "node-2");
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.store.as_deref(), Some("postgres://hub@db.local/hub"));
            assert_eq!(c.cluster.as_deref(), Some("nats://nats.local:4222"));
            assert_eq!(c.node_id.as_deref(), Some("node-2"));
            Ok(())
        });
        let refused = |overrides: Overrides| {
            Config::load(None, &overrides)
                .expect_err("refused")
                .to_string()
        };
        assert!(
            refused(Overrides {
                store: Some("mysql://db/hub".into()),
                ..Default::default()
            })
            .contains("store must be a postgres://")
        );
        assert!(
            refused(Overrides {
                store: Some("postgresql://db/hub".into()),
                cluster: Some("redis://bus".into()),
                ..Default::default()
            })
            .contains("cluster must be a nats://")
        );
        assert!(
            refused(Overrides {
                cluster: Some("nats://bus:4222".into()),
                ..Default::default()
            })
            .contains("cluster needs a shared store")
        );
    }

    #[test]
    fn unknown_key_in_file_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "hostnme = \"x\"\n")?;
            let err = Config::load(Some(Path::new("bad.toml")), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("hostnme"), "{err}");
            Ok(())
        });
    }

    const ROUTING: &str = r#"
[[endpoints]]
name = "alerts"
kind = "stream"

[[routes]]
name = "hot"
source = "DeviceMessages"
condition = "temperatureAlert = 'true'"
endpoints = ["alerts"]

[[enrichments]]
key = "region"
value = "$twin.tags.region"
endpoints = ["alerts", "events"]

[fallback]
enabled = false
"#;

    #[test]
    fn routing_tables_are_read_from_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("hub.toml", ROUTING)?;
            let c = Config::load(Some(Path::new("hub.toml")), &Overrides::default()).unwrap();
            let r = c.routing();
            assert_eq!(r.endpoints.len(), 1);
            assert_eq!(r.endpoints[0].name, "alerts");
            assert_eq!(r.routes[0].condition, "temperatureAlert = 'true'");
            assert!(r.routes[0].enabled, "enabled defaults to true");
            assert_eq!(r.enrichments[0].endpoints, ["alerts", "events"]);
            assert!(!r.fallback_enabled);
            // Without [fallback], IoT Hub's default: on.
            let plain = Config::load(None, &Overrides::default()).unwrap();
            assert!(plain.routing().fallback_enabled);
            Ok(())
        });
    }

    fn load_error(toml: &str) -> String {
        let mut message = String::new();
        figment::Jail::expect_with(|jail| {
            jail.create_file("hub.toml", toml)?;
            message = Config::load(Some(Path::new("hub.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            Ok(())
        });
        message
    }

    #[test]
    fn bad_routing_stops_the_start_with_the_reason() {
        let bad_condition = ROUTING.replace("temperatureAlert = 'true'", "temperatureAlert = ");
        let e = load_error(&bad_condition);
        assert!(e.contains("route hot: the condition does not parse"), "{e}");
        let unknown = ROUTING.replace("endpoints = [\"alerts\"]", "endpoints = [\"nowhere\"]");
        let e = load_error(&unknown);
        assert!(
            e.contains("names endpoint nowhere, which does not exist"),
            "{e}"
        );
        let typo = ROUTING.replace("condition =", "conditon =");
        let e = load_error(&typo);
        assert!(e.contains("conditon"), "{e}");
        let bad_source = ROUTING.replace("DeviceMessages", "Telemetry");
        let e = load_error(&bad_source);
        assert!(e.contains("Telemetry"), "{e}");
        let taken = ROUTING.replace("\"alerts\"", "\"twinhub\"");
        let e = load_error(&taken);
        assert!(e.contains("built-in endpoint's Event Hub name"), "{e}");
        let fallback_typo = ROUTING.replace("enabled = false", "enable = false");
        let e = load_error(&fallback_typo);
        assert!(e.contains("enable"), "{e}");
    }
}

//! The one `Config` of `twinhub serve`: defaults, then an optional TOML file, then `TWINHUB_*`
//! environment variables, then command-line flags (the CLI passes those in as overrides).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// Every setting of the hub process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the store, TLS material and policies live.
    pub data_dir: PathBuf,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./twinhub-data"),
            hostname: "localhost".into(),
            bind: IpAddr::from([127, 0, 0, 1]),
            https_port: 443,
            mqtt_port: 8883,
            tls_cert: None,
            tls_key: None,
            mqtt_connect_timeout: 10,
        }
    }
}

/// Settings given on the command line; `None` means "not given".
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
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
}

const KEYS: [&str; 8] = [
    "data_dir",
    "hostname",
    "bind",
    "https_port",
    "mqtt_port",
    "tls_cert",
    "tls_key",
    "mqtt_connect_timeout",
];

impl Config {
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
        Ok(())
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
    fn unknown_key_in_file_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "hostnme = \"x\"\n")?;
            let err = Config::load(Some(Path::new("bad.toml")), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("hostnme"), "{err}");
            Ok(())
        });
    }
}

//! `<data_dir>/hub.json`: the hub's shared access policies and the names and ports it last
//! served on. A plain file (not the store) because the CLI reads it while a running hub holds
//! the store's exclusive lock. Written once with fresh keys, then reused, so connection
//! strings survive restarts.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use twinhub_core::auth::{Policy, default_policies};
use twinhub_proto::connection_string::ConnectionString;

use crate::config::Config;
use crate::error::ServerError;

pub const FILE_NAME: &str = "hub.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubFile {
    pub hostname: String,
    pub https_port: u16,
    pub mqtt_port: u16,
    /// The Event Hub-compatible endpoint: AMQP over TLS, its plaintext port if enabled, and
    /// its name (absent in files written before the endpoint existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp_plain_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_hub_name: Option<String>,
    pub policies: Vec<Policy>,
}

/// The ports one start serves on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub https: u16,
    pub mqtt: u16,
    pub amqp: u16,
    pub amqp_plain: Option<u16>,
}

fn data_dir_err(path: &Path, reason: impl std::fmt::Display) -> ServerError {
    ServerError::DataDir {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Makes sure the data dir exists, is readable by its owner only (it holds every key), and
/// is writable (a probe file, fsynced and removed).
pub fn ensure_data_dir(dir: &Path) -> Result<(), ServerError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| data_dir_err(dir, format!("cannot create it: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(dir)
            && meta.permissions().mode() & 0o077 != 0
        {
            match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "made the data dir owner-only (0700): it holds every device key")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "the data dir is readable by others and could not be made owner-only: {e}")
                }
            }
        }
    }
    let probe = dir.join(".write-probe");
    fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"ok").and_then(|_| f.sync_all()))
        .map_err(|e| data_dir_err(dir, format!("not writable: {e}")))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one:
/// a temporary file beside it, fsynced, given `mode` (also when the file existed before), renamed
/// over it, and the directory fsynced so the rename itself is durable.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl HubFile {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    /// Reads `hub.json` from a data dir (for the CLI).
    pub fn read(data_dir: &Path) -> Result<HubFile, ServerError> {
        let path = Self::path(data_dir);
        let text = fs::read_to_string(&path).map_err(|e| {
            data_dir_err(
                data_dir,
                format!(
                    "cannot read {FILE_NAME} ({e}); has `twinhub serve` run with this data dir?"
                ),
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| data_dir_err(data_dir, format!("{FILE_NAME} is corrupt: {e}")))
    }

    /// Loads `hub.json`, creating it with fresh policies on first start, and records the
    /// hostname and ports of this start.
    pub fn load_or_create(config: &Config, ports: Ports) -> Result<HubFile, ServerError> {
        let dir = &config.data_dir;
        let policies = if Self::path(dir).exists() {
            Self::read(dir)?.policies
        } else {
            default_policies()
        };
        let file = HubFile {
            hostname: config.hostname.clone(),
            https_port: ports.https,
            mqtt_port: ports.mqtt,
            amqp_port: Some(ports.amqp),
            amqp_plain_port: ports.amqp_plain,
            event_hub_name: Some(twinhub_proto::connection_string::hub_name(&config.hostname)),
            policies,
        };
        file.write(dir)?;
        Ok(file)
    }

    /// Takes a cluster's shared policies in place of this data dir's own.
    pub fn adopt_policies(&mut self, dir: &Path, policies: Vec<Policy>) -> Result<(), ServerError> {
        if self.policies != policies {
            self.policies = policies;
            self.write(dir)?;
        }
        Ok(())
    }

    fn write(&self, dir: &Path) -> Result<(), ServerError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        write_atomic(&Self::path(dir), text.as_bytes(), 0o600)
            .map_err(|e| data_dir_err(dir, format!("cannot write {FILE_NAME}: {e}")))
    }

    /// The host part of service connection strings (with `:port` off 443).
    pub fn service_host(&self) -> String {
        if self.https_port == 443 {
            self.hostname.clone()
        } else {
            format!("{}:{}", self.hostname, self.https_port)
        }
    }

    /// A service connection string for `policy`.
    pub fn connection_string(&self, policy: &str) -> Option<String> {
        let p = self.policies.iter().find(|p| p.name == policy)?;
        Some(ConnectionString::service(&self.service_host(), &p.name, &p.primary_key).to_string())
    }

    /// The Event Hub-compatible connection string of the built-in endpoint for `policy`, as
    /// the Event Hubs SDKs take it. Over TLS they always dial 5671 (the port in `Endpoint` is
    /// ignored), so it is written only when it is not 5671, for tools that honour it. With
    /// `plain`, the emulator form for the plaintext port (`UseDevelopmentEmulator=true`).
    pub fn events_connection_string(&self, policy: &str, plain: bool) -> Option<String> {
        let name = self.event_hub_name.clone()?;
        self.entity_connection_string(policy, plain, &name)
    }

    /// The same for the Event Hub-compatible entity `name`: a custom stream endpoint of the
    /// routing configuration (read with `EntityPath=<endpoint name>`). Whether the endpoint
    /// exists is the running hub's to say; this file does not know the routing configuration.
    pub fn entity_connection_string(
        &self,
        policy: &str,
        plain: bool,
        name: &str,
    ) -> Option<String> {
        let p = self.policies.iter().find(|p| p.name == policy)?;
        if plain {
            let port = self.amqp_plain_port?;
            return Some(format!(
                "Endpoint=sb://{}:{port};SharedAccessKeyName={};SharedAccessKey={};EntityPath={name};UseDevelopmentEmulator=true",
                self.hostname, p.name, p.primary_key
            ));
        }
        let port = self.amqp_port?;
        let host = if port == 5671 {
            self.hostname.clone()
        } else {
            format!("{}:{port}", self.hostname)
        };
        Some(format!(
            "Endpoint=sb://{host}/;SharedAccessKeyName={};SharedAccessKey={};EntityPath={name}",
            p.name, p.primary_key
        ))
    }
}

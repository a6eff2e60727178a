//! The persisted form of a device: identity and twin in one record under one key, so a
//! device and its twin change atomically. Renders into the wire models of `twinhub-proto`.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, ConnectionState, Device, DeviceCapabilities,
    DeviceStatus, SymmetricKey, Twin, TwinProperties, X509Thumbprint,
};

use crate::error::{Error, Result};
use crate::twin_doc::Section;

/// Stored credentials of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAuth {
    pub auth_type: AuthenticationType,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

/// The twin part of a device record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinState {
    /// Increments on any change of tags, desired or reported.
    pub version: u64,
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
}

/// One device or module identity: identity, credentials, presence times and twin. A module's
/// record names its device in `device_id` and itself in `module_id`, and lives in the store's
/// `modules` table under its [`identity key`](DeviceRecord::key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// A module's `managedBy` (IoT Edge sets it); never set on a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    pub generation_id: String,
    /// Bumped on every identity change; the device etag is derived from it.
    pub identity_version: u64,
    pub status: DeviceStatus,
    pub status_reason: Option<String>,
    pub status_updated_time: String,
    pub auth: StoredAuth,
    pub iot_edge: bool,
    pub device_scope: Option<String>,
    pub parent_scopes: Vec<String>,
    pub connection_state_updated_time: String,
    pub last_activity_time: String,
    pub cloud_to_device_message_count: u64,
    pub twin: TwinState,
    /// In a cluster, the node holding the identity's session (set by its CONNECT, cleared by
    /// its disconnect); never set on a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// In a cluster, the bytes this record was read from: its save applies only if the store
    /// still holds them, so two nodes never overwrite each other's change. Not stored.
    #[serde(skip)]
    pub(crate) read_as: ReadAs,
}

/// The stored bytes a record was read from (see [`DeviceRecord::read_as`]). Records compare
/// equal whatever they were read from.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadAs(pub(crate) Option<std::sync::Arc<[u8]>>);

impl PartialEq for ReadAs {
    fn eq(&self, _: &ReadAs) -> bool {
        true
    }
}

/// The key naming an identity throughout the hub (store, sessions, locks, throttles):
/// `deviceId` for a device, `deviceId/moduleId` for a module. Ids never contain '/'.
pub fn identity_key(device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(m) => format!("{device_id}/{m}"),
        None => device_id.to_string(),
    }
}

/// Splits an identity key into device and module ids.
pub fn split_identity(key: &str) -> (&str, Option<&str>) {
    match key.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (key, None),
    }
}

/// The table an identity's record lives in.
pub fn table_of(key: &str) -> twinhub_store::Table {
    if key.contains('/') {
        twinhub_store::Table::Modules
    } else {
        twinhub_store::Table::Devices
    }
}

impl DeviceRecord {
    /// This identity's key (see [`identity_key`]).
    pub fn key(&self) -> String {
        identity_key(&self.device_id, self.module_id.as_deref())
    }

    /// The store write that saves this record.
    pub fn write(&self) -> twinhub_store::Write {
        let key = self.key();
        twinhub_store::Write::put(table_of(&key), key, self.encode())
    }

    /// Whether this is a module identity.
    pub fn is_module(&self) -> bool {
        self.module_id.is_some()
    }

    /// The Module document of the registry API.
    pub fn to_module(&self, connected: bool) -> twinhub_proto::model::Module {
        twinhub_proto::model::Module {
            module_id: self.module_id.clone().unwrap_or_default(),
            managed_by: self.managed_by.clone(),
            device_id: self.device_id.clone(),
            generation_id: Some(self.generation_id.clone()),
            etag: Some(self.device_etag()),
            connection_state: Some(connection_state(connected)),
            connection_state_updated_time: Some(self.connection_state_updated_time.clone()),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(self.cloud_to_device_message_count),
            authentication: Some(self.authentication(true)),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            static LOGS: crate::logsafe::RateLimit =
                crate::logsafe::RateLimit::new(std::time::Duration::from_secs(60), 5);
            if let Some(suppressed) = LOGS.allow() {
                tracing::error!(error = %e, suppressed, "a device record in the store cannot be decoded");
            }
            Error::internal()
        })
    }

    /// The identity etag as IoT Hub shapes it: base64 of a decimal counter.
    pub fn device_etag(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.identity_version.to_string())
    }

    /// The twin etag: base64 of the twin version as 8 big-endian bytes (`AAAAAAAAAAE=` is 1).
    pub fn twin_etag(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.twin.version.to_be_bytes())
    }

    pub fn authentication(&self, with_keys: bool) -> AuthenticationMechanism {
        let a = &self.auth;
        AuthenticationMechanism {
            symmetric_key: Some(SymmetricKey {
                primary_key: if with_keys {
                    a.primary_key.clone()
                } else {
                    None
                },
                secondary_key: if with_keys {
                    a.secondary_key.clone()
                } else {
                    None
                },
            }),
            x509_thumbprint: Some(X509Thumbprint {
                primary_thumbprint: a.primary_thumbprint.clone(),
                secondary_thumbprint: a.secondary_thumbprint.clone(),
            }),
            auth_type: a.auth_type,
        }
    }

    /// The Device document of the registry API.
    pub fn to_device(&self, connected: bool) -> Device {
        Device {
            device_id: self.device_id.clone(),
            generation_id: Some(self.generation_id.clone()),
            etag: Some(self.device_etag()),
            connection_state: Some(connection_state(connected)),
            status: self.status,
            status_reason: self.status_reason.clone(),
            connection_state_updated_time: Some(self.connection_state_updated_time.clone()),
            status_updated_time: Some(self.status_updated_time.clone()),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(self.cloud_to_device_message_count),
            authentication: Some(self.authentication(true)),
            capabilities: Some(DeviceCapabilities {
                iot_edge: self.iot_edge,
            }),
            device_scope: self.device_scope.clone(),
            parent_scopes: Some(self.parent_scopes.clone()),
        }
    }

    /// The full Twin document of the twin API.
    pub fn to_twin(&self, connected: bool) -> Twin {
        let (Value::Object(desired), Value::Object(reported)) = (
            self.twin.desired.to_service_json(),
            self.twin.reported.to_service_json(),
        ) else {
            unreachable!("a section renders as an object")
        };
        Twin {
            device_id: self.device_id.clone(),
            module_id: self.module_id.clone(),
            etag: Some(self.twin_etag()),
            device_etag: Some(self.device_etag()),
            status: Some(self.status),
            status_reason: self.status_reason.clone(),
            status_update_time: Some(self.status_updated_time.clone()),
            connection_state: Some(connection_state(connected)),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(self.cloud_to_device_message_count),
            authentication_type: Some(self.auth.auth_type),
            x509_thumbprint: Some(X509Thumbprint {
                primary_thumbprint: self.auth.primary_thumbprint.clone(),
                secondary_thumbprint: self.auth.secondary_thumbprint.clone(),
            }),
            model_id: Some(String::new()),
            version: Some(self.twin.version),
            tags: Some(self.twin.tags.clone()),
            properties: Some(TwinProperties { desired, reported }),
            // A module twin has no capabilities or scopes: they belong to the device.
            capabilities: self.module_id.is_none().then_some(DeviceCapabilities {
                iot_edge: self.iot_edge,
            }),
            device_scope: self
                .module_id
                .is_none()
                .then(|| self.device_scope.clone())
                .flatten(),
            parent_scopes: self.module_id.is_none().then(|| self.parent_scopes.clone()),
        }
    }

    /// What a device receives for a twin GET: `{"desired": {..}, "reported": {..}}`.
    pub fn device_twin_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("desired".into(), self.twin.desired.to_device_json());
        m.insert("reported".into(), self.twin.reported.to_device_json());
        Value::Object(m)
    }
}

fn connection_state(connected: bool) -> ConnectionState {
    if connected {
        ConnectionState::Connected
    } else {
        ConnectionState::Disconnected
    }
}

/// Strips surrounding quotes from an If-Match value; `None` when it matches anything.
pub fn if_match_value(if_match: Option<&str>) -> Option<&str> {
    let v = if_match?.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v);
    if v == "*" || v.is_empty() {
        None
    } else {
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_forms() {
        assert_eq!(if_match_value(None), None);
        assert_eq!(if_match_value(Some("*")), None);
        assert_eq!(if_match_value(Some("\"*\"")), None);
        assert_eq!(if_match_value(Some("\"AAAA\"")), Some("AAAA"));
        assert_eq!(if_match_value(Some("AAAA")), Some("AAAA"));
    }
}

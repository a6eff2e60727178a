//! JSON documents of IoT Hub's service REST API (registry, twins, methods, bulk import,
//! statistics, queries), shaped after the `azure-iot-hub` msrest models.
//!
//! Served by the REST server, sent and read by the Rust SDK. Deserialization is lenient like
//! msrest's: unknown fields are ignored and missing optional fields take their defaults.
//! Serialization follows the real hub's field order. Timestamps stay `String`
//! (see [`crate::time`]).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// A JSON object, used for tags and twin property sections.
pub type JsonObject = Map<String, Value>;

/// Whether an identity may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceStatus {
    #[default]
    Enabled,
    Disabled,
}

/// Whether an identity currently has a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ConnectionState {
    #[default]
    Disconnected,
    Connected,
}

/// How an identity authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthenticationType {
    #[default]
    Sas,
    SelfSigned,
    CertificateAuthority,
    None,
}

/// Primary and secondary symmetric keys (base64). Absent keys serialize as `null`, as the
/// real hub does for non-SAS identities.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SymmetricKey {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

/// Primary and secondary X.509 thumbprints (hex). Absent ones serialize as `null`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct X509Thumbprint {
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

/// The `authentication` object of a device or module.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuthenticationMechanism {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
    #[serde(rename = "type")]
    pub auth_type: AuthenticationType,
}

/// Device capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceCapabilities {
    pub iot_edge: bool,
}

/// A device identity (`GET/PUT /devices/{id}`).
///
/// Server-assigned fields are `Option` so a client's create request can leave them out; the
/// server fills them all in its responses.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    pub status: DeviceStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state_updated_time: Option<String>,
    /// Note the spelling: `statusUpdatedTime` here, `statusUpdateTime` on [`Twin`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_updated_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationMechanism>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
}

/// A module identity (`GET/PUT /devices/{d}/modules/{m}`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Module {
    pub module_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state_updated_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationMechanism>,
}

/// `properties` of a twin: desired and reported sections, each holding user keys plus
/// `$version` and `$metadata`. This is also the whole device-side twin document.
///
/// An empty section is left out when serializing, so a service PATCH that only touches
/// `desired` does not send `"reported": {}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TwinProperties {
    #[serde(
        skip_serializing_if = "Map::is_empty",
        deserialize_with = "null_as_empty"
    )]
    pub desired: JsonObject,
    #[serde(
        skip_serializing_if = "Map::is_empty",
        deserialize_with = "null_as_empty"
    )]
    pub reported: JsonObject,
}

/// A device or module twin (`GET/PATCH/PUT /twins/{id}`, query results).
///
/// Everything but `deviceId` is optional so the same type carries the full server document,
/// a service PATCH body (`tags` and `properties.desired` only) and query projections.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Twin {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_update_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication_type: Option<AuthenticationType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// Not in the msrest model, but sent by the real hub (PnP model id, often `""`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `None` means "not sent", which on PATCH is different from `{}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<JsonObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
}

/// A direct-method invocation (`POST /twins/{id}/methods`).
///
/// The timeouts stay signed so the server can answer a negative value with 400 instead of
/// a deserialization error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceMethod {
    pub method_name: String,
    /// Any JSON; the Python SDK sends `""` for "no payload". `null` reads back as `None`.
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_in_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_in_seconds: Option<i64>,
}

/// The device's answer to a direct method, returned with HTTP 200 whatever `status` is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudToDeviceMethodResult {
    pub status: i32,
    #[serde(default)]
    pub payload: Value,
}

/// What a bulk registry entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImportMode {
    Create,
    Update,
    UpdateIfMatchETag,
    Delete,
    DeleteIfMatchETag,
    UpdateTwin,
    UpdateTwinIfMatchETag,
    #[default]
    CreateOrUpdate,
    CreateOrUpdateIfMatchETag,
}

/// One entry of a bulk registry request (`POST /devices`) or an import/export blob.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExportImportDevice {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    #[serde(rename = "eTag", skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    pub import_mode: ImportMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationMechanism>,
    #[serde(rename = "twinETag", skip_serializing_if = "Option::is_none")]
    pub twin_e_tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<JsonObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
}

/// The answer to a bulk registry request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BulkRegistryOperationResult {
    pub is_successful: bool,
    pub errors: Vec<DeviceRegistryOperationError>,
    pub warnings: Vec<DeviceRegistryOperationWarning>,
}

/// A failed entry of a bulk registry request. `error_code` is an error name such as
/// `DeviceNotFound` (see [`crate::error::ErrorCode::name`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceRegistryOperationError {
    pub device_id: String,
    pub error_code: String,
    pub error_status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
}

impl DeviceRegistryOperationError {
    /// An error entry for `device_id` with the code's name and a human-readable status.
    pub fn new(
        device_id: &str,
        code: crate::error::ErrorCode,
        status: &str,
    ) -> DeviceRegistryOperationError {
        DeviceRegistryOperationError {
            device_id: device_id.to_owned(),
            error_code: code.name().to_owned(),
            error_status: status.to_owned(),
            module_id: None,
            operation: None,
        }
    }
}

/// A warning entry of a bulk registry request (e.g. `DeviceRegisteredWithoutTwin`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceRegistryOperationWarning {
    pub device_id: String,
    pub warning_code: String,
    pub warning_status: String,
}

/// `GET /statistics/devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RegistryStatistics {
    pub total_device_count: u64,
    pub enabled_device_count: u64,
    pub disabled_device_count: u64,
}

/// `GET /statistics/service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceStatistics {
    pub connected_device_count: u64,
}

/// The body of `POST /devices/query`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuerySpecification {
    pub query: String,
}

/// The answer to `DELETE /devices/{id}/commands` (purge the cloud-to-device queue).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PurgeMessageQueueResult {
    pub total_messages_purged: u64,
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
}

/// Reads `null` as an empty object; msrest clients may send a section as `null`.
fn null_as_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<JsonObject, D::Error> {
    Ok(Option::<JsonObject>::deserialize(deserializer)?.unwrap_or_default())
}

/// A scheduled job as created by `PUT /jobs/v2/{id}` (`scheduleDeviceMethod` or
/// `scheduleUpdateTwin`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JobRequest {
    pub job_id: String,
    #[serde(rename = "type")]
    pub job_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<Twin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_execution_time_in_seconds: Option<i64>,
}

/// Per-device progress of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceJobStatistics {
    pub device_count: u64,
    pub failed_count: u64,
    pub succeeded_count: u64,
    pub running_count: u64,
    pub pending_count: u64,
}

/// A job as the hub reports it (`GET /jobs/v2/{id}` and friends).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JobResponse {
    pub job_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_execution_time_in_seconds: Option<i64>,
    #[serde(rename = "type")]
    pub job_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<Twin>,
    /// `queued`, `scheduled`, `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_job_statistics: Option<DeviceJobStatistics>,
}

/// A page of a jobs query (`GET /jobs/v2/query`): an object, as the Python SDK requires.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QueryResult {
    #[serde(rename = "type")]
    pub item_type: String,
    pub items: Vec<Value>,
    pub continuation_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_str<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("{s} must deserialize: {e}"))
    }

    fn to_string<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).expect("models always serialize")
    }

    /// The real-hub twin from wire-protocol.md section h, minified.
    const REAL_TWIN: &str = r#"{"deviceId":"myEdgeDevice","etag":"AAAAAAAAAAE=","deviceEtag":"NTgwMDg5MDAz","status":"enabled","statusUpdateTime":"0001-01-01T00:00:00Z","connectionState":"Disconnected","lastActivityTime":"0001-01-01T00:00:00Z","cloudToDeviceMessageCount":0,"authenticationType":"sas","x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"modelId":"","version":2,"tags":{},"properties":{"desired":{"$metadata":{"$lastUpdated":"2019-12-29T00:58:49.9315265Z"},"$version":1},"reported":{"$metadata":{"$lastUpdated":"2019-12-29T00:58:49.9315265Z"},"$version":1}},"capabilities":{"iotEdge":false}}"#;

    #[test]
    fn real_hub_twin_round_trips_byte_for_byte() {
        let twin: Twin = from_str(REAL_TWIN);
        assert_eq!(twin.device_id, "myEdgeDevice");
        assert_eq!(twin.version, Some(2));
        assert_eq!(twin.status, Some(DeviceStatus::Enabled));
        assert_eq!(twin.connection_state, Some(ConnectionState::Disconnected));
        assert_eq!(twin.authentication_type, Some(AuthenticationType::Sas));
        assert_eq!(twin.tags, Some(JsonObject::new()));
        let props = twin.properties.clone().unwrap_or_default();
        assert_eq!(props.desired.get("$version"), Some(&json!(1)));
        assert_eq!(to_string(&twin), REAL_TWIN);
    }

    #[test]
    fn twin_patch_body_keeps_nulls_and_omits_the_rest() {
        let patch: Twin =
            from_str(r#"{"tags":{"a":1},"properties":{"desired":{"x":null,"y":{"z":2}}}}"#);
        assert_eq!(patch.device_id, "");
        let props = patch.properties.clone().unwrap_or_default();
        assert_eq!(props.desired.get("x"), Some(&Value::Null));
        assert!(props.reported.is_empty());
        assert_eq!(
            to_string(&patch),
            r#"{"tags":{"a":1},"properties":{"desired":{"x":null,"y":{"z":2}}}}"#
        );
        // Absent tags and empty tags stay distinguishable.
        let no_tags: Twin = from_str(r#"{"properties":{"desired":{}}}"#);
        assert_eq!(no_tags.tags, None);
    }

    #[test]
    fn twin_is_lenient() {
        // Echoed read-only fields, an empty thumbprint object, nulls and unknown fields.
        let twin: Twin = from_str(
            r#"{"deviceId":"d","x509Thumbprint":{},"tags":null,"properties":{"desired":null,"reported":{"a":1}},"extra":{"deep":[1]},"statusReason":null}"#,
        );
        assert_eq!(twin.x509_thumbprint, Some(X509Thumbprint::default()));
        assert_eq!(twin.tags, None);
        let props = twin.properties.unwrap_or_default();
        assert!(props.desired.is_empty());
        assert_eq!(props.reported.get("a"), Some(&json!(1)));
        let empty: Twin = from_str("{}");
        assert_eq!(empty, Twin::default());
    }

    #[test]
    fn module_twin_has_module_id_after_device_id() {
        let twin = Twin {
            device_id: "d".into(),
            module_id: Some("m".into()),
            version: Some(3),
            ..Twin::default()
        };
        assert_eq!(
            to_string(&twin),
            r#"{"deviceId":"d","moduleId":"m","version":3}"#
        );
    }

    #[test]
    fn device_serializes_in_hub_order() {
        let device = Device {
            device_id: "d1".into(),
            generation_id: Some("637000000000000000".into()),
            etag: Some("MA==".into()),
            connection_state: Some(ConnectionState::Connected),
            status: DeviceStatus::Disabled,
            status_reason: Some("why".into()),
            connection_state_updated_time: Some("t1".into()),
            status_updated_time: Some("t2".into()),
            last_activity_time: Some("t3".into()),
            cloud_to_device_message_count: Some(0),
            authentication: Some(AuthenticationMechanism {
                symmetric_key: Some(SymmetricKey {
                    primary_key: Some("p".into()),
                    secondary_key: Some("s".into()),
                }),
                x509_thumbprint: Some(X509Thumbprint::default()),
                auth_type: AuthenticationType::Sas,
            }),
            capabilities: Some(DeviceCapabilities { iot_edge: true }),
            device_scope: None,
            parent_scopes: None,
        };
        let text = to_string(&device);
        assert_eq!(
            text,
            r#"{"deviceId":"d1","generationId":"637000000000000000","etag":"MA==","connectionState":"Connected","status":"disabled","statusReason":"why","connectionStateUpdatedTime":"t1","statusUpdatedTime":"t2","lastActivityTime":"t3","cloudToDeviceMessageCount":0,"authentication":{"symmetricKey":{"primaryKey":"p","secondaryKey":"s"},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},"capabilities":{"iotEdge":true}}"#
        );
        assert_eq!(from_str::<Device>(&text), device);
    }

    #[test]
    fn python_sdk_create_device_bodies_deserialize() {
        let sas: Device = from_str(
            r#"{"deviceId":"d1","status":"enabled","authentication":{"symmetricKey":{"primaryKey":"a","secondaryKey":"b"},"type":"sas"},"capabilities":{"iotEdge":false}}"#,
        );
        let auth = sas.authentication.clone().unwrap_or_default();
        assert_eq!(auth.auth_type, AuthenticationType::Sas);
        assert_eq!(
            auth.symmetric_key.and_then(|k| k.secondary_key).as_deref(),
            Some("b")
        );

        let x509: Device = from_str(
            r#"{"deviceId":"d2","status":"disabled","authentication":{"x509Thumbprint":{"primaryThumbprint":"AB","secondaryThumbprint":"CD"},"type":"selfSigned"}}"#,
        );
        assert_eq!(x509.status, DeviceStatus::Disabled);
        let auth = x509.authentication.unwrap_or_default();
        assert_eq!(auth.auth_type, AuthenticationType::SelfSigned);
        assert_eq!(
            auth.x509_thumbprint
                .and_then(|t| t.primary_thumbprint)
                .as_deref(),
            Some("AB")
        );

        let ca: Device =
            from_str(r#"{"deviceId":"d3","authentication":{"type":"certificateAuthority"}}"#);
        assert_eq!(
            ca.status,
            DeviceStatus::Enabled,
            "status defaults to enabled"
        );
        assert_eq!(
            ca.authentication.map(|a| a.auth_type),
            Some(AuthenticationType::CertificateAuthority)
        );
        let none: AuthenticationMechanism = from_str(r#"{"type":"none"}"#);
        assert_eq!(none.auth_type, AuthenticationType::None);
    }

    #[test]
    fn bad_enum_values_are_rejected() {
        assert!(serde_json::from_str::<Device>(r#"{"deviceId":"d","status":"Enabled"}"#).is_err());
        assert!(serde_json::from_str::<AuthenticationMechanism>(r#"{"type":"x509"}"#).is_err());
    }

    #[test]
    fn module_round_trip() {
        let module = Module {
            module_id: "m".into(),
            managed_by: Some("IotEdge".into()),
            device_id: "d".into(),
            authentication: Some(AuthenticationMechanism::default()),
            ..Module::default()
        };
        let text = to_string(&module);
        assert_eq!(
            text,
            r#"{"moduleId":"m","managedBy":"IotEdge","deviceId":"d","authentication":{"type":"sas"}}"#
        );
        assert_eq!(from_str::<Module>(&text), module);
    }

    #[test]
    fn method_request_shapes() {
        let minimal: CloudToDeviceMethod = from_str(r#"{"methodName":"reboot","payload":""}"#);
        assert_eq!(minimal.payload, Some(json!("")));
        assert_eq!(minimal.response_timeout_in_seconds, None);
        assert_eq!(
            to_string(&minimal),
            r#"{"methodName":"reboot","payload":""}"#
        );

        let full: CloudToDeviceMethod = from_str(
            r#"{"methodName":"m","payload":{"a":[1,2]},"responseTimeoutInSeconds":-5,"connectTimeoutInSeconds":0}"#,
        );
        assert_eq!(full.response_timeout_in_seconds, Some(-5));
        assert_eq!(full.connect_timeout_in_seconds, Some(0));
        assert_eq!(
            to_string(&full),
            r#"{"methodName":"m","payload":{"a":[1,2]},"responseTimeoutInSeconds":-5,"connectTimeoutInSeconds":0}"#
        );

        let no_payload: CloudToDeviceMethod = from_str(r#"{"methodName":"m"}"#);
        assert_eq!(no_payload.payload, None);
        assert!(serde_json::from_str::<CloudToDeviceMethod>(r#"{"payload":1}"#).is_err());
        assert!(
            serde_json::from_str::<CloudToDeviceMethod>(
                r#"{"methodName":"m","responseTimeoutInSeconds":"30"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn method_result_shapes() {
        let result = CloudToDeviceMethodResult {
            status: 404,
            payload: json!({"err": "nope"}),
        };
        assert_eq!(
            to_string(&result),
            r#"{"status":404,"payload":{"err":"nope"}}"#
        );
        let no_payload: CloudToDeviceMethodResult = from_str(r#"{"status":200}"#);
        assert_eq!(no_payload.payload, Value::Null);
        assert_eq!(to_string(&no_payload), r#"{"status":200,"payload":null}"#);
    }

    #[test]
    fn import_modes_use_hub_spelling() {
        let all = [
            (ImportMode::Create, "create"),
            (ImportMode::Update, "update"),
            (ImportMode::UpdateIfMatchETag, "updateIfMatchETag"),
            (ImportMode::Delete, "delete"),
            (ImportMode::DeleteIfMatchETag, "deleteIfMatchETag"),
            (ImportMode::UpdateTwin, "updateTwin"),
            (ImportMode::UpdateTwinIfMatchETag, "updateTwinIfMatchETag"),
            (ImportMode::CreateOrUpdate, "createOrUpdate"),
            (
                ImportMode::CreateOrUpdateIfMatchETag,
                "createOrUpdateIfMatchETag",
            ),
        ];
        for (mode, text) in all {
            assert_eq!(to_string(&mode), format!("\"{text}\""));
            assert_eq!(from_str::<ImportMode>(&format!("\"{text}\"")), mode);
        }
    }

    #[test]
    fn export_import_device_uses_exact_etag_casing() {
        let body = r#"[{"id":"d1","importMode":"updateIfMatchETag","status":"enabled","authentication":{"symmetricKey":{"primaryKey":"p","secondaryKey":"s"},"type":"sas"},"eTag":"\"AAA\"","twinETag":"BBB","tags":{"t":1},"properties":{"desired":{"a":1},"reported":{}},"moduleId":"m","capabilities":{"iotEdge":false},"deviceScope":"scope","parentScopes":["p1"]}]"#;
        let devices: Vec<ExportImportDevice> = from_str(body);
        let d = &devices[0];
        assert_eq!(d.import_mode, ImportMode::UpdateIfMatchETag);
        assert_eq!(d.e_tag.as_deref(), Some("\"AAA\""));
        assert_eq!(d.twin_e_tag.as_deref(), Some("BBB"));
        assert_eq!(d.parent_scopes.as_deref(), Some(&["p1".to_owned()][..]));
        let text = to_string(d);
        assert!(text.starts_with(r#"{"id":"d1","moduleId":"m","eTag":"\"AAA\"","importMode":"updateIfMatchETag","status":"enabled""#), "{text}");
        assert!(text.contains(r#""twinETag":"BBB""#));
        assert_eq!(&from_str::<ExportImportDevice>(&text), d);
        let bare: ExportImportDevice = from_str(r#"{"id":"x"}"#);
        assert_eq!(bare.import_mode, ImportMode::CreateOrUpdate);
    }

    #[test]
    fn bulk_result_shape() {
        let result = BulkRegistryOperationResult {
            is_successful: false,
            errors: vec![DeviceRegistryOperationError::new(
                "d1",
                crate::error::ErrorCode::DeviceNotFound,
                "Device d1 not found",
            )],
            warnings: vec![DeviceRegistryOperationWarning {
                device_id: "d2".into(),
                warning_code: "DeviceRegisteredWithoutTwin".into(),
                warning_status: "ok".into(),
            }],
        };
        let text = to_string(&result);
        assert_eq!(
            text,
            r#"{"isSuccessful":false,"errors":[{"deviceId":"d1","errorCode":"DeviceNotFound","errorStatus":"Device d1 not found"}],"warnings":[{"deviceId":"d2","warningCode":"DeviceRegisteredWithoutTwin","warningStatus":"ok"}]}"#
        );
        assert_eq!(from_str::<BulkRegistryOperationResult>(&text), result);
        let lenient: BulkRegistryOperationResult = from_str(r#"{"isSuccessful":true}"#);
        assert!(lenient.is_successful && lenient.errors.is_empty());
    }

    #[test]
    fn statistics_and_query_shapes() {
        let stats = RegistryStatistics {
            total_device_count: 3,
            enabled_device_count: 2,
            disabled_device_count: 1,
        };
        assert_eq!(
            to_string(&stats),
            r#"{"totalDeviceCount":3,"enabledDeviceCount":2,"disabledDeviceCount":1}"#
        );
        assert_eq!(
            to_string(&ServiceStatistics {
                connected_device_count: 7
            }),
            r#"{"connectedDeviceCount":7}"#
        );
        let q: QuerySpecification = from_str(r#"{"query":"SELECT * FROM devices"}"#);
        assert_eq!(q.query, "SELECT * FROM devices");
        assert!(serde_json::from_str::<QuerySpecification>("{}").is_err());
        let purge = PurgeMessageQueueResult {
            total_messages_purged: 2,
            device_id: "d".into(),
            module_id: None,
        };
        assert_eq!(
            to_string(&purge),
            r#"{"totalMessagesPurged":2,"deviceId":"d"}"#
        );
    }

    #[test]
    fn device_side_twin_document() {
        let doc: TwinProperties =
            from_str(r#"{"desired":{"a":1,"$version":4},"reported":{"$version":2}}"#);
        assert_eq!(doc.desired.get("$version"), Some(&json!(4)));
        // Key order is preserved (serde_json preserve_order).
        assert_eq!(
            to_string(&doc),
            r#"{"desired":{"a":1,"$version":4},"reported":{"$version":2}}"#
        );
    }
}

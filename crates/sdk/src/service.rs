//! The service client: IoT Hub's REST API for back ends (registry, twins, direct methods,
//! statistics), signing every request with a fresh SAS token from the connection string's
//! shared access policy.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use twinhub_proto::connection_string::{ConnectionString, ConnectionStringKind};
use twinhub_proto::error::{ERROR_CODE_HEADER, ErrorBody, ErrorCode};
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, BulkRegistryOperationResult, CloudToDeviceMethod,
    CloudToDeviceMethodResult, Device, DeviceCapabilities, DeviceStatus, ExportImportDevice,
    RegistryStatistics, ServiceStatistics, SymmetricKey, Twin,
};
use twinhub_proto::sas::generate_sas_token;

use crate::error::{Error, Result};

/// The REST api-version the official SDKs send.
pub const API_VERSION: &str = "2021-04-12";

/// Path segments are encoded like the official SDKs do (`quote(s, safe='')`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What to create a device with; defaults to an enabled SAS device with hub-generated keys.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub status: Option<DeviceStatus>,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub iot_edge: bool,
}

/// Builds a [`ServiceClient`].
#[derive(Debug, Clone)]
pub struct ServiceClientBuilder {
    connection_string: String,
    extra_ca: Vec<Vec<u8>>,
    timeout: Duration,
    token_ttl: Duration,
}

impl ServiceClientBuilder {
    /// Trusts this CA (PEM) in addition to the system roots, e.g. twinhub's dev CA.
    pub fn extra_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca.push(pem.into());
        self
    }

    /// Overall timeout per request (default 100 s, as the official SDK; a method call waits
    /// for the device inside it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Lifetime of the SAS token signed for each request (default one hour).
    pub fn token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl;
        self
    }

    pub fn build(self) -> Result<ServiceClient> {
        let cs: ConnectionString = self.connection_string.parse().map_err(
            |e: twinhub_proto::connection_string::ConnectionStringError| {
                Error::ConnectionString(e.to_string())
            },
        )?;
        if cs.kind() != ConnectionStringKind::Service {
            return Err(Error::ConnectionString(
                "a service connection string (HostName, SharedAccessKeyName, SharedAccessKey) is needed".into(),
            ));
        }
        let (Some(policy), Some(key)) = (
            cs.shared_access_key_name.clone(),
            cs.shared_access_key.clone(),
        ) else {
            return Err(Error::ConnectionString(
                "SharedAccessKeyName and SharedAccessKey are required".into(),
            ));
        };
        // reqwest is built without a bundled crypto provider: use ring, once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut certs = Vec::new();
        for pem in &self.extra_ca {
            let found = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Setup(format!("the extra CA is not valid PEM: {e}")))?;
            certs.extend(found);
        }
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .tls_certs_merge(certs)
            .build()
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(ServiceClient {
            http,
            base: format!("https://{}", cs.host_name),
            host: cs.host_name,
            policy,
            key,
            token_ttl: self.token_ttl,
        })
    }
}

/// A client for IoT Hub's service REST API.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    base: String,
    host: String,
    policy: String,
    key: String,
    token_ttl: Duration,
}

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

impl ServiceClient {
    /// Starts building a client from a service connection string
    /// (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`).
    pub fn builder(connection_string: &str) -> ServiceClientBuilder {
        ServiceClientBuilder {
            connection_string: connection_string.to_string(),
            extra_ca: Vec::new(),
            timeout: Duration::from_secs(100),
            token_ttl: Duration::from_secs(3600),
        }
    }

    /// A client trusting only the system roots.
    pub fn from_connection_string(connection_string: &str) -> Result<Self> {
        Self::builder(connection_string).build()
    }

    /// The hub's host name (with `:port` when not 443), as in the connection string.
    pub fn host_name(&self) -> &str {
        &self.host
    }

    fn token(&self) -> Result<String> {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.token_ttl)
            .as_secs();
        generate_sas_token(&self.host, &self.key, Some(&self.policy), expiry)
            .map_err(|e| Error::ConnectionString(format!("cannot sign with the key: {e}")))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response> {
        let resp = self.send_any(method, path, query, headers, body).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(hub_error(resp).await)
    }

    /// Sends a request and returns the response whatever its status.
    async fn send_any(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .query(&[("api-version", API_VERSION)])
            .query(query)
            .header("Authorization", self.token()?)
            .header("Accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req = match body {
            Some(b) => req
                .header("Content-Type", "application/json; charset=utf-8")
                .body(b),
            None => req.header("Content-Length", "0"),
        };
        req.send().await.map_err(|e| {
            if e.is_timeout() {
                Error::TimedOut
            } else {
                Error::Unreachable(error_chain(&e))
            }
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
        expect: StatusCode,
    ) -> Result<T> {
        let resp = self.send(method, path, query, headers, body).await?;
        if resp.status() != expect {
            return Err(Error::Protocol(format!(
                "expected {expect}, got {}",
                resp.status()
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Unreachable(error_chain(&e)))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(format!("unreadable body: {e}")))
    }

    fn json<T: Serialize>(value: &T) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(value).unwrap_or_default())
    }

    fn if_match(etag: Option<&str>) -> Vec<(&'static str, String)> {
        let tag = etag.unwrap_or("*");
        let quoted = if tag.starts_with('"') {
            tag.to_string()
        } else {
            format!("\"{tag}\"")
        };
        vec![("If-Match", quoted)]
    }

    /// Registers a device.
    pub async fn create_device(&self, device_id: &str, new: NewDevice) -> Result<Device> {
        let device = Device {
            device_id: device_id.to_string(),
            status: new.status.unwrap_or(DeviceStatus::Enabled),
            authentication: Some(AuthenticationMechanism {
                symmetric_key: Some(SymmetricKey {
                    primary_key: new.primary_key,
                    secondary_key: new.secondary_key,
                }),
                x509_thumbprint: None,
                auth_type: AuthenticationType::Sas,
            }),
            capabilities: Some(DeviceCapabilities {
                iot_edge: new.iot_edge,
            }),
            ..Default::default()
        };
        let path = format!("/devices/{}", segment(device_id));
        self.call(
            Method::PUT,
            &path,
            &[],
            &[],
            Self::json(&device),
            StatusCode::OK,
        )
        .await
    }

    /// Updates a device's identity (status, credentials, capabilities). `etag` `None`
    /// updates unconditionally.
    pub async fn update_device(&self, device: &Device, etag: Option<&str>) -> Result<Device> {
        let path = format!("/devices/{}", segment(&device.device_id));
        self.call(
            Method::PUT,
            &path,
            &[],
            &Self::if_match(etag),
            Self::json(device),
            StatusCode::OK,
        )
        .await
    }

    pub async fn get_device(&self, device_id: &str) -> Result<Device> {
        let path = format!("/devices/{}", segment(device_id));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Lists up to `top` devices (the hub's cap is 1000).
    pub async fn list_devices(&self, top: Option<usize>) -> Result<Vec<Device>> {
        let query: Vec<(&str, String)> = top.map(|t| ("top", t.to_string())).into_iter().collect();
        self.call(Method::GET, "/devices", &query, &[], None, StatusCode::OK)
            .await
    }

    /// Deletes a device. `etag` `None` deletes unconditionally.
    pub async fn delete_device(&self, device_id: &str, etag: Option<&str>) -> Result<()> {
        let path = format!("/devices/{}", segment(device_id));
        let resp = self
            .send(Method::DELETE, &path, &[], &Self::if_match(etag), None)
            .await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(Error::Protocol(format!(
                "expected 204, got {}",
                resp.status()
            )));
        }
        Ok(())
    }

    /// Creates, updates or deletes up to 100 devices in one call. A partly failed batch is
    /// not an error: its result lists the failures.
    pub async fn bulk(&self, ops: &[ExportImportDevice]) -> Result<BulkRegistryOperationResult> {
        let resp = self
            .send_any(Method::POST, "/devices", &[], &[], Self::json(&ops))
            .await?;
        // IoT Hub answers 400 with the same result shape when some operations failed; any
        // other refusal carries the usual error body.
        if resp.status() != StatusCode::OK && resp.status() != StatusCode::BAD_REQUEST {
            return Err(hub_error(resp).await);
        }
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| Error::Unreachable(error_chain(&e)))?;
        match serde_json::from_str::<BulkRegistryOperationResult>(&text) {
            Ok(r) if text.contains("isSuccessful") => Ok(r),
            _ => Err(Error::Hub {
                status,
                code: serde_json::from_str::<ErrorBody>(&text)
                    .ok()
                    .and_then(|b| b.parse_code()),
                message: text,
            }),
        }
    }

    pub async fn get_twin(&self, device_id: &str) -> Result<Twin> {
        let path = format!("/twins/{}", segment(device_id));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Merges `patch` (`{"tags": .., "properties": {"desired": ..}}`; `null` deletes) into
    /// the twin.
    pub async fn update_twin(
        &self,
        device_id: &str,
        patch: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        let path = format!("/twins/{}", segment(device_id));
        self.call(
            Method::PATCH,
            &path,
            &[],
            &Self::if_match(etag),
            Self::json(patch),
            StatusCode::OK,
        )
        .await
    }

    /// Replaces the twin's tags and desired properties.
    pub async fn replace_twin(
        &self,
        device_id: &str,
        twin: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        let path = format!("/twins/{}", segment(device_id));
        self.call(
            Method::PUT,
            &path,
            &[],
            &Self::if_match(etag),
            Self::json(twin),
            StatusCode::OK,
        )
        .await
    }

    /// Invokes a direct method and returns the device's status and payload.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        method: &CloudToDeviceMethod,
    ) -> Result<CloudToDeviceMethodResult> {
        let path = format!("/twins/{}/methods", segment(device_id));
        self.call(
            Method::POST,
            &path,
            &[],
            &[],
            Self::json(method),
            StatusCode::OK,
        )
        .await
    }

    pub async fn registry_statistics(&self) -> Result<RegistryStatistics> {
        self.call(
            Method::GET,
            "/statistics/devices",
            &[],
            &[],
            None,
            StatusCode::OK,
        )
        .await
    }

    pub async fn service_statistics(&self) -> Result<ServiceStatistics> {
        self.call(
            Method::GET,
            "/statistics/service",
            &[],
            &[],
            None,
            StatusCode::OK,
        )
        .await
    }
}

/// Turns an error response into [`Error::Hub`], reading the code from the
/// `iothub-errorcode` header or the body.
async fn hub_error(resp: reqwest::Response) -> Error {
    let status = resp.status().as_u16();
    let header_code = resp
        .headers()
        .get(ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_name);
    let text = resp.text().await.unwrap_or_default();
    let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
    let code = header_code.or_else(|| body.as_ref().and_then(|b| b.parse_code()));
    let message = match &body {
        Some(b) => b.message.clone(),
        None => text,
    };
    Error::Hub {
        status,
        code,
        message,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

//! The module client: a module identity (`deviceId/moduleId`, IoT Edge style) on the same
//! connection code as the device client. The identity flows into the MQTT client id, the
//! user name, the SAS resource and the telemetry topic (all in `settings`); methods, twins and
//! desired patches use the device topics, as IoT Hub's do; output messages are telemetry with
//! `$.on`. Cloud-to-device messages are for devices only, so a module client has no
//! `c2d_messages`.

use std::future::Future;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;
use twinhub_proto::connection_string::{ConnectionString, ConnectionStringKind};

use super::{
    BuiltClient, ClientBuilder, ConnectionState, DesiredPatches, DeviceClient, DeviceTwin,
    MethodRequest, MethodRequests, MethodResponse,
};
use crate::error::{Error, Result};

/// The property-bag key of an output name.
const OUTPUT_NAME: &str = "$.on";

/// Builds a [`ModuleClient`]; start with [`ModuleClient::builder`]. It has every option of
/// [`DeviceClientBuilder`](super::DeviceClientBuilder).
pub type ModuleClientBuilder = ClientBuilder<ModuleClient>;

/// A module identity's connection to IoT Hub or twinhub.
///
/// It behaves as [`DeviceClient`] does (one background task, reconnects, token renewal,
/// at-least-once telemetry) and signs in as `{deviceId}/{moduleId}` with the module's own
/// key or certificate. The device and each of its modules may be connected at the same
/// time: each has its own session, twin and direct methods.
///
/// ```no_run
/// # async fn demo() -> Result<(), twinhub_sdk::Error> {
/// use serde_json::json;
/// use twinhub_sdk::{MethodResponse, ModuleClient};
///
/// let module = ModuleClient::builder(
///     "HostName=localhost;DeviceId=gateway-1;ModuleId=filter;SharedAccessKey=...",
/// )
/// .extra_ca_pem(std::fs::read("twinhub-data/tls/ca.pem").unwrap_or_default())
/// .build()?;
/// module.set_method_handler(|request| async move {
///     MethodResponse::new(200, json!({"module": "filter", "method": request.name}))
/// });
/// module.connect().await?;
/// module.patch_reported(&json!({"threshold": 30})).await?;
/// module.send_event(r#"{"filtered": 3}"#, &[]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ModuleClient {
    client: DeviceClient,
}

impl BuiltClient for ModuleClient {}

impl super::sealed::Sealed for ModuleClient {
    const KIND: ConnectionStringKind = ConnectionStringKind::Module;
    fn wrap(client: DeviceClient) -> Self {
        ModuleClient { client }
    }
}

impl ModuleClient {
    /// Starts building a client from a module connection string
    /// (`HostName=..;DeviceId=..;ModuleId=..;SharedAccessKey=..[;GatewayHostName=..]`, or
    /// `x509=true` in place of the key with
    /// [`x509_certificate`](ClientBuilder::x509_certificate)).
    pub fn builder(connection_string: &str) -> ModuleClientBuilder {
        ClientBuilder::new(connection_string.to_string())
    }

    /// Starts building a client that signs in as module `module_id` of `device_id` with an
    /// X.509 certificate (`chain_pem`, leaf first) and its private key (`key_pem`).
    pub fn x509_builder(
        host_name: &str,
        device_id: &str,
        module_id: &str,
        chain_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> ModuleClientBuilder {
        let cs = ConnectionString {
            host_name: host_name.to_owned(),
            device_id: Some(device_id.to_owned()),
            module_id: Some(module_id.to_owned()),
            x509: true,
            ..ConnectionString::default()
        };
        ClientBuilder::new(cs.to_string()).x509_certificate(chain_pem, key_pem)
    }

    /// The id of the device the module belongs to.
    pub fn device_id(&self) -> &str {
        self.client.device_id()
    }

    /// The module id from the connection string.
    pub fn module_id(&self) -> &str {
        self.client
            .inner
            .settings
            .module_id
            .as_deref()
            .unwrap_or_default()
    }

    /// Connects once; see [`DeviceClient::connect`].
    pub async fn connect(&self) -> Result<()> {
        self.client.connect().await
    }

    /// Watches the connection; see [`DeviceClient::connection_state`].
    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.client.connection_state()
    }

    /// Answers the module's direct methods with `handler`; see
    /// [`DeviceClient::set_method_handler`].
    pub fn set_method_handler<F, Fut>(&self, handler: F)
    where
        F: Fn(MethodRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = MethodResponse> + Send + 'static,
    {
        self.client.set_method_handler(handler);
    }

    /// The module's direct-method calls as a stream; see [`DeviceClient::method_requests`].
    pub fn method_requests(&self) -> MethodRequests {
        self.client.method_requests()
    }

    /// Changes to the module twin's desired properties; see
    /// [`DeviceClient::desired_patches`].
    pub fn desired_patches(&self) -> DesiredPatches {
        self.client.desired_patches()
    }

    /// Reads the module twin's desired and reported properties.
    pub async fn get_twin(&self) -> Result<DeviceTwin> {
        self.client.get_twin().await
    }

    /// Merges `patch` into the module twin's reported properties and returns the new
    /// reported `$version`; see [`DeviceClient::patch_reported`].
    pub async fn patch_reported(&self, patch: &Value) -> Result<u64> {
        self.client.patch_reported(patch).await
    }

    /// Sends a message from the module (`devices/{d}/modules/{m}/messages/events/`); the hub
    /// stamps it with the module id. See [`DeviceClient::send_event`].
    pub async fn send_event(
        &self,
        payload: impl Into<Bytes>,
        properties: &[(String, String)],
    ) -> Result<()> {
        self.client.send_event(payload, properties).await
    }

    /// Sends a message to the module's output `output` (IoT Edge's
    /// `send_message_to_output`): the same telemetry topic with `$.on` set, which the hub
    /// hands on as `iothub-outputname`. Any `$.on` in `properties` is replaced.
    pub async fn send_output_event(
        &self,
        output: &str,
        payload: impl Into<Bytes>,
        properties: &[(String, String)],
    ) -> Result<()> {
        if output.is_empty() {
            return Err(Error::InvalidArgument("the output name is empty".into()));
        }
        let mut properties: Vec<(String, String)> = properties
            .iter()
            .filter(|(k, _)| k != OUTPUT_NAME)
            .cloned()
            .collect();
        properties.push((OUTPUT_NAME.to_owned(), output.to_owned()));
        self.client.send_event(payload, &properties).await
    }

    /// Sends what is queued, says DISCONNECT, and ends the background task.
    pub async fn close(&self) {
        self.client.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";

    #[test]
    fn a_module_client_needs_a_module_connection_string() {
        let module = format!("HostName=h;DeviceId=d1;ModuleId=m1;SharedAccessKey={KEY}");
        let client = ModuleClient::builder(&module).build().unwrap();
        assert_eq!((client.device_id(), client.module_id()), ("d1", "m1"));
        assert_eq!(client.client.inner.settings.client_id(), "d1/m1");

        let device = format!("HostName=h;DeviceId=d1;SharedAccessKey={KEY}");
        assert!(matches!(
            ModuleClient::builder(&device).build(),
            Err(Error::ConnectionString(_))
        ));
        assert!(matches!(
            DeviceClient::builder(&module).build(),
            Err(Error::ConnectionString(_))
        ));
    }

    #[test]
    fn x509_needs_a_certificate_and_no_key() {
        let x509 = "HostName=h;DeviceId=d1;ModuleId=m1;x509=true";
        assert!(matches!(
            ModuleClient::builder(x509).build(),
            Err(Error::ConnectionString(_))
        ));
        let with_key = format!("HostName=h;DeviceId=d1;ModuleId=m1;SharedAccessKey={KEY}");
        assert!(matches!(
            ModuleClient::builder(&with_key)
                .x509_certificate("cert", "key")
                .build(),
            Err(Error::InvalidArgument(_))
        ));
        // A certificate that is not PEM fails at build, not at the first connect.
        assert!(matches!(
            ModuleClient::x509_builder("h", "d1", "m1", "cert", "key").build(),
            Err(Error::Setup(_))
        ));
    }
}

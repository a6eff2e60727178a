//! Rust clients for Azure IoT Hub and twinhub.
//!
//! [`ServiceClient`] is the back-end face: the identity registry, twins, direct methods and
//! statistics over HTTPS, authenticated with a shared access policy's connection string. It
//! speaks IoT Hub's REST protocol (api-version 2021-04-12), so the same code runs against
//! twinhub and against Azure IoT Hub.
//!
//! ```no_run
//! # async fn demo() -> Result<(), twinhub_sdk::Error> {
//! use twinhub_sdk::ServiceClient;
//! let service = ServiceClient::builder("HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=...")
//!     .extra_ca_pem(std::fs::read("twinhub-data/tls/ca.pem").unwrap_or_default())
//!     .build()?;
//! let device = service.create_device("thermostat-1", Default::default()).await?;
//! println!("{} has key {:?}", device.device_id,
//!     device.authentication.and_then(|a| a.symmetric_key).and_then(|k| k.primary_key));
//! # Ok(()) }
//! ```
//!
//! # Cloud-to-device messages
//!
//! [`ServiceClient::send_c2d`] sends a [`C2dMessage`] over AMQP (TLS on 5671, as the official
//! service SDKs do) and returns once the hub queued it; [`ServiceClient::feedback`] reads the
//! delivery feedback the hub batches for messages sent with an [`Ack`].
//!
//! ```no_run
//! # async fn demo(service: twinhub_sdk::ServiceClient) -> Result<(), twinhub_sdk::Error> {
//! use twinhub_sdk::{Ack, C2dMessage};
//! let id = service
//!     .send_c2d("thermostat-1", C2dMessage::new("reboot").ack(Ack::Full))
//!     .await?;
//! let mut feedback = service.feedback().await?;
//! if let Some(batch) = feedback.next().await? {
//!     for record in &batch.records {
//!         println!("{}: {:?}", record.original_message_id, record.status_code);
//!     }
//!     feedback.complete(&batch).await?;
//! }
//! # let _ = id; Ok(()) }
//! ```
//!
//! # Devices
//!
//! [`DeviceClient`] is the device face: IoT Hub's MQTT 3.1.1 protocol over TLS (port 8883) or
//! over WebSockets (port 443), authenticated with a device connection string. It answers
//! direct methods, reads the twin, patches reported properties, receives desired-property
//! changes and sends telemetry. One background task owns the connection: it reconnects with
//! backoff after a drop, renews the SAS token before it expires, and re-subscribes when the
//! hub lost the session. It works against twinhub and Azure IoT Hub alike.
//!
//! ```no_run
//! # async fn demo() -> Result<(), twinhub_sdk::Error> {
//! use std::time::Duration;
//! use serde_json::json;
//! use twinhub_sdk::{DeviceClient, MethodResponse, Transport};
//!
//! let device = DeviceClient::builder("HostName=localhost;DeviceId=thermostat-1;SharedAccessKey=...")
//!     .extra_ca_pem(std::fs::read("twinhub-data/tls/ca.pem").unwrap_or_default())
//!     .transport(Transport::Mqtt)
//!     .sas_token_ttl(Duration::from_secs(3600))
//!     .build()?;
//! device.set_method_handler(|request| async move {
//!     match request.name.as_str() {
//!         "reboot" => MethodResponse::new(200, json!({"rebooting": true})),
//!         _ => MethodResponse::new(404, json!({"unknown": request.name})),
//!     }
//! });
//! let mut desired = device.desired_patches();
//! device.connect().await?;
//!
//! let twin = device.get_twin().await?;
//! println!("desired v{}: {:?}", twin.desired_version, twin.desired);
//! let version = device.patch_reported(&json!({"firmware": "1.2.0"})).await?;
//! println!("reported is now at v{version}");
//! device
//!     .send_event(r#"{"temperature": 21.5}"#, &[("$.ct".into(), "application/json".into())])
//!     .await?;
//! while let Some(patch) = desired.recv().await {
//!     println!("desired v{} (full: {}): {:?}", patch.version, patch.full, patch.patch);
//! }
//! device.close().await;
//! # Ok(()) }
//! ```
//!
//! # Modules and certificates
//!
//! [`ModuleClient`] is the same client for a module identity (`HostName=..;DeviceId=..;
//! ModuleId=..;SharedAccessKey=..`): methods, the module twin, desired patches and telemetry
//! stamped with the module id; no cloud-to-device messages. The service side manages modules
//! with [`ServiceClient::create_module`] and its siblings in [`modules`]. Either client signs in
//! with an X.509 certificate instead of a key through
//! [`ClientBuilder::x509_certificate`] (or [`DeviceClient::x509_builder`] and
//! [`ModuleClient::x509_builder`]).

mod amqp;
pub mod c2d;
pub mod certificates;
pub mod device;
mod error;
pub mod events;
pub mod modules;
pub mod routing;
pub mod service;

pub use c2d::{Ack, C2dMessage, FeedbackBatch, FeedbackReceiver, FeedbackRecord, FeedbackStatus};
pub use device::{
    ClientBuilder, CloudToDeviceMessage, CloudToDeviceMessages, ConnectionState, DesiredPatch,
    DesiredPatches, DeviceClient, DeviceClientBuilder, DeviceTwin, MethodRequest, MethodRequests,
    MethodResponse, ModuleClient, ModuleClientBuilder, Transport,
};
pub use error::{Error, Result};
pub use events::{Event, EventStream, EventsClient, EventsClientBuilder, StartPosition};
pub use modules::NewModule;
pub use service::{
    METHOD_JOB, NewDevice, QueryPage, QueryPages, ServiceClient, ServiceClientBuilder, TWIN_JOB,
};
pub use twinhub_proto as proto;

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
//!     device.authentication.symmetric_key.and_then(|k| k.primary_key));
//! # Ok(()) }
//! ```

mod error;
pub mod service;

pub use error::{Error, Result};
pub use service::{NewDevice, ServiceClient, ServiceClientBuilder};
pub use twinhub_proto as proto;

//! twinhub-proto: IoT Hub's wire types, shared by the hub core, the REST server, the Rust SDK
//! and the CLI. No I/O, no async, no randomness: callers pass keys, ids and times in.
//!
//! * [`error`]: error codes and the REST error body.
//! * [`sas`]: SAS token parsing, verification and signing.
//! * [`connection_string`]: connection string parsing and printing.
//! * [`model`]: REST JSON documents (devices, twins, methods, bulk import, statistics).
//! * [`time`]: IoT Hub's timestamp spelling.
//! * [`topic`]: the device-facing MQTT topic grammar and property bags.
//! * [`message`]: a device-to-cloud message, its property bag and its stored form.
//! * [`c2d`]: a cloud-to-device message, its queue form and MQTT bag, delivery feedback.
//! * [`certificate`]: the CA certificates of `certificateAuthority` devices.
//! * [`ids`]: device id, module id and method name rules.
//! * [`encoding`]: the percent-encoding IoT Hub's SDKs use in paths, topics and tokens.

pub mod c2d;
pub mod certificate;
pub mod connection_string;
pub mod encoding;
pub mod error;
pub mod ids;
pub mod message;
pub mod model;
pub mod sas;
pub mod time;
pub mod topic;

pub use connection_string::{ConnectionString, ConnectionStringError, ConnectionStringKind};
pub use error::{ERROR_CODE_HEADER, ErrorBody, ErrorCode};
pub use ids::{IdError, validate_device_id, validate_method_name, validate_module_id};
pub use sas::{SasError, SasToken, generate_sas_token};
pub use topic::{Delivery, Inbound, Subscription, TopicError};

/// The api-version twinhub speaks and the official SDKs send, on REST query strings and in the
/// MQTT user name (see [`topic::mqtt_username`]).
pub const API_VERSION: &str = "2021-04-12";

/// Any error this crate reports, for callers that want one type. Each module also exposes its
/// own error enum with the specific variants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sas(#[from] SasError),
    #[error(transparent)]
    ConnectionString(#[from] ConnectionStringError),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Id(#[from] IdError),
}

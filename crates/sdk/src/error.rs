//! The SDK's error type: tells an IoT Hub refusal (with its status and error code) from a
//! transport failure, a bad connection string, refused credentials, a closed client, or an
//! answer the SDK could not read. Shared by the service and the device client.

use twinhub_proto::error::ErrorCode;

/// Everything a service or device client call can fail with.
///
/// `Clone` so the device client can hand the same failure to every waiting operation and to
/// its [`ConnectionState`](crate::device::ConnectionState) watchers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The connection string could not be used.
    #[error("invalid connection string: {0}")]
    ConnectionString(String),
    /// The hub answered with an error status.
    #[error("the hub answered {status}{}: {message}", code.map(|c| format!(" ({} {})", c.code(), c.name())).unwrap_or_default())]
    Hub {
        /// The HTTP status, or the status of an MQTT twin answer.
        status: u16,
        /// The IoT Hub error code, when the hub named one.
        code: Option<ErrorCode>,
        /// The hub's message, or its whole answer when it was not an error body.
        message: String,
    },
    /// The hub could not be reached, or the connection failed.
    #[error("the hub is unreachable: {0}")]
    Unreachable(String),
    /// The request took longer than the client's timeout.
    #[error("the request timed out")]
    TimedOut,
    /// The hub's answer was not what the protocol promises.
    #[error("unexpected answer from the hub: {0}")]
    Protocol(String),
    /// The client could not be set up (TLS roots and the like).
    #[error("client setup failed: {0}")]
    Setup(String),
    /// The hub refused the device's credentials (MQTT CONNACK 4 or 5): the key is wrong, the
    /// device is disabled or unknown. Retrying with the same credentials cannot help.
    #[error("the hub refused the credentials: {0}")]
    NotAuthorized(String),
    /// An argument was refused before anything was sent (e.g. a message over the size limit).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The client was closed, or its connection task has ended.
    #[error("the client is closed")]
    Closed,
}

impl Error {
    /// The HTTP status of a hub refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Hub { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The IoT Hub error code of a hub refusal, when the hub named one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Hub { code, .. } => *code,
            _ => None,
        }
    }
}

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The SDK's error type: tells an IoT Hub refusal (with its status and error code) from a
//! transport failure, a bad connection string, or an answer the SDK could not read.

use twinhub_proto::error::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection string could not be used.
    #[error("invalid connection string: {0}")]
    ConnectionString(String),
    /// The hub answered with an error status.
    #[error("the hub answered {status}{}: {message}", code.map(|c| format!(" ({} {})", c.code(), c.name())).unwrap_or_default())]
    Hub {
        status: u16,
        code: Option<ErrorCode>,
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

pub type Result<T, E = Error> = std::result::Result<T, E>;

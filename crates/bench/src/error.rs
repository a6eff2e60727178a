//! The crate's one error type: what can go wrong while setting up targets or driving load.
//! Scenario code counts per-request failures in its figures instead of returning them.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("MQTT: {0}")]
    Mqtt(#[from] twinhub_mqtt::Error),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("the connection was closed by the peer")]
    Closed,
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("the hub refused a request: {0}")]
    Sdk(#[from] twinhub_sdk::Error),
    #[error("starting the hub failed: {0}")]
    Server(#[from] twinhub_server::ServerError),
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn timeout(what: impl Into<String>, after: Duration) -> Error {
        Error::Timeout {
            what: what.into(),
            after,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

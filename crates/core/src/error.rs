//! The core's one error type: every failure carries the IoT Hub error code a client will see
//! (the server turns codes into HTTP and MQTT answers in one place) and a client-safe message.

use twinhub_proto::error::ErrorCode;

/// A failed hub operation, as a client should see it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct Error {
    code: ErrorCode,
    message: String,
    /// A record changed on another cluster node between its read and its write.
    conflict: bool,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            conflict: false,
        }
    }

    /// The IoT Hub error code; its HTTP status is `code().http_status()`.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// Text safe to show a client (never internal details).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, message)
    }

    pub fn device_not_found(device_id: &str) -> Self {
        Self::new(
            ErrorCode::DeviceNotFound,
            format!("Device {device_id} not registered"),
        )
    }

    pub fn module_not_found(device_id: &str, module_id: &str) -> Self {
        Self::new(
            ErrorCode::ModuleNotFound,
            format!("Module {module_id} on device {device_id} not registered"),
        )
    }

    pub fn precondition_failed(what: &str) -> Self {
        Self::new(
            ErrorCode::PreconditionFailed,
            format!("Precondition failed: {what} etag did not match"),
        )
    }

    /// A record another cluster node changed meanwhile (retried by the hub; a client sees it
    /// only when retries ran out).
    pub(crate) fn conflict(key: &str) -> Self {
        Error {
            code: ErrorCode::PreconditionFailed,
            message: format!(
                "The record of '{key}' was changed by another request at the same time; retry"
            ),
            conflict: true,
        }
    }

    pub(crate) fn is_conflict(&self) -> bool {
        self.conflict
    }

    pub fn internal() -> Self {
        Self::new(ErrorCode::ServerError, "Internal server error")
    }
}

impl From<twinhub_store::Error> for Error {
    fn from(e: twinhub_store::Error) -> Self {
        // The cause goes to the log; the client sees no internals.
        match e {
            twinhub_store::Error::Closed => {
                Error::new(ErrorCode::ServiceUnavailable, "The hub is shutting down")
            }
            twinhub_store::Error::Unavailable(why) => {
                // The writer already logged the fault; one line per refused request would
                // flood the log while the disk is full.
                tracing::debug!(error = %why, "store unavailable");
                Error::new(
                    ErrorCode::ServiceUnavailable,
                    "The hub's storage is unavailable; retry later",
                )
            }
            e @ twinhub_store::Error::Backend(_) => {
                tracing::error!(error = %e, "store operation failed");
                Error::internal()
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The SDK's error type: tells an IoT Hub refusal (with its status and error code) from a
//! transport failure, a bad connection string, refused credentials, a closed client, or an
//! answer the SDK could not read. Shared by the service and the device client.

use twinhub_proto::error::{ErrorBody, ErrorCode};

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
    /// Reads the hub's refusal with `status` into [`Error::Hub`]. `body` is a REST error body
    /// (`{"Message": ..}`, its message plain or a JSON detail) or, from a twin operation over
    /// MQTT, the JSON detail itself; `named` is the code from the `iothub-errorcode` header,
    /// which wins over the body's.
    pub(crate) fn from_hub(status: u16, named: Option<ErrorCode>, body: &[u8]) -> Error {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        // Every field of ErrorBody defaults, so any object parses: only a `Message` makes it
        // the envelope. Otherwise the text itself may be the detail.
        let envelope = serde_json::from_str::<ErrorBody>(text)
            .ok()
            .filter(|b| !b.message.is_empty())
            .unwrap_or_else(|| ErrorBody {
                message: text.to_owned(),
                exception_message: String::new(),
            });
        let code = named.or_else(|| envelope.parse_code());
        let message = match envelope.detail() {
            Some(detail) if !detail.message.is_empty() => detail.message,
            _ if envelope.message.is_empty() => "no error message".to_owned(),
            _ => envelope.message,
        };
        Error::Hub {
            status,
            code,
            message,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(status: u16, named: Option<ErrorCode>, body: &str) -> (u16, Option<ErrorCode>, String) {
        match Error::from_hub(status, named, body.as_bytes()) {
            Error::Hub {
                status,
                code,
                message,
            } => (status, code, message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rest_bodies_in_either_style() {
        let json = r#"{"Message":"{\"errorCode\":404001,\"trackingId\":\"t\",\"message\":\"Device d1 not found\",\"info\":{},\"timestampUtc\":\"x\"}","ExceptionMessage":""}"#;
        assert_eq!(
            hub(404, None, json),
            (
                404,
                Some(ErrorCode::DeviceNotFound),
                "Device d1 not found".into()
            )
        );
        let plain = r#"{"Message":"ErrorCode:PreconditionFailed;etag mismatch","ExceptionMessage":"Tracking ID:x"}"#;
        assert_eq!(
            hub(412, None, plain),
            (
                412,
                Some(ErrorCode::PreconditionFailed),
                "ErrorCode:PreconditionFailed;etag mismatch".into()
            )
        );
        // The header names the code when the body does not.
        assert_eq!(
            hub(
                429,
                Some(ErrorCode::ThrottlingException),
                r#"{"Message":"slow down"}"#
            ),
            (
                429,
                Some(ErrorCode::ThrottlingException),
                "slow down".into()
            )
        );
    }

    #[test]
    fn twin_answers_carry_the_detail_itself() {
        let detail =
            r#"{"errorCode":400004,"trackingId":"t","message":"bad patch","timestampUtc":"x"}"#;
        assert_eq!(
            hub(400, None, detail),
            (400, Some(ErrorCode::ArgumentInvalid), "bad patch".into())
        );
    }

    #[test]
    fn anything_else_is_kept_as_text() {
        assert_eq!(
            hub(502, None, " <html>bad gateway</html> "),
            (502, None, "<html>bad gateway</html>".into())
        );
        assert_eq!(
            hub(500, None, r#"{"unexpected":true}"#),
            (500, None, r#"{"unexpected":true}"#.into())
        );
        let (_, code, message) = hub(429, None, "");
        assert_eq!((code, message.as_str()), (None, "no error message"));
    }
}

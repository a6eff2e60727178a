//! IoT Hub error codes and the JSON error body of the REST surface.
//! The server maps its failures onto [`ErrorCode`] and sends an [`ErrorBody`] plus the
//! [`ERROR_CODE_HEADER`]; the Rust SDK reads them back with [`ErrorBody::parse_code`].

use serde::{Deserialize, Serialize};

use crate::time::format_timestamp;

/// Response header carrying the error name (e.g. `DeviceNotFound`); the C# SDK cross-checks it
/// with the numeric code in the body.
pub const ERROR_CODE_HEADER: &str = "iothub-errorcode";

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $code:literal, )*) => {
        /// An IoT Hub error code. The numeric value is HTTP status × 1000 + n and the name is
        /// the C# SDK's enum member name, which is also what `iothub-errorcode` carries.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
        }

        impl ErrorCode {
            /// Every known code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The six-digit numeric code, e.g. `404001`.
            pub const fn code(self) -> u32 {
                match self { $(ErrorCode::$name => $code,)* }
            }

            /// The name as IoT Hub spells it, e.g. `DeviceNotFound`.
            pub const fn name(self) -> &'static str {
                match self { $(ErrorCode::$name => stringify!($name),)* }
            }

            /// Looks a numeric code up.
            pub const fn from_code(code: u32) -> Option<Self> {
                // A duplicated number would make an arm unreachable, which the lints reject.
                match code { $($code => Some(ErrorCode::$name),)* _ => None }
            }

            /// Looks a name up (case-sensitive, as sent in `iothub-errorcode`).
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $(stringify!($name) => Some(ErrorCode::$name),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// The api-version is not supported.
    InvalidProtocolVersion = 400001,
    /// The operation is not valid in the current state.
    InvalidOperation = 400003,
    /// The request body or a parameter is invalid.
    ArgumentInvalid = 400004,
    /// A required value is null or missing.
    ArgumentNull = 400005,
    /// The JSON could not be parsed.
    IotHubFormatError = 400006,
    /// A bulk request names the same device twice.
    DeviceDefinedMultipleTimes = 400011,
    /// A bulk registry operation failed for some devices.
    BulkRegistryOperationFailure = 400013,
    /// A newer connection with the same identity closed this one.
    ConnectionForcefullyClosedOnNewConnection = 400027,
    /// Authentication failed (bad, expired or out-of-scope token).
    IotHubUnauthorizedAccess = 401002,
    /// The daily message quota is exhausted.
    IotHubQuotaExceeded = 403002,
    /// The device's cloud-to-device queue is full.
    DeviceMaximumQueueDepthExceeded = 403004,
    /// The addressed resource (e.g. a consumer group) does not exist.
    IotHubNotFound = 404000,
    /// The device is not registered.
    DeviceNotFound = 404001,
    /// The job does not exist.
    JobNotFound = 404002,
    /// The module is not registered.
    ModuleNotFound = 404010,
    /// Direct method: the device is not connected or not subscribed to methods.
    DeviceNotOnline = 404103,
    /// A device with this id already exists.
    DeviceAlreadyExists = 409001,
    /// A module with this id already exists on the device.
    ModuleAlreadyExistsOnDevice = 409301,
    /// The `If-Match` etag does not match.
    PreconditionFailed = 412001,
    /// A cloud-to-device message lock expired before completion.
    DeviceMessageLockLost = 412002,
    /// The message or request body is too large.
    MessageTooLarge = 413001,
    /// Too many devices in one bulk request.
    TooManyDevices = 413002,
    /// Too many modules on one device.
    TooManyModulesOnDevice = 413003,
    /// A throttling limit was hit.
    ThrottlingException = 429001,
    /// Too many jobs are scheduled or running at once.
    ThrottlingMaxActiveJobCountExceeded = 429004,
    /// An internal server error.
    ServerError = 500001,
    /// The service is temporarily unavailable.
    ServiceUnavailable = 503001,
    /// Direct method: the device did not answer within the response timeout.
    GatewayTimeout = 504101,
}

impl ErrorCode {
    /// The HTTP status this code travels with (`code / 1000`).
    pub const fn http_status(self) -> u16 {
        // Every code is six digits, so the quotient fits in u16.
        (self.code() / 1000) as u16
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The REST error envelope `{"Message": "...", "ExceptionMessage": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "Message", default)]
    pub message: String,
    #[serde(rename = "ExceptionMessage", default)]
    pub exception_message: String,
}

/// The JSON document carried inside `Message` for direct-method errors.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ErrorDetail {
    pub error_code: u32,
    pub tracking_id: String,
    pub message: String,
    pub info: serde_json::Map<String, serde_json::Value>,
    pub timestamp_utc: String,
}

/// How IoT Hub's registry endpoints begin `Message`: `ErrorCode:<Name>;<text>`.
const PLAIN_PREFIX: &str = "ErrorCode:";

impl ErrorBody {
    /// The body twinhub sends for every error: `Message` is the JSON [`ErrorDetail`] carrying
    /// the numeric code, the style IoT Hub's direct-method endpoints use.
    pub fn json(code: ErrorCode, text: &str, tracking_id: &str, now: jiff::Timestamp) -> ErrorBody {
        let detail = ErrorDetail {
            error_code: code.code(),
            tracking_id: tracking_id.to_owned(),
            message: text.to_owned(),
            info: serde_json::Map::new(),
            timestamp_utc: format_timestamp(now),
        };
        ErrorBody {
            // Strings and a map always serialise; the field order is the real hub's.
            message: serde_json::to_string(&detail).unwrap_or_default(),
            exception_message: String::new(),
        }
    }

    /// Recovers the error code from either body style; `None` if the body names no known code.
    pub fn parse_code(&self) -> Option<ErrorCode> {
        if let Some(detail) = self.detail() {
            return ErrorCode::from_code(detail.error_code);
        }
        let rest = self.message.trim_start().strip_prefix(PLAIN_PREFIX)?;
        let name = rest.split_once(';').map_or(rest, |(name, _)| name);
        ErrorCode::from_name(name.trim())
    }

    /// The JSON detail when `Message` is in the JSON style.
    pub fn detail(&self) -> Option<ErrorDetail> {
        let text = self.message.trim_start();
        if !text.starts_with('{') {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        // Be lenient about the code's JSON type: some gateways send it as a string.
        let error_code = match value.get("errorCode")? {
            serde_json::Value::Number(n) => u32::try_from(n.as_u64()?).ok()?,
            serde_json::Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        let text_field = |key: &str| {
            value
                .get(key)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Some(ErrorDetail {
            error_code,
            tracking_id: text_field("trackingId"),
            message: text_field("message"),
            info: value
                .get("info")
                .and_then(serde_json::Value::as_object)
                .cloned()
                .unwrap_or_default(),
            timestamp_utc: text_field("timestampUtc"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        crate::time::parse_timestamp("2019-11-12T22:27:46.5615872Z").unwrap_or_default()
    }

    #[test]
    fn brief_codes_have_expected_numbers_and_statuses() {
        let expected: &[(ErrorCode, u32, &str, u16)] = &[
            (
                ErrorCode::InvalidProtocolVersion,
                400001,
                "InvalidProtocolVersion",
                400,
            ),
            (ErrorCode::InvalidOperation, 400003, "InvalidOperation", 400),
            (ErrorCode::ArgumentInvalid, 400004, "ArgumentInvalid", 400),
            (ErrorCode::ArgumentNull, 400005, "ArgumentNull", 400),
            (
                ErrorCode::IotHubFormatError,
                400006,
                "IotHubFormatError",
                400,
            ),
            (
                ErrorCode::DeviceDefinedMultipleTimes,
                400011,
                "DeviceDefinedMultipleTimes",
                400,
            ),
            (
                ErrorCode::BulkRegistryOperationFailure,
                400013,
                "BulkRegistryOperationFailure",
                400,
            ),
            (
                ErrorCode::IotHubUnauthorizedAccess,
                401002,
                "IotHubUnauthorizedAccess",
                401,
            ),
            (ErrorCode::DeviceNotFound, 404001, "DeviceNotFound", 404),
            (ErrorCode::JobNotFound, 404002, "JobNotFound", 404),
            (ErrorCode::ModuleNotFound, 404010, "ModuleNotFound", 404),
            (ErrorCode::DeviceNotOnline, 404103, "DeviceNotOnline", 404),
            (
                ErrorCode::DeviceAlreadyExists,
                409001,
                "DeviceAlreadyExists",
                409,
            ),
            (
                ErrorCode::ModuleAlreadyExistsOnDevice,
                409301,
                "ModuleAlreadyExistsOnDevice",
                409,
            ),
            (
                ErrorCode::PreconditionFailed,
                412001,
                "PreconditionFailed",
                412,
            ),
            (ErrorCode::MessageTooLarge, 413001, "MessageTooLarge", 413),
            (ErrorCode::TooManyDevices, 413002, "TooManyDevices", 413),
            (
                ErrorCode::ThrottlingException,
                429001,
                "ThrottlingException",
                429,
            ),
            (ErrorCode::ServerError, 500001, "ServerError", 500),
            (
                ErrorCode::ServiceUnavailable,
                503001,
                "ServiceUnavailable",
                503,
            ),
            (ErrorCode::GatewayTimeout, 504101, "GatewayTimeout", 504),
        ];
        for &(code, number, name, status) in expected {
            assert_eq!(code.code(), number, "{name}");
            assert_eq!(code.name(), name);
            assert_eq!(code.http_status(), status, "{name}");
            assert_eq!(code.to_string(), name);
        }
    }

    #[test]
    fn lookups_are_inverse_for_every_code() {
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
            assert_eq!(ErrorCode::from_name(code.name()), Some(code));
            assert_eq!(u32::from(code.http_status()), code.code() / 1000);
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(404999), None);
        assert_eq!(ErrorCode::from_name("devicenotfound"), None);
        assert_eq!(ErrorCode::from_name(""), None);
    }

    #[test]
    fn json_style_body() {
        let body = ErrorBody::json(ErrorCode::DeviceNotOnline, "Timed out", "t-1", now());
        assert_eq!(
            body.message,
            r#"{"errorCode":404103,"trackingId":"t-1","message":"Timed out","info":{},"timestampUtc":"2019-11-12T22:27:46.5615872Z"}"#
        );
        assert_eq!(body.exception_message, "");
        assert_eq!(body.parse_code(), Some(ErrorCode::DeviceNotOnline));
        let detail = body.detail();
        assert_eq!(detail.as_ref().map(|d| d.tracking_id.as_str()), Some("t-1"));

        // Registry codes travel in the same style.
        let missing = ErrorBody::json(ErrorCode::DeviceNotFound, "no d1", "t-2", now());
        assert!(missing.message.starts_with(r#"{"errorCode":404001,"#));
        assert_eq!(missing.parse_code(), Some(ErrorCode::DeviceNotFound));
    }

    #[test]
    fn json_text_is_escaped() {
        let body = ErrorBody::json(ErrorCode::GatewayTimeout, "say \"hi\"\n", "t", now());
        assert_eq!(
            body.detail().map(|d| d.message),
            Some("say \"hi\"\n".to_owned())
        );
    }

    #[test]
    fn parses_real_hub_bodies() {
        // Shape from the C# SDK's tests: Message is a JSON string.
        let raw = r#"{"Message":"{\"errorCode\":404103,\"trackingId\":\"x\",\"message\":\"The operation failed because the requested device isn't online.\",\"info\":{\"timeout\":\"00:00:00\"},\"timestampUtc\":\"2021-01-01T00:00:00.0000000Z\"}","ExceptionMessage":""}"#;
        let body: ErrorBody = serde_json::from_str(raw).unwrap_or_default();
        assert_eq!(body.parse_code(), Some(ErrorCode::DeviceNotOnline));
        assert_eq!(
            body.detail().and_then(|d| d.info.get("timeout").cloned()),
            Some(serde_json::json!("00:00:00"))
        );

        let raw = r#"{"Message":"ErrorCode:PreconditionFailed;Precondition failed: Device version did not match","ExceptionMessage":"Tracking ID:ab-G:10-TimeStamp:01/02/2020 03:04:05"}"#;
        let body: ErrorBody = serde_json::from_str(raw).unwrap_or_default();
        assert_eq!(body.parse_code(), Some(ErrorCode::PreconditionFailed));
    }

    #[test]
    fn parse_code_is_lenient_but_not_credulous() {
        let body = |m: &str| ErrorBody {
            message: m.to_owned(),
            exception_message: String::new(),
        };
        assert_eq!(
            body("ErrorCode:DeviceNotFound").parse_code(),
            Some(ErrorCode::DeviceNotFound)
        );
        assert_eq!(
            body(r#"{"errorCode":"409001"}"#).parse_code(),
            Some(ErrorCode::DeviceAlreadyExists)
        );
        assert_eq!(body("ErrorCode:Nope;x").parse_code(), None);
        assert_eq!(body("something broke").parse_code(), None);
        assert_eq!(body(r#"{"errorCode":-1}"#).parse_code(), None);
        assert_eq!(body(r#"{"errorCode":99999999999}"#).parse_code(), None);
        assert_eq!(body("{not json").parse_code(), None);
        assert_eq!(body("").parse_code(), None);
        // Missing fields deserialize to empty strings rather than failing.
        let partial: ErrorBody =
            serde_json::from_str(r#"{"Message":"ErrorCode:ServerError;x"}"#).unwrap_or_default();
        assert_eq!(partial.parse_code(), Some(ErrorCode::ServerError));
    }
}

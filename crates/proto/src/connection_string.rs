//! IoT Hub connection strings (`HostName=..;DeviceId=..;SharedAccessKey=..`), parsed with the
//! official SDKs' rules and printed back in a stable order. Used by the CLI, the Rust SDK and
//! the server's printed onboarding strings; signing goes through [`crate::sas`].

use std::fmt;
use std::str::FromStr;

use crate::sas::{SasError, device_resource_uri, generate_sas_token};

/// A parsed connection string. Field values are kept verbatim.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ConnectionString {
    pub host_name: String,
    pub device_id: Option<String>,
    pub module_id: Option<String>,
    pub shared_access_key_name: Option<String>,
    pub shared_access_key: Option<String>,
    pub shared_access_signature: Option<String>,
    pub gateway_host_name: Option<String>,
    pub x509: bool,
}

/// Whom a connection string authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionStringKind {
    /// A shared access policy (`SharedAccessKeyName`): service APIs.
    Service,
    /// A device identity.
    Device,
    /// A module identity on a device.
    Module,
}

/// Why a connection string was rejected. Messages name keys, never values, so a secret never
/// reaches a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("connection string is empty")]
    Empty,
    #[error("connection string part {position} is empty (look for \";;\" or a trailing ';')")]
    EmptyPart { position: usize },
    #[error("connection string part {position} has no '='")]
    MissingEquals { position: usize },
    /// The key text itself is not echoed: a mangled string can put part of a secret there.
    #[error(
        "connection string part {position} has an unknown key (keys are case-sensitive){}",
        did_you_mean(*.suggestion)
    )]
    UnknownKey {
        position: usize,
        suggestion: Option<&'static str>,
    },
    #[error("connection string has \"{0}\" more than once")]
    DuplicateKey(&'static str),
    #[error("connection string has an empty value for \"{0}\"")]
    EmptyValue(&'static str),
    #[error("connection string x509 must be \"true\" or \"false\"")]
    InvalidX509,
    #[error("connection string is missing HostName")]
    MissingHostName,
    #[error("connection string has ModuleId but no DeviceId")]
    ModuleWithoutDevice,
    #[error("connection string mixes x509=true with a shared access key or signature")]
    MixedAuthentication,
    #[error("device connection string needs SharedAccessKey, SharedAccessSignature or x509=true")]
    MissingDeviceCredential,
    #[error(
        "connection string needs DeviceId (device) or SharedAccessKeyName with SharedAccessKey \
         or SharedAccessSignature (service)"
    )]
    Incomplete,
}

const HOST_NAME: &str = "HostName";
const DEVICE_ID: &str = "DeviceId";
const MODULE_ID: &str = "ModuleId";
const SHARED_ACCESS_KEY_NAME: &str = "SharedAccessKeyName";
const SHARED_ACCESS_KEY: &str = "SharedAccessKey";
const SHARED_ACCESS_SIGNATURE: &str = "SharedAccessSignature";
const GATEWAY_HOST_NAME: &str = "GatewayHostName";
const X509: &str = "x509";
const KNOWN_KEYS: [&str; 8] = [
    HOST_NAME,
    DEVICE_ID,
    MODULE_ID,
    SHARED_ACCESS_KEY_NAME,
    SHARED_ACCESS_KEY,
    SHARED_ACCESS_SIGNATURE,
    GATEWAY_HOST_NAME,
    X509,
];

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |key| format!("; did you mean \"{key}\"?"))
}

impl ConnectionString {
    /// A service (policy) connection string, e.g. for `iothubowner`.
    pub fn service(host: &str, policy: &str, key: &str) -> ConnectionString {
        ConnectionString {
            host_name: host.to_owned(),
            shared_access_key_name: Some(policy.to_owned()),
            shared_access_key: Some(key.to_owned()),
            ..ConnectionString::default()
        }
    }

    /// A device connection string with a symmetric key.
    pub fn device(host: &str, device_id: &str, key: &str) -> ConnectionString {
        ConnectionString {
            host_name: host.to_owned(),
            device_id: Some(device_id.to_owned()),
            shared_access_key: Some(key.to_owned()),
            ..ConnectionString::default()
        }
    }

    /// A module connection string with a symmetric key.
    pub fn module(host: &str, device_id: &str, module_id: &str, key: &str) -> ConnectionString {
        ConnectionString {
            module_id: Some(module_id.to_owned()),
            ..ConnectionString::device(host, device_id, key)
        }
    }

    /// Service, device or module, decided the way the SDKs do: a `DeviceId` makes it a device.
    pub fn kind(&self) -> ConnectionStringKind {
        match (&self.device_id, &self.module_id) {
            (Some(_), Some(_)) => ConnectionStringKind::Module,
            (Some(_), None) => ConnectionStringKind::Device,
            _ => ConnectionStringKind::Service,
        }
    }

    /// The host to dial: `GatewayHostName` if present, else `HostName`. SAS resources and the
    /// MQTT username always use `HostName`.
    pub fn dial_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }

    /// The resource a token for this identity must grant: the host for a service string,
    /// `{host}/devices/{d}[/modules/{m}]` otherwise.
    pub fn sas_resource_uri(&self) -> String {
        match &self.device_id {
            Some(device_id) => {
                device_resource_uri(&self.host_name, device_id, self.module_id.as_deref())
            }
            None => self.host_name.clone(),
        }
    }

    /// Signs a SAS token for this identity that expires at `expiry_unix`. Service strings put
    /// the policy name in `skn`; device and module tokens carry none, as the SDKs do.
    pub fn generate_sas_token(&self, expiry_unix: u64) -> Result<String, SasError> {
        let key = self.shared_access_key.as_deref().ok_or(SasError::NoKey)?;
        let key_name = match self.kind() {
            ConnectionStringKind::Service => self.shared_access_key_name.as_deref(),
            ConnectionStringKind::Device | ConnectionStringKind::Module => None,
        };
        generate_sas_token(&self.sas_resource_uri(), key, key_name, expiry_unix)
    }

    fn validate(&self) -> Result<(), ConnectionStringError> {
        if self.host_name.is_empty() {
            return Err(ConnectionStringError::MissingHostName);
        }
        if self.module_id.is_some() && self.device_id.is_none() {
            return Err(ConnectionStringError::ModuleWithoutDevice);
        }
        let has_sas = self.shared_access_key.is_some() || self.shared_access_signature.is_some();
        if self.x509 && has_sas {
            return Err(ConnectionStringError::MixedAuthentication);
        }
        if self.device_id.is_some() {
            if !(has_sas || self.x509) {
                return Err(ConnectionStringError::MissingDeviceCredential);
            }
        } else if self.shared_access_key_name.is_none() || !has_sas {
            return Err(ConnectionStringError::Incomplete);
        }
        Ok(())
    }
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ConnectionStringError::Empty);
        }
        let mut host_name = None;
        let mut cs = ConnectionString::default();
        let mut x509 = None;
        for (index, part) in s.split(';').enumerate() {
            let position = index + 1;
            if part.is_empty() {
                return Err(ConnectionStringError::EmptyPart { position });
            }
            // Only the first '=' separates: base64 keys end in '='.
            let (key, value) = part
                .split_once('=')
                .ok_or(ConnectionStringError::MissingEquals { position })?;
            let (slot, name) = match key {
                HOST_NAME => (&mut host_name, HOST_NAME),
                DEVICE_ID => (&mut cs.device_id, DEVICE_ID),
                MODULE_ID => (&mut cs.module_id, MODULE_ID),
                SHARED_ACCESS_KEY_NAME => (&mut cs.shared_access_key_name, SHARED_ACCESS_KEY_NAME),
                SHARED_ACCESS_KEY => (&mut cs.shared_access_key, SHARED_ACCESS_KEY),
                SHARED_ACCESS_SIGNATURE => {
                    (&mut cs.shared_access_signature, SHARED_ACCESS_SIGNATURE)
                }
                GATEWAY_HOST_NAME => (&mut cs.gateway_host_name, GATEWAY_HOST_NAME),
                X509 => (&mut x509, X509),
                other => {
                    return Err(ConnectionStringError::UnknownKey {
                        position,
                        suggestion: KNOWN_KEYS
                            .iter()
                            .find(|known| known.eq_ignore_ascii_case(other))
                            .copied(),
                    });
                }
            };
            if slot.is_some() {
                return Err(ConnectionStringError::DuplicateKey(name));
            }
            if value.is_empty() {
                return Err(ConnectionStringError::EmptyValue(name));
            }
            *slot = Some(value.to_owned());
        }
        cs.host_name = host_name.ok_or(ConnectionStringError::MissingHostName)?;
        cs.x509 = match x509.as_deref() {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => return Err(ConnectionStringError::InvalidX509),
        };
        cs.validate()?;
        Ok(cs)
    }
}

impl fmt::Display for ConnectionString {
    /// `HostName`, `DeviceId`, `ModuleId`, `SharedAccessKeyName`, `SharedAccessKey`,
    /// `SharedAccessSignature`, `GatewayHostName`, `x509`: only the fields that are present.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{HOST_NAME}={}", self.host_name)?;
        let optional = [
            (DEVICE_ID, &self.device_id),
            (MODULE_ID, &self.module_id),
            (SHARED_ACCESS_KEY_NAME, &self.shared_access_key_name),
            (SHARED_ACCESS_KEY, &self.shared_access_key),
            (SHARED_ACCESS_SIGNATURE, &self.shared_access_signature),
            (GATEWAY_HOST_NAME, &self.gateway_host_name),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                write!(f, ";{key}={value}")?;
            }
        }
        if self.x509 {
            write!(f, ";{X509}=true")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectionString {
    // Debug output ends up in logs; the key and signature are credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field("shared_access_key", &redact(&self.shared_access_key))
            .field(
                "shared_access_signature",
                &redact(&self.shared_access_signature),
            )
            .field("gateway_host_name", &self.gateway_host_name)
            .field("x509", &self.x509)
            .finish()
    }
}

/// The hub's name for a host name, as IoT Hub uses it in `hubName`, `user-id` and the name of
/// its Event Hub-compatible endpoint: the first DNS label, lower-cased. An IP address (with or
/// without a port) or `localhost` has none, and gives `twinhub`.
pub fn hub_name(host_name: &str) -> String {
    let is_ip = host_name.parse::<std::net::IpAddr>().is_ok()
        || host_name.starts_with('[')
        || host_name
            .rsplit_once(':')
            .is_some_and(|(h, _)| h.parse::<std::net::IpAddr>().is_ok());
    let host = host_name.split(':').next().unwrap_or(host_name);
    let first = host.split('.').next().unwrap_or("");
    if is_ip || first.is_empty() || first.eq_ignore_ascii_case("localhost") {
        "twinhub".to_owned()
    } else {
        first.to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sas::SasToken;

    #[test]
    fn hub_names() {
        assert_eq!(hub_name("myhub.azure-devices.net"), "myhub");
        assert_eq!(hub_name("Hub1.example:8443"), "hub1");
        for ip in [
            "localhost",
            "127.0.0.1",
            "127.0.0.1:443",
            "[::1]",
            "[::1]:443",
            "::1",
        ] {
            assert_eq!(hub_name(ip), "twinhub", "{ip}");
        }
    }

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn parse(s: &str) -> Result<ConnectionString, ConnectionStringError> {
        s.parse()
    }

    #[test]
    fn device_string() {
        let cs = parse(&format!(
            "HostName=hub.example.net;DeviceId=d1;SharedAccessKey={KEY}"
        ))
        .expect("valid");
        assert_eq!(cs.host_name, "hub.example.net");
        assert_eq!(cs.device_id.as_deref(), Some("d1"));
        // The trailing '=' of the base64 key survives: only the first '=' splits.
        assert_eq!(cs.shared_access_key.as_deref(), Some(KEY));
        assert_eq!(cs.kind(), ConnectionStringKind::Device);
        assert_eq!(cs.dial_host(), "hub.example.net");
        assert_eq!(cs, ConnectionString::device("hub.example.net", "d1", KEY));
    }

    #[test]
    fn service_module_gateway_x509_and_signature_strings() {
        let service = parse(&format!(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}"
        ))
        .expect("valid");
        assert_eq!(service.kind(), ConnectionStringKind::Service);
        assert_eq!(
            service,
            ConnectionString::service("localhost:8443", "iothubowner", KEY)
        );

        let module = parse(&format!(
            "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={KEY};GatewayHostName=gw.local"
        ))
        .expect("valid");
        assert_eq!(module.kind(), ConnectionStringKind::Module);
        assert_eq!(module.dial_host(), "gw.local");
        assert_eq!(module.sas_resource_uri(), "h/devices/d/modules/m");

        let x509 = parse("HostName=h;DeviceId=d;x509=true").expect("valid");
        assert!(x509.x509);
        let x509_upper = parse("HostName=h;DeviceId=d;x509=True").expect("valid");
        assert!(x509_upper.x509);

        let token = "SharedAccessSignature sr=h%2Fdevices%2Fd&sig=abc%3D&se=10";
        let sig = parse(&format!(
            "HostName=h;DeviceId=d;SharedAccessSignature={token}"
        ))
        .expect("valid");
        assert_eq!(sig.shared_access_signature.as_deref(), Some(token));
    }

    #[test]
    fn display_is_stable_and_round_trips() {
        let cs = ConnectionString {
            gateway_host_name: Some("gw".into()),
            ..ConnectionString::module("h", "d", "m", KEY)
        };
        let text = cs.to_string();
        assert_eq!(
            text,
            format!("HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={KEY};GatewayHostName=gw")
        );
        assert_eq!(parse(&text), Ok(cs));
        assert_eq!(
            ConnectionString::service("h", "iothubowner", "k=").to_string(),
            "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=k="
        );
        // Input order does not matter; output order is fixed.
        let shuffled = parse("SharedAccessKey=k;DeviceId=d;HostName=h").expect("valid");
        assert_eq!(
            shuffled.to_string(),
            "HostName=h;DeviceId=d;SharedAccessKey=k"
        );
        assert_eq!(
            parse("x509=true;HostName=h;DeviceId=d").map(|c| c.to_string()),
            Ok("HostName=h;DeviceId=d;x509=true".to_owned())
        );
    }

    #[test]
    fn rejections() {
        use ConnectionStringError as E;
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=k;",
                E::EmptyPart { position: 4 },
            ),
            (
                "HostName=h;;DeviceId=d;SharedAccessKey=k",
                E::EmptyPart { position: 2 },
            ),
            (
                "HostName=h;DeviceId;SharedAccessKey=k",
                E::MissingEquals { position: 2 },
            ),
            (
                "hostname=h;DeviceId=d;SharedAccessKey=k",
                E::UnknownKey {
                    position: 1,
                    suggestion: Some("HostName"),
                },
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=k;Foo=1",
                E::UnknownKey {
                    position: 4,
                    suggestion: None,
                },
            ),
            (
                "HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey=k",
                E::DuplicateKey("DeviceId"),
            ),
            (
                "HostName=;DeviceId=d;SharedAccessKey=k",
                E::EmptyValue("HostName"),
            ),
            ("HostName=h;DeviceId=d;x509=yes", E::InvalidX509),
            ("DeviceId=d;SharedAccessKey=k", E::MissingHostName),
            (
                "HostName=h;ModuleId=m;SharedAccessKey=k;SharedAccessKeyName=p",
                E::ModuleWithoutDevice,
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=k;x509=true",
                E::MixedAuthentication,
            ),
            ("HostName=h;DeviceId=d", E::MissingDeviceCredential),
            (
                "HostName=h;DeviceId=d;x509=false",
                E::MissingDeviceCredential,
            ),
            ("HostName=h;SharedAccessKey=k", E::Incomplete),
            ("HostName=h;SharedAccessKeyName=p", E::Incomplete),
            ("HostName=h", E::Incomplete),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input).as_ref().err(), Some(expected), "{input:?}");
        }
    }

    #[test]
    fn errors_and_debug_never_show_the_key() {
        let secret = "c2VjcmV0LWtleQ==";
        let err = parse(&format!(
            "HostName=h;DeviceId=d;SharedAccessKey={secret};x509=true"
        ))
        .expect_err("mixed");
        assert!(!err.to_string().contains(secret));
        let err = parse(&format!("HostName=h;{secret}")).expect_err("unknown key");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        let err = parse("HostName=h;c2VjcmV0LWtleQ").expect_err("no '='");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        let err = parse("HostName=h;deviceid=d").expect_err("wrong case");
        assert_eq!(
            err.to_string(),
            "connection string part 2 has an unknown key (keys are case-sensitive); did you mean \"DeviceId\"?"
        );
        let cs = ConnectionString::device("h", "d", secret);
        let debug = format!("{cs:?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn generates_tokens_for_each_kind() {
        let device = ConnectionString::device("hub", "d1", KEY);
        let token = device.generate_sas_token(1_000).expect("has key");
        let parsed = SasToken::parse(&token).expect("valid token");
        assert_eq!(parsed.resource, "hub/devices/d1");
        assert_eq!(parsed.key_name, None);
        assert!(parsed.verify(KEY));

        let service = ConnectionString::service("hub:8443", "iothubowner", KEY);
        let parsed = SasToken::parse(&service.generate_sas_token(1_000).expect("has key"))
            .expect("valid token");
        assert_eq!(parsed.resource, "hub:8443");
        assert_eq!(parsed.key_name.as_deref(), Some("iothubowner"));
        assert!(parsed.verify(KEY));

        let x509 = parse("HostName=h;DeviceId=d;x509=true").expect("valid");
        assert_eq!(x509.generate_sas_token(1), Err(SasError::NoKey));
    }
}

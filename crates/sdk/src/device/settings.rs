//! What a device or module connection is made of, resolved once by the builder: who to dial,
//! how to trust the hub (rustls roots), which identity signs in (device id and optional
//! module id) and how: a SAS password signed with the key, or a client certificate in the TLS
//! handshake. The link module dials with it; the connection task re-signs with it on every
//! reconnect.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use twinhub_proto::encoding::quote;
use twinhub_proto::sas::{device_resource_uri, generate_sas_token};
use twinhub_proto::topic::mqtt_username;

use crate::error::{Error, Result};

/// How the MQTT bytes travel to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// MQTT 3.1.1 over TLS, port 8883 by default.
    #[default]
    Mqtt,
    /// MQTT 3.1.1 in binary WebSocket frames over TLS (`wss://host/$iothub/websocket`), port
    /// 443 by default; for networks that only let HTTPS out.
    WebSocket,
}

impl Transport {
    /// The port IoT Hub serves this transport on.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Mqtt => 8883,
            Transport::WebSocket => 443,
        }
    }
}

/// How the identity proves itself.
#[derive(Clone)]
pub(crate) enum Credential {
    /// Signs a SAS token with this key for every connection (the CONNECT password).
    Key(String),
    /// A client certificate, carried by the TLS config; CONNECT has no password.
    Certificate,
}

/// A client certificate chain and its private key, both PEM, for X.509 authentication.
#[derive(Clone)]
pub(crate) struct ClientCertificate {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Everything the connection task needs, fixed at build time.
pub(crate) struct Settings {
    /// `HostName`: goes into the user name and the SAS resource.
    pub host_name: String,
    /// `GatewayHostName` or `HostName`: the TCP peer and the TLS server name.
    pub dial_host: String,
    pub server_name: ServerName<'static>,
    pub device_id: String,
    /// Set for a module identity: it joins the client id, user name, SAS resource and
    /// telemetry topic.
    pub module_id: Option<String>,
    pub credential: Credential,
    pub transport: Transport,
    pub port: u16,
    pub keep_alive: Duration,
    pub token_ttl: Duration,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key signs tokens: it never goes into a log line.
        f.debug_struct("Settings")
            .field("host_name", &self.host_name)
            .field("dial_host", &self.dial_host)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("transport", &self.transport)
            .field("port", &self.port)
            .field("keep_alive", &self.keep_alive)
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The MQTT client id: `{deviceId}`, or `{deviceId}/{moduleId}` for a module.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(module_id) => format!("{}/{module_id}", self.device_id),
            None => self.device_id.clone(),
        }
    }

    /// `{HostName}/{clientId}/?api-version=..&DeviceClientType=..`, as IoT Hub expects it
    /// (the same with a certificate: only the password differs).
    pub fn username(&self) -> String {
        let client_type = format!("twinhub-sdk-rust/{}", env!("CARGO_PKG_VERSION"));
        format!(
            "{}&DeviceClientType={}",
            mqtt_username(&self.host_name, &self.client_id()),
            quote(&client_type)
        )
    }

    /// The CONNECT password: a token for `{HostName}/devices/{deviceId}[/modules/{moduleId}]`
    /// valid for at least the TTL, or none when a certificate signs in.
    pub fn sign(&self) -> Result<Option<String>> {
        let Credential::Key(key) = &self.credential else {
            return Ok(None);
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let end = now.saturating_add(self.token_ttl);
        // `se` is whole seconds: round up so the token never lives shorter than asked.
        let se = end.as_secs() + u64::from(end.subsec_nanos() > 0);
        let resource =
            device_resource_uri(&self.host_name, &self.device_id, self.module_id.as_deref());
        generate_sas_token(&resource, key, None, se)
            .map(Some)
            .map_err(|e| Error::ConnectionString(format!("cannot sign with the key: {e}")))
    }

    /// When to reconnect with a fresh token: at 80% of its lifetime, since MQTT 3.1.1 has no
    /// way to hand the hub a new token on a live connection. A certificate needs no renewal
    /// (the hub ends the session at its notAfter and the client reconnects like after any
    /// drop).
    pub fn renew_after(&self) -> Option<Duration> {
        match self.credential {
            Credential::Key(_) => Some(self.token_ttl.mul_f64(0.8)),
            Credential::Certificate => None,
        }
    }
}

/// The TLS server name for `host`: an IP literal is checked against the certificate's IP SANs
/// and sends no SNI, a DNS name is both.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string())
        .map_err(|_| Error::ConnectionString(format!("'{host}' is not a valid host name")))
}

/// A rustls client config trusting the system roots plus `extra_ca` (PEM), TLS 1.2 and 1.3,
/// with the ring provider.
pub(crate) fn tls_config(extra_ca: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>> {
    tls_config_with(extra_ca, None)
}

/// [`tls_config`], presenting `client` (a certificate chain and key) when the hub asks for a
/// client certificate.
pub(crate) fn tls_config_with(
    extra_ca: &[Vec<u8>],
    client: Option<&ClientCertificate>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    // The system store honours SSL_CERT_FILE / SSL_CERT_DIR, like the official device SDKs.
    // Unreadable entries are skipped: one bad file must not make every hub untrusted.
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("skipping part of the system trust store: {e}");
    }
    roots.add_parsable_certificates(native.certs);
    for pem in extra_ca {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| Error::Setup(format!("the extra CA is not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Setup(format!("the extra CA is not usable: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::Setup(
                "the extra CA PEM holds no CERTIFICATE block".into(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Setup(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    let config = match client {
        None => config.with_no_client_auth(),
        Some(client) => {
            let chain = CertificateDer::pem_slice_iter(&client.chain_pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::Setup(format!("the client certificate is not valid PEM: {e}"))
                })?;
            if chain.is_empty() {
                return Err(Error::Setup(
                    "the client certificate PEM holds no CERTIFICATE block".into(),
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(&client.key_pem).map_err(|e| {
                Error::Setup(format!("the client key is not a PEM private key: {e}"))
            })?;
            config.with_client_auth_cert(chain, key).map_err(|e| {
                Error::Setup(format!("the client certificate and key do not fit: {e}"))
            })?
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhub_proto::sas::SasToken;

    fn settings(ttl: Duration) -> Settings {
        Settings {
            host_name: "hub.example.net".into(),
            dial_host: "localhost".into(),
            server_name: server_name("localhost").unwrap(),
            device_id: "d1".into(),
            module_id: None,
            credential: Credential::Key("c2VjcmV0LWtleS1mb3ItdGVzdHM=".into()),
            transport: Transport::Mqtt,
            port: 8883,
            keep_alive: Duration::from_secs(60),
            token_ttl: ttl,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(5),
            tls: tls_config(&[]).unwrap(),
        }
    }

    #[test]
    fn username_names_the_hub_device_and_client() {
        let s = settings(Duration::from_secs(3600));
        let expected = format!(
            "hub.example.net/d1/?api-version=2021-04-12&DeviceClientType=twinhub-sdk-rust%2F{}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(s.username(), expected);
    }

    #[test]
    fn token_grants_the_device_resource_for_at_least_the_ttl() {
        let s = settings(Duration::from_millis(2500));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let signed = s.sign().unwrap().expect("a SAS identity signs a password");
        let token = SasToken::parse(&signed).unwrap();
        let valid_for = Duration::from_secs(token.expiry).saturating_sub(now);
        assert!(valid_for >= Duration::from_millis(2500), "{valid_for:?}");
        assert!(valid_for < Duration::from_millis(3600), "{valid_for:?}");
        assert!(token.verify("c2VjcmV0LWtleS1mb3ItdGVzdHM="));
        assert!(signed.contains("sr=hub.example.net%2Fdevices%2Fd1&"));
        assert!(!signed.contains("skn="));
        assert_eq!(s.renew_after(), Some(Duration::from_millis(2000)));
    }

    #[test]
    fn a_module_names_itself_in_client_id_username_and_token() {
        let s = Settings {
            module_id: Some("filter".into()),
            ..settings(Duration::from_secs(3600))
        };
        assert_eq!(s.client_id(), "d1/filter");
        assert!(
            s.username()
                .starts_with("hub.example.net/d1/filter/?api-version=2021-04-12&"),
            "{}",
            s.username()
        );
        let signed = s.sign().unwrap().unwrap();
        assert!(signed.contains("sr=hub.example.net%2Fdevices%2Fd1%2Fmodules%2Ffilter&"));
    }

    #[test]
    fn a_certificate_identity_sends_no_password_and_never_renews() {
        let s = Settings {
            credential: Credential::Certificate,
            ..settings(Duration::from_secs(3600))
        };
        assert_eq!(s.sign().unwrap(), None);
        assert_eq!(s.renew_after(), None);
    }

    #[test]
    fn client_certificates_must_be_pem_with_a_key() {
        let bad = ClientCertificate {
            chain_pem: b"nope".to_vec(),
            key_pem: b"nope".to_vec(),
        };
        assert!(matches!(
            tls_config_with(&[], Some(&bad)),
            Err(Error::Setup(_))
        ));
    }

    #[test]
    fn ip_hosts_get_an_ip_server_name() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("localhost").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad host").is_err());
    }

    #[test]
    fn extra_ca_must_be_pem_certificates() {
        assert!(matches!(
            tls_config(&[b"nope".to_vec()]),
            Err(Error::Setup(_))
        ));
    }
}

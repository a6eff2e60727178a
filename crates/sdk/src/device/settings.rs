//! What a device connection is made of, resolved once by the builder: who to dial, how to
//! trust the hub (rustls roots), and how to sign the CONNECT (user name and SAS password).
//! The link module dials with it; the connection task re-signs with it on every reconnect.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
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

/// Everything the connection task needs, fixed at build time.
pub(crate) struct Settings {
    /// `HostName`: goes into the user name and the SAS resource.
    pub host_name: String,
    /// `GatewayHostName` or `HostName`: the TCP peer and the TLS server name.
    pub dial_host: String,
    pub server_name: ServerName<'static>,
    pub device_id: String,
    pub key: String,
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
            .field("transport", &self.transport)
            .field("port", &self.port)
            .field("keep_alive", &self.keep_alive)
            .field("token_ttl", &self.token_ttl)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// `{HostName}/{deviceId}/?api-version=..&DeviceClientType=..`, as IoT Hub expects it.
    pub fn username(&self) -> String {
        let client_type = format!("twinhub-sdk-rust/{}", env!("CARGO_PKG_VERSION"));
        format!(
            "{}&DeviceClientType={}",
            mqtt_username(&self.host_name, &self.device_id),
            quote(&client_type)
        )
    }

    /// Signs a device token for `{HostName}/devices/{deviceId}` valid for at least the TTL.
    pub fn sign(&self) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let end = now.saturating_add(self.token_ttl);
        // `se` is whole seconds: round up so the token never lives shorter than asked.
        let se = end.as_secs() + u64::from(end.subsec_nanos() > 0);
        let resource = device_resource_uri(&self.host_name, &self.device_id, None);
        generate_sas_token(&resource, &self.key, None, se)
            .map_err(|e| Error::ConnectionString(format!("cannot sign with the key: {e}")))
    }

    /// When to reconnect with a fresh token: at 80% of its lifetime, since MQTT 3.1.1 has no
    /// way to hand the hub a new token on a live connection.
    pub fn renew_after(&self) -> Duration {
        self.token_ttl.mul_f64(0.8)
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
        .with_root_certificates(roots)
        .with_no_client_auth();
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
            key: "c2VjcmV0LWtleS1mb3ItdGVzdHM=".into(),
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
        let signed = s.sign().unwrap();
        let token = SasToken::parse(&signed).unwrap();
        let valid_for = Duration::from_secs(token.expiry).saturating_sub(now);
        assert!(valid_for >= Duration::from_millis(2500), "{valid_for:?}");
        assert!(valid_for < Duration::from_millis(3600), "{valid_for:?}");
        assert!(token.verify(&s.key));
        assert!(signed.contains("sr=hub.example.net%2Fdevices%2Fd1&"));
        assert!(!signed.contains("skn="));
        assert_eq!(s.renew_after(), Duration::from_millis(2000));
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

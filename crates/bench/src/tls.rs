//! The one client TLS stack every target is measured with (rustls 0.23 with ring, TLS 1.3,
//! trusting only the hub's development CA, no session resumption because every simulated
//! device is a separate machine), plus the server certificate the peers (Mosquitto and the
//! echo floor) present: signed by that same CA with the same key type as the hub's own.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Error, Result};

/// The name every target's certificate carries and every client sends as SNI.
pub const SERVER_NAME: &str = "localhost";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

/// Parses every certificate in a PEM text.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err("parsing a PEM certificate", e))?;
    if certs.is_empty() {
        return Err(Error::Tls("the PEM text holds no certificate".into()));
    }
    Ok(certs)
}

/// A TLS client for loopback targets.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Client {
    /// A client that trusts only the CA(s) in `ca_pem`.
    pub fn new(ca_pem: &[u8]) -> Result<Client> {
        let mut roots = RootCertStore::empty();
        for cert in parse_certs(ca_pem)? {
            roots
                .add(cert)
                .map_err(|e| tls_err("adding the CA to the trust store", e))?;
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| tls_err("protocol versions", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // A fleet of devices never shares session tickets; resuming would flatter the
        // connection rate.
        config.resumption = Resumption::disabled();
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|e| tls_err("the server name", e))?
            .to_owned();
        Ok(Client {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// Opens TCP (from `source` when given, so many sockets can share one destination
    /// without running out of ephemeral ports) and completes the TLS handshake.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<TlsStream<TcpStream>> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| Error::io("creating a socket", e))?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| Error::io(format!("binding a client socket to {ip}"), e))?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .map_err(|e| Error::io(format!("connecting to {addr}"), e))?;
        tcp.set_nodelay(true)
            .map_err(|e| Error::io("setting TCP_NODELAY", e))?;
        self.connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| Error::io(format!("TLS handshake with {addr}"), e))
    }
}

/// A server certificate chain (leaf then CA, as the hub sends it) and its key, both PEM.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Issues a certificate for `localhost` / 127.0.0.1 signed by the CA whose certificate and
/// key are given in PEM (the hub's `tls/ca.pem` and `tls/ca-key.pem`).
pub fn issue_server_cert(ca_cert_pem: &str, ca_key_pem: &str) -> Result<ServerCert> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| tls_err("reading the CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)
        .map_err(|e| tls_err("reading the CA certificate", e))?;
    // The same key type as the hub's certificate (rcgen's default, ECDSA P-256), so
    // handshakes cost the same on both sides.
    let key = KeyPair::generate().map_err(|e| tls_err("generating a key", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "twinhub-bench");
    dn.push(DnType::CommonName, SERVER_NAME);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::DnsName(
            SERVER_NAME
                .try_into()
                .map_err(|e| tls_err("the DNS name", e))?,
        ),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| tls_err("signing the certificate", e))?;
    Ok(ServerCert {
        chain_pem: format!("{}{}", cert.pem(), ca_cert_pem),
        key_pem: key.serialize_pem(),
    })
}

/// A TLS acceptor presenting `cert` (no ALPN), configured like the hub's MQTT listener.
pub fn acceptor(cert: &ServerCert) -> Result<TlsAcceptor> {
    let chain = parse_certs(cert.chain_pem.as_bytes())?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| tls_err("parsing the private key", e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_err("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_err("the certificate or key", e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

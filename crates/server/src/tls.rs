//! TLS for both listeners: the development PKI (a CA kept in the data dir, and a server
//! certificate it signs, reused across starts and re-signed when its SANs no longer cover the
//! hostname and bind address or it nears expiry), or an operator's own certificate; and the
//! rustls server configs.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::error::ServerError;
use crate::hub_file::write_atomic;

/// Where the system's public roots usually live (Debian first).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The TLS setup of a running hub.
pub struct TlsSetup {
    /// For the HTTPS port (ALPN h2 and http/1.1).
    pub https: Arc<ServerConfig>,
    /// For the MQTT port (no ALPN).
    pub mqtt: Arc<ServerConfig>,
    /// For the AMQP port (no ALPN, no client certificates: only services connect there).
    pub amqp: Arc<ServerConfig>,
    /// The dev CA alone (None with an operator certificate).
    pub ca_pem: Option<PathBuf>,
    /// System roots plus the dev CA, for `REQUESTS_CA_BUNDLE` / `SSL_CERT_FILE`.
    pub ca_bundle: Option<PathBuf>,
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(format!("{what}: {e}"))
}

/// Key files: owner-only, replaced atomically.
fn write_private(path: &Path, contents: &str) -> Result<(), ServerError> {
    write_atomic(path, contents.as_bytes(), 0o600)
        .map_err(|e| tls_err(&format!("writing {}", path.display()), e))
}

/// Certificates: readable by all (clients need the CA), replaced atomically.
fn write_public(path: &Path, contents: &str) -> Result<(), ServerError> {
    write_atomic(path, contents.as_bytes(), 0o644)
        .map_err(|e| tls_err(&format!("writing {}", path.display()), e))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "twinhub");
    dn.push(DnType::CommonName, "twinhub development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 12, 31);
    params
}

/// Loads the dev CA from `dir`, creating it on first start.
fn dev_ca(dir: &Path) -> Result<(String, KeyPair), ServerError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    if cert_path.exists() && key_path.exists() {
        let cert = fs::read_to_string(&cert_path).map_err(|e| tls_err("reading the dev CA", e))?;
        let key =
            fs::read_to_string(&key_path).map_err(|e| tls_err("reading the dev CA key", e))?;
        let key = KeyPair::from_pem(&key).map_err(|e| tls_err("parsing the dev CA key", e))?;
        return Ok((cert, key));
    }
    let key = KeyPair::generate().map_err(|e| tls_err("generating the dev CA key", e))?;
    let mut params = ca_params();
    let serial = random_serial();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    // A unique name: with two hubs' CAs in one trust bundle, OpenSSL looks issuers up by
    // name, and identical names would make it try the wrong one.
    let tag: String = serial[..4].iter().map(|b| format!("{b:02x}")).collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("twinhub development CA {tag}"));
    let cert = params
        .self_signed(&key)
        .map_err(|e| tls_err("creating the dev CA", e))?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok((cert.pem(), key))
}

fn random_serial() -> [u8; 16] {
    let mut b = [0u8; 16];
    // Without randomness no key could be made either; failing loudly is right.
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b[0] &= 0x7f;
    b
}

/// The names the server certificate must carry.
fn server_sans(config: &Config) -> Vec<SanType> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.push(config.hostname.clone());
    if !config.bind.is_unspecified() {
        names.push(config.bind.to_string());
    }
    let mut sans = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if !seen.insert(n.to_ascii_lowercase()) {
            continue;
        }
        let san = match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => match n.clone().try_into() {
                Ok(dns) => SanType::DnsName(dns),
                Err(_) => continue,
            },
        };
        sans.push(san);
    }
    sans
}

/// Issues a fresh server certificate signed by the dev CA.
fn dev_server_cert(
    config: &Config,
    ca_pem: &str,
    ca_key: KeyPair,
) -> Result<(String, String), ServerError> {
    let issuer =
        Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(|e| tls_err("loading the dev CA", e))?;
    let key = KeyPair::generate().map_err(|e| tls_err("generating the server key", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "twinhub");
    dn.push(DnType::CommonName, config.hostname.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = server_sans(config);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(825);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| tls_err("issuing the server certificate", e))?;
    // The chain carries the CA too, so clients that trust it build the path at once.
    Ok((format!("{}{}", cert.pem(), ca_pem), key.serialize_pem()))
}

/// The server certificate of an earlier start, if it was issued by this CA, still names every
/// SAN this configuration needs, and is valid for at least 30 more days.
fn reusable_server_cert(dir: &Path, config: &Config, ca_pem: &str) -> Option<(String, String)> {
    let chain = fs::read_to_string(dir.join("server.pem")).ok()?;
    let key = fs::read_to_string(dir.join("server-key.pem")).ok()?;
    if !chain.ends_with(ca_pem) {
        return None;
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let mut have = std::collections::HashSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    have.insert(d.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(raw) => {
                    let ip = match raw.len() {
                        4 => <[u8; 4]>::try_from(*raw).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*raw).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        have.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let covered = server_sans(config)
        .iter()
        .all(|s| have.contains(&san_text(s)));
    let expires = cert.validity().not_after.timestamp();
    let fresh =
        expires > (time::OffsetDateTime::now_utc() + time::Duration::days(30)).unix_timestamp();
    // The two files are written one after the other: a crash in between leaves a key that
    // belongs to another certificate, which must be reissued rather than refused at start.
    let pair = KeyPair::from_pem(&key).ok()?;
    let matches = pair.public_key_raw() == &*cert.public_key().subject_public_key.data;
    (covered && fresh && matches).then_some((chain, key))
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::IpAddress(ip) => ip.to_string(),
        SanType::DnsName(n) => n.as_str().to_ascii_lowercase(),
        other => format!("{other:?}"),
    }
}

/// Writes system roots plus the dev CA into `ca-bundle.pem`.
fn write_bundle(dir: &Path, ca_pem: &str) -> Result<PathBuf, ServerError> {
    let mut bundle = String::new();
    if let Some(system) = SYSTEM_BUNDLES
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
    {
        bundle.push_str(&system);
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
    } else {
        tracing::warn!("no system CA bundle found; ca-bundle.pem holds only the dev CA");
    }
    bundle.push_str("# twinhub development CA\n");
    bundle.push_str(ca_pem);
    let path = dir.join("ca-bundle.pem");
    write_public(&path, &bundle)?;
    Ok(path)
}

/// Asks every client for a certificate without requiring one, and takes any chain that parses:
/// which certificates admit which device is the registry's business, decided at MQTT CONNECT
/// against thumbprints and verified CAs (`twinhub_core::certificates`), where a refusal can
/// say why in the log and as CONNACK 5 instead of a bare TLS alert. What the handshake still
/// checks is that the client holds the certificate's key (its signature, with the ring
/// provider's algorithms). No CA names are hinted, so clients offer whatever they have.
#[derive(Debug)]
struct OptionalClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for OptionalClientCert {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        for cert in std::iter::once(end_entity).chain(intermediates) {
            if x509_parser::parse_x509_certificate(cert.as_ref()).is_err() {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadEncoding,
                ));
            }
        }
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server config; `client_certs` asks clients for an optional certificate (devices' ports).
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
    client_certs: bool,
) -> Result<Arc<ServerConfig>, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_err("protocol versions", e))?;
    let builder = if client_certs {
        builder.with_client_cert_verifier(Arc::new(OptionalClientCert {
            algorithms: provider.signature_verification_algorithms,
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            ServerError::Tls("the certificate and the private key do not match".into())
        }
        other => tls_err("the certificate or key is not usable", other),
    })?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn parse_chain(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&format!("parsing {what}"), e))?;
    if chain.is_empty() {
        return Err(ServerError::Tls(format!("{what} holds no certificate")));
    }
    Ok(chain)
}

fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, ServerError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| tls_err(&format!("parsing {what}"), e))
}

/// The dev CA of this data dir (created on first start), for a cluster to share; `None` when
/// the operator's certificate is configured.
pub fn dev_ca_pair(config: &Config) -> Result<Option<crate::shared_identity::CaPair>, ServerError> {
    if config.tls_cert.is_some() {
        return Ok(None);
    }
    let dir = config.data_dir.join("tls");
    fs::create_dir_all(&dir).map_err(|e| tls_err(&format!("creating {}", dir.display()), e))?;
    let (cert_pem, key) = dev_ca(&dir)?;
    Ok(Some(crate::shared_identity::CaPair {
        cert_pem,
        key_pem: key.serialize_pem(),
    }))
}

/// Makes `ca` this data dir's dev CA (a cluster's shared one). A server certificate issued by
/// another CA is then reissued by [`prepare`], which checks the issuer.
pub fn install_dev_ca(
    config: &Config,
    ca: &crate::shared_identity::CaPair,
) -> Result<(), ServerError> {
    let dir = config.data_dir.join("tls");
    fs::create_dir_all(&dir).map_err(|e| tls_err(&format!("creating {}", dir.display()), e))?;
    let cert_path = dir.join("ca.pem");
    if fs::read_to_string(&cert_path).is_ok_and(|have| have == ca.cert_pem) {
        return Ok(());
    }
    KeyPair::from_pem(&ca.key_pem).map_err(|e| tls_err("parsing the shared CA key", e))?;
    // The key first: a crash in between leaves a CA certificate that does not match its key
    // file, which the next start replaces with the shared pair again.
    write_private(&dir.join("ca-key.pem"), &ca.key_pem)?;
    write_public(&cert_path, &ca.cert_pem)
}

/// Prepares TLS for a hub: the operator's certificate when configured, else the dev PKI in
/// `<data_dir>/tls`.
pub fn prepare(config: &Config) -> Result<TlsSetup, ServerError> {
    let (chain_pem, key_pem, ca_pem, ca_bundle) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let c =
                fs::read(cert).map_err(|e| tls_err(&format!("reading {}", cert.display()), e))?;
            let k = fs::read(key).map_err(|e| tls_err(&format!("reading {}", key.display()), e))?;
            (c, k, None, None)
        }
        _ => {
            let dir = config.data_dir.join("tls");
            fs::create_dir_all(&dir)
                .map_err(|e| tls_err(&format!("creating {}", dir.display()), e))?;
            let (ca, ca_key) = dev_ca(&dir)?;
            let (chain, key) = match reusable_server_cert(&dir, config, &ca) {
                Some(existing) => existing,
                None => {
                    let (chain, key) = dev_server_cert(config, &ca, ca_key)?;
                    write_public(&dir.join("server.pem"), &chain)?;
                    write_private(&dir.join("server-key.pem"), &key)?;
                    (chain, key)
                }
            };
            let bundle = write_bundle(&dir, &ca)?;
            (
                chain.into_bytes(),
                key.into_bytes(),
                Some(dir.join("ca.pem")),
                Some(bundle),
            )
        }
    };
    let chain = parse_chain(&chain_pem, "the certificate")?;
    let key = parse_key(&key_pem, "the private key")?;
    Ok(TlsSetup {
        https: server_config(chain.clone(), key.clone_key(), &[b"h2", b"http/1.1"], true)?,
        mqtt: server_config(chain.clone(), key.clone_key(), &[], true)?,
        amqp: server_config(chain, key, &[], false)?,
        ca_pem,
        ca_bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config {
            data_dir: dir.to_path_buf(),
            hostname: "hub.test".into(),
            bind: "127.0.0.9".parse().unwrap(),
            ..Config::default()
        }
    }

    #[test]
    fn dev_pki_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let first = prepare(&cfg).unwrap();
        let ca1 = fs::read(first.ca_pem.as_ref().unwrap()).unwrap();
        let bundle = fs::read_to_string(first.ca_bundle.as_ref().unwrap()).unwrap();
        assert!(bundle.ends_with(&String::from_utf8(ca1.clone()).unwrap()));
        let server1 = fs::read(dir.path().join("tls/server.pem")).unwrap();
        let second = prepare(&cfg).unwrap();
        assert_eq!(ca1, fs::read(second.ca_pem.unwrap()).unwrap());
        assert_eq!(
            server1,
            fs::read(dir.path().join("tls/server.pem")).unwrap(),
            "server cert reused"
        );
        // A new hostname needs a new SAN: the certificate is reissued by the same CA.
        let renamed = Config {
            hostname: "other.test".into(),
            ..cfg
        };
        prepare(&renamed).unwrap();
        let server2 = fs::read_to_string(dir.path().join("tls/server.pem")).unwrap();
        assert_ne!(server1, server2.as_bytes());
        assert!(server2.ends_with(&String::from_utf8(ca1).unwrap()));
    }

    #[test]
    fn a_server_key_that_does_not_match_is_replaced_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        prepare(&cfg).unwrap();
        // As if a crash came between writing the new key and the new certificate.
        let stray = KeyPair::generate().unwrap();
        fs::write(dir.path().join("tls/server-key.pem"), stray.serialize_pem()).unwrap();
        prepare(&cfg).expect("a mismatched pair is reissued, not refused");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &str| {
                fs::metadata(dir.path().join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode("tls/server-key.pem"), 0o600);
            assert_eq!(mode("tls/ca-key.pem"), 0o600);
        }
    }

    #[test]
    fn operator_cert_with_wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        prepare(&cfg).unwrap();
        let other = KeyPair::generate().unwrap();
        let wrong_key = dir.path().join("wrong.pem");
        fs::write(&wrong_key, other.serialize_pem()).unwrap();
        let cfg = Config {
            tls_cert: Some(dir.path().join("tls/server.pem")),
            tls_key: Some(wrong_key),
            ..cfg
        };
        let err = prepare(&cfg).err().expect("mismatched key accepted");
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}

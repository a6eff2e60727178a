//! X.509 client authentication: checks a TLS client certificate chain against an identity's
//! registered thumbprints (`selfSigned`) or the hub's verified CAs (`certificateAuthority`), and
//! keeps those CAs: added by name with their PEM, verified by IoT Hub's proof of possession (a
//! verification code the owner puts in the CN of a certificate signed with the CA's key),
//! persisted as one JSON document under one key of the store's `meta` table. A CA that is
//! replaced or removed closes the sessions it admitted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use twinhub_proto::certificate::{
    CertificateDescription, CertificateProperties, validate_certificate_name,
};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::AuthenticationType;
use twinhub_store::{Table, Write};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::directory::CloseReason;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::keys;
use crate::logsafe::Shown;
use crate::record::{DeviceRecord, if_match_value};
use crate::sessions::describe;

/// The `meta` key of the CA list.
const META_KEY: &str = "certificates";
/// IoT Hub's limit of CA certificates per hub.
pub const MAX_CERTIFICATES: usize = 25;
/// A PEM larger than this is not one certificate (or a short chain).
const MAX_PEM_BYTES: usize = 64 * 1024;

/// A CA as stored: what was given and what the hub decided about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCa {
    name: String,
    /// The PEM as given (its first certificate is the CA).
    certificate: String,
    etag: String,
    is_verified: bool,
    created: String,
    updated: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verification_code: Option<String>,
}

/// A stored CA with what is derived from its certificate.
#[derive(Debug)]
struct Ca {
    stored: StoredCa,
    der: Vec<u8>,
    subject: String,
    not_after: i64,
    thumbprint: String,
}

impl Ca {
    fn from_stored(stored: StoredCa) -> Result<Ca> {
        let der = first_certificate(&stored.certificate)?;
        let info = CertInfo::parse(&der)
            .map_err(|e| Error::invalid(format!("The certificate cannot be read: {e}")))?;
        Ok(Ca {
            thumbprint: sha1_hex(&der),
            subject: info.subject,
            not_after: info.not_after,
            der,
            stored,
        })
    }

    fn describe(&self, with_code: bool) -> CertificateDescription {
        CertificateDescription {
            name: self.stored.name.clone(),
            etag: self.stored.etag.clone(),
            properties: CertificateProperties {
                subject: self.subject.clone(),
                expiry: rfc1123(self.not_after),
                thumbprint: self.thumbprint.clone(),
                is_verified: self.stored.is_verified,
                created: self.stored.created.clone(),
                updated: self.stored.updated.clone(),
                certificate: self.stored.certificate.clone(),
                verification_code: if with_code {
                    self.stored.verification_code.clone()
                } else {
                    None
                },
            },
        }
    }
}

/// What the hub reads from a certificate.
struct CertInfo {
    subject: String,
    common_name: Option<String>,
    not_before: i64,
    not_after: i64,
    is_ca: bool,
}

impl CertInfo {
    fn parse(der: &[u8]) -> std::result::Result<CertInfo, String> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca,
        })
    }
}

/// The hub's CAs and the certificate sessions they admitted.
#[derive(Default)]
pub struct CertificateAuthorities {
    /// By lower-cased name (names compare without case, as Resource Manager's do).
    cas: RwLock<HashMap<String, Arc<Ca>>>,
    /// Serializes changes, so two writers never lose each other's update.
    write: tokio::sync::Mutex<()>,
    /// Identity key -> the lower-cased name of the CA its latest certificate sign-in chained
    /// to, so a CA's removal can close exactly the sessions it admitted.
    sessions: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for CertificateAuthorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthorities")
            .field("count", &self.snapshot().len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthorities {
    fn snapshot(&self) -> Vec<Arc<Ca>> {
        let mut all: Vec<_> = self
            .cas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.stored.name.cmp(&b.stored.name));
        all
    }

    fn get(&self, name: &str) -> Option<Arc<Ca>> {
        self.cas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    fn note_session(&self, key: &str, ca: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), ca.to_ascii_lowercase());
    }

    fn forget_session(&self, key: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    fn has_session(&self, key: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    /// Forgets the sessions of CA `name`; returns their identity keys.
    fn take_sessions(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<String> = map
            .iter()
            .filter(|(_, ca)| **ca == name)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            map.remove(k);
        }
        keys
    }

    /// The verified CA that `chain` (DER, leaf first) leads to, checked at `now`.
    fn verify_chain(&self, chain: &[Vec<u8>], now: i64, who: &str) -> Result<Arc<Ca>> {
        let cas = self.snapshot();
        if cas.is_empty() {
            return Err(Error::unauthorized(format!(
                "{who}: untrusted certificate: no CA certificate is registered in the hub"
            )));
        }
        let leaf = CertificateDer::from(chain[0].as_slice());
        let end = webpki::EndEntityCert::try_from(&leaf).map_err(|e| {
            Error::unauthorized(format!(
                "{who}: the client certificate cannot be read ({e:?})"
            ))
        })?;
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let time = UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64));
        let mut unverified = None;
        let mut failure = None;
        for ca in cas {
            let anchor_der = CertificateDer::from(ca.der.as_slice());
            let Ok(anchor) = webpki::anchor_from_trusted_cert(&anchor_der) else {
                continue;
            };
            let anchors = [anchor];
            let verified = end
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &anchors,
                    &intermediates,
                    time,
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map(|_| ());
            match verified {
                Ok(_) if !ca.stored.is_verified => unverified = Some(ca.stored.name.clone()),
                Ok(_) if ca.not_after < now => {
                    return Err(Error::unauthorized(format!(
                        "{who}: untrusted certificate: its CA '{}' expired on {}",
                        ca.stored.name,
                        rfc1123(ca.not_after)
                    )));
                }
                Ok(_) => return Ok(ca),
                Err(e) => failure = Some(e),
            }
        }
        Err(Error::unauthorized(match (unverified, failure) {
            (Some(name), _) => format!(
                "{who}: untrusted certificate: it chains to CA '{name}', which is not verified \
                 (proof of possession not done)"
            ),
            (None, Some(e)) => format!(
                "{who}: untrusted certificate: its chain does not lead to a verified CA \
                 registered in the hub ({})",
                chain_error(&e)
            ),
            (None, None) => {
                format!("{who}: untrusted certificate: no registered CA can be used")
            }
        }))
    }
}

/// webpki's verdict in words.
fn chain_error(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "unknown issuer".into(),
        webpki::Error::CertExpired { .. } => "a certificate of the chain expired".into(),
        webpki::Error::CertNotValidYet { .. } => {
            "a certificate of the chain is not valid yet".into()
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "the certificate is not for client authentication (extended key usage)".into()
        }
        other => format!("{other:?}"),
    }
}

/// The first certificate of a PEM text, as DER.
fn first_certificate(pem: &str) -> Result<Vec<u8>> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(Error::invalid(format!(
            "The certificate is too large (at most {MAX_PEM_BYTES} bytes of PEM)"
        )));
    }
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der.as_ref().to_vec()),
        Some(Err(e)) => Err(Error::invalid(format!(
            "The certificate is not valid PEM: {e}"
        ))),
        None => Err(Error::invalid(
            "The certificate holds no PEM 'CERTIFICATE' block",
        )),
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The SHA-1 thumbprint IoT Hub shows: upper-case hex of the SHA-1 over the DER.
pub fn sha1_hex(der: &[u8]) -> String {
    use sha1::Digest as _;
    hex_upper(&sha1::Sha1::digest(der))
}

/// The SHA-256 thumbprint: upper-case hex of the SHA-256 over the DER.
pub fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex_upper(&sha2::Sha256::digest(der))
}

/// Unix seconds as RFC 1123, the spelling of Resource Manager's certificate times.
fn rfc1123(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .unwrap_or_default()
}

fn now_rfc1123() -> String {
    rfc1123(keys::now_unix() as i64)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // Without randomness no key or token could be made either.
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    hex_upper(&b)
}

fn new_etag() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorCode::IotHubNotFound,
        format!("The certificate {} does not exist", Shown(name)),
    )
}

fn check_etag(if_match: Option<&str>, ca: &Ca) -> Result<()> {
    match if_match_value(if_match) {
        Some(expected) if expected != ca.stored.etag => {
            Err(Error::precondition_failed("certificate"))
        }
        _ => Ok(()),
    }
}

/// The leaf's validity period at `now`, in words when it does not hold.
fn check_validity(info: &CertInfo, now: i64, who: &str) -> Result<()> {
    if now > info.not_after {
        return Err(Error::unauthorized(format!(
            "{who}: the client certificate expired on {}",
            rfc1123(info.not_after)
        )));
    }
    if now < info.not_before {
        return Err(Error::unauthorized(format!(
            "{who}: the client certificate is not valid before {}",
            rfc1123(info.not_before)
        )));
    }
    Ok(())
}

/// Whether a CA-signed leaf's CN names the identity, as IoT Hub's documents say: the device id
/// for a device, `deviceId/moduleId` for a module (a bare module id would let one certificate
/// sign in as that module on every device).
fn common_name_matches(rec: &DeviceRecord, cn: &str) -> bool {
    cn == rec.key()
}

impl Hub {
    /// Checks `chain` (DER, leaf first) for `rec`; returns when the session must end (the
    /// leaf's notAfter, or the CA's if sooner; unix seconds). Every refusal says why.
    pub(crate) fn verify_client_certificate(
        &self,
        rec: &DeviceRecord,
        chain: &[Vec<u8>],
    ) -> Result<u64> {
        let key = rec.key();
        let who = describe(&key);
        let Some(leaf) = chain.first() else {
            return Err(Error::unauthorized(format!(
                "{who}: the client presented no certificate"
            )));
        };
        let info = CertInfo::parse(leaf).map_err(|e| {
            Error::unauthorized(format!("{who}: the client certificate cannot be read: {e}"))
        })?;
        let now = keys::now_unix() as i64;
        check_validity(&info, now, &who)?;
        match rec.auth.auth_type {
            AuthenticationType::SelfSigned => {
                let sha1 = sha1_hex(leaf);
                let sha256 = sha256_hex(leaf);
                let registered = [&rec.auth.primary_thumbprint, &rec.auth.secondary_thumbprint];
                let matched = registered
                    .iter()
                    .filter_map(|t| t.as_deref())
                    .any(|t| t.eq_ignore_ascii_case(&sha1) || t.eq_ignore_ascii_case(&sha256));
                if !matched {
                    return Err(Error::unauthorized(format!(
                        "{who}: thumbprint mismatch: the client certificate's SHA-1 {sha1} \
                         (SHA-256 {sha256}) is neither its primary nor its secondary thumbprint"
                    )));
                }
                Ok(info.not_after.max(0) as u64)
            }
            AuthenticationType::CertificateAuthority => {
                let ca = self.certificates.verify_chain(chain, now, &who)?;
                let cn = info.common_name.as_deref().unwrap_or("");
                if !common_name_matches(rec, cn) {
                    return Err(Error::unauthorized(format!(
                        "{who}: CN mismatch: the client certificate's subject CN is {}, not \
                         the identity's id",
                        Shown(cn)
                    )));
                }
                self.certificates.note_session(&key, &ca.stored.name);
                Ok(info.not_after.min(ca.not_after).max(0) as u64)
            }
            other => Err(Error::unauthorized(format!(
                "{who} uses {other:?} authentication, not a client certificate"
            ))),
        }
    }

    /// Called once a session of `rec` is registered: whether it may stay. A
    /// `certificateAuthority` session whose CA was removed (or replaced) since its check may
    /// not; any other session drops a stale note of a CA, so that CA's removal never closes it.
    pub(crate) fn certificate_session_admitted(&self, rec: &DeviceRecord) -> bool {
        let key = rec.key();
        if rec.auth.auth_type == AuthenticationType::CertificateAuthority {
            self.certificates.has_session(&key)
        } else {
            self.certificates.forget_session(&key);
            true
        }
    }

    /// Reads the CA list from the store (at open). A CA whose stored PEM no longer parses is
    /// skipped with a log line rather than keeping the hub from starting.
    pub(crate) async fn load_certificates(&self) -> Result<()> {
        let Some(bytes) = self.store.get(Table::Meta, META_KEY).await? else {
            return Ok(());
        };
        // Said at start, so the operator sees which record stops the hub.
        let stored: Vec<StoredCa> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                ErrorCode::ServerError,
                format!("the stored CA certificate list (meta '{META_KEY}') cannot be read: {e}"),
            )
        })?;
        let mut map = HashMap::new();
        for s in stored {
            let name = s.name.clone();
            match Ca::from_stored(s) {
                Ok(ca) => {
                    map.insert(name.to_ascii_lowercase(), Arc::new(ca));
                }
                Err(e) => tracing::error!(
                    name = %Shown(&name),
                    "a stored CA certificate cannot be read and is ignored: {}",
                    e.message()
                ),
            }
        }
        *self
            .certificates
            .cas
            .write()
            .unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    /// Commits `next` as the CA list and puts it in force.
    async fn save_certificates(&self, next: HashMap<String, Arc<Ca>>) -> Result<()> {
        let mut list: Vec<&StoredCa> = next.values().map(|c| &c.stored).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = serde_json::to_vec(&list).map_err(|_| Error::internal())?;
        self.store
            .commit(vec![Write::put(Table::Meta, META_KEY, bytes)])
            .await?;
        *self
            .certificates
            .cas
            .write()
            .unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn current_certificates(&self) -> HashMap<String, Arc<Ca>> {
        self.certificates
            .cas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes the certificate sessions CA `name` admitted (it was replaced or removed).
    fn close_ca_sessions(&self, name: &str) {
        for key in self.certificates.take_sessions(name) {
            tracing::info!(
                identity = %Shown(&key),
                ca = %Shown(name),
                "closing a session admitted by a CA certificate that was replaced or removed"
            );
            self.close_device_session(&key, CloseReason::DeviceDisabled);
        }
    }

    /// Every registered CA, by name.
    pub fn list_certificates(&self) -> Vec<CertificateDescription> {
        self.certificates
            .snapshot()
            .iter()
            .map(|c| c.describe(false))
            .collect()
    }

    /// One CA, or IotHubNotFound.
    pub fn get_certificate(&self, name: &str) -> Result<CertificateDescription> {
        self.certificates
            .get(name)
            .map(|c| c.describe(false))
            .ok_or_else(|| not_found(name))
    }

    /// Adds CA `name` (`if_match` absent) or replaces its certificate (`if_match` its etag or
    /// `*`). The PEM's first certificate must be a CA certificate that has not expired.
    /// `verified` marks it verified without proof of possession (Resource Manager's
    /// `isVerified: true` on upload); otherwise a new or replaced certificate is unverified. A
    /// replaced certificate closes the sessions the old one admitted.
    pub async fn put_certificate(
        &self,
        name: &str,
        pem: &str,
        verified: bool,
        if_match: Option<&str>,
    ) -> Result<CertificateDescription> {
        validate_certificate_name(name).map_err(Error::invalid)?;
        let der = first_certificate(pem)?;
        let info = CertInfo::parse(&der)
            .map_err(|e| Error::invalid(format!("The certificate cannot be read: {e}")))?;
        if !info.is_ca {
            return Err(Error::invalid(format!(
                "The certificate '{}' is not a CA certificate (basic constraints CA:TRUE)",
                Shown(&info.subject)
            )));
        }
        if info.not_after < keys::now_unix() as i64 {
            return Err(Error::invalid(format!(
                "The certificate expired on {}",
                rfc1123(info.not_after)
            )));
        }
        let _guard = self.certificates.write.lock().await;
        let mut next = self.current_certificates();
        let lower = name.to_ascii_lowercase();
        let now = now_rfc1123();
        let replaced = match (next.get(&lower), if_match.is_some()) {
            (None, true) => return Err(not_found(name)),
            (Some(_), false) => {
                return Err(Error::new(
                    ErrorCode::PreconditionFailed,
                    format!(
                        "The certificate {} exists; give its etag in If-Match to replace it",
                        Shown(name)
                    ),
                ));
            }
            (Some(old), true) => {
                check_etag(if_match, old)?;
                Some(old.stored.created.clone())
            }
            (None, false) => {
                if next.len() >= MAX_CERTIFICATES {
                    return Err(Error::new(
                        ErrorCode::InvalidOperation,
                        format!("A hub holds at most {MAX_CERTIFICATES} CA certificates"),
                    ));
                }
                None
            }
        };
        let stored = StoredCa {
            name: next
                .get(&lower)
                .map_or_else(|| name.to_owned(), |c| c.stored.name.clone()),
            certificate: pem.trim().to_owned() + "\n",
            etag: new_etag(),
            is_verified: verified,
            created: replaced.clone().unwrap_or_else(|| now.clone()),
            updated: now,
            verification_code: None,
        };
        let ca = Arc::new(Ca::from_stored(stored)?);
        let description = ca.describe(false);
        next.insert(lower, ca);
        self.save_certificates(next).await?;
        if replaced.is_some() {
            self.close_ca_sessions(name);
        }
        Ok(description)
    }

    /// Removes CA `name` and closes the sessions it admitted.
    pub async fn delete_certificate(&self, name: &str, if_match: Option<&str>) -> Result<()> {
        let _guard = self.certificates.write.lock().await;
        let mut next = self.current_certificates();
        let lower = name.to_ascii_lowercase();
        let ca = next.get(&lower).ok_or_else(|| not_found(name))?;
        check_etag(if_match, ca)?;
        next.remove(&lower);
        self.save_certificates(next).await?;
        self.close_ca_sessions(name);
        Ok(())
    }

    /// Makes a new verification code for CA `name` (replacing any earlier one); the answer
    /// carries it in `properties.verificationCode`.
    pub async fn generate_verification_code(
        &self,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<CertificateDescription> {
        let _guard = self.certificates.write.lock().await;
        let mut next = self.current_certificates();
        let lower = name.to_ascii_lowercase();
        let old = next.get(&lower).ok_or_else(|| not_found(name))?;
        check_etag(if_match, old)?;
        let mut stored = old.stored.clone();
        stored.verification_code = Some(random_hex(20));
        stored.etag = new_etag();
        stored.updated = now_rfc1123();
        let ca = Arc::new(Ca::from_stored(stored)?);
        let description = ca.describe(true);
        next.insert(lower, ca);
        self.save_certificates(next).await?;
        Ok(description)
    }

    /// Proof of possession: `pem` must be a certificate whose subject CN is CA `name`'s current
    /// verification code, signed with the CA's key, and within its validity period. The CA is
    /// verified from then on (and admits devices).
    pub async fn verify_certificate(
        &self,
        name: &str,
        pem: &str,
        if_match: Option<&str>,
    ) -> Result<CertificateDescription> {
        let der = first_certificate(pem)?;
        let _guard = self.certificates.write.lock().await;
        let mut next = self.current_certificates();
        let lower = name.to_ascii_lowercase();
        let old = next.get(&lower).ok_or_else(|| not_found(name))?;
        check_etag(if_match, old)?;
        let Some(code) = old.stored.verification_code.clone() else {
            return Err(Error::new(
                ErrorCode::InvalidOperation,
                format!(
                    "The certificate {} has no verification code; generate one first",
                    Shown(name)
                ),
            ));
        };
        let (_, proof) = X509Certificate::from_der(&der)
            .map_err(|e| Error::invalid(format!("The certificate cannot be read: {e}")))?;
        let cn = proof
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or("");
        if !cn.eq_ignore_ascii_case(&code) {
            return Err(Error::invalid(format!(
                "The verification certificate's subject CN is '{}', not the verification code",
                Shown(cn)
            )));
        }
        let now = keys::now_unix() as i64;
        let validity = proof.validity();
        if now > validity.not_after.timestamp() || now < validity.not_before.timestamp() {
            return Err(Error::invalid(
                "The verification certificate is outside its validity period",
            ));
        }
        let (_, ca_cert) = X509Certificate::from_der(&old.der).map_err(|_| Error::internal())?;
        if proof.verify_signature(Some(ca_cert.public_key())).is_err() {
            return Err(Error::invalid(format!(
                "The verification certificate is not signed with the key of the certificate {}",
                Shown(name)
            )));
        }
        let mut stored = old.stored.clone();
        stored.is_verified = true;
        stored.verification_code = None;
        stored.etag = new_etag();
        stored.updated = now_rfc1123();
        let ca = Arc::new(Ca::from_stored(stored)?);
        let description = ca.describe(false);
        next.insert(lower, ca);
        self.save_certificates(next).await?;
        Ok(description)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(device: &str, module: Option<&str>) -> DeviceRecord {
        let spec = crate::registry::DeviceSpec {
            authentication: Some(twinhub_proto::model::AuthenticationMechanism {
                symmetric_key: None,
                x509_thumbprint: None,
                auth_type: AuthenticationType::CertificateAuthority,
            }),
            ..Default::default()
        };
        let mut rec = crate::registry::new_record(device, &spec, "").unwrap();
        rec.module_id = module.map(str::to_owned);
        rec
    }

    #[test]
    fn a_ca_signed_leaf_names_its_identity_in_the_cn() {
        let device = record("d1", None);
        assert!(common_name_matches(&device, "d1"));
        assert!(!common_name_matches(&device, "D1"));
        assert!(!common_name_matches(&device, "d2"));
        let module = record("d1", Some("m1"));
        assert!(!common_name_matches(&module, "m1"));
        assert!(common_name_matches(&module, "d1/m1"));
        assert!(!common_name_matches(&module, "d1"));
        assert!(!common_name_matches(&module, "d2/m1"));
    }

    #[test]
    fn sessions_are_noted_per_identity_and_taken_per_ca() {
        let cas = CertificateAuthorities::default();
        cas.note_session("d1", "Root");
        cas.note_session("d2", "other");
        cas.note_session("d3", "root");
        let mut taken = cas.take_sessions("ROOT");
        taken.sort();
        assert_eq!(taken, ["d1", "d3"]);
        assert!(cas.has_session("d2"));
        assert!(!cas.has_session("d1"));
    }

    #[test]
    fn thumbprints_are_upper_hex() {
        assert_eq!(sha1_hex(b"abc"), "A9993E364706816ABA3E25717850C26C9CD0D89D");
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }

    #[test]
    fn rfc1123_spells_times_as_resource_manager() {
        assert_eq!(rfc1123(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn pem_errors_are_invalid_arguments() {
        let e = first_certificate("hello").unwrap_err();
        assert_eq!(e.code(), ErrorCode::ArgumentInvalid);
        let big = "x".repeat(MAX_PEM_BYTES + 1);
        assert_eq!(
            first_certificate(&big).unwrap_err().code(),
            ErrorCode::ArgumentInvalid
        );
    }
}

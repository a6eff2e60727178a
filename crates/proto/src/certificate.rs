//! The X.509 CA certificates a hub trusts for `certificateAuthority` devices, as IoT Hub's
//! certificate API spells them (`CertificateDescription`, `CertificateWithNonceDescription`,
//! `CertificateVerificationDescription`): twinhub serves them under `/twinhub/certificates`
//! because IoT Hub manages them through Azure Resource Manager, not the hub's own REST API.

use serde::{Deserialize, Serialize};

/// One registered CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateDescription {
    pub name: String,
    pub etag: String,
    pub properties: CertificateProperties,
}

/// What the hub knows about a CA certificate. Times are RFC 1123 (`Thu, 03 Dec 2026 19:20:53
/// GMT`), as Resource Manager writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateProperties {
    /// The certificate's subject, e.g. `CN=My CA, O=Contoso`.
    pub subject: String,
    /// notAfter.
    pub expiry: String,
    /// SHA-1 of the DER, upper-case hex.
    pub thumbprint: String,
    /// Proof of possession done: only verified CAs admit devices.
    pub is_verified: bool,
    pub created: String,
    pub updated: String,
    /// The PEM.
    pub certificate: String,
    /// The code to put in a verification certificate's CN; only in the answer of
    /// `generateVerificationCode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
}

/// The body of `verify`, and the short form of a certificate PUT: a PEM certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateBody {
    pub certificate: String,
}

/// A certificate PUT as Resource Manager takes it: `{"properties": {"certificate": PEM,
/// "isVerified": bool}}` (`isVerified: true` skips proof of possession), or the short form
/// `{"certificate": PEM}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CertificatePut {
    Properties {
        properties: CertificateBodyProperties,
    },
    Short(CertificateBody),
}

/// The writable properties of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateBodyProperties {
    pub certificate: String,
    #[serde(default)]
    pub is_verified: bool,
}

impl CertificatePut {
    /// The PEM and whether the certificate is to be taken as verified.
    pub fn into_parts(self) -> (String, bool) {
        match self {
            CertificatePut::Properties { properties } => {
                (properties.certificate, properties.is_verified)
            }
            CertificatePut::Short(b) => (b.certificate, false),
        }
    }
}

/// The certificate list, as Resource Manager answers it: `{"value": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CertificateList {
    pub value: Vec<CertificateDescription>,
}

/// Certificate names: 1 to 64 of letters, digits, `-`, `.` and `_` (Resource Manager's rule).
pub fn validate_certificate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "The certificate name '{}' is not valid: use 1 to 64 letters, digits, '-', '.' or '_'",
            name.escape_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_resource_manager_rules() {
        assert!(validate_certificate_name("my-CA_1.root").is_ok());
        assert!(validate_certificate_name("").is_err());
        assert!(validate_certificate_name("a/b").is_err());
        assert!(validate_certificate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn a_put_body_takes_both_forms() {
        let short: CertificatePut = serde_json::from_str(r#"{"certificate":"P"}"#).unwrap();
        assert_eq!(short.into_parts(), ("P".to_owned(), false));
        let arm: CertificatePut =
            serde_json::from_str(r#"{"properties":{"certificate":"P","isVerified":true}}"#)
                .unwrap();
        assert_eq!(arm.into_parts(), ("P".to_owned(), true));
        assert!(serde_json::from_str::<CertificatePut>(r#"{"cert":"P"}"#).is_err());
    }

    #[test]
    fn the_code_appears_only_when_set() {
        let d = CertificateDescription {
            name: "ca".into(),
            etag: "e".into(),
            properties: CertificateProperties {
                subject: "CN=ca".into(),
                expiry: "x".into(),
                thumbprint: "AB".into(),
                is_verified: false,
                created: "c".into(),
                updated: "u".into(),
                certificate: "pem".into(),
                verification_code: None,
            },
        };
        let v = serde_json::to_value(&d).unwrap();
        assert!(v["properties"].get("verificationCode").is_none());
        assert_eq!(v["properties"]["isVerified"], false);
    }
}

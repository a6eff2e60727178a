//! The hub's X.509 CA certificates through twinhub's REST API (`/twinhub/certificates`): add,
//! list, show, replace, remove, and IoT Hub's proof of possession (generate a verification code,
//! verify with a certificate whose CN is the code, signed with the CA's key). IoT Hub manages
//! CAs through Azure Resource Manager instead, so these calls work against twinhub only. Also
//! the registry calls that create X.509 devices (`selfSigned` by thumbprint,
//! `certificateAuthority`). Reading needs RegistryRead, changing RegistryWrite. The `twinhub`
//! CLI's `ca` commands are built on them.

use reqwest::{Method, StatusCode};
use twinhub_proto::certificate::{CertificateBody, CertificateDescription, CertificateList};
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, Device, DeviceStatus, X509Thumbprint,
};

use crate::error::Result;
use crate::service::{ServiceClient, segment};

const BASE: &str = "/twinhub/certificates";

impl ServiceClient {
    /// Every registered CA certificate.
    pub async fn list_certificates(&self) -> Result<Vec<CertificateDescription>> {
        let list: CertificateList = self
            .call(Method::GET, BASE, &[], &[], None, StatusCode::OK)
            .await?;
        Ok(list.value)
    }

    pub async fn get_certificate(&self, name: &str) -> Result<CertificateDescription> {
        let path = format!("{BASE}/{}", segment(name));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Registers CA certificate `pem` (PEM) as `name`; it admits devices once verified.
    pub async fn add_certificate(&self, name: &str, pem: &str) -> Result<CertificateDescription> {
        self.put_certificate(name, pem, Vec::new()).await
    }

    /// Replaces CA `name`'s certificate (unverified again). `etag` `None` replaces whatever is
    /// there.
    pub async fn replace_certificate(
        &self,
        name: &str,
        pem: &str,
        etag: Option<&str>,
    ) -> Result<CertificateDescription> {
        self.put_certificate(name, pem, Self::if_match(etag)).await
    }

    /// `PUT /twinhub/certificates/{name}`: without `If-Match` it creates, with one it replaces.
    async fn put_certificate(
        &self,
        name: &str,
        pem: &str,
        if_match: Vec<(&'static str, String)>,
    ) -> Result<CertificateDescription> {
        let path = format!("{BASE}/{}", segment(name));
        let body = CertificateBody {
            certificate: pem.to_owned(),
        };
        self.call(
            Method::PUT,
            &path,
            &[],
            &if_match,
            Self::json(&body),
            StatusCode::OK,
        )
        .await
    }

    /// Removes CA `name`; the sessions it admitted are closed.
    pub async fn delete_certificate(&self, name: &str, etag: Option<&str>) -> Result<()> {
        let path = format!("{BASE}/{}", segment(name));
        self.send(Method::DELETE, &path, &[], &Self::if_match(etag), None)
            .await?;
        Ok(())
    }

    /// A new verification code for CA `name`, in `properties.verification_code`: the CN of the
    /// certificate to sign with the CA's key for [`ServiceClient::verify_certificate`].
    pub async fn generate_verification_code(
        &self,
        name: &str,
        etag: Option<&str>,
    ) -> Result<CertificateDescription> {
        let path = format!("{BASE}/{}/generateVerificationCode", segment(name));
        self.call(
            Method::POST,
            &path,
            &[],
            &Self::if_match(etag),
            None,
            StatusCode::OK,
        )
        .await
    }

    /// Proof of possession: `pem` is a certificate whose CN is the verification code, signed
    /// with CA `name`'s key. The CA is verified afterwards.
    pub async fn verify_certificate(
        &self,
        name: &str,
        pem: &str,
        etag: Option<&str>,
    ) -> Result<CertificateDescription> {
        let path = format!("{BASE}/{}/verify", segment(name));
        let body = CertificateBody {
            certificate: pem.to_owned(),
        };
        self.call(
            Method::POST,
            &path,
            &[],
            &Self::if_match(etag),
            Self::json(&body),
            StatusCode::OK,
        )
        .await
    }

    /// Registers a device that signs in with a self-signed (or any) certificate whose SHA-1 or
    /// SHA-256 thumbprint is `primary` or `secondary` (hex).
    pub async fn create_x509_device(
        &self,
        device_id: &str,
        primary: &str,
        secondary: Option<&str>,
    ) -> Result<Device> {
        let auth = AuthenticationMechanism {
            symmetric_key: None,
            x509_thumbprint: Some(X509Thumbprint {
                primary_thumbprint: Some(primary.to_owned()),
                secondary_thumbprint: secondary.map(str::to_owned),
            }),
            auth_type: AuthenticationType::SelfSigned,
        };
        self.create_device_with(device_id, auth).await
    }

    /// Registers a device that signs in with a certificate chaining to a verified CA of the
    /// hub, its subject CN the device id.
    pub async fn create_ca_device(&self, device_id: &str) -> Result<Device> {
        let auth = AuthenticationMechanism {
            symmetric_key: None,
            x509_thumbprint: None,
            auth_type: AuthenticationType::CertificateAuthority,
        };
        self.create_device_with(device_id, auth).await
    }

    async fn create_device_with(
        &self,
        device_id: &str,
        auth: AuthenticationMechanism,
    ) -> Result<Device> {
        let device = Device {
            device_id: device_id.to_string(),
            status: DeviceStatus::Enabled,
            authentication: Some(auth),
            ..Default::default()
        };
        self.register_device(&device).await
    }
}

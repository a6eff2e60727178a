//! Module identities from the service side: the registry's module calls
//! (`/devices/{d}/modules[/{m}]`), module twins (`/twins/{d}/modules/{m}`) and module direct
//! methods, with the same requests, etags and errors as the device calls in `service`.

use reqwest::{Method, StatusCode};
use serde_json::Value;
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, CloudToDeviceMethod, CloudToDeviceMethodResult,
    Module, SymmetricKey, Twin,
};

use crate::error::{Error, Result};
use crate::service::{ServiceClient, segment};

/// What to create a module with; defaults to a SAS module with hub-generated keys.
#[derive(Debug, Clone, Default)]
pub struct NewModule {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    /// Who manages the module (IoT Edge sets `IotEdge`); informational.
    pub managed_by: Option<String>,
    /// Used as is when set (X.509 thumbprints, `certificateAuthority`); the keys above are
    /// then ignored.
    pub authentication: Option<AuthenticationMechanism>,
}

fn module_path(device_id: &str, module_id: &str) -> String {
    format!(
        "/devices/{}/modules/{}",
        segment(device_id),
        segment(module_id)
    )
}

fn module_twin_path(device_id: &str, module_id: &str) -> String {
    format!(
        "/twins/{}/modules/{}",
        segment(device_id),
        segment(module_id)
    )
}

/// Module identities, module twins and module direct methods.
impl ServiceClient {
    /// Registers module `module_id` on device `device_id`. The device must exist (404
    /// `DeviceNotFound`); a module that exists already is 409 `ModuleAlreadyExistsOnDevice`.
    pub async fn create_module(
        &self,
        device_id: &str,
        module_id: &str,
        new: NewModule,
    ) -> Result<Module> {
        let authentication = new.authentication.unwrap_or(AuthenticationMechanism {
            symmetric_key: Some(SymmetricKey {
                primary_key: new.primary_key,
                secondary_key: new.secondary_key,
            }),
            x509_thumbprint: None,
            auth_type: AuthenticationType::Sas,
        });
        let module = Module {
            module_id: module_id.to_owned(),
            device_id: device_id.to_owned(),
            managed_by: new.managed_by,
            authentication: Some(authentication),
            ..Module::default()
        };
        // No If-Match: IoT Hub creates, and refuses to overwrite, a module PUT without one.
        self.call(
            Method::PUT,
            &module_path(device_id, module_id),
            &[],
            &[],
            Self::json(&module),
            StatusCode::OK,
        )
        .await
    }

    /// 404 `ModuleNotFound` when the module (or its device) is not registered.
    pub async fn get_module(&self, device_id: &str, module_id: &str) -> Result<Module> {
        self.call(
            Method::GET,
            &module_path(device_id, module_id),
            &[],
            &[],
            None,
            StatusCode::OK,
        )
        .await
    }

    /// Every module of the device, in id order (404 `DeviceNotFound` for an unknown device).
    pub async fn list_modules(&self, device_id: &str) -> Result<Vec<Module>> {
        let path = format!("/devices/{}/modules", segment(device_id));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Updates a module's credentials and `managedBy`. `etag` `None` updates
    /// unconditionally (`If-Match: *`); a stale one is 412 `PreconditionFailed`.
    pub async fn update_module(&self, module: &Module, etag: Option<&str>) -> Result<Module> {
        if module.device_id.is_empty() || module.module_id.is_empty() {
            return Err(Error::InvalidArgument(
                "the module needs its deviceId and moduleId".into(),
            ));
        }
        self.call(
            Method::PUT,
            &module_path(&module.device_id, &module.module_id),
            &[],
            &Self::if_match(etag),
            Self::json(module),
            StatusCode::OK,
        )
        .await
    }

    /// Deletes a module and ends its session. `etag` `None` deletes unconditionally.
    pub async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        etag: Option<&str>,
    ) -> Result<()> {
        let resp = self
            .send(
                Method::DELETE,
                &module_path(device_id, module_id),
                &[],
                &Self::if_match(etag),
                None,
            )
            .await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(Error::Protocol(format!(
                "expected 204, got {}",
                resp.status()
            )));
        }
        Ok(())
    }

    /// The module's twin (with `moduleId` set).
    pub async fn get_module_twin(&self, device_id: &str, module_id: &str) -> Result<Twin> {
        self.call(
            Method::GET,
            &module_twin_path(device_id, module_id),
            &[],
            &[],
            None,
            StatusCode::OK,
        )
        .await
    }

    /// Merges `patch` (`{"tags": .., "properties": {"desired": ..}}`; `null` deletes) into
    /// the module twin.
    pub async fn update_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        patch: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        self.write_module_twin(Method::PATCH, device_id, module_id, patch, etag)
            .await
    }

    /// Replaces the module twin's tags and desired properties.
    pub async fn replace_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        twin: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        self.write_module_twin(Method::PUT, device_id, module_id, twin, etag)
            .await
    }

    async fn write_module_twin(
        &self,
        method: Method,
        device_id: &str,
        module_id: &str,
        body: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        self.call(
            method,
            &module_twin_path(device_id, module_id),
            &[],
            &Self::if_match(etag),
            Self::json(body),
            StatusCode::OK,
        )
        .await
    }

    /// Invokes a direct method on a module and returns its status and payload. Only the
    /// module's own session receives it, never the device's.
    pub async fn invoke_module_method(
        &self,
        device_id: &str,
        module_id: &str,
        method: &CloudToDeviceMethod,
    ) -> Result<CloudToDeviceMethodResult> {
        let path = format!("{}/methods", module_twin_path(device_id, module_id));
        self.call(
            Method::POST,
            &path,
            &[],
            &[],
            Self::json(method),
            StatusCode::OK,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_encode_both_ids() {
        assert_eq!(module_path("d 1", "m/x"), "/devices/d%201/modules/m%2Fx");
        assert_eq!(module_twin_path("d", "m"), "/twins/d/modules/m");
    }
}

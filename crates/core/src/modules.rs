//! Module identities: identities under a device, each with its own credentials and twin
//! (IoT Edge modules, multi-process devices). A module's record is a `DeviceRecord` with
//! `module_id` set, kept in the store's `modules` table under `deviceId/moduleId`; twins,
//! methods, sessions and locks reach it by that identity key, like a device by its id.
//! Deleting a device deletes its modules in the same commit (`registry`).

use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{DeviceStatus, Module};
use twinhub_store::{Table, Write};

use crate::directory::CloseReason;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::hub_events::{HubEvent, Lifecycle};
use crate::keys;
use crate::record::{DeviceRecord, identity_key};
use crate::registry::{DeviceSpec, check_etag, new_record, update_record, validate_device_id};

/// Most modules one device may have (IoT Hub's limit, TooManyModulesOnDevice past it).
pub const MAX_MODULES_PER_DEVICE: usize = 50;

pub fn validate_module_id(id: &str) -> Result<()> {
    twinhub_proto::ids::validate_module_id(id).map_err(|e| Error::invalid(e.to_string()))
}

/// Checks both ids and returns the module's identity key.
pub fn module_key(device_id: &str, module_id: &str) -> Result<String> {
    validate_device_id(device_id)?;
    validate_module_id(module_id)?;
    Ok(identity_key(device_id, Some(module_id)))
}

/// The writes that delete a module with its session state.
pub(crate) fn module_deletion_writes(rec: &DeviceRecord) -> [Write; 2] {
    let key = rec.key();
    [
        Write::delete(Table::Modules, key.clone()),
        Write::delete(Table::Sessions, key),
    ]
}

fn spec_of(body: &Module) -> DeviceSpec {
    DeviceSpec {
        // Modules have no status of their own: a module follows its device's.
        status: Some(DeviceStatus::Enabled),
        authentication: body.authentication.clone(),
        ..DeviceSpec::default()
    }
}

impl Hub {
    /// Every module of `device_id`, in id order.
    pub(crate) async fn module_records(&self, device_id: &str) -> Result<Vec<DeviceRecord>> {
        let prefix = format!("{device_id}/");
        let mut after = prefix.clone();
        let mut out = Vec::new();
        loop {
            let page = self.store.scan(Table::Modules, Some(&after), 256).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            let full = page.len() == 256;
            for (key, bytes) in page {
                if !key.starts_with(&prefix) {
                    return Ok(out);
                }
                out.push(DeviceRecord::decode(&bytes)?);
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// Ends the sessions of a device's modules: a module of a disabled device may not stay
    /// connected, as it may not connect (`Hub::connect_device`). Runs after the device's
    /// commit, so a failed read of the module list is logged, not returned.
    pub(crate) async fn close_module_sessions(&self, device_id: &str) {
        match self.module_records(device_id).await {
            Ok(records) => {
                for rec in records {
                    self.close_session_everywhere(&rec.key()).await;
                }
            }
            Err(e) => tracing::warn!(
                device_id = %crate::logsafe::Shown(device_id),
                error = %e.message(),
                "could not list a disabled device's modules to close their sessions"
            ),
        }
    }

    /// After a module's record is gone: its session ends and its memory goes; the lifecycle
    /// event to emit, if routes want one.
    pub(crate) fn forget_module(&self, rec: &DeviceRecord, now: &str) -> Option<HubEvent> {
        let key = rec.key();
        self.close_device_session(&key, CloseReason::DeviceDisabled);
        self.redelivery.forget(&key);
        self.lifecycle_event(rec, now, Lifecycle::Deleted)
    }

    /// `PUT /devices/{d}/modules/{m}`: creates the module when `if_match` is absent (409301
    /// if it exists), updates its credentials and `managedBy` otherwise (404010 if missing,
    /// 412 on a stale etag). The device must exist.
    pub async fn put_module(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Module,
        if_match: Option<&str>,
    ) -> Result<Module> {
        let key = module_key(device_id, module_id)?;
        if !body.device_id.is_empty() && body.device_id != device_id {
            return Err(Error::invalid(format!(
                "The deviceId in the body ('{}') does not match the path ('{device_id}')",
                body.device_id
            )));
        }
        if !body.module_id.is_empty() && body.module_id != module_id {
            return Err(Error::invalid(format!(
                "The moduleId in the body ('{}') does not match the path ('{module_id}')",
                body.module_id
            )));
        }
        let spec = spec_of(body);
        let now = keys::now_text();
        // The device's lock first, then the module's: a device being deleted cannot leave
        // a module behind, and twin writes (module lock only) cannot interleave.
        let device_guard = self.locks.lock(device_id).await;
        if self.load(device_id).await?.is_none() {
            return Err(Error::device_not_found(device_id));
        }
        let guard = self.locks.lock(&key).await;
        let mut attempt = 0;
        let (record, event) = loop {
            let result: Result<_> = async {
        let existing = self.load(&key).await?;
        let mut event = None;
        let record = match (existing, if_match.is_some()) {
            (None, false) => {
                if self.module_records(device_id).await?.len() >= MAX_MODULES_PER_DEVICE {
                    return Err(Error::new(
                        ErrorCode::TooManyModulesOnDevice,
                        format!(
                            "Device '{device_id}' already has {MAX_MODULES_PER_DEVICE} modules"
                        ),
                    ));
                }
                let mut rec = new_record(device_id, &spec, &now)?;
                rec.module_id = Some(module_id.to_string());
                rec.managed_by = body.managed_by.clone().filter(|m| !m.is_empty());
                self.save(&rec).await?;
                event = self.lifecycle_event(&rec, &now, crate::hub_events::Lifecycle::Created);
                rec
            }
            (None, true) => return Err(Error::module_not_found(device_id, module_id)),
            (Some(_), false) => {
                return Err(Error::new(
                    ErrorCode::ModuleAlreadyExistsOnDevice,
                    format!(
                        "A module with ID '{module_id}' already exists on device '{device_id}'"
                    ),
                ));
            }
            (Some(mut rec), true) => {
                check_etag(if_match, &rec.device_etag(), "module")?;
                let close = update_record(&mut rec, &spec, &now)?;
                rec.managed_by = body.managed_by.clone().filter(|m| !m.is_empty());
                self.save(&rec).await?;
                if close {
                    self.close_session_everywhere(&key).await;
                }
                rec
            }
        };
        Ok((record, event))
            }
            .await;
            match result {
                Err(e) if self.retry_after(&e, &mut attempt) => continue,
                other => break other?,
            }
        };
        let module = self.render_module(&record);
        drop(guard);
        drop(device_guard);
        self.emit(event).await;
        Ok(module)
    }

    /// The Module document, with the live connection state.
    pub(crate) fn render_module(&self, rec: &DeviceRecord) -> Module {
        rec.to_module(self.connected_anywhere(&rec.key(), rec.node.as_deref()))
    }

    /// `GET /devices/{d}/modules/{m}`.
    pub async fn get_module(&self, device_id: &str, module_id: &str) -> Result<Module> {
        let key = module_key(device_id, module_id)?;
        let rec = self.load_existing(&key).await?;
        Ok(self.render_module(&rec))
    }

    /// `GET /devices/{d}/modules`: every module of the device (404 if the device is missing).
    pub async fn list_modules(&self, device_id: &str) -> Result<Vec<Module>> {
        validate_device_id(device_id)?;
        if self.load(device_id).await?.is_none() {
            return Err(Error::device_not_found(device_id));
        }
        Ok(self
            .module_records(device_id)
            .await?
            .iter()
            .map(|r| self.render_module(r))
            .collect())
    }

    /// `DELETE /devices/{d}/modules/{m}`.
    pub async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let key = module_key(device_id, module_id)?;
        let device_guard = self.locks.lock(device_id).await;
        let guard = self.locks.lock(&key).await;
        let rec = self.load_existing(&key).await?;
        check_etag(if_match, &rec.device_etag(), "module")?;
        self.store
            .commit(module_deletion_writes(&rec).to_vec())
            .await?;
        let event = self.forget_module(&rec, &keys::now_text());
        drop(guard);
        drop(device_guard);
        self.emit(event).await;
        Ok(())
    }
}

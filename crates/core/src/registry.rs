//! The identity registry: create, read, update and delete devices one at a time or in bulk,
//! and the registry and service statistics. Credentials are validated here, keys generated
//! when a caller gives none.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use serde_json::{Map, Value};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, BulkRegistryOperationResult, Device,
    DeviceRegistryOperationError, DeviceStatus, ExportImportDevice, ImportMode, RegistryStatistics,
    ServiceStatistics,
};
use twinhub_store::{Table, Write};

use crate::directory::CloseReason;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::hub_events::Lifecycle;
use crate::keys;
use crate::modules::module_deletion_writes;
use crate::record::{DeviceRecord, StoredAuth, TwinState, if_match_value};
use crate::twin_doc::{self, Section, SectionKind};

/// IoT Hub's cap on devices in one bulk registry call.
pub const BULK_LIMIT: usize = 100;
/// IoT Hub's cap on `GET /devices?top=`.
pub const LIST_LIMIT: usize = 1000;
/// Longest `statusReason` kept (IoT Hub: 128 characters).
pub const MAX_STATUS_REASON: usize = 128;
/// Longest `deviceScope` or parent scope.
pub const MAX_SCOPE: usize = 256;
/// Most parent scopes (an IoT Edge child has one parent).
pub const MAX_PARENT_SCOPES: usize = 8;

/// The identity fields a caller may set on create or update.
#[derive(Debug, Clone, Default)]
pub struct DeviceSpec {
    pub status: Option<DeviceStatus>,
    pub status_reason: Option<String>,
    pub authentication: Option<AuthenticationMechanism>,
    pub iot_edge: bool,
    pub device_scope: Option<String>,
    pub parent_scopes: Vec<String>,
}

impl From<&Device> for DeviceSpec {
    fn from(d: &Device) -> Self {
        DeviceSpec {
            status: Some(d.status),
            status_reason: d.status_reason.clone(),
            authentication: d.authentication.clone(),
            iot_edge: d.capabilities.as_ref().is_some_and(|c| c.iot_edge),
            device_scope: d.device_scope.clone(),
            parent_scopes: d.parent_scopes.clone().unwrap_or_default(),
        }
    }
}

impl From<&ExportImportDevice> for DeviceSpec {
    fn from(d: &ExportImportDevice) -> Self {
        DeviceSpec {
            status: d.status,
            status_reason: d.status_reason.clone(),
            authentication: d.authentication.clone(),
            iot_edge: d.capabilities.as_ref().is_some_and(|c| c.iot_edge),
            device_scope: d.device_scope.clone(),
            parent_scopes: d.parent_scopes.clone().unwrap_or_default(),
        }
    }
}

/// Bounds the free-text identity fields, so a registry page stays a sensible size.
fn validate_spec(spec: &DeviceSpec) -> Result<()> {
    if let Some(reason) = &spec.status_reason
        && reason.chars().count() > MAX_STATUS_REASON
    {
        return Err(Error::invalid(format!(
            "statusReason must be at most {MAX_STATUS_REASON} characters"
        )));
    }
    let scopes = spec.device_scope.iter().chain(&spec.parent_scopes);
    if scopes.clone().any(|s| s.len() > MAX_SCOPE) {
        return Err(Error::invalid(format!(
            "deviceScope and parentScopes entries must be at most {MAX_SCOPE} characters"
        )));
    }
    if spec.parent_scopes.len() > MAX_PARENT_SCOPES {
        return Err(Error::invalid(format!(
            "at most {MAX_PARENT_SCOPES} parentScopes"
        )));
    }
    Ok(())
}

pub fn validate_device_id(id: &str) -> Result<()> {
    twinhub_proto::ids::validate_device_id(id).map_err(|e| Error::invalid(e.to_string()))
}

fn validate_key(key: &str, which: &str) -> Result<()> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| Error::invalid(format!("The {which} key is not valid base64")))?;
    if !(16..=64).contains(&raw.len()) {
        return Err(Error::invalid(format!(
            "The {which} key must decode to between 16 and 64 bytes"
        )));
    }
    Ok(())
}

fn validate_thumbprint(t: &str, which: &str) -> Result<String> {
    let ok = (t.len() == 40 || t.len() == 64) && t.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(Error::invalid(format!(
            "The {which} thumbprint must be 40 (SHA-1) or 64 (SHA-256) hex characters"
        )));
    }
    Ok(t.to_ascii_uppercase())
}

/// Turns requested credentials into stored ones, generating SAS keys when absent. `previous`
/// keeps existing SAS keys on an update that names the type but not the keys.
fn resolve_auth(
    requested: Option<&AuthenticationMechanism>,
    previous: Option<&StoredAuth>,
) -> Result<StoredAuth> {
    let auth_type = requested
        .map(|a| a.auth_type)
        .unwrap_or(AuthenticationType::Sas);
    let nonempty = |s: &Option<String>| s.as_ref().filter(|v| !v.is_empty()).cloned();
    match auth_type {
        AuthenticationType::Sas => {
            let sk = requested.and_then(|a| a.symmetric_key.as_ref());
            let prev = previous.filter(|p| p.auth_type == AuthenticationType::Sas);
            let primary = sk.and_then(|k| nonempty(&k.primary_key));
            let secondary = sk.and_then(|k| nonempty(&k.secondary_key));
            let primary = match primary {
                Some(k) => {
                    validate_key(&k, "primary")?;
                    k
                }
                None => prev
                    .and_then(|p| p.primary_key.clone())
                    .unwrap_or_else(keys::generate_key),
            };
            let secondary = match secondary {
                Some(k) => {
                    validate_key(&k, "secondary")?;
                    k
                }
                None => prev
                    .and_then(|p| p.secondary_key.clone())
                    .unwrap_or_else(keys::generate_key),
            };
            Ok(StoredAuth {
                auth_type,
                primary_key: Some(primary),
                secondary_key: Some(secondary),
                primary_thumbprint: None,
                secondary_thumbprint: None,
            })
        }
        AuthenticationType::SelfSigned => {
            let tp = requested.and_then(|a| a.x509_thumbprint.as_ref());
            let primary = tp
                .and_then(|t| nonempty(&t.primary_thumbprint))
                .ok_or_else(|| Error::invalid("A selfSigned device needs a primary thumbprint"))?;
            let secondary = tp.and_then(|t| nonempty(&t.secondary_thumbprint));
            Ok(StoredAuth {
                auth_type,
                primary_key: None,
                secondary_key: None,
                primary_thumbprint: Some(validate_thumbprint(&primary, "primary")?),
                secondary_thumbprint: secondary
                    .map(|s| validate_thumbprint(&s, "secondary"))
                    .transpose()?,
            })
        }
        AuthenticationType::CertificateAuthority | AuthenticationType::None => Ok(StoredAuth {
            auth_type,
            primary_key: None,
            secondary_key: None,
            primary_thumbprint: None,
            secondary_thumbprint: None,
        }),
    }
}

pub(crate) fn new_record(device_id: &str, spec: &DeviceSpec, now: &str) -> Result<DeviceRecord> {
    validate_spec(spec)?;
    Ok(DeviceRecord {
        device_id: device_id.to_string(),
        module_id: None,
        managed_by: None,
        generation_id: keys::generation_id(),
        // Not 1: a device deleted and re-created under the same id must not repeat its
        // predecessor's etags, or an If-Match taken from the old one would match the new.
        identity_version: keys::now_micros().max(1),
        status: spec.status.unwrap_or(DeviceStatus::Enabled),
        status_reason: spec.status_reason.clone(),
        status_updated_time: twinhub_proto::time::NEVER.to_string(),
        auth: resolve_auth(spec.authentication.as_ref(), None)?,
        iot_edge: spec.iot_edge,
        device_scope: spec.device_scope.clone(),
        parent_scopes: spec.parent_scopes.clone(),
        connection_state_updated_time: twinhub_proto::time::NEVER.to_string(),
        last_activity_time: twinhub_proto::time::NEVER.to_string(),
        cloud_to_device_message_count: 0,
        twin: TwinState {
            version: 1,
            tags: Map::new(),
            desired: Section::new(now, true),
            reported: Section::new(now, false),
        },
        node: None,
        read_as: Default::default(),
    })
}

/// Applies an identity update; returns whether a live session must end: the device is now
/// disabled, or its credentials changed (a session signed in with the old ones must not
/// outlive a key rotation).
pub(crate) fn update_record(rec: &mut DeviceRecord, spec: &DeviceSpec, now: &str) -> Result<bool> {
    validate_spec(spec)?;
    let auth = resolve_auth(spec.authentication.as_ref(), Some(&rec.auth))?;
    let credentials_changed = auth != rec.auth;
    rec.auth = auth;
    let status = spec.status.unwrap_or(rec.status);
    if status != rec.status {
        rec.status = status;
        rec.status_updated_time = now.to_string();
    }
    rec.status_reason = spec.status_reason.clone();
    rec.iot_edge = spec.iot_edge;
    rec.device_scope = spec.device_scope.clone();
    rec.parent_scopes = spec.parent_scopes.clone();
    rec.identity_version += 1;
    Ok(rec.status == DeviceStatus::Disabled || credentials_changed)
}

pub(crate) fn check_etag(if_match: Option<&str>, actual: &str, what: &str) -> Result<()> {
    match if_match_value(if_match) {
        Some(expected) if expected != actual => Err(Error::precondition_failed(what)),
        _ => Ok(()),
    }
}

impl Hub {
    /// `PUT /devices/{id}`: creates the device when `if_match` is absent (409 if it exists),
    /// updates it otherwise (404 if missing, 412 on a stale etag).
    pub async fn put_device(
        &self,
        device_id: &str,
        body: &Device,
        if_match: Option<&str>,
    ) -> Result<Device> {
        validate_device_id(device_id)?;
        if !body.device_id.is_empty() && body.device_id != device_id {
            return Err(Error::invalid(format!(
                "The deviceId in the body ('{}') does not match the path ('{device_id}')",
                body.device_id
            )));
        }
        let spec = DeviceSpec::from(body);
        let now = keys::now_text();
        let guard = self.locks.lock(device_id).await;
        let mut attempt = 0;
        let (record, event) = loop {
            let result: Result<_> = async {
                let existing = self.load(device_id).await?;
                let mut event = None;
                let record = match (existing, if_match.is_some()) {
                    (None, false) => {
                        let rec = new_record(device_id, &spec, &now)?;
                        self.save(&rec).await?;
                        self.counts.add(rec.status);
                        event = self.lifecycle_event(&rec, &now, Lifecycle::Created);
                        rec
                    }
                    (None, true) => return Err(Error::device_not_found(device_id)),
                    (Some(_), false) => {
                        return Err(Error::new(
                            ErrorCode::DeviceAlreadyExists,
                            format!("A device with ID '{device_id}' is already registered"),
                        ));
                    }
                    (Some(mut rec), true) => {
                        check_etag(if_match, &rec.device_etag(), "device")?;
                        let before = rec.status;
                        let close = update_record(&mut rec, &spec, &now)?;
                        self.save(&rec).await?;
                        self.counts.change(before, rec.status);
                        if close {
                            self.close_session_everywhere(device_id).await;
                        }
                        if rec.status == DeviceStatus::Disabled {
                            self.close_module_sessions(device_id).await;
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
        let device = self.render_device(&record);
        drop(guard);
        self.emit(event).await;
        Ok(device)
    }

    /// The Device document, with the live connection state and queue depth.
    pub(crate) fn render_device(&self, rec: &DeviceRecord) -> Device {
        let mut device = rec.to_device(self.connected_anywhere(&rec.key(), rec.node.as_deref()));
        device.cloud_to_device_message_count = Some(self.c2d.depth(&rec.device_id));
        device
    }

    /// The Twin document, with the live connection state and queue depth.
    pub(crate) fn render_twin(&self, rec: &DeviceRecord) -> twinhub_proto::model::Twin {
        let mut twin = rec.to_twin(self.connected_anywhere(&rec.key(), rec.node.as_deref()));
        // Cloud-to-device queues are a device's; a module has none.
        twin.cloud_to_device_message_count = Some(if rec.is_module() {
            0
        } else {
            self.c2d.depth(&rec.device_id)
        });
        twin
    }

    pub async fn get_device(&self, device_id: &str) -> Result<Device> {
        validate_device_id(device_id)?;
        let rec = self.load_existing(device_id).await?;
        // Its queue's depth, as another cluster node may have changed it.
        self.c2d_refresh(device_id).await?;
        Ok(self.render_device(&rec))
    }

    /// The stored record (for device authentication and the server's own needs).
    pub async fn device_record(&self, device_id: &str) -> Result<Option<DeviceRecord>> {
        self.load(device_id).await
    }

    /// `DELETE /devices/{id}`.
    pub async fn delete_device(&self, device_id: &str, if_match: Option<&str>) -> Result<()> {
        validate_device_id(device_id)?;
        let guard = self.locks.lock(device_id).await;
        let rec = self.load_existing(device_id).await?;
        check_etag(if_match, &rec.device_etag(), "device")?;
        let mut writes = vec![
            Write::delete(Table::Devices, device_id),
            Write::delete(Table::Sessions, device_id),
        ];
        writes.extend(self.c2d_deletion_writes(device_id));
        let modules = self.module_records(device_id).await?;
        let mut module_guards = Vec::with_capacity(modules.len());
        for m in &modules {
            module_guards.push(self.locks.lock(&m.key()).await);
        }
        writes.extend(modules.iter().flat_map(module_deletion_writes));
        self.store.commit(writes).await?;
        self.c2d_forget(device_id);
        self.counts.remove(rec.status);
        self.close_session_everywhere(device_id).await;
        self.redelivery.forget(device_id);
        let now = keys::now_text();
        let mut events: Vec<_> = modules
            .iter()
            .filter_map(|m| self.forget_module(m, &now))
            .collect();
        events.extend(self.lifecycle_event(&rec, &now, Lifecycle::Deleted));
        drop(module_guards);
        drop(guard);
        self.emit_concurrently(events).await;
        Ok(())
    }

    /// `GET /devices?top=N`: the first `top` devices in id order.
    pub async fn list_devices(&self, top: Option<usize>) -> Result<Vec<Device>> {
        let top = top.unwrap_or(LIST_LIMIT);
        if top > LIST_LIMIT {
            return Err(Error::invalid(format!("top must be at most {LIST_LIMIT}")));
        }
        let page = self.store.scan(Table::Devices, None, top).await?;
        page.iter()
            .map(|(_, bytes)| DeviceRecord::decode(bytes).map(|r| self.render_device(&r)))
            .collect()
    }

    pub fn registry_statistics(&self) -> RegistryStatistics {
        let total = self.counts.total.load(Ordering::Relaxed);
        let enabled = self.counts.enabled.load(Ordering::Relaxed);
        RegistryStatistics {
            total_device_count: total,
            enabled_device_count: enabled,
            disabled_device_count: total.saturating_sub(enabled),
        }
    }

    pub fn service_statistics(&self) -> ServiceStatistics {
        ServiceStatistics {
            connected_device_count: self.directory.connected_count() as u64,
        }
    }

    /// `GET /statistics/devices`: this hub's counts, or in a cluster the shared registry's
    /// (counted from the store, as devices come and go through every node).
    pub async fn registry_statistics_now(&self) -> Result<RegistryStatistics> {
        if self.cluster().is_none() {
            return Ok(self.registry_statistics());
        }
        let counts = self.cluster_counts().await?;
        Ok(RegistryStatistics {
            total_device_count: counts.total,
            enabled_device_count: counts.enabled,
            disabled_device_count: counts.total.saturating_sub(counts.enabled),
        })
    }

    /// `GET /statistics/service`: devices connected to this hub, or to any node of its
    /// cluster.
    pub async fn service_statistics_now(&self) -> Result<ServiceStatistics> {
        if self.cluster().is_none() {
            return Ok(self.service_statistics());
        }
        Ok(ServiceStatistics {
            connected_device_count: self.cluster_counts().await?.connected,
        })
    }

    pub(crate) fn close_device_session(&self, device_id: &str, reason: CloseReason) {
        if let Some(h) = self.directory.get(device_id) {
            h.close.close(reason);
        }
    }

    /// Closes the identity's session on this node and, in a cluster, on every other one
    /// (the identity was disabled or deleted).
    pub(crate) async fn close_session_everywhere(&self, device_id: &str) {
        self.close_device_session(device_id, CloseReason::DeviceDisabled);
        if let Some(bus) = self.cluster() {
            let notice = crate::cluster::Notice::Disabled {
                identity: device_id.to_owned(),
            };
            bus.broadcast(&notice).await;
        }
    }

    /// `POST /devices`: a bulk import. Every operation is checked on its own; the ones that
    /// pass are committed together in one durable batch. Returns the result IoT Hub shapes.
    pub async fn bulk_devices(
        &self,
        ops: &[ExportImportDevice],
    ) -> Result<BulkRegistryOperationResult> {
        if ops.is_empty() {
            return Err(Error::invalid("The bulk operation list is empty"));
        }
        if ops.len() > BULK_LIMIT {
            return Err(Error::invalid(format!(
                "At most {BULK_LIMIT} devices per bulk operation"
            )));
        }
        let mut seen = BTreeSet::new();
        for op in ops {
            validate_device_id(&op.id)?;
            if !seen.insert(op.id.as_str()) {
                return Err(Error::new(
                    ErrorCode::DeviceDefinedMultipleTimes,
                    format!("Device '{}' appears more than once", op.id),
                ));
            }
        }
        // Lock in id order so two bulk calls can never deadlock each other.
        let mut guards = Vec::with_capacity(seen.len());
        for id in &seen {
            guards.push(self.locks.lock(id).await);
        }
        let now = keys::now_text();
        let mut writes = Vec::new();
        let mut errors = Vec::new();
        let mut effects: Vec<Effect> = Vec::new();
        let lifecycle = self.wants_lifecycle_events();
        let mut events = Vec::new();
        let mut deleted_modules = Vec::new();
        for op in ops {
            let existing = self.load(&op.id).await?;
            let before = existing.as_ref().map(|r| r.status);
            let auth_before = existing.as_ref().map(|r| r.auth.clone());
            // A deleted device's event shows the twin as it was.
            let deleted = if lifecycle { existing.clone() } else { None };
            match apply_import(op, existing, &now) {
                Ok(Some(rec)) => {
                    if lifecycle && before.is_none() {
                        events.extend(self.lifecycle_event(&rec, &now, Lifecycle::Created));
                    }
                    writes.push(Write::put(
                        Table::Devices,
                        rec.device_id.clone(),
                        rec.encode(),
                    ));
                    effects.push(Effect {
                        id: op.id.clone(),
                        before,
                        after: Some(rec.status),
                        credentials_changed: auth_before.is_some_and(|a| a != rec.auth),
                    });
                }
                Ok(None) => {
                    if let Some(rec) = &deleted {
                        events.extend(self.lifecycle_event(rec, &now, Lifecycle::Deleted));
                    }
                    writes.push(Write::delete(Table::Devices, op.id.clone()));
                    writes.push(Write::delete(Table::Sessions, op.id.clone()));
                    writes.extend(self.c2d_deletion_writes(&op.id));
                    let modules = self.module_records(&op.id).await?;
                    for m in &modules {
                        guards.push(self.locks.lock(&m.key()).await);
                    }
                    writes.extend(modules.iter().flat_map(module_deletion_writes));
                    deleted_modules.extend(modules);
                    effects.push(Effect {
                        id: op.id.clone(),
                        before,
                        after: None,
                        credentials_changed: false,
                    });
                }
                Err(e) => errors.push(DeviceRegistryOperationError {
                    device_id: op.id.clone(),
                    error_code: e.code().name().to_string(),
                    error_status: e.message().to_string(),
                    module_id: op.module_id.clone().filter(|m| !m.is_empty()),
                    operation: Some(format!("{:?}", op.import_mode)),
                }),
            }
        }
        if !writes.is_empty() {
            self.store.commit(writes).await?;
        }
        events.extend(
            deleted_modules
                .iter()
                .filter_map(|m| self.forget_module(m, &now)),
        );
        for e in effects {
            match (e.before, e.after) {
                (None, Some(s)) => self.counts.add(s),
                (Some(b), Some(a)) => self.counts.change(b, a),
                (Some(b), None) => self.counts.remove(b),
                (None, None) => {}
            }
            if e.before.is_some()
                && (e.after != Some(DeviceStatus::Enabled) || e.credentials_changed)
            {
                self.close_session_everywhere(&e.id).await;
            }
            if e.after == Some(DeviceStatus::Disabled) {
                self.close_module_sessions(&e.id).await;
            }
            if e.after.is_none() {
                self.redelivery.forget(&e.id);
                self.c2d_forget(&e.id);
            }
        }
        drop(guards);
        self.emit_concurrently(events).await;
        Ok(BulkRegistryOperationResult {
            is_successful: errors.is_empty(),
            errors,
            warnings: Vec::new(),
        })
    }
}

/// What a committed import operation changed, for the effects that follow the commit.
struct Effect {
    id: String,
    before: Option<DeviceStatus>,
    after: Option<DeviceStatus>,
    credentials_changed: bool,
}

/// The outcome of one import operation: the record to store, `None` to delete.
fn apply_import(
    op: &ExportImportDevice,
    existing: Option<DeviceRecord>,
    now: &str,
) -> Result<Option<DeviceRecord>> {
    use ImportMode::*;
    // An entry naming a module must never act on its device (a module delete would delete
    // the device with all its modules); modules are managed through their own routes.
    if let Some(module_id) = op.module_id.as_deref().filter(|m| !m.is_empty()) {
        return Err(Error::invalid(format!(
            "Bulk registry operations apply to devices; this one names module '{}' (use PUT or DELETE /devices/{}/modules/{})",
            crate::logsafe::Shown(module_id),
            op.id,
            crate::logsafe::Shown(module_id)
        )));
    }
    let spec = DeviceSpec::from(op);
    let not_found = || Error::device_not_found(&op.id);
    match op.import_mode {
        Create => {
            if existing.is_some() {
                return Err(Error::new(
                    ErrorCode::DeviceAlreadyExists,
                    format!("A device with ID '{}' is already registered", op.id),
                ));
            }
            let mut rec = new_record(&op.id, &spec, now)?;
            apply_import_twin(op, &mut rec, now)?;
            Ok(Some(rec))
        }
        CreateOrUpdate | CreateOrUpdateIfMatchETag => match existing {
            None => {
                let mut rec = new_record(&op.id, &spec, now)?;
                apply_import_twin(op, &mut rec, now)?;
                Ok(Some(rec))
            }
            Some(mut rec) => {
                if op.import_mode == CreateOrUpdateIfMatchETag {
                    check_etag(op.e_tag.as_deref(), &rec.device_etag(), "device")?;
                }
                update_record(&mut rec, &spec, now)?;
                apply_import_twin(op, &mut rec, now)?;
                Ok(Some(rec))
            }
        },
        Update | UpdateIfMatchETag => {
            let mut rec = existing.ok_or_else(not_found)?;
            if op.import_mode == UpdateIfMatchETag {
                check_etag(op.e_tag.as_deref(), &rec.device_etag(), "device")?;
            }
            update_record(&mut rec, &spec, now)?;
            apply_import_twin(op, &mut rec, now)?;
            Ok(Some(rec))
        }
        Delete | DeleteIfMatchETag => {
            let rec = existing.ok_or_else(not_found)?;
            if op.import_mode == DeleteIfMatchETag {
                check_etag(op.e_tag.as_deref(), &rec.device_etag(), "device")?;
            }
            Ok(None)
        }
        UpdateTwin | UpdateTwinIfMatchETag => {
            let mut rec = existing.ok_or_else(not_found)?;
            if op.import_mode == UpdateTwinIfMatchETag {
                check_etag(op.twin_e_tag.as_deref(), &rec.twin_etag(), "twin")?;
            }
            apply_import_twin(op, &mut rec, now)?;
            Ok(Some(rec))
        }
    }
}

/// Applies the tags and desired/reported properties an import carries, as patches.
fn apply_import_twin(op: &ExportImportDevice, rec: &mut DeviceRecord, now: &str) -> Result<()> {
    let mut changed = false;
    if let Some(tags) = &op.tags {
        let patch = twin_doc::validate_section(SectionKind::Tags, &Value::Object(tags.clone()))?;
        crate::twins::merge_tags(&mut rec.twin.tags, &patch);
        twin_doc::check_size(SectionKind::Tags, &rec.twin.tags)?;
        changed = true;
    }
    if let Some(props) = &op.properties {
        if let Some(desired) = Some(&props.desired).filter(|d| !d.is_empty()) {
            let patch =
                twin_doc::validate_section(SectionKind::Desired, &Value::Object(desired.clone()))?;
            rec.twin.desired.apply_patch(&patch, now, true);
            twin_doc::check_size(SectionKind::Desired, &rec.twin.desired.props)?;
            changed = true;
        }
        if let Some(reported) = Some(&props.reported).filter(|r| !r.is_empty()) {
            let patch = twin_doc::validate_section(
                SectionKind::Reported,
                &Value::Object(reported.clone()),
            )?;
            rec.twin.reported.apply_patch(&patch, now, false);
            twin_doc::check_size(SectionKind::Reported, &rec.twin.reported.props)?;
            changed = true;
        }
    }
    if changed {
        rec.twin.version += 1;
    }
    Ok(())
}

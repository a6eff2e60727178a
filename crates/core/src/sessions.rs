//! Device sessions as the hub sees them: authenticating a CONNECT, registering the session in
//! the directory (closing an older one for the same device), the subscriptions a device keeps
//! across reconnects (the official SDK never subscribes again), and presence times.

use serde::{Deserialize, Serialize};
use twinhub_proto::model::{AuthenticationType, DeviceStatus};
use twinhub_store::{Table, Write};

use crate::directory::{CloseReason, SessionHandle};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::keys;
use crate::record::DeviceRecord;
use crate::twins::SessionRef;

/// Session state kept between connections of a CleanSession=0 client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedSession {
    pub subscriptions: Vec<String>,
}

/// What a newly accepted session starts from.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// A previous session was resumed (CONNACK's session-present flag).
    pub session_present: bool,
    /// Subscription filters restored from that session.
    pub subscriptions: Vec<String>,
    /// When the device's SAS token expires (unix seconds); the session ends then.
    pub token_expiry: u64,
    /// The device's generation: if it is deleted and re-created, the session is stale.
    pub generation_id: String,
}

/// What a connecting identity presents: a SAS token as the CONNECT password, a client
/// certificate chain from the TLS handshake, or both (the identity's authentication type picks
/// which one counts).
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    pub password: Option<&'a str>,
    /// DER certificates, leaf first; empty when the client presented none.
    pub certificates: &'a [Vec<u8>],
}

/// Names an identity key in messages: `device 'd'` or `module 'm' of device 'd'`.
pub(crate) fn describe(key: &str) -> String {
    match crate::record::split_identity(key) {
        (d, Some(m)) => format!("Module '{m}' of device '{d}'"),
        (d, None) => format!("Device '{d}'"),
    }
}

impl Hub {
    /// The record of an identity that may sign in: registered and enabled. A module is
    /// refused when its device is disabled, as IoT Hub does.
    async fn enabled_identity(&self, key: &str) -> Result<DeviceRecord> {
        let rec = self
            .load(key)
            .await?
            .ok_or_else(|| Error::unauthorized(format!("{} is not registered", describe(key))))?;
        if rec.status != DeviceStatus::Enabled {
            return Err(Error::unauthorized(format!(
                "{} is disabled",
                describe(key)
            )));
        }
        if rec.is_module() {
            let device = self.load(&rec.device_id).await?;
            if device.is_none_or(|d| d.status != DeviceStatus::Enabled) {
                return Err(Error::unauthorized(format!(
                    "{} belongs to a disabled or missing device",
                    describe(key)
                )));
            }
        }
        Ok(rec)
    }

    /// The record of a device that may sign in with a SAS token: registered, enabled, of the
    /// SAS authentication type.
    async fn sas_device(&self, key: &str) -> Result<DeviceRecord> {
        let rec = self.enabled_identity(key).await?;
        if rec.auth.auth_type != AuthenticationType::Sas {
            return Err(Error::unauthorized(format!(
                "{} uses {:?} authentication, which needs a client certificate",
                describe(key),
                rec.auth.auth_type
            )));
        }
        Ok(rec)
    }

    /// Checks `credentials` against the identity's authentication type; returns when they
    /// stop being valid (the token's expiry or the certificate's notAfter, unix seconds).
    fn check_credentials(&self, rec: &DeviceRecord, credentials: Credentials<'_>) -> Result<u64> {
        let key = rec.key();
        match rec.auth.auth_type {
            AuthenticationType::Sas => {
                let password = credentials.password.ok_or_else(|| {
                    // Said plainly when a certificate came instead: it is not this identity's
                    // kind of credential.
                    let why = if credentials.certificates.is_empty() {
                        ""
                    } else {
                        "; a client certificate does not sign in an identity of type sas"
                    };
                    Error::unauthorized(format!(
                        "{}: CONNECT carries no password (SAS token){why}",
                        describe(&key)
                    ))
                })?;
                self.auth.authenticate_device(
                    &key,
                    rec.auth.primary_key.as_deref(),
                    rec.auth.secondary_key.as_deref(),
                    password,
                    keys::now_unix(),
                )
            }
            AuthenticationType::SelfSigned | AuthenticationType::CertificateAuthority => {
                if credentials.certificates.is_empty() {
                    return Err(Error::unauthorized(format!(
                        "{} uses {:?} authentication and the client presented no certificate",
                        describe(&key),
                        rec.auth.auth_type
                    )));
                }
                self.verify_client_certificate(rec, credentials.certificates)
            }
            AuthenticationType::None => Err(Error::unauthorized(format!(
                "{} has no credentials (authentication type none)",
                describe(&key)
            ))),
        }
    }

    /// Authenticates a device's HTTPS request (its `Authorization` SAS token, signed with the
    /// device's key or a policy with DeviceConnect); returns the device's generation.
    pub async fn authenticate_device_request(
        &self,
        device_id: &str,
        authorization: Option<&str>,
    ) -> Result<String> {
        crate::registry::validate_device_id(device_id)
            .map_err(|e| Error::unauthorized(e.message().to_owned()))?;
        let rec = self.sas_device(device_id).await?;
        let token = authorization
            .ok_or_else(|| Error::unauthorized("The request carries no Authorization header"))?;
        self.auth.authenticate_device(
            device_id,
            rec.auth.primary_key.as_deref(),
            rec.auth.secondary_key.as_deref(),
            token,
            keys::now_unix(),
        )?;
        Ok(rec.generation_id)
    }

    /// Authenticates an identity's CONNECT and registers its session. `device_id` is the
    /// identity key (`deviceId` or `deviceId/moduleId`). A failure's code says what the
    /// device is told: IotHubUnauthorizedAccess is "not authorized", throttling and store
    /// faults are "server unavailable" (the device retries); the message says why, for the
    /// log.
    pub async fn connect_device(
        &self,
        device_id: &str,
        credentials: Credentials<'_>,
        clean_session: bool,
        handle: SessionHandle,
    ) -> Result<SessionStart> {
        let rec = self.enabled_identity(device_id).await?;
        self.throttles.connect(device_id)?;
        let auth_checked = rec.auth.clone();
        let token_expiry = self.check_credentials(&rec, credentials)?;

        let guard = self.locks.lock(device_id).await;
        let mut attempt = 0;
        let (rec, previous, now, replaced_node) = loop {
            let result: Result<_> = async {
                // Reload under the lock: the device may have changed since the check above.
                let mut rec = self.enabled_identity(device_id).await?;
                if rec.auth != auth_checked {
                    return Err(Error::unauthorized(format!(
                        "{} changed its credentials while connecting",
                        describe(device_id)
                    )));
                }
                let previous = match self.store.get(Table::Sessions, device_id).await? {
                    Some(bytes) => serde_json::from_slice::<PersistedSession>(&bytes).ok(),
                    None => None,
                };
                let now = keys::now_text();
                rec.connection_state_updated_time = now.clone();
                rec.last_activity_time = now.clone();
                // In a cluster the record names the node holding the session, so that the
                // others forward its methods and patches here and close the session this one
                // replaces.
                let replaced_node = match self.cluster() {
                    Some(bus) => {
                        let before = rec.node.replace(bus.node_id().to_owned());
                        self.remote_node(before.as_deref()).map(str::to_owned)
                    }
                    None => None,
                };
                let mut more = Vec::new();
                if clean_session && previous.is_some() {
                    more.push(Write::delete(Table::Sessions, device_id));
                }
                self.commit_record(&rec, more).await?;
                Ok((rec, previous, now, replaced_node))
            }
            .await;
            match result {
                Err(e) if self.retry_after(&e, &mut attempt) => continue,
                other => break other?,
            }
        };
        if let Some(old) = self.directory.register(device_id, handle) {
            old.close.close(CloseReason::ReplacedByNewConnection);
        }
        if let (Some(node), Some(bus)) = (replaced_node, self.cluster()) {
            let notice = crate::cluster::Notice::Connected {
                identity: device_id.to_owned(),
                node: bus.node_id().to_owned(),
            };
            bus.notify(&node, &notice).await;
        }
        // A CA removed between the certificate check and this registration found nothing to
        // close: close it now (the sessions' note of their CA is gone).
        if !self.certificate_session_admitted(&rec) {
            self.close_device_session(device_id, CloseReason::DeviceDisabled);
        }
        // Likewise a module whose device was disabled or deleted after the check above: the
        // disable closed the sessions it found, which did not include this one yet.
        if rec.is_module() {
            let device = self.load(&rec.device_id).await;
            if !matches!(&device, Ok(Some(d)) if d.status == DeviceStatus::Enabled) {
                self.close_device_session(device_id, CloseReason::DeviceDisabled);
            }
        }
        // In a cluster, messages queued through other nodes while the device was away or
        // connected elsewhere are in the store only.
        if !rec.is_module()
            && let Err(e) = self.c2d_refresh(device_id).await
        {
            tracing::warn!(
                device_id,
                "reading the cloud-to-device queue failed: {}",
                e.message()
            );
        }
        // Numbered under the lock, so the device's events number in the order of its changes.
        let event = self.connection_event(device_id, &now, true).await;
        drop(guard);
        self.emit(event).await;
        let resumed = if clean_session { None } else { previous };
        Ok(SessionStart {
            session_present: resumed.is_some(),
            subscriptions: resumed.map(|s| s.subscriptions).unwrap_or_default(),
            token_expiry,
            generation_id: rec.generation_id,
        })
    }

    /// Records a session's subscriptions so a reconnect (CleanSession=0) restores them.
    /// Returns after the durable commit, so a SUBACK sent afterwards is never a lie. A
    /// session that is no longer the device's current one writes nothing (and gets `false`).
    pub async fn save_subscriptions(
        &self,
        session: &SessionRef<'_>,
        filters: &[String],
    ) -> Result<bool> {
        let state = PersistedSession {
            subscriptions: filters.to_vec(),
        };
        let bytes = serde_json::to_vec(&state).unwrap_or_default();
        let _guard = self.locks.lock(session.device_id).await;
        if !self.is_current(session) {
            return Ok(false);
        }
        self.store
            .commit(vec![Write::put(Table::Sessions, session.device_id, bytes)])
            .await?;
        Ok(true)
    }

    /// Called when a session ends. Updates presence only if this connection was still the
    /// device's current one (a replaced session must not mark the device disconnected).
    /// A clean session's stored state is dropped.
    pub async fn disconnect_device(
        &self,
        device_id: &str,
        connection_id: u64,
        clean_session: bool,
    ) -> Result<()> {
        let guard = self.locks.lock(device_id).await;
        if !self.directory.unregister(device_id, connection_id) {
            return Ok(());
        }
        let now = keys::now_text();
        let result = self.record_disconnect(device_id, &now, clean_session).await;
        // The device is disconnected once the directory says so, whether or not its
        // presence times could be written (and a deleted device has none): report it.
        let event = self.connection_event(device_id, &now, false).await;
        drop(guard);
        self.emit(event).await;
        result
    }

    async fn record_disconnect(
        &self,
        device_id: &str,
        now: &str,
        clean_session: bool,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            let result: Result<()> = async {
                let Some(mut rec) = self.load(device_id).await? else {
                    return Ok(());
                };
                rec.connection_state_updated_time = now.to_owned();
                rec.last_activity_time = now.to_owned();
                // Only this node's own mark is cleared: the identity may have signed in on
                // another node since, which wrote its own.
                if let Some(bus) = self.cluster()
                    && rec.node.as_deref() == Some(bus.node_id())
                {
                    rec.node = None;
                }
                let mut more = Vec::new();
                if clean_session {
                    more.push(Write::delete(Table::Sessions, device_id));
                }
                self.commit_record(&rec, more).await
            }
            .await;
            match result {
                Err(e) if self.retry_after(&e, &mut attempt) => continue,
                other => return other,
            }
        }
    }
}

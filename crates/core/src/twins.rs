//! Twin operations: the service's get, patch and replace (tags and desired), and the device's
//! twin GET and reported patch. After a desired change commits, the patch goes to the
//! device's session while the device lock is still held, so pushes leave in version order.

use bytes::Bytes;
use serde_json::{Map, Value};
use twinhub_proto::model::Twin;

use twinhub_proto::ErrorBody;
use twinhub_proto::model::DeviceStatus;

use crate::directory::{CloseReason, SessionCommand, SessionHandle, subs};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::hub_events::HubEvent;
use crate::keys;
use crate::record::if_match_value;
use crate::redelivery::{Redelivered, TwinAnswer};
use crate::twin_doc::{self, SectionKind};

/// Merges a tags patch: objects merge recursively, `null` deletes. Tags carry no metadata.
pub(crate) fn merge_tags(tags: &mut Map<String, Value>, patch: &Map<String, Value>) {
    twin_doc::merge(tags, None, patch, "", None);
}

/// The parts of a service twin body the hub honours: `tags` and `properties.desired`. Every
/// other field (read-only ones an SDK echoes back) is ignored.
struct TwinInput {
    tags: Option<Map<String, Value>>,
    desired: Option<Map<String, Value>>,
}

fn parse_twin_input(body: &Value) -> Result<TwinInput> {
    let Value::Object(obj) = body else {
        return Err(Error::invalid("The twin must be a JSON object"));
    };
    let tags = match obj.get("tags") {
        None | Some(Value::Null) => None,
        Some(v) => Some(twin_doc::validate_section(SectionKind::Tags, v)?),
    };
    let desired = match obj.get("properties") {
        None | Some(Value::Null) => None,
        Some(Value::Object(props)) => match props.get("desired") {
            None | Some(Value::Null) => None,
            Some(v) => Some(twin_doc::validate_section(SectionKind::Desired, v)?),
        },
        Some(_) => return Err(Error::invalid("properties must be a JSON object")),
    };
    Ok(TwinInput { tags, desired })
}

/// Checks a twin update body as `write_twin` would, without applying it (jobs validate their
/// update when scheduled).
pub(crate) fn check_twin_input(body: &Value) -> Result<()> {
    parse_twin_input(body).map(|_| ())
}

impl Hub {
    /// `GET /twins/{id}`.
    pub async fn get_twin(&self, device_id: &str) -> Result<Twin> {
        let rec = self.load_existing(device_id).await?;
        // Its queue's depth, as another cluster node may have changed it.
        if !rec.is_module() {
            self.c2d_refresh(device_id).await?;
        }
        Ok(self.render_twin(&rec))
    }

    /// `PATCH /twins/{id}` (`replace == false`) or `PUT /twins/{id}` (`replace == true`).
    pub async fn write_twin(
        &self,
        device_id: &str,
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<Twin> {
        let input = parse_twin_input(body)?;
        if !replace && input.tags.is_none() && input.desired.is_none() {
            // Nothing to change: answer with the twin as it is, without a new version.
            return self.get_twin(device_id).await;
        }
        let now = keys::now_text();
        let guard = self.locks.lock(device_id).await;
        let mut attempt = 0;
        let (rec, tags_patch, desired_patch) = loop {
            let result: Result<_> = async {
                let mut rec = self.load_existing(device_id).await?;
                if let Some(expected) = if_match_value(if_match)
                    && expected != rec.twin_etag()
                {
                    return Err(Error::precondition_failed("twin"));
                }
                let mut desired_patch = None;
                let mut tags_patch = None;
                if replace {
                    let mut tags = input.tags.clone().unwrap_or_default();
                    twin_doc::strip_nulls(&mut tags);
                    twin_doc::check_size(SectionKind::Tags, &tags)?;
                    let mut desired = input.desired.clone().unwrap_or_default();
                    twin_doc::strip_nulls(&mut desired);
                    twin_doc::check_size(SectionKind::Desired, &desired)?;
                    rec.twin.tags = tags;
                    desired_patch = Some(rec.twin.desired.replace(desired, &now, true));
                } else {
                    if let Some(patch) = &input.tags {
                        merge_tags(&mut rec.twin.tags, patch);
                        twin_doc::check_size(SectionKind::Tags, &rec.twin.tags)?;
                        tags_patch = Some(patch.clone());
                    }
                    if let Some(patch) = &input.desired {
                        rec.twin.desired.apply_patch(patch, &now, true);
                        twin_doc::check_size(SectionKind::Desired, &rec.twin.desired.props)?;
                        desired_patch = Some(patch.clone());
                    }
                }
                rec.twin.version += 1;
                self.save(&rec).await?;
                Ok((rec, tags_patch, desired_patch))
            }
            .await;
            match result {
                Err(e) if self.retry_after(&e, &mut attempt) => continue,
                other => break other?,
            }
        };
        let event = if replace {
            self.twin_replaced_event(&rec, &now)
        } else {
            self.twin_updated_event(
                &rec,
                &now,
                tags_patch.as_ref(),
                desired_patch.as_ref(),
                None,
            )
        };
        if let Some(patch) = desired_patch {
            self.push_desired(
                device_id,
                rec.node.as_deref(),
                rec.twin.desired.version,
                patch,
            )
            .await;
        }
        let twin = self.render_twin(&rec);
        drop(guard);
        self.emit(event).await;
        Ok(twin)
    }

    /// Sends a committed desired patch to the device's session if it listens for them: here,
    /// or through the cluster to the node holding it (`node`, from the record). Called with the
    /// device lock held, so patches are queued in version order. A session whose queue is full
    /// is closed: on reconnect the device reads the whole twin again.
    async fn push_desired(
        &self,
        device_id: &str,
        node: Option<&str>,
        version: u64,
        mut patch: Map<String, Value>,
    ) {
        // Rendered only for a session that will take it: most patches meet a device that is
        // offline or does not listen for them.
        let render = |patch: &mut Map<String, Value>| {
            patch.insert("$version".into(), Value::from(version));
            Bytes::from(serde_json::to_vec(&*patch).unwrap_or_default())
        };
        if let Some(handle) = self.directory.get(device_id) {
            if handle.is_subscribed(subs::DESIRED) {
                self.push_desired_payload(device_id, version, render(&mut patch));
            }
            return;
        }
        if let (Some(remote), Some(bus)) = (self.remote_node(node), self.cluster()) {
            let payload = render(&mut patch);
            let notice = crate::cluster::Notice::Desired {
                identity: device_id.to_owned(),
                version,
                patch: String::from_utf8_lossy(&payload).into_owned(),
            };
            bus.notify(remote, &notice).await;
        }
    }

    /// Queues a desired patch (with its `$version`) for this node's session of the device.
    pub(crate) fn push_desired_payload(&self, device_id: &str, version: u64, payload: Bytes) {
        let Some(handle) = self.directory.get(device_id) else {
            return;
        };
        if !handle.is_subscribed(subs::DESIRED) {
            return;
        }
        if handle.close.is_closed() {
            // Closing already (a slow consumer, a replaced session): it resyncs on reconnect.
            return;
        }
        if handle
            .commands
            .try_send(SessionCommand::DesiredPatch { version, payload })
            .is_err()
        {
            // Once per session: the close makes later pushes return above.
            tracing::warn!(
                device_id,
                version,
                "desired patch queue full; closing the session so the device resyncs"
            );
            handle.close.close(CloseReason::SlowConsumer);
        }
    }

    /// A device's twin GET: `{"desired": {.., "$version"}, "reported": {.., "$version"}}`.
    pub async fn device_get_twin(&self, device_id: &str) -> Result<Bytes> {
        let rec = self.load_existing(device_id).await?;
        Ok(Bytes::from(
            serde_json::to_vec(&rec.device_twin_json()).unwrap_or_default(),
        ))
    }

    /// A device's reported-properties patch, as its session received it. Under the device
    /// lock: a real redelivery (DUP, same `$rid` and payload) gets the remembered answer;
    /// a session that is no longer the device's current one, or whose device was disabled,
    /// deleted or re-created since it connected, writes nothing. Otherwise the patch is
    /// applied and answered once the change is durable.
    pub async fn device_patch_reported(
        &self,
        session: &SessionRef<'_>,
        request: &TwinRequest<'_>,
    ) -> PatchOutcome {
        let device_id = session.device_id;
        let prepared = serde_json::from_slice::<Value>(request.payload)
            .map_err(|e| Error::invalid(format!("The reported patch is not valid JSON: {e}")))
            .and_then(|value| twin_doc::validate_section(SectionKind::Reported, &value));
        let guard = self.locks.lock(device_id).await;
        if !self.is_current(session) {
            return PatchOutcome::SessionEnded;
        }
        let connection_id = session.handle.connection_id;
        match self.redelivery.check(
            device_id,
            connection_id,
            request.rid,
            request.dup,
            request.payload,
        ) {
            Redelivered::New => {}
            Redelivered::AlreadyAnswered => return PatchOutcome::AlreadyAnswered,
            Redelivered::Resend(answer) => return PatchOutcome::Answer(answer),
        }
        let result = match prepared {
            Ok(patch) => self.apply_reported(session, &patch).await,
            Err(e) => Err(e),
        };
        let mut event = None;
        let answer = match result {
            Ok(Some((version, change))) => {
                event = change;
                TwinAnswer {
                    status: 204,
                    version: Some(version),
                    body: Bytes::new(),
                }
            }
            Ok(None) => return PatchOutcome::SessionEnded,
            Err(e) => TwinAnswer::from_error(&e),
        };
        self.redelivery.remember(
            device_id,
            connection_id,
            request.rid,
            request.payload,
            &answer,
        );
        drop(guard);
        self.emit(event).await;
        PatchOutcome::Answer(answer)
    }

    /// Applies a validated reported patch; `None` when the record shows the session stale.
    /// Returns the new reported version and the twin change event to emit once the device
    /// lock is released.
    async fn apply_reported(
        &self,
        session: &SessionRef<'_>,
        patch: &Map<String, Value>,
    ) -> Result<Option<(u64, Option<HubEvent>)>> {
        let mut throttled = false;
        let now = keys::now_text();
        let mut attempt = 0;
        let saved = loop {
            let result: Result<_> = async {
                let Some(mut rec) = self.load(session.device_id).await? else {
                    return Ok(None);
                };
                if rec.generation_id != session.generation_id || rec.status != DeviceStatus::Enabled
                {
                    return Ok(None);
                }
                if !throttled {
                    self.throttles.twin_write(session.device_id)?;
                    throttled = true;
                }
                let version = rec.twin.reported.apply_patch(patch, &now, false);
                twin_doc::check_size(SectionKind::Reported, &rec.twin.reported.props)?;
                rec.twin.version += 1;
                rec.last_activity_time = now.clone();
                self.save(&rec).await?;
                Ok(Some((rec, version)))
            }
            .await;
            match result {
                Err(e) if self.retry_after(&e, &mut attempt) => continue,
                other => break other?,
            }
        };
        let Some((rec, version)) = saved else {
            return Ok(None);
        };
        let event = self.twin_updated_event(&rec, &now, None, None, Some(patch));
        Ok(Some((version, event)))
    }

    /// Whether `session` is still the one the directory routes its device to.
    pub(crate) fn is_current(&self, session: &SessionRef<'_>) -> bool {
        !session.handle.close.is_closed()
            && self
                .directory
                .get(session.device_id)
                .is_some_and(|h| h.connection_id == session.handle.connection_id)
    }
}

/// A device session as the hub accepted it: which device, which connection, and the device's
/// generation at connect (a device deleted and re-created under the same id is another one).
#[derive(Debug, Clone, Copy)]
pub struct SessionRef<'a> {
    pub device_id: &'a str,
    pub handle: &'a SessionHandle,
    pub generation_id: &'a str,
}

/// A twin request as a device sent it.
#[derive(Debug, Clone, Copy)]
pub struct TwinRequest<'a> {
    pub rid: &'a str,
    /// MQTT's DUP flag: the client is sending it again.
    pub dup: bool,
    pub payload: &'a [u8],
}

/// What becomes of a device's reported patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchOutcome {
    /// Answer the device with this.
    Answer(TwinAnswer),
    /// A redelivery on the connection that already got its answer: send nothing more.
    AlreadyAnswered,
    /// The session may write nothing more (replaced, device disabled, deleted or re-created):
    /// it ends.
    SessionEnded,
}

impl TwinAnswer {
    /// The answer for a failed request: the error's HTTP status and IoT Hub's error body.
    pub fn from_error(e: &Error) -> TwinAnswer {
        let code = e.code();
        let body = ErrorBody::json(
            code,
            e.message(),
            &keys::tracking_id(),
            jiff::Timestamp::now(),
        );
        TwinAnswer {
            status: code.http_status(),
            version: None,
            body: Bytes::from(body.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tags_merge_recursively_and_null_deletes() {
        let mut tags = match json!({"a": {"b": 1, "c": 2}, "d": 1}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let patch = match json!({"a": {"b": null, "e": 3}, "d": null}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        merge_tags(&mut tags, &patch);
        assert_eq!(Value::Object(tags), json!({"a": {"c": 2, "e": 3}}));
    }

    #[test]
    fn twin_input_ignores_echoed_read_only_fields() {
        let body = json!({
            "deviceId": "d", "etag": "AAAA", "version": 3, "status": "enabled",
            "x509Thumbprint": {}, "connectionState": "Disconnected",
            "tags": {"t": 1},
            "properties": {"desired": {"x": 1, "$version": 2, "$metadata": {}}, "reported": {"r": 1}}
        });
        let input = parse_twin_input(&body).unwrap();
        assert_eq!(Value::Object(input.tags.unwrap()), json!({"t": 1}));
        assert_eq!(Value::Object(input.desired.unwrap()), json!({"x": 1}));
    }
}

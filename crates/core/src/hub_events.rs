//! The hub's own events (IoT Hub's "non-telemetry events"): twin changes, device lifecycle,
//! device connection state and job lifecycle, built as IoT Hub builds them and handed to
//! routing (`Hub::emit_event`) after the operation they report has committed.
//!
//! Every event is a [`Message`] with IoT Hub's common shape: system properties
//! `content-type: application/json`, `content-encoding: utf-8`, `correlation-id` a fresh
//! UUID and `user-id` the hub name; the stamp's `source` is the category's
//! `iothub-message-source` and its device id `iothub-connection-device-id`; application
//! properties `hubName`, `deviceId`, `operationTimestamp` (7 fractional digits), `opType`
//! and `iothub-message-schema`. The bodies:
//!
//! | source | schema | opType | body |
//! |---|---|---|---|
//! | `twinChangeEvents` | `twinChangeNotification` | `updateTwin` | `{version, [tags], properties: {desired\|reported: {<patch>, $metadata, $version}}}` |
//! | `twinChangeEvents` | `twinChangeNotification` | `replaceTwin` | `{deviceId, etag, version, [tags], properties: {desired, reported}}` |
//! | `deviceLifecycleEvents` | `deviceLifecycleNotification` | `createDeviceIdentity`, `deleteDeviceIdentity` | as `replaceTwin` |
//! | `deviceConnectionStateEvents` | `deviceConnectionStateNotification` | `deviceConnected`, `deviceDisconnected` | `{sequenceNumber}` |
//! | `deviceJobLifecycleEvents` | `deviceJobLifecycleNotification` | `jobCreated`, `jobCompleted`, `jobFailed`, `jobCancelled` | the job as `GET /jobs/v2/{id}` returns it |
//!
//! Job lifecycle events are twinhub's own design: IoT Hub names the routing source but
//! documents no event. They carry `jobId` instead of `deviceId` and an empty connection
//! device id, so all of them land in one partition, in order.
//!
//! An event is built only when an enabled route takes its source ([`Hub::routes_events`]),
//! so a hub without such routes pays one check per operation. Builders run while the
//! operation still holds its lock (the event describes exactly the committed state, and
//! connection sequence numbers follow the order of the device's state changes); the append
//! happens after the lock is released, awaited before the operation answers. An event that
//! cannot be kept is logged and dropped: the operation stands. A crash between the commit and
//! the append loses the event (there is no outbox).
//!
//! ## Connection sequence numbers
//!
//! `sequenceNumber` is 64 upper-case hex digits, compared as strings: 16 zeros, then 16
//! digits of a clock in 100 ns ticks since 1601-01-01 (the Windows FILETIME IoT Hub's own
//! numbers carry), then 32 zeros. The clock is hybrid: each value is the current time or,
//! if that is not above the last value issued, the last value + 1, so it is strictly
//! increasing even when the system clock steps back. Across restarts a floor in the store's
//! `meta` table ([`SEQUENCE_FLOOR_KEY`]) is above every value issued: when a value reaches
//! it, a new floor ten minutes of ticks further is committed before the value is used, and
//! a reopened hub starts above the stored floor. So one commit per ten minutes of events at
//! most, and a restart never goes backwards, whatever the clock did.

use serde_json::{Map, Value, json};
use twinhub_proto::message::{Message, Stamp, SystemProperties};
use twinhub_proto::model::JobResponse;
use twinhub_routing::Source;

use crate::error::Result;
use crate::hub::Hub;
use crate::keys;
use crate::record::DeviceRecord;
use crate::twin_doc::Section;

pub const SOURCE_TWIN_CHANGE: &str = "twinChangeEvents";
pub const SOURCE_LIFECYCLE: &str = "deviceLifecycleEvents";
pub const SOURCE_CONNECTION_STATE: &str = "deviceConnectionStateEvents";
pub const SOURCE_JOB_LIFECYCLE: &str = "deviceJobLifecycleEvents";

pub const SCHEMA_TWIN_CHANGE: &str = "twinChangeNotification";
pub const SCHEMA_LIFECYCLE: &str = "deviceLifecycleNotification";
pub const SCHEMA_CONNECTION_STATE: &str = "deviceConnectionStateNotification";
pub const SCHEMA_JOB_LIFECYCLE: &str = "deviceJobLifecycleNotification";

/// One category of events: the routing source that takes it, its `iothub-message-source`
/// and its `iothub-message-schema`.
#[derive(Debug, Clone, Copy)]
struct Category {
    source: Source,
    name: &'static str,
    schema: &'static str,
}

const TWIN_CHANGE: Category = Category {
    source: Source::TwinChangeEvents,
    name: SOURCE_TWIN_CHANGE,
    schema: SCHEMA_TWIN_CHANGE,
};
const LIFECYCLE: Category = Category {
    source: Source::DeviceLifecycleEvents,
    name: SOURCE_LIFECYCLE,
    schema: SCHEMA_LIFECYCLE,
};
const CONNECTION_STATE: Category = Category {
    source: Source::DeviceConnectionStateEvents,
    name: SOURCE_CONNECTION_STATE,
    schema: SCHEMA_CONNECTION_STATE,
};
const JOB_LIFECYCLE: Category = Category {
    source: Source::DeviceJobLifecycleEvents,
    name: SOURCE_JOB_LIFECYCLE,
    schema: SCHEMA_JOB_LIFECYCLE,
};

/// The `meta` key of the connection sequence floor: every sequence number issued is below
/// it (decimal text, in 100 ns ticks since 1601).
pub const SEQUENCE_FLOOR_KEY: &str = "connection_sequence_floor";

/// How far above the value that reached it a new floor is set: ten minutes of ticks.
pub(crate) const FLOOR_RESERVE: u64 = 10 * 60 * 10_000_000;
/// 100 ns ticks from 1601-01-01 to 1970-01-01.
const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// A device lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    Created,
    Deleted,
}

/// A job lifecycle step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobStep {
    Created,
    /// The job reached this terminal status (`completed`, `failed`, `cancelled`).
    Ended,
}

/// A system event built while its operation held the lock, to be emitted once it is released.
#[must_use = "a built event must be emitted"]
pub(crate) struct HubEvent {
    source: Source,
    message: Message,
}

/// A section's change as a twin change event shows it: the patch as applied (nulls for
/// removals), the metadata of what it touched, and the section's new version.
fn section_change(section: &Section, patch: &Map<String, Value>) -> Value {
    let mut out = patch.clone();
    out.insert(
        "$metadata".into(),
        Value::Object(patch_metadata(&section.metadata, patch)),
    );
    out.insert("$version".into(), Value::from(section.version));
    Value::Object(out)
}

/// The part of a `$metadata` tree that `patch` touched: the `$` stamps of each level, and the
/// entries of the keys the patch set (a removed key has none left).
fn patch_metadata(meta: &Map<String, Value>, patch: &Map<String, Value>) -> Map<String, Value> {
    let mut out: Map<String, Value> = meta
        .iter()
        .filter(|(k, _)| k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in patch {
        match (value, meta.get(key)) {
            (Value::Null, _) | (_, None) => {}
            (Value::Object(sub), Some(Value::Object(m))) => {
                out.insert(key.clone(), Value::Object(patch_metadata(m, sub)));
            }
            (_, Some(m)) => {
                out.insert(key.clone(), m.clone());
            }
        }
    }
    out
}

/// The twin as lifecycle and replace events carry it.
fn twin_body(rec: &DeviceRecord) -> Value {
    let mut body = Map::new();
    body.insert("deviceId".into(), Value::from(rec.device_id.clone()));
    if let Some(module) = &rec.module_id {
        body.insert("moduleId".into(), Value::from(module.clone()));
    }
    body.insert("etag".into(), Value::from(rec.twin_etag()));
    body.insert("version".into(), Value::from(rec.twin.version));
    if !rec.twin.tags.is_empty() {
        body.insert("tags".into(), Value::Object(rec.twin.tags.clone()));
    }
    body.insert(
        "properties".into(),
        json!({
            "desired": rec.twin.desired.to_service_json(),
            "reported": rec.twin.reported.to_service_json(),
        }),
    );
    Value::Object(body)
}

fn sequence_text(ticks: u64) -> String {
    format!("{:016X}{ticks:016X}{:032X}", 0u64, 0u128)
}

fn now_ticks() -> u64 {
    let hundreds = jiff::Timestamp::now().as_nanosecond() / 100;
    u64::try_from(hundreds)
        .map(|t| t.saturating_add(FILETIME_UNIX_EPOCH))
        .unwrap_or(0)
}

impl Hub {
    /// The next connection state sequence number (see the module doc).
    pub(crate) async fn next_connection_sequence(&self) -> Result<String> {
        let value = self
            .connection_sequence
            .next(self.store.as_ref(), now_ticks())
            .await?;
        Ok(sequence_text(value))
    }

    /// An event with IoT Hub's common properties; `key` names the identity (`deviceId` or
    /// `deviceId/moduleId`), empty for hub-level events (jobs), whose `extra` properties say
    /// what they are about.
    fn event(
        &self,
        category: Category,
        op_type: &str,
        key: &str,
        extra: Vec<(String, Option<String>)>,
        operation_time: &str,
        body: &Value,
    ) -> HubEvent {
        let hub = twinhub_proto::connection_string::hub_name(self.auth.hostname());
        let mut application = Vec::with_capacity(5 + extra.len());
        application.push(("hubName".to_owned(), Some(hub.clone())));
        let (device_id, module_id) = crate::record::split_identity(key);
        if !device_id.is_empty() {
            application.push(("deviceId".to_owned(), Some(device_id.to_owned())));
        }
        if let Some(module) = module_id {
            application.push(("moduleId".to_owned(), Some(module.to_owned())));
        }
        application.extend(extra);
        application.push((
            "operationTimestamp".to_owned(),
            Some(operation_time.to_owned()),
        ));
        application.push(("opType".to_owned(), Some(op_type.to_owned())));
        application.push((
            "iothub-message-schema".to_owned(),
            Some(category.schema.to_owned()),
        ));
        let message = Message {
            system: SystemProperties {
                correlation_id: Some(keys::lock_token()),
                user_id: Some(hub),
                content_type: Some("application/json".to_owned()),
                content_encoding: Some("utf-8".to_owned()),
                ..SystemProperties::default()
            },
            application,
            stamp: Stamp {
                device_id: device_id.to_owned(),
                module_id: module_id.map(str::to_owned),
                source: category.name.to_owned(),
                ..Stamp::default()
            },
            body: serde_json::to_vec(body).unwrap_or_default(),
        };
        HubEvent {
            source: category.source,
            message,
        }
    }

    /// `updateTwin` for a committed patch of `rec`: the tags, desired and reported patches
    /// as applied (each optional).
    pub(crate) fn twin_updated_event(
        &self,
        rec: &DeviceRecord,
        operation_time: &str,
        tags: Option<&Map<String, Value>>,
        desired: Option<&Map<String, Value>>,
        reported: Option<&Map<String, Value>>,
    ) -> Option<HubEvent> {
        if !self.routes_events(TWIN_CHANGE.source) {
            return None;
        }
        let mut body = Map::new();
        body.insert("version".into(), Value::from(rec.twin.version));
        if let Some(tags) = tags {
            body.insert("tags".into(), Value::Object(tags.clone()));
        }
        let mut properties = Map::new();
        if let Some(patch) = desired {
            properties.insert("desired".into(), section_change(&rec.twin.desired, patch));
        }
        if let Some(patch) = reported {
            properties.insert("reported".into(), section_change(&rec.twin.reported, patch));
        }
        if !properties.is_empty() {
            body.insert("properties".into(), Value::Object(properties));
        }
        Some(self.device_event(
            TWIN_CHANGE,
            "updateTwin",
            rec,
            operation_time,
            &Value::Object(body),
        ))
    }

    /// `replaceTwin` for a committed replacement of `rec`'s twin.
    pub(crate) fn twin_replaced_event(
        &self,
        rec: &DeviceRecord,
        operation_time: &str,
    ) -> Option<HubEvent> {
        if !self.routes_events(TWIN_CHANGE.source) {
            return None;
        }
        Some(self.device_event(
            TWIN_CHANGE,
            "replaceTwin",
            rec,
            operation_time,
            &twin_body(rec),
        ))
    }

    /// Whether lifecycle events are wanted: bulk operations ask once, not per device.
    pub(crate) fn wants_lifecycle_events(&self) -> bool {
        self.routes_events(LIFECYCLE.source)
    }

    /// `createDeviceIdentity` (with the new record) or `deleteDeviceIdentity` (with the record
    /// as it was).
    pub(crate) fn lifecycle_event(
        &self,
        rec: &DeviceRecord,
        operation_time: &str,
        op: Lifecycle,
    ) -> Option<HubEvent> {
        if !self.wants_lifecycle_events() {
            return None;
        }
        // Modules too: a real hub's module events carry these with a `moduleId` property.
        let op_type = match op {
            Lifecycle::Created => "createDeviceIdentity",
            Lifecycle::Deleted => "deleteDeviceIdentity",
        };
        Some(self.device_event(LIFECYCLE, op_type, rec, operation_time, &twin_body(rec)))
    }

    fn device_event(
        &self,
        category: Category,
        op_type: &str,
        rec: &DeviceRecord,
        operation_time: &str,
        body: &Value,
    ) -> HubEvent {
        self.event(
            category,
            op_type,
            &rec.key(),
            Vec::new(),
            operation_time,
            body,
        )
    }

    /// `deviceConnected` or `deviceDisconnected`, numbered from the sequence clock. Called
    /// under the device lock, so a device's numbers follow the order of its state changes.
    /// A sequence number that cannot be had (the floor's commit failed) costs the event, with
    /// a log line, never the connection.
    pub(crate) async fn connection_event(
        &self,
        device_id: &str,
        operation_time: &str,
        connected: bool,
    ) -> Option<HubEvent> {
        if !self.routes_events(CONNECTION_STATE.source) {
            return None;
        }
        let sequence = match self.next_connection_sequence().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    device_id,
                    "a connection state event was not made: {}",
                    e.message()
                );
                return None;
            }
        };
        let op_type = if connected {
            "deviceConnected"
        } else {
            "deviceDisconnected"
        };
        Some(self.event(
            CONNECTION_STATE,
            op_type,
            device_id,
            Vec::new(),
            operation_time,
            &json!({ "sequenceNumber": sequence }),
        ))
    }

    /// `jobCreated`, or `jobCompleted` / `jobFailed` / `jobCancelled` by the job's status.
    pub(crate) fn job_event(&self, job: &JobResponse, step: JobStep) -> Option<HubEvent> {
        if !self.routes_events(JOB_LIFECYCLE.source) {
            return None;
        }
        let op_type = match (step, job.status.as_str()) {
            (JobStep::Created, _) => "jobCreated",
            (JobStep::Ended, "completed") => "jobCompleted",
            (JobStep::Ended, "cancelled") => "jobCancelled",
            (JobStep::Ended, _) => "jobFailed",
        };
        let body = serde_json::to_value(job).unwrap_or(Value::Null);
        Some(self.event(
            JOB_LIFECYCLE,
            op_type,
            "",
            vec![("jobId".to_owned(), Some(job.job_id.clone()))],
            &keys::now_text(),
            &body,
        ))
    }

    /// Routes the events, in order (one device's events must keep theirs).
    pub(crate) async fn emit(&self, events: impl IntoIterator<Item = HubEvent>) {
        for event in events {
            self.emit_event(event.source, event.message).await;
        }
    }

    /// Routes events of distinct devices side by side (a bulk operation's), so their appends
    /// share the logs' group commits.
    pub(crate) async fn emit_concurrently(&self, events: Vec<HubEvent>) {
        futures_util::future::join_all(
            events
                .into_iter()
                .map(|e| self.emit_event(e.source, e.message)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test input is an object"),
        }
    }

    #[test]
    fn sequence_text_has_64_digits_and_orders_as_numbers() {
        let a = sequence_text(0x01D8_713F_F7E0_8514);
        assert_eq!(
            a,
            "000000000000000001D8713FF7E0851400000000000000000000000000000000"
        );
        let b = sequence_text(0x01D8_713F_F7E0_8515);
        let c = sequence_text(0x11D8_713F_F7E0_8515);
        assert!(a < b && b < c);
        assert_eq!(c.len(), 64);
    }

    #[test]
    fn patch_metadata_keeps_only_what_the_patch_touched() {
        let meta = obj(json!({
            "$lastUpdated": "t2", "$lastUpdatedVersion": 3,
            "a": {"$lastUpdated": "t2", "$lastUpdatedVersion": 3},
            "b": {"$lastUpdated": "t1", "$lastUpdatedVersion": 2},
            "n": {"$lastUpdated": "t2", "$lastUpdatedVersion": 3,
                  "x": {"$lastUpdated": "t2", "$lastUpdatedVersion": 3},
                  "y": {"$lastUpdated": "t1", "$lastUpdatedVersion": 2}}
        }));
        let patch = obj(json!({"a": 1, "gone": null, "n": {"x": 5}}));
        assert_eq!(
            Value::Object(patch_metadata(&meta, &patch)),
            json!({
                "$lastUpdated": "t2", "$lastUpdatedVersion": 3,
                "a": {"$lastUpdated": "t2", "$lastUpdatedVersion": 3},
                "n": {"$lastUpdated": "t2", "$lastUpdatedVersion": 3,
                      "x": {"$lastUpdated": "t2", "$lastUpdatedVersion": 3}}
            })
        );
    }
}

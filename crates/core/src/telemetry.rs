//! Device-to-cloud messages: decoded from the MQTT property bag, stamped with what IoT Hub
//! stamps (identity, auth method, generation, source), and appended durably to the built-in
//! endpoint's event log (`twinhub_eventlog`), partitioned by a stable hash of the device id.
//! Also the endpoint's consumer groups, kept in the store's meta table. The AMQP endpoint in
//! the server reads the log through [`Events`].

use std::sync::{Arc, RwLock};

use twinhub_eventlog::{EventLog, NewEvent, partition_for};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::message::{
    AUTH_METHOD_DEVICE_SAS, AUTH_METHOD_MODULE_SAS, Message, MessageError, SOURCE_TELEMETRY, Stamp,
};
use twinhub_store::{Table, Write};

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::twins::SessionRef;

/// The consumer group every Event Hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";
/// Event Hubs' limit on consumer groups per hub (standard tier).
pub const MAX_CONSUMER_GROUPS: usize = 20;
const CONSUMER_GROUPS_KEY: &str = "consumer_groups";

/// The built-in endpoint: its log and its consumer groups.
pub struct Events {
    log: Arc<dyn EventLog>,
    /// Created when the hub opened (the endpoint's `created_at`).
    created_ms: i64,
    /// Every group but `$Default`, as created (names match case-insensitively).
    groups: RwLock<Vec<String>>,
    /// Serializes changes to `groups` and their commit.
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("partitions", &self.log.partition_count())
            .finish()
    }
}

impl Events {
    pub(crate) fn new(log: Arc<dyn EventLog>) -> Events {
        Events {
            log,
            created_ms: crate::keys::now_millis(),
            groups: RwLock::new(Vec::new()),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// The group's name as created, if it exists (`$Default` always does).
    pub fn consumer_group(&self, name: &str) -> Option<String> {
        if name.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP) {
            return Some(DEFAULT_CONSUMER_GROUP.to_owned());
        }
        let groups = self.groups.read().unwrap_or_else(|e| e.into_inner());
        groups
            .iter()
            .find(|g| g.eq_ignore_ascii_case(name))
            .cloned()
    }

    pub fn consumer_groups(&self) -> Vec<String> {
        std::iter::once(DEFAULT_CONSUMER_GROUP.to_owned())
            .chain(self.created_groups())
            .collect()
    }

    /// The groups created besides `$Default`.
    fn created_groups(&self) -> Vec<String> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn message_error(e: MessageError) -> Error {
    match e {
        MessageError::TooLarge(_) => Error::new(ErrorCode::MessageTooLarge, e.to_string()),
        _ => Error::invalid(e.to_string()),
    }
}

/// An event log failure in IoT Hub's terms, for whoever reads or writes the log.
pub fn log_error(e: twinhub_eventlog::Error) -> Error {
    match e {
        twinhub_eventlog::Error::TooLarge { .. } => {
            Error::new(ErrorCode::MessageTooLarge, e.to_string())
        }
        twinhub_eventlog::Error::Closed => {
            Error::new(ErrorCode::ServiceUnavailable, "The hub is shutting down")
        }
        e => {
            tracing::debug!(error = %e, "event log unavailable");
            Error::new(
                ErrorCode::ServiceUnavailable,
                "The hub's event storage is unavailable; retry later",
            )
        }
    }
}

/// Consumer group names as Event Hubs allows them: 1 to 50 letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit.
pub fn validate_consumer_group(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 50
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "Consumer group name {} is invalid: use 1 to 50 letters, digits, '.', '_' or '-', starting with a letter or digit",
            crate::logsafe::Shown(name)
        )))
    }
}

/// How a telemetry message reached the hub.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    /// An MQTT RETAIN publish (`mqtt-retain=true`).
    pub retain: bool,
    /// The device's will, sent because it dropped (`iothub-MessageType=Will`).
    pub will: bool,
    /// The model id from the MQTT user name's `model-id`.
    pub model_id: Option<&'a str>,
}

impl Hub {
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Appends a device's telemetry publish to the built-in endpoint; returns once it is
    /// durable (the caller acknowledges only then).
    pub async fn send_telemetry(
        &self,
        session: &SessionRef<'_>,
        property_bag: &str,
        body: Vec<u8>,
        origin: Origin<'_>,
    ) -> Result<()> {
        let event = self.prepare_telemetry(session, property_bag, body, origin)?;
        self.append_telemetry(session.device_id, vec![event]).await
    }

    /// Checks and stamps one telemetry publish (property bag, IoT Hub's size limit) and encodes
    /// it for the log, without writing it: a session gathers what one read brought and appends
    /// it with [`Hub::append_telemetry`] in one go.
    pub fn prepare_telemetry(
        &self,
        session: &SessionRef<'_>,
        property_bag: &str,
        body: Vec<u8>,
        origin: Origin<'_>,
    ) -> Result<NewEvent> {
        self.prepare_device_telemetry(
            session.device_id,
            session.generation_id,
            property_bag,
            body,
            origin,
        )
    }

    /// [`Hub::prepare_telemetry`] for an identity known by key (`deviceId` or
    /// `deviceId/moduleId`) and generation (the HTTPS endpoint, which has no session).
    pub fn prepare_device_telemetry(
        &self,
        key: &str,
        generation_id: &str,
        property_bag: &str,
        body: Vec<u8>,
        origin: Origin<'_>,
    ) -> Result<NewEvent> {
        let mut message = Message::from_property_bag(property_bag, body).map_err(message_error)?;
        if origin.retain {
            message
                .application
                .push(("mqtt-retain".to_owned(), Some("true".to_owned())));
        }
        if origin.will {
            message
                .application
                .push(("iothub-MessageType".to_owned(), Some("Will".to_owned())));
        }
        let (device_id, module_id) = crate::record::split_identity(key);
        message.stamp = Stamp {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
            auth_method: if module_id.is_some() {
                AUTH_METHOD_MODULE_SAS
            } else {
                AUTH_METHOD_DEVICE_SAS
            }
            .to_owned(),
            generation_id: generation_id.to_owned(),
            source: SOURCE_TELEMETRY.to_owned(),
            data_schema: origin.model_id.map(str::to_owned),
        };
        Ok(NewEvent {
            data: message.encode().into(),
        })
    }

    /// Appends one device's prepared messages, in order, to its partition of the built-in
    /// endpoint, or routes them when routes or enrichments are configured; returns once they
    /// are durable. A failure acknowledges nothing. `key` names the sending identity; a
    /// module's messages go to its device's partition.
    pub async fn append_telemetry(&self, key: &str, events: Vec<NewEvent>) -> Result<()> {
        let count = events.len() as u64;
        let router = self.routing.router();
        if router.has_routes() || !router.config().enrichments.is_empty() {
            let messages = events
                .iter()
                .map(|e| Message::decode(&e.data).map_err(message_error))
                .collect::<Result<Vec<_>>>()?;
            self.route_messages(twinhub_routing::Source::DeviceMessages, key, messages)
                .await?;
            metrics::counter!("twinhub_d2c_messages_total").increment(count);
            return Ok(());
        }
        let log = &self.events.log;
        let (device_id, _) = crate::record::split_identity(key);
        let partition = partition_for(device_id, log.partition_count());
        log.append(partition, events).await.map_err(log_error)?;
        metrics::counter!("twinhub_d2c_messages_total").increment(count);
        Ok(())
    }

    /// Loads the consumer groups from the store (at open).
    pub(crate) async fn load_consumer_groups(&self) -> Result<()> {
        let groups = match self.store.get(Table::Meta, CONSUMER_GROUPS_KEY).await? {
            Some(bytes) => serde_json::from_slice::<Vec<String>>(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, "the stored consumer groups cannot be decoded; starting with $Default only");
                Vec::new()
            }),
            None => Vec::new(),
        };
        *self
            .events
            .groups
            .write()
            .unwrap_or_else(|e| e.into_inner()) = groups;
        Ok(())
    }

    async fn save_consumer_groups(&self, groups: Vec<String>) -> Result<()> {
        let bytes = serde_json::to_vec(&groups).unwrap_or_default();
        self.store
            .commit(vec![Write::put(Table::Meta, CONSUMER_GROUPS_KEY, bytes)])
            .await?;
        *self
            .events
            .groups
            .write()
            .unwrap_or_else(|e| e.into_inner()) = groups;
        Ok(())
    }

    /// Creates a consumer group; creating one that exists is not an error (as ARM's PUT).
    pub async fn create_consumer_group(&self, name: &str) -> Result<String> {
        validate_consumer_group(name)?;
        let _changing = self.events.changing.lock().await;
        if let Some(existing) = self.events.consumer_group(name) {
            return Ok(existing);
        }
        let mut groups = self.events.created_groups();
        if groups.len() + 1 >= MAX_CONSUMER_GROUPS {
            return Err(Error::new(
                ErrorCode::IotHubQuotaExceeded,
                format!("A hub has at most {MAX_CONSUMER_GROUPS} consumer groups"),
            ));
        }
        groups.push(name.to_owned());
        self.save_consumer_groups(groups).await?;
        Ok(name.to_owned())
    }

    /// Deletes a consumer group. `$Default` cannot be deleted.
    pub async fn delete_consumer_group(&self, name: &str) -> Result<()> {
        if name.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP) {
            return Err(Error::invalid(
                "The $Default consumer group cannot be deleted",
            ));
        }
        let _changing = self.events.changing.lock().await;
        let mut groups = self.events.created_groups();
        let before = groups.len();
        groups.retain(|g| !g.eq_ignore_ascii_case(name));
        if groups.len() == before {
            return Err(Error::new(
                ErrorCode::IotHubNotFound,
                format!("Consumer group {} not found", crate::logsafe::Shown(name)),
            ));
        }
        self.save_consumer_groups(groups).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_group_names() {
        for ok in ["a", "reader-1", "x.y_z", &"a".repeat(50)] {
            assert!(validate_consumer_group(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "$Default2", "a b", "a/b", &"a".repeat(51)] {
            assert!(validate_consumer_group(bad).is_err(), "{bad}");
        }
    }
}

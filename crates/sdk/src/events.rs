//! Reading device-to-cloud messages back from the hub's built-in Event Hub-compatible endpoint
//! over AMQP 1.0 (TLS on 5671), as the Event Hubs SDKs do: SASL PLAIN with a SAS token for a
//! policy with ServiceConnect, a `$management` READ for the partition ids, and one receiver
//! link per partition with a selector filter for the starting point. Works with the
//! Event Hub-compatible connection string (`twinhub connection-string --events`) or with the
//! IoT Hub one (the hub's `amqp:link:redirect` names the endpoint). Built on fe2o3-amqp's
//! client over our own rustls stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Properties, Source,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use tokio::sync::mpsc;
use twinhub_proto::connection_string::ConnectionString;

use crate::error::{Error, Result};

/// How long connecting (TCP, TLS, AMQP open) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Lifetime of the SAS token presented at sign-in.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Events buffered between the partition links and the reader.
const BUFFER: usize = 1024;

/// Where a reader starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest event kept.
    Earliest,
    /// Only events enqueued from now on.
    Latest,
    /// Events enqueued at or after this time (milliseconds since the epoch).
    EnqueuedTime(i64),
    /// Events after this sequence number (exclusive).
    AfterSequence(i64),
    /// Events after this offset (exclusive), as read from an earlier event.
    AfterOffset(u64),
}

impl StartPosition {
    fn selector(self) -> String {
        match self {
            StartPosition::Earliest => "amqp.annotation.x-opt-offset > '-1'".into(),
            StartPosition::Latest => "amqp.annotation.x-opt-offset > '@latest'".into(),
            StartPosition::EnqueuedTime(ms) => {
                format!("amqp.annotation.x-opt-enqueued-time >= '{ms}'")
            }
            StartPosition::AfterSequence(n) => {
                format!("amqp.annotation.x-opt-sequence-number > '{n}'")
            }
            StartPosition::AfterOffset(o) => format!("amqp.annotation.x-opt-offset > '{o}'"),
        }
    }
}

/// One event read from the endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub partition: String,
    pub sequence_number: i64,
    pub offset: String,
    /// Milliseconds since the epoch.
    pub enqueued_time: i64,
    /// `iothub-connection-device-id`.
    pub device_id: Option<String>,
    /// `iothub-connection-module-id`.
    pub module_id: Option<String>,
    /// The message annotations (`iothub-*`, `x-opt-*`, ...), as JSON values.
    pub annotations: BTreeMap<String, serde_json::Value>,
    /// The AMQP properties section that was set (`message-id`, `content-type`, ...).
    pub system_properties: BTreeMap<String, serde_json::Value>,
    /// Application properties (a null value stays null).
    pub properties: BTreeMap<String, Option<String>>,
    pub body: Vec<u8>,
}

/// Builds an [`EventsClient`].
#[derive(Debug, Clone)]
pub struct EventsClientBuilder {
    connection_string: String,
    extra_ca: Vec<Vec<u8>>,
    consumer_group: String,
    port: Option<u16>,
}

impl EventsClientBuilder {
    /// Trusts this CA (PEM) besides the system roots (e.g. twinhub's `tls/ca.pem`).
    pub fn extra_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca.push(pem.into());
        self
    }

    /// The consumer group to read as (default `$Default`).
    pub fn consumer_group(mut self, group: impl Into<String>) -> Self {
        self.consumer_group = group.into();
        self
    }

    /// Dials this port instead of 5671 (or the one in the connection string's `Endpoint`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Connects and signs in.
    pub async fn connect(self) -> Result<EventsClient> {
        let target = Target::parse(&self.connection_string, self.port)?;
        let tls = crate::device::settings::tls_config(&self.extra_ca)?;
        let target = match target.entity.clone() {
            Some(_) => target,
            None => discover(&target, &tls).await?,
        };
        let (connection, session) = open(&target, &tls).await?;
        let mut client = EventsClient {
            target,
            consumer_group: self.consumer_group,
            connection: tokio::sync::Mutex::new(connection),
            session: tokio::sync::Mutex::new(session),
            partitions: Vec::new(),
            management: tokio::sync::Mutex::new(None),
        };
        client.partitions = client.read_partition_ids().await?;
        Ok(client)
    }
}

/// Where and how to sign in.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    /// The event hub's name; `None` until the IoT Hub host's redirect names it.
    entity: Option<String>,
    policy: String,
    key: String,
    /// The name the hub is known by in SAS `sr` (the IoT Hub host name).
    sr_host: String,
}

impl Target {
    fn parse(cs: &str, port: Option<u16>) -> Result<Target> {
        let fields: BTreeMap<String, String> = cs
            .split(';')
            .filter(|p| !p.trim().is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        if let Some(endpoint) = fields.get("endpoint") {
            // Endpoint=sb://host[:port]/;SharedAccessKeyName=..;SharedAccessKey=..;EntityPath=..
            let rest = endpoint
                .split_once("://")
                .map_or(endpoint.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or(rest);
            let (host, given_port) = match authority.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), p.parse().ok()),
                _ => (authority.to_owned(), None),
            };
            let get = |k: &str| {
                fields.get(k).cloned().ok_or_else(|| {
                    Error::ConnectionString(format!("the Event Hub connection string has no {k}"))
                })
            };
            return Ok(Target {
                sr_host: host.clone(),
                host,
                port: port.or(given_port).unwrap_or(5671),
                entity: Some(get("entitypath")?),
                policy: get("sharedaccesskeyname")?,
                key: get("sharedaccesskey")?,
            });
        }
        let cs: ConnectionString =
            cs.parse()
                .map_err(|e: twinhub_proto::ConnectionStringError| {
                    Error::ConnectionString(e.to_string())
                })?;
        let (policy, key) = match (&cs.shared_access_key_name, &cs.shared_access_key) {
            (Some(p), Some(k)) if cs.device_id.is_none() => (p.clone(), k.clone()),
            _ => {
                return Err(Error::ConnectionString(
                    "reading events needs a service connection string (SharedAccessKeyName and SharedAccessKey)".into(),
                ));
            }
        };
        let host_name = cs.host_name.clone();
        let host = host_name.split(':').next().unwrap_or(&host_name).to_owned();
        Ok(Target {
            sr_host: host_name,
            host,
            port: port.unwrap_or(5671),
            entity: None,
            policy,
            key,
        })
    }

    fn plain(&self) -> Result<SaslProfile> {
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + TOKEN_TTL.as_secs();
        let token = twinhub_proto::sas::generate_sas_token(
            &self.sr_host,
            &self.key,
            Some(&self.policy),
            expiry,
        )
        .map_err(|e| Error::ConnectionString(e.to_string()))?;
        Ok(SaslProfile::Plain {
            username: format!("{}@sas.root.{}", self.policy, self.sr_host),
            password: token,
        })
    }
}

async fn open(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>)> {
    let work = crate::amqp::connect(&target.host, target.port, tls.clone(), target.plain()?);
    tokio::time::timeout(CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| Error::TimedOut)?
}

/// Asks the IoT Hub host where its events are: a receiver on `messages/events/$management`
/// is detached with `amqp:link:redirect`, whose info names the endpoint.
async fn discover(target: &Target, tls: &Arc<rustls::ClientConfig>) -> Result<Target> {
    let (mut connection, mut session) = open(target, tls).await?;
    let attached = Receiver::attach(
        &mut session,
        format!("discover-{}", random_suffix()),
        "messages/events/$management",
    )
    .await;
    let result = match attached {
        Err(fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(e))
            if e.condition
                == fe2o3_amqp::types::definitions::ErrorCondition::LinkError(
                    fe2o3_amqp::types::definitions::LinkError::Redirect,
                ) =>
        {
            redirect_target(target, e.info.as_deref())
        }
        Err(e) => Err(Error::Protocol(format!(
            "expected a redirect from messages/events/$management, got {e}"
        ))),
        Ok(mut receiver) => {
            // The redirect may come as a detach right after the attach.
            match tokio::time::timeout(Duration::from_secs(5), receiver.recv::<Body<Value>>()).await
            {
                Ok(Err(fe2o3_amqp::link::RecvError::LinkStateError(
                    fe2o3_amqp::link::LinkStateError::RemoteClosedWithError(e),
                ))) => redirect_target(target, e.info.as_deref()),
                _ => Err(Error::Protocol(
                    "messages/events/$management did not redirect".into(),
                )),
            }
        }
    };
    let _ = session.end().await;
    let _ = connection.close().await;
    result
}

fn redirect_target(
    target: &Target,
    info: Option<&fe2o3_amqp::types::definitions::Fields>,
) -> Result<Target> {
    let info = info.ok_or_else(|| Error::Protocol("a redirect without info".into()))?;
    let text = |k: &str| match info.get(&Symbol::from(k)) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Symbol(s)) => Some(s.0.clone()),
        _ => None,
    };
    let address =
        text("address").ok_or_else(|| Error::Protocol("a redirect without address".into()))?;
    // amqps://host:port/<entity>/$management
    let path = address
        .split_once("://")
        .map_or(address.as_str(), |(_, r)| r);
    let mut parts = path.splitn(3, '/');
    let authority = parts.next().unwrap_or("");
    let entity = parts.next().filter(|e| !e.is_empty()).ok_or_else(|| {
        Error::Protocol(format!("a redirect address without an entity: {address}"))
    })?;
    let port = match info.get(&Symbol::from("port")) {
        Some(Value::Int(p)) => u16::try_from(*p).ok(),
        Some(Value::Long(p)) => u16::try_from(*p).ok(),
        _ => authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
    };
    let mut next = target.clone();
    if let Some(host) = text("hostname") {
        next.host = host;
    }
    next.port = port.unwrap_or(target.port);
    next.entity = Some(entity.to_owned());
    Ok(next)
}

fn random_suffix() -> String {
    format!("{:012x}", crate::device::backoff::random_u64() >> 16)
}

/// A client of the built-in events endpoint.
pub struct EventsClient {
    target: Target,
    consumer_group: String,
    connection: tokio::sync::Mutex<ConnectionHandle<()>>,
    session: tokio::sync::Mutex<SessionHandle<()>>,
    partitions: Vec<String>,
    management: tokio::sync::Mutex<Option<(Sender, Receiver)>>,
}

impl std::fmt::Debug for EventsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsClient")
            .field("host", &self.target.host)
            .field("port", &self.target.port)
            .field("entity", &self.target.entity)
            .field("consumer_group", &self.consumer_group)
            .finish_non_exhaustive()
    }
}

impl EventsClient {
    /// A builder from an Event Hub-compatible or an IoT Hub service connection string.
    pub fn builder(connection_string: &str) -> EventsClientBuilder {
        EventsClientBuilder {
            connection_string: connection_string.to_owned(),
            extra_ca: Vec::new(),
            consumer_group: "$Default".into(),
            port: None,
        }
    }

    /// The event hub's name.
    pub fn event_hub_name(&self) -> &str {
        self.target.entity.as_deref().unwrap_or_default()
    }

    /// The partition ids, as the endpoint reported them.
    pub fn partition_ids(&self) -> &[String] {
        &self.partitions
    }

    async fn read_partition_ids(&self) -> Result<Vec<String>> {
        let mut session = self.session.lock().await;
        let suffix = random_suffix();
        let mut replies =
            Receiver::attach(&mut *session, format!("mgmt-rx-{suffix}"), "$management")
                .await
                .map_err(|e| Error::Protocol(format!("attaching to $management: {e}")))?;
        let mut requests =
            Sender::attach(&mut *session, format!("mgmt-tx-{suffix}"), "$management")
                .await
                .map_err(|e| Error::Protocol(format!("attaching to $management: {e}")))?;
        drop(session);
        let mut app = ApplicationProperties::builder();
        app = app.insert("operation", SimpleValue::String("READ".into()));
        app = app.insert("type", SimpleValue::String("com.microsoft:eventhub".into()));
        app = app.insert(
            "name",
            SimpleValue::String(self.event_hub_name().to_owned()),
        );
        let request = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::Ulong(1)),
                reply_to: Some("mgmt-reply".into()),
                ..Properties::default()
            })
            .application_properties(app.build())
            .value(Value::Null)
            .build();
        requests
            .send(request)
            .await
            .map_err(|e| Error::Protocol(format!("the $management request failed: {e}")))?;
        let delivery = tokio::time::timeout(CONNECT_TIMEOUT, replies.recv::<Body<Value>>())
            .await
            .map_err(|_| Error::TimedOut)?
            .map_err(|e| Error::Protocol(format!("no $management answer: {e}")))?;
        let _ = replies.accept(&delivery).await;
        let message = delivery.into_message();
        let status = message
            .application_properties
            .as_ref()
            .and_then(|a| a.0.get("status-code"))
            .and_then(|v| match v {
                SimpleValue::Int(s) => Some(*s),
                _ => None,
            })
            .unwrap_or(0);
        // The pair stays attached for the client's life: closing links and attaching new ones
        // on the same session at once is where AMQP peers race on handle reuse.
        *self.management.lock().await = Some((requests, replies));
        if status != 200 {
            return Err(Error::Hub {
                status: u16::try_from(status).unwrap_or(500),
                code: None,
                message: "the $management READ of the event hub failed".into(),
            });
        }
        let Body::Value(v) = message.body else {
            return Err(Error::Protocol(
                "the $management answer has no value".into(),
            ));
        };
        let Value::Map(map) = v.0 else {
            return Err(Error::Protocol(
                "the $management answer is not a map".into(),
            ));
        };
        let ids = map
            .iter()
            .find(|(k, _)| {
                matches!(k, Value::String(s) if s == "partition_ids")
                    || matches!(k, Value::Symbol(s) if s.0 == "partition_ids")
            })
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::Protocol("the $management answer has no partition_ids".into()))?;
        let list = match ids {
            Value::Array(a) => a.0,
            Value::List(l) => l,
            _ => return Err(Error::Protocol("partition_ids is not a list".into())),
        };
        Ok(list
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    /// Reads `partitions` (all when `None`) from `start`; events arrive in order per
    /// partition. The stream ends when the connection does.
    pub async fn receive(
        &self,
        partitions: Option<&[String]>,
        start: StartPosition,
    ) -> Result<EventStream> {
        let wanted: Vec<String> =
            partitions.map_or_else(|| self.partitions.clone(), <[String]>::to_vec);
        let (tx, rx) = mpsc::channel(BUFFER);
        let mut tasks = Vec::new();
        for partition in wanted {
            let address = format!(
                "amqps://{}:{}/{}/ConsumerGroups/{}/Partitions/{}",
                self.target.host,
                self.target.port,
                self.event_hub_name(),
                self.consumer_group,
                partition
            );
            let source = Source::builder()
                .address(address)
                .add_to_filter(
                    Symbol::from("apache.org:selector-filter:string"),
                    Described {
                        descriptor: Descriptor::Name(Symbol::from(
                            "apache.org:selector-filter:string",
                        )),
                        value: Value::String(start.selector()),
                    },
                )
                .build();
            let mut session = self.session.lock().await;
            let receiver = Receiver::builder()
                .name(format!("events-{partition}-{}", random_suffix()))
                .source(source)
                .target(format!("receiver-{}", random_suffix()))
                .attach(&mut *session)
                .await
                .map_err(|e| {
                    Error::Protocol(format!("attaching to partition {partition}: {e:?}"))
                })?;
            drop(session);
            tasks.push(tokio::spawn(pump(receiver, partition, tx.clone())));
        }
        Ok(EventStream { rx, tasks })
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.session.lock().await.end().await;
        let _ = self.connection.lock().await.close().await;
    }
}

async fn pump(mut receiver: Receiver, partition: String, tx: mpsc::Sender<Result<Event>>) {
    loop {
        let delivery = tokio::select! {
            _ = tx.closed() => break,
            d = receiver.recv::<Body<Value>>() => d,
        };
        match delivery {
            Ok(delivery) => {
                let _ = receiver.accept(&delivery).await;
                let event = to_event(&partition, delivery.into_message());
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(recv_error(&partition, e))).await;
                break;
            }
        }
    }
    let _ = receiver.close().await;
}

/// A receiver's end as the SDK reports it: the hub's refusal (with an HTTP-like status for its
/// AMQP condition) or a lost connection.
fn recv_error(partition: &str, e: fe2o3_amqp::link::RecvError) -> Error {
    use fe2o3_amqp::link::{LinkStateError, RecvError};
    use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition, LinkError};
    let remote = match &e {
        RecvError::LinkStateError(LinkStateError::RemoteClosedWithError(err))
        | RecvError::LinkStateError(LinkStateError::RemoteDetachedWithError(err)) => Some(err),
        _ => None,
    };
    let Some(err) = remote else {
        return Error::Unreachable(format!("partition {partition}: {e}"));
    };
    let status = match &err.condition {
        ErrorCondition::AmqpError(AmqpError::NotFound) => 404,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) => 401,
        ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded) => 403,
        ErrorCondition::AmqpError(AmqpError::InvalidField) => 400,
        ErrorCondition::LinkError(LinkError::Stolen) => 409,
        _ => 500,
    };
    Error::Hub {
        status,
        code: None,
        message: format!(
            "partition {partition}: {:?}: {}",
            err.condition,
            err.description.as_deref().unwrap_or("")
        ),
    }
}

fn json_of(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Ubyte(n) => J::from(*n),
        Value::Ushort(n) => J::from(*n),
        Value::Uint(n) => J::from(*n),
        Value::Ulong(n) => J::from(*n),
        Value::Byte(n) => J::from(*n),
        Value::Short(n) => J::from(*n),
        Value::Int(n) => J::from(*n),
        Value::Long(n) => J::from(*n),
        Value::Float(f) => J::from(f.0),
        Value::Double(f) => J::from(f.0),
        Value::Timestamp(t) => J::from(t.milliseconds()),
        Value::String(s) => J::String(s.clone()),
        Value::Symbol(s) => J::String(s.0.clone()),
        Value::Binary(b) => J::String(String::from_utf8_lossy(b).into_owned()),
        other => J::String(format!("{other:?}")),
    }
}

fn id_text(id: &MessageId) -> serde_json::Value {
    match id {
        MessageId::String(s) => serde_json::Value::String(s.clone()),
        MessageId::Ulong(n) => serde_json::Value::from(*n),
        MessageId::Uuid(u) => serde_json::Value::String(format!("{u:?}")),
        MessageId::Binary(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
    }
}

fn to_event(partition: &str, message: Message<Body<Value>>) -> Event {
    let mut annotations = BTreeMap::new();
    if let Some(a) = &message.message_annotations {
        for (k, v) in a.0.iter() {
            let key = match k {
                fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(s) => s.0.clone(),
                fe2o3_amqp::types::messaging::annotations::OwnedKey::Ulong(n) => n.to_string(),
            };
            annotations.insert(key, json_of(v));
        }
    }
    let mut system = BTreeMap::new();
    if let Some(p) = &message.properties {
        if let Some(id) = &p.message_id {
            system.insert("message-id".to_owned(), id_text(id));
        }
        if let Some(id) = &p.correlation_id {
            system.insert("correlation-id".to_owned(), id_text(id));
        }
        if let Some(ct) = &p.content_type {
            system.insert("content-type".to_owned(), ct.0.clone().into());
        }
        if let Some(ce) = &p.content_encoding {
            system.insert("content-encoding".to_owned(), ce.0.clone().into());
        }
        if let Some(u) = &p.user_id {
            system.insert(
                "user-id".to_owned(),
                String::from_utf8_lossy(u).into_owned().into(),
            );
        }
        if let Some(to) = &p.to {
            system.insert("to".to_owned(), to.clone().into());
        }
        if let Some(t) = &p.absolute_expiry_time {
            system.insert("absolute-expiry-time".to_owned(), t.milliseconds().into());
        }
    }
    let mut properties = BTreeMap::new();
    if let Some(app) = &message.application_properties {
        for (k, v) in app.0.iter() {
            let text = match v {
                SimpleValue::Null => None,
                SimpleValue::String(s) => Some(s.clone()),
                SimpleValue::Symbol(s) => Some(s.0.clone()),
                other => Some(format!("{other:?}")),
            };
            properties.insert(k.clone(), text);
        }
    }
    let body = match message.body {
        Body::Data(batch) => batch.into_iter().flat_map(|d| d.0.into_vec()).collect(),
        Body::Value(v) => match v.0 {
            Value::Binary(b) => b.into_vec(),
            Value::String(s) => s.into_bytes(),
            other => format!("{other:?}").into_bytes(),
        },
        _ => Vec::new(),
    };
    let text = |k: &str| {
        annotations
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    Event {
        partition: partition.to_owned(),
        sequence_number: annotations
            .get("x-opt-sequence-number")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(-1),
        offset: text("x-opt-offset").unwrap_or_default(),
        enqueued_time: annotations
            .get("x-opt-enqueued-time")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0),
        device_id: text("iothub-connection-device-id"),
        module_id: text("iothub-connection-module-id"),
        annotations,
        system_properties: system,
        properties,
        body,
    }
}

/// Events as they arrive from the partitions a [`EventsClient::receive`] call reads.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Result<Event>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EventStream {
    /// The next event; `None` once every partition link ended.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        self.rx.recv().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_connection_string_forms() {
        let eh = Target::parse(
            "Endpoint=sb://hub.local:5999/;SharedAccessKeyName=service;SharedAccessKey=a2V5;EntityPath=hub",
            None,
        )
        .unwrap();
        assert_eq!((eh.host.as_str(), eh.port), ("hub.local", 5999));
        assert_eq!(eh.entity.as_deref(), Some("hub"));
        assert_eq!(eh.policy, "service");
        let iothub = Target::parse(
            "HostName=hub.local:8443;SharedAccessKeyName=service;SharedAccessKey=a2V5",
            Some(15671),
        )
        .unwrap();
        assert_eq!((iothub.host.as_str(), iothub.port), ("hub.local", 15671));
        assert_eq!(iothub.sr_host, "hub.local:8443");
        assert!(iothub.entity.is_none());
        assert!(Target::parse("HostName=h;DeviceId=d;SharedAccessKey=a2V5", None).is_err());
    }

    #[test]
    fn selectors() {
        assert_eq!(
            StartPosition::Earliest.selector(),
            "amqp.annotation.x-opt-offset > '-1'"
        );
        assert_eq!(
            StartPosition::EnqueuedTime(5).selector(),
            "amqp.annotation.x-opt-enqueued-time >= '5'"
        );
    }
}

//! The values a device application handles: connection states, direct-method requests and
//! their answers, desired-property patches, the device-side twin, and the two streams that
//! carry requests and patches from the connection task to the application.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::task::Command;
use crate::error::{Error, Result};

/// Where the device's connection stands, as seen through
/// [`DeviceClient::connection_state`](super::DeviceClient::connection_state).
#[derive(Debug, Clone)]
pub enum ConnectionState {
    /// CONNACK accepted; operations flow.
    Connected,
    /// Not connected: before the first `connect`, after a drop (a reconnect follows), or
    /// after `close`.
    Disconnected {
        /// Why, for logs and dashboards.
        reason: String,
    },
    /// Reconnecting: after a drop (with backoff) or to renew the SAS token.
    Reconnecting,
    /// Gave up for good (the hub refused the credentials); every operation now fails.
    Failed(Error),
}

impl ConnectionState {
    /// Whether operations can be sent right now.
    pub fn is_connected(&self) -> bool {
        matches!(self, ConnectionState::Connected)
    }
}

/// A direct-method call from the hub.
///
/// Answer it with [`respond`](MethodRequest::respond) (stream style), or return a
/// [`MethodResponse`] from the handler given to
/// [`set_method_handler`](super::DeviceClient::set_method_handler). A request taken from the
/// stream and dropped unanswered is answered with status 500, so the caller does not wait for
/// its timeout.
pub struct MethodRequest {
    /// The method name, e.g. `reboot`.
    pub name: String,
    /// The request payload (`null` when the caller sent none).
    pub payload: Value,
    /// The hub's `$rid` for this call; the answer must carry it.
    pub request_id: String,
    pub(crate) responder: Responder,
}

impl fmt::Debug for MethodRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodRequest")
            .field("name", &self.name)
            .field("payload", &self.payload)
            .field("request_id", &self.request_id)
            .finish()
    }
}

impl MethodRequest {
    /// Sends the answer (`status` is the device's own code; the caller receives it with
    /// `payload`) and waits until the hub acknowledged it, at most the operation timeout.
    /// Answering twice, or from inside a handler that also returns an answer, sends only the
    /// first.
    pub async fn respond(mut self, status: i32, payload: Value) -> Result<()> {
        self.responder.respond(status, &payload).await
    }
}

/// Sends the answer to one method request through the connection task.
pub(crate) struct Responder {
    pub commands: mpsc::Sender<Command>,
    pub rid: String,
    /// Shared with the handler wrapper so that only one answer ever goes out.
    pub answered: Arc<AtomicBool>,
    /// Stream-delivered requests answer 500 when dropped unanswered; handler requests are
    /// answered by the handler's return value instead.
    pub answer_on_drop: bool,
    pub timeout: Duration,
}

impl Responder {
    async fn respond(&mut self, status: i32, payload: &Value) -> Result<()> {
        if self.answered.swap(true, Ordering::AcqRel) {
            return Err(Error::InvalidArgument(format!(
                "method request {} was already answered",
                self.rid
            )));
        }
        let (done, acked) = oneshot::channel();
        let command = Command::method_response(status, &self.rid, payload, Some(done));
        let wait = async {
            self.commands
                .send(command)
                .await
                .map_err(|_| Error::Closed)?;
            acked.await.map_err(|_| Error::Closed)?
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| Error::TimedOut)?
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.answer_on_drop && !self.answered.swap(true, Ordering::AcqRel) {
            let payload = serde_json::json!({
                "message": "the device dropped the method request without answering it"
            });
            // Best effort: a full queue or a closed client means there is nobody to tell.
            let _ = self
                .commands
                .try_send(Command::method_response(500, &self.rid, &payload, None));
        }
    }
}

/// A handler's answer to a direct method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    /// The device's status code, passed to the caller as is (e.g. 200, 404).
    pub status: i32,
    /// The JSON answer.
    pub payload: Value,
}

impl MethodResponse {
    /// An answer with `status` and `payload`.
    pub fn new(status: i32, payload: Value) -> MethodResponse {
        MethodResponse { status, payload }
    }
}

/// A change to the twin's desired properties.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPatch {
    /// The desired `$version` after this change.
    pub version: u64,
    /// The changed properties (`null` means "removed"), without `$version`. When `full` is
    /// set, the whole desired document instead.
    pub patch: Map<String, Value>,
    /// `true` when this is the whole desired document: the first item of a stream, and after
    /// a reconnect when changes may have been missed. Replace local state rather than merge.
    pub full: bool,
}

/// The device's view of its twin: desired and reported properties with their versions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceTwin {
    /// Desired properties, without `$version` (`$metadata` is kept when the hub sends it).
    pub desired: Map<String, Value>,
    /// Reported properties, without `$version`.
    pub reported: Map<String, Value>,
    /// The desired `$version`.
    pub desired_version: u64,
    /// The reported `$version`.
    pub reported_version: u64,
}

impl DeviceTwin {
    /// Reads the twin GET answer `{"desired": {.., "$version"}, "reported": {.., "$version"}}`.
    pub(crate) fn parse(body: &[u8]) -> Result<DeviceTwin> {
        let doc: Value = serde_json::from_slice(body)
            .map_err(|e| Error::Protocol(format!("the twin is not JSON: {e}")))?;
        let (desired, desired_version) = section(&doc, "desired")?;
        let (reported, reported_version) = section(&doc, "reported")?;
        Ok(DeviceTwin {
            desired,
            reported,
            desired_version,
            reported_version,
        })
    }
}

fn section(doc: &Value, name: &str) -> Result<(Map<String, Value>, u64)> {
    let Some(Value::Object(map)) = doc.get(name) else {
        return Err(Error::Protocol(format!("the twin has no '{name}' object")));
    };
    let mut map = map.clone();
    let version = take_version(&mut map)
        .ok_or_else(|| Error::Protocol(format!("the twin's '{name}' has no $version")))?;
    Ok((map, version))
}

/// Removes `$version` from a properties object and returns it, if it is an unsigned integer.
pub(crate) fn take_version(map: &mut Map<String, Value>) -> Option<u64> {
    map.shift_remove("$version").and_then(|v| v.as_u64())
}

/// Direct-method requests, in arrival order; see
/// [`DeviceClient::method_requests`](super::DeviceClient::method_requests).
///
/// Ends when the client is closed or another stream replaces this one.
pub struct MethodRequests {
    pub(crate) rx: mpsc::Receiver<MethodRequest>,
}

impl fmt::Debug for MethodRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodRequests").finish_non_exhaustive()
    }
}

impl MethodRequests {
    /// The next request, or `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<MethodRequest> {
        self.rx.recv().await
    }
}

impl Stream for MethodRequests {
    type Item = MethodRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<MethodRequest>> {
        self.rx.poll_recv(cx)
    }
}

/// Desired-property changes, in version order; see
/// [`DeviceClient::desired_patches`](super::DeviceClient::desired_patches).
///
/// Ends when the client is closed or another stream replaces this one.
pub struct DesiredPatches {
    pub(crate) rx: mpsc::Receiver<DesiredPatch>,
    /// To wake the connection task once the application reads again after falling behind.
    pub(crate) shared: std::sync::Arc<super::task::Shared>,
}

impl fmt::Debug for DesiredPatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DesiredPatches").finish_non_exhaustive()
    }
}

impl DesiredPatches {
    /// The next patch, or `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<DesiredPatch> {
        let next = self.rx.recv().await;
        self.caught_up();
        next
    }

    /// Patches were dropped while the queue was full: now that there is room, the task reads
    /// the twin and sends the whole document.
    fn caught_up(&self) {
        if self
            .shared
            .desired_lagging
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.shared.changed.notify_one();
        }
    }
}

impl Stream for DesiredPatches {
    type Item = DesiredPatch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DesiredPatch>> {
        let polled = self.rx.poll_recv(cx);
        if polled.is_ready() {
            self.caught_up();
        }
        polled
    }
}

/// Serializes a method answer's payload; `Value` always serializes.
pub(crate) fn json_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_answer_parses_and_loses_its_versions() {
        let body = br#"{"desired":{"a":1,"$version":7},"reported":{"b":{"c":true},"$version":3}}"#;
        let twin = DeviceTwin::parse(body).unwrap();
        assert_eq!(twin.desired_version, 7);
        assert_eq!(twin.reported_version, 3);
        assert_eq!(Value::Object(twin.desired), serde_json::json!({"a": 1}));
        assert_eq!(
            Value::Object(twin.reported),
            serde_json::json!({"b": {"c": true}})
        );
    }

    #[test]
    fn twin_answer_without_versions_is_a_protocol_error() {
        for body in [
            &br#"{"desired":{"a":1},"reported":{"$version":1}}"#[..],
            br#"{"desired":{"$version":1}}"#,
            br#"[]"#,
            b"not json",
        ] {
            assert!(matches!(DeviceTwin::parse(body), Err(Error::Protocol(_))));
        }
    }

    #[tokio::test]
    async fn dropped_stream_request_answers_500_once() {
        let (tx, mut rx) = mpsc::channel(4);
        let req = MethodRequest {
            name: "m".into(),
            payload: Value::Null,
            request_id: "7".into(),
            responder: Responder {
                commands: tx,
                rid: "7".into(),
                answered: Arc::new(AtomicBool::new(false)),
                answer_on_drop: true,
                timeout: Duration::from_secs(1),
            },
        };
        drop(req);
        match rx.try_recv() {
            Ok(Command::Publish(p)) => {
                assert_eq!(p.topic.as_str(), "$iothub/methods/res/500/?$rid=7");
            }
            _ => panic!("expected a 500 answer"),
        }
        assert!(rx.try_recv().is_err());
    }
}

/// A cloud-to-device message, as the hub delivered it over MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudToDeviceMessage {
    pub body: Bytes,
    /// `$.mid`
    pub message_id: Option<String>,
    /// `$.cid`
    pub correlation_id: Option<String>,
    /// `$.uid`
    pub user_id: Option<String>,
    /// `$.ct`
    pub content_type: Option<String>,
    /// `$.ce`
    pub content_encoding: Option<String>,
    /// `$.exp`: the absolute expiry, as the hub wrote it.
    pub expiry: Option<String>,
    /// `iothub-ack`: the feedback the sender asked for (`none` when absent).
    pub ack: String,
    /// The application properties, in the order the hub sent them.
    pub properties: Vec<(String, String)>,
    /// The hub delivered it before (DUP): the previous connection ended before it was taken.
    pub redelivered: bool,
}

impl CloudToDeviceMessage {
    /// Reads the property bag of a `devices/{id}/messages/devicebound/{bag}` topic.
    pub(crate) fn from_bag(bag: &str, body: Bytes, redelivered: bool) -> CloudToDeviceMessage {
        let mut m = CloudToDeviceMessage {
            body,
            message_id: None,
            correlation_id: None,
            user_id: None,
            content_type: None,
            content_encoding: None,
            expiry: None,
            ack: "none".to_owned(),
            properties: Vec::new(),
            redelivered,
        };
        for (key, value) in twinhub_proto::topic::parse_property_bag(bag) {
            let slot = match key.as_str() {
                "$.mid" => &mut m.message_id,
                "$.cid" => &mut m.correlation_id,
                "$.uid" => &mut m.user_id,
                "$.ct" => &mut m.content_type,
                "$.ce" => &mut m.content_encoding,
                "$.exp" => &mut m.expiry,
                "$.to" => continue,
                "iothub-ack" => {
                    m.ack = value;
                    continue;
                }
                _ => {
                    m.properties.push((key, value));
                    continue;
                }
            };
            *slot = Some(value);
        }
        m
    }

    /// The value of application property `name`, if the message carries it.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One delivery waiting in the stream: which connection it came on and under which packet
/// id, so taking it acknowledges it there.
pub(crate) struct C2dDelivery {
    pub connection: u64,
    pub pkid: u16,
    pub message: CloudToDeviceMessage,
}

/// Cloud-to-device messages as a stream, in the order the hub sent them, from
/// [`DeviceClient::c2d_messages`](super::DeviceClient::c2d_messages).
///
/// Taking a message with [`recv`](CloudToDeviceMessages::recv) completes it at the hub (MQTT's
/// PUBACK, which is all MQTT allows a device: no reject, no abandon). A message the
/// connection lost before it was taken is delivered again after the reconnect.
pub struct CloudToDeviceMessages {
    pub(crate) rx: mpsc::Receiver<C2dDelivery>,
    pub(crate) commands: mpsc::Sender<Command>,
}

impl fmt::Debug for CloudToDeviceMessages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudToDeviceMessages")
            .finish_non_exhaustive()
    }
}

impl CloudToDeviceMessages {
    /// The next message, or `None` once the client is closed (or a newer stream replaced
    /// this one).
    pub async fn recv(&mut self) -> Option<CloudToDeviceMessage> {
        let delivery = self.rx.recv().await?;
        let _ = self
            .commands
            .send(Command::C2dTaken {
                connection: delivery.connection,
                pkid: delivery.pkid,
            })
            .await;
        Some(delivery.message)
    }
}

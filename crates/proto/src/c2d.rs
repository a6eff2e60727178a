//! Cloud-to-device messages as IoT Hub keeps and delivers them: the message a back end sends
//! (system properties, `iothub-ack`, application properties, body), its stored form in a
//! device's queue, the MQTT property bag it is delivered with, the `to` address rules, and the
//! delivery feedback records (`application/vnd.microsoft.iothub.feedback.json`). The hub core
//! queues them; the server turns AMQP transfers and HTTP requests into them.

use serde::{Deserialize, Serialize};

use crate::encoding::unquote_strict;
use crate::message::{
    MessageError, put, put_len, put_opt, take, take_byte, take_len, take_opt_str, take_str,
};

/// IoT Hub's limit on one cloud-to-device message, body and properties together.
pub const MAX_C2D_BYTES: usize = 64 * 1024;

/// The content type of a feedback message.
pub const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// The application property that asks for delivery feedback.
pub const ACK_PROPERTY: &str = "iothub-ack";

/// Which outcomes of a message the sender wants to hear about (`iothub-ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    #[default]
    None,
    /// Completed only.
    Positive,
    /// Dead-lettered only (expired, delivery count exceeded, rejected, purged).
    Negative,
    Full,
}

impl Ack {
    /// Parses `iothub-ack`; IoT Hub's SDKs write lower case, the C SDK `Full`.
    pub fn parse(text: &str) -> Option<Ack> {
        [Ack::None, Ack::Positive, Ack::Negative, Ack::Full]
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(text.trim()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ack::None => "none",
            Ack::Positive => "positive",
            Ack::Negative => "negative",
            Ack::Full => "full",
        }
    }

    /// Whether an outcome with `status` produces a feedback record.
    pub fn wants(self, status: FeedbackStatus) -> bool {
        match self {
            Ack::None => false,
            Ack::Full => true,
            Ack::Positive => status == FeedbackStatus::Success,
            Ack::Negative => status != FeedbackStatus::Success,
        }
    }

    fn code(self) -> u8 {
        match self {
            Ack::None => 0,
            Ack::Positive => 1,
            Ack::Negative => 2,
            Ack::Full => 3,
        }
    }

    fn from_code(code: u8) -> Result<Ack, MessageError> {
        match code {
            0 => Ok(Ack::None),
            1 => Ok(Ack::Positive),
            2 => Ok(Ack::Negative),
            3 => Ok(Ack::Full),
            _ => Err(MessageError::Damaged("unknown ack code")),
        }
    }
}

/// One cloud-to-device message in a device's queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudMessage {
    /// Rendered as text whatever its AMQP type (string, uuid, ulong, binary).
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    /// As the sender wrote it, e.g. `/devices/d1/messages/devicebound`.
    pub to: String,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub ack: Ack,
    /// Application properties in the order sent, `iothub-ack` not among them.
    pub application: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Assigned by the hub: unique and increasing across the hub.
    pub sequence_number: u64,
    /// Milliseconds since the Unix epoch.
    pub enqueued_ms: i64,
    /// Milliseconds since the Unix epoch; never delivered at or after it.
    pub expiry_ms: i64,
    /// The device generation the message was sent to (feedback's `deviceGenerationId`).
    pub generation_id: String,
    /// Explicit abandons so far.
    pub delivery_count: u32,
}

const FORMAT_VERSION: u8 = 1;

impl CloudMessage {
    /// The size IoT Hub counts against [`MAX_C2D_BYTES`]: body, system property values,
    /// application property names and values.
    pub fn size(&self) -> usize {
        let system: usize = [
            &self.message_id,
            &self.correlation_id,
            &self.user_id,
            &self.content_type,
            &self.content_encoding,
        ]
        .into_iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum();
        let application: usize = self
            .application
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        self.body.len() + system + application + self.to.len()
    }

    /// The stored form: a version byte, then length-prefixed fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.size());
        out.push(FORMAT_VERSION);
        for field in [
            &self.message_id,
            &self.correlation_id,
            &self.user_id,
            &self.content_type,
            &self.content_encoding,
        ] {
            put_opt(&mut out, field.as_deref().map(str::as_bytes));
        }
        put(&mut out, self.to.as_bytes());
        out.push(self.ack.code());
        put(&mut out, self.generation_id.as_bytes());
        out.extend_from_slice(&self.sequence_number.to_be_bytes());
        out.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        out.extend_from_slice(&self.expiry_ms.to_be_bytes());
        out.extend_from_slice(&self.delivery_count.to_be_bytes());
        put_len(&mut out, self.application.len());
        for (k, v) in &self.application {
            put(&mut out, k.as_bytes());
            put(&mut out, v.as_bytes());
        }
        put(&mut out, &self.body);
        out
    }

    /// Reads what [`CloudMessage::encode`] wrote.
    pub fn decode(mut bytes: &[u8]) -> Result<CloudMessage, MessageError> {
        let r = &mut bytes;
        if take_byte(r)? != FORMAT_VERSION {
            return Err(MessageError::Damaged("unknown format version"));
        }
        let mut m = CloudMessage::default();
        for field in [
            &mut m.message_id,
            &mut m.correlation_id,
            &mut m.user_id,
            &mut m.content_type,
            &mut m.content_encoding,
        ] {
            *field = take_opt_str(r)?;
        }
        m.to = take_str(r)?;
        m.ack = Ack::from_code(take_byte(r)?)?;
        m.generation_id = take_str(r)?;
        m.sequence_number = u64::from_be_bytes(take_array(r)?);
        m.enqueued_ms = i64::from_be_bytes(take_array(r)?);
        m.expiry_ms = i64::from_be_bytes(take_array(r)?);
        m.delivery_count = u32::from_be_bytes(take_array(r)?);
        let count = take_len(r)?;
        m.application = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            m.application.push((take_str(r)?, take_str(r)?));
        }
        m.body = take(r)?.to_vec();
        if !r.is_empty() {
            return Err(MessageError::Damaged("trailing bytes"));
        }
        Ok(m)
    }

    /// The property bag IoT Hub delivers the message with over MQTT, in its order: `$.mid`,
    /// `$.to` (spelled `deviceBound`), `$.cid`, `$.uid`, `$.ct`, `$.ce`, `$.exp`, `iothub-ack`
    /// (when feedback is asked for), then the application properties.
    pub fn mqtt_properties(&self, device_id: &str) -> Vec<(String, String)> {
        let mut bag = Vec::with_capacity(8 + self.application.len());
        if let Some(v) = &self.message_id {
            bag.push(("$.mid".to_owned(), v.clone()));
        }
        bag.push((
            "$.to".to_owned(),
            format!("/devices/{device_id}/messages/deviceBound"),
        ));
        for (key, value) in [
            ("$.cid", &self.correlation_id),
            ("$.uid", &self.user_id),
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
        ] {
            if let Some(v) = value {
                bag.push((key.to_owned(), v.clone()));
            }
        }
        if let Some(exp) = self.expiry_text() {
            bag.push(("$.exp".to_owned(), exp));
        }
        if self.ack != Ack::None {
            bag.push((ACK_PROPERTY.to_owned(), self.ack.as_str().to_owned()));
        }
        bag.extend(self.application.iter().cloned());
        bag
    }

    /// The expiry as IoT Hub writes times, unless it is the far future the hub uses for "no
    /// expiry" (beyond year 9999 cannot be written).
    pub fn expiry_text(&self) -> Option<String> {
        millis_text(self.expiry_ms)
    }

    pub fn enqueued_text(&self) -> String {
        millis_text(self.enqueued_ms).unwrap_or_else(|| crate::time::NEVER.to_owned())
    }
}

/// A Unix time in milliseconds as IoT Hub writes times.
pub fn millis_text(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms)
        .ok()
        .map(crate::time::format_timestamp)
}

fn take_array<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], MessageError> {
    if r.len() < N {
        return Err(MessageError::Damaged("truncated"));
    }
    let (head, rest) = r.split_at(N);
    *r = rest;
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    Ok(out)
}

/// Whom a message's `to` addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub device_id: String,
    pub module_id: Option<String>,
}

/// Parses `to`: `/devices/{id}/messages/devicebound` or
/// `/devices/{id}/modules/{mid}/messages/devicebound` (the ids percent-decoded, as the Node
/// SDK encodes them; `messages/devicebound` matched case-insensitively; the leading `/`
/// optional).
pub fn parse_to(to: &str) -> Option<Recipient> {
    let rest = to.strip_prefix('/').unwrap_or(to);
    let parts: Vec<&str> = rest.split('/').collect();
    let (device, module) = match parts.as_slice() {
        [d, id, m, b] if is(d, "devices") && is(m, "messages") && is(b, "devicebound") => {
            (*id, None)
        }
        [d, id, mods, mid, m, b]
            if is(d, "devices")
                && is(mods, "modules")
                && is(m, "messages")
                && is(b, "devicebound") =>
        {
            (*id, Some(*mid))
        }
        _ => return None,
    };
    let device_id = unquote_strict(device).filter(|s| !s.is_empty())?;
    let module_id = match module {
        Some(m) => Some(unquote_strict(m).filter(|s| !s.is_empty())?),
        None => None,
    };
    Some(Recipient {
        device_id,
        module_id,
    })
}

fn is(segment: &str, word: &str) -> bool {
    segment.eq_ignore_ascii_case(word)
}

/// How a cloud-to-device message left its queue, as feedback reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FeedbackStatus {
    Success,
    Expired,
    DeliveryCountExceeded,
    Rejected,
    Purged,
}

impl FeedbackStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackStatus::Success => "Success",
            FeedbackStatus::Expired => "Expired",
            FeedbackStatus::DeliveryCountExceeded => "DeliveryCountExceeded",
            FeedbackStatus::Rejected => "Rejected",
            FeedbackStatus::Purged => "Purged",
        }
    }

    /// IoT Hub documents only `Success`'s description; the others are twinhub's words.
    pub fn description(self) -> &'static str {
        match self {
            FeedbackStatus::Success => "Success",
            FeedbackStatus::Expired => "Message expired",
            FeedbackStatus::DeliveryCountExceeded => "Message delivery count exceeded",
            FeedbackStatus::Rejected => "Message rejected",
            FeedbackStatus::Purged => "Message purged",
        }
    }
}

/// One record of a feedback message's JSON array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    pub original_message_id: String,
    /// When the outcome happened, as IoT Hub writes times.
    pub enqueued_time_utc: String,
    pub status_code: FeedbackStatus,
    pub description: String,
    pub device_id: String,
    pub device_generation_id: String,
}

impl FeedbackRecord {
    /// The record for `message`, sent to `device_id`, ending with `status` at `at_ms`.
    pub fn new(
        message: &CloudMessage,
        device_id: &str,
        status: FeedbackStatus,
        at_ms: i64,
    ) -> Self {
        FeedbackRecord {
            original_message_id: message.message_id.clone().unwrap_or_default(),
            enqueued_time_utc: millis_text(at_ms).unwrap_or_default(),
            status_code: status,
            description: status.description().to_owned(),
            device_id: device_id.to_owned(),
            device_generation_id: message.generation_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CloudMessage {
        CloudMessage {
            message_id: Some("m-1".into()),
            correlation_id: Some("c&1".into()),
            user_id: None,
            to: "/devices/d1/messages/devicebound".into(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            ack: Ack::Full,
            application: vec![
                ("color".into(), "red blue".into()),
                ("a=b".into(), "".into()),
            ],
            body: b"{\"x\":1}".to_vec(),
            sequence_number: 42,
            enqueued_ms: 1_700_000_000_000,
            expiry_ms: 1_700_003_600_000,
            generation_id: "g1".into(),
            delivery_count: 3,
        }
    }

    #[test]
    fn stored_form_round_trips_and_refuses_damage() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(CloudMessage::decode(&bytes).unwrap(), m);
        for cut in 0..bytes.len() {
            assert!(CloudMessage::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(CloudMessage::decode(&extra).is_err());
        let mut version = bytes;
        version[0] = 9;
        assert!(CloudMessage::decode(&version).is_err());
    }

    #[test]
    fn mqtt_bag_is_in_iot_hub_order_and_round_trips_through_the_topic() {
        let m = sample();
        let topic = crate::topic::c2d_topic("d1", &m.mqtt_properties("d1"));
        assert!(
            topic.starts_with(
                "devices/d1/messages/devicebound/%24.mid=m-1&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&%24.cid=c%261&%24.ct=application%2Fjson&%24.ce=utf-8&%24.exp=2023-11-14T23%3A13%3A20"
            ),
            "{topic}"
        );
        assert!(
            topic.ends_with("&iothub-ack=full&color=red%20blue&a%3Db="),
            "{topic}"
        );
        let bag = topic.split('/').nth(4).unwrap();
        let parsed = crate::topic::parse_property_bag(bag);
        assert_eq!(parsed, m.mqtt_properties("d1"));
    }

    #[test]
    fn no_ack_no_ack_property() {
        let mut m = sample();
        m.ack = Ack::None;
        assert!(
            !m.mqtt_properties("d1")
                .iter()
                .any(|(k, _)| k == ACK_PROPERTY)
        );
    }

    #[test]
    fn to_addresses() {
        let r = parse_to("/devices/d%201/messages/devicebound").unwrap();
        assert_eq!(r.device_id, "d 1");
        assert_eq!(r.module_id, None);
        assert_eq!(
            parse_to("devices/d1/messages/deviceBound")
                .unwrap()
                .device_id,
            "d1"
        );
        let m = parse_to("/devices/d1/modules/m1/messages/devicebound").unwrap();
        assert_eq!(m.module_id.as_deref(), Some("m1"));
        for bad in [
            "",
            "/devices//messages/devicebound",
            "/devices/d1/messages/events",
            "/devices/d1",
            "/things/d1/messages/devicebound",
            "/devices/d1/messages/devicebound/extra",
            "/devices/%zz/messages/devicebound",
        ] {
            assert_eq!(parse_to(bad), None, "{bad}");
        }
    }

    #[test]
    fn ack_values() {
        assert_eq!(Ack::parse("Full"), Some(Ack::Full));
        assert_eq!(Ack::parse("positive"), Some(Ack::Positive));
        assert_eq!(Ack::parse("NEGATIVE"), Some(Ack::Negative));
        assert_eq!(Ack::parse("none"), Some(Ack::None));
        assert_eq!(Ack::parse("sometimes"), None);
        assert!(Ack::Positive.wants(FeedbackStatus::Success));
        assert!(!Ack::Positive.wants(FeedbackStatus::Expired));
        assert!(Ack::Negative.wants(FeedbackStatus::Purged));
        assert!(!Ack::Negative.wants(FeedbackStatus::Success));
        assert!(!Ack::None.wants(FeedbackStatus::Rejected));
        assert!(Ack::Full.wants(FeedbackStatus::DeliveryCountExceeded));
    }

    #[test]
    fn feedback_record_json_uses_iot_hub_names() {
        let m = sample();
        let r = FeedbackRecord::new(&m, "d1", FeedbackStatus::Success, 1_700_000_000_000);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "originalMessageId": "m-1",
                "enqueuedTimeUtc": "2023-11-14T22:13:20.0000000Z",
                "statusCode": "Success",
                "description": "Success",
                "deviceId": "d1",
                "deviceGenerationId": "g1",
            })
        );
    }
}

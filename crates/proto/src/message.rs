//! A device-to-cloud message as IoT Hub keeps it: the system properties a device may set
//! (from the MQTT property bag), its application properties, the body, and what the hub stamps
//! on arrival (identity, auth method, source). Encoded compactly for the event log; the AMQP
//! endpoint (server) and the Event Hub rules (eventhub crate) turn it into an AMQP message.

use crate::encoding::unquote_strict;

/// IoT Hub's limit on one message: body, system property values, application property names
/// and values together (messages-construct, "Message size").
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Where a message on the built-in endpoint came from (`iothub-message-source`).
pub const SOURCE_TELEMETRY: &str = "Telemetry";

/// The auth method annotation of a device that signed in with a SAS token.
pub const AUTH_METHOD_DEVICE_SAS: &str =
    r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#;

/// The auth method annotation of a module that signed in with a SAS token.
pub const AUTH_METHOD_MODULE_SAS: &str =
    r#"{"scope":"module","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#;

/// System properties a device may set, each from its `$.` key in the property bag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemProperties {
    /// `$.mid`
    pub message_id: Option<String>,
    /// `$.cid`
    pub correlation_id: Option<String>,
    /// `$.uid`
    pub user_id: Option<String>,
    /// `$.to`
    pub to: Option<String>,
    /// `$.ct`
    pub content_type: Option<String>,
    /// `$.ce`
    pub content_encoding: Option<String>,
    /// `$.exp`: absolute expiry as the device wrote it (ISO 8601).
    pub expiry: Option<String>,
    /// `$.ctime`: `iothub-creation-time-utc`.
    pub creation_time: Option<String>,
    /// `$.sub`: `dt-subject` (the component).
    pub subject: Option<String>,
    /// `$.on`: a module's output name.
    pub output_name: Option<String>,
    /// `$.ifid`: `iothub-interface-id`.
    pub interface_id: Option<String>,
}

/// What the hub stamps on a message; devices cannot set these (anti-spoofing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    pub device_id: String,
    pub module_id: Option<String>,
    /// `iothub-connection-auth-method`, a JSON text.
    pub auth_method: String,
    pub generation_id: String,
    /// `iothub-message-source`.
    pub source: String,
    /// `dt-dataschema`: the model id the device announced at connect.
    pub data_schema: Option<String>,
}

impl Stamp {
    /// The sender's identity key: `deviceId`, or `deviceId/moduleId` for a module.
    pub fn identity_key(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }
}

/// One device-to-cloud message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub system: SystemProperties,
    /// Application properties in the order sent. A bag item without `=` has no value (null).
    pub application: Vec<(String, Option<String>)>,
    pub stamp: Stamp,
    pub body: Vec<u8>,
}

/// Why a property bag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the property bag is not valid percent-encoded UTF-8 near \"{0}\"")]
    BadEncoding(String),
    #[error("a property in the bag has an empty name")]
    EmptyName,
    #[error("the message is {0} bytes; IoT Hub's limit is {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("the stored message is damaged: {0}")]
    Damaged(&'static str),
}

impl Message {
    /// Builds a message from a telemetry topic's property bag and the publish payload. Keys
    /// are percent-decoded before `$.` is matched (the Python SDK sends `%24.mid`).
    pub fn from_property_bag(bag: &str, body: Vec<u8>) -> Result<Message, MessageError> {
        let mut system = SystemProperties::default();
        let mut application = Vec::new();
        for item in bag.split('&').filter(|item| !item.is_empty()) {
            let (raw_key, raw_value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            let key = unquote_strict(raw_key)
                .ok_or_else(|| MessageError::BadEncoding(crate::encoding::excerpt(item)))?;
            let value = match raw_value {
                Some(v) => Some(
                    unquote_strict(v)
                        .ok_or_else(|| MessageError::BadEncoding(crate::encoding::excerpt(item)))?,
                ),
                None => None,
            };
            if key.is_empty() {
                return Err(MessageError::EmptyName);
            }
            let slot = match key.as_str() {
                "$.mid" => &mut system.message_id,
                "$.cid" => &mut system.correlation_id,
                "$.uid" => &mut system.user_id,
                "$.to" => &mut system.to,
                "$.ct" => &mut system.content_type,
                "$.ce" => &mut system.content_encoding,
                "$.exp" => &mut system.expiry,
                "$.ctime" => &mut system.creation_time,
                "$.sub" => &mut system.subject,
                "$.on" => &mut system.output_name,
                "$.ifid" => &mut system.interface_id,
                _ => {
                    application.push((key, value));
                    continue;
                }
            };
            *slot = Some(value.unwrap_or_default());
        }
        let message = Message {
            system,
            application,
            stamp: Stamp::default(),
            body,
        };
        let size = message.size();
        if size > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge(size));
        }
        Ok(message)
    }

    /// The size IoT Hub counts against its limit.
    pub fn size(&self) -> usize {
        let system: usize = self.system.fields().map(|(_, v)| v.len()).sum();
        let application: usize = self
            .application
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
            .sum();
        self.body.len() + system + application
    }

    /// The compact form kept in the event log: a version byte, then length-prefixed fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.size());
        out.push(FORMAT_VERSION);
        let s = &self.system;
        for field in [
            &s.message_id,
            &s.correlation_id,
            &s.user_id,
            &s.to,
            &s.content_type,
            &s.content_encoding,
            &s.expiry,
            &s.creation_time,
            &s.subject,
            &s.output_name,
            &s.interface_id,
        ] {
            put_opt(&mut out, field.as_deref().map(str::as_bytes));
        }
        let t = &self.stamp;
        put(&mut out, t.device_id.as_bytes());
        put_opt(&mut out, t.module_id.as_deref().map(str::as_bytes));
        put(&mut out, t.auth_method.as_bytes());
        put(&mut out, t.generation_id.as_bytes());
        put(&mut out, t.source.as_bytes());
        put_opt(&mut out, t.data_schema.as_deref().map(str::as_bytes));
        put_len(&mut out, self.application.len());
        for (k, v) in &self.application {
            put(&mut out, k.as_bytes());
            put_opt(&mut out, v.as_deref().map(str::as_bytes));
        }
        put(&mut out, &self.body);
        out
    }

    /// Reads what [`Message::encode`] wrote.
    pub fn decode(mut bytes: &[u8]) -> Result<Message, MessageError> {
        let r = &mut bytes;
        if take_byte(r)? != FORMAT_VERSION {
            return Err(MessageError::Damaged("unknown format version"));
        }
        let mut system = SystemProperties::default();
        for field in [
            &mut system.message_id,
            &mut system.correlation_id,
            &mut system.user_id,
            &mut system.to,
            &mut system.content_type,
            &mut system.content_encoding,
            &mut system.expiry,
            &mut system.creation_time,
            &mut system.subject,
            &mut system.output_name,
            &mut system.interface_id,
        ] {
            *field = take_opt_str(r)?;
        }
        let stamp = Stamp {
            device_id: take_str(r)?,
            module_id: take_opt_str(r)?,
            auth_method: take_str(r)?,
            generation_id: take_str(r)?,
            source: take_str(r)?,
            data_schema: take_opt_str(r)?,
        };
        let count = take_len(r)?;
        let mut application = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            application.push((take_str(r)?, take_opt_str(r)?));
        }
        let body = take(r)?.to_vec();
        if !r.is_empty() {
            return Err(MessageError::Damaged("trailing bytes"));
        }
        Ok(Message {
            system,
            application,
            stamp,
            body,
        })
    }
}

impl SystemProperties {
    /// The properties that are set, with the names IoT Hub's routing and monitor tools use.
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("message-id", &self.message_id),
            ("correlation-id", &self.correlation_id),
            ("user-id", &self.user_id),
            ("to", &self.to),
            ("content-type", &self.content_type),
            ("content-encoding", &self.content_encoding),
            ("absolute-expiry-time", &self.expiry),
            ("iothub-creation-time-utc", &self.creation_time),
            ("dt-subject", &self.subject),
            ("iothub-outputname", &self.output_name),
            ("iothub-interface-id", &self.interface_id),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_deref().map(|v| (name, v)))
    }
}

const FORMAT_VERSION: u8 = 1;

pub(crate) fn put_len(out: &mut Vec<u8>, mut n: usize) {
    // LEB128: small fields cost one byte.
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(crate) fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

pub(crate) fn put_opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put(out, b);
        }
    }
}

pub(crate) fn take_byte(r: &mut &[u8]) -> Result<u8, MessageError> {
    let (&b, rest) = r.split_first().ok_or(MessageError::Damaged("truncated"))?;
    *r = rest;
    Ok(b)
}

pub(crate) fn take_len(r: &mut &[u8]) -> Result<usize, MessageError> {
    let mut n: usize = 0;
    for shift in (0..64).step_by(7) {
        let b = take_byte(r)?;
        n |= usize::from(b & 0x7f)
            .checked_shl(shift)
            .ok_or(MessageError::Damaged("length overflow"))?;
        if b & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err(MessageError::Damaged("length overflow"))
}

pub(crate) fn take<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], MessageError> {
    let n = take_len(r)?;
    if n > r.len() {
        return Err(MessageError::Damaged("truncated"));
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Ok(head)
}

pub(crate) fn take_str(r: &mut &[u8]) -> Result<String, MessageError> {
    String::from_utf8(take(r)?.to_vec()).map_err(|_| MessageError::Damaged("text is not UTF-8"))
}

pub(crate) fn take_opt_str(r: &mut &[u8]) -> Result<Option<String>, MessageError> {
    match take_byte(r)? {
        0 => Ok(None),
        1 => take_str(r).map(Some),
        _ => Err(MessageError::Damaged("bad presence flag")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_sdk_bag_decodes_system_and_custom_properties() {
        let bag = "%24.mid=id%201%2F2&%24.cid=c-1&%24.ct=application%2Fjson&%24.ce=utf-8&temperatureAlert=true&empty=&bare";
        let m = Message::from_property_bag(bag, b"{}".to_vec()).unwrap();
        assert_eq!(m.system.message_id.as_deref(), Some("id 1/2"));
        assert_eq!(m.system.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(m.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.system.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(
            m.application,
            vec![
                ("temperatureAlert".to_owned(), Some("true".to_owned())),
                ("empty".to_owned(), Some(String::new())),
                ("bare".to_owned(), None),
            ]
        );
    }

    #[test]
    fn literal_dollar_keys_and_embedded_c_keys_are_system_properties() {
        let m =
            Message::from_property_bag("$.ctime=2026-01-01T00:00:00Z&$.sub=thermostat1", vec![])
                .unwrap();
        assert_eq!(
            m.system.creation_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(m.system.subject.as_deref(), Some("thermostat1"));
        assert!(m.application.is_empty());
    }

    #[test]
    fn malformed_bags_are_refused() {
        assert!(matches!(
            Message::from_property_bag("a=%ff%fe", vec![]),
            Err(MessageError::BadEncoding(_))
        ));
        assert!(matches!(
            Message::from_property_bag("a=%zz", vec![]),
            Err(MessageError::BadEncoding(_))
        ));
        assert_eq!(
            Message::from_property_bag("=v", vec![]),
            Err(MessageError::EmptyName)
        );
    }

    #[test]
    fn the_size_limit_counts_properties_too() {
        let body = vec![b'x'; MAX_MESSAGE_BYTES - 4];
        assert!(Message::from_property_bag("ab=cd", body.clone()).is_ok());
        assert_eq!(
            Message::from_property_bag("ab=cde", body),
            Err(MessageError::TooLarge(MAX_MESSAGE_BYTES + 1))
        );
    }

    #[test]
    fn encoding_round_trips() {
        let mut m = Message::from_property_bag(
            "%24.mid=m&%24.exp=2030-01-01T00%3A00%3A00Z&k=v&n",
            vec![0, 1, 2, 255],
        )
        .unwrap();
        m.stamp = Stamp {
            device_id: "d1".into(),
            module_id: Some("m1".into()),
            auth_method: AUTH_METHOD_DEVICE_SAS.into(),
            generation_id: "638000000000000000".into(),
            source: SOURCE_TELEMETRY.into(),
            data_schema: None,
        };
        let bytes = m.encode();
        assert_eq!(Message::decode(&bytes).unwrap(), m);
        for cut in 0..bytes.len() {
            assert!(Message::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}

//! A stored device-to-cloud message as the AMQP message Event Hubs readers expect: the
//! `iothub-*` and `x-opt-*` message annotations, the properties section, string application
//! properties, and the body as one data section (messaging-protocol 0.7 and A6).

use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Data, DeliveryAnnotations, Message, MessageAnnotations, MessageId,
    Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use serde_amqp::primitives::OrderedMap;
use twinhub_proto::message::Message as D2cMessage;

/// What the event log assigned to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMeta {
    pub sequence: i64,
    pub offset: u64,
    pub enqueued_ms: i64,
}

/// The partition's state, sent with each event to readers that asked for it
/// (`com.microsoft:enable-receiver-runtime-metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub last_sequence: i64,
    pub last_offset: u64,
    pub last_enqueued_ms: i64,
    pub retrieved_ms: i64,
}

fn key(name: &str) -> fe2o3_amqp_types::messaging::annotations::OwnedKey {
    Symbol::from(name).into()
}

/// Builds the AMQP message for `message`, stored at `meta`.
pub fn event_message(
    message: &D2cMessage,
    meta: EventMeta,
    runtime: Option<RuntimeInfo>,
) -> Message<Data> {
    let stamp = &message.stamp;
    let sys = &message.system;
    let mut annotations = OrderedMap::new();
    let mut put = |name: &str, value: Value| {
        annotations.insert(key(name), value);
    };
    // Hub events carry no connection: IoT Hub leaves out what they do not have (job events
    // have no device either).
    if !stamp.device_id.is_empty() {
        put(
            "iothub-connection-device-id",
            Value::String(stamp.device_id.clone()),
        );
    }
    if let Some(module) = &stamp.module_id {
        put("iothub-connection-module-id", Value::String(module.clone()));
    }
    if !stamp.auth_method.is_empty() {
        put(
            "iothub-connection-auth-method",
            Value::String(stamp.auth_method.clone()),
        );
    }
    if !stamp.generation_id.is_empty() {
        put(
            "iothub-connection-auth-generation-id",
            Value::String(stamp.generation_id.clone()),
        );
    }
    put(
        "iothub-enqueuedtime",
        Value::Timestamp(Timestamp::from_milliseconds(meta.enqueued_ms)),
    );
    put("iothub-message-source", Value::String(stamp.source.clone()));
    if let Some(schema) = &stamp.data_schema {
        put("dt-dataschema", Value::String(schema.clone()));
    }
    if let Some(subject) = &sys.subject {
        put("dt-subject", Value::String(subject.clone()));
    }
    if let Some(interface) = &sys.interface_id {
        put("iothub-interface-id", Value::String(interface.clone()));
    }
    if let Some(output) = &sys.output_name {
        put("iothub-outputname", Value::String(output.clone()));
    }
    put("x-opt-sequence-number", Value::Long(meta.sequence));
    put("x-opt-offset", Value::String(meta.offset.to_string()));
    put(
        "x-opt-enqueued-time",
        Value::Timestamp(Timestamp::from_milliseconds(meta.enqueued_ms)),
    );

    let properties = Properties {
        message_id: sys.message_id.clone().map(MessageId::String),
        user_id: sys.user_id.clone().map(|u| Binary::from(u.into_bytes())),
        to: sys.to.clone(),
        correlation_id: sys.correlation_id.clone().map(MessageId::String),
        content_type: sys.content_type.clone().map(Symbol::from),
        content_encoding: sys.content_encoding.clone().map(Symbol::from),
        absolute_expiry_time: sys
            .expiry
            .as_deref()
            .and_then(twinhub_proto::time::parse_timestamp)
            .map(|t| Timestamp::from_milliseconds(t.as_millisecond())),
        ..Properties::default()
    };

    let mut application = OrderedMap::new();
    for (name, value) in &message.application {
        application.insert(
            name.clone(),
            value.clone().map_or(SimpleValue::Null, SimpleValue::String),
        );
    }
    if let Some(ctime) = &sys.creation_time {
        application.insert(
            "iothub-creation-time-utc".to_owned(),
            SimpleValue::String(ctime.clone()),
        );
    }

    let delivery_annotations = runtime.map(|r| {
        let mut map = OrderedMap::new();
        map.insert(
            key("last_enqueued_sequence_number"),
            Value::Long(r.last_sequence),
        );
        map.insert(
            key("last_enqueued_offset"),
            Value::String(r.last_offset.to_string()),
        );
        map.insert(
            key("last_enqueued_time_utc"),
            Value::Timestamp(Timestamp::from_milliseconds(r.last_enqueued_ms)),
        );
        map.insert(
            key("runtime_info_retrieval_time_utc"),
            Value::Timestamp(Timestamp::from_milliseconds(r.retrieved_ms)),
        );
        DeliveryAnnotations(map)
    });

    Message::builder()
        .delivery_annotations(delivery_annotations)
        .message_annotations(MessageAnnotations(annotations))
        .properties(properties)
        .application_properties(ApplicationProperties(application))
        .data(Binary::from(message.body.clone()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhub_proto::message::{AUTH_METHOD_DEVICE_SAS, SOURCE_TELEMETRY, Stamp};

    #[test]
    fn an_event_carries_what_readers_look_for() {
        let mut m = D2cMessage::from_property_bag(
            "%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&temperatureAlert=true&bare",
            br#"{"t":1}"#.to_vec(),
        )
        .unwrap();
        m.stamp = Stamp {
            device_id: "d1".into(),
            module_id: None,
            auth_method: AUTH_METHOD_DEVICE_SAS.into(),
            generation_id: "g".into(),
            source: SOURCE_TELEMETRY.into(),
            data_schema: None,
        };
        let meta = EventMeta {
            sequence: 4,
            offset: 1024,
            enqueued_ms: 1_700_000_000_123,
        };
        let event = event_message(&m, meta, None);
        let ann = &event.message_annotations.as_ref().unwrap().0;
        assert_eq!(
            ann.get(&key("iothub-connection-device-id")),
            Some(&Value::String("d1".into()))
        );
        assert_eq!(
            ann.get(&key("x-opt-sequence-number")),
            Some(&Value::Long(4))
        );
        assert_eq!(
            ann.get(&key("x-opt-offset")),
            Some(&Value::String("1024".into()))
        );
        assert_eq!(
            ann.get(&key("x-opt-enqueued-time")),
            Some(&Value::Timestamp(Timestamp::from_milliseconds(
                1_700_000_000_123
            )))
        );
        assert!(ann.get(&key("x-opt-partition-key")).is_none());
        let props = event.properties.as_ref().unwrap();
        assert_eq!(props.message_id, Some(MessageId::String("m1".into())));
        assert_eq!(props.correlation_id, Some(MessageId::String("c1".into())));
        assert_eq!(props.content_type, Some(Symbol::from("application/json")));
        let app = &event.application_properties.as_ref().unwrap().0;
        assert_eq!(
            app.get("temperatureAlert"),
            Some(&SimpleValue::String("true".into()))
        );
        assert_eq!(app.get("bare"), Some(&SimpleValue::Null));
        assert_eq!(event.body.0.as_ref(), br#"{"t":1}"#);
        assert!(event.delivery_annotations.is_none());
    }
}

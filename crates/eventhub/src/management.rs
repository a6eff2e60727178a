//! Requests on the `$cbs` and `$management` nodes and their replies. A reply goes back on the
//! link the client attached from the same node, with the request's message-id as its
//! correlation-id in the same AMQP type, `status-code` as an int and `status-description`
//! as a string (messaging-protocol 0.4, A3, A4).

use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Message, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Array, SimpleValue, Timestamp, Value};
use serde_amqp::primitives::OrderedMap;

/// `type` of a management READ for the event hub.
pub const TYPE_EVENTHUB: &str = "com.microsoft:eventhub";
/// `type` of a management READ for one partition.
pub const TYPE_PARTITION: &str = "com.microsoft:partition";

/// A request's fields that matter here, read from its application properties and body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub message_id: Option<MessageId>,
    pub operation: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub partition: Option<String>,
    /// `security_token` on management requests.
    pub security_token: Option<String>,
    /// The body as text (a put-token request carries the token there).
    pub body_text: Option<String>,
}

fn text(value: &SimpleValue) -> Option<String> {
    match value {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

impl Request {
    /// Reads a request from the parts of a received message.
    pub fn read(
        properties: Option<&Properties>,
        application: Option<&ApplicationProperties>,
        body: Option<&Value>,
    ) -> Request {
        let get = |name: &str| application.and_then(|a| a.0.get(name)).and_then(text);
        Request {
            message_id: properties.and_then(|p| p.message_id.clone()),
            operation: get("operation"),
            kind: get("type"),
            name: get("name"),
            partition: get("partition"),
            security_token: get("security_token"),
            body_text: match body {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Symbol(s)) => Some(s.0.clone()),
                Some(Value::Binary(b)) => String::from_utf8(b.to_vec()).ok(),
                _ => None,
            },
        }
    }
}

/// A reply to `request` with `status` (HTTP-like) and `body`.
pub fn reply(
    request: &Request,
    status: i32,
    description: &str,
    body: Value,
) -> Message<AmqpValue<Value>> {
    let mut application = OrderedMap::new();
    application.insert("status-code".to_owned(), SimpleValue::Int(status));
    application.insert(
        "status-description".to_owned(),
        SimpleValue::String(description.to_owned()),
    );
    if status >= 400 {
        application.insert(
            "error-condition".to_owned(),
            SimpleValue::Symbol(condition_for(status).into()),
        );
    }
    let properties = Properties {
        correlation_id: request.message_id.clone(),
        ..Properties::default()
    };
    Message::builder()
        .properties(properties)
        .application_properties(ApplicationProperties(application))
        .value(body)
        .build()
}

/// The AMQP error condition for an HTTP-like status in a management reply.
pub fn condition_for(status: i32) -> &'static str {
    match status {
        401 => "amqp:unauthorized-access",
        404 => "amqp:not-found",
        400 => "amqp:invalid-field",
        _ => "amqp:internal-error",
    }
}

/// The body of an event hub READ.
pub fn eventhub_info(name: &str, created_ms: i64, partition_ids: &[String]) -> Value {
    let mut map = OrderedMap::new();
    map.insert(Value::String("name".into()), Value::String(name.to_owned()));
    map.insert(
        Value::String("type".into()),
        Value::String(TYPE_EVENTHUB.into()),
    );
    map.insert(
        Value::String("created_at".into()),
        Value::Timestamp(Timestamp::from_milliseconds(created_ms)),
    );
    map.insert(
        Value::String("partition_count".into()),
        Value::Int(partition_ids.len() as i32),
    );
    map.insert(
        Value::String("partition_ids".into()),
        Value::Array(Array::from(
            partition_ids
                .iter()
                .map(|p| Value::String(p.clone()))
                .collect::<Vec<_>>(),
        )),
    );
    Value::Map(map)
}

/// A partition's state for a partition READ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    pub begin_sequence: i64,
    pub last_sequence: i64,
    /// `None` before anything was appended (written as `-1`, as Event Hubs does).
    pub last_offset: Option<u64>,
    pub last_enqueued_ms: Option<i64>,
    pub is_empty: bool,
}

/// The body of a partition READ.
pub fn partition_info(name: &str, partition: &str, state: PartitionState, now_ms: i64) -> Value {
    let mut map = OrderedMap::new();
    let mut put = |k: &str, v: Value| {
        map.insert(Value::String(k.to_owned()), v);
    };
    put("name", Value::String(name.to_owned()));
    put("type", Value::String(TYPE_PARTITION.into()));
    put("partition", Value::String(partition.to_owned()));
    put("begin_sequence_number", Value::Long(state.begin_sequence));
    put(
        "last_enqueued_sequence_number",
        Value::Long(state.last_sequence),
    );
    put(
        "last_enqueued_offset",
        Value::String(
            state
                .last_offset
                .map_or_else(|| "-1".to_owned(), |o| o.to_string()),
        ),
    );
    put(
        "last_enqueued_time_utc",
        Value::Timestamp(Timestamp::from_milliseconds(
            state.last_enqueued_ms.unwrap_or(0),
        )),
    );
    put("is_partition_empty", Value::Bool(state.is_empty));
    put(
        "runtime_info_retrieval_time_utc",
        Value::Timestamp(Timestamp::from_milliseconds(now_ms)),
    );
    Value::Map(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_amqp::primitives::Uuid;

    #[test]
    fn replies_keep_the_request_id_and_its_type() {
        for id in [
            MessageId::Ulong(7),
            MessageId::Uuid(Uuid::from([1u8; 16])),
            MessageId::String("abc".into()),
        ] {
            let request = Request {
                message_id: Some(id.clone()),
                ..Request::default()
            };
            let m = reply(&request, 200, "OK", Value::Null);
            assert_eq!(m.properties.unwrap().correlation_id, Some(id));
            let app = m.application_properties.unwrap().0;
            assert_eq!(app.get("status-code"), Some(&SimpleValue::Int(200)));
            assert_eq!(
                app.get("status-description"),
                Some(&SimpleValue::String("OK".into()))
            );
        }
    }

    #[test]
    fn requests_are_read_from_application_properties() {
        let mut app = OrderedMap::new();
        app.insert("operation".to_owned(), SimpleValue::String("READ".into()));
        app.insert(
            "type".to_owned(),
            SimpleValue::String(TYPE_PARTITION.into()),
        );
        app.insert("name".to_owned(), SimpleValue::String("hub".into()));
        app.insert("partition".to_owned(), SimpleValue::String("2".into()));
        let r = Request::read(None, Some(&ApplicationProperties(app)), None);
        assert_eq!(r.operation.as_deref(), Some("READ"));
        assert_eq!(r.kind.as_deref(), Some(TYPE_PARTITION));
        assert_eq!(r.partition.as_deref(), Some("2"));
    }

    #[test]
    fn eventhub_info_has_the_keys_clients_read() {
        let Value::Map(map) = eventhub_info("hub", 5, &["0".into(), "1".into()]) else {
            panic!("not a map")
        };
        assert_eq!(
            map.get(&Value::String("partition_count".into())),
            Some(&Value::Int(2))
        );
        assert!(map.get(&Value::String("partition_ids".into())).is_some());
        assert!(map.get(&Value::String("created_at".into())).is_some());
    }
}

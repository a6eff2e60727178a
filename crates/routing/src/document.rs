//! The JSON document a route condition is evaluated on, built from one message as IoT Hub's
//! routing query sees it: system properties under `$` names (`$contentType`,
//! `$connectionDeviceId`, ...), application properties by their bare names, `$body` (only for
//! a JSON body in a UTF encoding) and `$twin` (the device's twin, when given).

use serde_json::{Map, Value};
use twinhub_proto::message::Message;
use twinhub_query::{Expr, Segment};

/// Whether a condition reads `$twin`.
pub fn needs_twin(expr: &Expr) -> bool {
    match expr {
        Expr::Path(p) => {
            matches!(p.segments.first(), Some(Segment::Field(f)) if f.eq_ignore_ascii_case("$twin"))
        }
        Expr::Literal(_) => false,
        Expr::Array(items) | Expr::And(items) | Expr::Or(items) | Expr::Call(_, items) => {
            items.iter().any(needs_twin)
        }
        Expr::Unary(_, e) => needs_twin(e),
        Expr::Binary(_, a, b) => needs_twin(a) || needs_twin(b),
        Expr::In { expr, list, .. } => needs_twin(expr) || list.iter().any(needs_twin),
        Expr::Aggregate(_, e) => e.as_deref().is_some_and(needs_twin),
    }
}

/// Whether IoT Hub evaluates `$body` for this content type and encoding: JSON in UTF-8, -16
/// or -32, named case-insensitively.
fn body_is_json(message: &Message) -> bool {
    let ct = message.system.content_type.as_deref().unwrap_or("");
    let ce = message.system.content_encoding.as_deref().unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
        && ["utf-8", "utf-16", "utf-32"]
            .iter()
            .any(|e| ce.trim().eq_ignore_ascii_case(e))
}

/// The condition document of `message` (and the device's `twin`, if the caller loaded it).
pub fn condition_document(message: &Message, twin: Option<&Value>) -> Value {
    let mut doc = Map::new();
    // Application properties first, so a system property of the same `$` name wins.
    for (k, v) in &message.application {
        let value = v.clone().map_or(Value::Null, Value::String);
        doc.insert(format!("${k}"), value.clone());
        doc.insert(k.clone(), value);
    }
    let s = &message.system;
    let t = &message.stamp;
    for (name, value) in [
        ("$messageId", s.message_id.as_deref()),
        ("$correlationId", s.correlation_id.as_deref()),
        ("$userId", s.user_id.as_deref()),
        ("$to", s.to.as_deref()),
        ("$contentType", s.content_type.as_deref()),
        ("$contentEncoding", s.content_encoding.as_deref()),
        ("$absoluteExpiryTime", s.expiry.as_deref()),
        ("$iothub-creation-time-utc", s.creation_time.as_deref()),
        ("$dt-subject", s.subject.as_deref()),
        ("$dt-dataschema", t.data_schema.as_deref()),
        ("$connectionDeviceId", Some(t.device_id.as_str())),
        ("$connectionModuleId", t.module_id.as_deref()),
        (
            "$connectionDeviceGenerationId",
            Some(t.generation_id.as_str()),
        ),
        ("$connectionAuthMethod", Some(t.auth_method.as_str())),
        ("$iothub-message-source", Some(t.source.as_str())),
    ] {
        if let Some(v) = value {
            doc.insert(name.to_owned(), Value::String(v.to_owned()));
        }
    }
    if body_is_json(message)
        && let Ok(body) = serde_json::from_slice::<Value>(&message.body)
    {
        doc.insert("$body".to_owned(), body);
    }
    if let Some(twin) = twin {
        doc.insert("$twin".to_owned(), twin.clone());
    }
    Value::Object(doc)
}

/// The value at the dotted `path` (`tags.region`, `properties.desired.fw`) in `doc`, names
/// matched exactly first and then ignoring ASCII case, as IoT Hub matches them.
pub(crate) fn lookup<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = doc;
    for part in path.split('.') {
        let obj = at.as_object()?;
        at = match obj.get(part) {
            Some(v) => v,
            None => obj
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(part))
                .map(|(_, v)| v)?,
        };
    }
    Some(at)
}

//! The device-facing MQTT topic grammar of IoT Hub: parse what devices publish and subscribe
//! to, and format what the hub sends them (plus the device-side formats the Rust SDK needs,
//! and the CONNECT user name).
//!
//! The server's MQTT session uses [`parse_publish_topic`], [`parse_subscription`] and the hub
//! formatters; the Rust SDK uses [`parse_delivery_topic`] and the device formatters. Device
//! and module ids are never percent-encoded in topics; `$rid` values and property bags are,
//! with `quote(safe="")`.

use std::borrow::Cow;

use crate::encoding::{excerpt, quote, unquote, unquote_lossy};

/// Why a topic or subscription filter was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("unknown $iothub topic \"{0}\"")]
    UnknownIotHubTopic(String),
    #[error("unsupported topic \"{0}\"")]
    UnknownTopic(String),
    #[error("topic has an empty device id")]
    EmptyDeviceId,
    #[error("topic has an empty module id")]
    EmptyModuleId,
    #[error("topic has an empty method name")]
    EmptyMethodName,
    #[error("status in topic is not a valid integer")]
    InvalidStatus,
    #[error("topic has no $rid request id")]
    MissingRequestId,
    #[error("$version in topic is not an unsigned integer")]
    InvalidVersion,
    #[error("topic is not valid percent-encoded UTF-8")]
    InvalidEncoding,
    #[error("unsupported subscription filter \"{0}\"")]
    UnknownSubscription(String),
}

/// A topic a device publishes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// `devices/{d}/messages/events/<bag>` or `devices/{d}/modules/{m}/messages/events/<bag>`.
    /// `properties` is the raw bag; decode it with [`parse_property_bag`].
    Telemetry {
        device_id: &'a str,
        module_id: Option<&'a str>,
        properties: &'a str,
    },
    /// `$iothub/methods/res/{status}/?$rid={rid}`: the device's answer to a method call.
    MethodResponse { status: i32, rid: Cow<'a, str> },
    /// `$iothub/twin/GET/?$rid={rid}`.
    TwinGet { rid: Cow<'a, str> },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`.
    TwinPatchReported { rid: Cow<'a, str> },
}

/// A topic the hub publishes to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// `$iothub/methods/POST/{name}/?$rid={rid}`. The name is percent-decoded, as the Python
    /// device SDK does.
    MethodRequest {
        method_name: Cow<'a, str>,
        rid: Cow<'a, str>,
    },
    /// `$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]`.
    TwinResponse {
        status: u16,
        rid: Cow<'a, str>,
        version: Option<u64>,
    },
    /// `$iothub/twin/PATCH/properties/desired/?$version={n}`.
    DesiredPatch { version: Option<u64> },
    /// `devices/{d}/messages/devicebound/<bag>`.
    CloudToDevice {
        device_id: &'a str,
        properties: &'a str,
    },
    /// `devices/{d}/modules/{m}/inputs/{input}/<bag>`.
    ModuleInput {
        device_id: &'a str,
        module_id: &'a str,
        input_name: &'a str,
        properties: &'a str,
    },
}

/// A subscription a device may hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subscription {
    /// `$iothub/methods/POST/#`
    Methods,
    /// `$iothub/twin/res/#`
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/#`
    DesiredPatches,
    /// `devices/{d}/messages/devicebound/#`
    CloudToDevice { device_id: String },
    /// `devices/{d}/modules/{m}/inputs/#`
    ModuleInputs {
        device_id: String,
        module_id: String,
    },
}

const IOTHUB_PREFIX: &str = "$iothub/";
const DEVICES_PREFIX: &str = "devices/";
const METHODS_FILTER: &str = "$iothub/methods/POST/#";
const TWIN_RESPONSES_FILTER: &str = "$iothub/twin/res/#";
const DESIRED_PATCHES_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";
const RID: &str = "$rid";
const VERSION: &str = "$version";

/// System properties of the property bag, in the order the device SDK writes them.
pub const SYSTEM_PROPERTIES: [&str; 8] = [
    "$.on", "$.mid", "$.cid", "$.uid", "$.ct", "$.ce", "$.ifid", "$.exp",
];

/// Parses the topic of a PUBLISH received from a device.
pub fn parse_publish_topic(topic: &str) -> Result<Inbound<'_>, TopicError> {
    if let Some(rest) = topic.strip_prefix(IOTHUB_PREFIX) {
        let (path, query) = split_query(rest);
        return match segments(path).as_slice() {
            ["methods", "res", status] => {
                let status = unquote(status)
                    .and_then(|s| s.parse::<i32>().ok())
                    .ok_or(TopicError::InvalidStatus)?;
                Ok(Inbound::MethodResponse {
                    status,
                    rid: required_rid(query)?,
                })
            }
            ["twin", "GET"] => Ok(Inbound::TwinGet {
                rid: required_rid(query)?,
            }),
            ["twin", "PATCH", "properties", "reported"] => Ok(Inbound::TwinPatchReported {
                rid: required_rid(query)?,
            }),
            _ => Err(TopicError::UnknownIotHubTopic(excerpt(topic))),
        };
    }
    let unknown = || TopicError::UnknownTopic(excerpt(topic));
    let Ids {
        device_id,
        module_id,
        rest,
    } = split_ids(topic)?.ok_or_else(unknown)?;
    // Tolerate a missing trailing '/' when there is no property bag.
    let properties = if rest == "messages/events" {
        ""
    } else {
        rest.strip_prefix("messages/events/").ok_or_else(unknown)?
    };
    Ok(Inbound::Telemetry {
        device_id,
        module_id,
        properties,
    })
}

/// Parses the topic of a PUBLISH the hub sent to a device (used by device clients).
pub fn parse_delivery_topic(topic: &str) -> Result<Delivery<'_>, TopicError> {
    if let Some(rest) = topic.strip_prefix(IOTHUB_PREFIX) {
        let (path, query) = split_query(rest);
        return match segments(path).as_slice() {
            ["methods", "POST", name] => {
                let method_name = unquote(name).ok_or(TopicError::InvalidEncoding)?;
                if method_name.is_empty() {
                    return Err(TopicError::EmptyMethodName);
                }
                Ok(Delivery::MethodRequest {
                    method_name,
                    rid: required_rid(query)?,
                })
            }
            ["twin", "res", status] => {
                let status = unquote(status)
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or(TopicError::InvalidStatus)?;
                Ok(Delivery::TwinResponse {
                    status,
                    rid: required_rid(query)?,
                    version: optional_version(query)?,
                })
            }
            ["twin", "PATCH", "properties", "desired"] => Ok(Delivery::DesiredPatch {
                version: optional_version(query)?,
            }),
            _ => Err(TopicError::UnknownIotHubTopic(excerpt(topic))),
        };
    }
    let unknown = || TopicError::UnknownTopic(excerpt(topic));
    let Ids {
        device_id,
        module_id,
        rest,
    } = split_ids(topic)?.ok_or_else(unknown)?;
    let Some(module_id) = module_id else {
        let properties = rest
            .strip_prefix("messages/devicebound/")
            .ok_or_else(unknown)?;
        return Ok(Delivery::CloudToDevice {
            device_id,
            properties,
        });
    };
    let rest = rest.strip_prefix("inputs/").ok_or_else(unknown)?;
    let (input_name, properties) = rest.split_once('/').ok_or_else(unknown)?;
    if input_name.is_empty() {
        return Err(unknown());
    }
    Ok(Delivery::ModuleInput {
        device_id,
        module_id,
        input_name,
        properties,
    })
}

/// Parses a SUBSCRIBE topic filter from a device.
///
/// Only the filters the SDKs use are accepted. Wildcards are refused in the id levels, so
/// `devices/+/messages/devicebound/#` cannot listen to every device.
pub fn parse_subscription(filter: &str) -> Result<Subscription, TopicError> {
    match filter {
        METHODS_FILTER => return Ok(Subscription::Methods),
        TWIN_RESPONSES_FILTER => return Ok(Subscription::TwinResponses),
        DESIRED_PATCHES_FILTER => return Ok(Subscription::DesiredPatches),
        _ => {}
    }
    let unknown = || TopicError::UnknownSubscription(excerpt(filter));
    let Ids {
        device_id,
        module_id,
        rest,
    } = split_ids(filter).ok().flatten().ok_or_else(unknown)?;
    let wildcard = |level: &str| level.contains(['+', '#']);
    if wildcard(device_id) || module_id.is_some_and(wildcard) {
        return Err(unknown());
    }
    match (module_id, rest) {
        (None, "messages/devicebound/#") => Ok(Subscription::CloudToDevice {
            device_id: device_id.to_owned(),
        }),
        (Some(module_id), "inputs/#") => Ok(Subscription::ModuleInputs {
            device_id: device_id.to_owned(),
            module_id: module_id.to_owned(),
        }),
        _ => Err(unknown()),
    }
}

impl Subscription {
    /// The MQTT topic filter for this subscription.
    pub fn filter(&self) -> String {
        match self {
            Subscription::Methods => METHODS_FILTER.to_owned(),
            Subscription::TwinResponses => TWIN_RESPONSES_FILTER.to_owned(),
            Subscription::DesiredPatches => DESIRED_PATCHES_FILTER.to_owned(),
            Subscription::CloudToDevice { device_id } => {
                format!("devices/{device_id}/messages/devicebound/#")
            }
            Subscription::ModuleInputs {
                device_id,
                module_id,
            } => format!("devices/{device_id}/modules/{module_id}/inputs/#"),
        }
    }

    /// Whether `topic` matches this subscription's filter (a trailing `#` also matches its
    /// parent level, as MQTT specifies): the tests' check that formatters and filters agree.
    #[cfg(test)]
    fn matches(&self, topic: &str) -> bool {
        let filter = self.filter();
        let parent = filter.strip_suffix("/#").unwrap_or(&filter);
        match topic.strip_prefix(parent) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// The CONNECT user name IoT Hub expects from a device: `{host}/{deviceId}/?api-version=..`.
/// Clients may append `&key=value` items (the SDKs add `DeviceClientType`).
pub fn mqtt_username(host_name: &str, device_id: &str) -> String {
    format!(
        "{host_name}/{device_id}/?api-version={}",
        crate::API_VERSION
    )
}

/// `$iothub/methods/POST/{method_name}/?$rid={rid}`.
///
/// The name is written as is: check it first with [`crate::ids::validate_method_name`], since a
/// `/` or `?` in it breaks every SDK's parser.
pub fn method_request_topic(method_name: &str, rid: &str) -> String {
    // Devices percent-decode the name (the Python SDK and ours do): a literal `%` must travel
    // as `%25`, or `a%41` would arrive as `aA`. Names without `%` go as they are.
    let name = method_name.replace('%', "%25");
    format!("$iothub/methods/POST/{name}/?$rid={}", quote(rid))
}

/// `$iothub/methods/res/{status}/?$rid={rid}` (device side).
pub fn method_response_topic(status: i32, rid: &str) -> String {
    format!("$iothub/methods/res/{status}/?$rid={}", quote(rid))
}

/// `$iothub/twin/GET/?$rid={rid}` (device side).
pub fn twin_get_topic(rid: &str) -> String {
    format!("$iothub/twin/GET/?$rid={}", quote(rid))
}

/// `$iothub/twin/PATCH/properties/reported/?$rid={rid}` (device side).
pub fn twin_patch_reported_topic(rid: &str) -> String {
    format!(
        "$iothub/twin/PATCH/properties/reported/?$rid={}",
        quote(rid)
    )
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]`; the reported-patch answer carries
/// the new reported version.
pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    let mut topic = format!("$iothub/twin/res/{status}/?$rid={}", quote(rid));
    if let Some(version) = version {
        topic.push_str(&format!("&$version={version}"));
    }
    topic
}

/// `$iothub/twin/PATCH/properties/desired/?$version={n}`.
pub fn desired_patch_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// The telemetry topic a device publishes to, with the property bag in the device SDK's
/// order: system properties ([`SYSTEM_PROPERTIES`]) first, then the rest sorted by key.
pub fn telemetry_topic(
    device_id: &str,
    module_id: Option<&str>,
    properties: &[(String, String)],
) -> String {
    let bag = encode_property_bag(&sdk_property_order(properties));
    match module_id {
        Some(module_id) => format!("devices/{device_id}/modules/{module_id}/messages/events/{bag}"),
        None => format!("devices/{device_id}/messages/events/{bag}"),
    }
}

/// `devices/{d}/messages/devicebound/<bag>`, the bag in the order given. The trailing `/`
/// is always written: the Python SDK reads the bag as the fifth `/` segment.
pub fn c2d_topic(device_id: &str, properties: &[(String, String)]) -> String {
    format!(
        "devices/{device_id}/messages/devicebound/{}",
        encode_property_bag(properties)
    )
}

/// `devices/{d}/modules/{m}/inputs/{input}/<bag>`, the bag in the order given.
pub fn module_input_topic(
    device_id: &str,
    module_id: &str,
    input_name: &str,
    properties: &[(String, String)],
) -> String {
    format!(
        "devices/{device_id}/modules/{module_id}/inputs/{input_name}/{}",
        encode_property_bag(properties)
    )
}

/// Orders properties as the device SDK does: system properties in [`SYSTEM_PROPERTIES`]
/// order, then the others sorted by key (stable, so equal keys keep their order).
pub fn sdk_property_order(properties: &[(String, String)]) -> Vec<(String, String)> {
    let mut ordered: Vec<(String, String)> = Vec::with_capacity(properties.len());
    for system in SYSTEM_PROPERTIES {
        ordered.extend(properties.iter().filter(|(k, _)| k == system).cloned());
    }
    let mut custom: Vec<(String, String)> = properties
        .iter()
        .filter(|(k, _)| !SYSTEM_PROPERTIES.contains(&k.as_str()))
        .cloned()
        .collect();
    custom.sort_by(|a, b| a.0.cmp(&b.0));
    ordered.extend(custom);
    ordered
}

/// Encodes `k=v&k=v` in the order given, each key and value percent-encoded.
pub fn encode_property_bag(properties: &[(String, String)]) -> String {
    let mut bag = String::new();
    for (i, (key, value)) in properties.iter().enumerate() {
        if i > 0 {
            bag.push('&');
        }
        bag.push_str(&quote(key));
        bag.push('=');
        bag.push_str(&quote(value));
    }
    bag
}

/// Decodes a property bag: split on `&`, then on the first `=`, then percent-decode (`+`
/// stays `+`). An item without `=` gets an empty value; empty items are skipped; invalid
/// UTF-8 becomes U+FFFD.
pub fn parse_property_bag(bag: &str) -> Vec<(String, String)> {
    bag.split('&')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            (
                unquote_lossy(key).into_owned(),
                unquote_lossy(value).into_owned(),
            )
        })
        .collect()
}

/// The percent-decoded value of query parameter `name` (e.g. `"$rid"`) in `topic`, if the
/// topic has a query with that key and the value is valid UTF-8.
#[cfg(test)]
fn query_param<'a>(topic: &'a str, name: &str) -> Option<Cow<'a, str>> {
    let (_, query) = split_query(topic);
    find_param(query?, name).ok().flatten()
}

/// The id levels at the start of a `devices/{d}/[modules/{m}/]rest` topic or filter.
struct Ids<'a> {
    device_id: &'a str,
    module_id: Option<&'a str>,
    /// What follows the ids' trailing `/`.
    rest: &'a str,
}

/// Splits off the id levels. `Ok(None)` when `topic` does not start that way; an id level that
/// is there but empty is an error.
fn split_ids(topic: &str) -> Result<Option<Ids<'_>>, TopicError> {
    let Some((device_id, rest)) = topic
        .strip_prefix(DEVICES_PREFIX)
        .and_then(|r| r.split_once('/'))
    else {
        return Ok(None);
    };
    if device_id.is_empty() {
        return Err(TopicError::EmptyDeviceId);
    }
    let Some(rest) = rest.strip_prefix("modules/") else {
        return Ok(Some(Ids {
            device_id,
            module_id: None,
            rest,
        }));
    };
    let Some((module_id, rest)) = rest.split_once('/') else {
        return Ok(None);
    };
    if module_id.is_empty() {
        return Err(TopicError::EmptyModuleId);
    }
    Ok(Some(Ids {
        device_id,
        module_id: Some(module_id),
        rest,
    }))
}

/// Splits at the first `?` into path and query.
fn split_query(topic: &str) -> (&str, Option<&str>) {
    match topic.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (topic, None),
    }
}

/// Path segments with one trailing `/` ignored (`methods/res/200/` → `[methods, res, 200]`).
fn segments(path: &str) -> Vec<&str> {
    path.strip_suffix('/').unwrap_or(path).split('/').collect()
}

fn find_param<'a>(query: &'a str, name: &str) -> Result<Option<Cow<'a, str>>, TopicError> {
    for item in query.split('&').filter(|item| !item.is_empty()) {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        if unquote(key).as_deref() == Some(name) {
            return unquote(value).map(Some).ok_or(TopicError::InvalidEncoding);
        }
    }
    Ok(None)
}

fn required_rid(query: Option<&str>) -> Result<Cow<'_, str>, TopicError> {
    let rid = match query {
        Some(query) => find_param(query, RID)?,
        None => None,
    };
    rid.filter(|rid| !rid.is_empty())
        .ok_or(TopicError::MissingRequestId)
}

fn optional_version(query: Option<&str>) -> Result<Option<u64>, TopicError> {
    let Some(query) = query else {
        return Ok(None);
    };
    match find_param(query, VERSION)? {
        None => Ok(None),
        Some(text) if text.bytes().all(|b| b.is_ascii_digit()) => text
            .parse::<u64>()
            .map(Some)
            .map_err(|_| TopicError::InvalidVersion),
        Some(_) => Err(TopicError::InvalidVersion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn telemetry_topics() {
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events/"),
            Ok(Inbound::Telemetry {
                device_id: "d1",
                module_id: None,
                properties: ""
            })
        );
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events"),
            Ok(Inbound::Telemetry {
                device_id: "d1",
                module_id: None,
                properties: ""
            })
        );
        assert_eq!(
            parse_publish_topic("devices/d1/modules/m1/messages/events/%24.on=out1"),
            Ok(Inbound::Telemetry {
                device_id: "d1",
                module_id: Some("m1"),
                properties: "%24.on=out1"
            })
        );
        // Ids with the specials IoT Hub allows pass through untouched.
        assert_eq!(
            parse_publish_topic("devices/a:b.c$d'e/messages/events/x=1"),
            Ok(Inbound::Telemetry {
                device_id: "a:b.c$d'e",
                module_id: None,
                properties: "x=1"
            })
        );
    }

    #[test]
    fn verified_sdk_property_bag_encoding() {
        // Captured from azure-iot-device 2.14.0 (wire-protocol.md section c.5).
        let expected = "devices/d1/messages/events/%24.mid=mid-1&%24.cid=corr&%24.uid=u1&%24.ct=application%2Fjson&%24.ce=utf-8&a%20b%2Fc=x%26y%3Dz&alert=true";
        let given = props(&[
            ("alert", "true"),
            ("$.ce", "utf-8"),
            ("a b/c", "x&y=z"),
            ("$.ct", "application/json"),
            ("$.uid", "u1"),
            ("$.cid", "corr"),
            ("$.mid", "mid-1"),
        ]);
        let topic = telemetry_topic("d1", None, &given);
        assert_eq!(topic, expected);
        let Ok(Inbound::Telemetry { properties, .. }) = parse_publish_topic(&topic) else {
            panic!("telemetry topic must parse");
        };
        assert_eq!(parse_property_bag(properties), sdk_property_order(&given));
        assert_eq!(
            telemetry_topic("d1", None, &[]),
            "devices/d1/messages/events/"
        );
    }

    #[test]
    fn system_property_order_is_complete() {
        let given = props(&[
            ("z", "1"),
            ("$.exp", "e"),
            ("$.ifid", "i"),
            ("$.ce", "ce"),
            ("$.ct", "ct"),
            ("$.uid", "u"),
            ("$.cid", "c"),
            ("$.mid", "m"),
            ("$.on", "o"),
            ("$.to", "t"),
            ("a", "2"),
        ]);
        let keys: Vec<String> = sdk_property_order(&given)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "$.on", "$.mid", "$.cid", "$.uid", "$.ct", "$.ce", "$.ifid", "$.exp", "$.to", "a",
                "z"
            ]
        );
    }

    #[test]
    fn module_telemetry_topic() {
        assert_eq!(
            telemetry_topic("d", Some("m"), &props(&[("$.on", "out 1")])),
            "devices/d/modules/m/messages/events/%24.on=out%201"
        );
    }

    #[test]
    fn property_bag_decoding_rules() {
        assert_eq!(
            parse_property_bag(
                "%24.mid=msg-1&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&iothub-ack=full&color=red%20blue"
            ),
            props(&[
                ("$.mid", "msg-1"),
                ("$.to", "/devices/d1/messages/deviceBound"),
                ("iothub-ack", "full"),
                ("color", "red blue")
            ])
        );
        assert_eq!(parse_property_bag("a+b=c+d"), props(&[("a+b", "c+d")]));
        assert_eq!(
            parse_property_bag("flag&x=1=2&&"),
            props(&[("flag", ""), ("x", "1=2")])
        );
        assert_eq!(parse_property_bag(""), props(&[]));
        assert_eq!(parse_property_bag("k=%FF"), props(&[("k", "\u{FFFD}")]));
    }

    #[test]
    fn method_response_topics() {
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?$rid=1"),
            Ok(Inbound::MethodResponse {
                status: 200,
                rid: "1".into()
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/-1/?$rid=a%20b"),
            Ok(Inbound::MethodResponse {
                status: -1,
                rid: "a b".into()
            })
        );
        assert_eq!(
            parse_publish_topic(&method_response_topic(404, "x&y")),
            Ok(Inbound::MethodResponse {
                status: 404,
                rid: "x&y".into()
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/ok/?$rid=1"),
            Err(TopicError::InvalidStatus)
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/99999999999/?$rid=1"),
            Err(TopicError::InvalidStatus)
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/"),
            Err(TopicError::MissingRequestId)
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?$rid="),
            Err(TopicError::MissingRequestId)
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?$rid=%FF"),
            Err(TopicError::InvalidEncoding)
        );
    }

    #[test]
    fn twin_request_topics() {
        let rid = "4a9c1e2b-7f1d-4c8e-9d55-2b1f0a3c6e7d";
        assert_eq!(
            parse_publish_topic(&twin_get_topic(rid)),
            Ok(Inbound::TwinGet { rid: rid.into() })
        );
        assert_eq!(
            parse_publish_topic(&format!(
                "$iothub/twin/PATCH/properties/reported/?$rid={rid}"
            )),
            Ok(Inbound::TwinPatchReported { rid: rid.into() })
        );
        // Extra query items, an encoded key and item order do not matter.
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$version=3&%24rid=7&flag"),
            Ok(Inbound::TwinPatchReported { rid: "7".into() })
        );
        assert_eq!(
            twin_patch_reported_topic("r"),
            "$iothub/twin/PATCH/properties/reported/?$rid=r"
        );
    }

    #[test]
    fn unknown_topics_are_errors() {
        for topic in [
            "$iothub/twin/PATCH/properties/desired/?$rid=1",
            "$iothub/methods/POST/m/?$rid=1",
            "$iothub/twin/GET/extra/?$rid=1",
            "$iothub/",
            "$iothub/unknown",
        ] {
            assert!(
                matches!(
                    parse_publish_topic(topic),
                    Err(TopicError::UnknownIotHubTopic(_))
                ),
                "{topic}"
            );
        }
        for topic in [
            "",
            "devices",
            "devices/d1",
            "devices/d1/messages/devicebound/",
            "devices/d1/modules/m1",
            "devices/d1/messages/eventsX",
            "other/topic",
        ] {
            assert!(
                matches!(parse_publish_topic(topic), Err(TopicError::UnknownTopic(_))),
                "{topic}"
            );
        }
        assert_eq!(
            parse_publish_topic("devices//messages/events/"),
            Err(TopicError::EmptyDeviceId)
        );
        assert_eq!(
            parse_publish_topic("devices/d/modules//messages/events/"),
            Err(TopicError::EmptyModuleId)
        );
    }

    #[test]
    fn username_names_hub_device_and_api_version() {
        assert_eq!(
            mqtt_username("hub.example.net", "d1"),
            "hub.example.net/d1/?api-version=2021-04-12"
        );
    }

    #[test]
    fn hub_formatters() {
        assert_eq!(
            method_request_topic("reboot", "12"),
            "$iothub/methods/POST/reboot/?$rid=12"
        );
        // A literal `%` survives the device's percent-decoding.
        let topic = method_request_topic("a%41", "1");
        assert_eq!(topic, "$iothub/methods/POST/a%2541/?$rid=1");
        assert_eq!(
            parse_delivery_topic(&topic),
            Ok(Delivery::MethodRequest {
                method_name: "a%41".into(),
                rid: "1".into()
            })
        );
        assert_eq!(
            twin_response_topic(204, "r-1", Some(5)),
            "$iothub/twin/res/204/?$rid=r-1&$version=5"
        );
        assert_eq!(
            twin_response_topic(200, "r 1", None),
            "$iothub/twin/res/200/?$rid=r%201"
        );
        assert_eq!(
            desired_patch_topic(9),
            "$iothub/twin/PATCH/properties/desired/?$version=9"
        );
        assert_eq!(
            c2d_topic("d1", &props(&[("$.mid", "msg-1"), ("color", "red blue")])),
            "devices/d1/messages/devicebound/%24.mid=msg-1&color=red%20blue"
        );
        assert_eq!(c2d_topic("d1", &[]), "devices/d1/messages/devicebound/");
        assert_eq!(
            module_input_topic("d", "m", "in1", &props(&[("a", "1")])),
            "devices/d/modules/m/inputs/in1/a=1"
        );
    }

    #[test]
    fn delivery_topics() {
        assert_eq!(
            parse_delivery_topic("$iothub/methods/POST/get%20status/?$rid=3"),
            Ok(Delivery::MethodRequest {
                method_name: "get status".into(),
                rid: "3".into()
            })
        );
        assert_eq!(
            parse_delivery_topic("$iothub/twin/res/204/?$rid=r&$version=12"),
            Ok(Delivery::TwinResponse {
                status: 204,
                rid: "r".into(),
                version: Some(12)
            })
        );
        assert_eq!(
            parse_delivery_topic("$iothub/twin/res/200/?$rid=r"),
            Ok(Delivery::TwinResponse {
                status: 200,
                rid: "r".into(),
                version: None
            })
        );
        assert_eq!(
            parse_delivery_topic("$iothub/twin/PATCH/properties/desired/?$version=4"),
            Ok(Delivery::DesiredPatch { version: Some(4) })
        );
        assert_eq!(
            parse_delivery_topic("devices/d1/messages/devicebound/%24.mid=1"),
            Ok(Delivery::CloudToDevice {
                device_id: "d1",
                properties: "%24.mid=1"
            })
        );
        assert_eq!(
            parse_delivery_topic("devices/d/modules/m/inputs/in1/"),
            Ok(Delivery::ModuleInput {
                device_id: "d",
                module_id: "m",
                input_name: "in1",
                properties: ""
            })
        );
        assert_eq!(
            parse_delivery_topic("$iothub/twin/res/204/?$rid=r&$version=-1"),
            Err(TopicError::InvalidVersion)
        );
        assert_eq!(
            parse_delivery_topic("$iothub/twin/res/70000/?$rid=r"),
            Err(TopicError::InvalidStatus)
        );
        assert_eq!(
            parse_delivery_topic("$iothub/methods/POST//?$rid=1"),
            Err(TopicError::EmptyMethodName)
        );
        assert!(matches!(
            parse_delivery_topic("devices/d/modules/m/inputs/in1"),
            Err(TopicError::UnknownTopic(_))
        ));
        assert!(matches!(
            parse_delivery_topic("devices/d/messages/events/"),
            Err(TopicError::UnknownTopic(_))
        ));
    }

    #[test]
    fn subscriptions() {
        let cases = [
            ("$iothub/methods/POST/#", Subscription::Methods),
            ("$iothub/twin/res/#", Subscription::TwinResponses),
            (
                "$iothub/twin/PATCH/properties/desired/#",
                Subscription::DesiredPatches,
            ),
            (
                "devices/d1/messages/devicebound/#",
                Subscription::CloudToDevice {
                    device_id: "d1".into(),
                },
            ),
            (
                "devices/d1/modules/m1/inputs/#",
                Subscription::ModuleInputs {
                    device_id: "d1".into(),
                    module_id: "m1".into(),
                },
            ),
        ];
        for (filter, expected) in cases {
            assert_eq!(
                parse_subscription(filter).as_ref(),
                Ok(&expected),
                "{filter}"
            );
            assert_eq!(expected.filter(), filter);
        }
        for bad in [
            "#",
            "$iothub/#",
            "$iothub/methods/POST/+",
            "$iothub/twin/res/200/#",
            "devices/+/messages/devicebound/#",
            "devices/#/messages/devicebound/#",
            "devices//messages/devicebound/#",
            "devices/a/b/messages/devicebound/#",
            "devices/d1/messages/devicebound/+",
            "devices/d1/modules/+/inputs/#",
            "devices/d1/modules//inputs/#",
            "devices/d1/inputs/#",
            "devices/d1/messages/events/#",
        ] {
            assert!(
                matches!(
                    parse_subscription(bad),
                    Err(TopicError::UnknownSubscription(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn subscription_matching() {
        assert!(Subscription::Methods.matches(&method_request_topic("m", "1")));
        assert!(!Subscription::Methods.matches("$iothub/methods/POSTX/m"));
        assert!(Subscription::TwinResponses.matches(&twin_response_topic(200, "1", None)));
        assert!(Subscription::DesiredPatches.matches(&desired_patch_topic(1)));
        assert!(!Subscription::DesiredPatches.matches(&twin_response_topic(200, "1", None)));
        let c2d = Subscription::CloudToDevice {
            device_id: "d1".into(),
        };
        assert!(c2d.matches(&c2d_topic("d1", &[])));
        assert!(c2d.matches("devices/d1/messages/devicebound"));
        assert!(!c2d.matches(&c2d_topic("d10", &[])));
        let inputs = Subscription::ModuleInputs {
            device_id: "d".into(),
            module_id: "m".into(),
        };
        assert!(inputs.matches(&module_input_topic("d", "m", "in", &[])));
        assert!(!inputs.matches(&module_input_topic("d", "m2", "in", &[])));
    }

    proptest::proptest! {
        #[test]
        fn message_topics_match_their_subscriptions(
            device in "[A-Za-z0-9:.%_*?!(),=@;$'-]{1,40}",
            module in "[A-Za-z0-9:.%_*?!(),=@;$'-]{1,40}",
            input in "[A-Za-z0-9_-]{1,20}",
            properties in proptest::collection::vec((".*", ".*"), 0..4),
        ) {
            let c2d = Subscription::CloudToDevice { device_id: device.clone() };
            proptest::prop_assert!(c2d.matches(&c2d_topic(&device, &properties)));
            let inputs = Subscription::ModuleInputs { device_id: device.clone(), module_id: module.clone() };
            proptest::prop_assert!(inputs.matches(&module_input_topic(&device, &module, &input, &properties)));
        }
    }

    #[test]
    fn query_param_helper() {
        let topic = "$iothub/twin/res/204/?$rid=a%26b&$version=3";
        assert_eq!(query_param(topic, "$rid").as_deref(), Some("a&b"));
        assert_eq!(query_param(topic, "$version").as_deref(), Some("3"));
        assert_eq!(query_param(topic, "$missing"), None);
        assert_eq!(query_param("no/query", "$rid"), None);
        assert_eq!(query_param("t/?$rid=%FF", "$rid"), None);
        assert_eq!(query_param("t/?$rid", "$rid").as_deref(), Some(""));
    }
}

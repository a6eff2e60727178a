//! Property tests for the parsers: no panic on arbitrary input, and format → parse round trips
//! for SAS tokens, connection strings, topics, property bags, timestamps and error bodies.

use proptest::prelude::*;
use twinhub_proto::connection_string::{ConnectionString, ConnectionStringKind};
use twinhub_proto::error::{ErrorBody, ErrorCode};
use twinhub_proto::sas::{SasToken, generate_sas_token};
use twinhub_proto::time::{format_timestamp, parse_timestamp};
use twinhub_proto::topic::{self, Delivery, Inbound, Subscription};
use twinhub_proto::{ids, topic::parse_property_bag};

use base64::prelude::{BASE64_STANDARD, Engine as _};

/// A device or module id made of the characters IoT Hub allows.
fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9:.+%_#*?!(),=@;$'-]{1,128}"
}

/// An id that is also a literal MQTT filter level (no wildcard characters).
fn filter_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9:.%_*?!(),=@;$'-]{1,40}"
}

fn properties() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((any::<String>(), any::<String>()), 0..8)
}

/// A connection string value: anything but ';' (the separator), non-empty.
fn cs_value() -> impl Strategy<Value = String> {
    "[^;]{1,40}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic(input in any::<String>()) {
        if let Ok(token) = SasToken::parse(&input) {
            let _ = token.verify("AAECAwQ=");
            let _ = token.scope();
        }
        let _ = input.parse::<ConnectionString>();
        let _ = topic::parse_publish_topic(&input);
        let _ = topic::parse_delivery_topic(&input);
        let _ = topic::parse_subscription(&input);
        let _ = topic::parse_property_bag(&input);
        let _ = ids::validate_device_id(&input);
        let _ = ids::validate_method_name(&input);
        let _ = parse_timestamp(&input);
        let body = ErrorBody { message: input.clone(), exception_message: input };
        let _ = body.parse_code();
    }

    #[test]
    fn sas_parser_never_panics_on_near_misses(
        fields in "(sr|sig|se|skn|x|)(=?)[A-Za-z0-9%+/=:&]{0,24}(&(sr|sig|se|skn)=[A-Za-z0-9%+/=:]{0,24}){0,5}"
    ) {
        let input = format!("SharedAccessSignature {fields}");
        if let Ok(token) = SasToken::parse(&input) {
            let _ = token.verify("AAECAwQ=");
            prop_assert!(token.is_expired(token.expiry));
        }
    }

    #[test]
    fn topic_parsers_never_panic_on_near_misses(
        path in "(\\$iothub/|devices/)[a-zA-Z0-9/%$?=&#+ -]{0,60}"
    ) {
        let _ = topic::parse_publish_topic(&path);
        let _ = topic::parse_delivery_topic(&path);
        let _ = topic::parse_subscription(&path);
    }

    #[test]
    fn connection_string_parser_never_panics_on_near_misses(
        parts in prop::collection::vec(
            "(HostName|DeviceId|ModuleId|SharedAccessKeyName|SharedAccessKey|SharedAccessSignature|GatewayHostName|x509|hostname|)(=?)[a-zA-Z0-9=+/]{0,12}",
            0..8,
        )
    ) {
        let _ = parts.join(";").parse::<ConnectionString>();
    }

    #[test]
    fn sas_round_trip(
        resource in ".{1,60}",
        key in prop::collection::vec(any::<u8>(), 1..64),
        other_key in prop::collection::vec(any::<u8>(), 1..64),
        key_name in prop::option::of(".{1,20}"),
        expiry in any::<u64>(),
    ) {
        let key_b64 = BASE64_STANDARD.encode(&key);
        let token = generate_sas_token(&resource, &key_b64, key_name.as_deref(), expiry)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let parsed = SasToken::parse(&token).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&parsed.resource, &resource);
        prop_assert_eq!(&parsed.key_name, &key_name);
        prop_assert_eq!(parsed.expiry, expiry);
        prop_assert!(parsed.verify(&key_b64));
        if other_key != key {
            prop_assert!(!parsed.verify(&BASE64_STANDARD.encode(&other_key)));
        }
    }

    #[test]
    fn connection_string_round_trip(
        host in cs_value(),
        device in prop::option::of(cs_value()),
        module in prop::option::of(cs_value()),
        policy in cs_value(),
        key in cs_value(),
        gateway in prop::option::of(cs_value()),
        x509 in any::<bool>(),
    ) {
        let cs = match device {
            Some(device) => ConnectionString {
                host_name: host,
                device_id: Some(device),
                module_id: module,
                shared_access_key: (!x509).then_some(key),
                gateway_host_name: gateway,
                x509,
                ..ConnectionString::default()
            },
            None => ConnectionString {
                gateway_host_name: gateway,
                ..ConnectionString::service(&host, &policy, &key)
            },
        };
        let text = cs.to_string();
        let parsed = text.parse::<ConnectionString>()
            .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(parsed.kind(), cs.kind());
        if cs.module_id.is_some() {
            prop_assert_eq!(parsed.kind(), ConnectionStringKind::Module);
        }
        prop_assert_eq!(parsed, cs);
    }

    #[test]
    fn property_bag_round_trip(props in properties()) {
        prop_assert_eq!(parse_property_bag(&topic::encode_property_bag(&props)), props);
    }

    #[test]
    fn telemetry_round_trip(device in id(), module in prop::option::of(id()), props in properties()) {
        let text = topic::telemetry_topic(&device, module.as_deref(), &props);
        match topic::parse_publish_topic(&text) {
            Ok(Inbound::Telemetry { device_id, module_id, properties }) => {
                prop_assert_eq!(device_id, device.as_str());
                prop_assert_eq!(module_id, module.as_deref());
                prop_assert_eq!(parse_property_bag(properties), topic::sdk_property_order(&props));
            }
            other => prop_assert!(false, "{text:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn device_request_topics_round_trip(status in any::<i32>(), rid in ".{1,40}") {
        let response = topic::method_response_topic(status, &rid);
        prop_assert_eq!(
            topic::parse_publish_topic(&response),
            Ok(Inbound::MethodResponse { status, rid: rid.as_str().into() })
        );
        let get = topic::twin_get_topic(&rid);
        prop_assert_eq!(topic::parse_publish_topic(&get), Ok(Inbound::TwinGet { rid: rid.as_str().into() }));
        let patch = topic::twin_patch_reported_topic(&rid);
        prop_assert_eq!(
            topic::parse_publish_topic(&patch),
            Ok(Inbound::TwinPatchReported { rid: rid.as_str().into() })
        );
    }

    #[test]
    fn hub_delivery_topics_round_trip(
        name in "[A-Za-z0-9_. -]{1,40}",
        rid in ".{1,40}",
        status in any::<u16>(),
        version in prop::option::of(any::<u64>()),
        desired_version in any::<u64>(),
    ) {
        prop_assert!(ids::validate_method_name(&name).is_ok());
        let request = topic::method_request_topic(&name, &rid);
        prop_assert_eq!(
            topic::parse_delivery_topic(&request),
            Ok(Delivery::MethodRequest { method_name: name.as_str().into(), rid: rid.as_str().into() })
        );
        let response = topic::twin_response_topic(status, &rid, version);
        prop_assert_eq!(
            topic::parse_delivery_topic(&response),
            Ok(Delivery::TwinResponse { status, rid: rid.as_str().into(), version })
        );
        let patch = topic::desired_patch_topic(desired_version);
        prop_assert_eq!(
            topic::parse_delivery_topic(&patch),
            Ok(Delivery::DesiredPatch { version: Some(desired_version) })
        );
    }

    #[test]
    fn message_delivery_topics_round_trip(
        device in id(),
        module in id(),
        input in "[A-Za-z0-9_-]{1,20}",
        props in properties(),
    ) {
        let c2d = topic::c2d_topic(&device, &props);
        match topic::parse_delivery_topic(&c2d) {
            Ok(Delivery::CloudToDevice { device_id, properties }) => {
                prop_assert_eq!(device_id, device.as_str());
                prop_assert_eq!(parse_property_bag(properties), props.clone());
            }
            other => prop_assert!(false, "{c2d:?} parsed as {other:?}"),
        }

        let input_topic = topic::module_input_topic(&device, &module, &input, &props);
        match topic::parse_delivery_topic(&input_topic) {
            Ok(Delivery::ModuleInput { device_id, module_id, input_name, properties }) => {
                prop_assert_eq!(device_id, device.as_str());
                prop_assert_eq!(module_id, module.as_str());
                prop_assert_eq!(input_name, input.as_str());
                prop_assert_eq!(parse_property_bag(properties), props);
            }
            other => prop_assert!(false, "{input_topic:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn subscription_round_trip(device in filter_id(), module in filter_id()) {
        for sub in [
            Subscription::Methods,
            Subscription::TwinResponses,
            Subscription::DesiredPatches,
            Subscription::CloudToDevice { device_id: device.clone() },
            Subscription::ModuleInputs { device_id: device.clone(), module_id: module.clone() },
        ] {
            prop_assert_eq!(topic::parse_subscription(&sub.filter()), Ok(sub));
        }
    }

    #[test]
    fn valid_ids_validate(id in id()) {
        prop_assert_eq!(ids::validate_device_id(&id), Ok(()));
        prop_assert_eq!(ids::validate_module_id(&id), Ok(()));
    }

    #[test]
    fn timestamp_round_trip(seconds in -62_135_596_800i64..253_402_300_799, nanos in 0i32..1_000_000_000) {
        let ts = jiff::Timestamp::new(seconds, nanos).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let text = format_timestamp(ts);
        let parsed = parse_timestamp(&text).ok_or_else(|| TestCaseError::fail(text.clone()))?;
        // Seven fraction digits keep 100 ns resolution; the civil-time digits beyond are cut,
        // which rounds toward the past (also before 1970).
        let total = ts.as_nanosecond();
        prop_assert_eq!(parsed.as_nanosecond(), total - total.rem_euclid(100));
        prop_assert_eq!(format_timestamp(parsed), text);
    }

    #[test]
    fn error_body_round_trip(index in 0..ErrorCode::ALL.len(), text in any::<String>(), tracking in "[0-9a-f]{32}") {
        let code = ErrorCode::ALL[index];
        let body = ErrorBody::json(code, &text, &tracking, jiff::Timestamp::UNIX_EPOCH);
        prop_assert_eq!(body.parse_code(), Some(code));
        let wire = serde_json::to_string(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: ErrorBody = serde_json::from_str(&wire).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.parse_code(), Some(code));
        let detail = back.detail().ok_or_else(|| TestCaseError::fail("no JSON detail"))?;
        prop_assert_eq!(detail.message, text);
        prop_assert_eq!(detail.tracking_id, tracking);
    }
}

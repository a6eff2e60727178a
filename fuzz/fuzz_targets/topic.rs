//! Fuzz target for the device topic grammar: arbitrary text goes through
//! `parse_publish_topic`, `parse_delivery_topic`, `parse_subscription` and
//! `parse_property_bag` without panicking; whatever parses is formatted again with the
//! matching formatter and must parse back to the same value (property bags by their decoded
//! items); every subscription prints back to the exact filter it came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twinhub_proto::topic::{
    Delivery, Inbound, Subscription, c2d_topic, desired_patch_topic, encode_property_bag,
    method_request_topic, method_response_topic, module_input_topic, parse_delivery_topic,
    parse_property_bag, parse_publish_topic, parse_subscription, sdk_property_order,
    telemetry_topic, twin_get_topic, twin_patch_reported_topic, twin_response_topic,
};
use twinhub_proto::validate_method_name;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    // Property bags: decode, encode, decode is the identity on decoded items.
    let bag = parse_property_bag(text);
    assert_eq!(parse_property_bag(&encode_property_bag(&bag)), bag);
    let mut ordered = sdk_property_order(&bag);
    let mut sorted = bag.clone();
    ordered.sort();
    sorted.sort();
    assert_eq!(ordered, sorted, "sdk_property_order is not a permutation");

    match parse_subscription(text) {
        Ok(subscription) => {
            assert_eq!(subscription.filter(), text);
            if let Subscription::CloudToDevice { device_id }
            | Subscription::ModuleInputs { device_id, .. } = &subscription
            {
                assert!(!device_id.contains(['+', '#', '/']), "{text:?}");
            }
        }
        Err(error) => assert!(error.to_string().chars().count() < 200, "{error}"),
    }

    match parse_publish_topic(text) {
        Ok(Inbound::Telemetry {
            device_id,
            module_id,
            properties,
        }) => {
            let items = parse_property_bag(properties);
            let topic = telemetry_topic(device_id, module_id, &items);
            let Ok(Inbound::Telemetry {
                device_id: d,
                module_id: m,
                properties: p,
            }) = parse_publish_topic(&topic)
            else {
                panic!("{text:?} formatted as {topic:?}, which is no telemetry topic");
            };
            assert_eq!((d, m), (device_id, module_id), "{topic:?}");
            assert_eq!(parse_property_bag(p), sdk_property_order(&items), "{topic:?}");
        }
        Ok(inbound) => {
            let topic = match &inbound {
                Inbound::MethodResponse { status, rid } => method_response_topic(*status, rid),
                Inbound::TwinGet { rid } => twin_get_topic(rid),
                Inbound::TwinPatchReported { rid } => twin_patch_reported_topic(rid),
                Inbound::Telemetry { .. } => unreachable!(),
            };
            assert_eq!(parse_publish_topic(&topic), Ok(inbound), "{text:?} as {topic:?}");
        }
        Err(error) => assert!(error.to_string().chars().count() < 200, "{error}"),
    }

    match parse_delivery_topic(text) {
        Ok(delivery) => {
            let topic = match &delivery {
                // The name is written as is: only names that survive that round-trip.
                Delivery::MethodRequest { method_name, rid } => {
                    if validate_method_name(method_name).is_err() || method_name.contains('%') {
                        return;
                    }
                    method_request_topic(method_name, rid)
                }
                Delivery::TwinResponse {
                    status,
                    rid,
                    version,
                } => twin_response_topic(*status, rid, *version),
                Delivery::DesiredPatch { version: None } => return,
                Delivery::DesiredPatch { version: Some(v) } => desired_patch_topic(*v),
                Delivery::CloudToDevice {
                    device_id,
                    properties,
                } => c2d_topic(device_id, &parse_property_bag(properties)),
                Delivery::ModuleInput {
                    device_id,
                    module_id,
                    input_name,
                    properties,
                } => module_input_topic(
                    device_id,
                    module_id,
                    input_name,
                    &parse_property_bag(properties),
                ),
            };
            let again = parse_delivery_topic(&topic)
                .unwrap_or_else(|e| panic!("{text:?} formatted as {topic:?}, which fails: {e}"));
            match (&delivery, &again) {
                (
                    Delivery::CloudToDevice {
                        device_id,
                        properties,
                    },
                    Delivery::CloudToDevice {
                        device_id: d,
                        properties: p,
                    },
                ) => {
                    assert_eq!(device_id, d);
                    assert_eq!(parse_property_bag(properties), parse_property_bag(p));
                }
                (
                    Delivery::ModuleInput {
                        device_id,
                        module_id,
                        input_name,
                        properties,
                    },
                    Delivery::ModuleInput {
                        device_id: d,
                        module_id: m,
                        input_name: i,
                        properties: p,
                    },
                ) => {
                    assert_eq!((device_id, module_id, input_name), (d, m, i));
                    assert_eq!(parse_property_bag(properties), parse_property_bag(p));
                }
                _ => assert_eq!(again, delivery, "{text:?} formatted as {topic:?}"),
            }
        }
        Err(error) => assert!(error.to_string().chars().count() < 200, "{error}"),
    }
});

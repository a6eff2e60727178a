//! Fuzz target for twin documents: arbitrary JSON goes through `validate_section` for tags,
//! desired and reported properties; whatever validates validates again unchanged, merges into
//! a section (twice, with the same result) and replaces it without panicking, keeps
//! `$metadata` in step with the properties, has a `replace` diff that turns the old properties
//! into the new ones, agrees with `check_size`, and survives the device record's JSON round
//! trip and the service's twin rendering.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use twinhub_core::record::DeviceRecord;
use twinhub_core::twin_doc::{Section, SectionKind, check_size, strip_nulls, validate_section};

/// A device record as the store holds it, with empty twin sections.
const RECORD: &str = r#"{"device_id":"d1","generation_id":"g","identity_version":1,
"status":"enabled","status_reason":null,"status_updated_time":"t","auth":{"auth_type":"sas",
"primary_key":null,"secondary_key":null,"primary_thumbprint":null,"secondary_thumbprint":null},
"iot_edge":false,"device_scope":null,"parent_scopes":[],"connection_state_updated_time":"t",
"last_activity_time":"t","cloud_to_device_message_count":0,"twin":{"version":1,"tags":{},
"desired":{"props":{},"version":1,"metadata":{}},"reported":{"props":{},"version":1,"metadata":{}}}}"#;

/// A section at version 2 holding some properties for patches to merge into.
fn base(desired: bool) -> Section {
    let mut section = Section::new("t0", desired);
    let Value::Object(props) = json!({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": "s"})
    else {
        unreachable!()
    };
    section.apply_patch(&props, "t0", desired);
    section
}

/// At every level each property has a `$metadata` entry, and each entry but the stamps is a
/// property.
fn check_metadata(props: &Map<String, Value>, meta: &Map<String, Value>) {
    let stamp = |key: &str| key == "$lastUpdated" || key == "$lastUpdatedVersion";
    assert!(meta.contains_key("$lastUpdated"), "{meta:?}");
    for (key, value) in props {
        let Some(Value::Object(entry)) = meta.get(key) else {
            panic!("{key:?} has no $metadata in {meta:?}");
        };
        match value {
            Value::Object(sub) => check_metadata(sub, entry),
            _ => assert!(entry.keys().all(|k| stamp(k)), "leaf {key:?}: {entry:?}"),
        }
    }
    for key in meta.keys() {
        assert!(stamp(key) || props.contains_key(key), "stale $metadata {key:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let template = DeviceRecord::decode(RECORD.as_bytes()).expect("template record");
    for kind in [SectionKind::Tags, SectionKind::Desired, SectionKind::Reported] {
        let Ok(patch) = validate_section(kind, &value) else {
            continue;
        };
        let revalidated = validate_section(kind, &Value::Object(patch.clone()));
        assert_eq!(revalidated.ok().as_ref(), Some(&patch), "validation is not idempotent");
        let desired = kind == SectionKind::Desired;

        let mut section = base(desired);
        assert_eq!(section.apply_patch(&patch, "t1", desired), 3);
        check_metadata(&section.props, &section.metadata);
        let once = section.props.clone();
        section.apply_patch(&patch, "t2", desired);
        assert_eq!(section.props, once, "the same patch merged twice differs");
        let size = serde_json::to_vec(&section.props).map_or(usize::MAX, |v| v.len());
        assert_eq!(check_size(kind, &section.props).is_ok(), size <= kind.limit());

        // A replacement, as the service's PUT does it: nulls stripped first.
        let mut replacement = patch.clone();
        strip_nulls(&mut replacement);
        let mut replaced = base(desired);
        let diff = replaced.replace(replacement.clone(), "t3", desired);
        assert_eq!(replaced.props, replacement);
        assert_eq!(replaced.version, 3);
        check_metadata(&replaced.props, &replaced.metadata);
        let mut patched = base(desired);
        patched.apply_patch(&diff, "t3", desired);
        assert_eq!(
            patched.props, replaced.props,
            "the replace diff {diff:?} does not turn the old properties into the new"
        );

        let mut record = template.clone();
        match kind {
            SectionKind::Tags => record.twin.tags = section.props,
            SectionKind::Desired => record.twin.desired = section,
            SectionKind::Reported => record.twin.reported = section,
        }
        let decoded = DeviceRecord::decode(&record.encode());
        assert_eq!(decoded.ok().as_ref(), Some(&record), "record round trip");
        let twin = serde_json::to_vec(&record.to_twin(false)).expect("twin renders");
        if let Err(error) = serde_json::from_slice::<Value>(&twin) {
            panic!("the twin the service reads back does not parse: {error}");
        }
    }
});

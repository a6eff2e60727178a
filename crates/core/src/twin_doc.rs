//! The twin document rules, in one place: key and depth validation, size limits, the merge of
//! a patch into a section (null deletes), and the `$metadata` tree that records when each
//! property last changed. Used by `twins` for service and device writes alike.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// IoT Hub's limits on twin sections, in bytes of JSON (without `$metadata`).
pub const TAGS_LIMIT: usize = 8 * 1024;
pub const DESIRED_LIMIT: usize = 32 * 1024;
pub const REPORTED_LIMIT: usize = 32 * 1024;
/// Maximum nesting depth of objects inside a section.
pub const MAX_DEPTH: usize = 10;
/// Maximum length in bytes of a property name.
pub const MAX_KEY_LEN: usize = 1024;
/// Maximum length in bytes of a string value.
pub const MAX_STRING_LEN: usize = 4 * 1024;

/// Which part of the twin a document belongs to (for messages and limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Tags,
    Desired,
    Reported,
}

impl SectionKind {
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Tags => "tags",
            SectionKind::Desired => "desired properties",
            SectionKind::Reported => "reported properties",
        }
    }

    pub fn limit(self) -> usize {
        match self {
            SectionKind::Tags => TAGS_LIMIT,
            SectionKind::Desired => DESIRED_LIMIT,
            SectionKind::Reported => REPORTED_LIMIT,
        }
    }
}

/// One versioned twin section (desired or reported) with its metadata tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Section {
    pub props: Map<String, Value>,
    pub version: u64,
    /// `{"$lastUpdated": .., ["$lastUpdatedVersion": ..], "<key>": {..}}`
    pub metadata: Map<String, Value>,
}

impl Section {
    pub fn new(now: &str, with_version_stamp: bool) -> Self {
        let mut s = Section {
            props: Map::new(),
            version: 1,
            metadata: Map::new(),
        };
        stamp(&mut s.metadata, now, with_version_stamp.then_some(1));
        s
    }

    /// The section as the service sees it: properties plus `$metadata` and `$version`.
    pub fn to_service_json(&self) -> Value {
        let mut m = self.props.clone();
        m.insert("$metadata".into(), Value::Object(self.metadata.clone()));
        m.insert("$version".into(), Value::from(self.version));
        Value::Object(m)
    }

    /// The section as a device sees it in a twin GET: properties plus `$version`.
    pub fn to_device_json(&self) -> Value {
        let mut m = self.props.clone();
        m.insert("$version".into(), Value::from(self.version));
        Value::Object(m)
    }

    /// Merges `patch` (already validated) into the section: objects merge recursively,
    /// `null` deletes, anything else replaces. Bumps `$version`. Returns the new version.
    pub fn apply_patch(&mut self, patch: &Map<String, Value>, now: &str, desired: bool) -> u64 {
        self.version += 1;
        let version = desired.then_some(self.version);
        merge(
            &mut self.props,
            Some(&mut self.metadata),
            patch,
            now,
            version,
        );
        stamp(&mut self.metadata, now, version);
        self.version
    }

    /// Replaces the whole section with `props` (already validated). Returns the patch that
    /// turns the old properties into the new ones (removed keys as `null`), for devices.
    pub fn replace(
        &mut self,
        props: Map<String, Value>,
        now: &str,
        desired: bool,
    ) -> Map<String, Value> {
        self.version += 1;
        let version = desired.then_some(self.version);
        let old = std::mem::take(&mut self.props);
        self.metadata = Map::new();
        merge(
            &mut self.props,
            Some(&mut self.metadata),
            &props,
            now,
            version,
        );
        stamp(&mut self.metadata, now, version);
        diff(&old, &self.props)
    }
}

/// The merge patch that turns `old` into `new`: keys gone from `new` as `null`, objects on
/// both sides diffed recursively (a merge keeps the members a patch leaves out), any other
/// value as it is in `new`.
fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in new {
        let value = match (old.get(key), value) {
            (Some(Value::Object(before)), Value::Object(after)) => {
                Value::Object(diff(before, after))
            }
            _ => value.clone(),
        };
        patch.insert(key.clone(), value);
    }
    patch
}

fn stamp(meta: &mut Map<String, Value>, now: &str, version: Option<u64>) {
    meta.insert("$lastUpdated".into(), Value::from(now));
    if let Some(v) = version {
        meta.insert("$lastUpdatedVersion".into(), Value::from(v));
    }
}

/// Merges `patch` into `props`: objects merge recursively, `null` deletes, anything else
/// replaces. `meta`, the section's `$metadata` tree, is kept in step when there is one (tags
/// have none).
pub(crate) fn merge(
    props: &mut Map<String, Value>,
    mut meta: Option<&mut Map<String, Value>>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                props.shift_remove(key);
                if let Some(meta) = meta.as_deref_mut() {
                    meta.shift_remove(key);
                }
            }
            Value::Object(sub) => {
                let fresh = !matches!(props.get(key), Some(Value::Object(_)));
                if fresh {
                    props.insert(key.clone(), Value::Object(Map::new()));
                }
                let child_meta = match meta.as_deref_mut() {
                    Some(meta) => {
                        let entry = meta
                            .entry(key.clone())
                            .or_insert_with(|| Value::Object(Map::new()));
                        // A value that was not an object before has no nested metadata to keep.
                        if fresh || !entry.is_object() {
                            *entry = Value::Object(Map::new());
                        }
                        match entry.as_object_mut() {
                            Some(m) => {
                                stamp(m, now, version);
                                Some(m)
                            }
                            None => None,
                        }
                    }
                    None => None,
                };
                if let Some(Value::Object(p)) = props.get_mut(key) {
                    merge(p, child_meta, sub, now, version);
                }
            }
            leaf => {
                props.insert(key.clone(), leaf.clone());
                if let Some(meta) = meta.as_deref_mut() {
                    let mut m = Map::new();
                    stamp(&mut m, now, version);
                    meta.insert(key.clone(), Value::Object(m));
                }
            }
        }
    }
}

/// Checks a patch or replacement for a section: an object, keys by IoT Hub's rules, depth,
/// string lengths. Root-level `$metadata` and `$version` (echoed back by SDKs that reuse a
/// twin they read) are removed rather than refused.
pub fn validate_section(kind: SectionKind, value: &Value) -> Result<Map<String, Value>> {
    let Value::Object(map) = value else {
        return Err(Error::invalid(format!(
            "{} must be a JSON object",
            kind.name()
        )));
    };
    let mut map = map.clone();
    if kind != SectionKind::Tags {
        map.shift_remove("$metadata");
        map.shift_remove("$version");
    }
    check_object(kind, &map, 1)?;
    // The result is measured after the merge; the patch itself is bounded too, because a
    // desired patch goes to the device as sent (a patch of nothing but nulls changes little
    // but could be megabytes). Twice the section allows deleting every key of a full one.
    let size = serde_json::to_vec(&map).map_or(usize::MAX, |v| v.len());
    if size > 2 * kind.limit() {
        return Err(Error::invalid(format!(
            "The {} patch is {size} bytes, over the limit of {} bytes",
            kind.name(),
            2 * kind.limit()
        )));
    }
    Ok(map)
}

fn check_object(kind: SectionKind, map: &Map<String, Value>, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(too_deep(kind));
    }
    for (key, value) in map {
        check_key(kind, key)?;
        check_value(kind, value, depth)?;
    }
    Ok(())
}

fn check_value(kind: SectionKind, value: &Value, depth: usize) -> Result<()> {
    match value {
        Value::Object(m) => check_object(kind, m, depth + 1),
        Value::Array(items) => {
            // Nested arrays count too: unchecked, they could go as deep as the JSON parser
            // allows, and the stored record, a few levels further in, would not read back.
            if depth > MAX_DEPTH {
                return Err(too_deep(kind));
            }
            for item in items {
                match item {
                    Value::Null => {
                        return Err(Error::invalid(format!(
                            "{}: arrays cannot contain null",
                            kind.name()
                        )));
                    }
                    other => check_value(kind, other, depth + 1)?,
                }
            }
            Ok(())
        }
        Value::String(s) if s.len() > MAX_STRING_LEN => Err(Error::invalid(format!(
            "{}: a string value is longer than {MAX_STRING_LEN} bytes",
            kind.name()
        ))),
        _ => Ok(()),
    }
}

fn too_deep(kind: SectionKind) -> Error {
    Error::invalid(format!(
        "{} exceed the maximum nesting depth of {MAX_DEPTH}",
        kind.name()
    ))
}

fn check_key(kind: SectionKind, key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.len() > MAX_KEY_LEN
        || key
            .chars()
            .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control());
    if bad {
        let shown: String = key.chars().take(64).collect();
        return Err(Error::invalid(format!(
            "{}: invalid property name '{shown}' (names are 1 to {MAX_KEY_LEN} bytes without '.', '$', spaces or control characters)",
            kind.name()
        )));
    }
    Ok(())
}

/// Refuses a section that grew past its limit after a merge.
pub fn check_size(kind: SectionKind, props: &Map<String, Value>) -> Result<()> {
    let size = serde_json::to_vec(props)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > kind.limit() {
        return Err(Error::invalid(format!(
            "{} are {size} bytes, over the limit of {} bytes",
            kind.name(),
            kind.limit()
        )));
    }
    Ok(())
}

/// Drops `null` members recursively: in a replacement, or inside a newly created object,
/// a null has nothing to delete.
pub fn strip_nulls(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        if let Value::Object(m) = v {
            strip_nulls(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test value is not an object"),
        }
    }

    #[test]
    fn merge_sets_deletes_and_nests_with_metadata() {
        let mut s = Section::new("t0", true);
        let v = s.apply_patch(&obj(json!({"a": 1, "b": {"c": 2, "d": 3}})), "t1", true);
        assert_eq!(v, 2);
        assert_eq!(
            Value::Object(s.props.clone()),
            json!({"a": 1, "b": {"c": 2, "d": 3}})
        );
        assert_eq!(s.metadata["b"]["c"]["$lastUpdated"], "t1");
        assert_eq!(s.metadata["b"]["c"]["$lastUpdatedVersion"], 2);
        let v = s.apply_patch(
            &obj(json!({"a": null, "b": {"d": null, "e": "x"}})),
            "t2",
            true,
        );
        assert_eq!(v, 3);
        assert_eq!(
            Value::Object(s.props.clone()),
            json!({"b": {"c": 2, "e": "x"}})
        );
        assert!(s.metadata.get("a").is_none());
        assert!(s.metadata["b"].get("d").is_none());
        assert_eq!(s.metadata["b"]["c"]["$lastUpdated"], "t1");
        assert_eq!(s.metadata["b"]["$lastUpdated"], "t2");
        assert_eq!(s.metadata["$lastUpdated"], "t2");
        assert_eq!(s.metadata["$lastUpdatedVersion"], 3);
    }

    #[test]
    fn reported_metadata_has_no_version_stamp() {
        let mut s = Section::new("t0", false);
        s.apply_patch(&obj(json!({"a": 1})), "t1", false);
        assert!(s.metadata.get("$lastUpdatedVersion").is_none());
        assert!(s.metadata["a"].get("$lastUpdatedVersion").is_none());
        assert_eq!(s.version, 2);
    }

    #[test]
    fn a_leaf_replaced_by_an_object_and_back() {
        let mut s = Section::new("t0", true);
        s.apply_patch(&obj(json!({"a": 1})), "t1", true);
        s.apply_patch(&obj(json!({"a": {"x": true}})), "t2", true);
        assert_eq!(s.props["a"], json!({"x": true}));
        s.apply_patch(&obj(json!({"a": "s"})), "t3", true);
        assert_eq!(s.props["a"], json!("s"));
        assert!(s.metadata["a"].get("x").is_none());
    }

    #[test]
    fn replace_reports_removed_keys_as_null() {
        let mut s = Section::new("t0", true);
        s.apply_patch(&obj(json!({"a": 1, "b": 2})), "t1", true);
        let diff = s.replace(obj(json!({"b": 3, "c": 4})), "t2", true);
        assert_eq!(Value::Object(diff), json!({"a": null, "b": 3, "c": 4}));
        assert_eq!(Value::Object(s.props.clone()), json!({"b": 3, "c": 4}));
        assert_eq!(s.version, 3);
    }

    #[test]
    fn replace_diff_removes_nested_members() {
        // Found by the twin_patch fuzz target: the diff was {"e": null, "a": {"c": {}}}, which
        // merged on the device kept "b" and "d".
        let mut s = Section::new("t0", true);
        s.apply_patch(
            &obj(json!({"a": {"b": 1, "c": {"d": 2}}, "e": 3})),
            "t1",
            true,
        );
        let mut device = s.clone();
        let diff = s.replace(obj(json!({"a": {"c": {}}})), "t2", true);
        assert_eq!(
            Value::Object(diff.clone()),
            json!({"e": null, "a": {"b": null, "c": {"d": null}}})
        );
        device.apply_patch(&diff, "t2", true);
        assert_eq!(device.props, s.props);
        assert_eq!(Value::Object(s.props), json!({"a": {"c": {}}}));
    }

    #[test]
    fn key_rules() {
        for bad in ["a.b", "$x", "a b", "tab\t", ""] {
            let v = json!({ bad: 1 });
            assert!(
                validate_section(SectionKind::Desired, &v).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(
            validate_section(SectionKind::Desired, &json!({"ok_key-1": {"n": [1, 2]}})).is_ok()
        );
        assert!(validate_section(SectionKind::Reported, &json!([1])).is_err());
        assert!(validate_section(SectionKind::Reported, &json!({"a": [1, null]})).is_err());
    }

    #[test]
    fn echoed_version_and_metadata_are_dropped_but_not_in_tags() {
        let m = validate_section(
            SectionKind::Desired,
            &json!({"$version": 4, "$metadata": {}, "x": 1}),
        )
        .unwrap();
        assert_eq!(Value::Object(m), json!({"x": 1}));
        assert!(validate_section(SectionKind::Tags, &json!({"$version": 4})).is_err());
    }

    #[test]
    fn depth_limit() {
        let mut v = json!(1);
        for _ in 0..MAX_DEPTH {
            v = json!({ "k": v });
        }
        assert!(validate_section(SectionKind::Desired, &v).is_ok());
        let deeper = json!({ "k": v });
        assert!(validate_section(SectionKind::Desired, &deeper).is_err());
    }

    #[test]
    fn nested_arrays_are_depth_limited() {
        // Found by the twin_patch fuzz target: 125 nested arrays passed validation, and the
        // device record holding them then failed to decode (serde_json's recursion limit).
        let nested = |levels: usize| {
            let mut v = json!(1);
            for _ in 0..levels {
                v = json!([v]);
            }
            json!({ "a": v })
        };
        assert!(validate_section(SectionKind::Reported, &nested(MAX_DEPTH)).is_ok());
        assert!(validate_section(SectionKind::Reported, &nested(MAX_DEPTH + 1)).is_err());
        assert!(validate_section(SectionKind::Tags, &nested(125)).is_err());
    }

    #[test]
    fn size_limit() {
        let mut m = Map::new();
        m.insert("big".into(), Value::from("x".repeat(4000)));
        assert!(check_size(SectionKind::Tags, &m).is_ok());
        for i in 0..3 {
            m.insert(format!("big{i}"), Value::from("x".repeat(4000)));
        }
        assert!(check_size(SectionKind::Tags, &m).is_err());
        assert!(check_size(SectionKind::Desired, &m).is_ok());
    }

    #[test]
    fn strip_nulls_recursively() {
        let mut m = obj(json!({"a": null, "b": {"c": null, "d": 1}}));
        strip_nulls(&mut m);
        assert_eq!(Value::Object(m), json!({"b": {"d": 1}}));
    }
}

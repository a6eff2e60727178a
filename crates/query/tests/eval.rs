//! Evaluation semantics: operators, functions, undefined propagation and type mismatches, as
//! IoT Hub (after the DocumentDB SQL dialect) defines them.

mod common;

use common::docs_twin;
use serde_json::{Value, json};
use twinhub_query::{parse, parse_condition};

fn doc() -> Value {
    json!({
        "deviceId": "Sensor-01",
        "n": 10,
        "f": 2.5,
        "neg": -3,
        "big": 18446744073709551615u64,
        "s": "hello",
        "empty": "",
        "t": true,
        "nul": null,
        "arr": [1, "two", {"k": 3, "j": 4}, [5]],
        "obj": {"a": 1, "b": "x"},
        "Mixed": {"CaseKey": "found"}
    })
}

/// The condition's value on `doc()`; `None` when undefined.
fn value(condition: &str) -> Option<Value> {
    parse_condition(condition)
        .unwrap_or_else(|error| panic!("{condition}: {error}"))
        .evaluate(&doc())
}

fn holds(condition: &str) -> bool {
    parse_condition(condition)
        .unwrap_or_else(|error| panic!("{condition}: {error}"))
        .matches(&doc())
}

fn check(cases: &[(&str, Option<Value>)]) {
    for (condition, expected) in cases {
        assert_eq!(&value(condition), expected, "{condition}");
    }
}

#[test]
fn comparisons_of_each_type() {
    check(&[
        ("n = 10", Some(json!(true))),
        ("n = 10.0", Some(json!(true))),
        ("n != 10", Some(json!(false))),
        ("n <> 11", Some(json!(true))),
        ("n < 11", Some(json!(true))),
        ("n <= 10", Some(json!(true))),
        ("n > 10", Some(json!(false))),
        ("n >= 10.5", Some(json!(false))),
        ("f > 2", Some(json!(true))),
        ("neg < 0", Some(json!(true))),
        ("big > 9223372036854775807", Some(json!(true))),
        ("big = 18446744073709551615", Some(json!(true))),
        ("s = 'hello'", Some(json!(true))),
        ("s = \"hello\"", Some(json!(true))),
        ("s < 'help'", Some(json!(true))),
        ("s > 'Hello'", Some(json!(true))),
        ("'10' < '9'", Some(json!(true))),
        ("empty < s", Some(json!(true))),
        ("t = true", Some(json!(true))),
        ("t > false", Some(json!(true))),
        ("nul = null", Some(json!(true))),
        ("nul != null", Some(json!(false))),
        ("nul <= null", Some(json!(true))),
    ]);
}

#[test]
fn different_types_never_compare() {
    for condition in [
        "n = '10'",
        "n != '10'",
        "s = 5",
        "t = 1",
        "nul = 0",
        "nul = false",
        "s < 5",
        "n > 'a'",
        "obj = obj",
        "arr = arr",
        "obj != 1",
    ] {
        assert_eq!(value(condition), None, "{condition}");
        assert!(!holds(condition), "{condition}");
        assert!(!holds(&format!("NOT ({condition})")), "NOT ({condition})");
    }
}

#[test]
fn missing_properties_are_undefined() {
    for condition in [
        "missing = 1",
        "missing != 1",
        "missing < 1",
        "missing = null",
        "missing = missing",
        "s.deeper = 1",
        "arr[9] = 1",
        "obj.a.b = 1",
        "missing IN [1]",
        "missing NIN [1]",
        "missing + 1 = 2",
        "NOT missing",
        "missing",
    ] {
        assert_eq!(value(condition), None, "{condition}");
        assert!(!holds(condition), "{condition}");
    }
    assert!(holds("NOT IS_DEFINED(missing) OR missing != 1"));
}

#[test]
fn logic_with_undefined() {
    check(&[
        ("true AND true", Some(json!(true))),
        ("true AND false", Some(json!(false))),
        ("false AND missing", Some(json!(false))),
        ("missing AND false", Some(json!(false))),
        ("true AND missing", None),
        ("true OR missing", Some(json!(true))),
        ("missing OR true", Some(json!(true))),
        ("false OR missing", None),
        ("false OR false", Some(json!(false))),
        ("NOT true", Some(json!(false))),
        ("NOT false", Some(json!(true))),
        ("NOT 'true'", None),
        ("NOT nul", None),
        ("'true' AND true", None),
        ("t", Some(json!(true))),
    ]);
    // Only exactly `true` passes a condition.
    for condition in ["s", "n", "obj", "arr", "nul", "'true'", "1"] {
        assert!(!holds(condition), "{condition}");
    }
}

#[test]
fn arithmetic() {
    check(&[
        ("n + 5", Some(json!(15))),
        ("n - 15", Some(json!(-5))),
        ("n * f", Some(json!(25.0))),
        ("n / 4", Some(json!(2.5))),
        ("n / 5", Some(json!(2))),
        ("n % 3", Some(json!(1))),
        ("neg % 2", Some(json!(-1))),
        ("f % 1", Some(json!(0.5))),
        ("n / 0", None),
        ("n % 0", None),
        ("f / 0", None),
        ("big + 1", Some(json!(18446744073709551616.0))),
        (
            "9223372036854775807 + 1",
            Some(json!(9223372036854775808u64)),
        ),
        ("-n", Some(json!(-10))),
        ("+f", Some(json!(2.5))),
        ("-s", None),
        ("s + 1", None),
        ("s + 'x'", None),
        ("nul * 2", None),
        ("n + 1 > n", Some(json!(true))),
        ("(n + 2) * 3 = 36", Some(json!(true))),
    ]);
}

#[test]
fn in_and_nin() {
    check(&[
        ("s IN ['a', 'hello']", Some(json!(true))),
        ("s IN ['a', 'b']", Some(json!(false))),
        ("s NIN ['a', 'b']", Some(json!(true))),
        ("s NIN ['hello']", Some(json!(false))),
        ("n IN [1, 10.0]", Some(json!(true))),
        ("n IN ['10']", Some(json!(false))),
        ("nul IN [null]", Some(json!(true))),
        ("t IN [true]", Some(json!(true))),
        ("s IN []", Some(json!(false))),
        ("s NIN []", Some(json!(true))),
        ("obj IN [1]", None),
        ("deviceId IN [LOWER('X'), 'Sensor-01']", Some(json!(true))),
    ]);
}

#[test]
fn type_functions() {
    let cases: [(&str, [bool; 8]); 7] = [
        // IS_DEFINED, IS_NULL, IS_BOOL, IS_NUMBER, IS_STRING, IS_ARRAY, IS_OBJECT, IS_PRIMITIVE
        (
            "missing",
            [false, false, false, false, false, false, false, false],
        ),
        ("nul", [true, true, false, false, false, false, false, true]),
        ("t", [true, false, true, false, false, false, false, true]),
        ("n", [true, false, false, true, false, false, false, true]),
        ("s", [true, false, false, false, true, false, false, true]),
        (
            "arr",
            [true, false, false, false, false, true, false, false],
        ),
        (
            "obj",
            [true, false, false, false, false, false, true, false],
        ),
    ];
    let functions = [
        "IS_DEFINED",
        "IS_NULL",
        "IS_BOOL",
        "IS_NUMBER",
        "IS_STRING",
        "IS_ARRAY",
        "IS_OBJECT",
        "IS_PRIMITIVE",
    ];
    for (argument, expected) in cases {
        for (function, expected) in functions.iter().zip(expected) {
            let condition = format!("{function}({argument})");
            assert_eq!(value(&condition), Some(json!(expected)), "{condition}");
        }
    }
    check(&[
        ("AS_NUMBER('42')", Some(json!(42))),
        ("AS_NUMBER('-1.5')", Some(json!(-1.5))),
        ("AS_NUMBER('1e2')", Some(json!(100.0))),
        ("AS_NUMBER(n)", Some(json!(10))),
        ("AS_NUMBER('ten')", None),
        ("AS_NUMBER('NaN')", None),
        ("AS_NUMBER('inf')", None),
        ("AS_NUMBER(t)", None),
    ]);
}

#[test]
fn string_functions() {
    check(&[
        ("STARTSWITH(deviceId, 'Sensor')", Some(json!(true))),
        ("STARTS_WITH(deviceId, 'sensor')", Some(json!(false))),
        ("ENDSWITH(deviceId, '-01')", Some(json!(true))),
        ("ENDS_WITH(deviceId, '-02')", Some(json!(false))),
        ("CONTAINS(deviceId, 'or-0')", Some(json!(true))),
        ("CONTAINS(deviceId, 'xyz')", Some(json!(false))),
        ("STARTSWITH(n, '1')", None),
        ("CONTAINS(s, missing)", None),
        ("INDEX_OF(s, 'l')", Some(json!(2))),
        ("INDEX_OF('héllo', 'l')", Some(json!(2))),
        ("INDEX_OF(s, 'z')", Some(json!(-1))),
        ("CONCAT(s, '-', deviceId)", Some(json!("hello-Sensor-01"))),
        ("CONCAT(s, n)", None),
        ("LENGTH(s)", Some(json!(5))),
        ("LENGTH('héllo')", Some(json!(5))),
        ("LENGTH(empty)", Some(json!(0))),
        ("LENGTH(arr)", None),
        ("LOWER(deviceId)", Some(json!("sensor-01"))),
        ("UPPER(deviceId)", Some(json!("SENSOR-01"))),
        ("LOWER(n)", None),
        ("SUBSTRING(s, 1)", Some(json!("ello"))),
        ("SUBSTRING(s, 1, 3)", Some(json!("ell"))),
        ("SUBSTRING(s, -2, 2)", Some(json!("he"))),
        ("SUBSTRING(s, 10)", Some(json!(""))),
        ("SUBSTRING(s, 0, -1)", Some(json!(""))),
        ("SUBSTRING('héllo', 1, 2)", Some(json!("él"))),
        ("SUBSTRING(s, 'a')", None),
        ("LOWER(deviceId) = 'sensor-01'", Some(json!(true))),
    ]);
}

#[test]
fn array_contains() {
    check(&[
        ("ARRAY_CONTAINS(arr, 1)", Some(json!(true))),
        ("ARRAY_CONTAINS(arr, 1.0)", Some(json!(true))),
        ("ARRAY_CONTAINS(arr, 'two')", Some(json!(true))),
        ("ARRAY_CONTAINS(arr, 'three')", Some(json!(false))),
        ("ARRAY_CONTAINS(arr, [5])", Some(json!(true))),
        ("ARRAY_CONTAINS(arr, obj)", Some(json!(false))),
        ("ARRAY_CONTAINS(['a', 'b'], 'b')", Some(json!(true))),
        ("ARRAY_CONTAINS(s, 'h')", None),
        ("ARRAY_CONTAINS(arr, missing)", None),
    ]);
    let partial = json!({"items": [{"k": 3, "j": 4}], "probe": {"k": 3}});
    let condition = |text: &str| parse_condition(text).expect("parses").evaluate(&partial);
    assert_eq!(
        condition("ARRAY_CONTAINS(items, probe)"),
        Some(json!(false))
    );
    assert_eq!(
        condition("ARRAY_CONTAINS(items, probe, true)"),
        Some(json!(true))
    );
    assert_eq!(
        condition("ARRAY_CONTAINS(items, probe, false)"),
        Some(json!(false))
    );
}

#[test]
fn math_functions() {
    check(&[
        ("ABS(neg)", Some(json!(3))),
        ("ABS(-2.5)", Some(json!(2.5))),
        (
            "ABS(-9223372036854775808)",
            Some(json!(9223372036854775808u64)),
        ),
        ("CEILING(f)", Some(json!(3.0))),
        ("CEILING(n)", Some(json!(10))),
        ("FLOOR(f)", Some(json!(2.0))),
        ("FLOOR(-2.5)", Some(json!(-3.0))),
        ("SIGN(neg)", Some(json!(-1))),
        ("SIGN(0)", Some(json!(0))),
        ("SIGN(f)", Some(json!(1))),
        ("SQRT(16)", Some(json!(4.0))),
        ("SQRT(-1)", None),
        ("SQUARE(n)", Some(json!(100))),
        ("SQUARE(f)", Some(json!(6.25))),
        ("EXP(0)", Some(json!(1.0))),
        ("POWER(2, 10)", Some(json!(1024.0))),
        ("POWER(2, 10) = 1024", Some(json!(true))),
        ("POWER(10, 400)", None),
        ("ABS(s)", None),
    ]);
}

#[test]
fn property_names_fall_back_to_case_insensitive_matching() {
    check(&[
        ("mixed.casekey", Some(json!("found"))),
        ("MIXED.CASEKEY = 'found'", Some(json!(true))),
        ("DeviceId = 'Sensor-01'", Some(json!(true))),
        ("arr[2].K", Some(json!(3))),
        ("arr[3][0]", Some(json!(5))),
        ("obj['b']", Some(json!("x"))),
    ]);
    // Large objects take a hashed path; the same rules hold there.
    let mut large = serde_json::Map::new();
    for n in 0..100 {
        large.insert(format!("key{n}"), json!(n));
    }
    large.insert("Special".into(), json!("yes"));
    let large = json!({"tags": large});
    for (condition, expected) in [
        ("tags.key42 = 42", true),
        ("tags.KEY42 = 42", true),
        ("tags.special = 'yes'", true),
        ("tags.key100 = 100", false),
    ] {
        let expr = parse_condition(condition).expect("parses");
        assert_eq!(expr.matches(&large), expected, "{condition}");
    }
    let exact = json!({"key": 1, "KEY": 2});
    let query = parse_condition("KEY = 2").expect("parses");
    assert!(
        query.matches(&exact),
        "an exact match wins over a case-insensitive one"
    );
}

#[test]
fn query_without_where_matches_everything() {
    let query = parse("SELECT * FROM devices").expect("parses");
    assert!(query.matches(&docs_twin()));
    assert!(query.matches(&json!(null)));
    let filtered = parse("SELECT * FROM devices WHERE deviceId = 'myDeviceId'").expect("parses");
    assert!(filtered.matches(&docs_twin()));
    assert!(!filtered.matches(&json!(null)));
    assert!(!filtered.matches(&json!([1, 2])));
}

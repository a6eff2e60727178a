//! Projection, TOP, GROUP BY and the aggregates over small fleets.

mod common;

use common::{docs_twin, twin};
use serde_json::{Value, json};
use twinhub_query::parse;

fn fleet() -> Vec<Value> {
    let mut docs = Vec::new();
    for (id, site, temp, status) in [
        ("a", "north", json!(20), Some("current")),
        ("b", "south", json!(25.5), Some("current")),
        ("c", "north", json!(30), Some("error")),
        ("d", "north", json!("hot"), None),
        ("e", "south", Value::Null, Some("current")),
    ] {
        let mut doc = twin(id, status, json!({"site": site}));
        doc["properties"]["reported"]["temp"] = temp;
        docs.push(doc);
    }
    docs.push(twin("f", None, json!({})));
    docs
}

fn run(query: &str, docs: &[Value]) -> Vec<Value> {
    parse(query)
        .unwrap_or_else(|error| panic!("{query}: {error}"))
        .aggregate(docs)
}

#[test]
fn count_with_where_and_no_group_is_one_row() {
    assert_eq!(
        run(
            "SELECT COUNT() AS n FROM devices WHERE tags.site = 'north'",
            &fleet()
        ),
        [json!({"n": 3})]
    );
    assert_eq!(
        run(
            "SELECT COUNT() AS n FROM devices WHERE tags.site = 'west'",
            &fleet()
        ),
        [json!({"n": 0})]
    );
}

#[test]
fn sum_avg_min_max() {
    let numeric = |ids: &[&str]| -> Vec<Value> {
        fleet()
            .into_iter()
            .filter(|doc| ids.contains(&doc["deviceId"].as_str().unwrap_or("")))
            .collect()
    };
    let query = "SELECT SUM(properties.reported.temp) AS total, AVG(properties.reported.temp) AS mean, \
                 MIN(properties.reported.temp) AS low, MAX(properties.reported.temp) AS high \
                 FROM devices";
    assert_eq!(
        run(query, &numeric(&["a", "b", "c", "f"])),
        [json!({"total": 75.5, "mean": 75.5 / 3.0, "low": 20, "high": 30})]
    );
    assert_eq!(
        run(query, &numeric(&["a", "c"])),
        [json!({"total": 50, "mean": 25.0, "low": 20, "high": 30})]
    );
    // A string or null among the values makes SUM and AVG undefined (left out of the row);
    // MIN and MAX order null < numbers < strings.
    assert_eq!(run(query, &fleet()), [json!({"low": null, "high": "hot"})]);
    // Over nothing: COUNT is 0, SUM 0, AVG/MIN/MAX undefined.
    assert_eq!(
        run(
            "SELECT COUNT() AS n, SUM(version) AS s, AVG(version) AS a, MIN(version) AS lo \
             FROM devices",
            &[]
        ),
        [json!({"n": 0, "s": 0})]
    );
}

#[test]
fn group_by_several_keys_with_aggregates() {
    let query = "SELECT tags.site AS site, properties.reported.iothubDM.firmwareUpdate.status AS fw, \
                 COUNT() AS n, MAX(properties.reported.temp) AS hottest FROM devices \
                 WHERE is_defined(tags.site) \
                 GROUP BY tags.site, properties.reported.iothubDM.firmwareUpdate.status";
    assert_eq!(
        run(query, &fleet()),
        [
            json!({"site": "north", "fw": "current", "n": 1, "hottest": 20}),
            json!({"site": "south", "fw": "current", "n": 2, "hottest": 25.5}),
            json!({"site": "north", "fw": "error", "n": 1, "hottest": 30}),
            json!({"site": "north", "n": 1, "hottest": "hot"}),
        ]
    );
}

#[test]
fn unnamed_values_get_positional_names() {
    assert_eq!(
        run(
            "SELECT COUNT(), MAX(version), tags.site FROM devices GROUP BY tags.site",
            &fleet()
        ),
        [
            json!({"$1": 3, "$2": 3, "site": "north"}),
            json!({"$1": 2, "$2": 3, "site": "south"}),
            json!({"$1": 1, "$2": 3}),
        ]
    );
}

#[test]
fn group_by_without_aggregates_lists_distinct_values() {
    assert_eq!(
        run("SELECT tags.site FROM devices GROUP BY tags.site", &fleet()),
        [
            json!({"site": "north"}),
            json!({"site": "south"}),
            json!({})
        ]
    );
}

#[test]
fn top_limits_rows() {
    let rows = run("SELECT TOP 2 deviceId FROM devices", &fleet());
    assert_eq!(rows, [json!({"deviceId": "a"}), json!({"deviceId": "b"})]);
    let rows = run(
        "SELECT TOP 1 * FROM devices WHERE tags.site = 'south'",
        &fleet(),
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["deviceId"], json!("b"));
    let rows = run(
        "SELECT TOP 1 tags.site, COUNT() AS n FROM devices GROUP BY tags.site",
        &fleet(),
    );
    assert_eq!(rows, [json!({"site": "north", "n": 3})]);
    assert!(run("SELECT TOP 0 COUNT() AS n FROM devices", &fleet()).is_empty());
}

#[test]
fn project_builds_rows_from_single_documents() {
    let twin = docs_twin();
    let query = parse(
        "SELECT deviceId, properties.reported.telemetryConfig.sendFrequencyInSecs AS freq, \
         tags.location, properties.reported.missing FROM devices WHERE deviceId = 'nobody'",
    )
    .expect("parses");
    // project ignores WHERE; undefined values are left out.
    assert_eq!(
        query.project(&twin),
        json!({"deviceId": "myDeviceId", "freq": 300,
               "location": {"region": "US", "plant": "Redmond43"}})
    );
    assert_eq!(
        parse("SELECT * FROM devices")
            .expect("parses")
            .project(&twin),
        twin
    );
    let indexed = json!({"list": [{"name": "first"}, {"name": "second"}]});
    assert_eq!(
        parse("SELECT list[1].name, list[0] FROM devices")
            .expect("parses")
            .project(&indexed),
        json!({"name": "second", "list": {"name": "first"}})
    );
    let counted = parse("SELECT COUNT() AS n FROM devices").expect("parses");
    assert_eq!(counted.project(&twin), json!({"n": 1}));
}
